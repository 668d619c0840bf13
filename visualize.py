"""Pictures of a world model and a policy (no CLI): open-loop prediction figures, real-episode videos and
dream-vs-real videos. Everything here runs headless: figures are drawn with matplotlib's Agg canvas (no pyplot
window), videos with Gymnasium's render_mode="rgb_array" (pygame with SDL_VIDEODRIVER=dummy when there is no
display) and written as mp4 with imageio + imageio-ffmpeg.

- `open_loop_figure(model, buffer, ...)`: real held-out episodes against the model's open-loop prediction from the
  same start state with the same real actions (ensemble mean and the members' min..max band), plus the k-step error
  against the horizon. `save_figure` writes it as a PNG (atomically), `log_figure` puts it into TensorBoard.
- `record_real_episodes(act_fn, env_id, ...)`: one mp4 per real episode of the policy.
- `dream_vs_real_video(act_fn, model, env_id, ...)`: the same actions played in the world model and in the real env,
  rendered side by side ("dream | real") for the classic control envs whose state can be set.
"""
import os

# Headless defaults; an explicit choice of the user (MPLBACKEND, SDL_VIDEODRIVER) is left alone.
os.environ.setdefault("MPLBACKEND", "Agg")
if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import gymnasium as gym
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import ensemble
import real_env
from run_io import atomic_path

DPI = 100
MAX_DIMS = 12  # observation dimensions drawn in an open-loop figure (the first ones); more make it unreadable

# Readable names of the observation dimensions of the classic control envs (others get obs[i]).
OBS_NAMES = {
    "CartPoleEnv": ["cart position", "cart velocity", "pole angle", "pole ang. velocity"],
    "PendulumEnv": ["cos θ", "sin θ", "θ velocity"],
    "AcrobotEnv": ["cos θ1", "sin θ1", "cos θ2", "sin θ2", "θ1 velocity", "θ2 velocity"],
    "MountainCarEnv": ["position", "velocity"],
    "Continuous_MountainCarEnv": ["position", "velocity"],
    "CartPoleNoVelEnv": ["cart position", "pole angle"],
    "PendulumNoVelEnv": ["cos θ", "sin θ"],
}


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------
def new_figure(width, height, dpi=DPI):
    """A matplotlib Figure on an Agg canvas: no pyplot, no window, no global figure list to leak into."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi=DPI):
    """Writes `fig` as a PNG to `path` atomically (temporary file in the same directory, then os.replace), as a
    256-colour palette image (line plots lose nothing visible; the file is ~3x smaller than RGBA).
    The figure stays open (log it afterwards with `log_figure`). Returns the path."""
    return save_image(figure_to_array(fig, dpi=dpi), path)


def save_image(image, path):
    """Writes an (H, W, 3) uint8 image as `save_figure` does (atomically, a 256-colour palette PNG)."""
    from PIL import Image

    with atomic_path(path, ".png") as tmp:
        Image.fromarray(image).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG",
                                                                                         optimize=True)
    return os.fspath(path)


def write_figure(fig, writer, name, step):
    """`fig` rendered once, as runs/<run>/{name}.png (the latest one) and as the TensorBoard image
    `world_model/{name}` at `step` (one per call; rendering is most of a figure's cost). Returns the PNG's path."""
    image = log_figure(writer, f"world_model/{name}", fig, step)
    return save_image(image, os.path.join(writer.log_dir, f"{name}.png"))


def figure_to_array(fig, dpi=None):
    """The figure's pixels as an (H, W, 3) uint8 array, rendered with Agg at `dpi` (default: the figure's)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    old = fig.dpi
    if dpi is not None:
        fig.set_dpi(dpi)
    try:
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
    finally:
        fig.set_dpi(old)


def log_figure(writer, tag, fig, step):
    """Adds `fig` to TensorBoard as an image (writer: a torch.utils.tensorboard SummaryWriter). Renders with Agg
    directly (no pyplot), so it works headless. Returns the (H, W, 3) image."""
    image = figure_to_array(fig)
    writer.add_image(tag, image, step, dataformats="HWC")
    return image


def write_open_loop(model, buffer, writer, step, name="open_loop", refit=None):
    """The open-loop figure of `model` (an `ensemble.EnsembleModel` or its network) on `buffer`'s episodes, as
    runs/<run>/{name}.png (the latest one) and as a TensorBoard image `world_model/{name}` at `step` (one per call).
    `refit`: the learner step of the refit the figure comes before, named in its title. Returns the PNG's path."""
    return write_figure(open_loop_figure(model, buffer, refit=refit), writer, name, step)


