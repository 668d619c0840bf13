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


def small_env(transition_fn, reset_fn=None, n=4, device="cpu", max_episode_steps=50, graph=True):
    """A tiny torch model given as adapters (2-dim observations, Discrete(2)), in graph mode (eager) or plain."""
    space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)

    def zeros_reset(model, seed=None, options=None):
        obs = torch.zeros(len(seed), 2, device=device)
        return {"state": {"obs": obs, "t": torch.zeros(len(seed), dtype=torch.int64, device=device)},
                "observation": obs}

    env = WorldModelVectorEnv(None, space, gym.spaces.Discrete(2), reset_fn or zeros_reset, transition_fn,
                              num_envs=n, output="torch", max_episode_steps=max_episode_steps, device=device)
    return env.use_cuda_graph(eager=device == "cpu") if graph else env


def counting_step(model, state, action):
    t = state["t"] + 1
    obs = state["obs"] + action[:, None].float()
    return {"state": {"t": t, "obs": obs}, "observation": obs, "reward": torch.ones(len(t)),  # keys in another order
            "terminated": t % 3 == 0, "truncated": t % 5 == 0, "info": {"t": {"again": t * 10}}}


def test_adapters_own_truncations_nested_info_and_key_order_as_the_eager_env():
    plain, graph = small_env(counting_step, graph=False), small_env(counting_step)
    for env in (plain, graph):
        env.reset(seed=0)
    a = torch.tensor([0, 1, 1, 0])
    for _ in range(12):
        r1, r2 = plain.step(a), graph.step(a)
        for x, y in zip(r1[:4], r2[:4]):
            assert torch.equal(x, y)
        assert torch.equal(r1[4]["t"]["again"], r2[4]["t"]["again"])


def test_a_state_that_keeps_the_previous_observation():
    """A new state leaf that is the old state's buffer is copied before that buffer is overwritten."""
    def reset_fn(model, seed=None, options=None):
        obs = torch.zeros(len(seed), 2)
        return {"state": {"obs": obs, "prev": obs.clone()}, "observation": obs}

    def step(model, state, action):
        obs = state["obs"] + 1
        return {"state": {"obs": obs, "prev": state["obs"]}, "observation": state["prev"] * 10 + obs,
                "reward": torch.ones(len(obs)), "terminated": torch.zeros(len(obs), dtype=torch.bool)}

    plain, graph = small_env(step, reset_fn, graph=False), small_env(step, reset_fn)
    for env in (plain, graph):
        env.reset(seed=0)
    for _ in range(3):
        a = torch.zeros(4, dtype=torch.int64)
        assert torch.equal(plain.step(a)[0], graph.step(a)[0])


def test_the_callers_reset_states_are_not_written():
    given = torch.zeros(4, 2)

    def reset_fn(model, seed=None, options=None):
        obs = options["states"] if options else torch.zeros(len(seed), 2)
        return {"state": {"obs": obs, "t": torch.zeros(len(seed), dtype=torch.int64)}, "observation": obs}

    env = small_env(counting_step, reset_fn)
    env.reset(seed=0, options={"states": given})
    for _ in range(3):
        env.step(torch.ones(4, dtype=torch.int64))
    assert not given.any()


def test_a_failing_autoreset_needs_a_reset():
    def reset_fn(model, seed=None, options=None):
        if len(seed) < 4:
            raise RuntimeError("no start states left")
        obs = torch.zeros(len(seed), 2)
        return {"state": {"obs": obs, "t": torch.zeros(len(seed), dtype=torch.int64)}, "observation": obs}

    def row_0_ends_at_3(model, state, action):
        return {**counting_step(model, state, action), "terminated": state["t"] + 1 == torch.tensor([3, 9, 9, 9]),
                "truncated": torch.zeros(4, dtype=torch.bool)}

    a = torch.zeros(4, dtype=torch.int64)
    partial = small_env(row_0_ends_at_3, reset_fn)
    partial.reset(seed=0)  # all 4 rows: fine
    for _ in range(3):
        partial.step(a)  # row 0 ends at the third
    with pytest.raises(RuntimeError, match="no start states left"):
        partial.step(a)
    with pytest.raises(ResetNeeded):
        partial.step(a)


