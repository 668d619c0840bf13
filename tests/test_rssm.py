"""The recurrent latent world model (`--world-model rssm`, rssm.py) and the POMDP / pixel env ids (envs.py).

Fast: every model here is tiny (TINY) and fitted for a handful of updates; what is checked is the plumbing (the
interface, batched imagination with autoreset, the belief in the real env, checkpoints, pixels end to end), not
accuracy. `tiny_rssm` is also a `--world-model` spec for the scripts: tests/test_rssm.py:tiny_rssm.
"""
import json
import os
import runpy
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import real_env
import rssm
import world_model

TINY = dict(deter=16, groups=4, classes=4, hidden=16, members=3, prior_hidden=16, batch=4, seq_len=8,
            first_updates=3, min_refit_updates=2, cnn_depth=4)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_rssm(env_id, seed=0, device="cpu"):
    """A tiny RSSM, as a `--world-model tests/test_rssm.py:tiny_rssm` spec (the scripts' smoke runs)."""
    return rssm.RSSMModel(env_id, seed=seed, device=device, **TINY)


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    data = real_env.collect_transitions("CartPoleNoVel-v1", 300, seed=0)
    model = tiny_rssm("CartPoleNoVel-v1", seed=0)
    metrics = model.fit(data, seed=0)
    return model, data, metrics


def test_env_ids_keep_what_rl_zoo_keeps():
    full, novel = gym.make("CartPole-v1"), gym.make("CartPoleNoVel-v1")
    assert novel.spec.max_episode_steps == 500 and novel.spec.reward_threshold == 475.0
    o_full, _ = full.reset(seed=3)
    o_novel, _ = novel.reset(seed=3)
    np.testing.assert_array_equal(o_novel, o_full[[0, 2]])
    for _ in range(5):
        o_full, r_full, *_ = full.step(1)
        o_novel, r_novel, *_ = novel.step(1)
    np.testing.assert_array_equal(o_novel, o_full[[0, 2]])
    assert novel.observation_space.shape == (2,) and novel.observation_space.contains(o_novel)
    full, novel = gym.make("Pendulum-v1"), gym.make("PendulumNoVel-v1")
    assert novel.spec.max_episode_steps == 200
    o_full, _ = full.reset(seed=3)
    o_novel, _ = novel.reset(seed=3)
    np.testing.assert_array_equal(o_novel, o_full[:2])
    pixels = gym.make("PendulumPixels-v1")
    frame, _ = pixels.reset(seed=3)
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and pixels.observation_space.contains(frame)
    frame2, reward, *_ = pixels.step(np.array([2.0], dtype=np.float32))
    assert not np.array_equal(frame, frame2) and reward <= 0
    assert gym.make("PendulumPixels32-v1").reset(seed=0)[0].shape == (32, 32, 3)


def test_interface_and_spec():
    model = world_model.make("rssm", env_id="CartPoleNoVel-v1", seed=0)
    assert isinstance(model, rssm.RSSMModel) and world_model.has_vector_env(model) and model.learns
    c = model.config
    assert model.observation_space.shape == (c["deter"] + c["groups"] * c["classes"],)
    with pytest.raises(ValueError, match="fit\\(\\) or load\\(\\)"):
        model.imagined_env().reset(seed=0)
    with pytest.raises(ValueError, match="1-D Box observation or square uint8 frames"):
        rssm.check_spaces_supported(gym.spaces.Box(0, 1, (3, 3)), gym.spaces.Discrete(2), "here")
    with pytest.raises(TypeError, match="unknown settings"):
        rssm.RSSMModel("CartPoleNoVel-v1", hiden=3)


def test_fit_metrics_and_warm_refit(fitted):
    model, data, metrics = fitted
    assert metrics["updates"] == TINY["first_updates"] and np.isfinite(metrics["obs_loss"])
    assert model.data is data and len(model.net.start_deter) == data.num_episodes
    assert 0 < len(model.net.buffer_deter) <= len(data) + data.num_episodes
    net = model.net
    more = real_env.collect_transitions("CartPoleNoVel-v1", 50, seed=5)
    data2 = real_env.TransitionBuffer(*(getattr(data, f) for f in real_env.TransitionBuffer.FIELDS),
                                      data.start_obs, data.env_id).extend(more)
    m2 = model.fit(data2, len(more), seed=1, refit_passes=1)
    assert model.net is net and m2["updates"] == TINY["min_refit_updates"]  # warm: the same weights, trained on
    all_obs = np.concatenate([data2.obs, data2.next_obs])  # the normalisation follows all the data
    np.testing.assert_allclose(net.obs_mean.numpy(), all_obs.mean(0), rtol=1e-4, atol=1e-5)
    model.fit(data, seed=0)  # back to the fixture's data for the tests below


