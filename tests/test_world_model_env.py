"""WorldModelEnv / WorldModelVectorEnv: the seed tutorial, the adapter contract, bad input, batching."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode

import seed_toy
from seed_toy import (
    action_space,
    action_transform,
    batched_action_transform,
    batched_reset,
    batched_transition,
    make_env,
    model,
    obs_space,
    reset_world_model,
    transition_world_model,
)
from world_model_env import AdapterError, WorldModelEnv, WorldModelVectorEnv


def single(**overrides):
    kwargs = dict(
        observation_space=obs_space,
        action_space=action_space,
        reset_fn=reset_world_model,
        transition_fn=transition_world_model,
        action_transform_fn=action_transform,
        max_episode_steps=25,
    )
    kwargs.update(overrides)
    return WorldModelEnv(model, **kwargs)


def batched(num_envs=4, **overrides):
    kwargs = dict(
        observation_space=obs_space,
        action_space=action_space,
        reset_fn=batched_reset,
        transition_fn=batched_transition,
        num_envs=num_envs,
        action_transform_fn=batched_action_transform,
        max_episode_steps=25,
    )
    kwargs.update(overrides)
    return WorldModelVectorEnv(model, **kwargs)


def transition_with(**changes):
    """A transition_fn that returns the seed's result with some fields replaced/removed."""

    def fn(model, state, action):
        out = transition_world_model(model, state, action)
        for key, value in changes.items():
            if value is KeyError:
                del out[key]
            else:
                out[key] = value(out) if callable(value) else value
        return out

    return fn


# ---------------------------------------------------------------------------------------------
# the seed tutorial, sections 1-4, with the optional lines uncommented


def test_seed_section_1_single_env():
    env = single()
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (2,) and info == {}
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert type(reward) is float and type(terminated) is bool and type(truncated) is bool
    np.testing.assert_array_equal(env.state, obs)


def test_seed_section_2_sb3(tmp_path, monkeypatch):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_checker import check_env
    from stable_baselines3.common.monitor import Monitor

    env = single()
    check_env(env, warn=True)
    sb3_env = Monitor(env)
    agent = PPO("MlpPolicy", sb3_env, verbose=0, n_steps=256, batch_size=64, n_epochs=2, seed=0)
    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path))  # SB3's default logger makes a dir; not one per run in /tmp
    agent.learn(total_timesteps=512)  # the seed uses 10_000; the API path is the same
    assert agent.num_timesteps >= 512


def test_seed_section_3_torchrl():
    from torchrl.envs import GymWrapper, TransformedEnv
    from torchrl.envs.transforms import Compose, DoubleToFloat, StepCounter
    from torchrl.envs.utils import check_env_specs

    base_env = GymWrapper(single())
    torchrl_env = TransformedEnv(base_env, Compose(DoubleToFloat(), StepCounter(max_steps=25)))
    td = torchrl_env.reset()
    td = torchrl_env.rand_step(td)
    assert td["next", "observation"].shape == (2,)
    check_env_specs(torchrl_env)


def test_seed_section_4_cleanrl_sync():
    envs = gym.vector.SyncVectorEnv([make_env(seed=i) for i in range(4)])
    obs, infos = envs.reset(seed=0)
    assert obs.shape == (4, 2)
    for _ in range(30):
        obs, rew, term, trunc, infos = envs.step(envs.action_space.sample())
    envs.close()


def test_gymnasium_env_checker():
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # infinite Box bounds: expected for the seed's space
        check_env(single())


# ---------------------------------------------------------------------------------------------
# friendly conversions


def test_float64_observation_cast_and_bound_kept():
    box = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)

    def reset_fn(model, seed=None, options=None):
        return {"state": 0, "observation": np.array([1.0, -1.0], dtype=np.float64)}

    def transition_fn(model, state, action):
        return {"state": 0, "observation": torch.tensor([1.0, 0.5], dtype=torch.float64),
                "reward": np.float64(2.0), "terminated": np.bool_(False), "truncated": 0}

    env = WorldModelEnv(model, box, action_space, reset_fn, transition_fn)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs in box
    obs, reward, terminated, truncated, _ = env.step(np.int64(1))
    assert obs.dtype == np.float32 and obs in box
    assert type(reward) is float and reward == 2.0
    assert terminated is False and truncated is False


