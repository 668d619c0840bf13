"""The world-model interface: the one seam between a world model and the training scripts.

Every script uses a world model through these members and nothing else (README: "The world-model interface"):

| member | what it is |
| --- | --- |
| `observation_space`, `action_space` | what the policy sees and emits, in imagination and in the real env seen through the model: the scripts size their networks from the imagined env's `single_observation_space` |
| `learns` | False for a given simulator: nothing is fitted, no real transition is collected for it, and `fit`, `save`, `load` are not needed |
| `fit(data, num_new=None, *, seed, refit_passes, writer, global_step)` | fit on real data (`num_new=None`), or refit after `num_new` new transitions were appended to `data` (a `real_env.TransitionBuffer`: each model decides whether it learns from transitions or whole episodes); returns metrics with `seconds` |
| `imagined_vector_env(num_envs, *, seed, horizon, start, halt, gamma, output, autoreset_mode)` | the natively batched imagined env (a `WorldModelVectorEnv`); optional: without it the scripts step `imagined_env`s in a `SyncVectorEnv` / `AsyncVectorEnv` |
| `imagined_env(*, seed, horizon, start, halt, gamma)` | one imagined env (a `WorldModelEnv`): SB3's checker, TorchRL's spec check, vector-env thunks |
| `real_env(env)` | the real env seen through the model: a Gymnasium env whose observations are what the policy sees in imagination (identity for the ensemble; a latent model updates its belief from each real observation and the previous action, and starts over at each reset) |
| `differentiable_step(obs, action, sample=False)` | optional, for `svg_imagined.py` (value gradients through imagination): one imagined step on torch tensors, `next_obs`, `reward` keeping the autograd graph back to `obs` and `action`, and `terminated` (bool, no graph); `sample=True`: a reparameterised draw, not the mean (`--model-noise`); the ensembles have it |
| `save(path, extra=None)`, `load(path)` | a checkpoint written atomically; `load` returns the model (it may return a new object) |
| `open_loop(data, episode, context, horizon, seed)`, `evaluate(data, seed)` | optional, for `train_world_model.py`'s report of a model that is not the ensemble: a decoded open-loop rollout of one real episode (dict of `real_obs`, `imagined_obs`, `real_reward`, `imagined_reward`) and accuracy figures on held-out data (`rssm.RSSMModel` has both) |

`start` is "start" (real reset states) or "buffer" (real states of the data); `halt` is the halt rule's threshold
(0: off); `horizon` None means the real env's time limit. `WorldModel` below is the base class with the parts that
are the same for every model; a model need not inherit from it, `check_world_model` checks what it offers.

A model is named the way Gymnasium names env entry points: `--world-model ensemble` (the reference ensemble;
`mbpo-ensemble`, `dhmbpo-ensemble`: the same with MBPO's or DHMBPO's sizes), `--world-model none` (no model: model-free), or `--world-model path/to/file.py:attr` / `package.module:attr`, where
`attr` is a class or function called as `attr(env_id=..., seed=..., device=...)` that returns the model.
"""
import importlib
import importlib.util
import inspect
import os
import sys

import gymnasium as gym

# The models of this collection, as entry points (resolved on use, so this module imports none of them).
BUILTIN = {"ensemble": "ensemble:EnsembleModel", "mbpo-ensemble": "ensemble:mbpo_ensemble",
           "dhmbpo-ensemble": "ensemble:dhmbpo_ensemble", "rssm": "rssm:RSSMModel"}
NO_MODEL = "none"

REQUIRED = ("observation_space", "action_space", "imagined_env", "real_env")
REQUIRED_TO_LEARN = ("fit", "save", "load")  # what a model that learns (learns = True, the default) needs as well


class WorldModelError(ValueError):
    """A `--world-model` spec that cannot be resolved, or an object that lacks part of the interface."""


class WorldModel:
    """The base of a world model for the scripts: subclasses set `observation_space`, `action_space`, implement
    `imagined_env` (and `imagined_vector_env` where the model batches), `fit` where it learns, `save`/`load`."""

    learns = True
    observation_space: gym.Space
    action_space: gym.Space

    def fit(self, data, num_new=None, *, seed=0, refit_passes=20, writer=None, global_step=0):
        raise NotImplementedError(f"{type(self).__name__} does not learn (learns = False): fit() is never called")

    def imagined_env(self, *, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99):
        raise NotImplementedError

    def real_env(self, env):
        """The identity view: the policy sees the real env's own observations (a model of the full state)."""
        return env

    def save(self, path, extra=None):
        raise NotImplementedError

    def load(self, path):
        raise NotImplementedError


def has_vector_env(model):
    return callable(getattr(model, "imagined_vector_env", None))


def check_world_model(model, where):
    """One line naming every part of the interface `model` lacks (or whose spaces are not gymnasium spaces)."""
    required = REQUIRED + (REQUIRED_TO_LEARN if getattr(model, "learns", True) else ())
    missing = [name for name in required if not hasattr(model, name)]
    missing += [name for name in required[2:] if hasattr(model, name) and not callable(getattr(model, name))]
    if missing:
        raise WorldModelError(f"{where}: {type(model).__name__} lacks {', '.join(missing)} of the world-model "
                              f"interface (needs {', '.join(required)}; see world_model.py)")
    for name in REQUIRED[:2]:
        if not isinstance(getattr(model, name), gym.Space):
            raise WorldModelError(f"{where}: {type(model).__name__}.{name} must be a gymnasium space, got "
                                  f"{type(getattr(model, name)).__name__}")
    return model


def resolve(spec):
    """The class or function behind a `--world-model` spec: a builtin name, `file.py:attr` or `module:attr`."""
    spec = BUILTIN.get(spec, spec)
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise WorldModelError(f"--world-model: expected {', '.join(BUILTIN)}, {NO_MODEL}, path/to/file.py:attr "
                              f"or package.module:attr, got {spec!r}")
    target, attr = spec.split(":")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise WorldModelError(f"--world-model: the file {target!r} does not exist (spec {spec!r})")
        name = "_world_model_" + os.path.splitext(os.path.basename(target))[0]
        module = sys.modules.get(name)
        if getattr(module, "__file__", None) != os.path.abspath(target):  # once per file and process
            module_spec = importlib.util.spec_from_file_location(name, os.path.abspath(target))
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look modules up by name
            module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise WorldModelError(f"--world-model: cannot import module {target!r} ({e}; spec {spec!r})") from None
    if not hasattr(module, attr):
        raise WorldModelError(f"--world-model: {target!r} has no attribute {attr!r} (spec {spec!r})")
    return getattr(module, attr)


def make(spec, env_id, seed=0, device="cpu"):
    """The world model named by `spec`, built for `env_id` (not yet fitted), checked against the interface."""
    factory = resolve(spec)
    if not callable(factory):
        raise WorldModelError(f"--world-model: {spec!r} is a {type(factory).__name__}, not a class or function")
    try:
        inspect.signature(factory).bind(env_id=env_id, seed=seed, device=device)
    except TypeError:
        raise WorldModelError(f"--world-model: {spec!r} must accept env_id=..., seed=..., device=... "
                              f"(it takes {inspect.signature(factory)})") from None
    except ValueError:  # no signature to check
        pass
    return check_world_model(factory(env_id=env_id, seed=seed, device=str(device)), f"--world-model {spec}")
