"""Tests for ppo_imagined.py: GAE with NEXT_STEP autoreset on crafted trajectories, tiny end-to-end runs (CartPole in
imagination and model-free, Pendulum with Box actions), --eval-checkpoint reproducing a run, clipping of Box actions
where they enter a real env, and bad input (one line naming the flag, no run dir).

The script runs in-process (runpy with its argv), so envs registered here are visible to it and no interpreter start
is paid per run."""
import json
import os
import runpy
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPT = os.path.join(ROOT, "ppo_imagined.py")

import ppo_imagined  # noqa: E402
from ppo_imagined import gae  # noqa: E402
from unsupported_envs import DICT_OBS_ID, MULTI_DISCRETE_ID  # noqa: E402

GAMMA = 0.9


# ---------------------------------------------------------------- gae() on crafted trajectories (one env: a column)
def col(*xs):
    return torch.tensor(xs, dtype=torch.float32)[:, None]


def test_termination_is_not_bootstrapped():
    # 0 -> 1 -> terminated; the value after the last step (a reset obs in a real rollout) must not leak in
    rewards, values = col(1.0, 1.0), col(5.0, 3.0)
    adv, ret = gae(rewards, values, bootstrap=col(0.0, 0.0), dones=col(0.0, 1.0), valid=col(1.0, 1.0),
                   next_value=torch.tensor([1000.0]), gamma=GAMMA, gae_lambda=1.0)
    assert ret[:, 0].tolist() == pytest.approx([1.0 + GAMMA * 1.0, 1.0])  # lambda=1: the Monte-Carlo return
    assert adv[0, 0].item() == pytest.approx(1.9 - 5.0)


def test_truncation_is_bootstrapped_with_the_final_obs_value():
    # truncated at step 1 with V(final obs) = 7; the next value (the reset step's obs) must not be used
    rewards, values = col(1.0, 1.0), col(5.0, 3.0)
    _, ret = gae(rewards, values, bootstrap=col(0.0, 7.0), dones=col(0.0, 1.0), valid=col(1.0, 1.0),
                 next_value=torch.tensor([1000.0]), gamma=GAMMA, gae_lambda=1.0)
    assert ret[1, 0].item() == pytest.approx(1.0 + GAMMA * 7.0)
    assert ret[0, 0].item() == pytest.approx(1.0 + GAMMA * (1.0 + GAMMA * 7.0))


def test_reset_step_gets_no_advantage_and_nothing_crosses_the_episode_boundary():
    # step 0 truncated (V(final) = 4), step 1 the NEXT_STEP reset step (invalid), step 2 the new episode's first
    rewards, values = col(1.0, 0.0, 1.0), col(2.0, 4.0, 9.0)
    adv, ret = gae(rewards, values, bootstrap=col(4.0, 0.0, 0.0), dones=col(1.0, 0.0, 0.0),
                   valid=col(1.0, 0.0, 1.0), next_value=torch.tensor([6.0]), gamma=GAMMA, gae_lambda=0.95)
    assert adv[1, 0].item() == 0.0 and ret[1, 0].item() == pytest.approx(4.0)  # no learning signal
    assert adv[0, 0].item() == pytest.approx(1.0 + GAMMA * 4.0 - 2.0)
    assert adv[2, 0].item() == pytest.approx(1.0 + GAMMA * 6.0 - 9.0)  # bootstrapped from the next value


def test_lambda_zero_is_the_td_error_and_rows_are_independent():
    rewards, values = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    adv, _ = gae(rewards, values, torch.zeros(2, 2), dones, torch.ones(2, 2), torch.tensor([5.0, 6.0]), GAMMA, 0.0)
    expected = torch.tensor([[1.0 + GAMMA * 2.0 - 1.0, 2.0 + GAMMA * 2.0 - 1.0], [3.0 - 2.0, 4.0 + GAMMA * 6.0 - 2.0]])
    torch.testing.assert_close(adv, expected)