def obs_names(model_or_env_id, obs_dim):
    """Names of the observation dimensions for axis labels (obs[i] for envs without known names)."""
    env_id = getattr(model_or_env_id, "env_id", model_or_env_id)
    names = None
    if env_id is not None:
        try:
            env = gym.make(env_id)
            names = OBS_NAMES.get(type(env.unwrapped).__name__)
            env.close()
        except gym.error.Error:
            names = None
    if names is None or len(names) != obs_dim:
        names = [f"obs[{i}]" for i in range(obs_dim)]
    return names


def _set_view(ax, real, predicted):
    """y-limits that show the real curve well: the prediction is shown up to 2 real spans beyond it, so a diverging
    prediction does not flatten the real curve; a constant real curve gets a band of +-12.5% of its value."""
    lo, hi = float(np.min(real)), float(np.max(real))
    span = hi - lo
    if span < 1e-9:
        span = max(0.25 * abs(lo), 0.1)
    lo_v = min(lo, max(float(np.min(predicted)), lo - 2 * span))
    hi_v = max(hi, min(float(np.max(predicted)), hi + 2 * span))
    margin = 0.08 * max(hi_v - lo_v, 1e-9) if hi_v - lo_v > 1e-9 else 0.5 * span
    ax.set_ylim(lo_v - margin, hi_v + margin)


def _episode_bounds(buffer):
    """(episode id, first row, length) of each episode of an episode-contiguous TransitionBuffer."""
    ids = buffer.episode_ids
    if len(ids) == 0:
        return []
    cuts = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(ids)]])
    return [(int(ids[s]), int(s), int(e - s)) for s, e in zip(starts, ends)]


_RENDERER = None


def text_width(text, fontsize):
    """The width in inches of `text` in the default font at `fontsize` points: its widest line (a label that
    `wrap_to_width` broke is as wide as its longest line, not as all of them in one)."""
    global _RENDERER
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    _RENDERER = _RENDERER or RendererAgg(1, 1, DPI)
    font = FontProperties(size=fontsize)
    return max(_RENDERER.get_text_width_height_descent(line, font, ismath=False)[0] for line in text.split("\n")) / DPI


