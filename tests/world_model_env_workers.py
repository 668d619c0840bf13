"""A torch toy model built inside each thunk, for the AsyncVectorEnv (spawn) test."""

import gymnasium as gym
import numpy as np
import torch

from world_model_env import WorldModelEnv


class TorchToyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.net.weight.copy_(torch.tensor([[1.0, 0.0, 0.1], [0.0, 1.0, -0.1]]))
            self.net.bias.zero_()


def reset_fn(model, seed=None, options=None):
    state = torch.as_tensor(np.random.default_rng(seed).normal(size=2), dtype=torch.float32)
    return {"state": state, "observation": state}


def transition_fn(model, state, action):
    with torch.no_grad():
        nxt = model.net(torch.cat([state, torch.tensor([float(action) - 1.0])]))
    return {"state": nxt, "observation": nxt, "reward": -float(nxt.norm()), "terminated": bool(nxt.norm() < 0.05)}


class ThreadReportingEnv(WorldModelEnv):
    def torch_threads(self):
        return torch.get_num_threads()


def make_torch_env(seed):
    def thunk():
        torch.set_num_threads(1)  # one thread per worker: N workers on N cores, no oversubscription
        model = TorchToyModel()  # each worker builds its own copy: nothing mutable is shared
        space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        return ThreadReportingEnv(model, space, gym.spaces.Discrete(3), reset_fn, transition_fn,
                                  max_episode_steps=20, seed=seed)

    return thunk
