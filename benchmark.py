"""Throughput benchmark for world_model_env.py on the CPU (a benchmark, not a timed test).

What it measures, in one run, as environment steps per second (one vector step of N envs = N steps):

* raw:          the batched adapters called directly in a loop (action transform + transition on a fixed
                state, no env at all). Nothing built on the model can beat this: it is the limit.
* floor:        the same step with the least an env must add (copies of the outputs, step counters, the finished
                rows restarted, one finiteness check), written inline for this model: the most any env reaches.
* vec numpy:    WorldModelVectorEnv(output="numpy"), one model call steps all N envs.
* vec torch:    WorldModelVectorEnv(output="torch"), torch actions in, torch tensors out.
* Sync / Async: gymnasium's SyncVectorEnv / AsyncVectorEnv of N single WorldModelEnv (one model call per env).

for N in --sizes, with a two-layer 256-wide MLP world model, plus the seed tutorial's toy model in a single
WorldModelEnv against its raw adapter calls, the recurrent latent model (rssm.py) in WorldModelVectorEnv against
its own batched step at N=256, and the seconds of a seedless `reset()` of 65,536 rows. It prints a markdown table
and the headline figures (`batched_vs_raw_256`, `batched_vs_sync_256`, `single_vs_raw_toy`, `reset_65536_s`,
`rssm_env_vs_raw_256`) with their targets, and writes them to `--json PATH`. Missing a target prints MISS but still
exits 0: the numbers are the product.

    python benchmark.py --quick --json runs/benchmark_quick.json   # < 1 minute
    python benchmark.py --json runs/benchmark.json                 # full run

Method: every variant of one N is built, warmed up and calibrated (iterations per measurement so that one
measurement takes about --min-time seconds), then measured --repeats times *interleaved* (raw, floor, numpy, torch,
Sync, Async, raw, ...) so slow drift of a shared machine hits all variants alike. Reported steps/s are
medians; a ratio is the median of the per-repeat ratios (each from measurements taken seconds apart).
The Python garbage collector is paused inside a measurement, as `timeit` does.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro

try:
    from benchmark_parts import (  # noqa: F401 (the adapters are benchmark.py's too: the tests use them from here)
        Case, MLPWorldModel, make_mlp_env, make_mlp_vector_env, measure, mlp_action_transform_batched,
        mlp_action_transform_single, mlp_reset_batched, mlp_reset_single, mlp_transition_batched,
        mlp_transition_single, floor_case, raw_batched_case, rssm_cases, timed, vector_case)
    from run_io import write_json_atomic

    # The seed tutorial's toy model and adapters, shared with the tests so both time what users start from.
    from tests import seed_toy
except ImportError as exc:  # a clear message instead of a traceback from deep inside the run
    raise SystemExit(
        f"benchmark.py: could not import run_io.py, world_model_env.py or tests/seed_toy.py ({exc}). "
        "Run the benchmark from the repository root: python benchmark.py ..."
    ) from exc


@dataclass
class Args:
    quick: bool = False
    """finish in under a minute: 5 repeats of 0.15 s per variant, AsyncVectorEnv at N=1 only"""
    json: Optional[str] = None
    """write the headline ratios and all measured steps/s to this JSON file (atomically)"""
    repeats: Optional[int] = None
    """interleaved measurements per variant; the median is reported (default 7, --quick 5)"""
    min_time: Optional[float] = None
    """seconds one measurement should last (default 0.5, --quick 0.15)"""
    num_threads: int = 1
    """torch.set_num_threads for the benchmark process and every AsyncVectorEnv worker"""
    sizes: tuple[int, ...] = (1, 16, 256, 1024)
    """numbers of envs N to measure; 256 is always added because the headline ratios are taken there"""
    sync_max_envs: Optional[int] = None
    """largest N for SyncVectorEnv (default: no limit); larger N are reported as skipped"""
    async_max_envs: Optional[int] = None
    """largest N for AsyncVectorEnv (default 16, --quick 1): it starts one process per env, each importing torch
    (~240 MB RSS, seconds to start); N=256 would need ~60 GB and measure the OS scheduler, not the env"""
    obs_dim: int = 4
    """observation size of the MLP world model (4, like CartPole)"""
    num_actions: int = 2
    """Discrete action count of the MLP world model (2, like CartPole)"""
    hidden: int = 256
    """width of both hidden layers of the MLP world model"""
    max_episode_steps: int = 100
    """time limit of the MLP world-model envs (the toy model uses the tutorial's 25); with the default seed about
    half the episodes end by termination, half by this limit, so both autoreset paths run while timing"""
    seed: int = 0
    """seed for model weights, env resets and the fixed actions"""
    sb3_vecenv: bool = False
    """run only the SB3 section instead: sb3_example.WorldModelSB3VecEnv (one batched model call per step) against
    SB3's DummyVecEnv of single WorldModelEnvs, both on the reference EnsembleWorldModel (CartPole-v1), at --sb3-sizes"""
    sb3_sizes: tuple[int, ...] = (1, 16, 64, 256)
    """numbers of envs N for the SB3 section"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where the scale table (issue 20) runs: the reference ensemble's raw step, env step, PPO rollout step,
    reset() and end-to-end imagined PPO training over N. `cpu` also runs the MLP / Sync / Async section above;
    `cuda` runs only the table (one GPU; N up to 1,048,576). The GPU pays from a few thousand envs on: default
    runs (32 envs) are as fast or faster on the CPU (`ppo_imagined.py --no-cuda`)."""
    scale_models: Optional[tuple[Literal["cartpole", "halfcheetah"], ...]] = None
    """models of the scale table: `cartpole` (obs 4, Discrete(2)) and `halfcheetah` (obs 17, Box(6)), both the
    reference ensemble (5 members, 3 x 128), random weights, no learned endings, 200-step imagined episodes
    (default: cartpole with --quick, both otherwise)"""
    scale_sizes: Optional[tuple[int, ...]] = None
    """N of the scale table (default cpu: 256 4096 with --quick, 256 4096 65536 otherwise; cuda: 256 4096 65536
    262144 1048576); reset() is also timed at 65,536 rows for the reset_65536_s figure"""
    e2e_sizes: Optional[tuple[int, ...]] = None
    """N of the end-to-end imagined PPO figure (cartpole only: ppo_imagined.py in a subprocess on a saved model, 4
    iterations of 128 steps, the rate over the last 3; the table gets a row at each such N; default cpu: 256 with
    --quick, 256 4096 otherwise; cuda: 4096 65536); () skips it"""


HEADLINE_N = 256
RESET_N = 65_536
TARGETS = {"batched_vs_raw_256": 0.9, "batched_vs_sync_256": 45.0, "single_vs_raw_toy": 0.5, "reset_65536_s": 0.2,
           "rssm_env_vs_raw_256": 0.85}
# issue 20's GPU targets (checked by --device cuda): env/raw, reset() of a million rows, end-to-end PPO steps/s
GPU_TARGETS = {"env_vs_raw_4096": 0.9, "env_vs_raw_65536": 0.97, "env_vs_raw_262144": 0.97,
               "env_vs_raw_1048576": 0.97, "reset_1048576_s": 1.0, "e2e_ppo_65536": 10e6}
LOWER_IS_BETTER = {"reset_65536_s", "reset_1048576_s"}  # seconds; the other figures are ratios or steps/s


def meets(key: str, value: float, targets: dict = TARGETS) -> bool:
    return value <= targets[key] if key in LOWER_IS_BETTER else value >= targets[key]


def reset_seconds(envs, seed: int, sync: Callable[[], None] = lambda: None, repeats: int = 3) -> float:
    """Median seconds of a seedless reset() of all rows of a WorldModelVectorEnv (every row draws its seed from
    its stream and reset_fn starts it): the cost autoreset pays when all rows end at once."""
    envs.reset(seed=seed)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        envs.reset()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
VARIANTS = ("raw", "floor", "vec_numpy", "vec_torch", "sync", "async")
VARIANT_TITLES = {
    "raw": "raw model calls",
    "floor": "floor (inline env)",
    "vec_numpy": "WMVecEnv numpy",
    "vec_torch": "WMVecEnv torch",
    "sync": "Sync of WMEnv",
    "async": "Async of WMEnv",
}


def build_cases(args: Args, model: MLPWorldModel, model_kwargs: dict, n: int) -> tuple[list[Case], dict[str, str]]:
    """All variants for one N, plus {variant: reason} for the ones skipped."""
    rng = np.random.default_rng(args.seed)
    actions = rng.integers(0, args.num_actions, size=n, dtype=np.int64)  # fixed: the policy is not being measured
    cases = [raw_batched_case(model, n, actions, args.seed),
             floor_case(model, n, actions, args.seed, args.max_episode_steps)]
    skipped = {}
    try:
        for output, actions_in in (("numpy", actions), ("torch", torch.as_tensor(actions))):
            envs = make_mlp_vector_env(model, n, args.max_episode_steps, args.seed, output)
            cases.append(vector_case(f"vec_{output}", envs, actions_in, args.seed))
        thunks = [
            partial(make_mlp_env, model_kwargs, args.max_episode_steps, args.seed + i, args.num_threads)
            for i in range(n)
        ]
        if args.sync_max_envs is None or n <= args.sync_max_envs:
            # Sync shares the benchmark's model object: same process, and the model holds no per-env state
            sync_thunks = [partial(t, model=model) for t in thunks]
            cases.append(vector_case("sync", gym.vector.SyncVectorEnv(sync_thunks), actions, args.seed))
        else:
            skipped["sync"] = f"skipped: N > --sync-max-envs {args.sync_max_envs}"
        if n <= args.async_max_envs:
            envs = gym.vector.AsyncVectorEnv(thunks, context="spawn")
            cases.append(vector_case("async", envs, actions, args.seed))
        else:
            skipped["async"] = (
                f"n/a: N > --async-max-envs {args.async_max_envs}; AsyncVectorEnv runs one process per env, each "
                "importing torch (~240 MB RSS), so N=256 would need ~60 GB"
            )
    except BaseException:
        for case in cases:  # don't leave worker processes behind when a later variant fails to build
            case.close()
        raise
    return cases, skipped


def toy_cases(seed: int) -> list[Case]:
    """The seed tutorial's env (max_episode_steps=25) against its adapters called directly on a fixed state."""
    model = seed_toy.model
    action = np.int64(seed % model.num_actions)  # np.int64, as a policy's argmax/sample hands it over
    state = seed_toy.reset_world_model(model, seed=seed)["state"]

    def run_raw(iters: int) -> None:
        for _ in range(iters):
            seed_toy.transition_world_model(model, state, seed_toy.action_transform(model, action))

    env = seed_toy.make_env(seed)()
    env.reset(seed=seed)

    def run_env(iters: int) -> None:
        for _ in range(iters):
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()

    return [Case("toy_raw", run_raw, 1), Case("toy_env", run_env, 1, close=env.close)]


def episode_stats(model: MLPWorldModel, max_episode_steps: int, seed: int, n: int = 64, steps: int = 600):
    """Untimed check that episodes of the MLP world model end now and then, so autoreset is exercised."""
    envs = make_mlp_vector_env(model, n, max_episode_steps, seed, "numpy")
    envs.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(0, model.num_actions, size=n, dtype=np.int64)
    terminations = truncations = 0
    lengths, t = [], np.zeros(n, dtype=np.int64)
    for _ in range(steps):
        _, _, terminated, truncated, _ = envs.step(actions)
        done = np.asarray(terminated) | np.asarray(truncated)
        t += 1
        terminations += int(np.sum(terminated))
        truncations += int(np.sum(truncated))
        lengths.extend(t[done].tolist())
        t[done] = -1  # NEXT_STEP autoreset: the next step is the reset step, not part of the new episode
    envs.close()
    mean_length = float(np.mean(lengths)) if lengths else float("nan")
    return {"terminations": terminations, "truncations": truncations, "mean_length": mean_length}


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------
def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "—"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def median_ratio(rates: dict[str, list[float]], num: str, den: str) -> Optional[float]:
    if num not in rates or den not in rates:
        return None
    return statistics.median(a / b for a, b in zip(rates[num], rates[den]))


def check_args(args: Args) -> Args:
    def fail(field: str, expected: str, got, fix: str):
        raise SystemExit(f"benchmark.py: --{field.replace('_', '-')} expected {expected}, got {got!r}. {fix}")

    if args.quick:
        args.repeats = 5 if args.repeats is None else args.repeats
        args.min_time = 0.15 if args.min_time is None else args.min_time
        args.async_max_envs = 1 if args.async_max_envs is None else args.async_max_envs
    else:
        args.repeats = 7 if args.repeats is None else args.repeats
        args.min_time = 0.5 if args.min_time is None else args.min_time
        args.async_max_envs = 16 if args.async_max_envs is None else args.async_max_envs
    if args.repeats < 1:
        fail("repeats", "an integer >= 1", args.repeats, "Use e.g. --repeats 5.")
    if not args.min_time > 0:
        fail("min_time", "seconds > 0", args.min_time, "Use e.g. --min-time 0.2.")
    if args.num_threads < 1:
        fail("num-threads", "an integer >= 1", args.num_threads, "Use --num-threads 1 (default) on a shared machine.")
    if not args.sizes or any(n < 1 for n in args.sizes):
        fail("sizes", "one or more env counts >= 1", args.sizes, "Use e.g. --sizes 1 16 256 1024.")
    if args.async_max_envs < 0:
        fail("async_max_envs", "an integer >= 0 (0 skips AsyncVectorEnv)", args.async_max_envs,
             "Use e.g. --async-max-envs 16.")
    if args.sync_max_envs is not None and args.sync_max_envs < HEADLINE_N:
        fail("sync_max_envs", f">= {HEADLINE_N} (batched_vs_sync_256 needs SyncVectorEnv at N={HEADLINE_N})",
             args.sync_max_envs, f"Use --sync-max-envs {HEADLINE_N} or more.")
    for field in ("scale_sizes", "e2e_sizes"):
        value = getattr(args, field)
        if value is not None and any(n < 1 for n in value):
            fail(field, "env counts >= 1", value, "Use e.g. --scale-sizes 256 4096.")
    for field in ("obs_dim", "num_actions", "hidden", "max_episode_steps"):
        if getattr(args, field) < 1:
            fail(field, "an integer >= 1", getattr(args, field), "Use the default.")
    return args


def main(args: Args) -> dict:
    args = check_args(args)
    wall_start = time.perf_counter()
    torch.set_num_threads(args.num_threads)
    sizes = sorted(set(args.sizes) | {HEADLINE_N})
    model_kwargs = dict(obs_dim=args.obs_dim, num_actions=args.num_actions, hidden=args.hidden, seed=args.seed)
    model = MLPWorldModel(**model_kwargs)
    print(
        f"benchmark: torch {torch.__version__}, {args.num_threads} torch thread(s), {os.cpu_count()} CPUs, "
        f"repeats={args.repeats}, min_time={args.min_time}s, sizes={sizes}, MLP obs_dim={args.obs_dim} "
        f"actions={args.num_actions} hidden={args.hidden}x2",
        flush=True,
    )
    episodes = episode_stats(model, args.max_episode_steps, args.seed)
    print(
        f"MLP world model episodes (64 envs x 600 steps, untimed): mean length {episodes['mean_length']:.1f}, "
        f"{episodes['terminations']} terminations, {episodes['truncations']} truncations",
        flush=True,
    )

    results: dict[int, dict] = {}
    for n in sizes:
        cell_start = time.perf_counter()
        cases, skipped = build_cases(args, model, model_kwargs, n)
        try:
            rates = measure(cases, args.repeats, args.min_time)
        finally:
            for case in cases:
                case.close()
        results[n] = {"rates": rates, "skipped": skipped}
        medians = {k: statistics.median(v) for k, v in rates.items()}
        status = ", ".join(f"{k} {fmt_rate(v)}" for k, v in medians.items())
        print(f"  N={n}: {status} steps/s ({time.perf_counter() - cell_start:.1f}s)", flush=True)

    scale = scale_table(args)
    toy = toy_cases(args.seed)
    try:
        toy_rates = measure(toy, args.repeats, args.min_time)
    finally:
        for case in toy:
            case.close()
    rssm = rssm_cases(HEADLINE_N, args.seed)  # the recurrent latent model (rssm.py) at the headline N
    try:
        rssm_rates = measure(rssm, args.repeats, args.min_time)
    finally:
        for case in rssm:
            case.close()

    # ---- table
    ratio_cols = [("vec_numpy", "raw"), ("floor", "raw"), ("vec_numpy", "floor"), ("vec_torch", "raw"),
                  ("vec_numpy", "sync"), ("vec_numpy", "async")]
    header = ["N"] + [VARIANT_TITLES[v] for v in VARIANTS] + [f"{a.split('_')[-1]}/{b}" for a, b in ratio_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table_json = {}
    for n in sizes:
        rates, skipped = results[n]["rates"], results[n]["skipped"]
        row, cell_json = [str(n)], {}
        for v in VARIANTS:
            if v in rates:
                cell_json[v] = statistics.median(rates[v])
                row.append(fmt_rate(cell_json[v]))
            else:
                cell_json[v] = skipped[v]
                row.append(skipped[v].split(":")[0])
        for a, b in ratio_cols:
            r = median_ratio(rates, a, b)
            cell_json[f"{a}/{b}"] = r
            row.append("—" if r is None else f"{r:.2f}")
        lines.append("| " + " | ".join(row) + " |")
        table_json[str(n)] = cell_json
    reasons = sorted({reason for n in sizes for reason in results[n]["skipped"].values()})
    toy_raw, toy_env = statistics.median(toy_rates["toy_raw"]), statistics.median(toy_rates["toy_env"])

    headline = {
        "batched_vs_raw_256": median_ratio(results[HEADLINE_N]["rates"], "vec_numpy", "raw"),
        "batched_vs_sync_256": median_ratio(results[HEADLINE_N]["rates"], "vec_numpy", "sync"),
        "single_vs_raw_toy": median_ratio(toy_rates, "toy_env", "toy_raw"),
        "reset_65536_s": scale["reset_65536_s"],
        "rssm_env_vs_raw_256": median_ratio(rssm_rates, "rssm_env", "rssm_raw"),
    }
    # Context for batched_vs_sync: how much the model itself gains from batching (cells measured at different
    # times, so a ratio of medians). Sync steps one batch-1 model call per env, so batched_vs_sync_256 stays near
    # this gain unless the per-env wrappers add a lot; it is a property of the model and CPU, not of the env.
    batching_gain = None
    if 1 in results:
        raw_1, raw_256 = (statistics.median(results[n]["rates"]["raw"]) for n in (1, HEADLINE_N))
        batching_gain = raw_256 / raw_1
    # Context for batched_vs_raw: the same N's inline env (benchmark_parts.floor_case), no target. floor/raw is the
    # most any env that copies its outputs, counts steps and restarts finished rows reaches on this machine.
    floor = {"floor_vs_raw_256": median_ratio(results[HEADLINE_N]["rates"], "floor", "raw"),
             "batched_vs_floor_256": median_ratio(results[HEADLINE_N]["rates"], "vec_numpy", "floor")}
    wall = time.perf_counter() - wall_start

    print("\nSteps/s (env steps: one vector step of N envs counts N; medians) and ratios (medians of per-repeat ratios):\n")
    print("\n".join(lines))
    if reasons:
        print()
    for reason in reasons:
        print(f"- {reason}")
    print("\n| toy model, single env | raw adapter calls | WorldModelEnv | env/raw |\n|---|---|---|---|")
    print(f"| seed tutorial TinyWorldModel | {fmt_rate(toy_raw)} | {fmt_rate(toy_env)} | {headline['single_vs_raw_toy']:.2f} |")
    rssm_raw, rssm_env = (statistics.median(rssm_rates[k]) for k in ("rssm_raw", "rssm_env"))
    print(f"\n| rssm.py, CartPoleNoVel-v1 size, N={HEADLINE_N} | raw batched step | WorldModelVectorEnv | env/raw |\n"
          f"|---|---|---|---|\n| RSSM (GRU 128, 16 x 16 latent, 5 prior heads) | {fmt_rate(rssm_raw)} | "
          f"{fmt_rate(rssm_env)} | {headline['rssm_env_vs_raw_256']:.2f} |")
    print()
    for key, value in headline.items():
        verdict = "PASS" if meets(key, value) else "MISS"
        sign = "<=" if key in LOWER_IS_BETTER else ">="
        print(f"{key:>22} = {value:8.3g}   (target {sign} {TARGETS[key]:g})  {verdict}")
    print(f"\ncontext: the inline env (floor) reaches {floor['floor_vs_raw_256']:.3f} of the raw step at N={HEADLINE_N}; "
          f"WorldModelVectorEnv reaches {floor['batched_vs_floor_256']:.3f} of the floor")
    if batching_gain is not None:
        print(f"\ncontext: the MLP's own batching gain, raw steps/s at N={HEADLINE_N} / at N=1, is {batching_gain:.1f}")
    print(f"\nwall time {wall:.1f}s")

    summary = {
        **headline,
        "targets": TARGETS,
        "pass": {k: meets(k, v) for k, v in headline.items()},
        "steps_per_second": table_json,
        "toy_steps_per_second": {"raw": toy_raw, "env": toy_env},
        "rssm_steps_per_second_256": {k: statistics.median(v) for k, v in rssm_rates.items()},
        "scale": scale,
        "mlp_episodes": episodes,
        "model_batching_gain_256_vs_1": batching_gain,
        **floor,
        "settings": {
            "quick": args.quick, "repeats": args.repeats, "min_time": args.min_time, "threads": args.num_threads,
            "sizes": sizes, "sync_max_envs": args.sync_max_envs, "async_max_envs": args.async_max_envs,
            "obs_dim": args.obs_dim, "num_actions": args.num_actions, "hidden": args.hidden,
            "max_episode_steps": args.max_episode_steps, "seed": args.seed,
        },
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "numpy": np.__version__, "gymnasium": gym.__version__},
        "wall_time_s": wall,
    }
    if args.json:
        write_json_atomic(args.json, summary)
        print(f"wrote {args.json}")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Scale table (issue 20): the reference ensemble on --device, from hundreds to a million envs
# ---------------------------------------------------------------------------------------------------------------
SCALE_HORIZON = 200  # imagined episodes end only here: the models have no learned endings
E2E_STEPS = 128  # PPO's rollout length (ppo_imagined.py's default)
E2E_ITERATIONS = 4  # the rate is taken over iterations 2..4: the first pays one-off costs (CUDA kernels load lazily)


def scale_net(name: str, device: str, seed: int):
    """The reference ensemble (5 members, 3 x 128) CartPole- or HalfCheetah-sized, with seeded random weights (the
    cost of a step does not depend on what was learned) and the termination head pinned off."""
    import ensemble

    if name == "cartpole":
        probe = gym.make("CartPole-v1")  # its exact spaces: the e2e run loads the model for CartPole-v1
        obs_space, action_space, env_id = probe.observation_space, probe.action_space, "CartPole-v1"
        probe.close()
    else:
        obs_space = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32)
        action_space, env_id = gym.spaces.Box(-1.0, 1.0, (6,), np.float32), None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ensemble.EnsembleWorldModel(obs_space, action_space, env_id=env_id, max_episode_steps=SCALE_HORIZON)
        net.start_obs = 0.05 * torch.randn(1000, net.obs_dim)
        net.buffer_obs = net.start_obs.clone()  # PPO's imagined episodes start at "buffer" states
    with torch.no_grad():
        net.term_net[-1].bias.fill_(-1e3)  # no learned endings
    return net.to(device)


