"""The recurrent latent reference world model (`--world-model rssm`): a Dreamer-style RSSM behind the world-model
interface (`world_model.py`), for envs whose observation does not hold the state (CartPoleNoVel-v1,
PendulumNoVel-v1) and for pixels (PendulumPixels-v1).

The model (`RSSMNet`)
- state: a deterministic GRU state h (`deter`) and a stochastic latent z (`stoch`): `groups` categorical variables
  of `classes` classes each, one-hot, as in DreamerV3. Why categorical and not PlaNet's Gaussian: a categorical
  latent cannot collapse its variance (no std floor to tune), the 1% uniform mix keeps every KL finite, a sample is
  one uniform number per group (cheap to draw from the per-row random state of the batched env, below), and a
  one-hot sample is exactly the same kind of input to the policy in imagination and in reality.
- h' = GRU(h, [z, a]); posterior q(z' | h', embed(o')); prior p(z' | h'), an ENSEMBLE of `members` prior heads
  trained each on its own towards the posterior. Imagination samples the members' mean distribution; their
  disagreement (the Jensen-Shannon divergence of the members' distributions, summed over groups: what they know
  minus what they agree on, as BALD measures epistemic uncertainty) says where the model is wrong, so the shared
  halt rule works: a step whose disagreement exceeds `halt` x its 99th percentile on the real data ends the
  imagined episode with the lowest possible return (the same rule and floor as the ensemble's, see
  `ensemble_imagination.Imagination`).
- encoder / decoder: MLPs on vector observations normalised by the mean and std of all the data (recomputed at
  every fit, so a policy that goes somewhere new is not fed inputs of 16 stds), a small CNN (stride-2 convolutions
  down to 4 x 4 and transposed ones back) on uint8 frames. Reward head and continue head on the features [h, z];
  the continue head learns termination only (time-limit truncation is not an ending: a truncated episode's last
  step continues).
- losses (DreamerV3): reconstruction, reward, termination, and KL balancing with free bits:
  0.5 * max(1, KL(sg(post) || prior_k)) for each member k plus 0.1 * max(1, KL(post || sg(prior))).
- trained on sequences of real episodes (the TransitionBuffer is cut by episode_ids into a stream of steps
  (previous action, observation, reward, termination, is_first), DreamerV3's replay format); every episode starts
  from the zero state, a sequence cut out of the middle of an episode too.

The policy observes the features [h, z] (`observation_space`): in imagination the prior's, in the real env the
posterior's (`real_env(env)`: the belief updated from each real observation and the previous action, zeroed at
reset: DreamerV3's acting carry). Imagined episodes start from posterior states of the real data ("buffer": any
step of any real episode, filtered from its start; "start": the episodes' first observations). Because the features
ARE the state, `reset(options={"states": features})` starts rows at given features (SAC's branched rollouts from
the beliefs in its replay).
"""
import math
import os
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

import world_model
from ensemble import _describe_space_difference, _space_from_dict, _space_to_dict
from ensemble_imagination import _draw_index, _seed_to_rng_state
from real_env import TransitionBuffer, make_real_env, to_device, to_numpy
from rssm_net import RSSMNet, _entropy, _is_pixels, _rng_uniforms, _sample_onehot, _unimix, check_spaces_supported
from run_io import json_safe, save_torch_atomic
from world_model_env import WorldModelEnv, WorldModelVectorEnv

CHECKPOINT_FORMAT = "world-model-env/rssm"
CHECKPOINT_VERSION = 1

