"""Partially observed and pixel versions of classic-control tasks, registered with Gymnasium when this module is
imported (real_env.py imports it, so `--env-id` takes these ids in every script; user code: `import envs`).

- `CartPoleNoVel-v1`: CartPole-v1 keeping x and theta (the velocities dropped): RL Zoo's POMDP, the state is not
  in the observation, a policy or a model needs memory.
- `PendulumNoVel-v1`: Pendulum-v1 keeping cos(theta), sin(theta) (the angular velocity dropped): RL Zoo's POMDP for
  continuous control.
- `PendulumPixels-v1`: 64 x 64 RGB frames (uint8) from Pendulum-v1's own `render()`, a pixel task as PlaNet and
  Dreamer see one (one frame holds no velocity either); `PendulumPixels32-v1`: the same frames drawn at 32 x 32,
  what a CPU trains on (a pixel RSSM update costs ~3x less than at 64 x 64).

The names, time limits and reward thresholds are the ones RL Zoo and Gymnasium use for the full-state tasks. The
pixel frames are drawn by `PendulumEnv.render()` itself, on a 64 x 64 canvas instead of 500 x 500 (the same
picture, drawn small: no resize, about 4 ms a frame on one CPU core instead of ~15 ms for the large frame and a
resize). `gym.make("PendulumPixels-v1", size=s)` draws s x s frames (PendulumPixels32-v1 is s = 32).
"""
import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control import CartPoleEnv, PendulumEnv


class _KeepObservation:
    """A classic-control env observed through the entries `KEEP` of its observation (before its base class in the
    bases, so that its reset and step come first)."""

    KEEP: np.ndarray

    def _keep_observation_space(self):
        box = self.observation_space
        self.observation_space = gym.spaces.Box(box.low[self.KEEP], box.high[self.KEEP], dtype=box.dtype)

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return obs[self.KEEP], info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs[self.KEEP], reward, terminated, truncated, info


class CartPoleNoVelEnv(_KeepObservation, CartPoleEnv):
    """CartPole-v1 whose observation keeps the cart position x and the pole angle theta only."""

    KEEP = np.array([0, 2])

    def __init__(self, render_mode=None):
        super().__init__(render_mode=render_mode)
        self._keep_observation_space()


class PendulumNoVelEnv(_KeepObservation, PendulumEnv):
    """Pendulum-v1 whose observation keeps cos(theta) and sin(theta) only."""

    KEEP = np.array([0, 1])

    def __init__(self, render_mode=None, g=10.0):
        super().__init__(render_mode=render_mode, g=g)
        self._keep_observation_space()


class PendulumPixelsEnv(PendulumEnv):
    """Pendulum-v1 observed through its own `render()`: (size, size, 3) uint8 frames (the rod, the axle and the
    arrow of the last torque). The state stays hidden; rewards, dynamics and the time limit are Pendulum-v1's.
    render_mode is always "rgb_array" (the observation IS the rendered frame)."""

    metadata = {**PendulumEnv.metadata, "render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None, size=64, g=10.0):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"PendulumPixels: render_mode must be None or 'rgb_array', got {render_mode!r}")
        if not (isinstance(size, int) and size >= 16):
            raise ValueError(f"PendulumPixels: size must be an int >= 16, got {size!r}")
        super().__init__(render_mode="rgb_array", g=g)
        self.screen_dim = size  # render() draws on a size x size canvas
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), dtype=np.uint8)

    def _frame(self):
        return np.ascontiguousarray(super().render(), dtype=np.uint8)

    def render(self):
        return self._frame()

    def reset(self, *, seed=None, options=None):
        _, info = super().reset(seed=seed, options=options)
        return self._frame(), info

    def step(self, action):
        _, reward, terminated, truncated, info = super().step(action)
        return self._frame(), reward, terminated, truncated, info


REGISTRATIONS = {
    "CartPoleNoVel-v1": dict(entry_point="envs:CartPoleNoVelEnv", max_episode_steps=500, reward_threshold=475.0),
    "PendulumNoVel-v1": dict(entry_point="envs:PendulumNoVelEnv", max_episode_steps=200),
    "PendulumPixels-v1": dict(entry_point="envs:PendulumPixelsEnv", max_episode_steps=200),
    "PendulumPixels32-v1": dict(entry_point="envs:PendulumPixelsEnv", max_episode_steps=200, kwargs={"size": 32}),
}
for _env_id, _kwargs in REGISTRATIONS.items():
    if _env_id not in gym.registry:  # imported under another name (tests, spawned workers): register once
        gym.register(id=_env_id, **_kwargs)
