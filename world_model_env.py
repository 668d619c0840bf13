"""Gymnasium environments whose dynamics come from a learned world model ("imagination").

Two classes share one adapter contract (see the README's table): ``WorldModelEnv``, a single
``gymnasium.Env`` whose adapters work on one state, and ``WorldModelVectorEnv``, a natively batched
``gymnasium.vector.VectorEnv`` whose adapters work on a batch, so one model call steps every env.
The model is any Python object. Only gymnasium and numpy are imported; torch is used only when an
adapter hands back tensors or ``output="torch"`` is requested.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Mapping
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from seed_stream import stream_next, stream_nexts, stream_start, stream_starts  # noqa: F401 (tests import them here)

__all__ = ["WorldModelEnv", "WorldModelVectorEnv", "AdapterError", "AutoresetMode"]

_NO_ROWS = np.zeros(0, dtype=np.int64)  # no row finished (seedless resets' seeds: seed_stream.py)
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # Discrete range check: one reduction


class AdapterError(ValueError):
    """An adapter (reset_fn / transition_fn / action_transform_fn) returned something the env cannot use."""


def _torch():
    """torch if the user's code already imported it; we never import it ourselves for numpy users."""
    return sys.modules.get("torch")


class _GradOff:
    """``torch.no_grad()`` for the step's hot path: the same switch, without building a decorator-capable context
    object every step (about 20 us on a slow CPU, a tenth of a small model's step)."""

    __slots__ = ("torch", "prev")

    def __init__(self, torch):
        self.torch, self.prev = torch, True

    def __enter__(self):
        self.prev = self.torch.is_grad_enabled()
        self.torch._C._set_grad_enabled(False)

    def __exit__(self, *exc):
        self.torch._C._set_grad_enabled(self.prev)


def _no_grad():
    """Model state in an env never needs autograd history: adapters run, and reset rows are written, without it
    (a reset_fn that tracks gradients would otherwise fail to write into a state made under no_grad)."""
    torch = _torch()
    return _GradOff(torch) if torch is not None else contextlib.nullcontext()


def _is_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: Any) -> np.ndarray:
    return x.numpy(force=True) if _is_tensor(x) else np.asarray(x)  # force: detach and copy to host if needed


def _host_to_device(x: np.ndarray, device: Any):
    """A host array as a tensor on ``device``. To a GPU through pinned memory without blocking: torch's plain
    copy from pageable memory waits for the stream to drain, a host sync of its own in every step that resets."""
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(x))  # from_numpy: cheaper than as_tensor
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tensor_numpy(x: Any) -> np.ndarray:
    """A tensor as NumPy: a view for a plain CPU tensor (the step's case), else ``numpy(force=True)``'s copy.
    ``force=True`` alone costs four dispatches even when it has nothing to do."""
    try:
        return x.numpy()
    except (RuntimeError, TypeError):  # requires grad, or not on the CPU
        return x.numpy(force=True)


def _describe(x: Any) -> str:
    """Short description of a value for error messages: type, shape, dtype (never a full dump)."""
    if isinstance(x, np.ndarray) or _is_tensor(x):
        return f"{type(x).__name__}(shape={tuple(x.shape)}, dtype={x.dtype})"
    text = repr(x)
    return f"{type(x).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _kind(x: Any) -> str:
    """numpy's dtype.kind ('b', 'i', 'u', 'f', 'c', ...) for arrays and tensors alike."""
    if isinstance(x, (np.ndarray, np.generic)):
        return x.dtype.kind
    dtype = x.dtype
    return "b" if dtype is _torch().bool else "f" if dtype.is_floating_point else "c" if dtype.is_complex else "i"


def _check_adapter(owner: str, name: str, fn: Any, call: str, *args, **kwargs) -> None:
    """Check that ``fn`` can be called the way the env will call it (construction only, never per step)."""
    if not callable(fn):
        raise TypeError(f"{owner}: {name} must be a callable `{call}`, got {_describe(fn)}.")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{owner}: {name}{sig} cannot be called as `{call}` ({err}). "
                        f"Define it as `def {call}: ...`.") from None


def _check_args(owner, model, observation_space, action_space, reset_fn, transition_fn, action_transform_fn,
                seed, max_episode_steps, example_seed) -> int | None:
    """The constructor checks both envs share; returns max_episode_steps as an int (or None)."""
    for name, space in (("observation_space", observation_space), ("action_space", action_space)):
        if not isinstance(space, spaces.Space):
            raise TypeError(f"{owner}: {name} must be a gymnasium.spaces.Space (e.g. gymnasium.spaces.Box(...)), "
                            f"got {_describe(space)}.")
    _check_adapter(owner, "reset_fn", reset_fn, "reset_fn(model, seed=None, options=None)", model,
                   seed=example_seed, options=None)
    _check_adapter(owner, "transition_fn", transition_fn, "transition_fn(model, state, action)", model, None, None)
    if action_transform_fn is not None:
        _check_adapter(owner, "action_transform_fn", action_transform_fn, "action_transform_fn(model, action)",
                       model, None)
    if seed is not None and not _is_int(seed):
        raise TypeError(f"{owner}: seed must be an int or None, got {_describe(seed)}.")
    if max_episode_steps is None:
        return None
    if not _is_int(max_episode_steps):
        raise TypeError(f"{owner}: max_episode_steps must be a positive int or None, "
                        f"got {_describe(max_episode_steps)}.")
    if max_episode_steps <= 0:
        raise ValueError(f"{owner}: max_episode_steps must be > 0 (the trusted imagination horizon), got "
                         f"{max_episode_steps}. Use None for no time limit.")
    return int(max_episode_steps)