# The network's size and its fitting, for vector observations and for pixels (RSSMModel(..., name=value) overrides
# any of them; a `--world-model my.py:make` factory passes them from a script). Why these values (CartPoleNoVel-v1,
# one CPU thread shared with other jobs):
# - small (deter 128, 16 x 16 latent, 128 hidden, 5 prior members of 64): one update of 32 sequences of 32 steps
#   takes ~0.2-0.3 s on the CPU; the first fit (600 updates) ~2 min, a refit (100 updates) ~20 s.
# - batch 32 x 32 steps rather than DreamerV3's 16 x 64: the same 1,024 steps, half the sequential GRU steps.
# - obs_loss_scale 100: the reconstruction is a Gaussian of std 0.1 (in units of the data's std) rather than 1. At 1
#   the posterior carried ~1 nat (the free bits) and reconstructed the policy's data to 0.07 std^2. Pixels keep 1:
#   a frame has 12,288 terms already.
# - term_pos_weight 1 (DreamerV3's plain continue loss): sqrt(negatives / positives) weighting predicted falls
#   where there were none (precision 0.13 on the policy's data), imagined episodes ended early.
#   With scale 1, sqrt weighting and the normalisation frozen at the first fit, CartPoleNoVel-v1 seed 2 stalled at
#   ~150 (12,000 real); with the three changes together it reached 500 with 6,000.
# - min_refit_updates 100: a refit makes --refit-passes passes over the new data (as the ensemble's), at least 100
#   updates: PPO's Dyna round of 1,000 steps (20 passes: 20 updates) and SAC's refit of 250 (200 passes: 49) both
#   get 100, ~100 replayed steps per new real one; fewer and the latent model lagged behind the policy.
VECTOR_CONFIG = dict(deter=128, groups=16, classes=16, hidden=128, members=5, prior_hidden=64, batch=32, seq_len=32,
                     lr=6e-4, first_updates=600, min_refit_updates=100, obs_loss_scale=100.0, term_pos_weight=1.0)
PIXEL_CONFIG = dict(deter=128, groups=16, classes=16, hidden=128, members=5, prior_hidden=64, batch=8, seq_len=32,
                    lr=6e-4, first_updates=600, min_refit_updates=100, obs_loss_scale=1.0, term_pos_weight=1.0,
                    cnn_depth=16)
NUM_BUFFER_STATES = 10_000


# ----------------------------------------------------------------------------------------------------------------
# Real data as DreamerV3's replay stream
# ----------------------------------------------------------------------------------------------------------------
def episode_stream(data: TransitionBuffer, net: RSSMNet):
    """The TransitionBuffer as one stream of M = N + E steps (E episodes): each episode is its first observation
    (is_first, no previous action, reward 0) followed by one step per transition (previous action, next
    observation, reward, terminated). Tensors on net.device; obs keep their dtype (uint8 pixels)."""
    ids = data.episode_ids
    n = len(data)
    new_episode = np.ones(n, dtype=bool)
    new_episode[1:] = ids[1:] != ids[:-1]
    episode_index = np.cumsum(new_episode) - 1
    firsts = np.nonzero(new_episode)[0]
    pos_first = firsts + np.arange(len(firsts))
    pos_next = np.arange(n) + episode_index + 1
    M = n + len(firsts)
    obs = np.empty((M, *data.obs.shape[1:]), dtype=data.obs.dtype)
    obs[pos_first], obs[pos_next] = data.obs[firsts], data.next_obs
    dev = net.device
    prev_act = torch.zeros(M, net.act_dim, device=dev)
    prev_act[torch.as_tensor(pos_next, device=dev)] = net.encode_action(data.actions)
    out = {"obs": torch.as_tensor(obs, device=dev), "prev_act": prev_act}
    for name, values, dtype in (("reward", data.rewards, np.float32), ("term", data.terminated, bool),
                                ("first", None, bool)):
        arr = np.zeros(M, dtype=dtype)
        if values is None:
            arr[pos_first] = True
        else:
            arr[pos_next] = values
        out[name] = torch.as_tensor(arr, device=dev)
    return out


def sample_sequences(stream, batch, seq_len, generator):
    """`batch` windows of `seq_len` consecutive stream steps, uniform over the stream; a window that begins in the
    middle of an episode begins from the zero state (its first step is marked first)."""
    M = len(stream["first"])
    seq_len = min(seq_len, M)
    starts = torch.randint(0, M - seq_len + 1, (batch,), generator=generator)
    index = (starts[:, None] + torch.arange(seq_len)[None, :]).to(stream["first"].device)
    out = {k: v[index] for k, v in stream.items()}
    out["first"] = out["first"].clone()
    out["first"][:, 0] = True
    return out


