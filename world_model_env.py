"""Gymnasium environments whose dynamics come from a learned world model ("imagination").

Two classes share one adapter contract (see the README's table):

* ``WorldModelEnv`` — a single ``gymnasium.Env``; adapters work on one state at a time.
* ``WorldModelVectorEnv`` — a natively batched ``gymnasium.vector.VectorEnv``; adapters work on a
  batch (leading ``num_envs`` axis), so one model call steps every env.

The model itself is any Python object: the adapters translate between it and Gymnasium.
Only gymnasium and numpy are imported; torch is used only when an adapter hands back tensors or
``output="torch"`` is requested.
"""

from __future__ import annotations

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

__all__ = ["WorldModelEnv", "WorldModelVectorEnv", "AdapterError", "AutoresetMode"]

# Seeds handed to reset_fn are drawn from the env's RNG in [0, 2**31 - 1) so they fit every seeding API.
_SEED_HIGH = 2**31 - 1
_NO_ROWS = np.zeros(0, dtype=np.int64)


class AdapterError(ValueError):
    """An adapter (reset_fn / transition_fn / action_transform_fn) returned something the env cannot use."""


# ----------------------------------------------------------------------------------------------
# small helpers shared by both envs


def _torch():
    """torch if the user's code already imported it; we never import it ourselves for numpy users."""
    return sys.modules.get("torch")


def _is_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: Any) -> np.ndarray:
    if _is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _describe(x: Any) -> str:
    """Short description of a value for error messages: type, shape, dtype (never a full dump)."""
    if isinstance(x, np.ndarray) or _is_tensor(x):
        return f"{type(x).__name__}(shape={tuple(x.shape)}, dtype={x.dtype})"
    text = repr(x)
    return f"{type(x).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _draw_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, _SEED_HIGH))


def _check_adapter(owner: str, name: str, fn: Any, call: str, args: tuple, kwargs: dict) -> None:
    """Check once, at construction, that ``fn`` can be called the way the env will call it."""
    if not callable(fn):
        raise TypeError(f"{owner}: {name} must be a callable `{call}`, got {_describe(fn)}.")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"{owner}: {name}{sig} cannot be called as `{call}` ({err}). "
            f"Define it as `def {call}: ...`."
        ) from None


def _check_space(owner: str, name: str, space: Any) -> None:
    if not isinstance(space, spaces.Space):
        raise TypeError(
            f"{owner}: {name} must be a gymnasium.spaces.Space (e.g. gymnasium.spaces.Box(...)), "
            f"got {_describe(space)}."
        )


def _check_max_steps(owner: str, max_episode_steps: Any) -> int | None:
    if max_episode_steps is None:
        return None
    if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, (int, np.integer)):
        raise TypeError(f"{owner}: max_episode_steps must be a positive int or None, got {_describe(max_episode_steps)}.")
    if max_episode_steps <= 0:
        raise ValueError(
            f"{owner}: max_episode_steps must be > 0 (the trusted imagination horizon), got {max_episode_steps}. "
            "Use None for no time limit."
        )
    return int(max_episode_steps)


_RESET_KEYS = ("state", "observation")
_STEP_KEYS = ("state", "observation", "reward", "terminated")


def _unpack(owner: str, adapter: str, out: Any, required: tuple[str, ...], example: str) -> None:
    """Raise a clear error unless ``out`` is a mapping holding every required key."""
    if type(out) is not dict and not isinstance(out, Mapping):
        raise AdapterError(
            f"{owner}: {adapter} must return a mapping like {example}, got {_describe(out)}."
        )
    missing = [k for k in required if k not in out]
    if missing:
        raise AdapterError(
            f"{owner}: {adapter} result is missing key(s) {missing}; it returned keys {sorted(out)}. "
            f"Expected a mapping like {example}."
        )


def _check_info(owner: str, adapter: str, info: Any) -> dict:
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise AdapterError(f"{owner}: {adapter} 'info' must be a dict, got {_describe(info)}.")
    return info


_RESET_EXAMPLE = "{'state': ..., 'observation': ..., 'info': {...} (optional)}"
_STEP_EXAMPLE = (
    "{'state': ..., 'observation': ..., 'reward': float, 'terminated': bool, "
    "'truncated': bool (optional), 'info': {...} (optional)}"
)


