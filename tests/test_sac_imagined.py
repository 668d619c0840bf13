"""Tests for sac_imagined.py: the soft Q target on a crafted batch, branched rollouts (real start states, horizon,
termination), what reaches the real env, the real replay buffer and the world model's data in runs of the script,
tiny end-to-end runs with and without a world model (batched, and in --vector-env sync workers), --eval-checkpoint
reproducing a run, and bad input that stops with one line and leaves no run dir."""
import json
import os
import runpy
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import ensemble
import ensemble_imagination
import real_env
import sac_imagined as sac

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sac_imagined.py")
TINY = ["--total-timesteps", "500", "--initial-real-steps", "250", "--utd-ratio", "1", "--batch-size", "32",
        "--hidden-size", "32", "--rollout-batch-size", "64", "--imagined-horizon", "2", "--refit-every", "100",
        "--model-rollout-every", "100", "--eval-every", "125", "--eval-episodes", "2"]


def _run(tmp_path, monkeypatch, flags):
    """Runs the script's __main__ in this process; returns its globals and the run's summary."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *flags])
    scope = runpy.run_path(SCRIPT, run_name="__main__")
    (summary,) = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/summary.json")]
    return scope, summary


def test_soft_q_target_bootstraps_truncation_but_not_termination():
    # row 0: the last step before the time limit / rollout horizon (stored as terminated=0); row 1: a termination
    rewards, terminated = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    next_q1, next_q2, next_log_prob = torch.tensor([5.0, 5.0]), torch.tensor([3.0, 3.0]), torch.tensor([-1.0, -1.0])
    y = sac.soft_q_target(rewards, terminated, next_q1, next_q2, next_log_prob, alpha=0.5, gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.9 * (3.0 + 0.5), 1.0]))


@pytest.fixture(scope="module")
def pendulum_net():
    torch.set_num_threads(1)  # as the scripts do: the machine's cores are shared
    data = real_env.collect_transitions("Pendulum-v1", 300, seed=0)
    net, _ = ensemble.fit_world_model(data, seed=0, max_updates=30)
    return net, data


def test_twin_critics_are_two_mlps_in_one_module():
    """SoftQNetworks' batched matmuls give what two nn.Linear MLPs with the same weights give, and its init is
    nn.Linear's range."""
    torch.manual_seed(0)
    qf = sac.SoftQNetworks(5, 2, hidden_size=16)
    x, a = torch.randn(7, 5), torch.randn(7, 2)
    out = qf(x, a)
    assert out.shape == (2, 7)
    for q in range(2):
        layers = []
        for w, b in zip(qf.weights, qf.biases):
            linear = torch.nn.Linear(w.shape[1], w.shape[2])
            linear.weight.data, linear.bias.data = w[q].T.clone(), b[q, 0].clone()
            layers += [linear, torch.nn.ReLU()]
        reference = torch.nn.Sequential(*layers[:-1])(torch.cat([x, a], 1)).view(-1)
        torch.testing.assert_close(out[q], reference)
    assert all(w.abs().max() <= 1 / np.sqrt(w.shape[1]) for w in qf.weights)
    assert not torch.equal(qf.weights[0][0], qf.weights[0][1])  # two critics, not one twice