def test_gaussian_agent_trains_on_the_sampled_unclipped_action():
    space = gym.spaces.Box(-0.1, 0.1, (2,), np.float32)
    agent = ppo_imagined.Agent(3, space, norm_obs=True)
    torch.manual_seed(0)
    action, logprob, entropy, value = agent.get_action_and_value(torch.zeros(64, 3))
    assert action.shape == (64, 2) and logprob.shape == (64,) and value.shape == (64, 1)
    assert (action.abs() > 0.1).any()  # std 1 >> the bounds: the learner keeps what it sampled
    _, again, _, _ = agent.get_action_and_value(torch.zeros(64, 3), action)
    torch.testing.assert_close(again, logprob)
    assert agent.act(torch.zeros(5, 3)).shape == (5, 2)  # the deterministic policy: the mean action


# ---------------------------------------------------------------- running the script
TINY = ["--num-envs", "4", "--num-steps", "16", "--total-timesteps", "192", "--num-minibatches", "2",
        "--update-epochs", "1", "--eval-every", "1", "--eval-episodes", "2", "--real-iterations", "1",
        "--real-steps-per-iteration", "40", "--initial-real-steps", "200", "--imagined-horizon", "20",
        "--no-early-stop"]


def run(tmp_path, monkeypatch, *argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    runpy.run_path(SCRIPT, run_name="__main__")


def summary_of(tmp_path):
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    with open(run_dir / "summary.json") as f:
        return run_dir, json.load(f)


SUMMARY_KEYS = ("algo", "env_id", "seed", "status", "world_model", "world_model_path", "real_return_mean", "real_return_std",
                "real_returns", "eval_episodes", "real_env_steps", "eval_env_steps", "imagined_steps",
                "imagined_return_mean", "imagined_minus_real", "real_return_scale", "wall_seconds",
                "world_model_seconds", "real_collect_seconds", "eval_seconds", "train_seconds", "target_return",
                "real_env_steps_to_target", "agent_path", "run_dir", "eval_history")


def test_cartpole_in_imagination_and_its_checkpoint_replays_the_final_evaluation(tmp_path, monkeypatch, capsys):
    run(tmp_path, monkeypatch, *TINY)
    out = capsys.readouterr().out
    assert "[ppo] iter 1/3 step 64 imagined_return" in out and " gap " in out and "nan" not in out
    run_dir, summary = summary_of(tmp_path)
    assert all(k in summary for k in SUMMARY_KEYS)
    assert summary["algo"] == "ppo_imagined" and summary["world_model"] == "ensemble"
    assert summary["status"] == "finished"
    assert summary["real_env_steps"] == 200 + 40  # the model's random data + one Dyna round
    assert 0 < summary["imagined_steps"] <= 192 and summary["eval_env_steps"] > 0
    assert summary["imagined_minus_real"] is not None and len(summary["eval_history"]) == 3
    assert os.path.abspath(summary["world_model_path"]) == str(run_dir / "world_model.pt")
    assert os.path.isfile(run_dir / "world_model.pt")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))

    replay = ppo_imagined.evaluate_checkpoint(str(run_dir / "agent.pt"))
    assert replay["real_returns"] == summary["real_returns"]
    assert replay["real_return_mean"] == summary["real_return_mean"]


def test_cartpole_model_free(tmp_path, monkeypatch, capsys):
    run(tmp_path, monkeypatch, *TINY, "--world-model", "none")
    out = capsys.readouterr().out
    assert "train_return" in out and " gap " not in out and "nan" not in out
    run_dir, summary = summary_of(tmp_path)
    assert "_model_free__" in run_dir.name and summary["world_model_path"] is None
    assert summary["imagined_steps"] == 0 and summary["imagined_minus_real"] is None
    # 3 iterations x 4 envs x 16 steps, less the NEXT_STEP reset steps (no transitions, not counted)
    assert 150 < summary["real_env_steps"] < 192


def test_pendulum_box_actions_and_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, monkeypatch, *TINY, "--env-id", "Pendulum-v1")
    run_dir, summary = summary_of(tmp_path)
    assert summary["env_id"] == "Pendulum-v1" and summary["target_return"] is None
    assert np.isfinite(summary["real_return_mean"]) and summary["real_env_steps"] == 240
    saved = torch.load(run_dir / "agent.pt", weights_only=True)
    assert saved["args"]["norm_obs"] is True and saved["args"]["learning_rate"] == 3e-4  # the Box defaults
    assert "obs_rms.mean" in saved["state_dicts"]["agent"]  # the normalisation travels with the agent
    assert ppo_imagined.evaluate_checkpoint(str(run_dir / "agent.pt"))["real_returns"] == summary["real_returns"]