# ----------------------------------------------------------------------------------------------
# single env


class WorldModelEnv(gym.Env):
    """A Gymnasium env that steps a world model through three small adapter functions.

    Args:
        model: any object; it is passed as the first argument to every adapter.
        observation_space / action_space: Gymnasium spaces of what the policy sees and sends.
        reset_fn: ``reset_fn(model, seed=None, options=None) -> {"state", "observation", "info"?}``.
            The env always passes an int seed (the one given to ``reset`` or one drawn from
            ``env.np_random``), so a reset_fn that seeds from it makes episodes reproducible.
        transition_fn: ``transition_fn(model, state, action) -> {"state", "observation", "reward",
            "terminated", "truncated"?, "info"?}``.
        action_transform_fn: optional ``action_transform_fn(model, action)``: the policy's action to
            the model's encoding (e.g. an index to a one-hot or a continuous vector).
        max_episode_steps: the trusted imagination horizon; ``truncated`` becomes True when reached.
        seed: seed used by the first ``reset()`` that is not given one.
        render_fn / render_mode: optional ``render_fn(model, state) -> frame``.
    """

    metadata = {"render_modes": ["rgb_array", "human", "ansi"]}

    def __init__(
        self,
        model: Any,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        reset_fn: Callable[..., Mapping],
        transition_fn: Callable[..., Mapping],
        action_transform_fn: Callable[..., Any] | None = None,
        max_episode_steps: int | None = None,
        seed: int | None = None,
        render_fn: Callable[..., Any] | None = None,
        render_mode: str | None = None,
    ):
        owner = type(self).__name__
        _check_space(owner, "observation_space", observation_space)
        _check_space(owner, "action_space", action_space)
        _check_adapter(owner, "reset_fn", reset_fn, "reset_fn(model, seed=None, options=None)",
                       (model,), {"seed": 0, "options": None})
        _check_adapter(owner, "transition_fn", transition_fn, "transition_fn(model, state, action)",
                       (model, None, None), {})
        if action_transform_fn is not None:
            _check_adapter(owner, "action_transform_fn", action_transform_fn,
                           "action_transform_fn(model, action)", (model, None), {})
        if render_fn is not None:
            _check_adapter(owner, "render_fn", render_fn, "render_fn(model, state)", (model, None), {})
        if render_mode is not None and (render_fn is None or render_mode not in self.metadata["render_modes"]):
            raise ValueError(
                f"{owner}: render_mode={render_mode!r} needs a render_fn and one of "
                f"{self.metadata['render_modes']}; got render_fn={render_fn!r}."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"{owner}: seed must be an int or None, got {_describe(seed)}.")

        self.model = model
        self.observation_space = observation_space
        self.action_space = action_space
        self.reset_fn = reset_fn
        self.transition_fn = transition_fn
        self.action_transform_fn = action_transform_fn
        self.max_episode_steps = _check_max_steps(owner, max_episode_steps)
        self.render_fn = render_fn
        self.render_mode = render_mode
        self._init_seed = None if seed is None else int(seed)

        self._owner = owner
        self._box_obs = isinstance(observation_space, spaces.Box)
        self._obs_float = self._box_obs and np.issubdtype(observation_space.dtype, np.floating)
        self._discrete_action = isinstance(action_space, spaces.Discrete)
        self._state: Any = None
        self._has_state = False
        self._done = False
        self._elapsed = 0

    # -- public surface ---------------------------------------------------------------------

    @property
    def state(self) -> Any:
        """The current model state (as returned by the last reset_fn / transition_fn)."""
        return self._state

    @property
    def elapsed_steps(self) -> int:
        return self._elapsed

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        # The constructor seed only stands in for the first reset; an explicit seed replaces it for good.
        if seed is None:
            seed = self._init_seed
        self._init_seed = None
        super().reset(seed=seed)
        model_seed = seed if seed is not None else _draw_seed(self.np_random)
        out = self.reset_fn(self.model, seed=model_seed, options=options)
        _unpack(self._owner, "reset_fn", out, _RESET_KEYS, _RESET_EXAMPLE)
        obs = self._check_obs(out["observation"], "reset_fn")
        info = _check_info(self._owner, "reset_fn", out.get("info"))
        self._state = out["state"]
        self._has_state = True
        self._done = False
        self._elapsed = 0
        return obs, info

    def step(self, action):
        if not self._has_state:
            raise ResetNeeded(f"{self._owner}: call reset() before step().")
        if self._done:
            raise ResetNeeded(
                f"{self._owner}: the episode has ended (terminated or truncated); call reset() before step()."
            )
        action = self._check_action(action)
        model_action = action if self.action_transform_fn is None else self.action_transform_fn(self.model, action)
        out = self.transition_fn(self.model, self._state, model_action)
        _unpack(self._owner, "transition_fn", out, _STEP_KEYS, _STEP_EXAMPLE)
        obs = self._check_obs(out["observation"], "transition_fn")
        reward = self._check_reward(out["reward"])
        terminated = self._check_flag(out["terminated"], "terminated")
        truncated = self._check_flag(out["truncated"], "truncated") if "truncated" in out else False
        info = _check_info(self._owner, "transition_fn", out.get("info"))
        self._state = out["state"]
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

    # -- validation (kept lean: this runs every step) -----------------------------------------

    def _check_obs(self, obs: Any, adapter: str):
        space = self.observation_space
        if not self._box_obs:
            if _is_tensor(obs):
                obs = _to_numpy(obs)
            if not space.contains(obs):
                raise AdapterError(
                    f"{self._owner}: {adapter} returned observation {_describe(obs)} that is not in "
                    f"observation_space {space}."
                )
            return obs
        if type(obs) is not np.ndarray:
            obs = _to_numpy(obs)
        if obs.shape != space.shape:
            raise AdapterError(
                f"{self._owner}: {adapter} returned observation with shape {obs.shape}, expected {space.shape} "
                f"from observation_space {space}. Return an observation of that shape or fix observation_space."
            )
        if obs.dtype != space.dtype:
            # Casting within a kind (float64 -> float32, int -> float) is safe; float -> int would truncate.
            if not np.can_cast(obs.dtype, space.dtype, casting="same_kind"):
                raise AdapterError(
                    f"{self._owner}: {adapter} returned observation of dtype {obs.dtype}, which cannot be cast "
                    f"safely to observation_space dtype {space.dtype}. Return {space.dtype} values."
                )
            obs = obs.astype(space.dtype)
        # For small observations a Python-level check is ~5x cheaper than np.isfinite(...).all().
        if self._obs_float and not (all(map(math.isfinite, obs.ravel().tolist())) if obs.size <= 64
                                    else np.isfinite(obs).all()):
            raise AdapterError(
                f"{self._owner}: {adapter} returned a non-finite observation (NaN or Inf): {obs}. "
                "The world model diverged; clip its predictions or shorten max_episode_steps."
            )
        return obs

    def _check_reward(self, reward: Any) -> float:
        if type(reward) is not float:
            if isinstance(reward, (bool, np.bool_)) or not (
                isinstance(reward, (int, np.number)) or ((isinstance(reward, np.ndarray) or _is_tensor(reward))
                                                         and reward.ndim == 0 and not reward.dtype == bool)
            ):
                raise AdapterError(
                    f"{self._owner}: transition_fn 'reward' must be a scalar number, got {_describe(reward)}. "
                    "Return a Python float (e.g. float(r)); for a batch of envs use WorldModelVectorEnv."
                )
            reward = float(reward)
        if not math.isfinite(reward):
            raise AdapterError(f"{self._owner}: transition_fn returned a non-finite reward ({reward}).")
        return reward

    def _check_flag(self, flag: Any, key: str) -> bool:
        if type(flag) is bool:
            return flag
        if isinstance(flag, np.bool_) or (isinstance(flag, np.ndarray) and flag.shape == () and flag.dtype == bool):
            return bool(flag)
        if _is_tensor(flag) and flag.ndim == 0 and flag.dtype == _torch().bool:
            return bool(flag)
        if isinstance(flag, (int, np.integer)) and flag in (0, 1):
            return bool(flag)
        raise AdapterError(
            f"{self._owner}: transition_fn {key!r} must be a bool, got {_describe(flag)}. "
            f"Return bool(...) of a scalar condition (threshold probabilities or logits yourself)."
        )

    def _check_action(self, action):
        space = self.action_space
        if self._discrete_action:
            # Fast path for the common case; everything else goes through Space.contains.
            if type(action) in (int, np.int64) and space.start <= action < space.start + space.n:
                return action
        if _is_tensor(action):
            action = _to_numpy(action)
        if isinstance(space, spaces.Box):
            arr = np.asarray(action)
            if arr.shape == space.shape and np.can_cast(arr.dtype, space.dtype, casting="same_kind"):
                arr = arr.astype(space.dtype, copy=False)
                if space.contains(arr):
                    return arr
        elif space.contains(action):
            return action
        raise ValueError(
            f"{self._owner}.step: action {_describe(action)} is not in action_space {space}. "
            "Pass an action from env.action_space (e.g. env.action_space.sample()); "
            "clip continuous actions to the bounds."
        )


