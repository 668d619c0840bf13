"""Where does benchmark.py's `floor` (the least a batched env adds to the raw model step) spend its time? The floor
of `benchmark_parts.floor_case`, timed again with one part left out at a time, interleaved with the raw step on the
same MLP world model (1 torch thread, like benchmark.py). Context for `batched_vs_raw_256`; seconds, not minutes.

    python examples/floor_breakdown.py [--num-envs 256 --repeats 15 --min-time 0.2]

The parts: `check` (the one-reduction action check), `copies` (fresh copies of observations, rewards and flags),
`resets` (each finished row's next seed from its stream and the user's `reset_fn` for those rows; left out, the rows
restart from fixed start states instead, so the episodes stay bounded), `finite` (the one-sum finiteness check).
`none` leaves out all four: counters, time limit, done flags and row indices remain.
"""
import argparse
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark_parts import FLOOR_PARTS, MLPWorldModel, floor_case, measure, raw_batched_case  # noqa: E402


def breakdown(num_envs: int = 256, repeats: int = 15, min_time: float = 0.2, seed: int = 1,
              max_episode_steps: int = 100) -> dict[str, dict[str, float]]:
    """Per variant: median steps/s, median ratio to the raw step, and median microseconds a step over it."""
    torch.set_num_threads(1)
    model = MLPWorldModel()
    actions = np.random.default_rng(seed).integers(0, model.num_actions, num_envs)
    # the floor, each part left out alone, then all of them (floor_case names each variant)
    variants = [()] + [(part,) for part in FLOOR_PARTS] + [FLOOR_PARTS]
    cases = [raw_batched_case(model, num_envs, actions, seed)]
    cases += [floor_case(model, num_envs, actions, seed, max_episode_steps, without) for without in variants]
    rates = measure(cases, repeats, min_time)
    raw = rates["raw"]
    return {name: {"steps_per_s": statistics.median(r),
                   "of_raw": statistics.median(a / b for a, b in zip(r, raw)),
                   "us_over_raw": statistics.median(num_envs / a - num_envs / b for a, b in zip(r, raw)) * 1e6}
            for name, r in rates.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-envs", type=int, default=256, help="rows per step (benchmark.py's headline N: 256)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved measurements of each variant")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds one measurement lasts, about")
    args = p.parse_args(argv)
    for flag, value in (("--num-envs", args.num_envs), ("--repeats", args.repeats)):
        if value < 1:
            p.error(f"{flag} expected an integer >= 1, got {value}")
    if not args.min_time > 0:
        p.error(f"--min-time expected seconds > 0, got {args.min_time}")
    figures = breakdown(args.num_envs, args.repeats, args.min_time)
    print(f"N={args.num_envs}, 1 torch thread, {args.repeats} interleaved repeats (medians):")
    for name, f in figures.items():
        print(f"  {name:14s} {f['steps_per_s'] / 1e3:8.1f}k steps/s  {f['of_raw']:.3f} of raw  "
              f"+{f['us_over_raw']:6.1f} us a step over raw")
    return figures


if __name__ == "__main__":
    main()
