# Learning curves of finished runs: real return against the real transitions used, one panel per env.
#
#   python plot_runs.py                                   # reads runs/*/summary.json, writes curves.png
#   python plot_runs.py --runs-dir runs --out curves.png --spread std
#
# Every training script writes runs/<run>/summary.json (algo, env_id, seed, world_model, eval_history with
# real_env_steps and real_return_mean per evaluation, and the final real_return_mean / real_env_steps). Runs of the
# same script and world model ("learned" = trained in imagination, "none" = model-free baseline) are one curve: each
# seed is a step function (the return of its latest evaluation at or before x), the curve is the mean over the seeds
# that have an evaluation at x, the band their min..max (or +-std). The x axis is log-scaled by default, so a run that
# used 3k real transitions and one that used 60k are both readable.
import glob
import json
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_utils as ru  # noqa: E402
import visualize as vis  # noqa: E402

# one line style per world-model setting, one colour per script
LINESTYLES = {"learned": "-", "none": "--"}
SETTING_NAMES = {"learned": "imagined", "none": "model-free"}


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


def load_summaries(runs_dir, env_id=None):
    """The readable summary.json files directly under runs_dir/<run>/ (sorted by path); unreadable or incomplete
    ones are skipped with a warning line. ArgError when there is none (it names the directory)."""
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
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"[plot_runs] skipping {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if env_id is None or s["env_id"] == env_id:
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
    evaluation; sorted by x (stable: of several evaluations at the same x the later one counts)."""
    xs, ys = [], []
    for entry in list(summary.get("eval_history") or []) + [summary]:
        x, y = entry.get("real_env_steps"), entry.get("real_return_mean")
        if x is None or y is None:
            continue
        xs.append(float(x))
        ys.append(float(y))
    order = np.argsort(xs, kind="stable")
    return np.asarray(xs)[order], np.asarray(ys)[order]


def step_values(xs, ys, grid):
    """The return of the latest evaluation at or before each grid x; nan before the first. A run that ended (early
    stop or budget) keeps its final return: it would use no more real data, and dropping it would pull the mean
    towards the seeds that are still struggling."""
    idx = np.searchsorted(xs, grid, side="right") - 1
    return np.where(idx >= 0, ys[np.clip(idx, 0, None)], np.nan)


def group_curve(summaries, spread="minmax"):
    """Mean and band over the seeds of one group on the union of their evaluation x values.
    Returns (grid, mean, low, high, n_runs)."""
    points = [p for p in map(evaluation_points, summaries) if len(p[0])]
    if not points:
        return None
    grid = np.unique(np.concatenate([xs for xs, _ in points]))
    values = np.stack([step_values(xs, ys, grid) for xs, ys in points])
    with warnings.catch_warnings():  # all-nan columns cannot occur on the union grid, but stay quiet if they do
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        if spread == "std":
            std = np.nanstd(values, axis=0)
            low, high = mean - std, mean + std
        else:
            low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    return grid, mean, low, high, len(points)


def curves_figure(summaries, spread="minmax", log_x=True):
    """One panel per env_id: per (algo, world_model) the mean real return over seeds against real transitions used,
    with the seeds' band; colour = script, line style = imagined (solid) / model-free (dashed). A big marker shows
    the final evaluation (mean over seeds) so a group whose real data never grew (one x value) is visible too."""
    env_ids = sorted({s["env_id"] for s in summaries})
    algos = sorted({s["algo"] for s in summaries})
    ncols = min(3, len(env_ids))
    nrows = int(np.ceil(len(env_ids) / ncols))
    fig = vis.new_figure(5.6 * ncols, 4.6 * nrows + 0.4)
    for k, env_id in enumerate(env_ids):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        runs = [s for s in summaries if s["env_id"] == env_id]
        targets = {s.get("target_return") for s in runs} - {None}
        for algo in algos:
            for setting in ("learned", "none"):
                group = [s for s in runs if s["algo"] == algo and s["world_model"] == setting]
                curve = group_curve(group, spread) if group else None
                if curve is None:
                    continue
                grid, mean, low, high, n = curve
                color = f"C{algos.index(algo) % 10}"
                label = f"{algo} ({SETTING_NAMES.get(setting, setting)}), {n} seed{'s' if n != 1 else ''}"
                ax.plot(grid, mean, drawstyle="steps-post", color=color, linestyle=LINESTYLES.get(setting, ":"),
                        linewidth=1.6, label=label)
                ax.fill_between(grid, low, high, step="post", color=color, alpha=0.15, linewidth=0)
                finals = np.array([[s["real_env_steps"], s["real_return_mean"]] for s in group
                                   if s.get("real_env_steps") is not None and s.get("real_return_mean") is not None],
                                  dtype=float)
                if len(finals):
                    fx, fy = finals[:, 0].mean(), finals[:, 1]
                    band = (fy.std(), fy.std()) if spread == "std" else (fy.mean() - fy.min(), fy.max() - fy.mean())
                    ax.errorbar([fx], [fy.mean()], yerr=np.array(band).reshape(2, 1), color=color,
                                marker="o" if setting == "learned" else "s", markersize=6, capsize=3,
                                markerfacecolor="white" if setting == "none" else color)
        if len(targets) == 1:
            ax.axhline(targets.pop(), color="grey", linestyle=":", linewidth=1.0, label="target return")
        if log_x:
            ax.set_xscale("log")
        ax.set_title(env_id, fontsize=10)
        ax.set_xlabel("real transitions used (world-model data + Dyna, or the learner's own)", fontsize=8)
        ax.set_ylabel("real return (deterministic policy)", fontsize=8)
        ax.grid(alpha=0.3, which="both" if log_x else "major")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)  # off the curves
    band = "min..max" if spread == "minmax" else "mean +- std"
    fig.suptitle(f"Real return against real transitions\nmean over seeds, band = {band}, marker = final evaluation",
                 fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    args = tyro.cli(Args)
    summaries = load_summaries(args.runs_dir, args.env_id)
    figure = curves_figure(summaries, spread=args.spread, log_x=args.log_x)
    vis.save_figure(figure, args.out)
    envs = sorted({s["env_id"] for s in summaries})
    print(f"[plot_runs] {len(summaries)} runs, {len(envs)} env(s) ({', '.join(envs)}): "
          f"wrote {os.path.abspath(args.out)}")
