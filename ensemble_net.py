"""The reference ensemble's network: `EnsembleWorldModel`, a probabilistic MLP ensemble (obs, action) -> Gaussian over
the normalised [obs delta, reward], with a termination classifier on (obs, action, next obs), and its one batched
step (`predict`). Fitting, checkpoints and the world-model interface are in `ensemble.py`.
"""
import math

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from real_env import TransitionBuffer, to_numpy


def check_spaces_supported(observation_space, action_space, where):
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1):
        raise ValueError(
            f"{where}: observation_space must be a 1-D gymnasium.spaces.Box, got {observation_space!r}. "
            "The ensemble world model only handles flat vector observations (e.g. CartPole-v1, Acrobot-v1, "
            "MountainCar-v0, Pendulum-v1); flatten other observations with gymnasium.wrappers.FlattenObservation."
        )
    if isinstance(action_space, gym.spaces.Discrete):
        return
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        return
    raise ValueError(
        f"{where}: action_space must be gymnasium.spaces.Discrete or a 1-D Box, got {action_space!r}."
    )


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def register_reward_and_action_buffers(module, action_space, discrete):
    """The buffers both reference models (this ensemble and rssm_net.RSSMNet) keep, set at each fit: the imagined
    reward's clip range, the lowest real rewards of non-terminal and of terminal steps (the halt rule's lower bound
    on a return), the 99th percentile of the disagreement on real data (the halt rule's unit), and the Box action
    bounds (empty for Discrete actions)."""
    module.register_buffer("reward_clip", torch.tensor([-1e6, 1e6]))
    module.register_buffer("reward_min", torch.zeros(()))
    module.register_buffer("terminal_reward_min", torch.zeros(()))
    module.register_buffer("disagreement_ref", torch.ones(()))
    if discrete:
        module.register_buffer("act_low", torch.zeros(0))
        module.register_buffer("act_high", torch.zeros(0))
    else:
        module.register_buffer("act_low", torch.as_tensor(np.nan_to_num(action_space.low, neginf=-1e6),
                                                          dtype=torch.float32))
        module.register_buffer("act_high", torch.as_tensor(np.nan_to_num(action_space.high, posinf=1e6),
                                                           dtype=torch.float32))


