"""The recurrent latent reference model's network (`RSSMNet`, see rssm.py's docstring for the design): a GRU
deterministic state, categorical stochastic latents, an ensemble of prior heads, encoder/decoder (MLP or CNN),
reward and continue heads, and its DreamerV3 losses. The world-model interface around it is in rssm.py.
"""

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ensemble import EnsembleLinear
from ensemble_net import register_reward_and_action_buffers
from ensemble_imagination import _draw_bits32
from real_env import to_numpy


UNIMIX = 0.01  # DreamerV3: 1% uniform mixed into every categorical (finite KLs, no dead classes)
FREE_NATS = 1.0
KL_DYN, KL_REP = 0.5, 0.1


def _is_pixels(space):
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.dtype == np.uint8


def check_spaces_supported(observation_space, action_space, where):
    ok_obs = isinstance(observation_space, gym.spaces.Box) and (
        len(observation_space.shape) == 1 or (_is_pixels(observation_space) and observation_space.shape[2] in (1, 3)
                                              and observation_space.shape[0] == observation_space.shape[1]
                                              and observation_space.shape[0] % 16 == 0))
    if not ok_obs:
        raise ValueError(f"{where}: the RSSM takes a 1-D Box observation or square uint8 frames (H, H, 1 or 3) with H "
                         f"a multiple of 16 (e.g. PendulumPixels-v1), got {observation_space!r}")
    if not (isinstance(action_space, gym.spaces.Discrete)
            or (isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1)):
        raise ValueError(f"{where}: action_space must be Discrete or a 1-D Box, got {action_space!r}")


def _sample_onehot(probs, u):
    """One class per group by inverse CDF: probs (..., G, C), u (..., G) uniforms in (0, 1] -> one-hot (..., G, C)."""
    idx = torch.searchsorted(probs.cumsum(-1), u.unsqueeze(-1).contiguous()).clamp_(max=probs.shape[-1] - 1)
    return torch.zeros_like(probs).scatter_(-1, idx, 1.0)


def _unimix(logits):
    probs = logits.softmax(-1)
    return (1.0 - UNIMIX) * probs + UNIMIX / probs.shape[-1]


def _kl(p, q):
    """KL(p || q) of categoricals (..., G, C), summed over the groups."""
    return (p * (p.log() - q.log())).sum((-1, -2))


def _entropy(p):
    return -(p * p.log()).sum((-1, -2))


def _rng_uniforms(s):
    """One uniform in (0, 1] per entry of the LCG states s (any shape); returns (new_s, u) (float32)."""
    s, bits = _draw_bits32(s)
    return s, ((bits.float() + 1.0) / float(2**32)).clamp(max=1.0)


class Dense(nn.Linear):
    """nn.Linear whose weight is kept as (in, out): on the CPU a small matmul with a contiguous right operand is
    2-4x faster than F.linear's transposed one (measured at 16 x 130 x 128), and the RSSM's loop is made of them."""

    def __init__(self, inp, out):
        super().__init__(inp, out)
        self.weight = nn.Parameter(self.weight.detach().t().contiguous())

    def forward(self, x):
        if x.dim() == 2:
            return torch.addmm(self.bias, x, self.weight)
        return torch.addmm(self.bias, x.flatten(0, -2), self.weight).view(*x.shape[:-1], -1)


class GRU(nn.Module):
    """DreamerV3's GRU cell: one matmul on [x, h] for the reset, candidate and update parts, the update gate biased
    towards keeping h (sigmoid(u - 1)). One matmul instead of nn.GRUCell's two: ~25% faster at batch 16 on the
    CPU. The state stays in (-1, 1) (a convex combination of tanh values)."""

    def __init__(self, inp, size):
        super().__init__()
        self.linear = Dense(inp + size, 3 * size)

    def forward(self, x, h):
        reset, cand, update = self.linear(torch.cat([x, h], -1)).chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        return torch.lerp(h, cand, torch.sigmoid(update - 1.0))


def _mlp(inp, hidden, out, layers=2):
    mods, d = [], inp
    for _ in range(layers):
        mods += [Dense(d, hidden), nn.LayerNorm(hidden), nn.SiLU()]
        d = hidden
    mods.append(Dense(d, out))
    return nn.Sequential(*mods)


