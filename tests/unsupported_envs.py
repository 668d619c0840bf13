"""Envs whose spaces the scripts do not support, registered once for the bad-input tests of every script."""
import gymnasium as gym
import numpy as np


class DictObsEnv(gym.Env):
    observation_space = gym.spaces.Dict({"x": gym.spaces.Box(-1, 1, (2,), np.float32)})
    action_space = gym.spaces.Discrete(2)


class MultiDiscreteEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.MultiDiscrete([2, 3])


DICT_OBS_ID, MULTI_DISCRETE_ID = "TestDictObs-v0", "TestMultiDiscrete-v0"
if DICT_OBS_ID not in gym.registry:
    gym.register(DICT_OBS_ID, entry_point=DictObsEnv)
    gym.register(MULTI_DISCRETE_ID, entry_point=MultiDiscreteEnv)
