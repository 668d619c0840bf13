"""visualize.py and plot_runs.py: real PNG/mp4 files of the expected size, headless."""
import json
import os
import subprocess
import sys

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import gymnasium as gym  # noqa: E402
import imageio.v2 as imageio  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import ensemble  # noqa: E402
import real_env  # noqa: E402
import visualize as vis  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)


def balance(obs):
    """A CartPole controller that keeps the pole up for a while (long, deterministic episodes)."""
    return (obs[:, 2] + 0.5 * obs[:, 3] > 0).astype(np.int64)


def headless_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER", "SDL_AUDIODRIVER", "MPLBACKEND")}
    env["PYTHONPATH"] = ROOT
    return env


@pytest.fixture(scope="module")
def cartpole_model():
    buf = real_env.collect_transitions("CartPole-v1", 600, seed=0)
    model, _ = ensemble.fit_world_model(buf, max_epochs=2, seed=0)
    return model, buf


def frames_of(path):
    reader = imageio.get_reader(path)
    try:
        return [f for f in reader]
    finally:
        reader.close()


def test_open_loop_figure_png(cartpole_model, tmp_path):
    model, _ = cartpole_model
    held = real_env.collect_transitions("CartPole-v1", 300, seed=5, policy=balance, num_envs=2)  # 2 long episodes
    fig = vis.open_loop_figure(model, held, num_episodes=2, horizon=50, seed=0)
    path = vis.save_figure(fig, tmp_path / "sub" / "open_loop.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    width, height = fig.get_size_inches() * vis.DPI
    with Image.open(path) as image:
        assert image.size == (round(width), round(height))
    assert os.path.getsize(path) < 200_000
    assert [p for p in os.listdir(tmp_path / "sub") if p.startswith(".tmp_")] == []
    # one column per episode: (obs dims + reward) panels each, plus the k-step error panel
    assert len(fig.axes) == 2 * (model.obs_dim + 1) + 1
    # the episode panels draw 51 points (start + 50 steps) of the real episode
    real_line = [line for line in fig.axes[0].get_lines() if line.get_label() == "real"][0]
    assert len(real_line.get_xdata()) == 51
    # ... and the column's title says so: 50 of the episode's steps, not its whole length
    lengths = np.bincount(held.episode_ids)
    assert fig.axes[0].get_title() == f"episode 0 (first 50 of {lengths[0]} steps)"

    class Writer:  # records what log_figure gives a SummaryWriter
        def add_image(self, tag, image, step, dataformats):
            self.logged = (tag, image.shape, image.dtype, step, dataformats)

    writer = Writer()
    vis.log_figure(writer, "world_model/open_loop", fig, 7)
    assert writer.logged == ("world_model/open_loop", (round(height), round(width), 3), np.uint8, 7, "HWC")


def inside(box, outer):
    return box.x0 >= outer.x0 - 0.5 and box.y0 >= outer.y0 - 0.5 and box.x1 <= outer.x1 + 0.5 and \
        box.y1 <= outer.y1 + 0.5


def test_open_loop_figure_one_column_cuts_nothing_off(tmp_path):
    """SAC's refit figure (one long episode, a long title): every text stays inside the figure and no title runs
    into a panel (issue 18: the bottom panel's title was cut off)."""
    buf = real_env.collect_transitions("Pendulum-v1", 450, seed=0)
    net, _ = ensemble.fit_world_model(buf, max_epochs=1, seed=0, ensemble_size=2, hidden_size=16, num_layers=1)
    model = ensemble.EnsembleModel("Pendulum-v1")
    model.net = net

    class Writer:  # what write_open_loop needs of a SummaryWriter
        log_dir = str(tmp_path)

        def add_image(self, *args, **kwargs):
            pass

    newest = buf.newest_episodes(250)
    path = vis.write_open_loop(model, newest, Writer(), 7, "open_loop_before_refit", refit=12345)
    assert os.path.basename(path) == "open_loop_before_refit.png"
    fig = vis.open_loop_figure(model, buf.newest_episodes(50), num_episodes=1, refit=12345)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    page = fig.bbox
    suptitle = fig._suptitle
    assert "before the refit at step 12345" in suptitle.get_text().replace("\n", " ")
    texts = [suptitle, *fig.legends]
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
    for text in texts:
        if getattr(text, "get_text", lambda: "x")():
            assert inside(text.get_window_extent(renderer), page), getattr(text, "get_text", lambda: text)()
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes]
    for ax in fig.axes:
        body = ax.get_window_extent(renderer)
        assert not any(t.overlaps(body) for t in titles), ax.get_title()
    legend = fig.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(suptitle.get_window_extent(renderer)) and not any(t.overlaps(legend) for t in titles)


