"""Tests for train_world_model.py: checkpoint round trip and errors, data collection, adapters, a tiny run."""
import json
import os
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_world_model as twm  # noqa: E402

torch.set_num_threads(1)
TINY = dict(ensemble_size=3, hidden_size=32, num_layers=2, max_epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def cartpole_buffer():
    return twm.collect_transitions("CartPole-v1", 400, seed=0)


@pytest.fixture(scope="module")
def cartpole_model(cartpole_buffer):
    model, metrics = twm.fit_world_model(cartpole_buffer, seed=0, **TINY)
    assert metrics["epochs"] >= 1 and np.isfinite(metrics["train_loss"])
    return model


@pytest.fixture(scope="module")
def checkpoint(cartpole_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "world_model.pt"
    twm.save_world_model(cartpole_model, path)
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
    b = twm.collect_transitions("Pendulum-v1", 250, seed=3)
    assert b.truncated.sum() == 1 and not b.terminated.any()
    i = int(np.nonzero(b.truncated)[0][0])
    assert i == 199 and b.episode_ids[i + 1] != b.episode_ids[i]
    assert not np.allclose(b.next_obs[i], b.obs[i + 1])  # obs[i+1] is the reset obs of the next episode
    np.testing.assert_array_equal(b.obs[i + 1], b.start_obs[1])
    assert b.actions.dtype == np.float32 and b.actions.shape == (250, 1)


def test_extend_and_split(cartpole_buffer):
    b = twm.collect_transitions("CartPole-v1", 100, seed=1)
    n_eps = b.num_episodes
    b.extend(twm.collect_transitions("CartPole-v1", 50, seed=2))
    assert len(b) == 150 and len(b.start_obs) == b.num_episodes > n_eps
    rest, held = cartpole_buffer.split_episodes(0.25, seed=0)
    assert len(rest) + len(held) == len(cartpole_buffer)
    assert not set(rest.episode_ids) & set(held.episode_ids)
    assert len(rest.start_obs) == rest.num_episodes


def test_from_arrays_sorts_interleaved_episodes():
    obs = np.arange(8, dtype=np.float32).reshape(4, 2)
    b = twm.TransitionBuffer.from_arrays(obs, [0, 1, 0, 1], [1, 1, 1, 1], obs + 1, [0, 0, 1, 1], [0, 0, 0, 0],
                                         episode_ids=[0, 1, 0, 1])
    np.testing.assert_array_equal(b.episode_ids, [0, 0, 1, 1])
    np.testing.assert_array_equal(b.obs[:, 0], [0, 4, 2, 6])


# ---- checkpoints -------------------------------------------------------------------------------------------------
def test_round_trip_identical_predictions(cartpole_model, checkpoint):
    loaded = twm.load_world_model(checkpoint, env_id="CartPole-v1")
    assert loaded.env_id == "CartPole-v1" and loaded.max_episode_steps == 500
    assert loaded.observation_space == cartpole_model.observation_space
    assert loaded.action_space == cartpole_model.action_space
    seeds = np.arange(6, dtype=np.int64)
    for m in (cartpole_model, loaded):
        out = twm.batched_reset_fn(m, seed=seeds)
        state, trajectory = out["state"], [out["observation"]]
        for t in range(5):
            step = twm.batched_transition_fn(m, state, torch.tensor([t % 2] * 6))
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
    assert payload["format"] == twm.CHECKPOINT_FORMAT and payload["version"] == twm.CHECKPOINT_VERSION


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_world_model.py"):
        twm.load_world_model(tmp_path / "nope.pt")


def test_truncated_checkpoint(checkpoint, tmp_path):
    data = open(checkpoint, "rb").read()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        twm.load_world_model(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        twm.load_world_model(garbage)


def test_foreign_checkpoint(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    with pytest.raises(ValueError, match="not a world-model checkpoint"):
        twm.load_world_model(foreign)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a world-model checkpoint"):
        twm.load_world_model(tmp_path / "tensor.pt")


def test_wrong_version(checkpoint, tmp_path):
    payload = torch.load(checkpoint, weights_only=True)
    payload["version"] = 999
    torch.save(payload, tmp_path / "v999.pt")
    with pytest.raises(ValueError, match="version 999"):
        twm.load_world_model(tmp_path / "v999.pt")


def test_mismatched_env(checkpoint):
    with pytest.raises(ValueError, match="observation_space is shape"):
        twm.load_world_model(checkpoint, env_id="Acrobot-v1")
    model = twm.load_world_model(checkpoint, env_id="CartPole-v1")  # the matching env is fine
    with pytest.raises(ValueError, match="observation_space is bounds"):
        twm.check_env_matches(model, gym.spaces.Box(-1, 1, (4,)), model.action_space, env_id="x")
    with pytest.raises(ValueError, match="action_space is Box"):
        twm.check_env_matches(model, model.observation_space, gym.spaces.Box(-1, 1, (1,)), env_id="x")
    with pytest.raises(ValueError, match="Discrete\\(n=3"):
        twm.check_env_matches(model, model.observation_space, gym.spaces.Discrete(3), env_id="x")


def _assert_same_buffer(a, b):
    for name in (*twm.TransitionBuffer.FIELDS, "start_obs"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.env_id == b.env_id


def test_round_trip_preserves_buffer(cartpole_model, cartpole_buffer, tmp_path):
    path = tmp_path / "with_data.pt"
    twm.save_world_model(cartpole_model, path, extra={"real_env_steps": len(cartpole_buffer)}, buffer=cartpole_buffer)
    payload = torch.load(path, weights_only=True)  # still tensors and primitives only
    assert payload["version"] == twm.CHECKPOINT_VERSION and "buffer" in payload
    loaded = twm.load_world_model(path, env_id="CartPole-v1")
    assert isinstance(loaded.buffer, twm.TransitionBuffer) and loaded.buffer is not cartpole_buffer
    _assert_same_buffer(loaded.buffer, cartpole_buffer)
    assert len(loaded.buffer) == 400 and loaded.buffer.num_episodes == cartpole_buffer.num_episodes
    # the predictions are those of a checkpoint without data
    x = torch.randn(5, 4)
    for a, b in zip(cartpole_model.predict(x, [0, 1, 0, 1, 0]), loaded.predict(x, [0, 1, 0, 1, 0])):
        assert torch.equal(a, b)
    # a Dyna refit of the loaded model sees the checkpoint's data plus the new data
    data = loaded.buffer.extend(twm.collect_transitions("CartPole-v1", 60, seed=5))
    _, metrics = twm.fit_world_model(data, model=loaded, seed=1, max_epochs=1, batch_size=64)
    assert metrics["num_train"] + metrics["num_val"] == 460
    # a buffer that does not fit the model is a damaged checkpoint, not a crash later on
    payload["buffer"]["obs"] = torch.zeros(400, 3)
    payload["buffer"]["next_obs"] = torch.zeros(400, 3)
    payload["buffer"]["start_obs"] = torch.zeros(2, 3)
    torch.save(payload, tmp_path / "bad_buffer.pt")
    with pytest.raises(ValueError, match="damaged.*buffer observations have 3 dims"):
        twm.load_world_model(tmp_path / "bad_buffer.pt")
    with pytest.raises(TypeError, match="TransitionBuffer"):
        twm.save_world_model(cartpole_model, tmp_path / "x.pt", buffer={"obs": 1})


def test_checkpoint_without_buffer_loads_with_none(checkpoint, cartpole_model):
    assert "buffer" not in torch.load(checkpoint, weights_only=True)  # older format-1 files look like this
    assert twm.load_world_model(checkpoint).buffer is None
    assert cartpole_model.buffer is None  # a freshly fitted model carries none either


def test_save_is_atomic(cartpole_model, tmp_path):
    path = tmp_path / "sub" / "wm.pt"
    twm.save_world_model(cartpole_model, path)
    twm.save_world_model(cartpole_model, path)  # overwrite in place
    assert sorted(os.listdir(path.parent)) == ["wm.pt"]  # no temporary file left behind


# ---- adapters ----------------------------------------------------------------------------------------------------
def test_batched_adapters_shapes_and_reproducibility(cartpole_model):
    m = cartpole_model
    out = twm.batched_reset_fn(m, seed=np.array([1, 2, 3, 1]))
    obs = out["observation"]
    assert obs.shape == (4, 4) and obs.dtype == torch.float32
    assert torch.equal(obs[0], obs[3])  # same seed, same start
    step = twm.batched_transition_fn(m, out["state"], np.array([0, 1, 1, 0]))
    assert step["observation"].shape == (4, 4) and step["reward"].shape == (4,)
    assert step["terminated"].dtype == torch.bool and step["info"]["disagreement"].shape == (4,)
    # a row's trajectory depends only on its own seed and actions, not on its neighbours
    solo = twm.batched_reset_fn(m, seed=np.array([2]))
    solo_step = twm.batched_transition_fn(m, solo["state"], np.array([1]))
    # (same member drawn; allclose because matmul rounding may depend on the batch size)
    torch.testing.assert_close(solo_step["observation"][0], step["observation"][1], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(step["observation"]).all()


def test_buffer_start_and_bad_start_from(cartpole_model):
    out = twm.batched_reset_fn(cartpole_model, seed=np.array([5]), options={"start_from": "buffer"})
    assert out["observation"].shape == (1, 4)
    with pytest.raises(ValueError, match="start_from"):
        twm.batched_reset_fn(cartpole_model, seed=np.array([5]), options={"start_from": "nowhere"})


def test_unbatched_adapters_return_numpy(cartpole_model):
    out = twm.reset_fn(cartpole_model, seed=4)
    assert isinstance(out["observation"], np.ndarray) and out["observation"].shape == (4,)
    step = twm.transition_fn(cartpole_model, out["state"], np.int64(1))
    assert isinstance(step["observation"], np.ndarray) and isinstance(step["reward"], float)
    assert isinstance(step["terminated"], bool) and isinstance(step["info"]["disagreement"], float)
    again = twm.transition_fn(cartpole_model, twm.reset_fn(cartpole_model, seed=4)["state"], 1)
    np.testing.assert_array_equal(step["observation"], again["observation"])


def test_rejects_bad_actions(cartpole_model):
    state = twm.batched_reset_fn(cartpole_model, seed=np.array([0]))["state"]
    with pytest.raises(ValueError, match="out of range"):
        twm.batched_transition_fn(cartpole_model, state, np.array([2]))


def test_box_actions_and_noise(tmp_path):
    b = twm.collect_transitions("Pendulum-v1", 300, seed=0)
    model, _ = twm.fit_world_model(b, seed=0, sample_noise=True, **TINY)
    twm.save_world_model(model, tmp_path / "pendulum.pt", buffer=b)  # float (N, 1) actions and truncations survive
    loaded = twm.load_world_model(tmp_path / "pendulum.pt", env_id="Pendulum-v1").buffer
    assert loaded.actions.dtype == np.float32 and loaded.actions.shape == (300, 1) and loaded.truncated.sum() == 1
    _assert_same_buffer(loaded, b)
    out = twm.batched_reset_fn(model, seed=np.arange(3))
    step = twm.batched_transition_fn(model, out["state"], np.array([[5.0], [-5.0], [0.0]]))  # clipped to +-2
    assert step["observation"].shape == (3, 3) and torch.isfinite(step["observation"]).all()
    assert (step["observation"].abs() <= torch.tensor([1.0, 1.0, 8.0])).all()


def test_constant_reward_is_exact_and_halt(cartpole_model):
    import copy

    m = copy.deepcopy(cartpole_model)
    out = twm.batched_reset_fn(m, seed=np.arange(8))
    step = twm.batched_transition_fn(m, out["state"], np.ones(8, dtype=np.int64))
    assert torch.all(step["reward"] == 1.0)  # CartPole's reward is constant in the data, so it is reproduced
    assert "halted" not in step["info"]
    m.halt_disagreement = 1e-12  # every step disagrees more than this
    step = twm.batched_transition_fn(m, out["state"], np.ones(8, dtype=np.int64))
    assert step["info"]["halted"].all() and step["terminated"].all()


def test_imagination_stays_finite_for_long_rollouts(cartpole_model):
    out = twm.batched_reset_fn(cartpole_model, seed=np.arange(16))
    state = out["state"]
    for t in range(300):
        state = twm.batched_transition_fn(cartpole_model, state, torch.ones(16, dtype=torch.long))["state"]
    assert torch.isfinite(state["obs"]).all()
    assert (state["obs"] <= cartpole_model.obs_clip_high).all() and (state["obs"] >= cartpole_model.obs_clip_low).all()


def test_refit_warm_start(cartpole_model, cartpole_buffer):
    import copy

    m = copy.deepcopy(cartpole_model)
    more = twm.collect_transitions("CartPole-v1", 100, seed=9, policy=lambda o: (o[:, 2] > 0).astype(np.int64))
    buf = twm.collect_transitions("CartPole-v1", 400, seed=0).extend(more)
    m2, metrics = twm.fit_world_model(buf, m, seed=1, max_epochs=1, batch_size=64)
    assert m2 is m and metrics["num_train"] + metrics["num_val"] == len(buf)


def test_evaluate_in_real_env_is_deterministic():
    policy = lambda o: (o[:, 2] + 0.5 * o[:, 3] > 0).astype(np.int64)  # noqa: E731 (a decent CartPole heuristic)
    r1, l1 = twm.evaluate_in_real_env(policy, "CartPole-v1", num_episodes=3, seed=0)
    r2, l2 = twm.evaluate_in_real_env(policy, "CartPole-v1", num_episodes=3, seed=0)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(l1, l2)
    assert r1.shape == (3,) and l1.dtype == np.int64 and (r1 == l1).all()


def test_evaluate_world_model_keys(cartpole_model, cartpole_buffer):
    acc = twm.evaluate_world_model(cartpole_model, cartpole_buffer)
    for k in ("one_step_mse", "reward_mae", "termination_precision", "termination_recall",
              "k_step_error_1", "k_step_error_10", "k_step_error_50"):
        assert k in acc
    assert acc["k_step_count_1"] == len(cartpole_buffer)
    assert acc["one_step_mse"] >= 0


# ---- script ------------------------------------------------------------------------------------------------------
def test_tiny_training_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = twm.Args(total_timesteps=300, max_epochs=2, ensemble_size=2, hidden_size=32, num_layers=2, cuda=False,
                    num_buffer_states=50)
    model, summary = twm.train(args)
    run_dir = tmp_path / "runs" / summary["run_name"]
    written = json.loads((run_dir / "summary.json").read_text())
    for key in ("one_step_mse", "reward_mae", "termination_precision", "termination_recall", "k_step_error_1",
                "k_step_error_10", "k_step_error_50", "real_env_steps", "wall_seconds", "checkpoint"):
        assert key in written
    assert written["real_env_steps"] == 300
    assert os.path.isfile(tmp_path / written["checkpoint"])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    loaded = twm.load_world_model(tmp_path / written["checkpoint"], env_id="CartPole-v1")
    assert len(loaded.buffer_obs) == 50 and len(loaded.start_obs) > 0
    # the checkpoint carries all of its real data (held-out episodes too), for Dyna refits of the loaded model
    assert len(loaded.buffer) == written["real_env_steps"] == 300 and loaded.buffer.env_id == "CartPole-v1"


def test_bad_args(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--start-from"):
        twm.train(twm.Args(start_from="middle"))
    with pytest.raises(ValueError, match="1-D gymnasium.spaces.Box"):
        twm.collect_transitions("FrozenLake-v1", 10, seed=0)
    with pytest.raises(ValueError, match="--env-id"):
        twm.train(twm.Args(env_id="NoSuchEnv-v9"))
    with pytest.raises(ValueError, match="--test-fraction"):
        twm.train(twm.Args(test_fraction=1.5))
