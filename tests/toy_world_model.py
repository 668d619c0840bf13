"""The TorchWM tutorial's toy world model (tests/seed_toy.py, its own unbatched adapters) behind the world-model
interface, and a real env with the same dynamics to judge the policy in: the path a user's model takes,
`--world-model tests/toy_world_model.py:ToyWorldModel --env-id ToyReach-v0`. It offers only a single env, so the
scripts step it in gymnasium's SyncVectorEnv / AsyncVectorEnv of their `make_env` thunks."""
import os
import sys

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import seed_toy  # noqa: E402
import world_model  # noqa: E402


class ToyReach(gym.Env):
    """The real world the toy model imitates: move a point (3 actions of 0.1) towards the origin."""

    def __init__(self):
        self.observation_space, self.action_space = seed_toy.obs_space, seed_toy.action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = seed_toy.model.sample_initial_state(seed=int(self.np_random.integers(2**31 - 1)))
        return self.state.copy(), {}

    def step(self, action):
        out = seed_toy.transition_world_model(seed_toy.model, self.state, seed_toy.action_transform(None, action))
        self.state = out["state"]
        return out["observation"].copy(), out["reward"], out["terminated"], False, {}


if "ToyReach-v0" not in gym.registry:
    gym.register("ToyReach-v0", entry_point=ToyReach, max_episode_steps=25)


class ToyWorldModel(world_model.WorldModel):
    """A given model (nothing to learn) with only a single env: the tutorial's adapters as they are."""

    learns = False

    def __init__(self, env_id="ToyReach-v0", seed=0, device="cpu"):
        self.observation_space, self.action_space = seed_toy.obs_space, seed_toy.action_space
        self.max_episode_steps = 25

    def imagined_env(self, *, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99):
        return seed_toy.make_env(0 if seed is None else seed, horizon or self.max_episode_steps)()


class Incomplete:
    """Lacks most of the interface: a script must say what is missing in one line."""

    def __init__(self, env_id, seed=0, device="cpu"):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)


NOT_CALLABLE = 42
