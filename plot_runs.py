# Learning curves of training runs: real return against the real transitions used, one panel per env.
#
#   python plot_runs.py                                   # reads runs/*/summary.json, writes curves.png
#   python plot_runs.py --runs-dir runs --out curves.png --spread std
#
# Every training script writes runs/<run>/summary.json (algo, env_id, seed, world_model, status, eval_history with
# real_env_steps and real_return_mean per evaluation, and the final real_return_mean / real_env_steps). Runs of the
# same --exp-name (the script's name unless given) and world model (`ensemble` or another --world-model spec =
# trained in imagination, `none` = model-free baseline; `learned` in older summaries is the ensemble) are one curve:
# each seed is a step function (the return of its latest evaluation at or before x), the curve is the mean over the
# seeds that have an evaluation at x, the band their min..max (or +-std). The x axis is log-scaled by default, so a
# run that used 3k real transitions and one that used 60k are both readable.
#
# Runs that stopped early (summary "status" interrupted or failed; a summary without "status" is an older finished
# run) are drawn too, up to their last evaluation and no further (a finished seed keeps its final return, an
# unfinished one has none): an x marks where each stopped, the legend counts them, and a note line names them.
# Summaries without any evaluation (train_world_model.py's, a run stopped before its first) are skipped with a note.
import glob
import json
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import tyro
from matplotlib.ticker import FuncFormatter, LogLocator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_utils as ru  # noqa: E402
import visualize as vis  # noqa: E402

# one line style per world-model setting (another --world-model spec: dash-dot), one colour per script
LINESTYLES = {"ensemble": "-", "none": "--"}
SETTING_NAMES = {"ensemble": "imagined", "none": "model-free"}
OLD_SETTINGS = {"learned": "ensemble"}  # the world_model values of older summaries
PANEL_WIDTH = 5.6  # inches
# Published mean returns at 20k / 50k / 100k real steps (issue 21; the results files of the DHMBPO paper, arXiv
# 2512.15439: MBPO 5 seeds, SAC and DHMBPO 8, on Gym's older MuJoCo versions), drawn as reference points
PUBLISHED = {
    "HalfCheetah": {"MBPO": (4236, 7963, 9553), "SAC": (4047, 5733, 7039), "DHMBPO": (5381, 7356, 9878)},
    "Hopper": {"MBPO": (530, 1702, 3315), "SAC": (301, 1125, 2667), "DHMBPO": (2101, 3470, 3399)},
}
PUBLISHED_STEPS = (20_000, 50_000, 100_000)
PUBLISHED_MARKERS = {"MBPO": "^", "SAC": "v", "DHMBPO": "D"}


def setting_of(summary):
    """The world-model setting of a run: `none`, `ensemble` or the --world-model spec it was trained with."""
    return OLD_SETTINGS.get(summary["world_model"], summary["world_model"])


def setting_name(setting):
    return SETTING_NAMES.get(setting, f"imagined in {setting}")


def compact(x, _pos=None):
    """A tick label of real transitions: 500, 2k, 60k, 1.5M (exponents overlap where a run spans one decade)."""
    return f"{x / 1e6:g}M" if abs(x) >= 1e6 else f"{x / 1e3:g}k" if abs(x) >= 1e3 else f"{x:g}"


def finished(summary):
    """Whether a run ended normally (a summary without "status" comes from before runs could stop early)."""
    return summary.get("status", "finished") == "finished"


@dataclass
class Args:
    runs_dir: str = "runs"
    """The directory whose <run>/summary.json files are plotted."""
    out: str = "curves.png"
    """The PNG file the figure is written to."""
    spread: Literal["minmax", "std"] = "minmax"
    """The band around the mean over seeds: `minmax` (min..max) or `std` (mean +- one standard deviation)."""
    log_x: bool = True
    """If toggled, the x axis (real transitions used) is log-scaled."""
    env_id: Optional[str] = None
    """Plot only the runs of this env (None means one panel per env found)."""
    published: bool = True
    """If toggled, MuJoCo panels (HalfCheetah, Hopper) show the published MBPO / SAC / DHMBPO means at 20k, 50k and
    100k real steps as grey reference points (issue 21; older MuJoCo versions than v5)."""


def experiment_of(summary):
    """The --exp-name of a run (its run dir is <env_id>__<exp_name>__<seed>__<time>); runs of one script with
    different names (a baseline at other settings) are separate curves. The script name when it cannot be read."""
    parts = os.path.basename(os.path.normpath(str(summary.get("run_dir", "")))).split("__")
    return parts[1] if len(parts) == 4 else summary["algo"]


