"""CartPole-v1's true equations of motion behind the world-model interface: a world model with nothing to learn.

    python ppo_imagined.py --world-model examples/cartpole_physics.py:CartPolePhysics

trains PPO only in this model (no real transition is used for learning: `learns = False`) and judges the policy in
the real CartPole-v1. The same shape fits any simulator written in NumPy or torch: spaces, a batched reset and step
as the adapters of `world_model_env.py`, and `real_env` as the identity (the observation is the full state).
The constants and the Euler step are the ones Gymnasium's CartPoleEnv documents.
"""
import os
import sys

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_io  # noqa: E402
import world_model  # noqa: E402
from world_model_env import WorldModelEnv, WorldModelVectorEnv  # noqa: E402

GRAVITY, MASS_CART, MASS_POLE, HALF_LENGTH, FORCE, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
TOTAL_MASS, POLE_MASS_LENGTH = MASS_CART + MASS_POLE, MASS_POLE * HALF_LENGTH
THETA_LIMIT, X_LIMIT = 12 * 2 * np.pi / 360, 2.4


def batched_reset(model, seed=None, options=None):
    """One start state per seed, uniform in [-0.05, 0.05]^4 as CartPoleEnv.reset draws it."""
    state = np.stack([np.random.default_rng(int(s)).uniform(-0.05, 0.05, 4) for s in seed]).astype(np.float32)
    return {"state": state, "observation": state.copy()}


def batched_transition(model, state, action):
    """CartPoleEnv.step on a batch: Euler integration, reward 1 per step, the episode ends past 12 degrees or 2.4."""
    x, x_dot, theta, theta_dot = state.T.astype(np.float64)
    force = np.where(np.asarray(action) == 1, FORCE, -FORCE)
    cos, sin = np.cos(theta), np.sin(theta)
    temp = (force + POLE_MASS_LENGTH * theta_dot**2 * sin) / TOTAL_MASS
    theta_acc = (GRAVITY * sin - cos * temp) / (HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos**2 / TOTAL_MASS))
    x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos / TOTAL_MASS
    x, x_dot = x + TAU * x_dot, x_dot + TAU * x_acc
    theta, theta_dot = theta + TAU * theta_dot, theta_dot + TAU * theta_acc
    next_state = np.stack([x, x_dot, theta, theta_dot], axis=1).astype(np.float32)
    terminated = (np.abs(x) > X_LIMIT) | (np.abs(theta) > THETA_LIMIT)
    return {"state": next_state, "observation": next_state.copy(), "reward": np.ones(len(state), np.float32),
            "terminated": terminated}


def single_reset(model, seed=None, options=None):
    out = batched_reset(model, np.array([seed]))
    return {"state": out["state"][0], "observation": out["observation"][0]}


def single_transition(model, state, action):
    out = batched_transition(model, state[None], np.array([action]))
    return {"state": out["state"][0], "observation": out["observation"][0], "reward": float(out["reward"][0]),
            "terminated": bool(out["terminated"][0])}


class CartPolePhysics(world_model.WorldModel):
    """The world-model interface over the true CartPole-v1 equations. Imagined episodes start where the real ones
    do (`start` and `halt` have nothing to choose from here: every state is known exactly)."""

    learns = False

    def __init__(self, env_id="CartPole-v1", seed=0, device="cpu"):
        if env_id != "CartPole-v1":
            raise ValueError(f"CartPolePhysics models CartPole-v1 only, got env_id={env_id!r}")
        env = gym.make(env_id)
        self.observation_space, self.action_space = env.observation_space, env.action_space
        self.max_episode_steps = env.spec.max_episode_steps
        env.close()

    def imagined_env(self, *, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99):
        return WorldModelEnv(self, self.observation_space, self.action_space, reset_fn=single_reset,
                             transition_fn=single_transition, max_episode_steps=horizon or self.max_episode_steps,
                             seed=seed)

    def imagined_vector_env(self, num_envs, *, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99,
                            output="numpy", autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP):
        return WorldModelVectorEnv(self, self.observation_space, self.action_space, reset_fn=batched_reset,
                                   transition_fn=batched_transition, num_envs=num_envs,
                                   max_episode_steps=horizon or self.max_episode_steps, seed=seed,
                                   autoreset_mode=autoreset_mode, output=output)

    def save(self, path, extra=None):
        """Nothing was learned: the checkpoint only names the model, so an agent's run can be traced back to it."""
        run_io.write_json_atomic(path, {"format": "cartpole-physics", "extra": extra or {}})
        return path

    def load(self, path):
        return self
