"""The reference ensemble's adapters for `world_model_env.py`: where imagined episodes start, the halt rule, and a
per-row counter RNG, so that each imagined row's trajectory depends only on its reset seed and its actions.

`make_imagined_env` / `make_imagined_vector_env` build a `WorldModelEnv` / `WorldModelVectorEnv` around an
`ensemble.EnsembleWorldModel`; scripts reach them through the world-model interface (`EnsembleModel`).
"""
import math

import gymnasium as gym
import numpy as np
import torch

from real_env import to_device, to_numpy
from world_model_env import WorldModelEnv, WorldModelVectorEnv

# ----------------------------------------------------------------------------------------------------------------
# Per-row counter RNG: imagined randomness (start state, member choice, optional noise) lives in the env state, so
# each row's trajectory depends only on its reset seed and its actions (reproducible under partial autoresets and
# independent of other envs sharing the same model object).
# ----------------------------------------------------------------------------------------------------------------
_LCG_A, _LCG_C, _LCG_MASK = 1103515245, 12345, 0x7FFFFFFF


def _lcg_next(s):  # s < 2**31, so A*s < 2**62: no int64 overflow on any device
    return (s * _LCG_A + _LCG_C) & _LCG_MASK


def _lcg_bits16(s):  # the high bits of an LCG are the good ones
    return s >> 15


def _seed_to_rng_state(seeds):
    """Mixes int seeds (any int64 values) into 31-bit LCG states with a splitmix64 finaliser."""
    z = np.asarray(seeds, dtype=np.int64).reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64(_LCG_MASK)).astype(np.int64)


def _draw_bits32(s):
    """One 32-bit value per row (from the high 16 bits of two LCG steps); returns (new_s, bits)."""
    s = _lcg_next(s)
    hi = _lcg_bits16(s)
    s = _lcg_next(s)
    return s, (hi << 16) | _lcg_bits16(s)


def _draw_uniform(s, count):
    """count uniforms in (0,1] per row from LCG states s (B,); returns (new_s, u (B,count)) float32."""
    us = []
    for _ in range(count):  # loop over the number of values, never over rows
        s, bits = _draw_bits32(s)
        us.append((bits.float() + 1.0) / float(2**32))
    return s, torch.stack(us, dim=1).clamp(max=1.0)


def _draw_index(s, n):
    """A uniform index in [0, n) per row, integer-only (bits * n < 2**63 for n < 2**31)."""
    s, bits = _draw_bits32(s)
    return s, (bits * n) >> 32