def test_time_limit_truncates_and_then_needs_reset():
    env = single(max_episode_steps=3, transition_fn=transition_with(terminated=False))
    env.reset(seed=1)
    flags = [env.step(0)[3] for _ in range(3)]
    assert flags == [False, False, True]
    with pytest.raises(ResetNeeded, match="episode has ended"):
        env.step(0)


def test_reset_fn_always_receives_an_int_seed():
    seen = []

    def reset_fn(model, seed=None, options=None):
        seen.append(seed)
        return reset_world_model(model, seed, options)

    env = single(reset_fn=reset_fn, seed=7)
    env.reset()
    env.reset()
    env.reset(seed=3)
    assert seen[0] == 7 and isinstance(seen[1], int) and seen[2] == 3


# ---------------------------------------------------------------------------------------------
# the seed stream of seedless resets: counter-based, the same values in a single env and in a batch row


def test_stream_scalar_and_array_agree():
    from world_model_env import stream_next, stream_nexts, stream_start, stream_starts

    seeds = np.array([0, 1, 2, 7, 2**31 - 2, 2**40 + 3, 2**63 - 1], dtype=np.int64)
    states = stream_starts(seeds)
    assert states.dtype == np.uint64 and [int(x) for x in states] == [stream_start(int(s)) for s in seeds]
    scalar = [stream_start(int(s)) for s in seeds]
    for _ in range(5):
        states, drawn = stream_nexts(states)
        scalar, expected = zip(*(stream_next(x) for x in scalar))
        assert drawn.dtype == np.int64 and drawn.tolist() == list(expected)
        assert ((0 <= drawn) & (drawn < 2**31)).all()
        assert [int(x) for x in states] == list(scalar)
    # a stream does not repeat itself, and neighbouring seeds give unrelated streams
    state, draws = stream_start(5), []
    for _ in range(1000):
        state, seed = stream_next(state)
        draws.append(seed)
    assert len(set(draws)) == 1000 and stream_next(stream_start(6))[1] not in draws[:3]


def seed_recorder(batched_fn=False):
    seen = []

    def reset_fn(model, seed=None, options=None):
        seen.append(np.array(seed) if batched_fn else seed)
        return (batched_reset if batched_fn else reset_world_model)(model, seed, options)

    return seen, reset_fn


def test_seedless_resets_follow_the_stream():
    from world_model_env import stream_next, stream_start

    seen, reset_fn = seed_recorder()
    env = single(reset_fn=reset_fn)
    env.reset(seed=11)
    env.reset()
    env.reset()
    state = stream_start(11)
    state, first = stream_next(state)
    assert seen == [11, first, stream_next(state)[1]]
    env.reset(seed=11)  # a new seed restarts the stream
    env.reset()
    assert seen[3:] == [11, first]
    # never seeded: a random stream per env, still ints in range
    seen_a, fn_a = seed_recorder()
    seen_b, fn_b = seed_recorder()
    single(reset_fn=fn_a).reset()
    single(reset_fn=fn_b).reset()
    assert isinstance(seen_a[0], int) and 0 <= seen_a[0] < 2**31 and seen_a != seen_b


def test_batched_seed_lists_and_partial_resets_match_single_envs():
    seen_v, fn_v = seed_recorder(batched_fn=True)
    vec = batched(3, reset_fn=fn_v)
    vec.reset(seed=[4, 5, 6])
    vec.reset(seed=[None, 9, None])  # rows 0 and 2 draw from their streams, row 1 restarts at 9
    vec.reset()
    singles, seen_s = [], []
    for i in range(3):
        seen, fn = seed_recorder()
        singles.append(single(reset_fn=fn))
        seen_s.append(seen)
    for i, env in enumerate(singles):
        env.reset(seed=[4, 5, 6][i])
        env.reset(seed=[None, 9, None][i])
        env.reset()
    assert [s.tolist() for s in seen_v] == [list(col) for col in zip(*seen_s)]
    assert all(s.dtype == np.int64 for s in seen_v)
    with pytest.raises(ValueError, match="non-negative"):
        vec.reset(seed=-1)
    with pytest.raises(ValueError, match="a list of 3 ints"):
        vec.reset(seed=[1, 2])
    # never seeded: random streams, different rows get different seeds
    seen_u, fn_u = seed_recorder(batched_fn=True)
    batched(64, reset_fn=fn_u).reset()
    assert len(set(seen_u[0].tolist())) == 64