# ---------------------------------------------------------------- Box actions are clipped where they enter a real env
SEEN_ACTIONS = []


class AssertInBounds(gym.Wrapper):
    def step(self, action):
        assert self.action_space.contains(np.asarray(action, dtype=np.float32)), action
        SEEN_ACTIONS.append(np.abs(action).max())
        return self.env.step(action)


def make_narrow_pendulum():
    """Pendulum with actions in [-0.05, 0.05]: nearly every action a fresh Gaussian policy samples is outside."""
    return AssertInBounds(gym.wrappers.RescaleAction(gym.make("Pendulum-v1").unwrapped, np.float32(-0.05), np.float32(0.05)))


gym.register("NarrowPendulum-v0", entry_point=make_narrow_pendulum, max_episode_steps=50)


@pytest.mark.parametrize("world_model", ["ensemble", "none"])
def test_box_actions_outside_the_bounds_never_reach_the_real_env(tmp_path, monkeypatch, world_model):
    SEEN_ACTIONS.clear()
    run(tmp_path, monkeypatch, *TINY, "--env-id", "NarrowPendulum-v0", "--world-model", world_model)
    assert max(SEEN_ACTIONS) == pytest.approx(0.05)  # sampled actions were outside and got clipped


# ---------------------------------------------------------------- bad input: one line, the flag, no run dir


@pytest.mark.parametrize("argv,flag", [
    (["--env-id", DICT_OBS_ID], "--env-id"),
    (["--env-id", MULTI_DISCRETE_ID], "--env-id"),
    (["--world-model-path", "missing/world_model.pt"], "--world-model-path"),
    (["--num-envs", "0"], "--num-envs"),
    (["--gamma", "1.5"], "--gamma"),
    (["--refit-passes", "0"], "--refit-passes"),
    (["--cuda-min-envs", "-1"], "--cuda-min-envs"),
    (["--world-model", "none", "--world-model-path", "x.pt"], "--world-model-path"),
    (["--world-model", "learned"], "--world-model"),
    (["--world-model", "missing/model.py:Model"], "--world-model"),
    (["--world-model", "tests/toy_world_model.py:NoSuchClass"], "--world-model"),
    (["--world-model", "tests/toy_world_model.py:NOT_CALLABLE"], "--world-model"),
    (["--world-model", "no_such_package.models:Model"], "--world-model"),
    (["--world-model", "examples/cartpole_physics.py:CartPolePhysics", "--env-id", "Acrobot-v1"], "--env-id"),
    (["--world-model", "examples/cartpole_physics.py:CartPolePhysics", "--vector-env", "batched",
      "--env-id", "CartPole-v1", "--num-envs", "0"], "--num-envs"),
])
def test_bad_input_gives_one_line_and_no_run_dir(tmp_path, monkeypatch, argv, flag):
    argv = [os.path.join(ROOT, a) if a.startswith(("tests/", "examples/")) else a for a in argv]
    with pytest.raises(SystemExit) as e:
        run(tmp_path, monkeypatch, *argv)
    message = str(e.value.code)
    assert message.startswith(f"error: {flag}:") and "\n" not in message
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")


def test_bad_checkpoint_gives_one_line(tmp_path, monkeypatch):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"^error: --eval-checkpoint:"):
        run(tmp_path, monkeypatch, "--eval-checkpoint", str(tmp_path / "junk.pt"))


def test_box_actions_imagine_short_bootstrapped_episodes_and_discrete_ones_the_time_limit():
    # Box: short imagined episodes against compounding model error (InvertedPendulum); Discrete: unchanged
    assert ppo_imagined.SPACE_DEFAULTS["Discrete"]["imagined_horizon"] is None
    assert 1 <= ppo_imagined.SPACE_DEFAULTS["Box"]["imagined_horizon"] <= 100


def test_a_model_that_lacks_part_of_the_interface_is_named_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, monkeypatch, "--world-model", os.path.join(ROOT, "tests/toy_world_model.py:Incomplete"))
    message = str(e.value.code)
    assert message.startswith("error: --world-model:") and "\n" not in message
    assert "Incomplete lacks action_space, imagined_env, real_env, fit, save, load" in message


