"""Smoke test of benchmark.py: it runs end to end with tiny settings and writes the headline ratios.

Not a timed test: the numbers are only checked to be positive and finite, never against the targets.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmark  # noqa: E402
import benchmark_parts  # noqa: E402

HEADLINE_KEYS = ("batched_vs_raw_256", "batched_vs_sync_256", "single_vs_raw_toy", "reset_65536_s",
                 "rssm_env_vs_raw_256")
SCALE_KEYS = ("raw", "raw_member", "env", "env_vs_raw", "rollout", "reset_s", "e2e_ppo")


def test_benchmark_cli_writes_headline_json(tmp_path):
    out = tmp_path / "bench.json"
    # Tiny settings: one short measurement per variant; Async only at N=1 (one spawned worker).
    cmd = [sys.executable, "benchmark.py", "--quick", "--sizes", "1", "256", "--repeats", "1", "--min-time", "0.01",
           "--scale-sizes", "256", "--e2e-sizes", "256", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    for key in HEADLINE_KEYS:
        value = data[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    for n in ("1", "256"):
        for variant in ("raw", "floor", "vec_numpy", "vec_torch", "sync"):
            rate = data["steps_per_second"][n][variant]
            assert isinstance(rate, float) and math.isfinite(rate) and rate > 0, (n, variant, rate)
    for key in ("floor_vs_raw_256", "batched_vs_floor_256"):  # context for batched_vs_raw_256, no target
        assert isinstance(data[key], float) and math.isfinite(data[key]) and data[key] > 0, (key, data[key])
    assert data["steps_per_second"]["1"]["async"] > 0
    assert data["steps_per_second"]["256"]["async"].startswith("n/a")
    # the scale table (issue 20): the reference ensemble on the CPU, every figure a key
    scale = data["scale"]
    assert scale["device"] == "cpu" and scale["reset_65536_s"] == data["reset_65536_s"]
    cell = scale["steps_per_second"]["cartpole"]["256"]
    for key in SCALE_KEYS:
        assert isinstance(cell[key], float) and math.isfinite(cell[key]) and cell[key] > 0, (key, cell[key])
    assert "| model | N | raw step |" in proc.stdout
    # the markdown table and the verdict lines are printed
    assert "| N | raw model calls |" in proc.stdout
    for key in HEADLINE_KEYS:
        assert key in proc.stdout


def test_cuda_without_a_gpu_is_one_clear_line():
    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, "benchmark.py", "--device", "cuda"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "--device cuda needs a CUDA GPU" in proc.stderr


def test_bad_settings_are_clear_errors():
    for field, value, message in (
        ("sizes", (0, 16), "--sizes expected one or more env counts >= 1, got (0, 16)"),
        ("scale_sizes", (0,), "--scale-sizes expected env counts >= 1, got (0,)"),
        ("repeats", 0, "--repeats expected an integer >= 1, got 0"),
        ("sync_max_envs", 16, "--sync-max-envs expected >= 256"),
    ):
        try:
            benchmark.check_args(benchmark.Args(**{field: value}))
        except SystemExit as err:
            assert message in str(err), str(err)
        else:
            raise AssertionError(f"--{field} {value} was accepted")


def test_mlp_adapters_batched_match_single():
    """The unbatched adapters (Sync/Async) and batched ones (WorldModelVectorEnv) compute the same dynamics."""
    model = benchmark.MLPWorldModel(seed=3)
    seeds = np.array([5, 6, 7], dtype=np.int64)
    batch = benchmark.mlp_reset_batched(model, seed=seeds)
    actions = np.array([0, 1, 1])
    out = benchmark.mlp_transition_batched(model, batch["state"], benchmark.mlp_action_transform_batched(model, actions))
    for i, s in enumerate(seeds):
        single = benchmark.mlp_reset_single(model, seed=int(s))
        np.testing.assert_array_equal(single["observation"], batch["observation"][i].numpy())
        step = benchmark.mlp_transition_single(model, single["state"],
                                               benchmark.mlp_action_transform_single(model, actions[i]))
        np.testing.assert_allclose(step["observation"], out["observation"][i].numpy(), rtol=1e-5, atol=1e-6)
        assert step["terminated"] == bool(out["terminated"][i])
        assert abs(step["reward"] - float(out["reward"][i])) < 1e-5
    # deterministic weights, and the caller's torch RNG is left alone
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    again = benchmark.MLPWorldModel(seed=3)
    assert torch.equal(torch.rand(1), expected)
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_mlp_episodes_end_by_termination_and_time_limit():
    stats = benchmark.episode_stats(benchmark.MLPWorldModel(), max_episode_steps=100, seed=0, n=16, steps=200)
    assert stats["terminations"] > 0 and stats["truncations"] > 0


def test_floor_case_steps_like_the_vector_env():
    """The floor is only a fair limit if it does the env's work: the same observations and states, autoresets
    included, as WorldModelVectorEnv on the same model, seed and actions."""
    model = benchmark.MLPWorldModel(seed=0)
    n, limit = 64, 20
    actions = np.random.default_rng(0).integers(0, model.num_actions, size=n, dtype=np.int64)
    floor = benchmark.floor_case(model, n, actions, seed=3, max_episode_steps=limit)
    envs = benchmark.make_mlp_vector_env(model, n, limit, seed=3, output="numpy")
    envs.reset(seed=3)
    restarted = 0
    for _ in range(3 * limit):
        obs, _, terminated, truncated, _ = envs.step(actions)
        floor.run(1)
        carry = floor.run.carry
        np.testing.assert_array_equal(carry["obs"], obs)
        np.testing.assert_array_equal(carry["state"].numpy(), envs.state.numpy())
        np.testing.assert_array_equal(carry["done"], terminated | truncated)
        restarted += int((terminated | truncated).sum())
    assert restarted >= n  # every row ended at least once: the autoreset path ran


def test_floor_with_parts_left_out_still_restarts_rows():
    """examples/floor_breakdown.py times benchmark.floor_case with parts left out (`without`); each variant must
    still restart the finished rows (bounded episodes, finite observations), and with nothing left out it is the
    floor (test_floor_case_steps_like_the_vector_env)."""
    model = benchmark.MLPWorldModel(seed=0)
    n, limit = 64, 20
    actions = np.random.default_rng(0).integers(0, model.num_actions, size=n, dtype=np.int64)
    parts = benchmark_parts.FLOOR_PARTS
    for without in [(part,) for part in parts] + [parts]:
        case = benchmark.floor_case(model, n, actions, seed=3, max_episode_steps=limit, without=without)
        case.run(3 * limit)
        assert case.run.carry["steps"].max() <= limit and np.isfinite(case.run.carry["obs"]).all(), case.name


def test_floor_breakdown_runs_and_refuses_bad_flags():
    script = str(ROOT / "examples" / "floor_breakdown.py")
    out = subprocess.run([sys.executable, script, "--num-envs", "16", "--repeats", "1", "--min-time", "0.005"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("raw", "floor", "no_check", "no_copies", "no_resets", "no_finite", "none"):
        assert f"  {name} " in out.stdout
    bad = subprocess.run([sys.executable, script, "--repeats", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--repeats expected an integer >= 1, got 0" in bad.stderr
