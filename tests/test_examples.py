"""Tests for sb3_example.py and torchrl_example.py.

* SB3: check_env on WorldModelEnv; the WorldModelSB3VecEnv adapter honours the SB3 VecEnv contract (shapes, dtypes,
  same-step autoreset with infos[i]["terminal_observation"], "TimeLimit.truncated" only for time limits, seeding)
  and behaves exactly like DummyVecEnv of single WorldModelEnvs; PPO/DQN run on it.
* TorchRL: GymWrapper around the batched env passes check_env_specs; a truncated step keeps the true final
  observation, is not "terminated", and GAE bootstraps it with V(final obs) while a terminated step is not.
* Both scripts run end to end with a tiny budget and write summary.json with the agreed keys.
"""

import json
import logging
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sb3_example  # noqa: E402
import torchrl_example  # noqa: E402
import train_world_model as twm  # noqa: E402
from sb3_example import WorldModelSB3VecEnv  # noqa: E402
from world_model_env import WorldModelEnv, WorldModelVectorEnv  # noqa: E402

SAME, NEXT = gym.vector.AutoresetMode.SAME_STEP, gym.vector.AutoresetMode.NEXT_STEP
SUMMARY_KEYS = {"real_return_mean", "real_return_std", "real_env_steps", "imagined_steps", "wall_seconds"}
logging.getLogger("torchrl").setLevel(logging.WARNING)


# ---------------------------------------------------------------- a deterministic toy model with known episode ends
class CounterModel:
    """obs = [t, row]: t counts steps; row `r` terminates when t reaches term_at[r] (others hit the time limit)."""

    def __init__(self, term_at):
        self.term_at = np.asarray(term_at, dtype=np.float32)


def counter_reset(model, seed=None, options=None):
    seeds = np.asarray(seed).reshape(-1)
    obs = np.zeros((len(seeds), 2), np.float32)
    return {"state": obs, "observation": obs.copy()}


def counter_step(model, state, action):
    nxt = state.copy()
    nxt[:, 0] += 1
    nxt[:, 1] = np.arange(len(state))
    return {"state": nxt, "observation": nxt.copy(), "reward": 1.0 + np.asarray(action, np.float32),
            "terminated": nxt[:, 0] >= model.term_at[: len(state)]}


OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)


def counter_vec(term_at, horizon, mode=SAME):
    return WorldModelVectorEnv(CounterModel(term_at), OBS_SPACE, gym.spaces.Discrete(2), counter_reset, counter_step,
                               num_envs=len(term_at), max_episode_steps=horizon, autoreset_mode=mode)


@pytest.fixture(scope="module")
def tiny_wm():
    """A tiny but real EnsembleWorldModel (seconds to fit)."""
    torch.manual_seed(0)
    data = twm.collect_transitions("CartPole-v1", 400, seed=0)
    wm, _ = twm.fit_world_model(data, seed=0, max_epochs=2, ensemble_size=2, hidden_size=32, num_layers=2)
    return wm


# ---------------------------------------------------------------- SB3
def test_check_env_on_world_model_env(tiny_wm):
    from stable_baselines3.common.env_checker import check_env

    check_env(twm.make_imagined_env(tiny_wm, seed=0), warn=True)


def test_sb3_adapter_vecenv_contract():
    # row 0 terminates at t=2; rows 1, 2 hit the time limit at t=3
    venv = WorldModelSB3VecEnv(counter_vec([2, 100, 100], horizon=3))
    assert venv.num_envs == 3 and venv.observation_space == OBS_SPACE and venv.action_space == gym.spaces.Discrete(2)
    obs = venv.reset()
    assert obs.shape == (3, 2) and obs.dtype == np.float32
    for t in (1, 2, 3):
        obs, rewards, dones, infos = venv.step(np.array([1, 0, 1]))
        assert obs.shape == (3, 2) and obs.dtype == np.float32
        assert rewards.shape == (3,) and rewards.dtype == np.float32
        np.testing.assert_array_equal(rewards, [2.0, 1.0, 2.0])
        assert dones.shape == (3,) and dones.dtype == bool
        assert isinstance(infos, list) and len(infos) == 3 and all(isinstance(i, dict) for i in infos)
        if t == 2:  # row 0 terminated: final obs in the info, next episode's first obs returned, no bootstrap
            np.testing.assert_array_equal(dones, [True, False, False])
            np.testing.assert_array_equal(infos[0]["terminal_observation"], [2.0, 0.0])
            assert infos[0]["TimeLimit.truncated"] is False
            np.testing.assert_array_equal(obs[0], [0.0, 0.0])
            assert "terminal_observation" not in infos[1]
        if t == 3:  # rows 1, 2 truncated by the time limit: SB3 must bootstrap them
            np.testing.assert_array_equal(dones, [False, True, True])
            for i in (1, 2):
                np.testing.assert_array_equal(infos[i]["terminal_observation"], [3.0, float(i)])
                assert infos[i]["TimeLimit.truncated"] is True
                np.testing.assert_array_equal(obs[i], [0.0, 0.0])
    # the observations handed to SB3 are its own: writing into them leaves the env untouched
    obs[:] = 99.0
    obs2, *_ = venv.step(np.zeros(3, dtype=np.int64))
    assert obs2[1, 0] == 1.0
    assert venv.get_attr("render_mode") == [None, None, None]
    assert venv.env_is_wrapped(gym.Wrapper) == [False, False, False]
    venv.close()