def graph_of(fn: Callable[[], None]) -> Callable[[], None]:
    """fn captured in a CUDA graph (warmed up on a side stream first, as torch's docs do); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def scale_cases(net, n: int, seed: int, sync: Callable[[], None]) -> list[Case]:
    """raw (the adapters on a fixed state: every member runs, as with the halt rule), raw_member (only each row's
    member: no disagreement), env (WorldModelVectorEnv, torch output) and rollout (env + PPO's policy sample); on a
    GPU also raw_graph (the raw step captured in a CUDA graph: the model alone without launch costs), env_graph and
    rollout_graph (the env with use_cuda_graph(), as ppo_imagined.py steps it there)."""
    from ensemble_imagination import Imagination, make_imagined_vector_env
    from ppo_imagined import Agent

    device = net.device
    gen = torch.Generator().manual_seed(seed)
    if net.discrete:
        actions = torch.randint(0, net.act_dim, (n,), generator=gen).to(device)
    else:
        actions = (2.0 * torch.rand(n, net.act_dim, generator=gen) - 1.0).to(device)
    cases = []
    for name, im in (("raw", Imagination()), ("raw_member", Imagination(disagreement=False))):
        state = im.batched_reset_fn(net, seed=np.arange(seed, seed + n))["state"]

        def run_raw(iters: int, im=im, state=state) -> None:
            for _ in range(iters):
                im.batched_transition_fn(net, state, actions)
            sync()

        cases.append(Case(name, run_raw, n))
    graphs = (False, True) if device.type == "cuda" else (False,)
    if device.type == "cuda":
        im = Imagination()
        state = im.batched_reset_fn(net, seed=np.arange(seed, seed + n))["state"]
        replay = graph_of(lambda: im.batched_transition_fn(net, state, actions))

        def run_raw_graph(iters: int) -> None:
            for _ in range(iters):
                replay()
            sync()

        cases.append(Case("raw_graph", run_raw_graph, n))
    for graph in graphs:
        envs = make_imagined_vector_env(net, n, seed=seed, horizon=SCALE_HORIZON, output="torch")
        envs = envs.use_cuda_graph() if graph else envs
        envs.reset(seed=seed)

        def run_env(iters: int, envs=envs) -> None:
            for _ in range(iters):
                envs.step(actions)
            sync()

        cases.append(Case("env_graph" if graph else "env", run_env, n, close=envs.close))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        agent = Agent(net.obs_dim, net.action_space).to(device)
    low, high = (None, None) if net.discrete else (net.act_low, net.act_high)
    for graph in graphs:
        roll = make_imagined_vector_env(net, n, seed=seed, horizon=SCALE_HORIZON, output="torch")
        roll = roll.use_cuda_graph() if graph else roll
        obs = [roll.reset(seed=seed)[0]]

        def run_rollout(iters: int, roll=roll, obs=obs) -> None:
            o = obs[0]
            for _ in range(iters):
                with torch.no_grad():
                    action = agent.get_action_and_value(o)[0]
                o = roll.step(action if low is None else torch.minimum(torch.maximum(action, low), high))[0]
            obs[0] = o
            sync()

        cases.append(Case("rollout_graph" if graph else "rollout", run_rollout, n, close=roll.close))
    return cases


def e2e_ppo(net, n: int, args: Args, workdir: str, extra: tuple[str, ...] = ()) -> float:
    """End-to-end imagined PPO steps/s (rollout + GAE + update): the script in a subprocess on the saved model,
    --num-envs n, E2E_ITERATIONS iterations of 128 steps, no Dyna round, one final episode. The rate is the steady
    one, between the first and the last iteration's status lines (`step S ... SPS R`: R = S / training seconds so
    far), so the first iteration's one-off costs (lazy CUDA module loading, allocator growth) stay out."""
    import re
    import subprocess

    import ensemble

    path = os.path.join(workdir, "world_model.pt")
    if not os.path.exists(path):
        ensemble.save_world_model(net, path)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_imagined.py")
    cmd = [sys.executable, script, "--world-model-path", path, "--num-envs", str(n), "--num-steps", str(E2E_STEPS),
           "--total-timesteps", str(E2E_ITERATIONS * n * E2E_STEPS), "--eval-every", "0", "--real-iterations", "0",
           "--imagined-horizon", str(SCALE_HORIZON), "--halt-threshold", "0", "--eval-episodes", "1",
           "--num-threads", str(args.num_threads), "--seed", str(args.seed), "--exp-name", f"bench_{n}"]
    cmd += ["--no-cuda"] if args.device == "cpu" else ["--cuda-min-envs", "0"]  # the device asked for, at any N
    cmd += list(extra)
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark.py: the end-to-end PPO run failed:\n{' '.join(cmd)}\n{proc.stderr[-3000:]}")
    points = [(int(step), int(sps)) for step, sps in re.findall(r"iter \d+/\d+ step (\d+) .*SPS (\d+)", proc.stdout)]
    if len(points) != E2E_ITERATIONS:
        raise SystemExit(f"benchmark.py: expected {E2E_ITERATIONS} status lines from the end-to-end PPO run, found "
                         f"{len(points)}:\n{' '.join(cmd)}\n{proc.stdout[-3000:]}")
    (first_step, first_sps), (last_step, last_sps) = points[0], points[-1]
    return (last_step - first_step) / (last_step / last_sps - first_step / first_sps)