def test_actor_log_prob_is_the_squashed_gaussians():
    """get_action's hand-written log-probability: Normal.log_prob's value and gradients, tanh-corrected."""
    torch.manual_seed(0)
    actor = sac.Actor(3, gym.spaces.Box(-2.0, 2.0, (2,), np.float32), hidden_size=8)
    x = torch.randn(5, 3)
    torch.manual_seed(1)
    action, log_prob, _ = actor.get_action(x)
    grads = torch.autograd.grad(log_prob.sum() + action.sum(), list(actor.parameters()))
    torch.manual_seed(1)
    mean, log_std = actor(x)
    normal = torch.distributions.Normal(mean, log_std.exp())
    x_t = mean + log_std.exp() * torch.randn_like(mean)
    y_t = torch.tanh(x_t)
    expected = (normal.log_prob(x_t) - torch.log(actor.action_scale * (1 - y_t.pow(2)) + 1e-6)).sum(1)
    expected_action = y_t * actor.action_scale + actor.action_bias
    torch.testing.assert_close(log_prob, expected)
    torch.testing.assert_close(action, expected_action)
    expected_grads = torch.autograd.grad(expected.sum() + expected_action.sum(), list(actor.parameters()))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_branched_rollouts_start_from_real_states_and_stop_at_the_horizon(pendulum_net):
    net, data = pendulum_net
    starts = data.obs[[3, 50, 120, 7, 260]]
    envs = ensemble_imagination.make_imagined_vector_env(net, len(starts), horizon=3, start="start")
    out_of_bounds = lambda obs: np.full((len(obs), 1), 3.0, np.float32)  # Pendulum's bounds are [-2, 2]
    out = sac.branched_rollouts(envs, out_of_bounds, starts, seed=0, horizon=3)
    assert len(out["obs"]) == 3 * len(starts)  # no termination here: every row runs exactly its horizon
    obs, next_obs = out["obs"].reshape(3, 5, -1), out["next_obs"].reshape(3, 5, -1)
    np.testing.assert_array_equal(obs[0], starts)  # the real states, not the model's start pool
    np.testing.assert_array_equal(obs[1:], next_obs[:-1])  # each row continues its own rollout
    assert not out["terminated"].any()  # the horizon is a truncation: bootstrapped
    assert (out["actions"] == 3.0).all()  # the learner keeps the sampled action; the env saw it clipped
    # a rollout that terminates (here: every step halts) stops there; the NEXT_STEP reset transition is not returned
    halting = ensemble_imagination.make_imagined_vector_env(net, len(starts), horizon=3, start="start", halt=1e-9)
    out = sac.branched_rollouts(halting, out_of_bounds, starts, seed=0, horizon=3)
    assert len(out["obs"]) == len(starts) and out["terminated"].all()
    np.testing.assert_array_equal(out["obs"], starts)
    # without start states (the sync/async workers) the rows start where the envs start them
    out = sac.branched_rollouts(envs, out_of_bounds, None, seed=0, horizon=3)
    assert len(out["obs"]) == 3 * len(starts) and np.isin(out["obs"][:5], net.start_obs.numpy()).all()


def test_sample_noise_draws_from_the_members_gaussians(pendulum_net):
    net, data = pendulum_net
    starts = data.obs[:64]
    policy = lambda obs: np.full((len(obs), 1), 0.5, np.float32)

    def rollout(**noise):
        envs = ensemble_imagination.make_imagined_vector_env(net, len(starts), horizon=1, start="start", **noise)
        return sac.branched_rollouts(envs, policy, starts, seed=0, horizon=1)

    mean, noisy = rollout(), rollout(**sac.noise_setting(sac.Args(sample_noise=True)))
    assert sac.noise_setting(sac.Args()) == {}
    assert not np.allclose(mean["next_obs"], noisy["next_obs"]) and not np.allclose(mean["rewards"], noisy["rewards"])
    # the noise is the members' own spread: small beside the state's scale, and reproducible from the seed
    assert np.abs(noisy["next_obs"] - mean["next_obs"]).mean() < 0.5
    again = rollout(sample_noise=True)
    np.testing.assert_array_equal(noisy["next_obs"], again["next_obs"])


def test_imagined_run_end_to_end_and_eval_checkpoint(tmp_path, monkeypatch, capsys):
    scope, summary = _run(tmp_path, monkeypatch, TINY)
    assert summary["algo"] == "sac_imagined" and summary["world_model"] == "ensemble"
    assert summary["status"] == "finished"
    assert summary["real_env_steps"] == 500 and summary["imagined_steps"] > 0
    assert summary["refits"] == 2 and summary["rollout_batches"] == 3 and summary["sac_updates"] == 250
    assert summary["rollout_seconds"] > 0 and summary["world_model_seconds"] > 0
    assert summary["imagined_minus_real"] is not None and len(summary["eval_history"]) == 1
    assert os.path.isfile(summary["world_model_path"]) and os.path.isfile(summary["agent_path"])
    # the real replay buffer: Pendulum only truncates, and a truncation is stored as not terminated, with its true
    # final observation (the next row starts the next episode from a reset observation)
    rb, log = scope["rb"], scope["log"]
    truncated, episode_ids = np.asarray(log["truncated"]), np.asarray(log["episode_ids"])
    assert rb.size == 500 and len(truncated) == 500 and truncated.sum() >= 2 and not rb.terminated[:500].any()
    new_episode = episode_ids[1:] != episode_ids[:-1]  # also where the world model's random data was cut off
    assert new_episode[truncated[:-1]].all()
    for row in np.flatnonzero(new_episode):
        assert not np.allclose(rb.next_obs[row], rb.obs[row + 1])
    np.testing.assert_array_equal(rb.next_obs[:499][~new_episode], rb.obs[1:500][~new_episode])
    # the ensemble sees the raw observations: the model's data and SAC's replay hold the same transitions
    np.testing.assert_array_equal(np.asarray(log["obs"]), rb.obs[:500])
    np.testing.assert_array_equal(np.asarray(log["next_obs"]), rb.next_obs[:500])
    assert len(log["start_obs"]) == len(np.unique(episode_ids))
    # the saved model carries every real transition, those after its last refit too
    saved = ensemble.load_world_model(summary["world_model_path"])
    assert len(saved.buffer) == 500 and saved.extra["real_env_steps"] == 500
    np.testing.assert_array_equal(saved.buffer.obs, rb.obs[:500])
    # --eval-checkpoint replays the run's own final evaluation
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--eval-checkpoint", summary["agent_path"]])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exit_info.value.code == 0
    assert f"real return {summary['real_return_mean']:.1f} " in capsys.readouterr().out


