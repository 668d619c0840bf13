"""The seed tutorial's toy world model and adapters, verbatim but for the import line, plus batched twins.

Shared by the tests and benchmark.py so both exercise exactly what our users start from.
"""

import gymnasium as gym
import numpy as np

from world_model_env import WorldModelEnv


class TinyWorldModel:
    num_actions = 3

    def sample_initial_state(self, seed=None):
        rng = np.random.default_rng(seed)
        return rng.normal(size=(2,)).astype(np.float32)

    def predict_next_state(self, state, action):
        return (state + action[:2]).astype(np.float32)

    def decode_observation(self, state):
        return state.astype(np.float32)

    def predict_reward(self, state, action):
        return -float(np.linalg.norm(state))

    def predict_terminal(self, state):
        return bool(np.linalg.norm(state) < 0.05)


model = TinyWorldModel()
obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
action_space = gym.spaces.Discrete(model.num_actions)


def reset_world_model(model, seed=None, options=None):
    state = model.sample_initial_state(seed=seed)
    return {"state": state, "observation": model.decode_observation(state)}


def action_transform(model, action):
    actions = np.array([[0.1, 0.0], [-0.1, 0.0], [0.0, -0.1]], dtype=np.float32)
    return actions[int(action)]


def transition_world_model(model, state, action):
    next_state = model.predict_next_state(state, action)
    return {
        "state": next_state,
        "observation": model.decode_observation(next_state),
        "reward": model.predict_reward(next_state, action),
        "terminated": model.predict_terminal(next_state),
    }


def make_env(seed: int, max_episode_steps: int = 25):
    def thunk():
        return WorldModelEnv(
            model,
            observation_space=obs_space,
            action_space=action_space,
            reset_fn=reset_world_model,
            transition_fn=transition_world_model,
            action_transform_fn=action_transform,
            max_episode_steps=max_episode_steps,
            seed=seed,
        )

    return thunk


# Batched twins: the same maths on a leading num_envs axis (the README shows this conversion).
_ACTIONS = np.array([[0.1, 0.0], [-0.1, 0.0], [0.0, -0.1]], dtype=np.float32)


def batched_reset(model, seed=None, options=None):
    # one generator per row, seeded like the single env, so trajectories match SyncVectorEnv exactly
    state = np.stack([model.sample_initial_state(seed=int(s)) for s in seed])
    return {"state": state, "observation": state.copy()}


def batched_action_transform(model, actions):
    return _ACTIONS[actions]


def batched_transition(model, state, action):
    next_state = (state + action).astype(np.float32)
    norm = np.linalg.norm(next_state, axis=1)
    return {"state": next_state, "observation": next_state.copy(), "reward": -norm, "terminated": norm < 0.05}