# ----------------------------------------------------------------------------------------------------------------
# Imagination adapters (world_model_env.py); the env's "model" is the RSSMModel, so refits and loads apply at once
# ----------------------------------------------------------------------------------------------------------------
class RSSMImagination:
    """Adapters for `WorldModelVectorEnv` / `WorldModelEnv`. The state is a dict of tensors: deter (B, D), stoch
    (B, G*C) and rng (B, G), a per-row counter RNG (ensemble_imagination's LCG, one stream per latent group) seeded
    by the row's reset seed, so a row's trajectory depends only on its seed and its actions. start / halt / gamma:
    as for the ensemble (`ensemble_imagination.Imagination`)."""

    def __init__(self, start="start", halt=0.0, gamma=0.99):
        if start not in ("start", "buffer"):
            raise ValueError(f"imagined start must be 'start' or 'buffer', got {start!r}")
        if not (isinstance(halt, (int, float)) and halt >= 0):
            raise ValueError(f"halt must be a number >= 0 (0 turns the halt rule off), got {halt!r}")
        self.start, self.halt, self.gamma = start, float(halt), float(gamma)

    def batched_reset_fn(self, model, seed=None, options=None):
        net = model.fitted_net()
        if seed is None:
            seed = np.random.randint(0, 2**31 - 1, size=(1,))
        seeds = np.asarray(seed, dtype=np.int64).reshape(-1, 1)
        s = to_device(_seed_to_rng_state(seeds * net.groups + np.arange(net.groups)).reshape(-1, net.groups),
                      net.device)  # autoresets: no GPU sync
        if options and options.get("states") is not None:  # features [h, z] given: they are the state
            feat = torch.as_tensor(to_numpy(options["states"]), dtype=torch.float32, device=net.device)
            feat = feat.reshape(-1, net.feat_dim)
            if len(feat) != len(s):
                raise ValueError(f"reset options['states'] has {len(feat)} rows for {len(s)} envs; pass one per env")
            deter, stoch = feat[:, :net.deter].clone(), feat[:, net.deter:].clone()
        else:
            pool_deter, pool_probs = ((net.start_deter, net.start_probs) if self.start == "start"
                                      else (net.buffer_deter, net.buffer_probs))
            if len(pool_deter) == 0:
                raise ValueError(f"the RSSM has no stored {self.start!r} states: fit() or load() it first")
            s[:, 0], idx = _draw_index(s[:, 0], len(pool_deter))  # the pool index from the first group's stream
            s, u = _rng_uniforms(s)
            deter = pool_deter[idx]
            stoch = _sample_onehot(pool_probs[idx], u).flatten(1)
        return {"state": {"deter": deter, "stoch": stoch, "rng": s}, "observation": torch.cat([deter, stoch], 1)}

    def batched_transition_fn(self, model, state, action):
        net = model.fitted_net()
        s, u = _rng_uniforms(state["rng"])
        deter, stoch, reward, logit, disagreement = net.imagine_step(state["deter"], state["stoch"],
                                                                      net.encode_action(action), u)
        terminated = logit > 0.0
        info = {"disagreement": disagreement}
        if self.halt > 0:
            halted = disagreement > self.halt * net.disagreement_ref
            floor = net.reward_min.clamp(max=0.0) / (1.0 - self.gamma) + net.terminal_reward_min.clamp(max=0.0)
            reward = torch.where(halted, floor, reward)
            terminated = terminated | halted
            info["halted"] = halted
        return {"state": {"deter": deter, "stoch": stoch, "rng": s}, "observation": torch.cat([deter, stoch], 1),
                "reward": reward, "terminated": terminated, "info": info}

    def reset_fn(self, model, seed=None, options=None):
        out = self.batched_reset_fn(model, seed=np.array([0 if seed is None else seed]), options=options)
        return {"state": out["state"], "observation": out["observation"][0].cpu().numpy()}

    def transition_fn(self, model, state, action):
        action = np.asarray(to_numpy(action))[None]
        out = self.batched_transition_fn(model, state, action)
        return {"state": out["state"], "observation": out["observation"][0].cpu().numpy(),
                "reward": float(out["reward"][0]), "terminated": bool(out["terminated"][0]),
                "info": {k: v[0].item() for k, v in out["info"].items()}}