def test_open_loop_rollout_matches_predict_and_k_step_errors_match_evaluate(cartpole_model):
    model, buf = cartpole_model
    actions = buf.actions[:5]
    out = vis.open_loop_rollout(model, buf.obs[0], actions)
    assert out["mean_obs"].shape == (6, 4) and out["member_obs"].shape == (model.ensemble_size, 6, 4)
    o = torch.as_tensor(buf.obs[:1])
    for a in actions:
        o = model.predict(o, a[None])[0]
    np.testing.assert_allclose(out["mean_obs"][-1], o[0].numpy(), rtol=1e-5, atol=1e-6)
    member2 = torch.as_tensor(buf.obs[:1])
    for a in actions:
        member2 = model.predict(member2, a[None], members=torch.tensor([2]))[0]
    np.testing.assert_allclose(out["member_obs"][2, -1], member2[0].numpy(), rtol=1e-5, atol=1e-6)
    errors, counts = vis.k_step_errors(model, buf, 10)
    reference = ensemble.evaluate_world_model(model, buf, ks=(1, 10))
    assert counts[0] == reference["k_step_count_1"] and counts[9] == reference["k_step_count_10"]
    np.testing.assert_allclose(errors[[0, 9]], [reference["k_step_error_1"], reference["k_step_error_10"]], rtol=1e-4)


def test_record_real_episodes_mp4(tmp_path):
    paths, returns = vis.record_real_episodes(lambda o: np.zeros(len(o), np.int64), "CartPole-v1", 2, seed=3,
                                              video_dir=tmp_path / "videos")
    expected, lengths = real_env.evaluate_in_real_env(lambda o: np.zeros(len(o), np.int64), "CartPole-v1", 2, 3)
    np.testing.assert_array_equal(returns, expected)  # same seeds as evaluate_in_real_env
    assert [os.path.basename(p) for p in paths] == ["CartPole-v1__episode0__seed3.mp4",
                                                    "CartPole-v1__episode1__seed4.mp4"]
    for path, length in zip(paths, lengths):
        frames = frames_of(path)
        assert len(frames) == length + 1  # the reset frame, then one per step
        assert frames[0].shape == (400, 600, 3)


def test_record_real_episodes_clips_box_actions(tmp_path):
    paths, returns = vis.record_real_episodes(lambda o: np.full((len(o), 1), 5.0), "Pendulum-v1", 1, seed=0,
                                              video_dir=tmp_path, max_steps=12)
    assert len(frames_of(paths[0])) == 13 and frames_of(paths[0])[0].shape == (500, 500, 3)
    env = gym.make("Pendulum-v1")
    env.reset(seed=0)
    expected = sum(env.step(np.array([2.0], np.float32))[1] for _ in range(12))  # 5.0 clipped to the bound 2.0
    np.testing.assert_allclose(returns[0], expected, rtol=1e-6)


