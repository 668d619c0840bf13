"""What benchmark.py times and how: the MLP world model it steps (random but deterministic weights, CartPole-sized)
with its batched and single-env adapters, and the timing harness (`Case`, `measure`: calibrated, interleaved
repeats). Kept apart so that benchmark.py holds the tables and the command line."""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from seed_stream import stream_next, stream_starts
from world_model_env import WorldModelEnv, WorldModelVectorEnv


# ---------------------------------------------------------------------------------------------------------------
# The MLP world model: (obs, one-hot action) -> 2 x 256 hidden -> (obs delta, reward, termination logit).
# Random but deterministic weights: throughput does not depend on what the model has learned.
# ---------------------------------------------------------------------------------------------------------------
class MLPWorldModel(nn.Module):
    def __init__(self, obs_dim: int = 4, num_actions: int = 2, hidden: int = 256, seed: int = 0):
        super().__init__()
        self.obs_dim, self.num_actions = obs_dim, num_actions
        # fork_rng: seed the weights without disturbing the caller's global torch RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(obs_dim + num_actions, hidden),
                nn.SiLU(),
                nn.Linear(hidden, hidden),
                nn.SiLU(),
                nn.Linear(hidden, obs_dim + 2),
            )
        self.register_buffer("action_embedding", torch.eye(num_actions))
        # Normalisation statistics, as a world model fitted to real data has them (identity-like values here, but
        # the arithmetic is paid on every call like in a trained model). delta_std sets how fast obs drift:
        # with these random weights and the 100-step limit, about half the episodes terminate and half truncate.
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("delta_std", torch.full((obs_dim,), 0.3))
        self.obs_bound = 2.4  # |obs_i| beyond this terminates, like CartPole's cart position
        self.eval()

    def forward(self, obs: torch.Tensor, action_onehot: torch.Tensor):
        out = self.net(torch.cat([(obs - self.obs_mean) / self.obs_std, action_onehot], dim=-1))
        next_obs = obs + out[..., : self.obs_dim] * self.delta_std
        reward = out[..., self.obs_dim]
        # terminated: out of bounds, or the termination head says so with probability > 0.5 (rare here)
        terminated = (next_obs.abs() > self.obs_bound).any(dim=-1) | (out[..., self.obs_dim + 1] > 0.5)
        return next_obs, reward, terminated


def start_observations(seeds: np.ndarray, obs_dim: int) -> np.ndarray:
    """Start obs uniform in [-0.05, 0.05) (CartPole-like); row i depends only on seeds[i].

    A vectorised splitmix64 hash instead of one np.random.Generator per row: an autoreset of k rows then costs a
    few NumPy ops, not k Generator constructions (~20 us each), which would otherwise dominate the env overhead.
    """
    x = np.asarray(seeds, dtype=np.int64).astype(np.uint64)[:, None] * np.uint64(obs_dim)
    x = x + np.arange(obs_dim, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return (0.1 * u - 0.05).astype(np.float32)


# Batched adapters (WorldModelVectorEnv): torch tensors with a leading num_envs axis.
def mlp_reset_batched(model: MLPWorldModel, seed=None, options=None):  # from_numpy: no autograd to turn off
    obs = torch.from_numpy(start_observations(seed, model.obs_dim))
    return {"state": obs, "observation": obs}


def mlp_action_transform_batched(model: MLPWorldModel, actions):
    # numpy or torch int actions -> one-hot rows; as_tensor is zero-copy for int64 numpy arrays
    return model.action_embedding[torch.as_tensor(actions, dtype=torch.long)]


@torch.no_grad()
def mlp_transition_batched(model: MLPWorldModel, state, action):
    next_obs, reward, terminated = model(state, action)
    return {"state": next_obs, "observation": next_obs, "reward": reward, "terminated": terminated}


# Unbatched adapters (WorldModelEnv): numpy in/out, a batch of one inside.
def mlp_reset_single(model: MLPWorldModel, seed=None, options=None):
    obs = start_observations(np.array([seed]), model.obs_dim)[0]
    return {"state": obs, "observation": obs}


def mlp_action_transform_single(model: MLPWorldModel, action):
    return model.action_embedding[int(action)]


@torch.no_grad()
def mlp_transition_single(model: MLPWorldModel, state, action):
    next_obs, reward, terminated = model(torch.as_tensor(state)[None], action[None])
    next_obs = next_obs[0].numpy()
    return {"state": next_obs, "observation": next_obs, "reward": float(reward[0]), "terminated": bool(terminated[0])}


def mlp_spaces(model: MLPWorldModel):
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(model.obs_dim,), dtype=np.float32)
    return obs_space, gym.spaces.Discrete(model.num_actions)