class BeliefEnv(gym.Wrapper):
    """The real env seen through the RSSM: its observation is the belief's features [h, z], updated from each
    real observation and the previous action (the posterior, sampled), and started over at every reset from the
    zero state and no action (DreamerV3's acting carry). Rewards, flags and actions are the real env's."""

    def __init__(self, env, model):
        super().__init__(env)
        self.model = model
        self.observation_space = model.observation_space
        self._rng = np.random.default_rng()
        self._deter = self._stoch = None

    def _observe(self, obs, act):
        net = self.model.fitted_net()
        with torch.no_grad():
            embed = net.encode(torch.as_tensor(np.asarray(obs)[None], device=net.device))
            self._deter = net.img_step(self._deter, self._stoch, net.img_a(act))
            probs = _unimix(net.posterior_logits(self._deter, embed))
            u = torch.as_tensor(1.0 - self._rng.random((1, net.groups)), dtype=torch.float32, device=net.device)
            self._stoch = _sample_onehot(probs, u).flatten(1)
            return torch.cat([self._deter, self._stoch], 1)[0].cpu().numpy()

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._deter, self._stoch, act = self.model.fitted_net().initial(1)
        return self._observe(obs, act), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        act = self.model.fitted_net().encode_action(np.asarray(action)[None])
        return self._observe(obs, act), reward, terminated, truncated, info