def scale_table(args: Args) -> dict:
    """The issue's table on args.device: steps/s of raw / raw_member / env / rollout, env/raw, reset() seconds and
    end-to-end PPO steps/s, per model and N; plus reset() of 65,536 rows (reset_65536_s)."""
    import tempfile

    from ensemble_imagination import make_imagined_vector_env

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    models = args.scale_models or (("cartpole",) if args.quick else ("cartpole", "halfcheetah"))
    sizes = args.scale_sizes or ((256, 4096, 65_536, 262_144, 1_048_576) if cuda
                                 else (256, 4096) if args.quick else (256, 4096, 65_536))
    e2e_sizes = args.e2e_sizes if args.e2e_sizes is not None else (
        (4096, 65_536) if cuda else (256,) if args.quick else (256, 4096))
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"\nscale table on {args.device} ({name}): the reference ensemble (5 members, 3x128), "
          f"{SCALE_HORIZON}-step imagined episodes, torch output", flush=True)
    table, extra = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in models:
            net = scale_net(model_name, args.device, args.seed)
            table[model_name] = {}
            for n in sorted(set(sizes) | (set(e2e_sizes) if model_name == "cartpole" else set())):  # e2e N too
                start = time.perf_counter()
                cases = scale_cases(net, n, args.seed, sync)
                try:
                    rates = measure(cases, args.repeats, args.min_time)
                finally:
                    for case in cases:
                        case.close()
                cell = {k: statistics.median(v) for k, v in rates.items()}
                cell["env_vs_raw"] = median_ratio(rates, "env", "raw")
                if "env_graph" in rates:  # the GPU's env as the scripts step it, against the same raw step, and
                    cell["env_graph_vs_raw"] = median_ratio(rates, "env_graph", "raw")  # like for like
                    cell["env_graph_vs_raw_graph"] = median_ratio(rates, "env_graph", "raw_graph")
                envs = make_imagined_vector_env(net, n, seed=args.seed, horizon=SCALE_HORIZON, output="torch")
                cell["reset_s"] = reset_seconds(envs, args.seed, sync)
                envs.close()
                if model_name == "cartpole" and n in e2e_sizes:
                    cell["e2e_ppo"] = e2e_ppo(net, n, args, workdir)
                    if cuda:  # the same run with the eager env: what the CUDA graph buys end to end
                        cell["e2e_ppo_eager_env"] = e2e_ppo(net, n, args, workdir, ("--no-cuda-graph",))
                table[model_name][str(n)] = cell
                print(f"  {model_name} N={n}: " + ", ".join(f"{k} {v:.3g}" for k, v in cell.items())
                      + f" ({time.perf_counter() - start:.1f}s)", flush=True)
            if model_name == models[0]:
                envs = make_imagined_vector_env(net, RESET_N, seed=args.seed, horizon=SCALE_HORIZON, output="torch")
                extra["reset_65536_s"] = reset_seconds(envs, args.seed, sync)
                envs.close()
            del net
    lines = ["| model | N | raw step | raw, chosen member only | env step | env/raw | PPO rollout step | reset() "
             "| end-to-end PPO |", "|---|---|---|---|---|---|---|---|---|"]
    if cuda:
        lines = ["| model | N | raw step | raw, chosen member only | raw, CUDA graph | env step | env/raw | env, CUDA "
                 "graph | its /raw | its /raw graph | PPO rollout step | with the graph env | reset() | end-to-end PPO |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model_name, cells in table.items():
        for n, c in cells.items():
            graph_cols = (f"{fmt_rate(c['raw_graph'])} | " if cuda else "",
                          f" {fmt_rate(c['env_graph'])} | {c['env_graph_vs_raw']:.2f} | "
                          f"{c['env_graph_vs_raw_graph']:.2f} |" if cuda else "",
                          f" {fmt_rate(c['rollout_graph'])} |" if cuda else "")
            lines.append(f"| {model_name} | {int(n):,} | {fmt_rate(c['raw'])} | {fmt_rate(c['raw_member'])} | "
                         f"{graph_cols[0]}{fmt_rate(c['env'])} | {c['env_vs_raw']:.2f} |{graph_cols[1]} "
                         f"{fmt_rate(c['rollout'])} |{graph_cols[2]} {c['reset_s']:.3f} s | "
                         f"{fmt_rate(c.get('e2e_ppo'))} |")
    print("\nSteps/s (one vector step of N envs counts N; medians); reset() in seconds:\n")
    print("\n".join(lines))
    print(f"\nreset() of {RESET_N:,} rows: {extra['reset_65536_s']:.3f} s", flush=True)
    result = {"device": args.device, "device_name": name, "horizon": SCALE_HORIZON, "steps_per_second": table,
              **extra}
    cells = table.get("cartpole", {})
    if cuda:  # the GPU targets where their N was measured
        # the env as ppo_imagined.py steps it on a GPU (one CUDA graph a step) against the raw model step
        gpu = {f"env_vs_raw_{n}": cells[str(n)]["env_graph_vs_raw"] for n in (4096, 65_536, 262_144, 1_048_576)
               if str(n) in cells}
        if str(1_048_576) in cells:
            gpu["reset_1048576_s"] = cells[str(1_048_576)]["reset_s"]
        if "e2e_ppo" in cells.get(str(65_536), {}):
            gpu["e2e_ppo_65536"] = cells[str(65_536)]["e2e_ppo"]
        result["gpu_targets"] = {k: {"value": v, "target": GPU_TARGETS[k], "pass": meets(k, v, GPU_TARGETS)}
                                 for k, v in gpu.items()}
    return result


def scale_main(args: Args) -> dict:
    """--device cuda: the scale table only, with the GPU targets."""
    args = check_args(args)
    if not torch.cuda.is_available():
        raise SystemExit("benchmark.py: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False). Use "
                         "--device cpu.")
    wall_start = time.perf_counter()
    torch.set_num_threads(args.num_threads)
    scale = scale_table(args)
    for key, entry in scale.get("gpu_targets", {}).items():
        sign = "<=" if key in LOWER_IS_BETTER else ">="
        print(f"{key:>22} = {entry['value']:10.4g}   (target {sign} {entry['target']:g})  "
              f"{'PASS' if entry['pass'] else 'MISS'}")
    summary = {"scale": scale, "settings": {"quick": args.quick, "repeats": args.repeats, "min_time": args.min_time,
                                            "threads": args.num_threads},
               "machine": {"torch": torch.__version__, "cuda": torch.version.cuda, "platform": platform.platform()},
               "wall_time_s": time.perf_counter() - wall_start}
    print(f"\nwall time {summary['wall_time_s']:.1f}s")
    if args.json:
        write_json_atomic(args.json, summary)
        print(f"wrote {args.json}")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# SB3 section (--sb3-vecenv): what the batched SB3 VecEnv adapter of sb3_example.py buys over N single envs
# ---------------------------------------------------------------------------------------------------------------
def sb3_case(name: str, venv, actions: np.ndarray, seed: int) -> Case:
    venv.seed(seed)
    venv.reset()

    def run(iters: int) -> None:
        for _ in range(iters):
            venv.step(actions)

    return Case(name, run, venv.num_envs, close=venv.close)


def sb3_vecenv_main(args: Args) -> dict:
    """Steps/s of WorldModelSB3VecEnv and of DummyVecEnv([WorldModelEnv] * N) with the same model and actions,
    measured --repeats times interleaved; the speed-up is the median of the per-repeat ratios."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    import ensemble
    import real_env
    from ensemble_imagination import make_imagined_env, make_imagined_vector_env
    from sb3_example import WorldModelSB3VecEnv

    args = check_args(args)
    if not args.sb3_sizes or any(n < 1 for n in args.sb3_sizes):
        raise SystemExit(f"benchmark.py: --sb3-sizes expected one or more env counts >= 1, got {args.sb3_sizes!r}.")
    torch.set_num_threads(args.num_threads)
    wall_start = time.perf_counter()
    # the weights do not change the cost of a step: a short fit on a little real data is enough
    data = real_env.collect_transitions("CartPole-v1", 500, seed=args.seed)
    model, _ = ensemble.fit_world_model(data, seed=args.seed, max_epochs=1)
    print(f"benchmark --sb3-vecenv: EnsembleWorldModel (CartPole-v1, {model.ensemble_size} members, "
          f"{model.num_layers}x{model.hidden_size}), {args.num_threads} torch thread(s), repeats={args.repeats}, "
          f"min_time={args.min_time}s\n", flush=True)
    lines = ["| N | WorldModelSB3VecEnv | DummyVecEnv of WorldModelEnv | speed-up |", "|---|---|---|---|"]
    table = {}
    for n in sorted(set(args.sb3_sizes)):
        actions = np.random.default_rng(args.seed).integers(0, 2, size=n)  # fixed: the policy is not measured
        adapter = WorldModelSB3VecEnv(make_imagined_vector_env(
            model, n, seed=args.seed, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP))
        dummy = DummyVecEnv([partial(make_imagined_env, model) for _ in range(n)])
        cases = [sb3_case("adapter", adapter, actions, args.seed), sb3_case("dummy", dummy, actions, args.seed)]
        try:
            rates = measure(cases, args.repeats, args.min_time)
        finally:
            for case in cases:
                case.close()
        table[str(n)] = {"adapter": statistics.median(rates["adapter"]), "dummy": statistics.median(rates["dummy"]),
                         "speedup": median_ratio(rates, "adapter", "dummy")}
        row = table[str(n)]
        lines.append(f"| {n} | {fmt_rate(row['adapter'])} | {fmt_rate(row['dummy'])} | {row['speedup']:.1f}x |")
        print(lines[-1], flush=True)
    print("\nSteps/s (one vector step of N envs counts N; medians); speed-up: median of per-repeat ratios.\n")
    print("\n".join(lines))
    wall = time.perf_counter() - wall_start
    print(f"\nwall time {wall:.1f}s")
    summary = {"sb3_vecenv": table, "settings": {"repeats": args.repeats, "min_time": args.min_time,
                                                 "threads": args.num_threads, "sizes": sorted(set(args.sb3_sizes))},
               "wall_time_s": wall}
    if args.json:
        write_json_atomic(args.json, summary)
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    if cli_args.sb3_vecenv:
        sb3_vecenv_main(cli_args)
    else:
        main(cli_args) if cli_args.device == "cpu" else scale_main(cli_args)