def make_mlp_env(model_kwargs: dict, max_episode_steps: int, seed: int, threads: int, model: Optional[MLPWorldModel] = None):
    """Env thunk for Sync/AsyncVectorEnv. Module level so `spawn` workers can unpickle it; an Async worker builds
    its own model copy (same seed -> same weights) and limits its own torch threads."""
    torch.set_num_threads(threads)
    if model is None:
        model = MLPWorldModel(**model_kwargs)
    obs_space, action_space = mlp_spaces(model)
    return WorldModelEnv(
        model,
        observation_space=obs_space,
        action_space=action_space,
        reset_fn=mlp_reset_single,
        transition_fn=mlp_transition_single,
        action_transform_fn=mlp_action_transform_single,
        max_episode_steps=max_episode_steps,
        seed=seed,
    )


def make_mlp_vector_env(model: MLPWorldModel, num_envs: int, max_episode_steps: int, seed: int, output: str):
    obs_space, action_space = mlp_spaces(model)
    return WorldModelVectorEnv(
        model,
        obs_space,
        action_space,
        reset_fn=mlp_reset_batched,
        transition_fn=mlp_transition_batched,
        num_envs=num_envs,
        action_transform_fn=mlp_action_transform_batched,
        max_episode_steps=max_episode_steps,
        seed=seed,
        output=output,
    )


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One thing to time: run(k) performs k iterations of steps_per_iter env steps each."""

    name: str
    run: Callable[[int], None]
    steps_per_iter: int
    close: Callable[[], None] = lambda: None
    iters: int = 1


def timed(case: Case, iters: int) -> float:
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        case.run(iters)
        return time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def calibrate(case: Case, min_time: float) -> None:
    """Warm up and pick iterations so one measurement lasts about min_time seconds."""
    case.run(2)  # first calls pay one-off costs (allocator, lazy init, worker start-up)
    iters = 1
    while True:
        elapsed = timed(case, iters)
        if elapsed >= min_time / 4:
            break
        iters *= 4 if elapsed < min_time / 40 else 2
    case.iters = max(1, math.ceil(iters * min_time / max(elapsed, 1e-9)))


def measure(cases: list[Case], repeats: int, min_time: float) -> dict[str, list[float]]:
    for case in cases:
        calibrate(case, min_time)
    rates = {case.name: [] for case in cases}
    for _ in range(repeats):
        for case in cases:  # interleaved, so drift of a shared machine hits every variant alike
            rates[case.name].append(case.iters * case.steps_per_iter / timed(case, case.iters))
    return rates


def raw_batched_case(model: MLPWorldModel, n: int, actions: np.ndarray, seed: int) -> Case:
    state = mlp_reset_batched(model, seed=np.arange(seed, seed + n, dtype=np.int64))["state"]

    def run(iters: int) -> None:
        for _ in range(iters):
            mlp_transition_batched(model, state, mlp_action_transform_batched(model, actions))

    return Case("raw", run, n)


FLOOR_PARTS = ("check", "copies", "resets", "finite")


def floor_case(model: MLPWorldModel, n: int, actions: np.ndarray, seed: int, max_episode_steps: int,
               without: tuple[str, ...] = ()) -> Case:
    """`floor`: the least a batched env must add to the raw step, written inline for this model only: one action
    check, fresh copies of the observations, rewards and flags, step counters and the time limit, the finished rows
    restarted (NEXT_STEP, seeds from their streams, their transition cleared), one finiteness check. No adapter
    validation, no pytrees, no function layers. `vec_numpy` / `floor` is what the env's generality costs;
    `floor` / `raw` is the most any env could reach on this machine (the extra NumPy calls run right after the
    model's matmuls, with cold caches, and cost several times their warm time).

    ``without`` leaves parts of FLOOR_PARTS out, for examples/floor_breakdown.py: "resets" left out restarts the
    finished rows from fixed start states (no seed streams, no reset_fn call), so the episodes stay bounded."""
    state = mlp_reset_batched(model, seed=np.arange(seed, seed + n, dtype=np.int64))["state"]
    start = state.numpy().copy()
    carry = {"state": state, "steps": np.zeros(n, np.int64), "rows": np.zeros(0, np.int64), "done": None,
             "streams": stream_starts(np.arange(seed, seed + n, dtype=np.int64))}
    check, copies, resets, finite = (part not in without for part in FLOOR_PARTS)

    @torch.no_grad()
    def run(iters: int) -> None:
        for _ in range(iters):
            if check and int(np.maximum.reduce(actions.view(np.uint64), axis=None)) >= model.num_actions:
                raise ValueError("floor_case: action out of range")
            out = mlp_transition_batched(model, carry["state"], mlp_action_transform_batched(model, actions))
            state = out["state"]
            obs, reward, terminated = out["observation"].numpy(), out["reward"].numpy(), out["terminated"].numpy()
            if copies:
                obs, reward, terminated = obs.astype(np.float32), reward.astype(np.float32), terminated.copy()
            steps, rows, done = carry["steps"], carry["rows"], carry["done"]
            steps += 1
            if len(rows):
                reward[done], terminated[done], steps[done] = 0.0, False, 0
                if resets:
                    seeds = []
                    for row in rows.tolist():
                        carry["streams"][row], row_seed = stream_next(int(carry["streams"][row]))
                        seeds.append(row_seed)
                    fresh = mlp_reset_batched(model, seed=np.array(seeds, dtype=np.int64))
                    obs[rows], state.numpy()[rows] = fresh["observation"].numpy(), fresh["state"].numpy()
                else:
                    obs[rows], state.numpy()[rows] = start[rows], start[rows]
            done = terminated | (steps >= max_episode_steps)
            if finite and not math.isfinite(float(np.add.reduce(reward)) + float(np.add.reduce(obs, axis=None))):
                raise ValueError("floor_case: non-finite step")
            carry["state"], carry["obs"], carry["done"] = state, obs, done
            carry["rows"] = done.nonzero()[0]

    run.carry = carry  # the tests compare it with WorldModelVectorEnv's trajectory
    name = "floor" if not without else "none" if set(without) >= set(FLOOR_PARTS) else "no_" + "_".join(without)
    return Case(name, run, n)


def vector_case(name: str, envs, actions, seed: int) -> Case:
    envs.reset(seed=seed)

    def run(iters: int) -> None:
        for _ in range(iters):
            envs.step(actions)

    return Case(name, run, envs.num_envs, close=envs.close)


# ---------------------------------------------------------------------------------------------------------------
# The recurrent latent model (rssm.py): its own batched step against WorldModelVectorEnv on it
# ---------------------------------------------------------------------------------------------------------------
def rssm_cases(n: int, seed: int, env_id: str = "CartPoleNoVel-v1", real_steps: int = 500) -> list[Case]:
    """`rssm_raw`: RSSMImagination.batched_transition_fn on a fixed state of n rows (the prior step of the default
    network size: GRU, ensemble of prior heads, reward and continue heads, the halt rule); `rssm_env`: the same
    model in `imagined_vector_env(n)` as the scripts step it (numpy output, halt 2.0, NEXT_STEP autoreset from
    posterior start states). The network is fitted for one update on `real_steps` random transitions: what a step
    costs does not depend on what it learned."""
    import real_env
    import rssm

    model = rssm.RSSMModel(env_id, seed=seed, first_updates=1)
    model.fit(real_env.collect_transitions(env_id, real_steps, seed=seed), seed=seed)
    im = rssm.RSSMImagination(start="start", halt=2.0)
    actions = np.random.default_rng(seed).integers(0, model.action_space.n, size=n, dtype=np.int64)
    state = im.batched_reset_fn(model, seed=np.arange(seed, seed + n, dtype=np.int64))["state"]

    @torch.no_grad()
    def run_raw(iters: int) -> None:
        for _ in range(iters):
            im.batched_transition_fn(model, state, actions)

    envs = model.imagined_vector_env(n, seed=seed, start="start", halt=2.0)
    return [Case("rssm_raw", run_raw, n), vector_case("rssm_env", envs, actions, seed)]