# ----------------------------------------------------------------------------------------------------------------
# Adapters for world_model_env.py
# ----------------------------------------------------------------------------------------------------------------
class Imagination:
    """The adapters of `world_model_env.py` for an `EnsembleWorldModel`, with the settings of imagination.

    start: "start" begins imagined episodes at real reset observations, "buffer" at real states from the data.
    halt: the one halt rule every script shares (MOReL's pessimistic MDP). A step whose ensemble disagreement
    exceeds `halt` x the 99th percentile seen on real data leaves the region the model knows: it ends the episode
    as terminated, with reward min(0, lowest non-terminal reward) / (1 - gamma) + min(0, lowest terminal reward),
    a lower bound on any real return. On CartPole (rewards 1) that costs what a fall costs; with negative rewards
    (Pendulum) it is worse than anything real, so a policy is never drawn to the states where the model is wrong.
    A penalty that ends the episode (LunarLander's crash) counts once: counted forever it would swamp the value
    targets (-10,000 instead of about -300). 0 turns it off.
    sample_noise: sample each member's Gaussian instead of using its mean.
    disagreement: False skips the members a row did not choose when the halt rule is off (halt 0): the step is
    then about ensemble_size x cheaper and info carries no "disagreement".
    termination_fn: a known termination rule, `termination_fn(next_obs) -> bool tensor (B,)`, that replaces the
    learned termination head (MBPO's static termination functions; the halt rule still ends episodes on top).
    Each row uses a random member per step (MBPO-style: one of the model's elites), drawn from a per-row random state seeded by its reset
    seed, so a row's trajectory depends only on its seed and its actions (batched and single envs agree)."""

    def __init__(self, start="start", halt=0.0, gamma=0.99, sample_noise=False, disagreement=True,
                 termination_fn=None):
        if termination_fn is not None and not callable(termination_fn):
            raise ValueError(f"termination_fn must be callable as termination_fn(next_obs) -> bool tensor (B,), got "
                             f"{type(termination_fn).__name__}")
        self.termination_fn = termination_fn
        if start not in ("start", "buffer"):
            raise ValueError(f"imagined start must be 'start' or 'buffer', got {start!r}")
        if not (isinstance(halt, (int, float)) and halt >= 0):
            raise ValueError(f"halt must be a number >= 0 (0 turns the halt rule off), got {halt!r}")
        self.start, self.halt, self.gamma, self.sample_noise = start, float(halt), float(gamma), bool(sample_noise)
        self.disagreement = bool(disagreement) or self.halt > 0  # the halt rule needs it

    def batched_reset_fn(self, model, seed=None, options=None):
        """One row per seed; torch tensors on model.device.

        options={"states": obs_batch} starts the rows at those observations (one per row, e.g. real states for
        MBPO's branched rollouts) instead of drawing them from the start/buffer pool; the seeds still seed the rows'
        member draws. Autoresets pass no options, so later episodes of a row start from the pool again."""
        if seed is None:
            seed = np.random.randint(0, 2**31 - 1, size=(1,))
        s = to_device(_seed_to_rng_state(np.asarray(seed).reshape(-1)), model.device)  # autoresets: no GPU sync
        if options and options.get("states") is not None:
            obs = torch.as_tensor(to_numpy(options["states"]), dtype=torch.float32, device=model.device)
            obs = obs.reshape(-1, model.obs_dim).clone()
            if len(obs) != len(s):
                raise ValueError(f"reset options['states'] has {len(obs)} rows for {len(s)} envs; pass one per env")
            return {"state": {"obs": obs, "rng": s}, "observation": obs}
        pool = model.start_obs if self.start == "start" else model.buffer_obs
        if len(pool) == 0:
            raise ValueError(f"the world model has no stored {self.start!r} states: fit it with fit_world_model() "
                             "or load a checkpoint written by save_world_model()")
        s, idx = _draw_index(s, len(pool))
        obs = pool[idx].clone()
        return {"state": {"obs": obs, "rng": s}, "observation": obs}

    def batched_transition_fn(self, model, state, action):
        """ONE forward for all rows, a random member per row."""
        s = state["rng"]
        with torch.no_grad():
            s, member = _draw_index(s, model.num_elites)
            if model.num_elites < model.ensemble_size:  # else elites == arange: the draw is the member
                member = model.elites[member]
            noise = None
            if self.sample_noise:
                s, u = _draw_uniform(s, 2 * model.out_dim)
                u1, u2 = u[:, : model.out_dim], u[:, model.out_dim:]
                noise = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)  # Box-Muller
            # the Discrete range check is free on the CPU; on a GPU it is a host sync (no CUDA graph holds one),
            # and the envs have checked the actions before they reach an adapter
            next_obs, reward, logit, disagreement = model.predict(state["obs"], action, members=member, noise=noise,
                                                                  disagreement=self.disagreement,
                                                                  validate=s.device.type == "cpu")
        terminated = logit > 0.0 if self.termination_fn is None else self.termination_fn(next_obs)  # logit > 0: p > 0.5
        info = {"disagreement": disagreement} if self.disagreement else {}
        if self.halt > 0:
            halted = disagreement > self.halt * model.disagreement_ref
            floor = model.reward_min.clamp(max=0.0) / (1.0 - self.gamma) + model.terminal_reward_min.clamp(max=0.0)
            reward = torch.where(halted, floor, reward)
            terminated = terminated | halted
            info["halted"] = halted
        return {"state": {"obs": next_obs, "rng": s}, "observation": next_obs, "reward": reward,
                "terminated": terminated, "info": info}

    def reset_fn(self, model, seed=None, options=None):
        """Unbatched reset for WorldModelEnv (a batch of one)."""
        out = self.batched_reset_fn(model, seed=np.array([0 if seed is None else seed]), options=options)
        obs = out["observation"][0].cpu().numpy()
        return {"state": {"obs": obs, "rng": int(out["state"]["rng"][0])}, "observation": obs}

    def transition_fn(self, model, state, action):
        """Unbatched step for WorldModelEnv (a batch of one)."""
        batched_state = {"obs": torch.as_tensor(np.asarray(state["obs"], dtype=np.float32)[None], device=model.device),
                         "rng": torch.tensor([int(state["rng"])], dtype=torch.int64, device=model.device)}
        out = self.batched_transition_fn(model, batched_state, np.asarray(to_numpy(action))[None])
        obs = out["observation"][0].cpu().numpy()
        return {"state": {"obs": obs, "rng": int(out["state"]["rng"][0])}, "observation": obs,
                "reward": float(out["reward"][0]), "terminated": bool(out["terminated"][0]),
                "info": {k: v[0].item() for k, v in out["info"].items()}}


def make_imagined_env(model, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99, sample_noise=False,
                      disagreement=True, termination_fn=None):
    """A single `WorldModelEnv` (NumPy) driven by `model`, with the real env's spaces. horizon: the imagined time
    limit (a truncation; default the real env's); start / halt / gamma / sample_noise / disagreement: see
    `Imagination`."""
    im = Imagination(start, halt, gamma, sample_noise, disagreement, termination_fn)
    return WorldModelEnv(model, observation_space=model.observation_space, action_space=model.action_space,
                         reset_fn=im.reset_fn, transition_fn=im.transition_fn,
                         max_episode_steps=model.max_episode_steps if horizon is None else horizon, seed=seed)


def make_imagined_vector_env(model, num_envs, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99,
                             sample_noise=False, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP, output="numpy",
                             disagreement=True, termination_fn=None):
    """A natively batched `WorldModelVectorEnv`: one model forward steps all `num_envs` imagined envs.
    output="torch" keeps observations, rewards and flags on model.device (no host copies)."""
    im = Imagination(start, halt, gamma, sample_noise, disagreement, termination_fn)
    return WorldModelVectorEnv(model, observation_space=model.observation_space, action_space=model.action_space,
                               reset_fn=im.batched_reset_fn, transition_fn=im.batched_transition_fn,
                               num_envs=num_envs, max_episode_steps=model.max_episode_steps if horizon is None else horizon,
                               seed=seed, autoreset_mode=autoreset_mode, output=output, device=model.device)

