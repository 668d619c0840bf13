"""Tests for dqn_imagined.py: the TD target on a crafted batch, what reaches the replay buffer in real runs of the
script (no NEXT_STEP reset transition, true final observations), tiny end-to-end runs with and without a world model,
--eval-checkpoint reproducing a run, and bad input that stops with one line and leaves no run dir."""
import json
import os
import runpy
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

import dqn_imagined as dqn
import rl_utils

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dqn_imagined.py")
TINY = ["--total-timesteps", "256", "--num-envs", "4", "--real-iterations", "1", "--real-steps-per-iteration", "100",
        "--initial-real-steps", "300", "--learning-starts", "32", "--batch-size", "16", "--hidden-size", "16",
        "--gradient-steps", "4", "--train-frequency", "2", "--eval-episodes", "3", "--no-early-stop"]


def _linear_q(weight, bias):
    """A Q-network on 1-D observations: Q(s, a) = weight[a] * s + bias[a]."""
    net = nn.Linear(1, len(weight))
    with torch.no_grad():
        net.weight.copy_(torch.tensor(weight, dtype=torch.float32)[:, None])
        net.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return net


def test_td_target_bootstraps_truncation_but_not_termination():
    # Row 0: the last step of an episode cut by the time limit (stored with terminated=0); row 1: a termination;
    # both land in the same final observation s' = 2.
    online = _linear_q([1.0, -1.0], [0.0, 0.0])  # Q_online(2) = [2, -2]: picks action 0
    target = _linear_q([10.0, 20.0], [0.0, 0.0])  # Q_target(2) = [20, 40]: values action 0 at 20 (not the max 40)
    rewards, next_obs, terminated = torch.tensor([1.0, 1.0]), torch.tensor([[2.0], [2.0]]), torch.tensor([0.0, 1.0])
    y = dqn.td_target(online, target, rewards, next_obs, terminated, torch.tensor([0.9, 0.9]))
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.9 * 20.0, 1.0]))


def test_n_step_rows_stop_at_the_end_of_an_episode_and_skip_reset_steps():
    # 4 rows over a window of 3 vector steps (gamma 0.5), rewards 1, 2, 4 at the three steps:
    # row 0 runs through: 1 + 0.5*2 + 0.25*4, bootstrapped from the third next_obs with 0.5**3;
    # row 1 terminates at the second step: 1 + 0.5*2, no bootstrap; row 2 is truncated at the first step: reward 1,
    # bootstrapped from its final obs with 0.5; row 3 was a NEXT_STEP reset step at the first step: left out.
    obs = np.arange(4, dtype=np.float32)[:, None]
    window = []
    for k, reward in enumerate([1.0, 2.0, 4.0]):
        term = np.array([False, k == 1, False, False])
        trunc = np.array([False, False, k == 0, False])
        valid = np.array([True, True, True, k > 0])
        window.append((obs + 10 * k, np.full(4, k), np.full(4, reward, np.float32), obs + 10 * (k + 1), term, trunc,
                       valid))
    o, a, r, next_obs, terminated, discounts = dqn.n_step_rows(window, gamma=0.5)
    np.testing.assert_allclose(o[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(a, [0, 0, 0])
    np.testing.assert_allclose(r, [1 + 1 + 1, 1 + 1, 1])
    np.testing.assert_allclose(next_obs[:, 0], [30, 21, 12])
    np.testing.assert_array_equal(terminated, [False, True, False])
    np.testing.assert_allclose(discounts, [0.125, 0.25, 0.5])


def _run_in_process(tmp_path, monkeypatch, flags):
    """Runs the script's __main__ in this process with a replay buffer that records every row it is given."""
    stored = []

    class RecordingReplayBuffer(rl_utils.ReplayBuffer):
        def add(self, obs, actions, rewards, next_obs, terminated, discounts=1.0):
            if len(obs):  # a vector step whose rows were all reset steps adds nothing
                stored.append([np.array(x, dtype=np.float64).reshape(len(obs), -1)
                               for x in (obs, actions, rewards, next_obs, terminated)])
            super().add(obs, actions, rewards, next_obs, terminated, discounts)

    monkeypatch.setattr(rl_utils, "ReplayBuffer", RecordingReplayBuffer)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *flags])
    runpy.run_path(SCRIPT, run_name="__main__")
    obs, actions, rewards, next_obs, terminated = (np.concatenate(col) for col in zip(*stored))
    (summary,) = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/summary.json")]
    return obs, actions[:, 0].astype(int), rewards[:, 0], next_obs, terminated[:, 0].astype(bool), summary


def test_model_free_run_stores_exactly_the_real_transitions(tmp_path, monkeypatch):
    obs, actions, rewards, next_obs, terminated, summary = _run_in_process(
        tmp_path, monkeypatch, [*TINY, "--world-model", "none", "--total-timesteps", "400", "--n-step", "1"])
    assert terminated.sum() >= 5  # random CartPole episodes end every ~20 steps: many NEXT_STEP resets happened
    # every stored row is a real CartPole step: replaying (obs, action) gives next_obs and terminated; a reset
    # transition (final obs -> first obs of the next episode) would jump and break this
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    for o, a, no, term in zip(obs, actions, next_obs, terminated):
        env.state, env.steps_beyond_terminated = o.copy(), None
        replay_obs, _, replay_term, _, _ = env.step(a)
        np.testing.assert_allclose(replay_obs, no, atol=1e-5)
        assert replay_term == term
    assert (rewards == 1.0).all()
    assert summary["world_model"] == "none" and summary["real_env_steps"] == len(obs) < 400
    assert "_model_free" in summary["run_dir"] and summary["imagined_steps"] == 0