def test_sync_workers_load_the_saved_model_and_are_rebuilt_after_each_refit(tmp_path, monkeypatch):
    """--vector-env sync: the make_env thunks load the run's world_model.pt; after a refit it is saved again and new
    workers load it."""
    loaded = []
    original_load = ensemble.EnsembleModel.load

    def counting_load(self, path):
        loaded.append(path)
        return original_load(self, path)

    monkeypatch.setattr(ensemble.EnsembleModel, "load", counting_load)
    _, summary = _run(tmp_path, monkeypatch, [*TINY, "--vector-env", "sync", "--rollout-batch-size", "4"])
    assert summary["status"] == "finished" and summary["refits"] == 2
    assert summary["imagined_steps"] > 0 and summary["rollout_batches"] == 3
    assert len(loaded) >= 3 * 4  # 4 workers built after the first fit and after each of the 2 refits
    assert {os.path.basename(p) for p in loaded} == {"world_model.pt"}


@pytest.mark.parametrize("eval_every, pictures", [("125", 2), ("0", 1)])
def test_open_loop_picture_before_the_first_refit_after_each_evaluation(tmp_path, monkeypatch, eval_every, pictures):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # refits at 350 and 450 real steps; an evaluation at 375 (--eval-every 125) or none before the final one
    scope, summary = _run(tmp_path, monkeypatch, [*TINY, "--eval-every", eval_every])
    assert summary["refits"] == 2
    # no halt rule: the ensemble's branches skip the members' disagreement (each row runs its own member only)
    assert scope["imagined_envs"].transition_fn.__self__.disagreement is False
    events = EventAccumulator(summary["run_dir"], size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("world_model/open_loop_before_refit")] == [350, 450][:pictures]


class _ProbeEnv(gym.Wrapper):
    """Pendulum that records every action it receives."""

    received = []

    def step(self, action):
        _ProbeEnv.received.append(np.array(action, copy=True))
        return super().step(action)


def test_model_free_run_never_sends_an_action_outside_the_bounds(tmp_path, monkeypatch):
    gym.register("SacProbePendulum-v0", entry_point=lambda: _ProbeEnv(gym.make("Pendulum-v1")))
    _ProbeEnv.received.clear()
    original_sample = gym.spaces.Box.sample
    monkeypatch.setattr(gym.spaces.Box, "sample", lambda self, *a, **k: 5.0 * original_sample(self, *a, **k))
    scope, summary = _run(tmp_path, monkeypatch, [
        *TINY, "--env-id", "SacProbePendulum-v0", "--world-model", "none", "--total-timesteps", "300",
        "--target-entropy", "-0.5"])
    assert summary["world_model"] == "none" and "_model_free" in summary["run_dir"]
    assert scope["target_entropy"] == -0.5  # --target-entropy replaces -act_dim (-1 on Pendulum)
    assert summary["imagined_steps"] == 0 and summary["imagined_minus_real"] is None
    assert summary["real_env_steps"] == 300 and summary["world_model_path"] is None
    received = np.concatenate(_ProbeEnv.received)
    assert len(received) >= 300 and np.abs(received).max() <= 2.0
    assert np.abs(scope["rb"].actions[:250]).max() > 2.0  # the random actions were out of bounds, stored as sampled


@pytest.mark.parametrize("flags, expected", [
    (["--env-id", "CartPole-v1"], "ppo_imagined.py or dqn_imagined.py"),
    (["--world-model-path", "no_such_world_model.pt"], "--world-model-path"),
    (["--world-model", "learned"], "--world-model"),
    (["--refit-passes", "0"], "--refit-passes"),
    (["--refit-every", "0"], "--refit-every"),
    (["--target-entropy", "-1", "--no-autotune"], "--target-entropy"),
    (["--world-model", "none", "--sample-noise"], "--sample-noise"),
    (["--world-model", "rssm", "--sample-noise"], "--sample-noise"),
])
def test_bad_input_one_line_and_no_run_dir(tmp_path, flags, expected):
    result = subprocess.run([sys.executable, SCRIPT, *flags], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()