# ----------------------------------------------------------------------------------------------
# batched env


def _scatter(dst: Any, rows: np.ndarray, src: Any, where: str) -> Any:
    """Write ``src`` (k rows) into rows ``rows`` of ``dst`` (num_envs rows); dst may be a pytree."""
    if isinstance(dst, Mapping):
        return type(dst)({k: _scatter(dst[k], rows, src[k], f"{where}[{k!r}]") for k in dst})
    if isinstance(dst, (tuple, list)):
        return type(dst)(_scatter(d, rows, s, f"{where}[{i}]") for i, (d, s) in enumerate(zip(dst, src)))
    src_shape = tuple(getattr(src, "shape", ()))
    if src_shape != (len(rows), *tuple(dst.shape)[1:]):  # numpy would silently broadcast a wrong shape
        raise AdapterError(
            f"WorldModelVectorEnv: reset_fn returned {where} rows of shape {src_shape}, but transition_fn's {where} "
            f"has shape {tuple(dst.shape)}; cannot write the reset rows. Both adapters must return states with "
            "the same structure and trailing shape (one row per env)."
        )
    try:
        if _is_tensor(dst):
            torch = _torch()
            idx = torch.as_tensor(rows, device=dst.device)
            dst[idx] = torch.as_tensor(src, device=dst.device, dtype=dst.dtype)
        else:
            dst[rows] = _to_numpy(src)
    except Exception as err:  # shape or dtype mismatch between reset_fn and transition_fn states
        raise AdapterError(
            f"WorldModelVectorEnv: cannot write the reset rows returned by reset_fn into {where} returned by "
            f"transition_fn ({_describe(dst)} <- {_describe(src)}): {err}. Both adapters must return states with "
            "the same structure, dtype and trailing shape; the env overwrites finished rows in place."
        ) from None
    return dst