def load_summaries(runs_dir, env_id=None):
    """The readable summary.json files directly under runs_dir/<run>/ (sorted by path); unreadable or incomplete
    ones are skipped with a warning line, those without any evaluation with a note, and each run that stopped early
    gets a note. ArgError when there is none (it names the directory)."""
    if not os.path.isdir(runs_dir):
        raise ru.ArgError("--runs-dir", "a directory with <run>/summary.json files written by the training scripts",
                          runs_dir, "The directory does not exist.")
    paths = sorted(glob.glob(os.path.join(runs_dir, "*", "summary.json")))
    summaries = []
    for path in paths:
        try:
            with open(path) as f:
                s = json.load(f)
            for key in ("algo", "env_id", "seed", "world_model"):
                if key not in s:
                    raise KeyError(key)
            evaluated = len(evaluation_points(s)[0]) > 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"[plot_runs] skipping {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if env_id is not None and s["env_id"] != env_id:
            continue
        if not evaluated:
            print(f"[plot_runs] note: {path} has no evaluation to draw ({s['algo']}, status "
                  f"{s.get('status', 'finished')}): skipped")
            continue
        if not finished(s):
            print(f"[plot_runs] note: {path} stopped early (status {s['status']}): its "
                  f"{len(s.get('eval_history') or [])} evaluation(s) are drawn up to where it stopped (x)")
        s["_path"] = path
        summaries.append(s)
    if not summaries:
        what = f" for --env-id {env_id}" if env_id else ""
        unusable = f" ({len(paths)} found, none usable{what})" if paths else what
        raise ru.ArgError("--runs-dir", "a directory with <run>/summary.json files written by the training scripts",
                          runs_dir, f"No summary.json found in {os.path.abspath(runs_dir)}/*/{unusable}. "
                          "Finish a training run first, e.g. `python ppo_imagined.py`.")
    return summaries


def evaluation_points(summary):
    """(x, y) of one run: real_env_steps and real_return_mean of each evaluation in eval_history, then the final
    evaluation (a finished run's only: an unfinished run's summary repeats its last evaluation, at the real steps it
    had when it stopped); sorted by x (stable: of several evaluations at the same x the later one counts)."""
    xs, ys = [], []
    for entry in list(summary.get("eval_history") or []) + ([summary] if finished(summary) else []):
        x, y = entry.get("real_env_steps"), entry.get("real_return_mean")
        if x is None or y is None:
            continue
        xs.append(float(x))
        ys.append(float(y))
    order = np.argsort(xs, kind="stable")
    return np.asarray(xs)[order], np.asarray(ys)[order]


def step_values(xs, ys, grid, keeps_last=True):
    """The return of the latest evaluation at or before each grid x; nan before the first. A run that ended (early
    stop or budget) keeps its final return: it would use no more real data, and dropping it would pull the mean
    towards the seeds that are still struggling. One that was interrupted or failed (`keeps_last=False`) says
    nothing beyond its last evaluation: nan there."""
    idx = np.searchsorted(xs, grid, side="right") - 1
    values = np.where(idx >= 0, ys[np.clip(idx, 0, None)], np.nan)
    return values if keeps_last or not len(xs) else np.where(grid > xs[-1], np.nan, values)


def group_curve(summaries, spread="minmax"):
    """Mean and band over the seeds of one group on the union of their evaluation x values.
    Returns (grid, mean, low, high, n_runs)."""
    points = [(*evaluation_points(s), finished(s)) for s in summaries]
    points = [p for p in points if len(p[0])]
    if not points:
        return None
    grid = np.unique(np.concatenate([xs for xs, _, _ in points]))
    values = np.stack([step_values(xs, ys, grid, done) for xs, ys, done in points])
    with warnings.catch_warnings():  # all-nan columns cannot occur on the union grid, but stay quiet if they do
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        if spread == "std":
            std = np.nanstd(values, axis=0)
            low, high = mean - std, mean + std
        else:
            low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    return grid, mean, low, high, len(points)