def test_dream_vs_real_video_cartpole(cartpole_model, tmp_path):
    model, _ = cartpole_model
    path, real_rewards, dream_rewards = vis.dream_vs_real_video(balance, model, "CartPole-v1", seed=1,
                                                                path=tmp_path / "dream.mp4", horizon=25)
    assert str(path).endswith("dream.mp4") and len(real_rewards) == len(dream_rewards) == 25
    np.testing.assert_array_equal(real_rewards, np.ones(25))
    frames = frames_of(path)
    assert len(frames) == 26
    assert frames[0].shape == (400 + 28, 2 * 600, 3)  # caption strip on top of dream | real
    # at the start both halves show the same state
    first = frames[0][28:].astype(int)
    assert np.abs(first[:, :600] - first[:, 600:]).mean() < 2.0
    # the world-model interface's ensemble dreams the same (its network's predict)
    wrapped = ensemble.EnsembleModel("CartPole-v1")
    wrapped.net = model
    _, again, dreamed = vis.dream_vs_real_video(balance, wrapped, "CartPole-v1", seed=1, path=tmp_path / "d2.mp4",
                                                horizon=25)
    np.testing.assert_array_equal(again, real_rewards)
    np.testing.assert_array_equal(dreamed, dream_rewards)


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "Acrobot-v1", "MountainCar-v0", "MountainCarContinuous-v0"])
def test_state_from_obs_round_trips(env_id):
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        obs, *_ = env.step(env.action_space.sample())
    other = gym.make(env_id)
    other.reset(seed=1)
    vis.set_state_from_obs(other, obs)
    get_obs = getattr(other.unwrapped, "_get_obs", None) or getattr(other.unwrapped, "_get_ob", None)
    np.testing.assert_allclose(get_obs() if get_obs else other.unwrapped.state, obs, rtol=1e-5, atol=1e-6)


def test_dream_vs_real_video_box_actions(tmp_path):
    buf = real_env.collect_transitions("Pendulum-v1", 300, seed=0)
    model, _ = ensemble.fit_world_model(buf, max_epochs=1, seed=0)
    path, real_rewards, dream_rewards = vis.dream_vs_real_video(
        lambda o: np.full((len(o), 1), 3.0), model, "Pendulum-v1", seed=0, path=tmp_path / "p.mp4", horizon=6,
        policy_on="dream")
    frames = frames_of(path)
    assert len(frames) == 7 and frames[0].shape == (500 + 28, 1000, 3)
    assert np.all(real_rewards <= 0) and len(dream_rewards) == 6


def test_dream_vs_real_video_unsupported_env(cartpole_model, tmp_path):
    model, _ = cartpole_model
    with pytest.raises(ValueError, match="needs an env whose state can be set"):
        vis.dream_vs_real_video(balance, model, "FrozenLake-v1", seed=0, path=tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="does not fit"):  # a settable env of other spaces than the model's
        vis.dream_vs_real_video(balance, model, "Acrobot-v1", seed=0, path=tmp_path / "x.mp4")
    assert os.listdir(tmp_path) == []


def write_summary(runs_dir, name, algo, env_id, seed, world_model, xs, ys, **extra):
    os.makedirs(runs_dir / name)
    history = [{"global_step": i, "real_env_steps": x, "real_return_mean": y} for i, (x, y) in enumerate(zip(xs, ys))]
    summary = {"algo": algo, "env_id": env_id, "seed": seed, "world_model": world_model, "eval_history": history,
               "real_return_mean": ys[-1] if ys else None, "real_env_steps": xs[-1] if xs else 0,
               "target_return": 475.0, **extra}
    (runs_dir / name / "summary.json").write_text(json.dumps(summary))


def test_text_width_of_a_wrapped_label_is_its_widest_line():
    # plot_runs sizes its legend from labels that wrap_to_width broke into lines
    label = "svg_dhmbpo (imagined in examples/known_termination.py:dhmbpo_homoscedastic), 3 seeds"
    wrapped = vis.wrap_to_width(label, 7, 2.0)
    lines = wrapped.split("\n")
    assert len(lines) > 1 and all(vis.text_width(line, 7) <= 2.0 or " " not in line for line in lines)
    assert vis.text_width(wrapped, 7) == max(vis.text_width(line, 7) for line in lines)
    assert vis.text_width(wrapped, 7) < vis.text_width(label, 7)