_EXAMPLES = {
    "reset_fn": "{'state': ..., 'observation': ..., 'info': {...} (optional)}",
    "transition_fn": "{'state': ..., 'observation': ..., 'reward': float, 'terminated': bool, "
                     "'truncated': bool (optional), 'info': {...} (optional)}",
}
_RESET_KEYS = ("state", "observation")
_STEP_KEYS = ("state", "observation", "reward", "terminated")


def _unpack(owner: str, adapter: str, out: Any, keys: tuple[str, ...]) -> list:
    """The values of ``keys`` in an adapter's result, or an error that shows the expected form."""
    if not isinstance(out, Mapping):
        raise AdapterError(f"{owner}: {adapter} must return a mapping like {_EXAMPLES[adapter]}, got {_describe(out)}.")
    try:
        return [out[k] for k in keys]
    except KeyError:
        raise AdapterError(f"{owner}: {adapter} result is missing key(s) {[k for k in keys if k not in out]}; it "
                           f"returned keys {sorted(out)}. Expected a mapping like {_EXAMPLES[adapter]}.") from None


def _check_info(owner: str, adapter: str, info: Any) -> dict:
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise AdapterError(f"{owner}: {adapter} 'info' must be a dict, got {_describe(info)}.")
    return info


# -- single env --------------------------------------------------------------------------------