class RSSMNet(nn.Module):
    """The RSSM's networks and its normalisation buffers; `RSSMModel` holds one. See the module docstring."""

    def __init__(self, obs_shape, action_space, *, deter=128, groups=16, classes=16, hidden=128, members=5,
                 prior_hidden=64, cnn_depth=16, **_training):
        super().__init__()
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.pixels = len(self.obs_shape) == 3
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.act_dim = int(action_space.n) if self.discrete else int(action_space.shape[0])
        self.act_start = int(action_space.start) if self.discrete else 0
        self.deter, self.groups, self.classes, self.members = deter, groups, classes, members
        self.stoch = groups * classes
        self.feat_dim = deter + self.stoch
        if self.pixels:
            size, channels = self.obs_shape[0], self.obs_shape[2]
            convs, c, d = [], channels, cnn_depth
            while size > 4:  # stride-2 convolutions down to 4 x 4 (64 -> 32 -> 16 -> 8 -> 4)
                convs += [nn.Conv2d(c, d, 4, 2, 1), nn.SiLU()]
                c, d, size = d, 2 * d, size // 2
            self.encoder = nn.Sequential(*convs, nn.Flatten())
            embed = c * 16
            deconvs = []
            while c > cnn_depth:
                deconvs += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1), nn.SiLU()]
                c //= 2
            deconvs.append(nn.ConvTranspose2d(c, channels, 4, 2, 1))
            self.decoder = nn.Sequential(Dense(self.feat_dim, embed), nn.Unflatten(1, (embed // 16, 4, 4)),
                                         *deconvs)
        else:
            embed = hidden
            self.encoder = _mlp(self.obs_shape[0], hidden, hidden, layers=1)
            self.decoder = _mlp(self.feat_dim, hidden, self.obs_shape[0])
        # the GRU's input layer on [z, a] and the posterior's first layer on [h, embed] are split in two sums, so
        # that the action's and the observation's parts are computed for a whole sequence at once outside the loop
        self.img_z, self.img_a = Dense(self.stoch, hidden), Dense(self.act_dim, hidden)
        self.img_norm = nn.LayerNorm(hidden)
        self.gru = GRU(hidden, deter)
        self.post_h, self.post_e = Dense(deter, hidden), Dense(embed, hidden)
        self.post_norm = nn.LayerNorm(hidden)
        self.post_out = Dense(hidden, self.stoch)
        self.prior_hidden = EnsembleLinear(members, deter, prior_hidden)
        self.prior_out = EnsembleLinear(members, prior_hidden, self.stoch)
        self.reward_head = _mlp(self.feat_dim, hidden, 1, layers=1)
        self.term_head = _mlp(self.feat_dim, hidden, 1, layers=1)
        for head in (self.reward_head, self.term_head):  # DreamerV3: heads start from 0 (no early huge errors)
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

        obs_dim = 1 if self.pixels else self.obs_shape[0]
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))
        self.register_buffer("reward_constant", torch.zeros((), dtype=torch.bool))  # CartPole's 1: reproduced exactly
        register_reward_and_action_buffers(self, action_space, self.discrete)  # the halt rule's, as the ensemble's
        # posterior states of the real data (recomputed after each fit): where imagined episodes start
        # (the posterior's distributions are kept with the uniform mix applied: a reset only gathers and samples)
        for name, shape in (("start_deter", (0, deter)), ("start_probs", (0, groups, classes)),
                            ("buffer_deter", (0, deter)), ("buffer_probs", (0, groups, classes))):
            self.register_buffer(name, torch.zeros(shape), persistent=False)

    @property
    def device(self):
        return self.obs_mean.device

    # ---- pieces ---------------------------------------------------------------------------------------------
    def encode_action(self, action):
        a = action if isinstance(action, torch.Tensor) else torch.as_tensor(to_numpy(action))
        a = a.to(self.device)
        if self.discrete:
            return F.one_hot(a.reshape(-1).long() - self.act_start, self.act_dim).float()
        a = a.float().reshape(-1, self.act_dim)
        return torch.maximum(torch.minimum(a, self.act_high), self.act_low)  # the real env clips too

    def normalise_obs(self, obs):
        if self.pixels:  # (B, H, W, C) uint8 -> (B, C, H, W) in [-0.5, 0.5]
            return obs.permute(0, 3, 1, 2).float() / 255.0 - 0.5
        return (obs.float() - self.obs_mean) / self.obs_std

    def encode(self, obs):
        """Observations -> the observation's part of the posterior's first layer (what the loop adds to h's)."""
        return self.post_e(self.encoder(self.normalise_obs(obs)))

    def img_step(self, deter, stoch, act_h):
        """h' = GRU(h, [z, a]); act_h = img_a(action features)."""
        return self.gru(F.silu(self.img_norm(self.img_z(stoch) + act_h)), deter)

    def posterior_logits(self, deter, embed):
        return self.post_out(F.silu(self.post_norm(self.post_h(deter) + embed))).view(-1, self.groups, self.classes)

    def prior_probs(self, deter):
        """(B, D) -> the members' distributions (K, B, G, C) (with the uniform mix)."""
        logits = self.prior_out(F.silu(self.prior_hidden(deter)))
        return _unimix(logits.view(self.members, -1, self.groups, self.classes))

    def reward(self, feat):
        out = self.reward_head(feat).squeeze(-1)
        r = torch.where(self.reward_constant, self.reward_mean.expand_as(out), self.reward_mean + self.reward_std * out)
        return r.clamp(self.reward_clip[0], self.reward_clip[1])

    def term_logit(self, feat):
        return self.term_head(feat).squeeze(-1)

    def initial(self, n):
        z = torch.zeros(n, self.deter, device=self.device)
        return z, torch.zeros(n, self.stoch, device=self.device), torch.zeros(n, self.act_dim, device=self.device)

    # ---- one imagined step for a batch ----------------------------------------------------------------------
    def imagine_step(self, deter, stoch, act, u):
        """(B, D), (B, S), action features (B, A), uniforms (B, G) -> deter', stoch', reward, term logit,
        disagreement: the prior members' mean distribution is sampled; their Jensen-Shannon divergence is the
        disagreement."""
        h = self.img_step(deter, stoch, self.img_a(act))
        probs = self.prior_probs(h)
        mean = probs.mean(0)
        z = _sample_onehot(mean, u).flatten(1)
        feat = torch.cat([h, z], -1)
        disagreement = _entropy(mean) - _entropy(probs).mean(0)
        return h, z, self.reward(feat), self.term_logit(feat), disagreement

    # ---- training ---------------------------------------------------------------------------------------------
    def loss(self, batch, u, pos_weight, obs_loss_scale=1.0):
        """DreamerV3's world-model loss on a batch of sequences (B, L): reconstruction, reward, termination,
        KL balancing with free bits. `u` (L, B, G): the uniforms of the straight-through posterior samples."""
        first, obs, act = batch["first"], batch["obs"], batch["prev_act"]
        B, L = first.shape
        embed = self.encode(obs.flatten(0, 1)).view(B, L, -1)
        keep = (~first).float()
        act_h = self.img_a(act * keep[..., None])  # a first step has no previous action
        h, z = torch.zeros(B, self.deter, device=self.device), torch.zeros(B, self.stoch, device=self.device)
        hs, zs, posts = [], [], []
        for t in range(L):  # a first step starts from the zero state
            k = keep[:, t, None]
            h = self.img_step(h * k, z * k, act_h[:, t])
            post = _unimix(self.posterior_logits(h, embed[:, t]))
            sample = _sample_onehot(post.detach(), u[t])
            z = (sample + post - post.detach()).flatten(1)  # straight-through gradients
            hs.append(h)
            zs.append(z)
            posts.append(post)
        H, Z, post = torch.stack(hs, 1), torch.stack(zs, 1), torch.stack(posts, 1)  # (B, L, ...)
        feat = torch.cat([H, Z], -1).flatten(0, 1)
        recon = self.decoder(feat)
        target = self.normalise_obs(obs.flatten(0, 1))
        obs_loss = ((recon - target) ** 2).flatten(1).sum(1).mean() * obs_loss_scale
        mask = keep.flatten()  # reward and termination belong to the transition INTO a step: none at a first step
        n = mask.sum().clamp_min(1.0)
        if bool(self.reward_constant):
            reward_loss = torch.zeros((), device=self.device)
        else:
            r_target = (batch["reward"].flatten() - self.reward_mean) / self.reward_std
            reward_loss = (((self.reward_head(feat).squeeze(-1) - r_target) ** 2) * mask).sum() / n
        term_loss = (F.binary_cross_entropy_with_logits(self.term_logit(feat), batch["term"].flatten().float(),
                                                        pos_weight=pos_weight, reduction="none") * mask).sum() / n
        prior = self.prior_probs(H.flatten(0, 1))  # (K, B*L, G, C)
        post = post.flatten(0, 1)
        dyn = _kl(post.detach().unsqueeze(0), prior).clamp_min(FREE_NATS).mean()
        rep = _kl(post, prior.mean(0).detach()).clamp_min(FREE_NATS).mean()
        loss = obs_loss + reward_loss + term_loss + KL_DYN * dyn + KL_REP * rep
        return loss, {"obs_loss": obs_loss.detach(), "reward_loss": reward_loss.detach(),
                      "term_loss": term_loss.detach(), "kl_dyn": dyn.detach(), "kl_rep": rep.detach()}

    @torch.no_grad()
    def filter_episodes(self, stream, generator, chunk=4096):
        """The posterior states along every real episode, from its start: (deter (M, D), post logits (M, G, C))
        for the M steps of the stream, processed all episodes at once (padded to the longest)."""
        M = len(stream["first"])
        embed = torch.cat([self.encode(stream["obs"][i:i + chunk]) for i in range(0, M, chunk)])
        starts = torch.nonzero(stream["first"]).flatten()
        lengths = torch.diff(torch.cat([starts, torch.tensor([M], device=starts.device)]))
        E, T = len(starts), int(lengths.max())
        t = torch.arange(T, device=starts.device)
        valid = t[None, :] < lengths[:, None]  # (E, T)
        index = (starts[:, None] + t[None, :]).clamp(max=M - 1)  # padded steps repeat the last step (masked)
        deter_out = torch.zeros(M, self.deter, device=self.device)
        logits_out = torch.zeros(M, self.groups, self.classes, device=self.device)
        h, z, a0 = self.initial(E)
        for step in range(T):
            rows = index[:, step]
            h = self.img_step(h, z, self.img_a(stream["prev_act"][rows] if step else a0))
            logits = self.posterior_logits(h, embed[rows])
            u = torch.rand(E, self.groups, generator=generator, device=self.device).clamp_min(1e-7)
            z = _sample_onehot(_unimix(logits), u).flatten(1)
            ok = valid[:, step]
            deter_out[rows[ok]] = h[ok]
            logits_out[rows[ok]] = logits[ok]
        return deter_out, logits_out
