"""Tests for svg_imagined.py: the soft value expansion on a crafted rollout (the horizon bootstraps, a termination
ends the sum), the ensemble's differentiable step (the same figures as `predict`, gradients reaching the action),
training rollouts' masks after a termination, a tiny end-to-end run with --eval-checkpoint reproducing it, and bad
input that stops with one line and leaves no run dir."""
import json
import os
import re
import runpy
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ensemble
import ensemble_net
import real_env
import sac_imagined as sac
import svg_imagined as svg

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "svg_imagined.py")
TINY = ["--total-timesteps", "300", "--initial-real-steps", "250", "--batch-size", "16", "--hidden-size", "16",
        "--rollout-batch-size", "8", "--imagined-horizon", "3", "--model-rollout-every", "20",
        "--training-horizon", "2", "--refit-every", "40", "--eval-every", "25", "--eval-episodes", "1"]


def test_soft_value_expansion_bootstraps_the_horizon_and_stops_at_a_termination():
    gamma, alpha = 0.5, 0.1
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # (H=2, B=2)
    log_probs = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-3.0, -3.0]])
    alive = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # row 1 terminates on its second step
    terminal_q = torch.tensor([10.0, 10.0])
    v0, targets = svg.soft_value_expansion(rewards, log_probs, alive, terminal_q, alpha, gamma)
    v2 = 10.0 + 0.3  # Q(s_2, a_2) - alpha log pi_2
    q1 = 2.0 + gamma * v2
    v1 = q1 + 0.2
    q0 = 1.0 + gamma * v1
    torch.testing.assert_close(targets[:, 0], torch.tensor([q0, q1]))
    torch.testing.assert_close(v0[0], torch.tensor(q0 + 0.1))
    # the terminated row: its last reward counts, nothing after it (no bootstrap, no entropy bonus)
    torch.testing.assert_close(targets[:, 1], torch.tensor([1.0 + gamma * (2.0 + 0.2), 2.0]))
    torch.testing.assert_close(v0[1], torch.tensor(1.0 + gamma * (2.0 + 0.2) + 0.1))


@pytest.fixture(scope="module")
def pendulum_model():
    torch.set_num_threads(1)
    model = ensemble.EnsembleModel("Pendulum-v1", seed=0)
    model.fit(real_env.collect_transitions("Pendulum-v1", 300, seed=0), seed=0, refit_passes=2)
    return model