class EnsembleLinear(nn.Module):
    """E independent linear layers evaluated with one batched matmul: (E,B,in) or (B,in) -> (E,B,out)."""

    def __init__(self, ensemble_size, in_features, out_features):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, out_features))

    def forward(self, x):
        if x.dim() == 2:  # shared input for all members: broadcasting matmul, no copy
            return torch.matmul(x, self.weight) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleWorldModel(nn.Module):
    """Probabilistic MLP ensemble: (obs, action) -> Gaussian over normalised [obs delta, reward], plus a small
    termination classifier ensemble on (obs, action, next obs).

    Why a separate classifier on the next obs: termination is (for these control tasks) a threshold on the state
    the env lands in, e.g. |theta'| > 0.2095 for CartPole. From (obs, action) alone the net has to compose the
    dynamics with the threshold and the boundary comes out blurred (measured: precision ~0.5 or recall ~0.1
    depending on the class weight); given the next obs it is a sharp, axis-aligned cut. It is trained on real
    next observations and applied to the predicted one in imagination.

    Normalisation statistics and clip bounds are buffers (saved with the state_dict); the real start observations
    and a subsample of buffer states are kept as non-persistent buffers and stored separately in the checkpoint.
    """

    def __init__(self, observation_space, action_space, *, ensemble_size=5, hidden_size=128, num_layers=3,
                 num_elites=None, homoscedastic=False, layer_norm=False, dropout=0.0, env_id=None,
                 max_episode_steps=None):
        super().__init__()
        check_spaces_supported(observation_space, action_space, "EnsembleWorldModel")
        self.observation_space = observation_space
        self.action_space = action_space
        self.env_id = env_id
        self.max_episode_steps = max_episode_steps  # the real env's time limit: the default imagination horizon
        self.ensemble_size = ensemble_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        if not isinstance(homoscedastic, bool):
            raise ValueError(f"EnsembleWorldModel: homoscedastic must be True or False, got {homoscedastic!r}")
        self.homoscedastic = homoscedastic
        if not isinstance(layer_norm, bool):
            raise ValueError(f"EnsembleWorldModel: layer_norm must be True or False, got {layer_norm!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"EnsembleWorldModel: dropout must be a number in [0, 1), got {dropout!r}")
        self.layer_norm, self.dropout = layer_norm, float(dropout)
        # DHMBPO's regularisation (erl_lib's GaussianMLP), by the depth j of a linear layer among L = num_layers + 1:
        # layer j >= 1 normalises its input (no affine; eps 1, 0.1, 0.01, ...: the first ones only damp large
        # activations) and layer j drops (1 - (j+1)/L) * dropout of its outputs while fitting (none at the head)
        depth = num_layers + 1
        self._norm_eps = [max(10.0 ** -(j - 1), 1e-5) if layer_norm and j > 0 else None for j in range(depth)]
        self._drop_rates = [self.dropout * (1 - (j + 1) / depth) for j in range(depth)]
        self.num_elites = ensemble_size if num_elites is None else num_elites
        if not 1 <= self.num_elites <= ensemble_size:
            raise ValueError(f"EnsembleWorldModel: num_elites must be in [1, ensemble_size={ensemble_size}], "
                             f"got {num_elites!r}")
        self.obs_dim = int(observation_space.shape[0])
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.act_dim = int(action_space.n) if self.discrete else int(action_space.shape[0])
        self.in_dim = self.obs_dim + self.act_dim
        self.out_dim = self.obs_dim + 1  # delta, reward

        layers, d = [], self.in_dim
        for _ in range(num_layers):
            layers.append(EnsembleLinear(ensemble_size, d, hidden_size))
            d = hidden_size
        self.hidden = nn.ModuleList(layers)
        # homoscedastic (DHMBPO's network): the head gives means only and each member learns one noise level per
        # output, so a sample's noise does not depend on (obs, action) and a gradient through it has no variance
        # term to follow; heteroscedastic (MBPO's, the default): the head also gives a log-variance per input
        self.head = EnsembleLinear(ensemble_size, d, (1 if self.homoscedastic else 2) * self.out_dim)
        if self.homoscedastic:
            self.noise_log_std = nn.Parameter(torch.zeros(ensemble_size, 1, self.out_dim))
        term_hidden = max(32, hidden_size // 2)
        self.term_net = nn.ModuleList([
            EnsembleLinear(ensemble_size, self.in_dim + self.obs_dim, term_hidden),
            EnsembleLinear(ensemble_size, term_hidden, term_hidden),
            EnsembleLinear(ensemble_size, term_hidden, 1),
        ])
        # soft log-variance bounds (learned), keep the NLL from collapsing variance on easy dimensions
        self.max_logvar = nn.Parameter(torch.full((self.out_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((self.out_dim,), -10.0))

        self.register_buffer("in_mean", torch.zeros(self.in_dim))
        self.register_buffer("in_std", torch.ones(self.in_dim))
        self.register_buffer("out_mean", torch.zeros(self.out_dim))
        self.register_buffer("out_std", torch.ones(self.out_dim))
        # targets that were constant in the data (CartPole's reward of 1) are reproduced exactly, not approximately
        self.register_buffer("out_constant", torch.zeros(self.out_dim, dtype=torch.bool))
        self.register_buffer("obs_std", torch.ones(self.obs_dim))
        # imagination clip range: data range widened by its own width, intersected with the space bounds
        self.register_buffer("obs_clip_low", torch.full((self.obs_dim,), -1e6))
        self.register_buffer("obs_clip_high", torch.full((self.obs_dim,), 1e6))
        register_reward_and_action_buffers(self, action_space, self.discrete)
        # the members imagination draws from (MBPO's elites: the best on validation data after each fit); the
        # checkpoint stores them beside the state dict
        self.register_buffer("elites", torch.arange(self.num_elites), persistent=False)
        self.register_buffer("start_obs", torch.zeros(0, self.obs_dim), persistent=False)
        self.register_buffer("buffer_obs", torch.zeros(0, self.obs_dim), persistent=False)
        # the real transitions behind a loaded checkpoint (a TransitionBuffer), None when it carries none; Dyna
        # refits of a loaded model start from them so the refit sees all real data, not only the new data
        self.buffer = None

    @property
    def device(self):
        return self.in_mean.device

    def config(self):
        return {"ensemble_size": self.ensemble_size, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "num_elites": self.num_elites, "homoscedastic": self.homoscedastic, "layer_norm": self.layer_norm,
                "dropout": self.dropout}

    # ---- normalisation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_statistics(self, buffer: TransitionBuffer, num_buffer_states=10000, seed=0, normalisation=True):
        """Sets input/output normalisation (unless `normalisation=False`: a warm refit keeps it), the clip bounds,
        the lowest reward and the stored start/buffer states from real data."""
        dev = self.device
        obs = torch.as_tensor(buffer.obs, device=dev)
        next_obs = torch.as_tensor(buffer.next_obs, device=dev)
        x = self.model_input(obs, self.encode_action(buffer.actions), normalise=False)
        y = torch.cat([next_obs - obs, torch.as_tensor(buffer.rewards, device=dev)[:, None]], dim=1)

        def std_of(t):  # constant features (e.g. CartPole's reward) get std 1 so they are not blown up
            s = t.std(0)
            return torch.where(s < 1e-6, torch.ones_like(s), s)

        all_obs = torch.cat([obs, next_obs])
        if normalisation:
            self.in_mean.copy_(x.mean(0))
            self.in_std.copy_(std_of(x))
            self.out_mean.copy_(y.mean(0))
            self.out_std.copy_(std_of(y))
            self.out_constant.copy_(y.std(0) < 1e-6 if len(y) > 1 else torch.zeros_like(self.out_constant))
            self.obs_std.copy_(std_of(all_obs))
        lo, hi = all_obs.min(0).values, all_obs.max(0).values
        width = (hi - lo).clamp_min(1e-3)
        space_lo = torch.as_tensor(np.nan_to_num(self.observation_space.low, neginf=-1e6), dtype=torch.float32, device=dev)
        space_hi = torch.as_tensor(np.nan_to_num(self.observation_space.high, posinf=1e6), dtype=torch.float32, device=dev)
        self.obs_clip_low.copy_(torch.maximum(lo - width, space_lo))
        self.obs_clip_high.copy_(torch.minimum(hi + width, space_hi))
        r = y[:, -1]
        r_width = (r.max() - r.min()).clamp_min(1e-3)
        self.reward_clip.copy_(torch.stack([r.min() - r_width, r.max() + r_width]))
        # a large penalty that only ends episodes (LunarLander's crash, -100) is paid once, not forever
        terminal = torch.as_tensor(buffer.terminated, device=dev)
        self.reward_min.copy_(r[~terminal].min() if (~terminal).any() else torch.zeros(()))
        self.terminal_reward_min.copy_(r[terminal].min() if terminal.any() else torch.zeros(()))
        self.start_obs = torch.as_tensor(buffer.start_obs, device=dev).clone()
        rng = np.random.default_rng(seed)
        n = min(num_buffer_states, len(buffer))
        self.buffer_obs = obs[torch.as_tensor(rng.choice(len(buffer), size=n, replace=False), device=dev)].clone()

    # ---- encoding / forward ------------------------------------------------------------------------------------
    def encode_action(self, action, validate=True):
        """Actions (numpy/torch/list, batched) -> float features on model.device: one-hot or clipped Box.
        validate=False skips the Discrete range check, a host read (a sync on a GPU, and no CUDA graph can hold
        it): for callers that checked the actions already, as the imagined envs do."""
        a = torch.as_tensor(to_numpy(action) if not isinstance(action, torch.Tensor) else action, device=self.device)
        if self.discrete:
            idx = a.reshape(-1).long() - int(self.action_space.start)
            if validate and idx.numel() and (idx.min() < 0 or idx.max() >= self.act_dim):
                raise ValueError(
                    f"action out of range for {self.action_space}: got values in [{int(idx.min()) + self.action_space.start}, "
                    f"{int(idx.max()) + self.action_space.start}]"
                )
            return F.one_hot(idx, self.act_dim).float()
        a = a.float().reshape(-1, self.act_dim)
        return torch.maximum(torch.minimum(a, self.act_high), self.act_low)  # the real env clips too (e.g. Pendulum)

    def model_input(self, obs, act_features, normalise=True):
        x = torch.cat([obs.float(), act_features], dim=-1)
        return (x - self.in_mean) / self.in_std if normalise else x

    def forward(self, x_norm):
        """x_norm (B,in) or (E,B,in) -> mean (E,B,out), logvar (E,B,out) of the normalised [delta, reward]."""
        h = x_norm
        for j, layer in enumerate(self.hidden):
            h = F.silu(self._drop(j, layer(self._norm(j, h))))
        out = self.head(self._norm(self.num_layers, h))
        return self._mean_logvar(out, self.noise_log_std if self.homoscedastic else None)

    def _norm(self, j, h):
        """The input of linear layer j, normalised where the model has layer normalisation."""
        eps = self._norm_eps[j]
        return h if eps is None else F.layer_norm(h, h.shape[-1:], eps=eps)

    def _drop(self, j, h):
        """The output of linear layer j with its dropout, while fitting only."""
        p = self._drop_rates[j]
        return F.dropout(h, p) if self.training and p > 0 else h

    def _mean_logvar(self, out, noise_log_std):
        """The head's output -> mean, log-variance inside the soft bounds (noise_log_std: the members' fixed noise,
        broadcast over the rows, for a homoscedastic model; None: the head's second half)."""
        if noise_log_std is None:
            mean, logvar = out[..., : self.out_dim], out[..., self.out_dim:]
        else:  # bounded once per member, then broadcast: no per-row softplus
            mean, logvar = out, 2.0 * noise_log_std
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        return mean, (self.min_logvar + F.softplus(logvar - self.min_logvar)).expand_as(mean)

    def termination_logits(self, x_norm, next_obs):
        """x_norm (B,in) or (E,B,in), next_obs (B,obs_dim) or (E,B,obs_dim) raw -> termination logits (E,B)."""
        d = self.obs_dim
        nx = (next_obs.float() - self.in_mean[:d]) / self.in_std[:d]
        if nx.dim() == 3 and x_norm.dim() == 2:
            x_norm = x_norm.expand(nx.shape[0], -1, -1)
        h = torch.cat([x_norm, nx], dim=-1)
        for i, layer in enumerate(self.term_net):
            h = layer(h)
            if i < len(self.term_net) - 1:
                h = F.silu(h)
        return h[..., 0]

    @torch.no_grad()
    def predict(self, obs, action, members=None, noise=None, disagreement=True, validate=True):
        """One batched step. obs (B,obs_dim) tensor, action batch. members (B,) long chooses one member per row
        (None: ensemble mean). noise (B,out_dim) standard normals or None. Returns next_obs (B,obs_dim),
        reward (B,), termination logit (B,), disagreement (B,): std across members of the normalised prediction
        (None when members are given with `disagreement=False`: then no other member needs to run). validate: see
        `encode_action`.

        All members run in one batched matmul and each row's member is gathered (no per-row loop, no host sync).
        On the CPU, where the FLOPs are the cost: without disagreement rows are grouped by member, so each row runs
        its own member only (one matmul per member and layer); with it, rows go through in blocks of _CPU_BLOCK
        (the members' activations of a block stay in cache). The figures are those of the full ensemble up to fp32
        rounding."""
        obs = obs.to(self.device, torch.float32)
        on_cpu = obs.device.type == "cpu"
        grouped = members is not None and not disagreement and _runs_by_member(obs)
        if on_cpu and not grouped and len(obs) > _CPU_BLOCK:
            action = action if isinstance(action, torch.Tensor) else torch.as_tensor(to_numpy(action))
            parts = [self.predict(obs[i:i + _CPU_BLOCK], action[i:i + _CPU_BLOCK],
                                  None if members is None else members[i:i + _CPU_BLOCK],
                                  None if noise is None else noise[i:i + _CPU_BLOCK], disagreement, validate)
                     for i in range(0, len(obs), _CPU_BLOCK)]
            return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))
        x = self.model_input(obs, self.encode_action(action, validate))
        rows = None if members is None else torch.arange(len(obs), device=self.device)
        spread = None
        if grouped:
            m, logvar = _by_member(members, self._member_dynamics, x)
        else:
            mean, logvar = self(x)
            if members is None or disagreement:
                spread = (mean[..., : self.obs_dim].std(0).mean(-1) if self.ensemble_size > 1
                          else torch.zeros(len(obs), device=self.device))
            m = mean.mean(0) if members is None else mean[members, rows]
            logvar = None if members is None or noise is None else logvar[members, rows]
        if members is not None and noise is not None:
            m = m + noise * torch.exp(0.5 * logvar)
        next_obs, reward = self._decode(obs, m)
        if members is None:  # ensemble mean probability, back to a logit
            logit = torch.logit(torch.sigmoid(self.termination_logits(x, next_obs)).mean(0).clamp(1e-6, 1 - 1e-6))
        elif grouped:
            logit = _by_member(members, self._member_termination, x, next_obs)[0]
        else:
            logit = self.termination_logits(x, next_obs)[members, rows]
        return next_obs, reward, logit, spread

    def predict_with_grad(self, obs, action, members, termination=True, sample=False):
        """`predict` with `members`, keeping the autograd graph from obs and action to next_obs and reward: for
        learners that differentiate through imagined steps (svg_imagined.py). obs (B,obs_dim) and action (B,act_dim)
        float tensors (Box actions), members (B,) long. On the CPU from _GROUP_MIN_ROWS rows on, each row runs only
        its own member (the FLOPs of one member: the backward pass costs as much again); elsewhere (a GPU, where a
        step's cost is its kernel launches, not its FLOPs) all members run in one batched matmul per layer and each
        row's member is gathered, as in `predict`: the same figures up to fp32 rounding. sample=False: the member's
        mean; True: a reparameterised sample, mean + std * noise (torch's global generator), its gradient through
        mean and std. Returns next_obs (B,obs_dim), reward (B,) and the termination logit (B,), the logit without a
        graph: where an imagined episode ends is not differentiated (termination=False: None, for a caller with its
        own termination rule)."""
        if self.discrete:
            raise ValueError("EnsembleWorldModel.predict_with_grad: a Discrete action has no gradient; it takes "
                             f"Box actions, this model was fitted for {self.action_space}")
        a = torch.maximum(torch.minimum(action.float(), self.act_high), self.act_low)  # the clip the real env does
        x = self.model_input(obs.float(), a)
        grouped = _runs_by_member(x)
        if grouped:
            m, logvar = _by_member(members, self._member_dynamics, x)
        else:  # 8 members looped in Python made an update on an H200 launch-bound: 72 ms (README)
            rows = torch.arange(len(x), device=x.device)
            mean, logvar = self(x)
            m, logvar = mean[members, rows], logvar[members, rows]
        if sample:
            m = m + torch.exp(0.5 * logvar) * torch.randn_like(m)
        next_obs, reward = self._decode(obs.float(), m)
        if not termination:
            return next_obs, reward, None
        with torch.no_grad():
            logit = (_by_member(members, self._member_termination, x.detach(), next_obs.detach())[0] if grouped
                     else self.termination_logits(x.detach(), next_obs.detach())[members, rows])
        return next_obs, reward, logit

    def _decode(self, obs, m):
        """A member's normalised mean (or sample) m (B,out) -> next_obs (B,obs_dim), reward (B,), each clipped to
        the range seen in the data (a clip passes gradients inside it)."""
        y = torch.where(self.out_constant, self.out_mean, m * self.out_std + self.out_mean)
        next_obs = torch.minimum(torch.maximum(obs + y[:, : self.obs_dim], self.obs_clip_low), self.obs_clip_high)
        return next_obs, y[:, -1].clamp(self.reward_clip[0], self.reward_clip[1])

    def _member_dynamics(self, e, x):
        """Member e's forward on its rows (see `forward`): mean, logvar (n,out)."""
        h = x
        for j, layer in enumerate(self.hidden):
            h = F.silu(self._drop(j, torch.addmm(layer.bias[e], self._norm(j, h), layer.weight[e])))
        out = torch.addmm(self.head.bias[e], self._norm(self.num_layers, h), self.head.weight[e])
        return self._mean_logvar(out, self.noise_log_std[e] if self.homoscedastic else None)

    def _member_termination(self, e, x, next_obs):
        """Member e's termination logit on its rows (see `termination_logits`): (n,)."""
        d = self.obs_dim
        h = torch.cat([x, (next_obs - self.in_mean[:d]) / self.in_std[:d]], dim=-1)
        for i, layer in enumerate(self.term_net):
            h = torch.addmm(layer.bias[e], h, layer.weight[e])
            if i < len(self.term_net) - 1:
                h = F.silu(h)
        return (h[:, 0],)


_CPU_BLOCK = 1024  # rows per block of a CPU predict
_GROUP_MIN_ROWS = 128  # below this, grouping rows by member costs more than the members it skips (measured)


def _runs_by_member(rows):
    """Whether a step on these rows runs each row's member on its own rows (`_by_member`) rather than all members
    and a gather: only on the CPU, where the FLOPs are the cost, and from _GROUP_MIN_ROWS rows on."""
    return rows.device.type == "cpu" and len(rows) >= _GROUP_MIN_ROWS


def _by_member(members, fn, *inputs):
    """fn(e, *rows_of_member_e) for every member, on its rows only; the outputs back in row order."""
    order = torch.argsort(members, stable=True)
    counts = torch.bincount(members, minlength=1).tolist()  # the host read that grouping needs
    chunks = [torch.split(t[order], counts) for t in inputs]
    outs = [fn(e, *(c[e] for c in chunks)) for e in range(len(counts)) if counts[e]]
    result = []
    for parts in zip(*outs):
        sorted_out = torch.cat(parts)
        unsorted = torch.empty_like(sorted_out)
        unsorted[order] = sorted_out
        result.append(unsorted)
    return result