def wrap_to_width(text, fontsize, width):
    """`text` with line breaks between words, so that no line is wider than `width` inches at `fontsize`."""
    lines = []
    for word in text.split(" "):
        if lines and text_width(lines[-1] + " " + word, fontsize) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def legend_columns(labels, width, fontsize=8):
    """The most columns in which a figure legend of `labels` fits `width` inches (matplotlib fills it column by
    column; each column as wide as its widest entry: handle, pad, text and the spacing to the next column)."""
    entry = [text_width(label, fontsize) + 4.8 * fontsize / 72 for label in labels]
    for ncol in range(len(labels), 1, -1):
        rows = -(-len(labels) // ncol)
        if sum(max(entry[i:i + rows]) for i in range(0, len(labels), rows)) <= width:
            return ncol
    return 1


# the entries of the open-loop figure's legend, in the order the panels draw them (those drawn are shown)
OPEN_LOOP_LABELS = ("members min..max", "model (ensemble mean)", "real", "real: terminated",
                    "model: terminated (first)")


@torch.no_grad()
def open_loop_rollout(model, obs0, actions):
    """Replays `actions` (T real actions) open loop from the real observation `obs0`: the ensemble mean step by
    step, and each member on its own (its own state, its own mean prediction). Returns a dict of numpy arrays:
    mean_obs (T+1, d) and member_obs (E, T+1, d) (row 0 is obs0), mean_reward (T,), member_reward (E, T) and
    mean_term_prob (T,): the ensemble's P(terminated) at each step of the mean rollout."""
    dev, E, T = model.device, model.ensemble_size, len(actions)
    o_mean = torch.as_tensor(np.asarray(obs0, dtype=np.float32)[None], device=dev)
    o_mem = o_mean.expand(E, -1).clone()
    members = torch.arange(E, device=dev)
    mean_obs, member_obs = [o_mean[0].cpu().numpy()], [o_mem.cpu().numpy()]
    mean_reward, member_reward, term_prob = [], [], []
    for t in range(T):
        a = actions[t: t + 1]
        o_mean, r, logit, _ = model.predict(o_mean, a)
        o_mem, r_mem, _, _ = model.predict(o_mem, np.repeat(a, E, axis=0), members=members)
        mean_obs.append(o_mean[0].cpu().numpy())
        member_obs.append(o_mem.cpu().numpy())
        mean_reward.append(float(r[0]))
        member_reward.append(r_mem.cpu().numpy())
        term_prob.append(float(torch.sigmoid(logit[0])))
    return {
        "mean_obs": np.stack(mean_obs), "member_obs": np.stack(member_obs, axis=1),
        "mean_reward": np.asarray(mean_reward), "member_reward": np.stack(member_reward, axis=1).reshape(E, T),
        "mean_term_prob": np.asarray(term_prob),
    }


@torch.no_grad()
def k_step_errors(model, buffer, horizon, max_segments=2000, seed=0, with_median=False):
    """Open-loop error after k = 1..horizon real actions, with the ensemble mean, from up to `max_segments` random
    real start rows; a segment counts for k while it stays inside its episode. The error is the mean squared error
    in units of the data's per-dimension obs std (the same quantity as evaluate_world_model's k_step_error_k).
    Returns (errors (horizon,) with nan where no segment is that long, counts (horizon,)), plus the medians
    (horizon,) with `with_median` (the mean is dominated by the few segments that leave the data's range)."""
    ids, n = buffer.episode_ids, len(buffer)
    errors, counts = np.full(horizon, np.nan), np.zeros(horizon, dtype=np.int64)
    medians = np.full(horizon, np.nan)
    if n == 0:
        return (errors, counts, medians) if with_median else (errors, counts)
    rows = np.arange(n)
    if n > max_segments:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_segments, replace=False))
    dev = model.device
    o = torch.as_tensor(buffer.obs[rows], device=dev)
    true_next = torch.as_tensor(buffer.next_obs, device=dev)
    for j in range(horizon):
        idx = rows + j
        keep = idx < n
        keep[keep] = ids[idx[keep]] == ids[rows[keep]]
        if not keep.any():
            break
        rows, idx, o = rows[keep], idx[keep], o[torch.as_tensor(keep, device=dev)]
        o, _, _, _ = model.predict(o, buffer.actions[idx])
        err = (((o - true_next[torch.as_tensor(idx, device=dev)]) / model.obs_std) ** 2).mean(-1)
        errors[j], counts[j], medians[j] = float(err.mean()), len(rows), float(err.median())
    return (errors, counts, medians) if with_median else (errors, counts)