def test_plot_runs_step_function():
    import plot_runs

    xs, ys = np.array([100.0, 200.0, 200.0, 400.0]), np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(plot_runs.step_values(xs, ys, np.array([50, 100, 150, 200, 399, 400, 500])),
                                  [np.nan, 1, 1, 3, 3, 4, 4])  # a finished run keeps its final return
    # a seed that stopped early at 150 with 9 still counts at 300, where the other seed is evaluated
    stopped = {"eval_history": [], "real_env_steps": 150, "real_return_mean": 9.0}
    still = {"eval_history": [{"real_env_steps": 100, "real_return_mean": 1.0}], "real_env_steps": 300,
             "real_return_mean": 3.0}
    _, mean, _, _, _ = plot_runs.group_curve([stopped, still])
    np.testing.assert_array_equal(mean, [1, 5, 6])
    runs = [{"eval_history": [{"real_env_steps": 100, "real_return_mean": 1.0}],
             "real_env_steps": 300, "real_return_mean": 3.0},
            {"eval_history": [{"real_env_steps": 200, "real_return_mean": 5.0}],
             "real_env_steps": 300, "real_return_mean": 7.0}]
    grid, mean, low, high, n = plot_runs.group_curve(runs)
    np.testing.assert_array_equal(grid, [100, 200, 300])
    np.testing.assert_array_equal(mean, [1, 3, 5])
    np.testing.assert_array_equal(low, [1, 1, 3])
    np.testing.assert_array_equal(high, [1, 5, 7])
    assert n == 2


def test_plot_runs_cli_headless(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_summary(runs, f"CartPole-v1__ppo_imagined__{seed}", "ppo_imagined", "CartPole-v1", seed, "learned",
                      [2000, 2000, 3000, 4000], [20.0, 50.0, 150.0, 300.0 + seed])
        write_summary(runs, f"CartPole-v1__ppo_imagined_model_free__{seed}", "ppo_imagined", "CartPole-v1", seed,
                      "none", [5000, 20000, 60000], [30.0, 100.0, 400.0])
    write_summary(runs, "Pendulum-v1__sac_imagined__1", "sac_imagined", "Pendulum-v1", 1, "learned",
                  [1000, 5000], [-1200.0, -300.0])
    (runs / "broken").mkdir()
    (runs / "broken" / "summary.json").write_text("{not json")
    # also checks headless use: no DISPLAY, no MPLBACKEND / SDL_VIDEODRIVER set by the caller
    probe = ("import os, visualize, matplotlib, gymnasium as gym; "
             "env = gym.make('CartPole-v1', render_mode='rgb_array'); env.reset(seed=0); "
             "print(matplotlib.get_backend().lower(), os.environ['SDL_VIDEODRIVER'], env.render().shape)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=headless_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["agg", "dummy", "(400,", "600,", "3)"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "plot_runs.py"), "--runs-dir", "runs", "--out",
                             "curves.png"], cwd=tmp_path, env=headless_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    out_path = tmp_path / "curves.png"
    assert f"wrote {out_path}" in result.stdout and "5 runs, 2 env(s)" in result.stdout
    assert "skipping" in result.stderr and "broken" in result.stderr
    with Image.open(out_path) as image:
        assert image.format == "PNG" and image.size[0] > 600


def test_plot_runs_draws_interrupted_runs_up_to_where_they_stopped(tmp_path, capsys):
    import plot_runs

    runs = tmp_path / "runs"
    write_summary(runs, "a", "ppo_imagined", "CartPole-v1", 1, "ensemble", [1000, 2000, 3000], [10.0, 20.0, 30.0],
                  status="finished")
    # stopped by Ctrl-C after two evaluations: its summary repeats the last one at the real steps it had by then
    write_summary(runs, "b", "ppo_imagined", "CartPole-v1", 2, "ensemble", [1000, 2000], [12.0, 22.0],
                  status="interrupted", from_last_eval=True, real_env_steps=2500)
    write_summary(runs, "c", "ppo_imagined", "CartPole-v1", 3, "ensemble", [], [], status="failed", error="boom")
    write_summary(runs, "d", "train_world_model", "CartPole-v1", 1, "ensemble", [], [], status="finished")
    summaries = plot_runs.load_summaries(str(runs))
    notes = capsys.readouterr().out
    assert [s["seed"] for s in summaries] == [1, 2]
    assert "b/summary.json stopped early (status interrupted)" in notes
    assert "c/summary.json has no evaluation" in notes and "d/summary.json has no evaluation" in notes
    # the interrupted seed counts up to its last evaluation, not beyond (and not at 2500, where it was stopped)
    grid, mean, low, high, n = plot_runs.group_curve(summaries)
    np.testing.assert_array_equal(grid, [1000, 2000, 3000])
    np.testing.assert_array_equal(mean, [11, 21, 30])
    np.testing.assert_array_equal(high, [12, 22, 30])
    assert n == 2
    fig = plot_runs.curves_figure(summaries)
    labels = fig.axes[0].get_legend().get_texts()
    assert [t.get_text() for t in labels][:2] == ["ppo_imagined (imagined), 2 seeds (1 stopped early)",
                                                 "stopped early (interrupted or failed): last evaluation"]
    stopped = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("stopped early")]
    assert len(stopped) == 1 and list(stopped[0].get_xydata()[0]) == [2000, 22]
    # the final-evaluation marker is the finished seed's alone
    finals = [c for c in fig.axes[0].containers if hasattr(c, "lines")]
    assert len(finals) == 1 and list(finals[0].lines[0].get_xydata()[0]) == [3000, 30]


