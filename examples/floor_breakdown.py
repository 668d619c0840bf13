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
import math
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark_parts import (Case, MLPWorldModel, measure, mlp_action_transform_batched,  # noqa: E402
                             mlp_reset_batched, mlp_transition_batched, raw_batched_case, restart_rows)
from seed_stream import stream_starts  # noqa: E402

PARTS = ("check", "copies", "resets", "finite")


def floor_variant(model: MLPWorldModel, n: int, actions: np.ndarray, seed: int, max_episode_steps: int,
                  without: tuple[str, ...] = ()) -> Case:
    """benchmark_parts.floor_case with the parts in ``without`` left out (with none left out, the same steps)."""
    state = mlp_reset_batched(model, seed=np.arange(seed, seed + n, dtype=np.int64))["state"]
    start = state.numpy().copy()
    carry = {"state": state, "steps": np.zeros(n, np.int64), "rows": np.zeros(0, np.int64), "done": None,
             "streams": stream_starts(np.arange(seed, seed + n, dtype=np.int64))}
    check, copies, resets, finite = (part not in without for part in PARTS)

    @torch.no_grad()
    def run(iters: int) -> None:
        for _ in range(iters):
            if check and int(np.maximum.reduce(actions.view(np.uint64), axis=None)) >= model.num_actions:
                raise ValueError("floor_breakdown: action out of range")
            out = mlp_transition_batched(model, carry["state"], mlp_action_transform_batched(model, actions))
            state = out["state"]
            obs, reward, terminated = (out[k].numpy() for k in ("observation", "reward", "terminated"))
            if copies:
                obs, reward, terminated = obs.astype(np.float32), reward.astype(np.float32), terminated.copy()
            steps, rows, done = carry["steps"], carry["rows"], carry["done"]
            steps += 1
            if len(rows):
                reward[done], terminated[done], steps[done] = 0.0, False, 0
                if resets:
                    restart_rows(model, carry["streams"], rows, obs, state)
                else:
                    obs[rows] = start[rows]
                    state.numpy()[rows] = start[rows]
            done = terminated | (steps >= max_episode_steps)
            if finite and not math.isfinite(float(np.add.reduce(reward)) + float(np.add.reduce(obs, axis=None))):
                raise ValueError("floor_breakdown: non-finite step")
            carry["state"], carry["obs"], carry["done"] = state, obs, done
            carry["rows"] = done.nonzero()[0]

    run.carry = carry
    name = "floor" if not without else ("none" if len(without) == len(PARTS) else "no_" + "_".join(without))
    return Case(name, run, n)


def breakdown(num_envs: int = 256, repeats: int = 15, min_time: float = 0.2, seed: int = 1,
              max_episode_steps: int = 100) -> dict[str, dict[str, float]]:
    """Per variant: median steps/s, median ratio to the raw step, and median microseconds a step over it."""
    torch.set_num_threads(1)
    model = MLPWorldModel()
    actions = np.random.default_rng(seed).integers(0, model.num_actions, num_envs)
    cases = [raw_batched_case(model, num_envs, actions, seed),
             floor_variant(model, num_envs, actions, seed, max_episode_steps)]
    cases += [floor_variant(model, num_envs, actions, seed, max_episode_steps, (part,)) for part in PARTS]
    cases += [floor_variant(model, num_envs, actions, seed, max_episode_steps, PARTS)]
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