def test_batched_env_autoreset_and_rows_independent(fitted):
    model, _, _ = fitted
    envs = model.imagined_vector_env(6, seed=3, horizon=4, start="buffer")
    obs, _ = envs.reset(seed=3)
    assert obs.shape == (6, model.observation_space.shape[0]) and obs.dtype == np.float32
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, size=(12, 6))
    trajectory = [obs]
    for t in range(12):
        obs, reward, terminated, truncated, info = envs.step(actions[t])
        assert np.isfinite(obs).all() and reward.shape == (6,) and "disagreement" in info
        trajectory.append(obs)
    assert envs.elapsed_steps.max() <= 4  # horizon 4: rows were truncated and started over (autoreset)
    # a row depends only on its seed and its actions: a single env with row 2's seed replays row 2
    single = model.imagined_env(horizon=4, start="buffer")
    o, _ = single.reset(seed=3 + 2)
    np.testing.assert_allclose(o, trajectory[0][2], atol=1e-5)
    for t in range(3):
        o, *_ = single.step(int(actions[t, 2]))
        np.testing.assert_allclose(o, trajectory[t + 1][2], atol=1e-5)
    # the features are the state: starting rows at given features continues from there
    feats = trajectory[1][:2]
    out = envs.reset(seed=0, options={"states": np.concatenate([feats, feats, feats])})[0]
    np.testing.assert_allclose(out[:2], feats, atol=1e-6)
    envs.close()


def test_halt_rule_ends_where_members_disagree(fitted):
    model, _, _ = fitted
    envs = model.imagined_vector_env(16, seed=0, start="start", halt=1e-6, gamma=0.9)
    envs.reset(seed=0)
    _, reward, terminated, _, info = envs.step(np.ones(16, dtype=np.int64))
    halted = info["halted"]
    assert halted.any() and terminated[halted].all()
    np.testing.assert_allclose(reward[halted], 0.0)  # CartPole's lowest reward is 1 > 0: the floor is 0
    with pytest.raises(ValueError, match="start"):
        model.imagined_vector_env(2, start="nowhere")


def test_real_env_belief(fitted):
    model, _, _ = fitted
    env = model.real_env(gym.make("CartPoleNoVel-v1"))
    assert env.observation_space == model.observation_space
    first, _ = env.reset(seed=4)
    for _ in range(3):
        feat, *_ = env.step(1)
    assert feat.shape == model.observation_space.shape and not np.array_equal(feat, first)
    again, _ = env.reset(seed=4)  # the carry starts over at reset
    np.testing.assert_array_equal(again, first)
    returns, lengths = real_env.evaluate_in_real_env(lambda o: (o[:, 0] > 0).astype(np.int64), "CartPoleNoVel-v1",
                                                     2, seed=0, model=model)
    assert len(returns) == 2 and (lengths > 0).all()
    seen = []
    data = real_env.collect_transitions("CartPoleNoVel-v1", 20, seed=0, model=model,
                                        policy=lambda o: seen.append(o.shape) or np.zeros(len(o), np.int64))
    assert data.obs.shape == (20, 2) and seen[0] == (1, model.observation_space.shape[0])
    with pytest.raises(ValueError, match="cannot see through"):
        model.real_env(gym.make("CartPole-v1"))