def _leading_dim(x: Any) -> int | None:
    if isinstance(x, Mapping):
        x = next(iter(x.values()), None)
    elif isinstance(x, (tuple, list)):
        x = x[0] if x else None
    shape = getattr(x, "shape", None)
    return shape[0] if shape else None


class WorldModelVectorEnv(gym.vector.VectorEnv):
    """A natively batched Gymnasium vector env: one adapter call steps all ``num_envs`` envs.

    The adapters take and return batches (leading ``num_envs`` axis):

    * ``reset_fn(model, seed=seeds, options=None)`` where ``seeds`` is an int64 array with one seed per
      row being reset (all rows on ``reset()``, only the finished rows on autoreset); returns
      ``{"state", "observation", "info"?}`` with ``len(seeds)`` rows.
    * ``transition_fn(model, state, action)`` returns ``{"state", "observation", "reward" (num_envs,),
      "terminated" (num_envs,), "truncated"? (num_envs,), "info"?: dict of batched arrays}``.
    * ``action_transform_fn(model, actions)`` (optional), batched.

    ``observation_space`` / ``action_space`` are the *single-env* spaces (like ``gym.make_vec``).
    Row ``i`` reset with ``reset(seed=s)`` receives seed ``s + i``, exactly as ``SyncVectorEnv`` seeds
    its sub-envs, so a batched model reproduces ``SyncVectorEnv`` of ``WorldModelEnv`` trajectories.

    ``output="numpy"`` returns NumPy arrays; ``output="torch"`` returns torch tensors on ``device``
    (default: the device of the adapters' tensors), with no host copy of observations, rewards or flags.
    The model state is never converted: it stays whatever the adapters return.
    Rewards are float32; the env may overwrite the finished rows of the arrays transition_fn returns.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self,
        model: Any,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        reset_fn: Callable[..., Mapping],
        transition_fn: Callable[..., Mapping],
        num_envs: int,
        action_transform_fn: Callable[..., Any] | None = None,
        max_episode_steps: int | None = None,
        seed: int | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        output: str = "numpy",
        device: Any = None,
    ):
        owner = self._owner = type(self).__name__
        _check_space(owner, "observation_space", observation_space)
        _check_space(owner, "action_space", action_space)
        if not isinstance(observation_space, spaces.Box):
            raise TypeError(
                f"{owner}: observation_space must be a Box (batched observations are arrays), got {observation_space}. "
                "Use WorldModelEnv with gymnasium.vector.SyncVectorEnv for other observation spaces."
            )
        if not isinstance(action_space, (spaces.Discrete, spaces.Box, spaces.MultiDiscrete, spaces.MultiBinary)):
            raise TypeError(
                f"{owner}: action_space must be Discrete, Box, MultiDiscrete or MultiBinary, got {action_space}."
            )
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"{owner}: num_envs must be an int >= 1, got {_describe(num_envs)}.")
        try:
            autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(
                f"{owner}: autoreset_mode must be AutoresetMode.NEXT_STEP or AutoresetMode.SAME_STEP, "
                f"got {autoreset_mode!r}."
            ) from None
        if autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"{owner}: autoreset_mode {autoreset_mode} is not supported; use NEXT_STEP or SAME_STEP.")
        if output not in ("numpy", "torch"):
            raise ValueError(f"{owner}: output must be 'numpy' or 'torch', got {output!r}.")
        _check_adapter(owner, "reset_fn", reset_fn, "reset_fn(model, seed=None, options=None)",
                       (model,), {"seed": np.zeros(1, dtype=np.int64), "options": None})
        _check_adapter(owner, "transition_fn", transition_fn, "transition_fn(model, state, action)",
                       (model, None, None), {})
        if action_transform_fn is not None:
            _check_adapter(owner, "action_transform_fn", action_transform_fn,
                           "action_transform_fn(model, action)", (model, None), {})
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"{owner}: seed must be an int or None, got {_describe(seed)}.")

        self.model = model
        self.num_envs = int(num_envs)
        self.single_observation_space = observation_space
        self.single_action_space = action_space
        self.observation_space = batch_space(observation_space, self.num_envs)
        self.action_space = batch_space(action_space, self.num_envs)
        self.reset_fn = reset_fn
        self.transition_fn = transition_fn
        self.action_transform_fn = action_transform_fn
        self.max_episode_steps = _check_max_steps(owner, max_episode_steps)
        self.autoreset_mode = autoreset_mode
        self.metadata = {**type(self).metadata, "autoreset_mode": autoreset_mode}
        self.output = output
        self.device = device
        self._init_seed = None if seed is None else int(seed)
        self._row_rngs: list[np.random.Generator] | None = None

        self._obs_shape = (self.num_envs, *observation_space.shape)
        self._obs_dtype = observation_space.dtype
        self._obs_float = np.issubdtype(self._obs_dtype, np.floating)
        self._state: Any = None
        self._steps: Any = None
        self._autoreset_rows = _NO_ROWS
        self._obs_torch_dtype = None

    # -- public surface ---------------------------------------------------------------------

    @property
    def state(self) -> Any:
        """The current batched model state (leading axis num_envs)."""
        return self._state

    @property
    def elapsed_steps(self) -> Any:
        """Per-env step counters of the current episodes."""
        return self._steps

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        if seed is None:
            seed = self._init_seed
        self._init_seed = None
        n = self.num_envs
        if seed is not None:
            if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
                seeds = [int(seed) + i for i in range(n)]
            elif isinstance(seed, (list, tuple, np.ndarray)) and len(seed) == n:
                seeds = [None if s is None else int(s) for s in seed]
            else:
                raise ValueError(f"{self._owner}.reset: seed must be an int, None or a list of {n} ints, got {_describe(seed)}.")
            first = next((s for s in seeds if s is not None), None)
            if first is not None:
                self._np_random, self._np_random_seed = seeding.np_random(first)
            old = self._row_rngs
            self._row_rngs = [
                (seeding.np_random(s)[0] if s is not None else (old[i] if old else np.random.default_rng()))
                for i, s in enumerate(seeds)
            ]
            row_seeds = np.array([s if s is not None else _draw_seed(self._row_rngs[i]) for i, s in enumerate(seeds)],
                                 dtype=np.int64)
        else:
            if self._row_rngs is None:
                self._row_rngs = [np.random.default_rng() for _ in range(n)]
            row_seeds = np.array([_draw_seed(r) for r in self._row_rngs], dtype=np.int64)

        state, obs, info = self._call_reset(row_seeds, options)
        if _leading_dim(state) != n:
            raise AdapterError(
                f"{self._owner}: reset_fn returned a state with leading dimension {_leading_dim(state)}, "
                f"expected {n} (one row per seed; got {n} seeds)."
            )
        self._state = state
        if self._torch_out:
            torch = _torch()
            self._steps = torch.zeros(n, dtype=torch.int64, device=self.device)
        else:
            self._steps = np.zeros(n, dtype=np.int64)
        self._autoreset_rows = _NO_ROWS
        return obs, info

    def step(self, actions):
        if self._state is None:
            raise ResetNeeded(f"{self._owner}: call reset() before step().")
        actions = self._check_actions(actions)
        model_actions = actions if self.action_transform_fn is None else self.action_transform_fn(self.model, actions)
        out = self.transition_fn(self.model, self._state, model_actions)
        _unpack(self._owner, "transition_fn", out, _STEP_KEYS, _STEP_EXAMPLE)
        n = self.num_envs
        state = out["state"]
        obs = self._as_obs(out["observation"], "transition_fn", n)
        reward = self._as_batch(out["reward"], "reward", self._float32)
        terminated = self._as_flags(out["terminated"], "terminated")
        truncated = self._as_flags(out["truncated"], "truncated") if "truncated" in out else self._zeros_bool()
        info = _check_info(self._owner, "transition_fn", out.get("info"))
        if info and not self._torch_out:  # numpy output means numpy everywhere, infos included
            info = {k: _to_numpy(v) if _is_tensor(v) else v for k, v in info.items()}
        if _leading_dim(state) != n:
            raise AdapterError(
                f"{self._owner}: transition_fn returned a state with leading dimension {_leading_dim(state)}, expected {n}."
            )

        self._steps += 1
        if self.max_episode_steps is not None:
            truncated |= self._steps >= self.max_episode_steps

        if self.autoreset_mode is AutoresetMode.NEXT_STEP:
            # Rows that finished last step start a new episode now; their transition is discarded.
            rows = self._autoreset_rows
            if len(rows):
                state, obs = self._reset_rows(rows, state, obs)
                rows_idx = self._index(rows)
                reward[rows_idx] = 0.0
                terminated[rows_idx] = False
                truncated[rows_idx] = False
                self._steps[rows_idx] = 0
            done = terminated | truncated
            any_done = self._check_finite(obs, reward, done)
            self._autoreset_rows = self._rows(done) if any_done else _NO_ROWS
        else:  # SAME_STEP: report the final observation, then reset the finished rows in place
            done = terminated | truncated
            if self._check_finite(obs, reward, done):
                rows = self._rows(done)
                info = dict(info)
                if self._torch_out:
                    info["final_obs"] = obs.clone()
                else:
                    final_obs = np.full(n, None, dtype=object)
                    final_obs[rows] = list(obs[rows].copy())
                    info["final_obs"] = final_obs
                info["_final_obs"] = done
                info["final_info"] = {k: v for k, v in info.items() if k not in ("final_obs", "_final_obs")}
                info["_final_info"] = done
                state, obs = self._reset_rows(rows, state, obs)  # reset observations are checked there
                self._steps[self._index(rows)] = 0
        self._state = state
        return obs, reward, terminated, truncated, info

    def close_extras(self, **kwargs):
        self._state = None

    # -- internals ------------------------------------------------------------------------------

    @property
    def _torch_out(self) -> bool:
        return self.output == "torch"

    def _call_reset(self, row_seeds: np.ndarray, options):
        out = self.reset_fn(self.model, seed=row_seeds, options=options)
        _unpack(self._owner, "reset_fn", out, _RESET_KEYS, _RESET_EXAMPLE)
        if self._torch_out and self.device is None:
            obs = out["observation"]
            self.device = obs.device if _is_tensor(obs) else "cpu"
        if self._torch_out and self._obs_torch_dtype is None:
            self._obs_torch_dtype = _torch().from_numpy(np.empty(0, dtype=self._obs_dtype)).dtype
        obs = self._as_obs(out["observation"], "reset_fn", len(row_seeds))
        self._check_finite(obs, None, adapter="reset_fn")
        info = _check_info(self._owner, "reset_fn", out.get("info"))
        return out["state"], obs, info

    def _reset_rows(self, rows: np.ndarray, state, obs):
        row_seeds = np.array([_draw_seed(self._row_rngs[i]) for i in rows], dtype=np.int64)
        r_state, r_obs, _ = self._call_reset(row_seeds, None)
        if _leading_dim(r_state) != len(rows):
            raise AdapterError(
                f"{self._owner}: reset_fn returned a state with leading dimension {_leading_dim(r_state)} for "
                f"{len(rows)} seeds; return one row per seed."
            )
        state = _scatter(state, rows, r_state, "state")
        obs[self._index(rows)] = r_obs
        return state, obs

    def _rows(self, mask) -> np.ndarray:
        """Indices of True rows as a host array (one device sync in torch mode)."""
        if self._torch_out:
            return mask.nonzero().squeeze(1).cpu().numpy()
        return np.flatnonzero(mask)

    def _index(self, rows: np.ndarray):
        if self._torch_out:
            return _torch().as_tensor(rows, device=self.device)
        return rows

    @property
    def _float32(self):
        return _torch().float32 if self._torch_out else np.float32

    def _zeros_bool(self):
        if self._torch_out:
            torch = _torch()
            return torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return np.zeros(self.num_envs, dtype=bool)

    def _convert(self, x):
        """To the output kind (numpy array, or torch tensor on self.device)."""
        if self._torch_out:
            torch = _torch()
            return x.to(self.device) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), device=self.device)
        return x if type(x) is np.ndarray else _to_numpy(x)

    def _as_obs(self, obs, adapter: str, rows: int):
        obs = self._convert(obs)
        expected = (rows, *self.single_observation_space.shape)
        if tuple(obs.shape) != expected:
            raise AdapterError(
                f"{self._owner}: {adapter} returned observations with shape {tuple(obs.shape)}, expected {expected} "
                f"(rows, *observation_space.shape) for observation_space {self.single_observation_space}."
            )
        # The returned observations are always a fresh copy the caller owns: adapters often return the state
        # itself as the observation, and a caller writing into obs (TorchRL does) must not rewrite the model state.
        if self._torch_out:
            want = self._obs_torch_dtype
            if obs.dtype != want and obs.dtype.is_floating_point and not want.is_floating_point:
                raise AdapterError(
                    f"{self._owner}: {adapter} returned {obs.dtype} observations; observation_space dtype is "
                    f"{self._obs_dtype} and float -> int would truncate."
                )
            return obs.to(want, copy=True)
        if obs.dtype != self._obs_dtype and not np.can_cast(obs.dtype, self._obs_dtype, casting="same_kind"):
            raise AdapterError(
                f"{self._owner}: {adapter} returned {obs.dtype} observations that cannot be cast safely to "
                f"observation_space dtype {self._obs_dtype}."
            )
        return obs.astype(self._obs_dtype)  # astype copies

    def _as_batch(self, x, key: str, dtype):
        x = self._convert(x)
        if tuple(x.shape) != (self.num_envs,):
            raise AdapterError(
                f"{self._owner}: transition_fn {key!r} must have shape ({self.num_envs},), one value per env, "
                f"got {_describe(x)}."
            )
        if self._torch_out:
            if x.dtype == _torch().bool:
                raise AdapterError(f"{self._owner}: transition_fn {key!r} must be numeric, got {_describe(x)}.")
            return x.to(dtype, copy=True)  # a copy: the env writes reset rows into it
        if x.dtype.kind not in "iuf":
            raise AdapterError(f"{self._owner}: transition_fn {key!r} must be numeric, got {_describe(x)}.")
        return x.astype(dtype)  # a copy: the env writes reset rows into it

    def _as_flags(self, x, key: str):
        x = self._convert(x)
        if tuple(x.shape) != (self.num_envs,):
            raise AdapterError(
                f"{self._owner}: transition_fn {key!r} must have shape ({self.num_envs},), one bool per env, "
                f"got {_describe(x)}."
            )
        if self._torch_out:
            torch = _torch()
            if x.dtype == torch.bool:
                return x.clone()
            ok = not x.is_floating_point() and bool(((x == 0) | (x == 1)).all())
        else:
            if x.dtype == bool:
                return x.copy()
            ok = x.dtype.kind in "iu" and bool(((x == 0) | (x == 1)).all())
        if not ok:
            raise AdapterError(
                f"{self._owner}: transition_fn {key!r} must be booleans (or 0/1 integers), got {_describe(x)}. "
                "Threshold probabilities or logits inside transition_fn (e.g. logits > 0)."
            )
        return x != 0

    def _check_finite(self, obs, reward, done=None, adapter: str = "transition_fn") -> bool:
        """Raise on NaN/Inf; return whether any row of ``done`` is set (one device sync in torch mode)."""
        if self._torch_out:
            torch = _torch()
            checks = [torch.isfinite(obs).all() if self._obs_float else torch.ones((), dtype=torch.bool, device=obs.device)]
            if reward is not None:
                checks.append(torch.isfinite(reward).all())
            if done is not None:
                checks.append(done.any())
            values = torch.stack(checks).tolist()
            ok, any_done = all(values[: len(values) - (done is not None)]), done is not None and values[-1]
        else:
            ok = (not self._obs_float or np.isfinite(obs).all()) and (reward is None or np.isfinite(reward).all())
            any_done = done is not None and bool(done.any())
        if not ok:
            what = "observations" if reward is None else "observations or rewards"
            raise AdapterError(
                f"{self._owner}: {adapter} returned non-finite {what} (NaN or Inf). "
                "The world model diverged; clip its predictions or shorten max_episode_steps."
            )
        return any_done

    def _check_actions(self, actions):
        space = self.single_action_space
        n = self.num_envs
        if self._torch_out:
            torch = _torch()
            if isinstance(actions, torch.Tensor):
                actions = actions.to(self.device)  # no-op when already there
            else:
                actions = torch.as_tensor(np.asarray(actions), device=self.device)
            is_int = not actions.is_floating_point() and actions.dtype != torch.bool
        else:
            if type(actions) is not np.ndarray:
                actions = _to_numpy(actions)
            is_int = actions.dtype.kind in "iu"
        expected = self.action_space.shape
        if tuple(actions.shape) != tuple(expected):
            raise ValueError(
                f"{self._owner}.step: actions have shape {tuple(actions.shape)}, expected {tuple(expected)} "
                f"(num_envs={n}, single action_space {space}). Pass one action per env."
            )
        if isinstance(space, spaces.Discrete):
            ok = is_int and bool(((actions >= space.start) & (actions < space.start + space.n)).all())
        elif isinstance(space, spaces.Box):
            if self._torch_out:
                torch = _torch()
                low = torch.as_tensor(space.low, device=actions.device)
                high = torch.as_tensor(space.high, device=actions.device)
                actions = actions.to(low.dtype)
            else:
                if not np.can_cast(actions.dtype, space.dtype, casting="same_kind"):
                    raise ValueError(f"{self._owner}.step: actions of dtype {actions.dtype} do not fit {space}.")
                actions = actions.astype(space.dtype, copy=False)
                low, high = space.low, space.high
            ok = bool(((actions >= low) & (actions <= high)).all())
        else:  # MultiDiscrete / MultiBinary: rare here, use the space's own check on the host
            ok = self.action_space.contains(_to_numpy(actions).astype(self.action_space.dtype))
        if not ok:
            raise ValueError(
                f"{self._owner}.step: some actions are outside action_space {space} (got {_describe(actions)}). "
                "Pass actions from env.action_space; clip continuous actions to the bounds."
            )
        return actions