def open_loop_figure(model, buffer, num_episodes=3, horizon=60, seed=0, max_dims=MAX_DIMS, max_segments=2000,
                     refit=None):
    """Figure of `model` (an `ensemble.EnsembleModel` or its `EnsembleWorldModel`): for `num_episodes` real
    episodes of `buffer` (pass HELD-OUT data, e.g. the validation split of TransitionBuffer.split_episodes), every
    observation dimension and the reward over up to `horizon` steps: real (black) against the model's open-loop
    prediction from the same real start state with the same real actions, ensemble mean (blue) with the band
    min..max over the members (each member rolled out on its own). An episode shorter than `horizon` is drawn over
    its whole length; episodes at least `horizon` long are preferred (random choice by `seed`), else the longest; a
    column's title says how much of its episode is drawn ("first 60 of 263 steps"). The reward row marks the real
    termination (dashed) and the first step the model's mean rollout predicts termination (red x). The bottom
    panel: the k-step error (mean over all segments of the buffer, in obs-std units, see `k_step_errors`) against k.
    `refit`: the learner step of the refit the figure comes before, named in the title. Every text is wrapped to
    the width it has, so nothing is cut off (one column too). Returns a matplotlib Figure (Agg, 100 dpi)."""
    model = getattr(model, "net", model)  # an ensemble.EnsembleModel draws its network
    episodes = _episode_bounds(buffer)
    if not episodes:
        raise ValueError("open_loop_figure: the buffer has no transitions")
    if num_episodes < 1 or horizon < 1:
        raise ValueError(f"open_loop_figure: num_episodes and horizon must be >= 1, got {num_episodes}, {horizon}")
    lengths = np.array([length for _, _, length in episodes])
    long_enough = np.flatnonzero(lengths >= min(horizon, lengths.max()))
    rng = np.random.default_rng(seed)
    chosen = list(rng.permutation(long_enough)[:num_episodes])
    if len(chosen) < num_episodes:  # fill up with the longest of the rest
        rest = [i for i in np.argsort(-lengths, kind="stable") if i not in set(chosen)]
        chosen += rest[: num_episodes - len(chosen)]
    chosen = sorted(chosen)

    d = model.obs_dim
    shown = min(d, max_dims)
    names = obs_names(model, d)[:shown] + ["reward"]
    ncols, nrows = len(chosen), shown + 1
    width = max(6.0, 2.9 * ncols + 0.9)
    left, right = max(0.85, 0.1 * width), 0.02 * width  # inches: room for the y labels on the left
    # every text is wrapped to the width it has and gets the height its lines take (nothing is cut off), so the
    # layout is computed in inches from the top down before anything is drawn
    more = f", first {shown} of {d} obs dims" if shown < d else ""
    when = f" before the refit at step {refit}" if refit is not None else ""
    suptitle = wrap_to_width(f"{model.env_id or 'world model'}{when}: open-loop prediction from the real start state "
                             f"with the real actions ({model.ensemble_size} members{more})", 10, width - 0.3)
    titles = []
    for i in chosen:
        ep_id, _, length = episodes[i]
        T = min(horizon, length)
        terminated = bool(buffer.terminated[episodes[i][1] + length - 1]) and T == length
        steps = f"first {T} of {length} steps" if T < length else f"{length} steps"
        titles.append(f"episode {ep_id} ({steps}{', terminated' if terminated else ''})")
    column = (width - left - right) / ncols - 0.25
    titles = [wrap_to_width(t, 9, column) for t in titles]
    k_horizon = int(max(horizon, 1))
    errors, counts, medians = k_step_errors(model, buffer, k_horizon, max_segments=max_segments, seed=seed,
                                            with_median=True)
    ks = np.arange(1, k_horizon + 1)
    ok = np.isfinite(errors)
    last = int(ks[ok][-1]) if ok.any() else 0
    k_title = wrap_to_width(f"open-loop k-step error of the ensemble mean: all segments of the data that stay inside "
                            f"an episode ({int(counts[0])} at k=1, {int(counts[last - 1]) if last else 0} at "
                            f"k={last})", 9, width - left - right)

    def lines_height(text, fontsize):
        return (text.count("\n") + 1) * fontsize * 1.25 / 72

    legend_top = 0.08 + lines_height(suptitle, 10) + 0.06
    legend_rows = -(-len(OPEN_LOOP_LABELS) // legend_columns(OPEN_LOOP_LABELS, width - 0.3))
    grid_top = legend_top + 0.2 * legend_rows + 0.04 + max(lines_height(t, 9) for t in titles) + 0.1
    grid_height = 1.1 * nrows - 0.05
    k_top = grid_top + grid_height + 0.45 + lines_height(k_title, 9) + 0.1
    height = np.ceil((k_top + 1.55 + 0.5) * DPI) / DPI  # whole pixels: the PNG has exactly the figure size
    fig = new_figure(width, height)
    # top: the episodes (one column each); bottom: the k-step error, with room for the reward row's tick labels
    top_grid = fig.add_gridspec(nrows, ncols, hspace=0.12, wspace=0.3, left=left / width, right=1 - right / width,
                                top=1 - grid_top / height, bottom=1 - (grid_top + grid_height) / height)
    bottom_grid = fig.add_gridspec(1, 1, left=left / width, right=1 - right / width, top=1 - k_top / height,
                                   bottom=0.5 / height)
    for c, i in enumerate(chosen):
        ep_id, first, length = episodes[i]
        T = min(horizon, length)
        rows = slice(first, first + T)
        out = open_loop_rollout(model, buffer.obs[first], buffer.actions[rows])
        real_obs = np.concatenate([buffer.obs[first][None], buffer.next_obs[rows]])
        steps_obs, steps_r = np.arange(T + 1), np.arange(1, T + 1)
        terminated = bool(buffer.terminated[first + T - 1]) and T == length
        for r in range(nrows):
            ax = fig.add_subplot(top_grid[r, c])
            if r < shown:
                x, real = steps_obs, real_obs[:, r]
                mean, member = out["mean_obs"][:, r], out["member_obs"][:, :, r]
            else:
                x, real = steps_r, buffer.rewards[rows]
                mean, member = out["mean_reward"], out["member_reward"]
            ax.fill_between(x, member.min(0), member.max(0), color="C0", alpha=0.22, linewidth=0,
                            label="members min..max")
            ax.plot(x, mean, color="C0", linewidth=1.4, label="model (ensemble mean)")
            ax.plot(x, real, color="black", linewidth=1.2, label="real")
            _set_view(ax, real, np.concatenate([member.min(0), member.max(0), mean]))
            ax.set_xlim(0, T + 1 if terminated else T)  # room for the termination marks at the last step
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
            if r == nrows - 1:
                if terminated:
                    ax.axvline(T, color="black", linestyle="--", linewidth=0.9, label="real: terminated")
                hit = np.flatnonzero(out["mean_term_prob"] > 0.5)
                if len(hit):
                    ax.plot(hit[0] + 1, out["mean_reward"][hit[0]], "x", color="C3", markersize=8, mew=2,
                            label="model: terminated (first)")
                ax.set_xlabel("step", fontsize=8, labelpad=1)
            else:
                ax.tick_params(labelbottom=False)
            if c == 0:
                ax.set_ylabel(names[r], fontsize=8)
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    # one legend for all panels: every label once, in the order the panels drew them
    handles, labels = [], []
    for ax in fig.axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="upper center", ncol=legend_columns(labels, width - 0.3), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1 - legend_top / height), borderaxespad=0.0, borderpad=0.0)
    fig.suptitle(suptitle, fontsize=10, y=1 - 0.08 / height, va="top")

    ax = fig.add_subplot(bottom_grid[0, 0])
    ax.plot(ks[ok], errors[ok], color="C0", marker=".", markersize=3, linewidth=1.4, label="mean")
    ax.plot(ks[ok], medians[ok], color="C0", linestyle="--", linewidth=1.1, label="median")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=0.9, label="1: the data's own spread")
    ax.legend(fontsize=7, loc="best", frameon=False)
    if ok.any() and np.nanmin(medians[ok]) > 0:
        ax.set_yscale("log")
    ax.set_xlim(0.5, max(last, 1) + 0.5)
    ax.set_xlabel("k (open-loop steps with real actions)", fontsize=8)
    ax.set_ylabel("k-step MSE\n(obs std units²)", fontsize=8)
    ax.set_title(k_title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    return fig


def latent_open_loop_figure(model, buffer, num_episodes=2, context=5, horizon=60, num_frames=10, seed=0,
                             max_dims=MAX_DIMS):
    """Figure of a model that offers `open_loop(data, episode, context, horizon, seed)` (a latent model such as
    rssm.RSSMModel, whose state cannot be set from one observation): for `num_episodes` real episodes of `buffer`,
    the belief filtered over the first `context` real steps, then the model alone over the next `horizon` real
    actions, decoded. Vector observations: every dimension (up to `max_dims`) and the reward, real (black) against
    imagined (blue). Pixels (uint8 frames): `num_frames` evenly spaced frames, real row above imagined row, and the
    reward. Returns a matplotlib Figure (Agg, 100 dpi)."""
    ids = np.unique(buffer.episode_ids)
    if len(ids) == 0:
        raise ValueError("latent_open_loop_figure: the buffer has no transitions")
    lengths = np.array([int((buffer.episode_ids == i).sum()) for i in ids])
    order = np.argsort(-lengths, kind="stable")  # the longest episodes show the most of the horizon
    chosen = sorted(int(i) for i in order[:num_episodes])
    rollouts = [model.open_loop(buffer, episode=i, context=context, horizon=horizon, seed=seed) for i in chosen]
    pixels = rollouts[0]["real_obs"].ndim == 4
    env_id = getattr(model, "env_id", None)
    title = (f"{env_id or 'world model'}: the belief filtered over {context} real steps, then the model alone over the "
             f"next real actions (open loop, decoded)")
    if pixels:
        fig = new_figure(max(8.0, 0.9 * num_frames + 1.0), 3.3 * len(chosen) + 0.6)
        rows = fig.subfigures(len(chosen), 1, squeeze=False)[:, 0]
        for sub, i, out in zip(rows, chosen, rollouts):
            T = len(out["real_obs"])
            steps = np.unique(np.linspace(0, max(T - 1, 0), min(num_frames, T)).round().astype(int))
            axes = sub.subplots(3, len(steps), squeeze=False, gridspec_kw={"height_ratios": [1, 1, 0.9]})
            for j, t in enumerate(steps):
                for r, (key, label) in enumerate((("real_obs", "real"), ("imagined_obs", "imagined"))):
                    ax = axes[r, j]
                    ax.imshow(out[key][t], interpolation="nearest")
                    ax.set_xticks([]), ax.set_yticks([])
                    if j == 0:
                        ax.set_ylabel(label, fontsize=8)
                    if r == 0:
                        ax.set_title(f"step {context + t + 1}", fontsize=7)
            gs = axes[2, 0].get_gridspec()
            for ax in axes[2]:
                ax.remove()
            ax = sub.add_subplot(gs[2, :])
            _reward_panel(ax, out, context)
            ax.set_title(f"episode {int(ids[i])}: reward", fontsize=8)
            ax.legend(fontsize=7, loc="lower right")
        fig.suptitle(wrap_to_width(title, 9, fig.get_figwidth() - 0.3), fontsize=9)
        return fig
    d = rollouts[0]["real_obs"].shape[1]
    shown = min(d, max_dims)
    names = obs_names(model, d)[:shown] + ["reward"]
    fig = new_figure(max(6.0, 3.2 * len(chosen) + 0.9), 1.5 * (shown + 1) + 0.9)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(shown + 1, len(chosen), squeeze=False, sharex="col")
    for c, (i, out) in enumerate(zip(chosen, rollouts)):
        steps = context + 1 + np.arange(len(out["real_obs"]))
        for r in range(shown):
            ax = axes[r, c]
            ax.plot(steps, out["real_obs"][:, r], color="black", lw=1.2, label="real")
            ax.plot(steps, out["imagined_obs"][:, r], color="tab:blue", lw=1.2, label="imagined")
            ax.set_ylabel(names[r], fontsize=8) if c == 0 else None
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        axes[0, c].set_title(f"episode {int(ids[i])}", fontsize=9)
        _reward_panel(axes[shown, c], out, context)
        axes[shown, c].set_ylabel("reward", fontsize=8) if c == 0 else None
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(wrap_to_width(title, 9, fig.get_figwidth() - 0.3), fontsize=9)
    return fig


def _reward_panel(ax, out, context):
    steps = context + 1 + np.arange(len(out["real_reward"]))
    ax.plot(steps, out["real_reward"], color="black", lw=1.2, label="real reward")
    ax.plot(steps, out["imagined_reward"], color="tab:blue", lw=1.2, label="imagined reward")
    ax.set_xlabel("step of the episode", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def write_latent_open_loop(model, buffer, writer, step, name="open_loop"):
    """`latent_open_loop_figure` as runs/<run>/{name}.png and the TensorBoard image `world_model/{name}`."""
    return write_figure(latent_open_loop_figure(model, buffer), writer, name, step)


# ----------------------------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------------------------
def _video_writer(path, fps):
    import imageio.v2 as imageio

    # macro_block_size=1: keep the env's frame size exactly (the default would resize to multiples of 16)
    return imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=6,
                              macro_block_size=1, pixelformat="yuv420p", ffmpeg_log_level="error")


def _even(frame):
    """yuv420p needs even sizes: pads one black row/column where needed."""
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))
    return frame