def test_flags_must_be_bool_tensors_and_info_values_tensors():
    def int_flags(model, state, action):
        return {**counting_step(model, state, action), "terminated": torch.zeros(4, dtype=torch.int64)}

    env = small_env(int_flags)
    env.reset(seed=0)
    with pytest.raises(AdapterError, match="'terminated' must be a bool tensor .* got torch.int64"):
        env.step(torch.zeros(4, dtype=torch.int64))

    def python_info(model, state, action):
        return {**counting_step(model, state, action), "info": {"note": "hello"}}

    env = small_env(python_info)
    env.reset(seed=0)
    with pytest.raises(AdapterError, match=r"info\['note'\] is str; under use_cuda_graph\(\) info values must be "
                                           "tensors"):
        env.step(torch.zeros(4, dtype=torch.int64))


def test_actions_that_require_grad_leave_no_autograd_history():
    env = small_env(counting_step)
    env.reset(seed=0)
    logits = torch.zeros(4, requires_grad=True)
    for _ in range(3):
        outs = env.step((logits * 0).long())
        assert all(t.grad_fn is None for t in outs[:4])
    box_plain, box_graph = ensemble_pair("halfcheetah", 4)
    box_graph.reset(seed=0)
    a = torch.zeros(4, 6, requires_grad=True)
    assert box_graph.step(a * 1.0)[0].grad_fn is None


def test_a_non_finite_reset_observation_is_raised_with_its_step():
    def reset_fn(model, seed=None, options=None):
        obs = torch.full((len(seed), 2), torch.nan if len(seed) < 4 else 0.0)
        return {"state": {"obs": obs, "t": torch.zeros(len(seed), dtype=torch.int64)}, "observation": obs}

    def step(model, state, action):
        t = state["t"] + 1
        return {"state": {"obs": state["obs"], "t": t}, "observation": torch.zeros(len(t), 2),
                "reward": torch.ones(len(t)), "terminated": t == torch.tensor([2, 9, 9, 9])}

    env = small_env(step, reset_fn)
    env.reset(seed=0)
    a = torch.zeros(4, dtype=torch.int64)
    env.step(a)
    env.step(a)  # row 0 ends
    env.step(a)  # row 0 starts over with a NaN observation, returned by step 3
    with pytest.raises(AdapterError, match="non-finite observation or reward .* in step 3"):
        env.step(a)


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
def test_captured_graph_outputs_are_fresh_copies_and_errors_come_one_step_late():
    _, graph = ensemble_pair("cartpole", 8, device="cuda", eager=False)
    graph.reset(seed=0)
    zeros, ones = torch.zeros(8, dtype=torch.int64, device="cuda"), torch.ones(8, dtype=torch.int64, device="cuda")
    obs1 = graph.step(zeros)[0]
    keep = obs1.clone()
    graph.step(ones)
    assert torch.equal(obs1, keep)  # the next replay did not overwrite what the caller holds
    graph.step(torch.full((8,), 5, dtype=torch.int64, device="cuda"))
    with pytest.raises(ValueError, match="actions of step 3 after the last reset were outside"):
        graph.step(zeros)
    graph.reset(seed=1)  # a second reset reuses the captured graph
    plain, _ = ensemble_pair("cartpole", 8, device="cuda", eager=False)
    plain.reset(seed=1)
    for a in random_actions("cartpole", 8, 30, "cuda"):
        assert torch.equal(plain.step(a)[0], graph.step(a)[0])


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


def test_eager_graph_mode_draws_what_the_plain_env_draws():
    """The build's check of the adapters gives torch's draws back: an adapter that draws gets the same numbers."""
    def noisy(model, state, action):
        return {**counting_step(model, state, action), "observation": torch.rand(4, 2)}

    results = []
    for graph in (False, True):
        env = small_env(noisy, graph=graph)
        env.reset(seed=0)
        torch.manual_seed(7)
        results.append([env.step(torch.zeros(4, dtype=torch.int64))[0] for _ in range(3)])
    assert all(torch.equal(x, y) for x, y in zip(*results))