class WorldModelEnv(gym.Env):
    """A Gymnasium env that steps a world model through small adapter functions (README: the adapter contract).

    ``model`` is passed as the first argument to every adapter. ``reset_fn(model, seed=None, options=None)``
    always receives an int seed (the one given to ``reset``, else the next of a seed stream keyed by the last
    seed given; see ``stream_next``), so a reset_fn that seeds from it makes episodes reproducible.
    ``transition_fn(model, state, action)``, optional ``action_transform_fn(model, action)`` (policy action ->
    model encoding) and ``render_fn(model, state)``. ``max_episode_steps`` is the trusted imagination horizon
    (``truncated`` when reached); ``seed`` is used by the first ``reset()`` that is not given one.
    """

    metadata = {"render_modes": ["rgb_array", "human", "ansi"]}

    def __init__(self, model: Any, observation_space: spaces.Space, action_space: spaces.Space,
                 reset_fn: Callable[..., Mapping], transition_fn: Callable[..., Mapping],
                 action_transform_fn: Callable[..., Any] | None = None, max_episode_steps: int | None = None,
                 seed: int | None = None, render_fn: Callable[..., Any] | None = None, render_mode: str | None = None):
        owner = self._owner = type(self).__name__
        self.max_episode_steps = _check_args(owner, model, observation_space, action_space, reset_fn, transition_fn,
                                             action_transform_fn, seed, max_episode_steps, example_seed=0)
        if render_fn is not None:
            _check_adapter(owner, "render_fn", render_fn, "render_fn(model, state)", model, None)
        if render_mode is not None and (render_fn is None or render_mode not in self.metadata["render_modes"]):
            raise ValueError(f"{owner}: render_mode={render_mode!r} needs a render_fn and one of "
                             f"{self.metadata['render_modes']}; got render_fn={render_fn!r}.")

        self.model = model
        self.observation_space = observation_space
        self.action_space = action_space
        self.reset_fn = reset_fn
        self.transition_fn = transition_fn
        self.action_transform_fn = action_transform_fn
        self.render_fn = render_fn
        self.render_mode = render_mode
        self._init_seed = None if seed is None else int(seed)
        self._box_obs = isinstance(observation_space, spaces.Box)
        self._obs_float = self._box_obs and np.issubdtype(observation_space.dtype, np.floating)
        self._discrete_action = isinstance(action_space, spaces.Discrete)
        self._state: Any = None
        self._done: bool | None = None  # None until the first reset
        self._elapsed = 0
        self._stream: int | None = None  # the seed stream's state (stream_next): seedless resets draw from it

    @property
    def state(self) -> Any:
        """The current model state (as returned by the last reset_fn / transition_fn)."""
        return self._state

    @property
    def elapsed_steps(self) -> int:
        return self._elapsed

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        # The constructor seed only stands in for the first reset; an explicit seed replaces it for good.
        seed, self._init_seed = self._init_seed if seed is None else seed, None
        super().reset(seed=seed)
        if seed is not None:
            model_seed, self._stream = seed, stream_start(seed)
        else:
            if self._stream is None:  # never seeded: a random stream (np_random draws from OS entropy)
                self._stream = stream_start(int(self.np_random.integers(0, 2**63 - 1)))
            self._stream, model_seed = stream_next(self._stream)
        with _no_grad():
            out = self.reset_fn(self.model, seed=model_seed, options=options)
        state, obs = _unpack(self._owner, "reset_fn", out, _RESET_KEYS)
        obs = self._check_obs(obs, "reset_fn")
        info = _check_info(self._owner, "reset_fn", out.get("info"))
        self._state = state
        self._done = False
        self._elapsed = 0
        return obs, info

    def step(self, action):
        if self._done is None:
            raise ResetNeeded(f"{self._owner}: call reset() before step().")
        if self._done:
            raise ResetNeeded(f"{self._owner}: the episode has ended (terminated or truncated); call reset() before "
                              "step().")
        action = self._check_action(action)
        with _no_grad():
            model_action = action if self.action_transform_fn is None else self.action_transform_fn(self.model, action)
            out = self.transition_fn(self.model, self._state, model_action)
        state, obs, reward, terminated = _unpack(self._owner, "transition_fn", out, _STEP_KEYS)
        obs = self._check_obs(obs, "transition_fn")
        reward = self._check_reward(reward)
        terminated = self._check_flag(terminated, "terminated")
        truncated = self._check_flag(out.get("truncated", False), "truncated")
        info = _check_info(self._owner, "transition_fn", out.get("info"))
        self._state = state
        self._elapsed += 1
        if self.max_episode_steps is not None and self._elapsed >= self.max_episode_steps:
            truncated = True
        self._done = terminated or truncated
        return obs, reward, terminated, truncated, info

    def render(self):
        if self.render_mode is None:
            gym.logger.warn(f"{self._owner}: render() called without render_mode; pass render_mode and render_fn.")
            return None
        return self.render_fn(self.model, self._state)

    def _check_obs(self, obs: Any, adapter: str):
        space = self.observation_space
        if type(obs) is not np.ndarray and (self._box_obs or _is_tensor(obs)):
            obs = _to_numpy(obs)
        if not self._box_obs:
            if not space.contains(obs):
                raise AdapterError(f"{self._owner}: {adapter} returned observation {_describe(obs)} that is not in "
                                   f"observation_space {space}.")
            return obs
        if obs.shape != space.shape:
            raise AdapterError(f"{self._owner}: {adapter} returned observation with shape {obs.shape}, expected "
                               f"{space.shape} from observation_space {space}. Return an observation of that shape or "
                               "fix observation_space.")
        if obs.dtype != space.dtype:
            # Casting within a kind (float64 -> float32, int -> float) is safe; float -> int would truncate.
            if not np.can_cast(obs.dtype, space.dtype, casting="same_kind"):
                raise AdapterError(f"{self._owner}: {adapter} returned observation of dtype {obs.dtype}, which cannot "
                                   f"be cast safely to observation_space dtype {space.dtype}. Return {space.dtype} "
                                   "values.")
            obs = obs.astype(space.dtype)
        # For small observations a Python-level check is ~5x cheaper than np.isfinite(...).all().
        if self._obs_float and not (all(map(math.isfinite, obs.ravel().tolist())) if obs.size <= 64
                                    else np.isfinite(obs).all()):
            raise AdapterError(f"{self._owner}: {adapter} returned a non-finite observation (NaN or Inf): {obs}. "
                               "The world model diverged; clip its predictions or shorten max_episode_steps.")
        return obs

    def _check_reward(self, reward: Any) -> float:
        if type(reward) is not float:
            zero_d = (isinstance(reward, np.ndarray) or _is_tensor(reward)) and reward.ndim == 0
            if not (_is_int(reward) or isinstance(reward, np.number) or zero_d and _kind(reward) in "iuf"):
                raise AdapterError(f"{self._owner}: transition_fn 'reward' must be a scalar number, got "
                                   f"{_describe(reward)}. Return a Python float (e.g. float(r)); for a batch of envs "
                                   "use WorldModelVectorEnv.")
            reward = float(reward)
        if not math.isfinite(reward):
            raise AdapterError(f"{self._owner}: transition_fn returned a non-finite reward ({reward}).")
        return reward

    def _check_flag(self, flag: Any, key: str) -> bool:
        if type(flag) is bool:
            return flag
        if (isinstance(flag, np.bool_) or (_is_int(flag) and flag in (0, 1))
                or ((isinstance(flag, np.ndarray) or _is_tensor(flag)) and flag.ndim == 0 and _kind(flag) == "b")):
            return bool(flag)
        raise AdapterError(f"{self._owner}: transition_fn {key!r} must be a bool, got {_describe(flag)}. "
                           f"Return bool(...) of a scalar condition (threshold probabilities or logits yourself).")

    def _check_action(self, action):
        space = self.action_space
        if self._discrete_action:
            # Fast path for the common case; everything else goes through Space.contains.
            if type(action) in (int, np.int64) and space.start <= action < space.start + space.n:
                return action
        action = _to_numpy(action) if _is_tensor(action) else action
        if isinstance(space, spaces.Box):
            arr = np.asarray(action)
            if arr.shape == space.shape and np.can_cast(arr.dtype, space.dtype, casting="same_kind"):
                arr = arr.astype(space.dtype, copy=False)
                if space.contains(arr):
                    return arr
        elif space.contains(action):
            return action
        raise ValueError(f"{self._owner}.step: action {_describe(action)} is not in action_space {space}. "
                         "Pass an action from env.action_space (e.g. env.action_space.sample()); "
                         "clip continuous actions to the bounds.")