def _make_render_env(env_id, where):
    try:
        return gym.make(env_id, render_mode="rgb_array")
    except gym.error.Error as e:
        raise ValueError(f"{where}: env_id {env_id!r} cannot be created with render_mode='rgb_array' "
                         f"({type(e).__name__}: {e})") from None


def _env_action(act_fn, obs, action_space, clip=True):
    """One action for one env from act_fn on a batch of one observation."""
    a = act_fn(np.asarray(obs, dtype=np.float32)[None])
    a = real_env.clip_action(a, action_space) if clip else real_env.to_numpy(a)
    if isinstance(action_space, gym.spaces.Discrete):
        return int(np.asarray(a).reshape(-1)[0])
    return np.asarray(a, dtype=action_space.dtype).reshape(action_space.shape)


def record_real_episodes(act_fn, env_id, num_episodes, seed, video_dir, clip=True, max_steps=None, model=None):
    """Plays `num_episodes` real episodes (reset seeds seed, seed+1, ..., as evaluate_in_real_env, so the returns
    match it) with act_fn(obs_batch (1, obs_dim) np.float32) -> actions, Box actions clipped to the bounds
    (`clip`), and writes one mp4 per episode to `video_dir` (the env's render_fps; the first frame is the reset
    state, so an episode of L steps has L+1 frames). `max_steps` cuts episodes short (None: to the end).
    With `model`, the policy acts on the real env seen through it (`model.real_env`), as in evaluation.
    Returns (paths, returns (num_episodes,))."""
    paths, returns = [], np.zeros(num_episodes, dtype=np.float64)
    safe_id = env_id.replace("/", "_")
    for i in range(num_episodes):
        env = _make_render_env(env_id, "record_real_episodes")
        env = env if model is None else model.real_env(env)
        fps = env.metadata.get("render_fps") or 30
        path = os.path.join(video_dir, f"{safe_id}__episode{i}__seed{seed + i}.mp4")
        try:
            with atomic_path(path, ".mp4") as tmp:
                writer = _video_writer(tmp, fps)
                try:
                    obs, _ = env.reset(seed=seed + i)
                    writer.append_data(_even(env.render()))
                    steps, done = 0, False
                    while not done and (max_steps is None or steps < max_steps):
                        obs, r, term, trunc, _ = env.step(_env_action(act_fn, obs, env.action_space, clip))
                        returns[i] += r
                        steps += 1
                        done = term or trunc
                        writer.append_data(_even(env.render()))
                finally:
                    writer.close()
        finally:
            env.close()
        paths.append(path)
    return paths, returns