def test_batched_reset_of_many_rows_is_array_work():
    """No generator per row: a reset of 65,536 rows takes milliseconds (issue 20's target is <= 0.2 s)."""
    import time

    fast = lambda model, seed=None, options=None: {"state": np.zeros((len(seed), 2), np.float32),  # noqa: E731
                                                   "observation": np.zeros((len(seed), 2), np.float32)}
    vec = batched(65536, reset_fn=fast)
    vec.reset(seed=0)
    start = time.perf_counter()
    vec.reset()
    assert time.perf_counter() - start < 2.0  # generous: a shared test machine


# ---------------------------------------------------------------------------------------------
# bad input -> clear errors


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"observation": np.zeros(3, np.float32)}, r"transition_fn returned observation with shape \(3,\), expected \(2,\)"),
        ({"observation": np.array([np.nan, 0.0], np.float32)}, "non-finite observation"),
        ({"reward": float("inf")}, "non-finite reward"),
        ({"reward": np.zeros(2)}, "'reward' must be a scalar number"),
        ({"reward": "1.0"}, "'reward' must be a scalar number"),
        ({"terminated": 0.7}, "'terminated' must be a bool"),
        ({"terminated": np.array([True, False])}, "'terminated' must be a bool"),
        ({"reward": KeyError}, r"missing key\(s\) \['reward'\]"),
        ({"observation": np.zeros(2, np.complex64)}, "cannot be cast safely"),
        ({"info": [1, 2]}, "'info' must be a dict"),
    ],
)
def test_bad_transition_output(changes, match):
    env = single(transition_fn=transition_with(**changes))
    env.reset(seed=0)
    with pytest.raises(AdapterError, match=match):
        env.step(0)


def test_non_mapping_results():
    env = single(transition_fn=lambda model, state, action: (state, state, 0.0, False))
    env.reset(seed=0)
    with pytest.raises(AdapterError, match="transition_fn must return a mapping like"):
        env.step(0)
    env = single(reset_fn=lambda model, seed=None, options=None: np.zeros(2))
    with pytest.raises(AdapterError, match="reset_fn must return a mapping"):
        env.reset()


def test_bad_reset_observation_shape():
    env = single(reset_fn=lambda model, seed=None, options=None: {"state": 0, "observation": np.zeros((1, 2))})
    with pytest.raises(AdapterError, match=r"reset_fn returned observation with shape \(1, 2\), expected \(2,\)"):
        env.reset()


@pytest.mark.parametrize("action", [3, -1, 1.5, "a", np.array([0, 1])])
def test_action_outside_space(action):
    env = single()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"is not in action_space Discrete\(3\)"):
        env.step(action)


def test_box_action_checked():
    box_act = gym.spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
    env = single(action_space=box_act, action_transform_fn=None)
    env.reset(seed=0)
    env.step(np.array([0.5, -1.0], dtype=np.float64))  # float64 inside the bounds is fine
    with pytest.raises(ValueError, match="is not in action_space Box"):
        env.step(np.array([2.0, 0.0], dtype=np.float32))


def test_step_before_reset():
    with pytest.raises(ResetNeeded, match=r"call reset\(\) before step\(\)"):
        single().step(0)


@pytest.mark.parametrize("value", [0, -5])
def test_max_episode_steps_must_be_positive(value):
    with pytest.raises(ValueError, match="max_episode_steps must be > 0"):
        single(max_episode_steps=value)
    with pytest.raises(ValueError, match="max_episode_steps must be > 0"):
        batched(max_episode_steps=value)