def curves_figure(summaries, spread="minmax", log_x=True, published=True):
    """One panel per env_id: per (--exp-name, world_model) the mean real return over seeds against real transitions
    used, with the seeds' band; colour = experiment, line style = imagined in the ensemble (solid) / in another world
    model (dash-dot) / model-free (dashed). A big marker shows the final evaluation of the finished seeds (mean over
    them) so a group whose real data never grew (one x value) is visible too; an x the last evaluation of each seed
    that stopped early (interrupted or failed), whose curve ends there. `published`: the PUBLISHED means of MuJoCo
    panels as grey reference points."""
    env_ids = sorted({s["env_id"] for s in summaries})
    algos = sorted({experiment_of(s) for s in summaries})
    ncols = min(3, len(env_ids))
    nrows = int(np.ceil(len(env_ids) / ncols))
    fig = vis.new_figure(PANEL_WIDTH * ncols, 4.6 * nrows + 0.4)
    legend_rows = 0  # the most text lines a panel's legend column holds: the figure grows with it
    for k, env_id in enumerate(env_ids):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        runs = [s for s in summaries if s["env_id"] == env_id]
        targets = {s.get("target_return") for s in runs} - {None}
        settings = sorted({setting_of(s) for s in runs}, key=lambda x: (x == "none", x != "ensemble", x))
        for algo in algos:
            for setting in settings:
                group = [s for s in runs if experiment_of(s) == algo and setting_of(s) == setting]
                curve = group_curve(group, spread) if group else None
                if curve is None:
                    continue
                grid, mean, low, high, n = curve
                color = f"C{algos.index(algo) % 10}"
                stopped = [s for s in group if not finished(s)]
                label = (f"{algo} ({setting_name(setting)}), {n} seed{'s' if n != 1 else ''}"
                         + (f" ({len(stopped)} stopped early)" if stopped else ""))
                ax.plot(grid, mean, drawstyle="steps-post", color=color, linestyle=LINESTYLES.get(setting, "-."),
                        linewidth=1.6, label=label)
                ax.fill_between(grid, low, high, step="post", color=color, alpha=0.15, linewidth=0)
                for s in stopped:  # where each unfinished seed stopped: its last evaluation
                    xs, ys = evaluation_points(s)
                    ax.plot(xs[-1:], ys[-1:], "x", color=color, markersize=8, mew=2,
                            label="stopped early (interrupted or failed): last evaluation")
                finals = np.array([[s["real_env_steps"], s["real_return_mean"]] for s in group if finished(s)
                                   and s.get("real_env_steps") is not None and s.get("real_return_mean") is not None],
                                  dtype=float)
                if len(finals):
                    fx, fy = finals[:, 0].mean(), finals[:, 1]
                    band = (fy.std(), fy.std()) if spread == "std" else (fy.mean() - fy.min(), fy.max() - fy.mean())
                    ax.errorbar([fx], [fy.mean()], yerr=np.array(band).reshape(2, 1), color=color,
                                marker="s" if setting == "none" else "o", markersize=6, capsize=3,
                                markerfacecolor="white" if setting == "none" else color)
        if len(targets) == 1:
            ax.axhline(targets.pop(), color="grey", linestyle=":", linewidth=1.0, label="target return")
        reference = next((v for k, v in PUBLISHED.items() if env_id.startswith(k)), {}) if published else {}
        for method, means in reference.items():
            ax.plot(PUBLISHED_STEPS, means, linestyle=":", color="grey", marker=PUBLISHED_MARKERS[method],
                    markersize=5, linewidth=0.8, label=f"published {method} (older MuJoCo)")
        if log_x:  # a world model that learns nothing uses no real data: symlog keeps its x = 0 on the axis
            xs = np.concatenate([evaluation_points(s)[0] for s in runs])
            positive = xs[xs > 0]
            if (xs <= 0).any() and len(positive):
                ax.set_xscale("symlog", linthresh=positive.min())
                ax.set_xlim(left=0)
            else:
                ax.set_xscale("log")
                ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2, 5)))  # labelled: 2k, 5k, 20k, ...
                ax.xaxis.set_minor_formatter(FuncFormatter(compact))
            ax.xaxis.set_major_formatter(FuncFormatter(compact))
        ax.set_title(env_id, fontsize=10)
        ax.set_xlabel("real transitions used (world-model data + Dyna, or the learner's own)", fontsize=8)
        ax.set_ylabel("real return (deterministic policy)", fontsize=8)
        ax.grid(alpha=0.3, which="both" if log_x else "major")
        ax.tick_params(which="both", labelsize=8)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))  # the stopped-early marker once
        labels = [vis.wrap_to_width(label, 7, PANEL_WIDTH - 0.6) for label in unique]  # a long --world-model spec
        ncol = min(2, vis.legend_columns(labels, PANEL_WIDTH - 0.2, fontsize=7))
        ax.legend(unique.values(), labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol,
                  frameon=False)
        legend_rows = max(legend_rows, -(-sum(label.count("\n") + 1 for label in labels) // ncol))
    # each row of panels: 3 in of axes and labels, then its legend at about 0.16 in a line of 7-point text
    fig.set_size_inches(PANEL_WIDTH * ncols, nrows * max(4.6, 3.2 + 0.16 * legend_rows) + 0.4)
    band = "min..max" if spread == "minmax" else "mean +- std"
    fig.suptitle(f"Real return against real transitions\nmean over seeds, band = {band}, marker = final evaluation",
                 fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    args = tyro.cli(Args)
    summaries = load_summaries(args.runs_dir, args.env_id)
    figure = curves_figure(summaries, spread=args.spread, log_x=args.log_x, published=args.published)
    vis.save_figure(figure, args.out)
    envs = sorted({s["env_id"] for s in summaries})
    print(f"[plot_runs] {len(summaries)} runs, {len(envs)} env(s) ({', '.join(envs)}): "
          f"wrote {os.path.abspath(args.out)}")