def _angle(cos, sin):
    return float(np.arctan2(sin, cos))


# obs -> env.unwrapped.state for the envs whose rendering depends only on a state that the observation determines
STATE_FROM_OBS = {
    "CartPoleEnv": lambda o: np.asarray(o, dtype=np.float64).copy(),
    "MountainCarEnv": lambda o: np.asarray(o, dtype=np.float64).copy(),
    "Continuous_MountainCarEnv": lambda o: np.asarray(o, dtype=np.float64).copy(),
    "PendulumEnv": lambda o: np.array([_angle(o[0], o[1]), o[2]], dtype=np.float64),
    "AcrobotEnv": lambda o: np.array([_angle(o[0], o[1]), _angle(o[2], o[3]), o[4], o[5]], dtype=np.float64),
}


def state_from_obs_fn(env):
    """obs -> state function for `env` (gym.make(...) or unwrapped); ValueError for envs whose state cannot be set
    from an observation."""
    unwrapped = env.unwrapped
    convert = STATE_FROM_OBS.get(type(unwrapped).__name__)
    if convert is None:
        env_id = unwrapped.spec.id if unwrapped.spec is not None else type(unwrapped).__name__
        raise ValueError(
            f"dream_vs_real_video needs an env whose state can be set from an observation (CartPole, Pendulum, "
            f"Acrobot, MountainCar, MountainCarContinuous); {env_id!r} ({type(unwrapped).__name__}) is not one of "
            "them. Use open_loop_figure to look at the world model of other envs."
        )
    return convert