def test_spaces_must_be_gymnasium_spaces():
    with pytest.raises(TypeError, match="observation_space must be a gymnasium.spaces.Space"):
        single(observation_space=(2,))
    with pytest.raises(TypeError, match="action_space must be a gymnasium.spaces.Space"):
        batched(action_space=3)


def test_adapter_signatures_checked_at_construction():
    with pytest.raises(TypeError, match=r"reset_fn\(model\) cannot be called as `reset_fn\(model, seed=None, options=None\)`"):
        single(reset_fn=lambda model: None)
    with pytest.raises(TypeError, match="transition_fn.* cannot be called as `transition_fn\\(model, state, action\\)`"):
        single(transition_fn=lambda model, action: None)
    with pytest.raises(TypeError, match="action_transform_fn must be a callable"):
        single(action_transform_fn=42)


def test_signature_checked_once_not_per_step(monkeypatch):
    import world_model_env

    env = single()
    calls = []
    monkeypatch.setattr(world_model_env.inspect, "signature", lambda fn: calls.append(fn))
    env.reset(seed=0)
    for _ in range(5):
        env.step(0)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# batched env


def run_pair(mode, steps=80, num_envs=5, seed=3):
    """Step SyncVectorEnv of single envs and the batched env with the same actions; collect everything."""
    # constructor seeds (the seed's make_env pattern) must not leak into later autoresets
    sync = gym.vector.SyncVectorEnv([make_env(seed=100 + i, max_episode_steps=25) for i in range(num_envs)],
                                    autoreset_mode=mode)
    vec = batched(num_envs, autoreset_mode=mode, seed=200)
    assert vec.metadata["autoreset_mode"] == mode
    rng = np.random.default_rng(0)
    out_s, out_v = [sync.reset(seed=seed)], [vec.reset(seed=seed)]
    for _ in range(steps):
        # a biased policy so some episodes terminate (|state| < 0.05) and the rest hit the time limit
        actions = rng.integers(0, 3, size=num_envs)
        out_s.append(sync.step(actions))
        out_v.append(vec.step(actions))
    return out_s, out_v


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_batched_matches_sync_vector_env(mode):
    out_s, out_v = run_pair(mode)
    np.testing.assert_allclose(out_s[0][0], out_v[0][0])
    finished = 0
    for (o1, r1, te1, tr1, i1), (o2, r2, te2, tr2, i2) in zip(out_s[1:], out_v[1:]):
        np.testing.assert_allclose(o1, o2, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(r1, r2, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(te1, te2)
        np.testing.assert_array_equal(tr1, tr2)
        finished += int((te1 | tr1).sum())
        if mode == AutoresetMode.SAME_STEP and (te1 | tr1).any():
            np.testing.assert_array_equal(i1["_final_obs"], i2["_final_obs"])
            for a, b in zip(i1["final_obs"], i2["final_obs"]):
                assert (a is None) == (b is None)
                if a is not None:
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert finished >= 10  # both autoreset paths were exercised


def test_batched_next_step_reset_row_semantics():
    vec = batched(3, max_episode_steps=2)
    vec.reset(seed=0)
    vec.step(np.zeros(3, dtype=np.int64))
    _, _, _, trunc, _ = vec.step(np.zeros(3, dtype=np.int64))
    assert trunc.all()
    obs, rew, term, trunc, _ = vec.step(np.zeros(3, dtype=np.int64))  # the autoreset step
    assert (rew == 0).all() and not term.any() and not trunc.any()
    np.testing.assert_array_equal(vec.elapsed_steps, 0)
    np.testing.assert_array_equal(vec.state, obs)


def test_batched_determinism():
    def rollout():
        vec = batched(8, max_episode_steps=10)
        obs = [vec.reset(seed=11)[0]]
        for t in range(40):
            obs.append(vec.step(np.full(8, t % 3))[0])
        return np.stack(obs)

    np.testing.assert_array_equal(rollout(), rollout())


def test_batched_record_episode_statistics():
    vec = gym.wrappers.vector.RecordEpisodeStatistics(batched(4, max_episode_steps=5))
    vec.reset(seed=0)
    lengths = []
    for _ in range(12):
        _, _, _, _, info = vec.step(np.zeros(4, dtype=np.int64))
        if "episode" in info:
            lengths.extend(info["episode"]["l"][info["_episode"]])
    assert lengths and set(lengths) <= {5} | set(range(1, 5))


# torch adapters: the same maths, on tensors, so output="torch" never leaves the device
def torch_reset(model, seed=None, options=None):
    state = torch.as_tensor(np.stack([model.sample_initial_state(seed=int(s)) for s in seed]))
    return {"state": state, "observation": state.clone()}


def torch_transition(model, state, action):
    action = torch.as_tensor(seed_toy._ACTIONS)[torch.as_tensor(action).long()]
    next_state = state + action
    norm = torch.linalg.norm(next_state, dim=1)
    return {"state": next_state, "observation": next_state.clone(), "reward": -norm, "terminated": norm < 0.05}


def test_torch_output_checks_actions_in_the_steps_one_sync():
    """output="torch": the action check travels to the host with the done flags (one sync a step); a bad action
    still raises the numpy path's error, the model never sees an out-of-range index, and the env needs a reset."""
    seen = []

    def transition_fn(model, state, action):
        seen.append(torch.as_tensor(action).clone())
        return torch_transition(model, state, action)

    vt = batched(4, reset_fn=torch_reset, transition_fn=transition_fn, action_transform_fn=None, output="torch")
    vt.reset(seed=0)
    vt.step(torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="outside action_space Discrete"):
        vt.step(torch.tensor([0, 1, 7, -1]))
    assert int(seen[-1].min()) >= 0 and int(seen[-1].max()) <= 2  # clamped for the model
    with pytest.raises(ResetNeeded):
        vt.step(torch.tensor([0, 1, 2, 0]))
    vt.reset(seed=0)
    vt.step(torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_torch_output_matches_numpy(mode):
    vnp = batched(6, autoreset_mode=mode, max_episode_steps=7)
    vt = batched(6, autoreset_mode=mode, max_episode_steps=7, reset_fn=torch_reset, transition_fn=torch_transition,
                 action_transform_fn=None, output="torch")
    o1, _ = vnp.reset(seed=5)
    o2, _ = vt.reset(seed=5)
    assert isinstance(o2, torch.Tensor) and o2.dtype == torch.float32
    rng = np.random.default_rng(1)
    for _ in range(30):
        a = rng.integers(0, 3, size=6)
        o1, r1, te1, tr1, i1 = vnp.step(a)
        o2, r2, te2, tr2, i2 = vt.step(torch.as_tensor(a))
        assert isinstance(r2, torch.Tensor) and r2.dtype == torch.float32 and te2.dtype == torch.bool
        np.testing.assert_allclose(o1, o2.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(r1, r2.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(tr1, tr2.numpy())
        if "final_obs" in i1:
            for row in np.flatnonzero(i1["_final_obs"]):
                np.testing.assert_allclose(i1["final_obs"][row], i2["final_obs"][row].numpy(), rtol=1e-6, atol=1e-6)


def batched_with(**changes):
    def fn(model, state, action):
        out = batched_transition(model, state, action)
        for key, value in changes.items():
            if value is KeyError:
                del out[key]
            else:
                out[key] = value(out) if callable(value) else value
        return out

    return fn


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"observation": lambda o: o["observation"][:, :1]}, r"observations with shape \(4, 1\), expected \(4, 2\)"),
        ({"observation": lambda o: np.where(np.arange(4)[:, None] == 2, np.nan, o["observation"])}, "non-finite"),
        ({"reward": lambda o: np.full(4, np.inf)}, "non-finite"),
        ({"reward": lambda o: o["reward"][:, None]}, r"'reward' must have shape \(4,\)"),
        ({"terminated": lambda o: np.full(4, 0.3)}, "'terminated' must be booleans"),
        ({"truncated": lambda o: np.zeros(3, bool)}, r"'truncated' must have shape \(4,\)"),
        ({"state": lambda o: o["state"][:2]}, "state with leading dimension 2, expected 4"),
        ({"terminated": KeyError}, r"missing key\(s\) \['terminated'\]"),
    ],
)
def test_batched_bad_transition_output(changes, match):
    vec = batched(transition_fn=batched_with(**changes))
    vec.reset(seed=0)
    with pytest.raises(AdapterError, match=match):
        vec.step(np.zeros(4, dtype=np.int64))


def test_batched_bad_actions_and_order():
    vec = batched()
    with pytest.raises(ResetNeeded):
        vec.step(np.zeros(4, dtype=np.int64))
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions have shape \(3,\), expected \(4,\)"):
        vec.step(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="outside action_space Discrete"):
        vec.step(np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="outside action_space Discrete"):
        vec.step(np.zeros(4, dtype=np.float32))


def test_batched_bad_reset_and_constructor():
    bad = lambda model, seed=None, options=None: {"state": np.zeros((1, 2)), "observation": np.zeros((1, 2))}  # noqa: E731
    with pytest.raises(AdapterError, match=r"reset_fn returned observations with shape \(1, 2\), expected \(4, 2\)"):
        batched(reset_fn=bad).reset(seed=0)
    bad_state = lambda model, seed=None, options=None: {"state": np.zeros((1, 2)), "observation": np.zeros((4, 2))}  # noqa: E731
    with pytest.raises(AdapterError, match="state with leading dimension 1, expected 4"):
        batched(reset_fn=bad_state).reset(seed=0)
    with pytest.raises(TypeError, match="observation_space must be a Box"):
        batched(observation_space=gym.spaces.Discrete(3))
    with pytest.raises(ValueError, match="num_envs must be an int >= 1"):
        batched(num_envs=0)
    with pytest.raises(ValueError, match="autoreset_mode"):
        batched(autoreset_mode="sometimes")
    with pytest.raises(ValueError, match="output must be 'numpy' or 'torch'"):
        batched(output="jax")


def test_reset_mismatched_state_structure_is_explained():
    def reset_fn(model, seed=None, options=None):
        s = batched_reset(model, seed)
        s["state"] = s["state"][:, :1]  # a different trailing shape than transition_fn's state
        return s

    vec = batched(2, max_episode_steps=1)
    vec.reset(seed=0)
    vec.reset_fn = reset_fn
    vec.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(AdapterError, match="cannot write the reset rows"):
        vec.step(np.zeros(2, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# workers: each thunk builds its own model copy, one torch thread per worker


def test_async_vector_env_spawn_matches_sync():
    import world_model_env_workers as workers

    thunks = [workers.make_torch_env(i) for i in range(2)]
    async_envs = gym.vector.AsyncVectorEnv(thunks, context="spawn")
    sync_envs = gym.vector.SyncVectorEnv([workers.make_torch_env(i) for i in range(2)])
    try:
        o1, _ = async_envs.reset(seed=4)
        o2, _ = sync_envs.reset(seed=4)
        np.testing.assert_allclose(o1, o2)
        for t in range(30):
            a = np.array([t % 3, (t + 1) % 3])
            r1 = async_envs.step(a)
            r2 = sync_envs.step(a)
            for x, y in zip(r1[:4], r2[:4]):
                np.testing.assert_allclose(x, y, rtol=1e-6)
        assert async_envs.call("torch_threads") == (1, 1)
    finally:
        async_envs.close()
        sync_envs.close()


@pytest.mark.parametrize("output", ["numpy", "torch"])
def test_batched_observations_are_owned_by_the_caller(output):
    def reset_fn(model, seed=None, options=None):
        out = torch_reset(model, seed)
        return {"state": out["state"], "observation": out["state"]}  # the state itself as the observation

    def transition_fn(model, state, action):
        out = torch_transition(model, state, action)
        return {**out, "observation": out["state"]}

    vec = batched(3, reset_fn=reset_fn, transition_fn=transition_fn, action_transform_fn=None, output=output)
    obs, _ = vec.reset(seed=0)
    obs[:] = 123.0  # a caller writing into the observation (TorchRL does) ...
    assert not (vec.state == 123.0).any()  # ... must not rewrite the model state
    obs, *_ = vec.step(np.zeros(3, dtype=np.int64))
    obs[:] = 123.0
    assert not (vec.state == 123.0).any()


def test_batched_numpy_output_converts_tensor_infos():
    def transition_fn(model, state, action):
        out = torch_transition(model, state, action)
        return {**out, "info": {"disagreement": torch.zeros(len(state))}}

    vec = batched(3, reset_fn=torch_reset, transition_fn=transition_fn, action_transform_fn=None)
    vec.reset(seed=0)
    *_, info = vec.step(np.zeros(3, dtype=np.int64))
    assert isinstance(info["disagreement"], np.ndarray) and info["disagreement"].shape == (3,)


# ---------------------------------------------------------------------------------------------
# non-finite values name the field and the rows; SAME_STEP final_info matches SyncVectorEnv


def _nan_rows(x, rows):
    x = np.array(x, dtype=np.float32)
    x[rows] = np.nan
    return x


@pytest.mark.parametrize("output", ["numpy", "torch"])
def test_batched_non_finite_observation_names_field_and_rows(output):
    vec = batched(4, transition_fn=batched_with(observation=lambda o: _nan_rows(o["observation"], [1, 3])), output=output)
    vec.reset(seed=0)
    with pytest.raises(AdapterError, match=r"transition_fn returned a non-finite observation \(NaN or Inf\) in rows \[1, 3\]"):
        vec.step(np.zeros(4, dtype=np.int64))


@pytest.mark.parametrize("output", ["numpy", "torch"])
def test_batched_non_finite_reward_names_field_and_rows(output):
    vec = batched(8, transition_fn=batched_with(reward=lambda o: np.where(np.arange(8) != 4, np.inf, o["reward"])),
                  output=output)
    vec.reset(seed=0)
    with pytest.raises(AdapterError, match=r"non-finite reward \(NaN or Inf\) in rows \[0, 1, 2, 3, 5\] \(and 2 more\)"):
        vec.step(np.zeros(8, dtype=np.int64))


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_batched_non_finite_reset_observation_names_field_and_rows(mode):
    def reset_fn(model, seed=None, options=None):
        out = batched_reset(model, seed)
        out["observation"] = _nan_rows(out["observation"], [len(seed) - 1])
        return out

    with pytest.raises(AdapterError, match=r"reset_fn returned a non-finite observation \(NaN or Inf\) in rows \[3\]"):
        batched(4, reset_fn=reset_fn).reset(seed=0)
    # on autoreset the rows are named by env index, and reset_fn (not transition_fn) is blamed
    vec = batched(3, max_episode_steps=1, autoreset_mode=mode)
    vec.reset(seed=0)
    vec.reset_fn = reset_fn
    with pytest.raises(AdapterError, match=r"reset_fn returned a non-finite observation \(NaN or Inf\) in rows \[2\]"):
        for _ in range(2):
            vec.step(np.zeros(3, dtype=np.int64))


def transition_with_info(model, state, action):
    out = transition_world_model(model, state, action)
    return {**out, "info": {"dist": float(np.linalg.norm(out["state"])), "stats": {"x": float(out["state"][0])}}}


def batched_transition_with_info(model, state, action):
    out = batched_transition(model, state, action)
    return {**out, "info": {"dist": np.linalg.norm(out["state"], axis=1).astype(np.float64),
                            "stats": {"x": out["state"][:, 0].astype(np.float64)}}}


def assert_same_final_info(expected, got, finished):
    assert set(expected) == set(got)
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same_final_info(value, got[key], finished)
        elif key.startswith("_"):
            np.testing.assert_array_equal(value, finished)
            np.testing.assert_array_equal(np.asarray(got[key]), finished)
        else:
            np.testing.assert_allclose(np.asarray(got[key]), value, rtol=1e-5, atol=1e-6)


def test_same_step_final_info_matches_sync_vector_env():
    n = 5
    sync = gym.vector.SyncVectorEnv([lambda: single(transition_fn=transition_with_info)] * n,
                                    autoreset_mode=AutoresetMode.SAME_STEP)
    vec = batched(n, transition_fn=batched_transition_with_info, autoreset_mode=AutoresetMode.SAME_STEP)
    sync.reset(seed=3)
    vec.reset(seed=3)
    rng = np.random.default_rng(0)
    partial = 0
    for _ in range(80):
        actions = rng.integers(0, 3, size=n)
        *_, te, tr, i1 = sync.step(actions)
        *_, i2 = vec.step(actions)
        finished = te | tr
        assert ("final_info" in i1) == ("final_info" in i2) == finished.any()
        if finished.any():
            partial += int(not finished.all())
            np.testing.assert_array_equal(i2["_final_info"], finished)
            assert_same_final_info(i1["final_info"], i2["final_info"], finished)
    assert partial >= 3  # steps where only some rows finished


def test_same_step_final_info_torch_output():
    def transition_fn(model, state, action):
        out = torch_transition(model, state, action)
        return {**out, "info": {"dist": -out["reward"]}}

    vec = batched(6, reset_fn=torch_reset, transition_fn=transition_fn, action_transform_fn=None, output="torch",
                  autoreset_mode=AutoresetMode.SAME_STEP, max_episode_steps=4)
    vec.reset(seed=0)
    for t in range(8):
        *_, te, tr, info = vec.step(torch.full((6,), t % 3))
    finished = te | tr
    assert finished.all()
    assert torch.equal(info["final_info"]["_dist"], finished)
    torch.testing.assert_close(info["final_info"]["dist"], torch.linalg.norm(info["final_obs"], dim=1))


def test_model_state_is_written_without_autograd():
    """A recurrent model's reset_fn that tracks gradients (a GRU state, TorchWM's Dreamer RSSM without no_grad)
    next to a transition_fn that runs under no_grad: autoreset writes reset rows into views made in no_grad mode,
    which autograd refuses unless the env keeps model state out of autograd (it does, in both envs)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    gru = torch.nn.GRUCell(2, 8)

    def reset_fn(model, seed=None, options=None):
        n = len(seed) if np.ndim(seed) else 1
        deter = gru(torch.ones(n, 2), torch.zeros(n, 8))  # records autograd history when called under grad mode
        state = {"deter": deter, "mean": deter[:, :4], "std": deter[:, 4:].exp()}
        return {"state": state, "observation": deter if np.ndim(seed) else deter[0]}

    def transition_fn(model, state, action):
        with torch.no_grad():  # as a careful adapter steps its model
            batched = state["deter"].dim() == 2
            a = torch.as_tensor(np.asarray(action)).reshape(-1)
            deter = gru(torch.nn.functional.one_hot(a, 2).float(), state["deter"].reshape(-1, 8))
        out = {"deter": deter, "mean": deter[:, :4], "std": deter[:, 4:].exp()}
        obs = deter if batched else deter[0]
        if not batched:
            out = {k: v[0] for k, v in out.items()}
        return {"state": out, "observation": obs, "reward": obs.sum(-1),
                "terminated": torch.zeros(obs.shape[:-1], dtype=torch.bool)}

    space = gym.spaces.Box(-np.inf, np.inf, (8,), np.float32)
    envs = WorldModelVectorEnv(None, space, gym.spaces.Discrete(2), reset_fn=reset_fn, transition_fn=transition_fn,
                               num_envs=4, max_episode_steps=3, output="torch")
    envs.reset(seed=0)
    for _ in range(8):  # two autoresets of every row
        envs.step(np.zeros(4, dtype=np.int64))
    assert not any(v.requires_grad for v in envs.state.values())
    env = WorldModelEnv(None, space, gym.spaces.Discrete(2), reset_fn=reset_fn, transition_fn=transition_fn,
                        max_episode_steps=3)
    env.reset(seed=0)
    assert not env.state["deter"].requires_grad
