"""Tests for world_model.py (checkpoint round trip and errors, data collection, adapters, the halt rule, refits)
and a tiny run of train_world_model.py."""
import json
import os
import sys
import types

import gymnasium as gym
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dyna  # noqa: E402
import ensemble  # noqa: E402
import ensemble_imagination  # noqa: E402
import real_env  # noqa: E402

IM = ensemble_imagination.Imagination()  # the default settings: real start states, no halt, member means

torch.set_num_threads(1)
TINY = dict(ensemble_size=3, hidden_size=32, num_layers=2, max_epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def cartpole_buffer():
    return real_env.collect_transitions("CartPole-v1", 400, seed=0)


@pytest.fixture(scope="module")
def cartpole_model(cartpole_buffer):
    model, metrics = ensemble.fit_world_model(cartpole_buffer, seed=0, **TINY)
    assert metrics["epochs"] >= 1 and np.isfinite(metrics["train_loss"])
    return model


@pytest.fixture(scope="module")
def checkpoint(cartpole_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "world_model.pt"
    ensemble.save_world_model(cartpole_model, path)
    return str(path)


# ---- data --------------------------------------------------------------------------------------------------------
def test_buffer_is_episode_contiguous_and_consistent(cartpole_buffer):
    b = cartpole_buffer
    assert len(b) == 400 and b.actions.dtype == np.int64 and b.obs.shape == (400, 4)
    same_ep = b.episode_ids[:-1] == b.episode_ids[1:]
    # inside an episode the next obs is the following transition's obs
    np.testing.assert_array_equal(b.next_obs[:-1][same_ep], b.obs[1:][same_ep])
    # every finished episode ends with a termination (CartPole random episodes never reach 500 steps)
    assert np.array_equal(b.terminated[:-1], ~same_ep)
    assert not b.truncated.any()
    # terminal next_obs is the TRUE final obs (outside the CartPole limits), not the reset obs
    final = b.next_obs[b.terminated]
    assert np.all((np.abs(final[:, 0]) > 2.4) | (np.abs(final[:, 2]) > 0.2095))
    np.testing.assert_array_equal(b.start_obs[1:], b.obs[1:][~same_ep])


def test_truncation_keeps_true_final_obs():
    b = real_env.collect_transitions("Pendulum-v1", 250, seed=3)
    assert b.truncated.sum() == 1 and not b.terminated.any()
    i = int(np.nonzero(b.truncated)[0][0])
    assert i == 199 and b.episode_ids[i + 1] != b.episode_ids[i]
    assert not np.allclose(b.next_obs[i], b.obs[i + 1])  # obs[i+1] is the reset obs of the next episode
    np.testing.assert_array_equal(b.obs[i + 1], b.start_obs[1])
    assert b.actions.dtype == np.float32 and b.actions.shape == (250, 1)


def test_extend_and_split(cartpole_buffer):
    b = real_env.collect_transitions("CartPole-v1", 100, seed=1)
    n_eps = b.num_episodes
    b.extend(real_env.collect_transitions("CartPole-v1", 50, seed=2))
    assert len(b) == 150 and len(b.start_obs) == b.num_episodes > n_eps
    rest, held = cartpole_buffer.split_episodes(0.25, seed=0)
    assert len(rest) + len(held) == len(cartpole_buffer)
    assert not set(rest.episode_ids) & set(held.episode_ids)
    assert len(rest.start_obs) == rest.num_episodes


def test_from_arrays_sorts_interleaved_episodes():
    obs = np.arange(8, dtype=np.float32).reshape(4, 2)
    b = real_env.TransitionBuffer.from_arrays(obs, [0, 1, 0, 1], [1, 1, 1, 1], obs + 1, [0, 0, 1, 1], [0, 0, 0, 0],
                                         episode_ids=[0, 1, 0, 1])
    np.testing.assert_array_equal(b.episode_ids, [0, 0, 1, 1])
    np.testing.assert_array_equal(b.obs[:, 0], [0, 4, 2, 6])


# ---- checkpoints -------------------------------------------------------------------------------------------------
def test_round_trip_identical_predictions(cartpole_model, checkpoint):
    loaded = ensemble.load_world_model(checkpoint, env_id="CartPole-v1")
    assert loaded.env_id == "CartPole-v1" and loaded.max_episode_steps == 500
    assert loaded.observation_space == cartpole_model.observation_space
    assert loaded.action_space == cartpole_model.action_space
    seeds = np.arange(6, dtype=np.int64)
    for m in (cartpole_model, loaded):
        out = IM.batched_reset_fn(m, seed=seeds)
        state, trajectory = out["state"], [out["observation"]]
        for t in range(5):
            step = IM.batched_transition_fn(m, state, torch.tensor([t % 2] * 6))
            state = step["state"]
            trajectory += [step["observation"], step["reward"], step["terminated"], step["info"]["disagreement"]]
        m._traj = trajectory
    for a, b in zip(cartpole_model._traj, loaded._traj):
        assert torch.equal(a, b)
    x = torch.randn(7, 4)
    for a, b in zip(cartpole_model.predict(x, [0, 1, 0, 1, 0, 1, 0]), loaded.predict(x, [0, 1, 0, 1, 0, 1, 0])):
        assert torch.equal(a, b)


def test_checkpoint_loads_with_weights_only(checkpoint):
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["format"] == ensemble.CHECKPOINT_FORMAT and payload["version"] == ensemble.CHECKPOINT_VERSION


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_world_model.py"):
        ensemble.load_world_model(tmp_path / "nope.pt")


def test_truncated_checkpoint(checkpoint, tmp_path):
    data = open(checkpoint, "rb").read()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ensemble.load_world_model(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ensemble.load_world_model(garbage)


def test_foreign_checkpoint(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    with pytest.raises(ValueError, match="not a world-model checkpoint"):
        ensemble.load_world_model(foreign)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a world-model checkpoint"):
        ensemble.load_world_model(tmp_path / "tensor.pt")


def test_wrong_version(checkpoint, tmp_path):
    payload = torch.load(checkpoint, weights_only=True)
    payload["version"] = 999
    torch.save(payload, tmp_path / "v999.pt")
    with pytest.raises(ValueError, match="version 999"):
        ensemble.load_world_model(tmp_path / "v999.pt")


def test_mismatched_env(checkpoint):
    with pytest.raises(ValueError, match="observation_space is shape"):
        ensemble.load_world_model(checkpoint, env_id="Acrobot-v1")
    model = ensemble.load_world_model(checkpoint, env_id="CartPole-v1")  # the matching env is fine
    with pytest.raises(ValueError, match="observation_space is bounds"):
        ensemble.check_env_matches(model, gym.spaces.Box(-1, 1, (4,)), model.action_space, env_id="x")
    with pytest.raises(ValueError, match="action_space is Box"):
        ensemble.check_env_matches(model, model.observation_space, gym.spaces.Box(-1, 1, (1,)), env_id="x")
    with pytest.raises(ValueError, match="Discrete\\(n=3"):
        ensemble.check_env_matches(model, model.observation_space, gym.spaces.Discrete(3), env_id="x")


def _assert_same_buffer(a, b):
    for name in (*real_env.TransitionBuffer.FIELDS, "start_obs"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.env_id == b.env_id


def test_round_trip_preserves_buffer(cartpole_model, cartpole_buffer, tmp_path):
    path = tmp_path / "with_data.pt"
    ensemble.save_world_model(cartpole_model, path, extra={"real_env_steps": len(cartpole_buffer)}, buffer=cartpole_buffer)
    payload = torch.load(path, weights_only=True)  # still tensors and primitives only
    assert payload["version"] == ensemble.CHECKPOINT_VERSION and "buffer" in payload
    loaded = ensemble.load_world_model(path, env_id="CartPole-v1")
    assert isinstance(loaded.buffer, real_env.TransitionBuffer) and loaded.buffer is not cartpole_buffer
    _assert_same_buffer(loaded.buffer, cartpole_buffer)
    assert len(loaded.buffer) == 400 and loaded.buffer.num_episodes == cartpole_buffer.num_episodes
    # the predictions are those of a checkpoint without data
    x = torch.randn(5, 4)
    for a, b in zip(cartpole_model.predict(x, [0, 1, 0, 1, 0]), loaded.predict(x, [0, 1, 0, 1, 0])):
        assert torch.equal(a, b)
    # a Dyna refit of the loaded model sees the checkpoint's data plus the new data
    data = loaded.buffer.extend(real_env.collect_transitions("CartPole-v1", 60, seed=5))
    _, metrics = ensemble.fit_world_model(data, model=loaded, seed=1, max_epochs=1, batch_size=64)
    assert metrics["num_train"] + metrics["num_val"] == 460
    # a buffer that does not fit the model is a damaged checkpoint, not a crash later on
    payload["buffer"]["obs"] = torch.zeros(400, 3)
    payload["buffer"]["next_obs"] = torch.zeros(400, 3)
    payload["buffer"]["start_obs"] = torch.zeros(2, 3)
    torch.save(payload, tmp_path / "bad_buffer.pt")
    with pytest.raises(ValueError, match="damaged.*buffer observations have 3 dims"):
        ensemble.load_world_model(tmp_path / "bad_buffer.pt")
    with pytest.raises(TypeError, match="TransitionBuffer"):
        ensemble.save_world_model(cartpole_model, tmp_path / "x.pt", buffer={"obs": 1})


def test_checkpoint_without_buffer_loads_with_none(checkpoint, cartpole_model):
    assert "buffer" not in torch.load(checkpoint, weights_only=True)  # older format-1 files look like this
    assert ensemble.load_world_model(checkpoint).buffer is None
    assert cartpole_model.buffer is None  # a freshly fitted model carries none either


def test_save_is_atomic(cartpole_model, tmp_path):
    path = tmp_path / "sub" / "wm.pt"
    ensemble.save_world_model(cartpole_model, path)
    ensemble.save_world_model(cartpole_model, path)  # overwrite in place
    assert sorted(os.listdir(path.parent)) == ["wm.pt"]  # no temporary file left behind


# ---- adapters ----------------------------------------------------------------------------------------------------
def test_batched_adapters_shapes_and_reproducibility(cartpole_model):
    m = cartpole_model
    out = IM.batched_reset_fn(m, seed=np.array([1, 2, 3, 1]))
    obs = out["observation"]
    assert obs.shape == (4, 4) and obs.dtype == torch.float32
    assert torch.equal(obs[0], obs[3])  # same seed, same start
    step = IM.batched_transition_fn(m, out["state"], np.array([0, 1, 1, 0]))
    assert step["observation"].shape == (4, 4) and step["reward"].shape == (4,)
    assert step["terminated"].dtype == torch.bool and step["info"]["disagreement"].shape == (4,)
    # a row's trajectory depends only on its own seed and actions, not on its neighbours
    solo = IM.batched_reset_fn(m, seed=np.array([2]))
    solo_step = IM.batched_transition_fn(m, solo["state"], np.array([1]))
    # (same member drawn; allclose because matmul rounding may depend on the batch size)
    torch.testing.assert_close(solo_step["observation"][0], step["observation"][1], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(step["observation"]).all()


def test_buffer_start_and_bad_start(cartpole_model):
    out = ensemble_imagination.Imagination(start="buffer").batched_reset_fn(cartpole_model, seed=np.array([5]))
    assert out["observation"].shape == (1, 4)
    with pytest.raises(ValueError, match="imagined start"):
        ensemble_imagination.make_imagined_vector_env(cartpole_model, 2, start="nowhere")
    with pytest.raises(ValueError, match="halt"):
        ensemble_imagination.make_imagined_env(cartpole_model, halt=-1)


def test_unbatched_adapters_return_numpy(cartpole_model):
    out = IM.reset_fn(cartpole_model, seed=4)
    assert isinstance(out["observation"], np.ndarray) and out["observation"].shape == (4,)
    step = IM.transition_fn(cartpole_model, out["state"], np.int64(1))
    assert isinstance(step["observation"], np.ndarray) and isinstance(step["reward"], float)
    assert isinstance(step["terminated"], bool) and isinstance(step["info"]["disagreement"], float)
    again = IM.transition_fn(cartpole_model, IM.reset_fn(cartpole_model, seed=4)["state"], 1)
    np.testing.assert_array_equal(step["observation"], again["observation"])


def test_rejects_bad_actions(cartpole_model):
    state = IM.batched_reset_fn(cartpole_model, seed=np.array([0]))["state"]
    with pytest.raises(ValueError, match="out of range"):
        IM.batched_transition_fn(cartpole_model, state, np.array([2]))


def test_box_actions_and_noise(tmp_path):
    b = real_env.collect_transitions("Pendulum-v1", 300, seed=0)
    model, _ = ensemble.fit_world_model(b, seed=0, **TINY)
    ensemble.save_world_model(model, tmp_path / "pendulum.pt", buffer=b)  # float (N, 1) actions and truncations survive
    loaded = ensemble.load_world_model(tmp_path / "pendulum.pt", env_id="Pendulum-v1").buffer
    assert loaded.actions.dtype == np.float32 and loaded.actions.shape == (300, 1) and loaded.truncated.sum() == 1
    _assert_same_buffer(loaded, b)
    noisy = ensemble_imagination.Imagination(sample_noise=True)
    out = noisy.batched_reset_fn(model, seed=np.arange(3))
    step = noisy.batched_transition_fn(model, out["state"], np.array([[5.0], [-5.0], [0.0]]))  # clipped to +-2
    assert step["observation"].shape == (3, 3) and torch.isfinite(step["observation"]).all()
    assert (step["observation"].abs() <= torch.tensor([1.0, 1.0, 8.0])).all()


def test_constant_reward_is_exact_and_halt(cartpole_model):
    import copy

    m = copy.deepcopy(cartpole_model)
    out = IM.batched_reset_fn(m, seed=np.arange(8))
    step = IM.batched_transition_fn(m, out["state"], np.ones(8, dtype=np.int64))
    assert torch.all(step["reward"] == 1.0)  # CartPole's reward is constant in the data, so it is reproduced
    assert "halted" not in step["info"]
    halting = ensemble_imagination.Imagination(halt=1e-12, gamma=0.9)  # every step disagrees more than this
    step = halting.batched_transition_fn(m, out["state"], np.ones(8, dtype=np.int64))
    assert step["info"]["halted"].all() and step["terminated"].all()
    assert torch.all(step["reward"] == 0.0)  # min(0, lowest real reward 1) / (1 - gamma): what a fall costs
    m.reward_min.fill_(-2.0)  # with negative rewards a halt is worse than any real return
    step = halting.batched_transition_fn(m, out["state"], np.ones(8, dtype=np.int64))
    torch.testing.assert_close(step["reward"], torch.full((8,), -20.0))
    m.terminal_reward_min.fill_(-100.0)  # a crash penalty that ends the episode is paid once, not forever
    step = halting.batched_transition_fn(m, out["state"], np.ones(8, dtype=np.int64))
    torch.testing.assert_close(step["reward"], torch.full((8,), -120.0))


def test_halt_bound_separates_terminal_rewards():
    buf = real_env.TransitionBuffer.from_arrays(
        np.zeros((4, 4)), [0, 1, 0, 1], [-1.0, -2.0, -100.0, 3.0], np.zeros((4, 4)), [0, 0, 1, 0], [0, 0, 0, 0])
    model = ensemble.EnsembleWorldModel(gym.spaces.Box(-5, 5, (4,)), gym.spaces.Discrete(2), ensemble_size=2,
                                  hidden_size=8, num_layers=1)
    model.set_statistics(buf)
    assert float(model.reward_min) == -2.0 and float(model.terminal_reward_min) == -100.0


def test_halt_reference_is_the_99th_percentile_on_real_data(cartpole_model, cartpole_buffer):
    d = cartpole_model.predict(torch.as_tensor(cartpole_buffer.obs), cartpole_buffer.actions)[3]
    inside = (d <= cartpole_model.disagreement_ref).float().mean()
    assert 0.97 <= float(inside) <= 1.0


def test_imagination_stays_finite_for_long_rollouts(cartpole_model):
    out = IM.batched_reset_fn(cartpole_model, seed=np.arange(16))
    state = out["state"]
    for t in range(300):
        state = IM.batched_transition_fn(cartpole_model, state, torch.ones(16, dtype=torch.long))["state"]
    assert torch.isfinite(state["obs"]).all()
    assert (state["obs"] <= cartpole_model.obs_clip_high).all() and (state["obs"] >= cartpole_model.obs_clip_low).all()


def test_refit_warm_start(cartpole_model, cartpole_buffer):
    import copy

    m = copy.deepcopy(cartpole_model)
    more = real_env.collect_transitions("CartPole-v1", 100, seed=9, policy=lambda o: (o[:, 2] > 0).astype(np.int64))
    buf = real_env.collect_transitions("CartPole-v1", 400, seed=0).extend(more)
    m2, metrics = ensemble.fit_world_model(buf, m, seed=1, max_epochs=1, batch_size=64)
    assert m2 is m and metrics["num_train"] + metrics["num_val"] == len(buf)


def test_refit_budget_and_kept_normalisation(cartpole_model):
    import copy

    model = ensemble.EnsembleModel("CartPole-v1")
    model.net = m = copy.deepcopy(cartpole_model)
    in_mean = m.in_mean.clone()
    buf = real_env.collect_transitions("CartPole-v1", 400, seed=0)
    buf, metrics = dyna.dyna_round(model, buf, "CartPole-v1", None, 128, seed=3)
    assert metrics["new_real_steps"] == 128 and len(buf) == 528 and model.net is m
    assert metrics["updates"] <= 10  # 20 passes over 128 new transitions at 256 per minibatch
    assert torch.equal(m.in_mean, in_mean)  # a warm refit keeps the normalisation its weights were trained with


def test_box_actions_are_clipped_where_they_enter_the_real_env(monkeypatch):
    seen = []
    step = gym.wrappers.TimeLimit.step

    def spy(self, action):
        seen.append(np.asarray(action).copy())
        return step(self, action)

    monkeypatch.setattr(gym.wrappers.TimeLimit, "step", spy)
    real_env.collect_transitions("Pendulum-v1", 20, seed=0, policy=lambda o: np.full((len(o), 1), 7.0))
    real_env.evaluate_in_real_env(lambda o: np.full((len(o), 1), -7.0), "Pendulum-v1", 1, seed=0)
    assert len(seen) == 220 and max(abs(float(a[0])) for a in seen) == 2.0


def test_clip_action_keeps_a_tensor_on_its_device_when_asked():
    box = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    clipped = real_env.clip_action(torch.tensor([[7.0], [-7.0]]), box, keep_tensor=True)
    assert isinstance(clipped, torch.Tensor) and clipped.flatten().tolist() == [2.0, -2.0]
    assert isinstance(real_env.clip_action(torch.tensor([[7.0]]), box), np.ndarray)  # NumPy for real envs


def test_the_member_only_step_is_a_pass_through(cartpole_model):
    model = ensemble.EnsembleModel("CartPole-v1")
    model.net = cartpole_model
    steps = []
    for disagreement in (True, False):
        envs = model.imagined_vector_env(8, seed=0, disagreement=disagreement)
        envs.reset(seed=0)
        steps.append(envs.step(np.zeros(8, dtype=np.int64)))
    assert "disagreement" in steps[0][4] and "disagreement" not in steps[1][4]
    np.testing.assert_allclose(steps[0][0], steps[1][0], rtol=1e-5, atol=1e-6)  # the same rows, fewer FLOPs


def test_elites_are_the_best_validation_members_and_the_only_ones_imagined(cartpole_buffer, tmp_path):
    # a member with wrecked weights is never an elite; imagination then draws only from the elites
    net, _ = ensemble.fit_world_model(cartpole_buffer, seed=0, **{**TINY, "ensemble_size": 4}, num_elites=2)
    assert net.config()["num_elites"] == 2 and len(net.elites) == 2 and len(set(net.elites.tolist())) == 2
    with torch.no_grad():
        net.head.weight[3].mul_(100.0)
        net.elites.copy_(torch.tensor([2, 3]))  # the refit must choose again
    refit, _ = ensemble.fit_world_model(cartpole_buffer, net, seed=1, max_updates=1, batch_size=64)
    assert 3 not in refit.elites.tolist()
    with torch.no_grad():
        refit.elites.copy_(torch.tensor([0, 2]))
    envs = ensemble_imagination.make_imagined_vector_env(refit, 64, seed=0, output="torch")
    obs, _ = envs.reset(seed=0)
    actions = torch.ones(64, dtype=torch.int64)
    next_obs = envs.step(actions)[0]
    per_member = torch.stack([refit.predict(obs, actions, members=torch.full((64,), e))[0] for e in range(4)])
    drawn = (next_obs[None] - per_member).abs().amax(-1).argmin(0)  # which member each row's step matches
    assert set(drawn.tolist()) == {0, 2}
    # the checkpoint keeps them; a checkpoint from before elites draws from every member
    path = tmp_path / "wm.pt"
    ensemble.save_world_model(refit, path)
    assert ensemble.load_world_model(path).elites.tolist() == [0, 2]
    payload = torch.load(path, weights_only=True)
    del payload["elites"], payload["config"]["num_elites"]
    torch.save(payload, path)
    old = ensemble.load_world_model(path)
    assert old.num_elites == 4 and old.elites.tolist() == [0, 1, 2, 3]


def test_mbpo_ensemble_has_mbpos_sizes():
    import world_model

    model = world_model.make("mbpo-ensemble", env_id="Pendulum-v1", seed=0)
    assert model.sizes == dict(ensemble_size=7, hidden_size=200, num_layers=4, num_elites=5, homoscedastic=False,
                               layer_norm=False, dropout=0.0)
    model = world_model.make("dhmbpo-ensemble", env_id="Pendulum-v1", seed=0)
    assert model.sizes == dict(ensemble_size=8, hidden_size=256, num_layers=4, num_elites=8, homoscedastic=False,
                               layer_norm=False, dropout=0.0)
    # erl_lib's released network (config/agent/dynamics_model/deep_ensemble.yaml): 4 linear layers, not 5
    model = ensemble.dhmbpo_network("Pendulum-v1", seed=0)
    assert model.sizes == dict(ensemble_size=8, hidden_size=256, num_layers=3, num_elites=8, homoscedastic=True,
                               layer_norm=True, dropout=0.01)


def test_evaluate_in_real_env_is_deterministic():
    policy = lambda o: (o[:, 2] + 0.5 * o[:, 3] > 0).astype(np.int64)  # noqa: E731 (a decent CartPole heuristic)
    r1, l1 = real_env.evaluate_in_real_env(policy, "CartPole-v1", num_episodes=3, seed=0)
    r2, l2 = real_env.evaluate_in_real_env(policy, "CartPole-v1", num_episodes=3, seed=0)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(l1, l2)
    assert r1.shape == (3,) and l1.dtype == np.int64 and (r1 == l1).all()


def test_evaluate_world_model_keys(cartpole_model, cartpole_buffer):
    acc = ensemble.evaluate_world_model(cartpole_model, cartpole_buffer)
    for k in ("one_step_mse", "reward_mae", "termination_precision", "termination_recall",
              "k_step_error_1", "k_step_error_10", "k_step_error_50"):
        assert k in acc
    assert acc["k_step_count_1"] == len(cartpole_buffer)
    assert acc["one_step_mse"] >= 0


# ---- script ------------------------------------------------------------------------------------------------------
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_world_model.py")


def run_script(cwd, *flags):
    import subprocess

    return subprocess.run([sys.executable, SCRIPT, *flags], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_tiny_training_run(tmp_path):
    out = run_script(tmp_path, "--total-timesteps", "300", "--max-epochs", "2", "--ensemble-size", "2",
                     "--hidden-size", "32", "--num-layers", "2", "--no-cuda")
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "runs/" + run_dir.name + "/summary.json" in out.stdout and "tensorboard --logdir runs" in out.stdout
    written = json.loads((run_dir / "summary.json").read_text())
    for key in ("one_step_mse", "reward_mae", "termination_precision", "termination_recall", "k_step_error_1",
                "k_step_error_10", "k_step_error_50", "real_env_steps", "wall_seconds", "checkpoint"):
        assert key in written
    assert written["real_env_steps"] == 300
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    loaded = ensemble.load_world_model(tmp_path / written["checkpoint"], env_id="CartPole-v1")
    assert len(loaded.start_obs) > 0
    # the checkpoint carries all of its real data (held-out episodes too), for Dyna refits of the loaded model
    assert len(loaded.buffer) == written["real_env_steps"] == 300 and loaded.buffer.env_id == "CartPole-v1"


@pytest.mark.parametrize("flags, words", [
    (("--env-id", "NoSuchEnv-v9"), "--env-id"),
    (("--env-id", "FrozenLake-v1"), "1-D Box observation"),
    (("--test-fraction", "1.5"), "--test-fraction"),
    (("--total-timesteps", "1"), "--total-timesteps"),
    (("--num-elites", "6"), "--num-elites"),
])
def test_bad_args_give_one_line_and_no_run_dir(tmp_path, flags, words):
    out = run_script(tmp_path, *flags)
    assert out.returncode != 0 and words in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "runs").exists()


def test_the_ensemble_rejects_unsupported_envs():
    with pytest.raises(ValueError, match="1-D gymnasium.spaces.Box"):
        ensemble.EnsembleModel("FrozenLake-v1")


def test_initial_data_without_a_termination_gets_more_from_the_exploration_policy():
    calls = []

    def explore(obs_batch):  # counts its calls; always torque +1 (a held action)
        calls.append(len(obs_batch))
        return np.full(len(obs_batch), 2)

    def initial_data(env_id):
        args = types.SimpleNamespace(env_id=env_id, world_model_path=None, initial_real_steps=100, seed=0)
        run = types.SimpleNamespace(writer=None, timings={"world_model_seconds": 0.0}, model_fitted=False, figures={})
        data, steps = dyna.initial_data(ensemble.EnsembleModel(env_id), args, run, log=lambda m: None,
                                        until_termination_policy=explore)
        assert run.model_fitted
        return data, steps

    # 100 uniform random Acrobot steps never reach the goal: 100 more come from `explore`, and all are counted
    buffer, steps = initial_data("Acrobot-v1")
    assert len(buffer) == steps == 200 and sum(calls) == 100
    assert np.all(buffer.actions[100:] == 2) and len(np.unique(buffer.episode_ids)) == 2
    # CartPole's random episodes end by termination: the exploration policy is never called
    calls.clear()
    buffer, steps = initial_data("CartPole-v1")
    assert steps == len(buffer) == 100 and not calls