def _scatter(dst: Any, rows: np.ndarray, src: Any, where: str, index: Any = None) -> Any:
    """Write ``src`` (k rows) into rows ``rows`` of ``dst`` (num_envs rows); dst may be a pytree. ``index``: rows
    as a tensor already (reused for every tensor leaf on its device). Callers hold _no_grad()."""
    torch = _torch()
    # the common leaf, a CPU tensor: through NumPy views, far fewer dispatches than index_copy_
    if index is None and torch is not None and type(dst) is type(src) is torch.Tensor and dst.device.type == "cpu" \
            and src.device.type == "cpu" and src.dtype == dst.dtype and src.shape == (len(rows), *dst.shape[1:]) \
            and not (dst.requires_grad or src.requires_grad):
        dst.numpy()[rows] = src.numpy()
        return dst
    if isinstance(dst, Mapping):
        return type(dst)({k: _scatter(dst[k], rows, src[k], f"{where}[{k!r}]", index) for k in dst})
    if isinstance(dst, (tuple, list)):
        return type(dst)(_scatter(d, rows, s, f"{where}[{i}]", index) for i, (d, s) in enumerate(zip(dst, src)))
    src_shape = tuple(getattr(src, "shape", ()))
    if src_shape != (len(rows), *tuple(dst.shape)[1:]):  # numpy would silently broadcast a wrong shape
        raise AdapterError(f"WorldModelVectorEnv: reset_fn returned {where} rows of shape {src_shape}, but "
                           f"transition_fn's {where} has shape {tuple(dst.shape)}; cannot write the reset rows. Both "
                           "adapters must return states with the same structure and trailing shape (one row per env).")
    try:
        if _is_tensor(dst):
            if index is None or index.device != dst.device:
                index = torch.from_numpy(rows).to(dst.device)
            if not (_is_tensor(src) and src.dtype == dst.dtype and src.device == dst.device):
                src = torch.as_tensor(src, device=dst.device, dtype=dst.dtype)
            dst.index_copy_(0, index, src)
        else:
            dst[rows] = _to_numpy(src)
    except Exception as err:  # dtype mismatch between reset_fn and transition_fn states
        raise AdapterError(f"WorldModelVectorEnv: cannot write the reset rows returned by reset_fn into {where} "
                           f"returned by transition_fn ({_describe(dst)} <- {_describe(src)}): {err}. Both adapters "
                           "must return states with the same structure, dtype and trailing shape; the env overwrites "
                           "finished rows in place.") from None
    return dst


def _leading_dim(x: Any) -> int | None:
    if isinstance(x, Mapping):
        x = next(iter(x.values()), None)
    elif isinstance(x, (tuple, list)):
        x = x[0] if x else None
    shape = getattr(x, "shape", None)
    return shape[0] if shape else None


def _final_info(info: dict, done: Any, rows: np.ndarray) -> dict:
    """``info`` as SyncVectorEnv reports it under "final_info": values of the finished rows only, masked by ``_key``."""
    out = {}
    for key, value in info.items():
        if isinstance(value, dict):
            out[key] = _final_info(value, done, rows)
        elif _is_tensor(value) and value.shape[:1] == done.shape:  # torch output: done is a tensor too
            out[key] = value.where(done.reshape(-1, *[1] * (value.ndim - 1)), 0)
        elif isinstance(value, np.ndarray) and value.shape[:1] == done.shape:
            out[key] = np.full(value.shape, None, object) if value.dtype == object else np.zeros_like(value)
            out[key][rows] = value[rows]
        else:  # not batched: nothing to select
            out[key] = value
        out[f"_{key}"] = done
    return out