def test_imagined_run_never_stores_reset_steps(tmp_path, monkeypatch):
    # a 5-step horizon truncates every imagined episode early; NEXT_STEP reset steps come with reward 0 and
    # terminated False, which no imagined CartPole step has (rewards are exactly 1, a halt is reward 0 + terminal)
    obs, actions, rewards, next_obs, terminated, summary = _run_in_process(
        tmp_path, monkeypatch, [*TINY, "--imagined-horizon", "5", "--n-step", "1"])
    assert not np.any((rewards == 0.0) & ~terminated)
    assert np.all((rewards == 1.0) | terminated)
    # every episode lasts 1 to 5 steps and is followed by one reset step: 1/6 to 1/2 of all steps are left out
    num_steps = summary["global_step"]
    assert summary["imagined_steps"] == len(obs) and num_steps // 6 <= num_steps - len(obs) <= num_steps // 2


ROOT = os.path.dirname(SCRIPT)


@pytest.mark.parametrize("flags,real_steps", [
    (["--vector-env", "sync"], 300 + 100),  # workers load the saved ensemble, new ones after the refit
    (["--world-model", os.path.join(ROOT, "examples/cartpole_physics.py:CartPolePhysics")], 0),  # nothing to learn
])
def test_any_world_model_and_the_make_env_thunks(tmp_path, monkeypatch, flags, real_steps):
    obs, actions, rewards, next_obs, terminated, summary = _run_in_process(
        tmp_path, monkeypatch, [*TINY, "--n-step", "1", *flags])
    assert not np.any((rewards == 0.0) & ~terminated)  # no NEXT_STEP reset step stored
    assert summary["status"] == "finished" and summary["real_env_steps"] == real_steps
    assert summary["imagined_steps"] == len(obs) > 0 and summary["eval_env_steps"] > 0


def _run(tmp_path, *flags):
    return subprocess.run([sys.executable, SCRIPT, *flags], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_end_to_end_learned_model_and_eval_checkpoint_reproduces_the_run(tmp_path, monkeypatch):
    proc = _run(tmp_path, *TINY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("runs/CartPole-v1__dqn_imagined__1__*/summary.json")
    s = json.loads(path.read_text())
    assert s["status"] == "finished" and s["world_model"] == "ensemble"
    assert s["real_env_steps"] == 300 + 100  # the model's random data and one Dyna round; evaluation excluded
    assert 0 < s["imagined_steps"] <= s["global_step"] == 256 and s["eval_env_steps"] > 0
    assert s["imagined_return_mean"] is not None and len(s["eval_history"]) == 2
    for key in ("world_model_seconds", "real_collect_seconds", "eval_seconds", "train_seconds", "wall_seconds"):
        assert s[key] >= 0
    # the paths are relative to the directory the run started in
    assert os.path.isfile(tmp_path / s["world_model_path"]) and os.path.isfile(tmp_path / s["agent_path"])
    assert "[dqn_imagined] iter 2/2 step 256 imagined_return" in proc.stdout
    # a different --seed on the command line does not matter: the run's own seed travels in the checkpoint
    again = _run(tmp_path, "--eval-checkpoint", s["agent_path"], "--seed", "7")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().count("\n") == 0
    assert f"real return {s['real_return_mean']:.1f} +/- {s['real_return_std']:.1f} over 3 episodes" in again.stdout
    monkeypatch.chdir(tmp_path)
    result = dqn.evaluate_checkpoint(s["agent_path"])
    assert result["real_returns"] == s["real_returns"] and result["real_return_mean"] == s["real_return_mean"]


def test_box_action_env_points_to_ppo_or_sac_in_one_line(tmp_path):
    proc = _run(tmp_path, "--env-id", "Pendulum-v1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "ppo_imagined.py or sac_imagined.py" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--num-envs", "0"], "--num-envs"),
    (["--gamma", "1.5"], "--gamma"),
    (["--refit-passes", "0"], "--refit-passes"),
    (["--world-model-path", "missing.pt"], "--world-model-path"),
    (["--world-model", "none", "--world-model-path", "missing.pt"], "--world-model-path"),
    (["--eval-checkpoint", "missing.pt"], "--eval-checkpoint"),
])
def test_bad_flag_values_stop_with_one_line_and_no_run_dir(tmp_path, monkeypatch, flags, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *flags])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(SCRIPT, run_name="__main__")
    message = str(exc.value.code)
    assert needle in message and "\n" not in message
    assert not (tmp_path / "runs").exists()


def test_a_missing_world_model_file_stops_with_one_line_and_no_run_dir(tmp_path):
    proc = _run(tmp_path, "--world-model", "nosuchfile.py:X")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --world-model:")
    assert "nosuchfile.py" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_flag_is_rejected_by_the_parser(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--no-such-flag", "3"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exc.value.code != 0 and not (tmp_path / "runs").exists()