def test_sb3_adapter_requires_same_step():
    with pytest.raises(ValueError, match="SAME_STEP"):
        WorldModelSB3VecEnv(counter_vec([5, 5], horizon=3, mode=NEXT))


def test_sb3_adapter_matches_dummy_vec_env(tiny_wm):
    """One batched model call per step must give what N single WorldModelEnvs in a DummyVecEnv give."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    n, horizon = 4, 6
    adapter = WorldModelSB3VecEnv(twm.make_imagined_vector_env(tiny_wm, n, max_episode_steps=horizon,
                                                               autoreset_mode=SAME))
    dummy = DummyVecEnv([lambda: twm.make_imagined_env(tiny_wm, max_episode_steps=horizon) for _ in range(n)])
    for venv in (adapter, dummy):
        venv.seed(123)
    np.testing.assert_allclose(adapter.reset(), dummy.reset(), atol=1e-5)
    rng = np.random.default_rng(0)
    for _ in range(3 * horizon):
        actions = rng.integers(0, 2, size=n)
        o1, r1, d1, i1 = adapter.step(actions)
        o2, r2, d2, i2 = dummy.step(actions)
        np.testing.assert_allclose(o1, o2, atol=1e-4)
        np.testing.assert_allclose(r1, r2, atol=1e-4)
        np.testing.assert_array_equal(d1, d2)
        for a, b in zip(i1, i2):
            if "terminal_observation" in b:
                np.testing.assert_allclose(a["terminal_observation"], b["terminal_observation"], atol=1e-4)
                assert a["TimeLimit.truncated"] == b["TimeLimit.truncated"]


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_sb3_algorithms_learn_on_adapter(tiny_wm, algo):
    import stable_baselines3 as sb3
    from stable_baselines3.common.vec_env import VecMonitor

    env = VecMonitor(WorldModelSB3VecEnv(twm.make_imagined_vector_env(tiny_wm, 4, max_episode_steps=20,
                                                                      autoreset_mode=SAME)))
    if algo == "ppo":
        agent = sb3.PPO("MlpPolicy", env, n_steps=32, batch_size=64, n_epochs=1, seed=0)
    else:
        agent = sb3.DQN("MlpPolicy", env, learning_starts=16, train_freq=4, gradient_steps=1, seed=0)
    agent.learn(256)
    assert agent.num_timesteps >= 256
    assert len(agent.ep_info_buffer) > 0  # VecMonitor saw finished imagined episodes through the adapter


def test_speedup_measurement(tiny_wm):
    res = sb3_example.measure_vecenv_speedup(tiny_wm, n_envs=4, steps=5, seed=0, repeats=1)
    assert res["n_envs"] == 4 and res["adapter_sps"] > 0 and res["dummy_sps"] > 0 and res["speedup"] > 0


def test_bad_flags_give_a_clear_error():
    with pytest.raises(SystemExit, match="--n-envs: expected an integer >= 1, got 0"):
        sb3_example.validate_args(sb3_example.Args(n_envs=0))
    with pytest.raises(SystemExit, match="--world-model-path: expected an existing checkpoint file"):
        sb3_example.validate_args(sb3_example.Args(world_model_path="/nonexistent/world_model.pt"))
    with pytest.raises(SystemExit, match="--frames-per-batch: expected a multiple of --num-envs"):
        torchrl_example.validate_args(torchrl_example.Args(num_envs=3, frames_per_batch=1024))


# ---------------------------------------------------------------- TorchRL
def test_torchrl_batched_env_specs_and_truncation_bootstrap():
    from tensordict.nn import TensorDictModule
    from torchrl.envs.utils import check_env_specs
    from torchrl.objectives.value import GAE

    model = CounterModel([2, 100])
    args = torchrl_example.Args(num_envs=2, imagination_horizon=3)
    model.max_episode_steps = 3

    # make_torchrl_env builds its vector env through train_world_model; route it to the counter model instead
    def fake_vector_env(wm, num_envs, seed=None, max_episode_steps=None, autoreset_mode=None, output="numpy"):
        return counter_vec([2, 100], horizon=max_episode_steps, mode=autoreset_mode)

    orig = torchrl_example.twm.make_imagined_vector_env
    torchrl_example.twm.make_imagined_vector_env = fake_vector_env
    try:
        env = torchrl_example.make_torchrl_env(model, args, seed=0)
    finally:
        torchrl_example.twm.make_imagined_vector_env = orig
    assert tuple(env.batch_size) == (2,)
    check_env_specs(env, seed=0)

    td = env.rollout(4, break_when_any_done=False)  # [2 envs, 4 steps]
    nxt = td["next"]
    # row 0: terminates every 2 steps (indices 1, 3); row 1: truncated by the time limit at step 3 (index 2)
    assert nxt["terminated"][0, :, 0].tolist() == [False, True, False, True]
    assert nxt["truncated"][0, :, 0].tolist() == [False, False, False, False]
    assert nxt["terminated"][1, :, 0].tolist() == [False, False, False, False]
    assert nxt["truncated"][1, :, 0].tolist() == [False, False, True, False]
    # the step's "next" observation is the TRUE final obs; the following root obs is the reset obs
    assert nxt["observation"][0, 1].tolist() == [2.0, 0.0] and td["observation"][0, 2].tolist() == [0.0, 0.0]
    assert nxt["observation"][1, 2].tolist() == [3.0, 1.0] and td["observation"][1, 3].tolist() == [0.0, 0.0]
    assert nxt["step_count"][1, 2, 0].item() == 3 and td["step_count"][1, 3, 0].item() == 0

    # GAE with V(obs) = 10 * t, gamma 0.5, lambda 0: advantage = r + gamma * V(s') * (1 - terminated) - V(s)
    critic = TensorDictModule(lambda o: 10.0 * o[..., :1], in_keys=["observation"], out_keys=["state_value"])
    GAE(gamma=0.5, lmbda=0.0, value_network=critic)(td)
    adv = td["advantage"][..., 0]
    r = td["next", "reward"][..., 0]
    assert adv[0, 1].item() == pytest.approx(r[0, 1].item() + 0.0 - 10.0)  # terminated: no bootstrap
    assert adv[1, 2].item() == pytest.approx(r[1, 2].item() + 0.5 * 30.0 - 20.0)  # truncated: V(final obs)
    env.close()


def test_torchrl_env_owns_its_observations(tiny_wm):
    """Regression: TorchRL writes into the observation arrays it receives; the model state must not change."""
    args = torchrl_example.Args(num_envs=4, imagination_horizon=5)
    env = torchrl_example.make_torchrl_env(tiny_wm, args, seed=0)
    td = env.rollout(12, break_when_any_done=False)
    # after every finished step the next root observation is a fresh start state, not the final state
    done = td["next", "done"][:, :-1, 0]
    assert done.any()
    restarted = td["observation"][:, 1:][done]
    starts = tiny_wm.start_obs.cpu()
    assert torch.cdist(restarted, starts).min(dim=1).values.max() < 1e-5
    assert (td["next", "step_count"] <= 5).all()
    env.close()


# ---------------------------------------------------------------- end to end, tiny budgets
def run_script(tmp_path, script, *flags):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), summary
    assert any(f.name.startswith("events.out.tfevents") for f in run_dir.iterdir())
    return summary, out.stdout


TINY_WM = ["--wm-random-steps", "300", "--wm-fit-epochs", "2", "--dyna-iterations", "2", "--dyna-real-steps", "100",
           "--eval-episodes", "2"]


def test_sb3_example_end_to_end(tmp_path):
    summary, stdout = run_script(tmp_path, "sb3_example.py", *TINY_WM, "--total-imagined-steps", "512",
                                 "--n-envs", "4", "--speedup-steps", "5", "--status-every", "128")
    assert summary["imagined_steps"] >= 512
    assert summary["real_env_steps"] == 300 + 100
    assert summary["vecenv_speedup_vs_dummy"] > 0
    assert "check_env(WorldModelEnv) passed" in stdout and "imagined step" in stdout

    # the saved (refit) world model loads back; its real data is counted, no new real data without Dyna
    (run_dir,) = list((tmp_path / "runs").iterdir())
    # the refit model's checkpoint carries all its real data (random + Dyna), for refits of a later run
    assert len(twm.load_world_model(run_dir / "world_model.pt").buffer) == 300 + 100
    again = tmp_path / "again"
    again.mkdir()
    summary2, _ = run_script(again, "sb3_example.py", "--world-model-path", str(run_dir / "world_model.pt"),
                             "--dyna-iterations", "1", "--total-imagined-steps", "256", "--n-envs", "1",
                             "--eval-episodes", "1", "--algo", "dqn")
    assert summary2["real_env_steps"] == 300 + 100 and summary2["algo"] == "dqn"
    assert "vecenv_speedup_vs_dummy" not in summary2  # n_envs 1: nothing to compare


def test_torchrl_example_end_to_end(tmp_path):
    summary, stdout = run_script(tmp_path, "torchrl_example.py", *TINY_WM, "--total-frames", "512",
                                 "--frames-per-batch", "128", "--num-envs", "4", "--minibatch-size", "64",
                                 "--update-epochs", "1")
    assert summary["imagined_steps"] >= 512
    assert summary["real_env_steps"] == 300 + 100
    assert "check_env_specs passed" in stdout and "imagined frames" in stdout