def test_save_load_round_trip(fitted, tmp_path):
    model, data, _ = fitted
    path = model.save(tmp_path / "wm.pt", extra={"real_env_steps": 300})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == rssm.CHECKPOINT_FORMAT
    loaded = tiny_rssm("CartPoleNoVel-v1").load(path)
    assert loaded.extra["real_env_steps"] == 300 and len(loaded.data) == len(data)
    runs = []
    for m in (model, loaded):
        envs = m.imagined_vector_env(4, seed=1, start="buffer")
        obs = [envs.reset(seed=1)[0]] + [envs.step(np.array([0, 1, 0, 1]))[0] for _ in range(5)]
        runs.append(np.stack(obs))
    np.testing.assert_array_equal(runs[0], runs[1])
    with pytest.raises(FileNotFoundError):
        tiny_rssm("CartPoleNoVel-v1").load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        tiny_rssm("CartPoleNoVel-v1").load(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an RSSM checkpoint"):
        tiny_rssm("CartPoleNoVel-v1").load(tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="observation_space"):
        tiny_rssm("CartPole-v1").load(path)


def test_pixels_end_to_end(tmp_path):
    torch.set_num_threads(1)
    data = real_env.collect_transitions("PendulumPixels-v1", 40, seed=0)
    assert data.obs.dtype == np.uint8 and data.obs.shape == (40, 64, 64, 3)
    model = tiny_rssm("PendulumPixels-v1")
    model.fit(data, seed=0)
    envs = model.imagined_vector_env(3, seed=0, horizon=10, start="start", halt=2.0)
    obs, _ = envs.reset(seed=0)
    obs, reward, *_ = envs.step(np.zeros((3, 1), dtype=np.float32))
    assert obs.shape == (3, model.observation_space.shape[0]) and np.isfinite(reward).all()
    env = model.real_env(gym.make("PendulumPixels-v1"))
    feat, _ = env.reset(seed=0)
    feat, *_ = env.step(np.array([1.0], dtype=np.float32))
    assert feat.shape == model.observation_space.shape
    picture = model.open_loop(data, context=2, horizon=5)
    assert picture["imagined_obs"].shape == picture["real_obs"].shape and picture["imagined_obs"].dtype == np.uint8
    loaded = tiny_rssm("PendulumPixels-v1").load(model.save(tmp_path / "px.pt"))
    assert loaded.data.obs.dtype == np.uint8


def test_ppo_script_trains_through_the_rssm(tmp_path):
    """ppo_imagined.py with --world-model rssm (tiny): fit, imagined PPO, a Dyna round through the belief, the
    real evaluation, the saved model and agent, and --eval-checkpoint replaying it."""
    spec = os.path.join(ROOT, "tests", "test_rssm.py") + ":tiny_rssm"
    cmd = [sys.executable, os.path.join(ROOT, "ppo_imagined.py"), "--env-id", "CartPoleNoVel-v1", "--world-model",
           spec, "--initial-real-steps", "100", "--real-iterations", "1", "--real-steps-per-iteration", "50",
           "--total-timesteps", "512", "--num-envs", "4", "--num-steps", "64", "--eval-episodes", "2",
           "--eval-every", "0", "--imagined-horizon", "20"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run_dir = next((tmp_path / "runs").iterdir())
    assert (run_dir / "world_model.pt").is_file() and (run_dir / "agent.pt").is_file()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "ppo_imagined.py"), "--eval-checkpoint",
                          str(run_dir / "agent.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "real return" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


def test_train_world_model_reports_and_draws_the_rssm(tmp_path):
    """train_world_model.py with a latent model: its own accuracy report (k-step errors from posterior starts) and
    the open-loop figure with real and imagined frames (pixels)."""
    spec = os.path.join(ROOT, "tests", "test_rssm.py") + ":tiny_rssm"
    cmd = [sys.executable, os.path.join(ROOT, "train_world_model.py"), "--env-id", "PendulumPixels32-v1",
           "--world-model", spec, "--total-timesteps", "300", "--test-fraction", "0.3"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run_dir = next((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["k_step_count_1"] > 0
    assert 0.0 <= summary["k_step_error_1"] < 1.0  # pixels: per-pixel squared error in [0, 1] units
    assert summary["open_loop_figure"].endswith("open_loop.png") and (run_dir / "open_loop.png").stat().st_size > 0
    assert (run_dir / "world_model.pt").is_file()


SPEC = os.path.join(ROOT, "tests", "test_rssm.py") + ":tiny_rssm"
DYNA = ["--initial-real-steps", "200", "--eval-episodes", "1", "--refit-passes", "1", "--total-timesteps"]


@pytest.mark.parametrize("script, env_id, flags, real_steps", [
    ("dqn_imagined.py", "CartPoleNoVel-v1", DYNA + ["320", "--real-iterations", "1", "--real-steps-per-iteration",
                                                    "100", "--learning-starts", "100", "--num-envs", "4"], 300),
    # SAC fills its replay with random steps of its own through the belief (the model's data are observations);
    # on pixels: the pixel path of a training script end to end
    ("sac_imagined.py", "PendulumPixels32-v1", DYNA + ["450", "--utd-ratio", "1", "--refit-every", "100",
                                                    "--rollout-batch-size", "64", "--imagined-horizon", "2"], 450),
    ("sb3_example.py", "PendulumNoVel-v1", DYNA + ["256", "--algo", "sac", "--real-iterations", "1",
                                                   "--real-steps-per-iteration", "100", "--num-envs", "4"], 300),
    ("torchrl_example.py", "CartPoleNoVel-v1", DYNA + ["256", "--real-iterations", "1", "--real-steps-per-iteration",
                                                       "100", "--num-envs", "4", "--frames-per-batch", "128",
                                                       "--minibatch-size", "64", "--update-epochs", "1"], 300),
])
def test_every_script_trains_through_the_rssm(tmp_path, monkeypatch, script, env_id, flags, real_steps):
    """dqn, sac (branches from the beliefs in its replay), SB3 and TorchRL with a latent model: fit, imagined
    training, a refit on data collected through the belief, the real evaluation, the saved model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, "--env-id", env_id, "--world-model", SPEC, *flags])
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    (run_dir,) = list((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_model"] == SPEC
    assert summary["real_env_steps"] == real_steps and summary["imagined_steps"] > 0
    assert np.isfinite(summary["real_return_mean"]) and (run_dir / "world_model.pt").is_file()