# ---------------------------------------------------------------- any world model: given, unbatched, the tutorial's
def test_a_given_simulator_trains_without_real_transitions(tmp_path, monkeypatch):
    """CartPole's own equations behind the interface (examples/cartpole_physics.py): nothing to learn, so no real
    transition is collected; the policy is judged in the real CartPole."""
    run(tmp_path, monkeypatch, *TINY, "--world-model", os.path.join(ROOT, "examples/cartpole_physics.py:CartPolePhysics"))
    run_dir, summary = summary_of(tmp_path)
    assert summary["real_env_steps"] == 0 and summary["imagined_steps"] > 0 and summary["eval_env_steps"] > 0
    assert summary["world_model_path"] is None and not (run_dir / "world_model.pt").exists()
    assert ppo_imagined.evaluate_checkpoint(str(run_dir / "agent.pt"))["real_returns"] == summary["real_returns"]


@pytest.mark.parametrize("vector_env", ["auto", "sync"])
def test_the_tutorials_toy_model_through_the_make_env_thunks(tmp_path, monkeypatch, vector_env):
    """The TorchWM tutorial's toy model with its own single-env adapters (no batched env): `auto` and `sync` step
    the script's make_env thunks in a SyncVectorEnv, each thunk building its own model."""
    spec = os.path.join(ROOT, "tests/toy_world_model.py:ToyWorldModel")
    run(tmp_path, monkeypatch, *TINY, "--world-model", spec, "--env-id", "ToyReach-v0", "--vector-env", vector_env)
    _, summary = summary_of(tmp_path)
    assert summary["real_env_steps"] == 0 and 0 < summary["imagined_steps"] <= 192
    assert np.isfinite(summary["real_return_mean"]) and summary["status"] == "finished"


def test_the_ensemble_in_sync_workers_gives_the_batched_trajectories(tmp_path):
    """--vector-env sync: each make_env thunk loads its own copy of the saved ensemble; its imagined rows follow the
    batched env's exactly (per-row seeds), so the two paths train the same agent."""
    import ensemble

    model = ensemble.EnsembleModel("CartPole-v1")
    model.fit(ppo_imagined.real_env.collect_transitions("CartPole-v1", 300, seed=0), seed=0)
    path = model.save(str(tmp_path / "world_model.pt"))
    args = ppo_imagined.Args(world_model="ensemble", imagined_start="buffer", halt_threshold=2.0)
    sync = gym.vector.SyncVectorEnv([ppo_imagined.make_env(args, path, 5 + i, 30) for i in range(3)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    batched = model.imagined_vector_env(3, horizon=30, start="buffer", halt=2.0)
    obs_s, _ = sync.reset(seed=5)
    obs_b, _ = batched.reset(seed=5)
    np.testing.assert_allclose(obs_s, obs_b)
    for t in range(40):
        action = np.array([t % 2, 1, 0])
        step_s, step_b = sync.step(action), batched.step(action)
        for a, b in zip(step_s[:4], step_b[:4]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_ctrl_c_keeps_the_run(tmp_path):
    """A real SIGINT to a running script: the run dir keeps its events, the world model, the agent and a summary
    that says "interrupted" with the figures so far; one line says where, no traceback, exit code 130."""
    import signal
    import subprocess
    import time

    # the child gets SIGINT's default disposition, as from a terminal: a child of a process that ignores SIGINT (a
    # pytest-xdist worker can) inherits SIG_IGN, and Python then never raises KeyboardInterrupt (CI saw that once)
    proc = subprocess.Popen([sys.executable, "-u", SCRIPT, "--total-timesteps", "10000000", "--initial-real-steps",
                             "300", "--eval-every", "0"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:  # wait until PPO runs (the world model is fitted by then)
        lines.append(line)
        if "[ppo] iter 2/" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    (run_dir,) = list((tmp_path / "runs").iterdir())
    names = os.listdir(run_dir)
    assert {"world_model.pt", "agent.pt", "summary.json"} <= set(names)
    assert any(n.startswith("events.out.tfevents") for n in names)
    with open(run_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "interrupted" and summary["real_env_steps"] == 300 and summary["imagined_steps"] > 0
    assert f"interrupted: what the run wrote is kept in runs/{run_dir.name}" in out
    replay = ppo_imagined.evaluate_checkpoint(str(run_dir / "agent.pt"))  # an unfinished run's agent replays too
    assert len(replay["real_returns"]) == 10