class WorldModelVectorEnv(gym.vector.VectorEnv):
    """A natively batched Gymnasium vector env: one adapter call steps all ``num_envs`` envs.

    Adapters take and return batches (leading axis): ``reset_fn(model, seed=seeds, options=None)`` gets an int64
    array with one seed per row being reset (all rows on ``reset()``, the finished rows on autoreset) and returns
    that many rows; ``transition_fn`` returns ``reward``/``terminated``/``truncated``? of shape (num_envs,) and
    ``info`` as a dict of batched arrays. ``observation_space`` / ``action_space`` are the *single-env* spaces.
    ``reset(seed=s)`` seeds row ``i`` with ``s + i`` like ``SyncVectorEnv``; seedless resets and autoresets draw
    each row's next seed from its counter-based stream (``stream_nexts``: array operations, no per-row generator),
    the same stream a ``WorldModelEnv`` draws from, so a batched model reproduces ``SyncVectorEnv`` of
    ``WorldModelEnv`` trajectories. Autoreset follows Gymnasium's ``CartPoleVectorEnv``: rows
    that finish are remembered at the end of ``step`` and reset at the start of the next (``NEXT_STEP``), or at
    once (``SAME_STEP``, with ``final_obs`` / ``final_info`` as ``SyncVectorEnv`` reports them).

    ``output="torch"`` returns tensors on ``device`` (default: the adapters') with one device->host transfer per
    step for finiteness and done flags (SAME_STEP: one more when rows reset), plus one to validate the actions
    before the model sees them. The model state is never converted.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, model: Any, observation_space: spaces.Space, action_space: spaces.Space,
                 reset_fn: Callable[..., Mapping], transition_fn: Callable[..., Mapping], num_envs: int,
                 action_transform_fn: Callable[..., Any] | None = None, max_episode_steps: int | None = None,
                 seed: int | None = None, autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                 output: str = "numpy", device: Any = None):
        owner = self._owner = type(self).__name__
        self.max_episode_steps = _check_args(owner, model, observation_space, action_space, reset_fn, transition_fn,
                                             action_transform_fn, seed, max_episode_steps,
                                             example_seed=np.zeros(1, dtype=np.int64))
        if not isinstance(observation_space, spaces.Box):
            raise TypeError(f"{owner}: observation_space must be a Box (batched observations are arrays), got "
                            f"{observation_space}. Use WorldModelEnv with gymnasium.vector.SyncVectorEnv for other "
                            "observation spaces.")
        if not isinstance(action_space, (spaces.Discrete, spaces.Box, spaces.MultiDiscrete, spaces.MultiBinary)):
            raise TypeError(f"{owner}: action_space must be Discrete, Box, MultiDiscrete or MultiBinary, got "
                            f"{action_space}.")
        if not _is_int(num_envs) or num_envs < 1:
            raise ValueError(f"{owner}: num_envs must be an int >= 1, got {_describe(num_envs)}.")
        try:
            autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError:
            pass
        if autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"{owner}: autoreset_mode must be AutoresetMode.NEXT_STEP or AutoresetMode.SAME_STEP, "
                             f"got {autoreset_mode!r}.")
        if output not in ("numpy", "torch"):
            raise ValueError(f"{owner}: output must be 'numpy' or 'torch', got {output!r}.")

        self.model = model
        self.num_envs = int(num_envs)
        self.single_observation_space = observation_space
        self.single_action_space = action_space
        self.observation_space = batch_space(observation_space, self.num_envs)
        self.action_space = batch_space(action_space, self.num_envs)
        self.reset_fn = reset_fn
        self.transition_fn = transition_fn
        self.action_transform_fn = action_transform_fn
        self.autoreset_mode = autoreset_mode
        self.metadata = {**type(self).metadata, "autoreset_mode": autoreset_mode}
        self.output = output
        self.device = device
        self._init_seed = None if seed is None else int(seed)
        self._row_streams: np.ndarray | None = None  # per-row seed stream states (uint64, see stream_nexts)
        self._state: Any = None
        self._steps: Any = None
        self._autoreset_rows = _NO_ROWS  # host indices of the rows that finished last step (NEXT_STEP)
        self._autoreset_mask = None  # ... and the same rows as last step's done mask, in the output kind
        self._action_bounds = None  # Box bounds in the output kind, made at the first step
        self._graph = None  # cuda_graph_step.GraphStep after use_cuda_graph()

        self._torch_out = output == "torch"
        self._obs_float = np.issubdtype(observation_space.dtype, np.floating)
        self._obs_dtype, self._reward_dtype = observation_space.dtype, np.float32
        if self._torch_out:  # output="torch" asks for torch; numpy users never import it through us
            import torch

            self._obs_dtype, self._reward_dtype = torch.from_numpy(np.empty(0, self._obs_dtype)).dtype, torch.float32

    @property
    def state(self) -> Any:
        """The current batched model state (leading axis num_envs)."""
        return self._state

    @property
    def elapsed_steps(self) -> Any:
        """Per-env step counters of the current episodes."""
        return self._steps

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        seed, self._init_seed = self._init_seed if seed is None else seed, None
        n = self.num_envs
        given = np.zeros(n, dtype=bool)  # rows whose seed is given; the others draw from their streams
        seeds = np.zeros(n, dtype=np.int64)
        if _is_int(seed):
            seeds, given[:] = int(seed) + np.arange(n, dtype=np.int64), True
        elif isinstance(seed, np.ndarray) and seed.shape == (n,) and seed.dtype.kind in "iu":
            seeds, given[:] = seed.astype(np.int64), True
        elif isinstance(seed, (list, tuple, np.ndarray)) and len(seed) == n and all(
                s is None or _is_int(s) for s in seed):
            given[:] = [s is not None for s in seed]
            seeds[given] = [int(s) for s in seed if s is not None]
        elif seed is not None:
            raise ValueError(f"{self._owner}.reset: seed must be an int, None or a list of {n} ints, "
                             f"got {_describe(seed)}.")
        if (seeds < 0).any():
            raise ValueError(f"{self._owner}.reset: seeds must be non-negative ints, got {seeds[seeds < 0][:5]}.")
        if given.any():
            self._np_random, self._np_random_seed = seeding.np_random(int(seeds[given.argmax()]))
        if self._row_streams is None:  # never seeded: random streams from OS entropy
            self._row_streams = stream_starts(np.random.default_rng().integers(0, 2**63 - 1, size=n))
        self._row_streams[given] = stream_starts(seeds[given])
        # like WorldModelEnv: the given seed, else the next of the row's stream
        row_seeds = seeds
        row_seeds[~given] = self._draw_seeds(np.flatnonzero(~given))
        with _no_grad():
            state, obs, info = self._call_reset(row_seeds, options)
        self._finite_done_rows("reset_fn", obs)
        self._state = state
        self._steps = self._index(np.zeros(n, dtype=np.int64))
        self._autoreset_rows = _NO_ROWS
        if self._graph is not None:
            self._graph.after_reset()
        return obs, info

    def use_cuda_graph(self, eager: bool = False) -> "WorldModelVectorEnv":
        """Run every step as one CUDA graph (``cuda_graph_step.py``): the model, the bookkeeping and the checks
        in one launch, the host never waiting for the GPU. Needs ``output="torch"`` on a CUDA device, NEXT_STEP
        autoreset, a Discrete or Box action space and adapters a graph can hold (tensor ops on the device, no host
        reads, fixed shapes); call it before the first ``reset()``. Bad actions and non-finite values are then
        raised one step late. ``eager=True``: the same step without a graph, on any device. Returns the env."""
        from cuda_graph_step import GraphStep  # torch users only

        self._graph = GraphStep(self, eager=eager)
        return self

    def step(self, actions):
        if self._state is None:
            raise ResetNeeded(f"{self._owner}: call reset() before step().")
        if self._graph is not None:
            return self._graph.step(actions)
        given = actions
        actions, actions_ok = self._check_actions(actions)
        with _no_grad():  # one context for the whole step: the adapters and the reset rows' writes
            return self._step(actions, given, actions_ok)

    def _step(self, actions, given, actions_ok):
        if self.action_transform_fn is not None:
            actions = self.action_transform_fn(self.model, actions)
        out = self.transition_fn(self.model, self._state, actions)
        state, obs, reward, terminated = _unpack(self._owner, "transition_fn", out, _STEP_KEYS)
        if _leading_dim(state) != self.num_envs:
            raise AdapterError(f"{self._owner}: transition_fn returned a state with leading dimension "
                               f"{_leading_dim(state)}, expected {self.num_envs}.")
        obs = self._as_obs(obs, "transition_fn", self.num_envs)
        # NEXT_STEP: rows that finished last step start over and their transition is discarded. Last step's done
        # mask clears them: one op per array (reward, flags and counters are fresh copies the env may write)
        reset_rows = self._autoreset_rows
        clear = self._autoreset_mask if len(reset_rows) else None
        reward = self._as_vector(reward, "reward", clear)
        terminated = self._as_vector(terminated, "terminated", clear)
        steps = self._steps
        steps += 1
        if clear is not None:
            self._fill(steps, clear, 0)
        if "truncated" in out:
            truncated = self._as_vector(out["truncated"], "truncated", clear)
            if self.max_episode_steps is not None:
                truncated |= steps >= self.max_episode_steps
        elif self.max_episode_steps is not None:
            truncated = steps >= self.max_episode_steps  # 0 in the reset rows
        else:
            truncated = terminated & False
        info = _check_info(self._owner, "transition_fn", out.get("info"))
        if info and not self._torch_out:  # numpy output means numpy everywhere, infos included
            info = {k: _to_numpy(v) if _is_tensor(v) else v for k, v in info.items()}
        if clear is not None:
            state = self._reset_rows(reset_rows, state, obs, check=False)  # checked below, in the same sync
        done = terminated | truncated
        # torch output: the action check's flag comes to the host in this one sync
        rows = self._finite_done_rows("transition_fn", obs, reward, done, reset_rows,
                                      actions_check=None if actions_ok is None else (actions_ok, given))
        if self.autoreset_mode is AutoresetMode.NEXT_STEP:
            self._autoreset_rows, self._autoreset_mask = rows, done
        elif len(rows):  # SAME_STEP: report the final observations, then reset the finished rows in place
            if self._torch_out:
                final_obs = obs.clone()
            else:
                final_obs = np.full(self.num_envs, None, dtype=object)
                final_obs[rows] = list(obs[rows])
            info = {**info, "final_obs": final_obs, "_final_obs": done,
                    "final_info": _final_info(info, done, rows), "_final_info": done}
            state = self._reset_rows(rows, state, obs, check=True)
            self._steps[self._index(rows)] = 0
        self._state = state
        return obs, reward, terminated, truncated, info

    def close_extras(self, **kwargs):
        self._state = None

    def _call_reset(self, row_seeds: np.ndarray, options):
        out = self.reset_fn(self.model, seed=row_seeds, options=options)  # callers hold _no_grad()
        state, obs = _unpack(self._owner, "reset_fn", out, _RESET_KEYS)
        if self._torch_out and self.device is None:
            self.device = obs.device if _is_tensor(obs) else "cpu"
        obs = self._as_obs(obs, "reset_fn", len(row_seeds))
        if _leading_dim(state) != len(row_seeds):
            raise AdapterError(f"{self._owner}: reset_fn returned a state with leading dimension "
                               f"{_leading_dim(state)}, expected {len(row_seeds)} (one row per seed; got "
                               f"{len(row_seeds)} seeds).")
        return state, obs, _check_info(self._owner, "reset_fn", out.get("info"))

    def _reset_rows(self, rows: np.ndarray, state, obs, check: bool):
        """Start new episodes in ``rows``: write reset_fn's states and observations in place; return the state.
        The callers zero the rows' step counters."""
        r_state, r_obs, _ = self._call_reset(self._draw_seeds(rows), None)
        if check:
            self._finite_done_rows("reset_fn", r_obs, rows=rows)
        if self._torch_out:
            idx = self._index(rows)
            obs.index_copy_(0, idx, r_obs)
        else:
            idx, obs[rows] = None, r_obs
        return _scatter(state, rows, r_state, "state", idx)

    def _fill(self, x, mask, value) -> None:
        """x[mask] = value in place; mask: a bool row mask of the output kind."""
        if self._torch_out:
            x.masked_fill_(mask, value)
        else:
            x[mask] = value

    def _draw_seeds(self, rows: np.ndarray) -> np.ndarray:
        """The next seed of each row's stream (rows: unique host indices); advances those streams."""
        streams = self._row_streams
        if len(rows) > 8:
            streams[rows], seeds = stream_nexts(streams[rows])
            return seeds
        seeds = []  # an autoreset ends a row or two per step: Python ints beat a dozen NumPy calls (3 us, not 15)
        for row in rows.tolist():
            streams[row], seed = stream_next(int(streams[row]))
            seeds.append(seed)
        return np.array(seeds, dtype=np.int64)

    def _index(self, rows: np.ndarray):
        """Host row indices as a tensor on the output device (rows themselves for numpy output)."""
        return _host_to_device(rows, self.device) if self._torch_out else rows

    def _finite_done_rows(self, adapter: str, obs, reward=None, done=None, reset_rows=_NO_ROWS, rows=None,
                          actions_check=None):
        """Raise on NaN/Inf; return the host indices of the ``done`` rows.

        The fast check is one sum (NaN/Inf propagate through it); in torch mode the sum's finiteness, the action
        check (``actions_check``: a device flag and the actions given, raised on first) and the done flags come to
        the host in one transfer. Only when the sum is not finite do we look for the culprits (a sum that merely
        overflowed passes). ``rows`` maps ``obs`` rows to env indices for the error message.
        """
        if self._torch_out:
            total = 0.0 if reward is None else reward.sum()
            if self._obs_float:
                total = total + obs.sum(dtype=self._reward_dtype)
        else:  # ufunc reductions: the ndarray.sum wrapper costs as much as the sum of a few hundred floats
            total = 0.0 if reward is None else float(np.add.reduce(reward))
            if self._obs_float:
                total += float(np.add.reduce(obs, axis=None, dtype=np.float32))
        if self._torch_out:
            torch = _torch()
            parts = [torch.as_tensor(total, device=self.device).isfinite().reshape(1)]
            parts += [] if actions_check is None else [actions_check[0].reshape(1)]
            host = torch.cat(parts + ([] if done is None else [done])).cpu().numpy()  # the one sync
            ok, done_rows = host[0], host[len(parts):].nonzero()[0]
            if actions_check is not None and not host[1]:  # the cause before its effects (NaN from bad actions)
                self._state = None  # counters and seed streams moved this step: reset() before the next one
                raise self._bad_actions(actions_check[1])
        else:
            ok = math.isfinite(total)
            done_rows = _NO_ROWS if done is None else done.nonzero()[0]
        if ok:
            return done_rows
        for field, x in (("observation", obs if self._obs_float else None), ("reward", reward)):
            if x is None:
                continue
            bad = ~(x.isfinite() if self._torch_out else np.isfinite(x))
            bad = np.flatnonzero(_to_numpy(bad.reshape(len(bad), -1).any(1)))
            bad = bad if rows is None else rows[bad]
            from_reset = np.isin(bad, reset_rows)  # NEXT_STEP: these rows hold reset_fn's observations
            if from_reset.any():
                adapter, bad = "reset_fn", bad[from_reset]
            if len(bad):
                more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
                raise AdapterError(f"{self._owner}: {adapter} returned a non-finite {field} (NaN or Inf) in rows "
                                   f"{bad[:5].tolist()}{more}. The world model diverged; clip its predictions or "
                                   "shorten max_episode_steps.")
        return done_rows  # the sum merely overflowed

    def _convert(self, x):
        """To the output kind (numpy array, or torch tensor on self.device)."""
        if self._torch_out:
            return x.to(self.device) if _is_tensor(x) else _torch().as_tensor(np.asarray(x), device=self.device)
        if type(x) is np.ndarray:
            return x
        return _tensor_numpy(x) if _is_tensor(x) else np.asarray(x)

    def _as_obs(self, obs, adapter: str, rows: int):
        obs = self._convert(obs)
        expected = (rows, *self.single_observation_space.shape)
        if tuple(obs.shape) != expected:
            raise AdapterError(f"{self._owner}: {adapter} returned observations with shape {tuple(obs.shape)}, "
                               f"expected {expected} (rows, *observation_space.shape) for observation_space "
                               f"{self.single_observation_space}.")
        # Always a fresh copy the caller owns: adapters often return the state itself as the observation, and a
        # caller writing into obs (TorchRL does) must not rewrite the model state.
        if self._torch_out:
            if obs.dtype.is_floating_point and not self._obs_dtype.is_floating_point:
                raise AdapterError(f"{self._owner}: {adapter} returned {obs.dtype} observations; observation_space "
                                   f"dtype is {self.single_observation_space.dtype} and float -> int would truncate.")
            return obs.clone() if obs.dtype == self._obs_dtype else obs.to(self._obs_dtype)  # clone: cheaper
        if obs.dtype != self._obs_dtype and not np.can_cast(obs.dtype, self._obs_dtype, casting="same_kind"):
            raise AdapterError(f"{self._owner}: {adapter} returned {obs.dtype} observations that cannot be cast safely "
                               f"to observation_space dtype {self._obs_dtype}.")
        return obs.astype(self._obs_dtype)  # astype copies

    def _as_vector(self, x, key: str, clear=None):
        """reward (-> float32) or a flag (-> bool) of shape (num_envs,), always as a fresh copy; the rows of the
        bool mask ``clear`` (the output kind) set to 0 / False."""
        x = self._convert(x)
        flag = key != "reward"
        if tuple(x.shape) != (self.num_envs,):
            raise AdapterError(f"{self._owner}: transition_fn {key!r} must have shape ({self.num_envs},), one "
                               f"{'bool' if flag else 'value'} per env, got {_describe(x)}.")
        kind = _kind(x)
        if not flag:
            if kind not in "iuf":
                raise AdapterError(f"{self._owner}: transition_fn {key!r} must be numeric, got {_describe(x)}.")
            if self._torch_out:
                if x.dtype == self._reward_dtype:
                    return x.clone() if clear is None else x.masked_fill(clear, 0.0)  # out of place: the copy
                x = x.to(self._reward_dtype)
            else:
                x = x.astype(np.float32)
        elif kind == "b":
            if self._torch_out:
                return x.clone() if clear is None else x.masked_fill(clear, False)
            x = x.copy()
        elif kind not in "iu" or not bool(((x == 0) | (x == 1)).all()):  # 0/1 ints: rare, so a sync is fine
            raise AdapterError(f"{self._owner}: transition_fn {key!r} must be booleans (or 0/1 integers), got "
                               f"{_describe(x)}. Threshold probabilities or logits inside transition_fn (e.g. logits > "
                               "0).")
        else:
            x = x != 0
        if clear is not None:
            self._fill(x, clear, 0)
        return x

    def _shaped_actions(self, actions):
        """The actions in the output kind, after checking there is one per env (no kernel: shapes only)."""
        actions = self._convert(actions)
        if tuple(actions.shape) != self.action_space.shape:
            raise ValueError(f"{self._owner}.step: actions have shape {tuple(actions.shape)}, expected "
                             f"{self.action_space.shape} (num_envs={self.num_envs}, single action_space "
                             f"{self.single_action_space}). Pass one action per env.")
        return actions

    def _check_actions(self, actions):
        """Validate before the model sees them (an out-of-range index on a GPU is a device assert, not an error).
        Returns (actions, None) when checked here, or, for torch output, (actions, ok) with `ok` a device flag that
        `_finite_done_rows` brings to the host in the step's one sync; out-of-range Discrete actions are clamped
        for the model meanwhile, and the step raises before it returns (the env then needs a reset())."""
        space = self.single_action_space
        actions = self._shaped_actions(actions)
        if isinstance(space, spaces.Discrete):
            lo, hi, kind = space.start, space.start + space.n, _kind(actions)
            if kind not in "iu":
                ok = False
            elif self._torch_out:
                clamped = actions.clamp(lo, hi - 1)
                return clamped, (clamped == actions).all()
            else:  # one reduction: below-range values wrap to huge ones when read as unsigned
                shifted = actions if lo == 0 else actions - lo
                ok = int(np.maximum.reduce(shifted.view(_UNSIGNED[shifted.itemsize]), axis=None)) < space.n
        elif isinstance(space, spaces.Box):
            if self._action_bounds is None:  # converted once (a host->device copy per step otherwise)
                self._action_bounds = self._convert(space.low), self._convert(space.high)
            low, high = self._action_bounds
            if self._torch_out:
                actions = actions.to(low.dtype)
                return actions, (actions.clamp(low, high) == actions).all()  # NaN compares unequal: not ok
            elif np.can_cast(actions.dtype, space.dtype, casting="same_kind"):
                actions = actions.astype(space.dtype, copy=False)
            else:
                raise ValueError(f"{self._owner}.step: actions of dtype {actions.dtype} do not fit {space}.")
            ok = bool(((actions >= low) & (actions <= high)).all())
        else:  # MultiDiscrete / MultiBinary: rare here, use the space's own check on the host
            ok = self.action_space.contains(_to_numpy(actions).astype(self.action_space.dtype))
        if not ok:
            raise self._bad_actions(actions)
        return actions, None

    def _bad_actions(self, actions):
        return ValueError(f"{self._owner}.step: some actions are outside action_space {self.single_action_space} "
                          f"(got {_describe(actions)}). Pass actions from env.action_space; clip continuous actions "
                          "to the bounds.")