def test_plot_runs_separates_experiments_and_draws_published_means(tmp_path):
    import plot_runs

    runs = tmp_path / "runs"
    for seed in (1, 2):  # the same script and setting under two --exp-name: two curves
        for name, final in (("sac_imagined_model_free", 300.0), ("cleanrl", 1800.0)):
            run = f"HalfCheetah-v5__{name}__{seed}__1"
            write_summary(runs, run, "sac_imagined", "HalfCheetah-v5", seed, "none", [5000, 20000], [0.0, final],
                          run_dir=f"runs/{run}")
    summaries = plot_runs.load_summaries(str(runs))
    labels = [t.get_text() for t in plot_runs.curves_figure(summaries).axes[0].get_legend().get_texts()]
    assert "cleanrl (model-free), 2 seeds" in labels and "sac_imagined_model_free (model-free), 2 seeds" in labels
    published = [line for line in plot_runs.curves_figure(summaries).axes[0].get_lines()
                 if line.get_label() == "published MBPO (older MuJoCo)"]
    assert len(published) == 1 and published[0].get_xydata().tolist() == [[20000, 4236], [50000, 7963],
                                                                          [100000, 9553]]
    ax = plot_runs.curves_figure(summaries, published=False).axes[0]
    assert not [line for line in ax.get_lines() if line.get_label().startswith("published")]


def test_plot_runs_empty_dir_error(tmp_path):
    import plot_runs
    import rl_utils

    (tmp_path / "empty").mkdir()
    with pytest.raises(rl_utils.ArgError) as info:
        plot_runs.load_summaries(str(tmp_path / "empty"))
    message = str(info.value)
    assert message.startswith("error: --runs-dir:") and "No summary.json found in" in message
    assert str(tmp_path / "empty") in message and "\n" not in message
    with pytest.raises(rl_utils.ArgError, match="does not exist"):
        plot_runs.load_summaries(str(tmp_path / "missing"))
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("script, flags", [
    ("dqn_imagined.py", ["--total-timesteps", "400", "--num-envs", "4", "--learning-starts", "100"]),
    ("sac_imagined.py", ["--env-id", "Pendulum-v1", "--total-timesteps", "300", "--initial-real-steps", "200",
                         "--utd-ratio", "1", "--rollout-batch-size", "256", "--refit-passes", "1"]),
])
def test_capture_video_flag_writes_real_and_dream_videos(tmp_path, script, flags):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = ["--initial-real-steps", "200", "--real-iterations", "0"] if script == "dqn_imagined.py" else []
    out = subprocess.run([sys.executable, os.path.join(repo, script), *base, *flags, "--eval-episodes", "2",
                          "--capture-video"], cwd=tmp_path, env=headless_env(), capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    videos = sorted(p.name for p in (run_dir / "videos").iterdir())
    assert videos[-1] == "dream_vs_real.mp4" and len(videos) == 3
    single = frames_of(run_dir / "videos" / videos[0])
    dream = frames_of(run_dir / "videos" / "dream_vs_real.mp4")
    assert single[0].shape[1] * 2 <= dream[0].shape[1] and dream[0].shape[0] > single[0].shape[0]
    # the recorded real episodes are the final evaluation's: one frame per step plus the reset frame
    lengths = [len(frames_of(run_dir / "videos" / v)) - 1 for v in videos[:2]]
    if script == "dqn_imagined.py":  # CartPole pays 1 per step: the videos' lengths are the evaluated returns
        assert lengths == [int(r) for r in summary["real_returns"]]
    else:  # Pendulum's episodes always run to the 200-step limit
        assert lengths == [200, 200]