# ----------------------------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------------------------
class RSSMModel(world_model.WorldModel):
    """`--world-model rssm`: the recurrent latent world model behind the interface. `net` is the `RSSMNet` once
    fitted or loaded, `data` the real transitions it was fitted on, `extra` what its checkpoint carried. Keyword
    arguments override VECTOR_CONFIG / PIXEL_CONFIG (network sizes and the fitting budget)."""

    def __init__(self, env_id, seed=0, device="cpu", **config):
        env = make_real_env(env_id, "RSSMModel")
        check_spaces_supported(env.observation_space, env.action_space, f"RSSMModel(env_id={env_id!r})")
        self.real_observation_space, self.action_space = env.observation_space, env.action_space
        self.max_episode_steps = env.spec.max_episode_steps if env.spec is not None else None
        env.close()
        pixels = _is_pixels(self.real_observation_space)
        unknown = set(config) - set(PIXEL_CONFIG) - set(VECTOR_CONFIG)
        if unknown:
            raise TypeError(f"RSSMModel: unknown settings {sorted(unknown)}; known: {sorted(PIXEL_CONFIG)}")
        self.config = {**(PIXEL_CONFIG if pixels else VECTOR_CONFIG), **config}
        c = self.config
        feat_dim = c["deter"] + c["groups"] * c["classes"]
        # GRU states lie in (-1, 1), one-hot samples in {0, 1}
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (feat_dim,), dtype=np.float32)
        self.env_id, self.seed, self.device = env_id, seed, str(device)
        self.net, self.data, self.extra, self.optimizer, self.fits = None, None, {}, None, 0

    def fitted_net(self):
        if self.net is None:
            raise ValueError("RSSMModel: fit() or load() it before imagining or acting through it")
        return self.net

    def _new_net(self, seed):
        torch.manual_seed(seed)
        net = RSSMNet(self.real_observation_space.shape, self.action_space, **self.config).to(self.device)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=self.config["lr"], eps=1e-6)
        return net

    @torch.no_grad()
    def _set_statistics(self, data):
        """Observation and reward normalisation, reward clip bounds and the lowest rewards (the halt rule's floor),
        from all the data. The normalisation follows the data on every fit, warm refits too: frozen at the first fit
        (uniform random data), a policy that drifts the cart to x = 1.2 fed the encoder 16-std inputs and the
        reconstruction there was 7x worse than on the data (CartPoleNoVel-v1 seed 2)."""
        net, dev = self.net, self.net.device
        r = torch.as_tensor(data.rewards, device=dev)
        if not net.pixels:
            obs = torch.as_tensor(np.concatenate([data.obs, data.next_obs]), device=dev)
            std = obs.std(0) if len(obs) > 1 else torch.ones_like(net.obs_std)
            net.obs_mean.copy_(obs.mean(0))
            net.obs_std.copy_(torch.where(std < 1e-6, torch.ones_like(std), std))
        std = r.std() if len(r) > 1 else torch.ones(())
        net.reward_mean.copy_(r.mean())
        net.reward_constant.copy_(std < 1e-6)
        net.reward_std.copy_(torch.where(std < 1e-6, torch.ones(()), std))
        width = (r.max() - r.min()).clamp_min(1e-3)
        net.reward_clip.copy_(torch.stack([r.min() - width, r.max() + width]))
        terminal = torch.as_tensor(data.terminated, device=dev)
        net.reward_min.copy_(r[~terminal].min() if (~terminal).any() else torch.zeros(()))
        net.terminal_reward_min.copy_(r[terminal].min() if terminal.any() else torch.zeros(()))

    @torch.no_grad()
    def _set_states(self, stream, seed):
        """After a fit: the posterior states of the real data (imagination's starts) and the disagreement's 99th
        percentile on them (the halt rule's unit)."""
        net = self.net
        gen = torch.Generator(device=net.device).manual_seed(seed)
        deter, logits = net.filter_episodes(stream, gen)
        first = stream["first"]
        probs = _unimix(logits)
        net.start_deter, net.start_probs = deter[first].clone(), probs[first].clone()
        # buffer starts: any real step that is not past a termination (the terminal obs is no state to act in)
        candidates = torch.nonzero(~stream["term"]).flatten()
        pick = torch.randperm(len(candidates), generator=gen, device=net.device)[:NUM_BUFFER_STATES]
        net.buffer_deter, net.buffer_probs = deter[candidates[pick]].clone(), probs[candidates[pick]].clone()
        probs = net.prior_probs(deter[candidates[pick]])
        disagreement = _entropy(probs.mean(0)) - _entropy(probs).mean(0)
        net.disagreement_ref.copy_(torch.quantile(disagreement, 0.99).clamp_min(1e-6))

    def fit(self, data, num_new=None, *, seed=0, refit_passes=20, writer=None, global_step=0):
        """A new fit on `data` (`num_new` None: fresh weights, `first_updates` minibatch updates), or a warm refit
        after `num_new` transitions were appended: the updates of `refit_passes` passes over the new data, at least
        `min_refit_updates`, drawn from all the data (each update: `batch` sequences of `seq_len` steps).
        Returns the metrics (the last losses, `updates`, `seconds`)."""
        if not isinstance(data, TransitionBuffer) or len(data) < 2:
            raise ValueError(f"RSSMModel.fit: data must be a TransitionBuffer of at least 2 transitions, got "
                             f"{type(data).__name__} of {len(data) if hasattr(data, '__len__') else '?'}")
        t0, c = time.time(), self.config
        warm = num_new is not None and self.net is not None
        if not warm:
            self.net = self._new_net(seed)
            updates = c["first_updates"]
        else:
            updates = max(c["min_refit_updates"], math.ceil(refit_passes * num_new / (c["batch"] * c["seq_len"])))
        self._set_statistics(data)
        net = self.net
        stream = episode_stream(data, net)
        terms = float(data.terminated.sum())
        pos_weight = (math.sqrt(max(len(data) - terms, 1.0) / max(terms, 1.0)) if c["term_pos_weight"] == "sqrt"
                      else float(c["term_pos_weight"]))
        pos_weight = torch.tensor(pos_weight, device=net.device)
        gen = torch.Generator().manual_seed(seed * 1000 + self.fits)
        net.train()
        totals = {}
        for _ in range(updates):
            batch = sample_sequences(stream, c["batch"], c["seq_len"], gen)
            u = torch.rand(batch["first"].shape[1], c["batch"], net.groups, generator=gen).clamp_min(1e-7)
            loss, parts = net.loss(batch, u.to(net.device), pos_weight, c["obs_loss_scale"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 100.0)
            self.optimizer.step()
            for k, v in parts.items():  # an average over the last fifth of the updates
                totals[k] = totals.get(k, 0.0) * 0.8 + 0.2 * v if k in totals else v
        net.eval()
        self._set_states(stream, seed + self.fits)
        self.fits += 1
        self.data = data
        metrics = {k: float(v) for k, v in totals.items()}
        metrics.update(updates=updates, seconds=time.time() - t0, num_train=len(data),
                       disagreement_ref=float(net.disagreement_ref))
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"world_model/{k}", v, global_step)
        return metrics

    # ---- imagination and the real env -------------------------------------------------------------------------
    def imagined_env(self, *, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99):
        im = RSSMImagination(start, halt, gamma)
        return WorldModelEnv(self, observation_space=self.observation_space, action_space=self.action_space,
                             reset_fn=im.reset_fn, transition_fn=im.transition_fn,
                             max_episode_steps=self.max_episode_steps if horizon is None else horizon, seed=seed)

    def imagined_vector_env(self, num_envs, *, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99,
                            output="numpy", autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP):
        im = RSSMImagination(start, halt, gamma)
        return WorldModelVectorEnv(self, observation_space=self.observation_space, action_space=self.action_space,
                                   reset_fn=im.batched_reset_fn, transition_fn=im.batched_transition_fn,
                                   num_envs=num_envs,
                                   max_episode_steps=self.max_episode_steps if horizon is None else horizon,
                                   seed=seed, autoreset_mode=autoreset_mode, output=output, device=self.device)

    def real_env(self, env):
        diff = _describe_space_difference(self.real_observation_space, env.observation_space)
        if diff is not None:
            raise ValueError(f"RSSMModel for {self.env_id!r} cannot see through an env whose observation_space is "
                             f"{diff}")
        return BeliefEnv(env, self)

    @torch.no_grad()
    def open_loop(self, data, episode=0, context=5, horizon=50, seed=0):
        """What train_world_model.py draws: the posterior over the first `context` steps of a real episode (the
        `episode`-th of `data`), then the prior alone over the next `horizon` real actions. Returns a dict of
        numpy arrays: real_obs / imagined_obs (decoded; frames as uint8 for pixels) and real_reward /
        imagined_reward, over the imagined steps."""
        net = self.fitted_net()
        ids = np.unique(data.episode_ids)
        one = data.select_episodes(ids[episode % len(ids)])
        stream = episode_stream(one, net)
        T = min(len(stream["first"]), context + horizon)
        gen = torch.Generator(device=net.device).manual_seed(seed)
        h, z, a = net.initial(1)
        imagined_obs, imagined_reward = [], []
        for t in range(T):
            act = stream["prev_act"][t:t + 1] if t else a
            if t < context:
                h = net.img_step(h, z, net.img_a(act))
                probs = _unimix(net.posterior_logits(h, net.encode(stream["obs"][t:t + 1])))
                z = _sample_onehot(probs, torch.rand(1, net.groups, generator=gen, device=net.device)).flatten(1)
                continue
            h, z, r, _, _ = net.imagine_step(h, z, act, torch.rand(1, net.groups, generator=gen,
                                                                      device=net.device).clamp_min(1e-7))
            imagined_obs.append(self._decode(torch.cat([h, z], 1))[0])
            imagined_reward.append(float(r[0]))
        real = stream["obs"][context:T].cpu().numpy()
        return {"real_obs": real, "imagined_obs": np.stack(imagined_obs) if imagined_obs else real[:0],
                "real_reward": stream["reward"][context:T].cpu().numpy(),
                "imagined_reward": np.asarray(imagined_reward, dtype=np.float32)}

    @torch.no_grad()
    def evaluate(self, data, ks=(1, 10, 50), max_starts=2000, seed=0):
        """Accuracy on (held-out) real data, as imagination uses the model: from the posterior state at a real
        step (filtered from its episode's start), the prior alone over the next k real actions.
        k_step_error_{k}: the decoded observation's mean squared error after k steps, in units of the data's
        per-dimension std (pixels: per pixel, in [0, 1] units), over up to `max_starts` segments inside one
        episode (k_step_count_{k}: how many; None where there were none); reward_mae: the 1-step reward's mean
        absolute error; termination_precision / recall: of the 1-step termination (None where undefined)."""
        net = self.fitted_net()
        stream = episode_stream(data, net)
        gen = torch.Generator(device=net.device).manual_seed(seed)
        deter, logits = net.filter_episodes(stream, gen)
        episode = torch.cumsum(stream["first"].long(), 0)
        M, out = len(episode), {}
        for k in ks:
            ok = torch.nonzero(episode[:M - k] == episode[k:]).flatten() if M > k else torch.zeros(0, dtype=torch.long)
            ok = ok[torch.randperm(len(ok), generator=gen, device=net.device)[:max_starts]]
            out[f"k_step_count_{k}"] = int(len(ok))
            if len(ok) == 0:
                out[f"k_step_error_{k}"] = None
                continue
            h = deter[ok]
            z = _sample_onehot(_unimix(logits[ok]), torch.rand(len(ok), net.groups, generator=gen,
                                                                 device=net.device)).flatten(1)
            for j in range(1, k + 1):
                u = torch.rand(len(ok), net.groups, generator=gen, device=net.device).clamp_min(1e-7)
                h, z, reward, logit, _ = net.imagine_step(h, z, stream["prev_act"][ok + j], u)
                if j == 1 and k == min(ks):
                    out["reward_mae"] = float((reward - stream["reward"][ok + 1]).abs().mean())
                    pred, true = (logit > 0).cpu().numpy(), stream["term"][ok + 1].cpu().numpy()
                    tp = int((pred & true).sum())
                    out["termination_precision"] = tp / int(pred.sum()) if pred.sum() else None
                    out["termination_recall"] = tp / int(true.sum()) if true.sum() else None
            recon, target = net.decoder(torch.cat([h, z], -1)), net.normalise_obs(stream["obs"][ok + k])
            out[f"k_step_error_{k}"] = float(((recon - target) ** 2).mean())
        out["num_test_transitions"] = len(data)
        return out

    def _decode(self, feat):
        net = self.net
        out = net.decoder(feat)
        if net.pixels:
            return ((out.permute(0, 2, 3, 1) + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return (out * net.obs_std + net.obs_mean).cpu().numpy()

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save(self, path, extra=None):
        """Writes the checkpoint atomically: tensors and primitives only (torch.load(weights_only=True)), with the
        real data (a refit of the loaded model sees it all) and the imagination's start states."""
        net = self.fitted_net()
        payload = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "env_id": self.env_id,
            "observation_space": _space_to_dict(self.real_observation_space),
            "action_space": _space_to_dict(self.action_space), "config": json_safe(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "states": {name: getattr(net, name).detach().cpu()
                       for name in ("start_deter", "start_probs", "buffer_deter", "buffer_probs")},
            "extra": json_safe(extra or {}),
        }
        if self.data is not None:
            payload["buffer"] = {name: torch.from_numpy(np.ascontiguousarray(getattr(self.data, name)))
                                 for name in (*TransitionBuffer.FIELDS, "start_obs")}
        return save_torch_atomic(os.fspath(path), payload)

    def load(self, path):
        """Loads a checkpoint written by `save` into this model (its env's spaces must match); returns self.
        FileNotFoundError for a missing file, ValueError for a corrupt, foreign or mismatched one."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"RSSM checkpoint {path!r} does not exist (a run with --world-model rssm writes "
                                    "runs/<run>/world_model.pt)")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # zip/pickle errors differ between torch versions; all mean the same to the user
            raise ValueError(f"{path!r} is not a readable RSSM checkpoint (truncated or corrupt): "
                             f"{type(e).__name__}") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"{path!r} is not an RSSM checkpoint (format {found!r}, expected "
                             f"{CHECKPOINT_FORMAT!r}): load it with the world model that wrote it")
        if payload.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path!r} has RSSM checkpoint version {payload.get('version')!r}, this code reads "
                             f"version {CHECKPOINT_VERSION}")
        try:
            for name, mine in (("observation_space", self.real_observation_space),
                               ("action_space", self.action_space)):
                diff = _describe_space_difference(mine, _space_from_dict(payload[name]))
                if diff is not None:
                    raise ValueError(f"it was trained on {payload['env_id']!r}, whose {name} is {diff} of "
                                     f"{self.env_id!r}'s")
            self.config = dict(payload["config"])
            self.net = self._new_net(self.seed)
            self.net.load_state_dict(payload["state_dict"])
            for name, value in payload["states"].items():
                setattr(self.net, name, value.float().to(self.device))
            buffer = payload.get("buffer")
            self.data = None if buffer is None else TransitionBuffer(
                **{name: buffer[name].numpy() for name in (*TransitionBuffer.FIELDS, "start_obs")}, env_id=self.env_id)
        except (KeyError, AttributeError, RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r} does not fit --world-model rssm for {self.env_id!r}: {e}") from None
        self.net.eval()
        self.extra = payload.get("extra", {})
        c = self.config
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (c["deter"] + c["groups"] * c["classes"],),
                                                dtype=np.float32)
        return self
