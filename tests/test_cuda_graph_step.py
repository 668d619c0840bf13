"""WorldModelVectorEnv.use_cuda_graph (cuda_graph_step.py): the graph-mode step gives the eager env's trajectories,
raises bad actions and non-finite values one step late, and refuses what it cannot hold. On a CPU the bookkeeping
runs with eager=True (the same buffers, no graph); the capture itself is tested where a GPU is present."""
import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode

from benchmark import scale_net
from ensemble_imagination import make_imagined_vector_env
from world_model_env import AdapterError, WorldModelVectorEnv

CUDA = torch.cuda.is_available()


def ensemble_pair(name, n, device="cpu", eager=True, horizon=20):
    """The same imagined env twice, plain and in graph mode, with learned endings on (rows reset every few steps)."""
    net = scale_net(name, device, 0)
    with torch.no_grad():
        net.term_net[-1].bias.fill_(0.0)
    plain = make_imagined_vector_env(net, n, seed=3, horizon=horizon, output="torch")
    graph = make_imagined_vector_env(net, n, seed=3, horizon=horizon, output="torch").use_cuda_graph(eager=eager)
    return plain, graph


def random_actions(name, n, steps, device):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        a = torch.randint(0, 2, (n,), generator=g) if name == "cartpole" else 2 * torch.rand(n, 6, generator=g) - 1
        yield a.to(device)


def assert_same_trajectories(plain, graph, name, n, device, steps=60):
    o1, _ = plain.reset(seed=3)
    o2, _ = graph.reset(seed=3)
    assert torch.equal(o1, o2)
    finished = 0
    for a in random_actions(name, n, steps, device):
        r1, r2 = plain.step(a), graph.step(a)
        for x, y in zip(r1[:4], r2[:4]):
            assert torch.equal(x, y)
        assert r1[4].keys() == r2[4].keys() and all(torch.equal(r1[4][k], r2[4][k]) for k in r1[4])
        assert torch.equal(plain.elapsed_steps, graph.elapsed_steps)
        finished += int((r1[2] | r1[3]).sum())
    assert finished > n  # autoresets ran, many rows more than once


@pytest.mark.parametrize("name", ["cartpole", "halfcheetah"])
def test_graph_mode_gives_the_eager_envs_trajectories(name):
    plain, graph = ensemble_pair(name, 32)
    assert_same_trajectories(plain, graph, name, 32, "cpu")
    # a second reset reuses the buffers and starts over identically
    assert_same_trajectories(plain, graph, name, 32, "cpu", steps=10)


def test_outputs_are_fresh_copies():
    _, graph = ensemble_pair("cartpole", 8)
    graph.reset(seed=0)
    obs1 = graph.step(torch.zeros(8, dtype=torch.int64))[0]
    keep = obs1.clone()
    graph.step(torch.ones(8, dtype=torch.int64))
    assert torch.equal(obs1, keep)


def test_bad_action_is_raised_one_step_late_and_needs_a_reset():
    _, graph = ensemble_pair("cartpole", 8)
    graph.reset(seed=0)
    graph.step(torch.zeros(8, dtype=torch.int64))
    graph.step(torch.full((8,), 5, dtype=torch.int64))  # out of range: clamped for the model, flagged
    with pytest.raises(ValueError, match=r"actions of step 2 after the last reset were outside action_space"):
        graph.step(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ResetNeeded):
        graph.step(torch.zeros(8, dtype=torch.int64))
    graph.reset(seed=0)
    graph.step(torch.zeros(8, dtype=torch.int64))
    graph.step(torch.zeros(8, dtype=torch.int64))


def test_box_action_out_of_bounds_is_raised_one_step_late():
    _, graph = ensemble_pair("halfcheetah", 4)
    graph.reset(seed=0)
    graph.step(torch.full((4, 6), 2.0))
    with pytest.raises(ValueError, match="step 1 after the last reset"):
        graph.step(torch.zeros(4, 6))


def nan_env(at, n=4, device="cpu"):
    """A tiny torch model (the model object is the step at which observations become NaN)."""
    space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)

    def reset_fn(model, seed=None, options=None):
        obs = torch.zeros(len(seed), 2, device=device)
        return {"state": {"obs": obs, "t": torch.zeros(len(seed), dtype=torch.int64, device=device)},
                "observation": obs}

    def transition_fn(model, state, action):
        t = state["t"] + 1
        obs = torch.where((t == model)[:, None], torch.nan, state["obs"] + 1.0)
        return {"state": {"obs": obs, "t": t}, "observation": obs, "reward": torch.ones(len(t), device=device),
                "terminated": torch.zeros(len(t), dtype=torch.bool, device=device)}

    return WorldModelVectorEnv(at, space, gym.spaces.Discrete(2), reset_fn, transition_fn, num_envs=n,
                               output="torch", max_episode_steps=50, device=device)


def test_non_finite_observation_is_raised_one_step_late():
    env = nan_env(at=3).use_cuda_graph(eager=True)
    env.reset(seed=0)
    for _ in range(3):
        env.step(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(AdapterError, match=r"non-finite observation or reward \(NaN or Inf\) in step 3"):
        env.step(torch.zeros(4, dtype=torch.int64))


def test_dtype_of_actions_is_fixed_by_the_first_step():
    _, graph = ensemble_pair("cartpole", 4)
    graph.reset(seed=0)
    graph.step(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="captured for torch.int64"):
        graph.step(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"actions have shape \(3,\), expected \(4,\)"):
        graph.step(torch.zeros(3, dtype=torch.int64))


def test_refusals_name_what_is_needed():
    net = scale_net("cartpole", "cpu", 0)
    with pytest.raises(ValueError, match="needs output='torch'"):
        make_imagined_vector_env(net, 4, output="numpy").use_cuda_graph(eager=True)
    with pytest.raises(ValueError, match="needs autoreset_mode=NEXT_STEP"):
        make_imagined_vector_env(net, 4, output="torch",
                                 autoreset_mode=AutoresetMode.SAME_STEP).use_cuda_graph(eager=True)
    with pytest.raises(ValueError, match="CUDA graphs need the env on a CUDA device, got device 'cpu'"):
        make_imagined_vector_env(net, 4, output="torch").use_cuda_graph()
    env = make_imagined_vector_env(net, 4, output="torch")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="call it before reset"):
        env.use_cuda_graph(eager=True)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["cartpole", "halfcheetah"])
def test_captured_graph_gives_the_eager_envs_trajectories(name):
    plain, graph = ensemble_pair(name, 256, device="cuda", eager=False)
    assert_same_trajectories(plain, graph, name, 256, "cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_capture_failure_names_the_cause():
    env = nan_env(at=100, device="cuda")
    transition = env.transition_fn

    def reads_the_host(model, state, action):
        float(state["obs"].sum())  # a host read: no graph can hold it
        return transition(model, state, action)

    env.transition_fn = reads_the_host
    env.use_cuda_graph()
    env.reset(seed=0)
    with pytest.raises(AdapterError, match="capturing the step in a CUDA graph failed"):
        env.step(torch.zeros(4, dtype=torch.int64, device="cuda"))


def test_box_actions_of_another_float_dtype_are_cast_as_the_eager_env_does():
    plain, graph = ensemble_pair("halfcheetah", 4)
    plain.reset(seed=0)
    graph.reset(seed=0)
    for dtype in (torch.float64, torch.float32, torch.float64):
        a = torch.full((4, 6), 0.5, dtype=dtype)
        assert torch.equal(plain.step(a)[0], graph.step(a)[0])