def set_state_from_obs(env, obs):
    """Puts a classic control env into the state an observation describes, so that env.render() draws it."""
    env.unwrapped.state = state_from_obs_fn(env)(np.asarray(obs, dtype=np.float64))


def _caption(frame_width, texts, height):
    """A black strip (height x 2*frame_width x 3) with one white text per half."""
    from PIL import Image, ImageDraw, ImageFont

    strip = Image.new("RGB", (2 * frame_width, height), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    try:
        font = ImageFont.load_default(size=max(10, int(height * 0.55)))
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    for k, text in enumerate(texts):
        draw.text((k * frame_width + 8, height // 2), text, fill=(255, 255, 255), font=font, anchor="lm")
    return np.asarray(strip)


def dream_vs_real_video(act_fn, model, env_id, seed, path, horizon=200, policy_on="real", caption_height=28):
    """Side-by-side mp4: the world model's dream (left) and the real env (right), same start, same actions.
    `model`: an `ensemble.EnsembleModel` or its `EnsembleWorldModel` (the dream uses its `predict`).

    The real env is reset with `seed`; the dream starts from the same real observation and is stepped with the
    ensemble mean (model.predict, members=None, deterministic). The actions come from the policy acting on the REAL
    observations (policy_on="real", default: the dream then shows where the model's prediction of the policy's own
    trajectory drifts) or on the dream's observations (policy_on="dream": what the policy "thinks" happens while the
    real env gets the same actions); Box actions are clipped. The dream frame is rendered by a second real env
    instance whose `unwrapped.state` is set from the predicted observation (CartPole, Pendulum, Acrobot, MountainCar,
    MountainCarContinuous; others raise ValueError). The video runs until the real episode ends or `horizon` steps;
    a predicted termination is shown in the caption ("terminated") but the dream is stepped on. The caption strip on
    top names each half with its step, reward and return. Frames: (caption_height + H) x 2W for env frames H x W;
    steps + 1 frames (the first is the common start state).
    Returns (path, real_rewards (steps,), dream_rewards (steps,))."""
    model = getattr(model, "net", model)  # an ensemble.EnsembleModel dreams with its network
    if policy_on not in ("real", "dream"):
        raise ValueError(f"dream_vs_real_video: policy_on must be 'real' or 'dream', got {policy_on!r}")
    if horizon < 1:
        raise ValueError(f"dream_vs_real_video: horizon must be >= 1, got {horizon}")
    real = _make_render_env(env_id, "dream_vs_real_video")
    dream = _make_render_env(env_id, "dream_vs_real_video")
    try:
        state_from_obs_fn(real)  # the ValueError that says which envs work, before anything else
        ensemble.check_env_matches(model, real.observation_space, real.action_space, env_id=repr(env_id))
        action_space = real.action_space
        real_obs, _ = real.reset(seed=seed)
        dream.reset(seed=seed)
        dream_obs = np.asarray(real_obs, dtype=np.float32)
        fps = real.metadata.get("render_fps") or 30
        with atomic_path(path, ".mp4") as tmp:
            writer = _video_writer(tmp, fps)
            real_rewards, dream_rewards = [], []
            dream_term_at = None

            def frame(step, real_r, dream_r):
                set_state_from_obs(dream, dream_obs)
                right, left = real.render(), dream.render()
                if dream_term_at is not None:
                    d_status = f"  (model: terminated at step {dream_term_at})"
                else:
                    d_status = ""
                texts = [f"dream  step {step}  r {dream_r:+.2f}  return {sum(dream_rewards):.1f}{d_status}",
                         f"real  step {step}  r {real_r:+.2f}  return {sum(real_rewards):.1f}"]
                if step == 0:
                    texts = ["dream (world model, ensemble mean)", "real"]
                strip = _caption(left.shape[1], texts, caption_height)
                body = np.concatenate([left, right], axis=1)
                body[:, left.shape[1] - 1: left.shape[1] + 1] = 128  # a grey seam between dream and real
                return _even(np.concatenate([strip, body], axis=0))

            try:
                writer.append_data(frame(0, 0.0, 0.0))
                with torch.no_grad():
                    for step in range(1, horizon + 1):
                        action = _env_action(act_fn, real_obs if policy_on == "real" else dream_obs, action_space)
                        real_obs, r, term, trunc, _ = real.step(action)
                        o, dr, logit, _ = model.predict(torch.as_tensor(dream_obs[None], device=model.device),
                                                        np.asarray(action)[None])
                        dream_obs = o[0].cpu().numpy()
                        if dream_term_at is None and float(logit[0]) > 0:
                            dream_term_at = step
                        if isinstance(action_space, gym.spaces.Box) and hasattr(dream.unwrapped, "last_u"):
                            dream.unwrapped.last_u = float(np.asarray(action).reshape(-1)[0])  # Pendulum's arrow
                        real_rewards.append(float(r))
                        dream_rewards.append(float(dr[0]))
                        writer.append_data(frame(step, float(r), float(dr[0])))
                        if term or trunc:
                            break
            finally:
                writer.close()
    finally:
        real.close()
        dream.close()
    return os.fspath(path), np.asarray(real_rewards), np.asarray(dream_rewards)


def capture_videos(act_fn, env_id, seed, run_dir, num_episodes, model=None):
    """What `--capture-video` writes under runs/<run>/videos/: the real episodes of the final evaluation (same seeds,
    so the same returns as summary.json) and, with a world model and an env whose state can be set, one
    dream-vs-real video from the first of those starts. Returns the paths."""
    video_dir = os.path.join(run_dir, "videos")
    paths, _ = record_real_episodes(act_fn, env_id, num_episodes, seed, video_dir, model=model)
    if isinstance(getattr(model, "net", model), ensemble.EnsembleWorldModel):  # a dream needs the ensemble's predict
        try:
            path = os.path.join(video_dir, "dream_vs_real.mp4")
            paths.append(dream_vs_real_video(act_fn, model, env_id, seed, path)[0])
        except ValueError as e:  # no settable state (MuJoCo and others): the real videos are still there
            print(f"[video] no dream-vs-real video: {e}")
    return paths