@pytest.mark.parametrize("rows", [8, 300])  # below and above the row count where predict groups rows by member
def test_differentiable_step_is_predict_with_a_graph(pendulum_model, rows):
    net = pendulum_model.net
    data = pendulum_model.data
    obs = torch.as_tensor(data.obs[:rows], dtype=torch.float32).requires_grad_(True)
    action = torch.as_tensor(data.actions[:rows], dtype=torch.float32).requires_grad_(True)
    members = torch.arange(rows) % net.ensemble_size
    next_obs, reward, logit = net.predict_with_grad(obs, action, members)
    expected = net.predict(obs.detach(), action.detach(), members=members)
    for got, want in zip((next_obs, reward, logit), expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    assert next_obs.requires_grad and reward.requires_grad and not logit.requires_grad
    grad_action, grad_obs = torch.autograd.grad(reward.sum() + next_obs.sum(), (action, obs))
    assert grad_action.abs().sum() > 0 and grad_obs.abs().sum() > 0
    # blocks of fewer rows run all members and gather (the GPU's path): the same figures and gradients
    blocks = [net.predict_with_grad(obs[i:i + 100], action[i:i + 100], members[i:i + 100]) for i in range(0, rows, 100)]
    for got, want in zip(map(torch.cat, zip(*blocks)), (next_obs, reward, logit)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    blocked_obs, blocked_reward = (torch.cat(t) for t in list(zip(*blocks))[:2])
    for got, want in zip(torch.autograd.grad(blocked_reward.sum() + blocked_obs.sum(), (action, obs)),
                         (grad_action, grad_obs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the interface's step draws the members itself and returns a bool termination
    torch.manual_seed(0)
    stepped = pendulum_model.differentiable_step(obs.detach(), action.detach())
    assert stepped[0].shape == obs.shape and stepped[2].dtype == torch.bool


def test_sampled_differentiable_step_is_reparameterised(pendulum_model):
    net = pendulum_model.net
    obs = torch.as_tensor(pendulum_model.data.obs[:64], dtype=torch.float32)
    action = torch.as_tensor(pendulum_model.data.actions[:64], dtype=torch.float32).requires_grad_(True)
    members = torch.arange(64) % net.ensemble_size
    mean_obs, mean_reward, _ = net.predict_with_grad(obs, action, members)
    torch.manual_seed(0)
    next_obs, reward, _ = net.predict_with_grad(obs, action, members, sample=True)
    torch.manual_seed(0)
    again = net.predict_with_grad(obs, action, members, sample=True)[0]
    torch.testing.assert_close(next_obs, again)  # the global generator's noise: a seeded run repeats
    assert not torch.allclose(next_obs, mean_obs) and not torch.allclose(reward, mean_reward)
    (grad,) = torch.autograd.grad(reward.sum(), action)  # the noise is reparameterised: gradients still flow
    assert grad.abs().sum() > 0
    # the spread of the samples around the mean is the member's std: about one std in its normalised units
    z = ((next_obs - mean_obs) / net.out_std[: net.obs_dim]).detach()
    assert 0.0 < z.std().item() < 10.0


def test_homoscedastic_noise_is_one_level_per_member_and_output(tmp_path):
    torch.set_num_threads(1)
    model = ensemble.EnsembleModel("Pendulum-v1", seed=0, ensemble_size=3, hidden_size=32, homoscedastic=True)
    model.fit(real_env.collect_transitions("Pendulum-v1", 300, seed=0), seed=0, refit_passes=2)
    net = model.net
    assert net.head.weight.shape[-1] == net.out_dim  # the head gives means only
    obs = torch.as_tensor(model.data.obs[:64], dtype=torch.float32)
    action = torch.as_tensor(model.data.actions[:64], dtype=torch.float32).requires_grad_(True)
    # the same log-variance on every row of a member, learned by the fit (it starts at 0)
    _, logvar = net(net.model_input(obs, action.detach()))
    assert logvar.shape == (3, 64, net.out_dim) and torch.equal(logvar, logvar[:, :1].expand_as(logvar))
    assert not torch.equal(net.noise_log_std, torch.zeros_like(net.noise_log_std))
    # a sample's gradient is its mean's: the noise does not depend on the action (row 0 of member 0's noise is
    # the same whatever the action)
    members = torch.zeros(64, dtype=torch.long)
    mean_obs = net.predict_with_grad(obs, action, members)[0]
    torch.manual_seed(0)
    sampled = net.predict_with_grad(obs, action, members, sample=True)[0]
    grad_mean, = torch.autograd.grad(mean_obs.sum(), action)
    grad_sampled, = torch.autograd.grad(sampled.sum(), action)
    inside = ((sampled > net.obs_clip_low) & (sampled < net.obs_clip_high)).all(1)  # a clip cuts the gradient
    torch.testing.assert_close(grad_sampled[inside], grad_mean[inside])
    # the checkpoint keeps the noise model
    path = tmp_path / "wm.pt"
    model.save(path)
    loaded = ensemble.EnsembleModel("Pendulum-v1").load(path).net
    assert loaded.homoscedastic and torch.equal(loaded.noise_log_std, net.noise_log_std)


def test_layer_norm_and_dropout_regularise_the_fit_only(tmp_path):
    torch.set_num_threads(1)
    model = ensemble.EnsembleModel("Pendulum-v1", seed=0, ensemble_size=3, hidden_size=32, num_layers=3,
                                   homoscedastic=True, layer_norm=True, dropout=0.5)
    model.fit(real_env.collect_transitions("Pendulum-v1", 300, seed=0), seed=0, refit_passes=2)
    net = model.net
    assert net._drop_rates == [0.375, 0.25, 0.125, 0.0] and net._norm_eps == [None, 1.0, 0.1, 0.01]
    x = net.model_input(torch.as_tensor(model.data.obs[:64]), torch.as_tensor(model.data.actions[:64]))

    def by_hand(norm):  # the forward written out: layer norm on the input of every layer after the first
        h = x
        for j, layer in enumerate(net.hidden):
            h = h if j == 0 or not norm else F.layer_norm(h, h.shape[-1:], eps=net._norm_eps[j])
            h = F.silu(layer(h))
        return net.head(F.layer_norm(h, h.shape[-1:], eps=0.01) if norm else h)

    with torch.no_grad():
        mean, _ = net(x)  # the fit leaves the model in eval mode: no dropout, the same output every time
        torch.testing.assert_close(mean, by_hand(norm=True))
        assert not torch.allclose(mean, by_hand(norm=False))
        torch.testing.assert_close(net(x)[0], mean)
        # the per-member path (predict_with_grad, grouped predict) is the same network
        members = torch.arange(64) % 3
        obs, act = torch.as_tensor(model.data.obs[:64]), torch.as_tensor(model.data.actions[:64])
        torch.testing.assert_close(net.predict_with_grad(obs, act, members, termination=False)[0],
                                   net._decode(obs, mean[members, torch.arange(64)])[0])
        net.train()  # while fitting, dropout draws a new mask each pass
        assert not torch.equal(net(x)[0], net(x)[0])
        net.eval()
    path = tmp_path / "wm.pt"
    model.save(path)
    loaded = ensemble.EnsembleModel("Pendulum-v1").load(path).net
    assert loaded.config() == net.config() and torch.equal(loaded(x)[0], mean)
    for bad, field in ((dict(dropout=1.0), "dropout must be a number in [0, 1), got 1.0"),
                       (dict(layer_norm="yes"), "layer_norm must be True or False, got 'yes'")):
        with pytest.raises(ValueError, match=re.escape(field)):
            ensemble_net.EnsembleWorldModel(net.observation_space, net.action_space, **bad)


def test_renormalise_sets_a_refits_normalisation_from_all_the_data():
    torch.set_num_threads(1)
    first = real_env.collect_transitions("Pendulum-v1", 200, seed=0)
    both = real_env.collect_transitions("Pendulum-v1", 200, seed=0)  # extend() grows a buffer in place
    both.extend(real_env.collect_transitions("Pendulum-v1", 200, seed=1))
    sizes = dict(ensemble_size=2, hidden_size=16, num_layers=2)
    stats = ("in_mean", "in_std", "out_mean", "out_std", "obs_std")

    def fitted(renormalise):  # a first fit on `first`, then a warm refit on `both` (the scripts' path)
        model = ensemble.EnsembleModel("Pendulum-v1", renormalise=renormalise, **sizes)
        model.fit(first, seed=0, refit_passes=1)
        before = {k: getattr(model.net, k).clone() for k in stats}
        model.fit(both, num_new=200, seed=3, refit_passes=1)
        return before, model.net

    fresh, _ = ensemble.fit_world_model(both, seed=3, max_epochs=1, **sizes)  # a new fit: the same split's statistics
    before, kept = fitted(False)
    for k in stats:
        assert torch.equal(getattr(kept, k), before[k])
    before, renormalised = fitted(True)
    for k in stats:
        assert torch.equal(getattr(renormalised, k), getattr(fresh, k))
        assert not torch.equal(before[k], getattr(fresh, k))
    with pytest.raises(ValueError, match=re.escape("renormalise must be True or False, got 'yes'")):
        ensemble.fit_world_model(both, kept, renormalise="yes")


def _params(module):
    """All of a module's weights as one flat tensor, to compare two fits."""
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_bootstrap_weights_each_members_loss_by_fixed_per_transition_draws():
    torch.set_num_threads(1)
    buf = real_env.collect_transitions("Pendulum-v1", 400, seed=0)
    for data in (buf, real_env.collect_transitions("Pendulum-v1", 150, seed=1)):  # 2 episodes; 1 (pseudo-episodes)
        rest, held = data.split_episodes(0.5, seed=4)
        rows = data.split_rows(0.5, seed=4)
        assert np.array_equal(data.obs[rows], rest.obs) and np.array_equal(data.obs[~rows], held.obs)
    # a transition keeps its weights as the buffer grows; the weights differ by member
    w = ensemble.bootstrap_weights(12, 3, seed=5)
    assert w.shape == (12, 3) and np.array_equal(ensemble.bootstrap_weights(7, 3, seed=5), w[:7])
    assert not np.array_equal(w[:, 0], w[:, 1]) and (w > 0).all()

    sizes = dict(ensemble_size=2, hidden_size=16, num_layers=2, max_epochs=2)
    plain, _ = ensemble.fit_world_model(buf, seed=0, **sizes)
    boot, _ = ensemble.fit_world_model(buf, seed=0, bootstrap_seed=7, **sizes)
    again, _ = ensemble.fit_world_model(buf, seed=0, bootstrap_seed=7, **sizes)
    other, _ = ensemble.fit_world_model(buf, seed=0, bootstrap_seed=8, **sizes)
    assert torch.equal(_params(boot), _params(again))
    assert not torch.equal(_params(boot), _params(plain)) and not torch.equal(_params(boot), _params(other))
    model = ensemble.EnsembleModel("Pendulum-v1", seed=7, bootstrap=True, ensemble_size=2, hidden_size=16,
                                   num_layers=2)
    model.fit(buf, seed=0)  # the EnsembleModel's seed seeds the draws
    fresh, _ = ensemble.fit_world_model(buf, seed=0, bootstrap_seed=7, **dict(sizes, max_epochs=40))
    assert torch.equal(_params(model.net), _params(fresh))
    with pytest.raises(ValueError, match=re.escape("bootstrap_seed must be an int or None, got True")):
        ensemble.fit_world_model(buf, bootstrap_seed=True)
    with pytest.raises(ValueError, match=re.escape("EnsembleModel: bootstrap must be True or False, got 'yes'")):
        ensemble.EnsembleModel("Pendulum-v1", bootstrap="yes")


def test_fit_length_options_reach_the_fit_and_the_refit_budget():
    torch.set_num_threads(1)
    first = real_env.collect_transitions("Pendulum-v1", 200, seed=0)
    both = real_env.collect_transitions("Pendulum-v1", 200, seed=0)
    both.extend(real_env.collect_transitions("Pendulum-v1", 100, seed=1))
    sizes = dict(ensemble_size=2, hidden_size=16, num_layers=2)
    model = ensemble.EnsembleModel("Pendulum-v1", max_epochs=3, patience=100, batch_size=64, **sizes)
    metrics = model.fit(first, seed=0)
    assert metrics["epochs"] == 3  # max_epochs binds (patience 100 never does)
    fresh, _ = ensemble.fit_world_model(first, seed=0, max_epochs=3, patience=100, batch_size=64, **sizes)
    assert torch.equal(_params(model.net), _params(fresh))
    # a refit's budget counts passes over the new data in the model's own minibatches: ceil(3 * 100 / 64) = 5
    assert model.fit(both, num_new=100, seed=1, refit_passes=3)["updates"] == 5
    default = ensemble.EnsembleModel("Pendulum-v1", **sizes)
    default.fit(first, seed=0)
    assert default.fit(both, num_new=100, seed=1, refit_passes=3)["updates"] <= 2  # ceil(3 * 100 / 256)
    for bad in (dict(patience=0), dict(max_epochs=2.5), dict(batch_size=True)):
        (name, value), = bad.items()
        with pytest.raises(ValueError, match=re.escape(f"EnsembleModel: {name} must be an int >= 1, got {value!r}")):
            ensemble.EnsembleModel("Pendulum-v1", **bad)


def test_critic_bounds_are_the_soft_reward_quantiles_over_one_minus_gamma():
    rewards = torch.arange(100.0).view(1, 100)  # (H=1, B=100): soft rewards 0..99 with alpha 0
    log_probs, alive = torch.zeros(2, 100), torch.ones(2, 100)
    bounds = svg.critic_bounds(None, rewards, log_probs, alive, alpha=0.0, gamma=0.9)
    torch.testing.assert_close(bounds, torch.tensor([0.99, 98.01]) * 10.0)
    moved = svg.critic_bounds(bounds.clone(), rewards + 100.0, log_probs, alive, alpha=0.0, gamma=0.9)
    torch.testing.assert_close(moved, bounds + 1000.0 * svg.BOUND_RATE)  # a slow move, not a jump
    # the steps after a termination do not count
    dead = torch.zeros(2, 100)
    assert svg.critic_bounds(bounds, rewards, log_probs, dead, alpha=0.0, gamma=0.9) is bounds


class _FallingModel:
    """A torch simulator: obs moves by the action, reward 1 a step, termination once obs[0] > 0.5."""

    def differentiable_step(self, obs, action):
        next_obs = obs + action
        return next_obs, torch.ones(len(obs)) + 0.0 * action.sum(1), next_obs[:, 0] > 0.5


def test_training_rollout_keeps_the_graph_and_masks_what_follows_a_termination():
    torch.manual_seed(0)
    actor = sac.Actor(1, gym.spaces.Box(0.3, 0.31, (1,)), hidden_size=8)  # every action ~0.3: ends on the 2nd step
    start = torch.zeros(4, 1)
    obs, actions, log_probs, rewards, alive = svg.training_rollout(_FallingModel(), actor, start, horizon=3)
    assert obs.shape == (4, 4, 1) and actions.shape == (4, 4, 1) and rewards.shape == (3, 4)
    torch.testing.assert_close(alive, torch.tensor([[1.0] * 4, [1.0] * 4, [0.0] * 4, [0.0] * 4]))
    q_end = torch.zeros(4)
    v0, _ = svg.soft_value_expansion(rewards, log_probs, alive, q_end, 0.0, 1.0)
    torch.testing.assert_close(v0, torch.full((4,), 2.0))  # two rewards, then nothing
    grads = torch.autograd.grad(obs[-1].sum(), list(actor.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the states depend on the actor's actions


def _run(tmp_path, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *flags])
    scope = runpy.run_path(SCRIPT, run_name="__main__")
    (summary,) = [json.loads(p.read_text()) for p in tmp_path.glob("runs/*/summary.json")]
    return scope, summary


def test_run_end_to_end_and_eval_checkpoint(tmp_path, monkeypatch, capsys):
    scope, summary = _run(tmp_path, monkeypatch, TINY)
    assert summary["algo"] == "svg_imagined" and summary["status"] == "finished"
    assert summary["real_env_steps"] == 300 and summary["updates"] == 50 and summary["refits"] == 1
    assert summary["rollout_batches"] == 3 and summary["imagined_steps"] >= 50 * 2 * 16
    assert len(summary["eval_history"]) == 1 and summary["imagined_minus_real"] is not None
    assert os.path.isfile(summary["world_model_path"]) and os.path.isfile(summary["agent_path"])
    assert scope["start_rb"].size > 0 and scope["qf"](torch.zeros(1, 3), torch.zeros(1, 1)).shape == (5, 1)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--eval-checkpoint", summary["agent_path"]])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exit_info.value.code == 0
    assert f"real return {summary['real_return_mean']:.1f} " in capsys.readouterr().out


def test_actor_average_is_evaluated_and_saved_and_evaluations_leave_training_alone(tmp_path, monkeypatch):
    (tmp_path / "avg").mkdir(), (tmp_path / "plain").mkdir()
    avg_scope, avg = _run(tmp_path / "avg", monkeypatch, TINY + ["--actor-average", "0.1"])
    # the same run without the average and without evaluations (each --eval-every 25 of TINY's draws nothing
    # from the training's random stream): the learning actor ends with the same weights
    plain_scope, plain = _run(tmp_path / "plain", monkeypatch, TINY + ["--eval-every", "0"])
    live, averaged = avg_scope["actor"], avg_scope["averaged"]
    for name, value in plain_scope["actor"].state_dict().items():
        torch.testing.assert_close(live.state_dict()[name], value, rtol=0, atol=0)
    assert not torch.equal(averaged.fc_mean.weight, live.fc_mean.weight)
    # 50 actor updates at 0.1: the average weighs the start 0.9^50 ~ 0.5%, and differs from the live actor
    assert avg["status"] == "finished" and avg["updates"] == 50 and len(plain["eval_history"]) == 0
    assert len(avg["eval_history"]) == 1  # one evaluation before the last update: the stream check is not vacuous
    assert all("live_actor_return_mean" in entry for entry in avg["eval_history"])
    assert np.isfinite(avg["live_actor_return_mean"]) and "live_actor_return_mean" not in plain
    payload = torch.load(tmp_path / "avg" / avg["agent_path"], weights_only=False)
    for key, net in (("actor", averaged), ("live_actor", live)):
        torch.testing.assert_close(payload["state_dicts"][key]["fc_mean.weight"], net.fc_mean.weight.detach())
    obs = torch.randn(7, 3)
    torch.testing.assert_close(live.deterministic_action(obs), live.get_action(obs)[2])
    # the final figures are the averaged actor's: replaying agent.pt's "actor" gives them
    replay = svg.evaluate_checkpoint(str(tmp_path / "avg" / avg["agent_path"]))
    assert replay["real_return_mean"] == pytest.approx(avg["real_return_mean"])


@pytest.mark.parametrize("every, steps", [(1, 50), (3, 0)])
def test_deterministic_episodes_count_the_real_steps_the_mean_action_played(tmp_path, monkeypatch, every, steps):
    # TINY's learning steps 251-300 fall in the second 200-step Pendulum episode (id 1): every episode's with 1,
    # none with 3 (ids 0, 3, 6, ...)
    _, summary = _run(tmp_path, monkeypatch, TINY + ["--deterministic-episodes", str(every)])
    assert summary["status"] == "finished" and summary["deterministic_real_steps"] == steps


def test_dhmbpo_flags_critic_only_updates_sampled_steps_bounds_and_normalised_inputs(tmp_path, monkeypatch):
    scope, summary = _run(tmp_path, monkeypatch, TINY + ["--critic-updates-after-refit", "3", "--normalize-obs",
                                                        "--model-noise", "--bounded-critics", "--sample-noise"])
    assert summary["status"] == "finished" and summary["refits"] == 1
    assert scope["imagined_envs"].transition_fn.__self__.sample_noise  # the distribution rollouts sample
    assert summary["critic_only_updates"] == 3 and summary["updates"] == 50 + 3
    assert scope["q_bounds"] is not None and scope["q_bounds"][0] <= scope["q_bounds"][1]  # the bounds were tracked
    data = scope["rb"].obs[: scope["rb"].size]
    for net in (scope["actor"], scope["qf"], scope["qf_target"]):  # the stats of the last refit's data
        assert not torch.allclose(net.obs_std, torch.ones_like(net.obs_std))
        torch.testing.assert_close(net.obs_mean, torch.as_tensor(data[:290].mean(0)))
    # a saved agent keeps its stats: the replay rebuilds the same normalised actor
    payload = torch.load(summary["agent_path"], weights_only=False)
    assert "obs_mean" in payload["state_dicts"]["actor"]


def test_warm_start_bursts_one_update_per_random_step_with_fresh_rollouts(tmp_path, monkeypatch):
    _, summary = _run(tmp_path, monkeypatch, TINY + ["--warm-start"])
    assert summary["status"] == "finished" and summary["warm_start_updates"] == 250  # with the first step's own: 251
    assert summary["updates"] == 50 + 250  # TINY's 50 (test_run_end_to_end_and_eval_checkpoint) and the burst
    # the burst renews the start states every --model-rollout-every updates (at 20, 40, ..., 240) on top of TINY's 3
    assert summary["rollout_batches"] == 3 + 12


def test_train_frequency_bursts_updates_and_reset_optimizers_starts_adam_afresh(tmp_path, monkeypatch):
    scope, summary = _run(tmp_path, monkeypatch, TINY + ["--train-frequency", "10", "--reset-optimizers"])
    assert summary["status"] == "finished" and summary["refits"] == 1
    # TINY's 50 learning steps: the first step's own update, then bursts of 10 after every 10 real steps (4 of
    # them; the last 9 steps are not yet due)
    assert summary["updates"] == 1 + 4 * 10
    # the start states: the first step's (an empty buffer) and one batch at the start of each of the 5 bursts
    assert summary["rollout_batches"] == 1 + 5
    # the refit (after 40 real steps) gave the optimisers fresh moments: the actor's has seen the last burst only
    assert [state["step"].item() for state in scope["actor_optimizer"].state.values()][0] == 10
    assert len(scope["q_optimizer"].state) > 0 and len(scope["alpha_optimizer"].state) == 1


def test_in_bound_units_maps_outputs_onto_the_bounds():
    q = torch.tensor([[-1.0, 0.0, 1.0]])
    torch.testing.assert_close(svg.in_bound_units(q, torch.tensor([10.0, 30.0])), torch.tensor([[10.0, 20.0, 30.0]]))
    assert svg.in_bound_units(q, None) is q  # no bounds tracked yet: the raw outputs


def test_scaled_critics_and_start_state_critics(tmp_path, monkeypatch):
    scope, summary = _run(tmp_path, monkeypatch, TINY + ["--scaled-critics", "--critic-horizon", "1"])
    assert summary["status"] == "finished" and summary["updates"] == 50
    lo, hi = scope["q_bounds"].tolist()  # tracked for the scale although --bounded-critics is off
    assert lo < hi
    # one regression input per start state; the predictions are in the bounds' units (the last layer was zeroed
    # at the start, then learned)
    assert scope["q_pred"].shape == (5, 16) and scope["k"] == 1
    assert scope["qf"].weights[-1].abs().sum() > 0
    # agent.pt keeps the bounds, which --scaled-critics outputs are read in (examples/hopper_gait.py --critics)
    payload = torch.load(summary["agent_path"], weights_only=False)
    assert payload["extra"]["critic_bounds"] == pytest.approx([lo, hi])


def test_dhmbpo_critics_layer_norm_dropout_and_depth():
    torch.manual_seed(0)
    obs, act = torch.randn(32, 5), torch.randn(32, 2)
    plain = sac.SoftQNetworks(5, 2, hidden_size=16, num_q=3, hidden_layers=3)
    normed = sac.SoftQNetworks(5, 2, hidden_size=16, num_q=3, hidden_layers=3, layer_norm=True)
    assert [tuple(w.shape) for w in normed.weights] == [(3, 7, 16), (3, 16, 16), (3, 16, 16), (3, 16, 1)]
    # ReLU is positively homogeneous: scaling the first layer scales its outputs, which the next layer's norm undoes
    for net in (plain, normed):
        before = net(obs, act)
        with torch.no_grad():
            net.weights[0].mul_(10.0), net.biases[0].mul_(10.0)
        after = net(obs, act)
        assert after.shape == (3, 32)
        assert torch.allclose(before, after, atol=1e-3) == (net is normed)  # up to the norm's eps
    dropped = sac.SoftQNetworks(5, 2, hidden_size=64, num_q=2, dropout=0.5, activation="silu")
    assert not torch.equal(dropped(obs, act), dropped(obs, act))  # training mode: a fresh mask each call
    dropped.eval()
    assert torch.equal(dropped(obs, act), dropped(obs, act))


def test_exact_log_prob_is_the_squashed_gaussians_and_orthogonal_init():
    space = gym.spaces.Box(-2.0, 2.0, (3,))
    torch.manual_seed(0)
    exact = sac.Actor.from_run_args({"hidden_size": 16, "exact_log_prob": True, "orthogonal_init": True}, 4, space)
    floored = sac.Actor(4, space, hidden_size=16)
    floored.load_state_dict(exact.state_dict())
    obs = torch.randn(64, 4)
    with torch.no_grad():  # large means: half the rows saturate
        exact.fc_mean.bias.copy_(torch.tensor([0.0, 4.0, 12.0]))
        floored.fc_mean.bias.copy_(exact.fc_mean.bias)
    torch.manual_seed(1)
    action, log_prob, _ = exact.get_action(obs)
    torch.manual_seed(1)
    action_floored, log_prob_floored, _ = floored.get_action(obs)
    torch.testing.assert_close(action, action_floored)
    # the value torch.distributions gives the same draw: a Normal through tanh, then scaled by 2
    mean, log_std = exact(obs)
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()), [
        torch.distributions.transforms.TanhTransform(), torch.distributions.transforms.AffineTransform(0.0, 2.0)])
    x = torch.atanh((action / 2).clamp(-1 + 1e-7, 1 - 1e-7))  # the pre-squash draw, where it is not saturated
    assert torch.isfinite(log_prob).all()
    unsaturated = (x.abs() < 3).all(1)
    torch.testing.assert_close(log_prob[unsaturated], dist.log_prob(action).sum(1)[unsaturated], rtol=1e-4, atol=1e-4)
    # at |x| ~ 12 the floor caps the correction near -log(2e-6); the exact one grows with |x|
    assert (log_prob - log_prob_floored).min() > -1e-3 and (log_prob - log_prob_floored).max() > 5.0
    # orthogonal init: orthonormal rows (fc2 is square) and zero biases; the default init is neither
    torch.testing.assert_close(exact.fc2.weight @ exact.fc2.weight.T, torch.eye(16), atol=1e-5, rtol=0)
    assert torch.count_nonzero(exact.fc1.bias) == 0
    assert torch.count_nonzero(sac.Actor(4, space, hidden_size=16).fc1.bias) > 0


def test_deeper_actor_keeps_a_two_layer_actors_keys_and_rebuilds_from_run_args():
    space = gym.spaces.Box(-1.0, 1.0, (2,))
    two = sac.Actor(4, space, hidden_size=8)
    assert not any(k.startswith("fc_deeper") for k in two.state_dict())  # older agent.pt files still load
    old_run_args = {"hidden_size": 8}  # a run from before --hidden-layers and --activation
    sac.Actor.from_run_args(old_run_args, 4, space).load_state_dict(two.state_dict())
    deep = sac.Actor.from_run_args({"hidden_size": 8, "hidden_layers": 4, "activation": "silu"}, 4, space)
    assert len(deep.fc_deeper) == 2 and deep.activation is torch.nn.functional.silu
    action, log_prob, mean_action = deep.get_action(torch.randn(6, 4))
    assert action.shape == mean_action.shape == (6, 2) and log_prob.shape == (6,)
    with pytest.raises(RuntimeError):
        deep.load_state_dict(two.state_dict())  # the shape is the run's, not a guess


def test_dhmbpo_networks_end_to_end_and_eval_checkpoint(tmp_path, monkeypatch, capsys):
    scope, summary = _run(tmp_path, monkeypatch, TINY + ["--hidden-layers", "3", "--activation", "silu",
                                                        "--critic-layer-norm", "--critic-dropout", "1e-3"])
    assert summary["status"] == "finished" and summary["updates"] == 50
    qf, qf_target, actor = scope["qf"], scope["qf_target"], scope["actor"]
    for net in (qf, qf_target):
        assert len(net.weights) == 4 and net.layer_norm and net.dropout == 1e-3
    assert qf.training and not qf_target.training  # dropout in the regression and the actor's loss, not the targets
    assert len(actor.fc_deeper) == 1 and actor.activation is torch.nn.functional.silu
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--eval-checkpoint", summary["agent_path"]])
    with pytest.raises(SystemExit) as exit_info:  # the replay rebuilds the 3-layer SiLU actor from the saved args
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exit_info.value.code == 0
    assert f"real return {summary['real_return_mean']:.1f} " in capsys.readouterr().out


@pytest.mark.parametrize("flags, expected", [
    (["--env-id", "CartPole-v1"], "ppo_imagined.py or dqn_imagined.py"),
    (["--world-model", "none"], "sac_imagined.py --world-model none"),
    (["--world-model", "rssm"], "RSSMModel lacks differentiable_step"),
    (["--min-of-critics", "6"], "--min-of-critics"),
    (["--training-horizon", "0"], "--training-horizon"),
    (["--train-frequency", "0"], "--train-frequency"),
    (["--gamma", "1.0", "--bounded-critics"], "Drop --bounded-critics"),
    (["--gamma", "1.0", "--scaled-critics"], "Drop --scaled-critics"),
    (["--critic-horizon", "6"], "--critic-horizon"),
    (["--hidden-layers", "1"], "--hidden-layers"),
    (["--critic-dropout", "1.0"], "--critic-dropout"),
    (["--actor-average", "1.5"], "--actor-average"),
    (["--deterministic-episodes", "-1"], "--deterministic-episodes"),
    (["--world-model", "mean_only.py:make", "--model-noise"], "drop --model-noise"),
    (["--world-model", "mean_only.py:no_noise", "--sample-noise"], "Drop --sample-noise"),
])
def test_bad_input_one_line_and_no_run_dir(tmp_path, flags, expected):
    # a user's ensemble whose differentiable_step gives means only: --model-noise needs a `sample` argument
    (tmp_path / "mean_only.py").write_text(
        "import ensemble\n\n\nclass MeanOnly(ensemble.EnsembleModel):\n"
        "    def differentiable_step(self, obs, action):\n"
        "        return super().differentiable_step(obs, action)\n\n\n"
        "def make(env_id, seed=0, device='cpu'):\n    return MeanOnly(env_id, seed=seed, device=device)\n\n\n"
        "class NoNoise(ensemble.EnsembleModel):\n    def imagined_vector_env(self, num_envs, **settings):\n"
        "        return super().imagined_vector_env(num_envs, **settings)\n\n\n"
        "def no_noise(env_id, seed=0, device='cpu'):\n    return NoNoise(env_id, seed=seed, device=device)\n")
    result = subprocess.run([sys.executable, SCRIPT, *flags], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()
