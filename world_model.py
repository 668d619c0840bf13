"""The reference world model: a probabilistic MLP ensemble learned from real transitions (no CLI).

Everything the training scripts share about the world model lives here, so that each script stays one screen of
algorithm: real data (`TransitionBuffer`, `collect_transitions`), the model (`EnsembleWorldModel`), fitting
(`fit_world_model`, warm-started and budgeted for Dyna refits), its adapters for `world_model_env.py`
(`make_imagined_env`, `make_imagined_vector_env`: start states, horizon and the halt rule are their arguments),
atomic checkpoints (`save_world_model`, `load_world_model`), the one entry every script uses to get a model
(`load_or_fit_world_model`) and to refit it (`dyna_round`), and evaluation in the real env and in imagination.
"""
import contextlib
import math
import os
import tempfile
import time
import json

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from world_model_env import WorldModelEnv, WorldModelVectorEnv

CHECKPOINT_FORMAT = "world-model-env/ensemble"
CHECKPOINT_VERSION = 2
K_STEPS = (1, 10, 50)


# ----------------------------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------------------------
def json_safe(obj):
    """Converts numpy/torch scalars and non-finite floats (-> None) so json stays standard."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


@contextlib.contextmanager
def atomic_path(path, suffix):
    """Yields a temporary file name in `path`'s directory; when the block ends without an error the file replaces
    `path` (os.replace: readers never see half a file) with the permissions a plain open() would give (mkstemp
    makes files 0600); on an error it is removed. Every file the collection writes goes through here."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    """Writes `obj` as JSON to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, ".json") as tmp, open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


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


def _space_to_dict(space):
    """Serialises a supported space to tensors/primitives (safe for torch.load(weights_only=True))."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "low": torch.from_numpy(np.array(space.low, copy=True)),
            "high": torch.from_numpy(np.array(space.high, copy=True)),
            "shape": [int(s) for s in space.shape],
            "dtype": str(np.dtype(space.dtype)),
        }
    raise ValueError(f"cannot serialise space {space!r}")


def _space_from_dict(d):
    if d["type"] == "Discrete":
        return gym.spaces.Discrete(int(d["n"]), start=int(d.get("start", 0)))
    if d["type"] == "Box":
        return gym.spaces.Box(
            low=d["low"].numpy(), high=d["high"].numpy(), shape=tuple(d["shape"]), dtype=np.dtype(d["dtype"])
        )
    raise ValueError(f"unknown space type {d['type']!r}")


def _describe_space_difference(expected, got):
    """Returns None when the spaces match (type, shape, dtype, bounds/n), else a short description."""
    if type(expected) is not type(got):
        return f"{type(got).__name__} instead of {type(expected).__name__}"
    if isinstance(expected, gym.spaces.Discrete):
        if expected.n != got.n or expected.start != got.start:
            return f"Discrete(n={got.n}, start={got.start}) instead of Discrete(n={expected.n}, start={expected.start})"
        return None
    if expected.shape != got.shape:
        return f"shape {got.shape} instead of {expected.shape}"
    if expected.dtype != got.dtype:
        return f"dtype {got.dtype} instead of {expected.dtype}"
    if not (np.array_equal(expected.low, got.low) and np.array_equal(expected.high, got.high)):
        return f"bounds [{got.low}, {got.high}] instead of [{expected.low}, {expected.high}]"
    return None


def check_env_matches(model, observation_space, action_space, env_id="the given env"):
    """Raises a clear ValueError if the spaces differ from the ones the model was trained on."""
    for name, expected, got in (
        ("observation_space", model.observation_space, observation_space),
        ("action_space", model.action_space, action_space),
    ):
        diff = _describe_space_difference(expected, got)
        if diff is not None:
            raise ValueError(
                f"world model trained on {model.env_id!r} does not fit {env_id}: {name} is {diff}. "
                f"Train a model for this env with `python train_world_model.py --env-id {env_id}` "
                "or load the checkpoint that belongs to it."
            )


# ----------------------------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------------------------
class TransitionBuffer:
    """Real transitions, stored episode-contiguously (sorted by episode id, time order inside an episode).

    Fields (numpy): obs (N, obs_dim) float32, actions (N,) int64 for Discrete / (N, act_dim) float32 for Box,
    rewards (N,) float32, next_obs (N, obs_dim) float32 -- the TRUE next observation, also on termination and
    truncation (never a reset observation) --, terminated (N,) bool, truncated (N,) bool (time limit only),
    episode_ids (N,) int64, and start_obs (M, obs_dim) float32: the reset observations of the episodes.
    """

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated", "truncated", "episode_ids")

    def __init__(self, obs, actions, rewards, next_obs, terminated, truncated, episode_ids, start_obs, env_id=None):
        self.obs = np.asarray(obs, dtype=np.float32)
        actions = np.asarray(actions)
        self.actions = actions.astype(np.int64) if actions.dtype.kind in "iub" else actions.astype(np.float32)
        self.rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
        self.next_obs = np.asarray(next_obs, dtype=np.float32)
        self.terminated = np.asarray(terminated, dtype=bool).reshape(-1)
        self.truncated = np.asarray(truncated, dtype=bool).reshape(-1)
        self.episode_ids = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
        self.start_obs = np.asarray(start_obs, dtype=np.float32).reshape(-1, self.obs.shape[-1] if self.obs.ndim == 2 else 0)
        self.env_id = env_id
        n = len(self.obs)
        for name in self.FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"TransitionBuffer: field {name!r} has {len(getattr(self, name))} rows, expected {n}")
        if n and self.obs.ndim != 2:
            raise ValueError(f"TransitionBuffer: obs must have shape (N, obs_dim), got {self.obs.shape}")
        # keep the episode-contiguous invariant that the k-step evaluation and the episode split rely on
        if n and np.any(np.diff(self.episode_ids) < 0):
            order = np.argsort(self.episode_ids, kind="stable")
            for name in self.FIELDS:
                setattr(self, name, getattr(self, name)[order])

    @classmethod
    def from_arrays(cls, obs, actions, rewards, next_obs, terminated, truncated, episode_ids=None, start_obs=None, env_id=None):
        """Builds a buffer from flat arrays. Without `episode_ids` episodes are cut at terminated|truncated;
        without `start_obs` the first observation of each episode is used."""
        terminated = np.asarray(terminated, dtype=bool).reshape(-1)
        truncated = np.asarray(truncated, dtype=bool).reshape(-1)
        if episode_ids is None:
            done = terminated | truncated
            episode_ids = np.concatenate([[0], np.cumsum(done[:-1])]).astype(np.int64) if len(done) else np.zeros(0, np.int64)
        episode_ids = np.asarray(episode_ids, dtype=np.int64)
        obs = np.asarray(obs, dtype=np.float32)
        if start_obs is None:
            _, first = np.unique(episode_ids, return_index=True)
            start_obs = obs[first]
        return cls(obs, actions, rewards, next_obs, terminated, truncated, episode_ids, start_obs, env_id)

    def __len__(self):
        return len(self.obs)

    @property
    def num_episodes(self):
        return int(len(np.unique(self.episode_ids)))

    def extend(self, other: "TransitionBuffer") -> "TransitionBuffer":
        """Appends `other` in place (its episode ids are shifted to stay unique); returns self."""
        if len(self) and len(other) and self.obs.shape[1:] != other.obs.shape[1:]:
            raise ValueError(f"TransitionBuffer.extend: obs shape {other.obs.shape[1:]} != {self.obs.shape[1:]}")
        offset = int(self.episode_ids.max()) + 1 if len(self) else 0
        for name in self.FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "episode_ids":
                theirs = theirs + offset
            setattr(self, name, np.concatenate([mine, theirs]) if len(mine) else theirs.copy())
        self.start_obs = np.concatenate([self.start_obs, other.start_obs]) if len(self.start_obs) else other.start_obs.copy()
        return self

    def select_episodes(self, episode_ids) -> "TransitionBuffer":
        mask = np.isin(self.episode_ids, np.asarray(episode_ids))
        # start observations of the selected episodes (a reset obs is the obs of the episode's first transition)
        _, first = np.unique(self.episode_ids[mask], return_index=True)
        return TransitionBuffer(
            *(getattr(self, name)[mask] for name in self.FIELDS), start_obs=self.obs[mask][first], env_id=self.env_id
        )

    def split_episodes(self, fraction, seed=0):
        """Splits by whole episodes (so k-step segments of the held-out part are truly unseen).
        Returns (rest, held_out). With fewer than 2 episodes the data is cut into 100-step pseudo-episodes first."""
        ids = np.unique(self.episode_ids)
        buf = self
        if len(ids) < 2 and len(self) >= 2:
            chunk = max(1, min(100, len(self) // 4))
            pseudo = np.arange(len(self)) // chunk
            buf = TransitionBuffer(*(getattr(self, n) for n in self.FIELDS[:-1]), pseudo, self.start_obs, self.env_id)
            ids = np.unique(pseudo)
        rng = np.random.default_rng(seed)
        ids = rng.permutation(ids)
        n_held = int(round(fraction * len(ids)))
        if fraction > 0:
            n_held = min(max(n_held, 1), len(ids) - 1)
        return buf.select_episodes(ids[n_held:]), buf.select_episodes(ids[:n_held])


def make_real_env(env_id, where):
    """gym.make with an error that names the bad field instead of a registry traceback."""
    try:
        return gym.make(env_id)
    except gym.error.Error as e:
        raise ValueError(
            f"{where}: env_id {env_id!r} cannot be created ({type(e).__name__}: {e}). Pass a registered Gymnasium "
            "id with a 1-D Box observation space, e.g. CartPole-v1, Acrobot-v1, MountainCar-v0 or Pendulum-v1."
        ) from None


def _policy_actions(policy, obs_batch, action_space, rng_spaces):
    if policy is None:
        return [space.sample() for space in rng_spaces]
    acts = clip_action(policy(obs_batch), action_space)
    if isinstance(action_space, gym.spaces.Discrete):
        return [int(a) for a in acts.reshape(len(obs_batch))]
    return list(acts.reshape(len(obs_batch), *action_space.shape).astype(action_space.dtype))


def collect_transitions(env_id, num_steps, seed, policy=None, num_envs=1, writer=None, global_step_offset=0):
    """Collects `num_steps` real transitions from `gym.make(env_id)` envs.

    policy(obs_batch: np.ndarray (n, obs_dim)) -> actions (n,) or (n, act_dim); None means uniform random.
    Termination and time-limit truncation are recorded separately; next_obs is always the true final obs.
    Episodes cut off by the step budget are kept (neither terminated nor truncated).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps <= 0:
        raise ValueError(f"collect_transitions: num_steps must be a positive int, got {num_steps!r}")
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"collect_transitions: num_envs must be an int >= 1, got {num_envs!r}")
    envs = [make_real_env(env_id, "collect_transitions") for _ in range(num_envs)]
    check_spaces_supported(envs[0].observation_space, envs[0].action_space, f"collect_transitions(env_id={env_id!r})")
    action_space = envs[0].action_space
    for i, env in enumerate(envs):
        env.action_space.seed(seed + i)
    # one list of transitions per (running) episode; concatenated at the end so episodes are contiguous
    episodes, current, obs = [], [], []
    ep_returns = np.zeros(num_envs)
    ep_lengths = np.zeros(num_envs, dtype=np.int64)
    for i, env in enumerate(envs):
        o, _ = env.reset(seed=seed + i)
        obs.append(o)
        current.append({"start": o, "steps": []})
    steps = 0
    while steps < num_steps:
        obs_batch = np.stack(obs).astype(np.float32)
        actions = _policy_actions(policy, obs_batch, action_space, [env.action_space for env in envs])
        for i, env in enumerate(envs):
            if steps >= num_steps:
                break
            next_o, r, term, trunc, _ = env.step(actions[i])
            current[i]["steps"].append((obs[i], actions[i], r, next_o, term, trunc))
            steps += 1
            ep_returns[i] += r
            ep_lengths[i] += 1
            if term or trunc:
                if writer is not None:
                    writer.add_scalar("charts/episodic_return", ep_returns[i], global_step_offset + steps)
                    writer.add_scalar("charts/episodic_length", ep_lengths[i], global_step_offset + steps)
                ep_returns[i], ep_lengths[i] = 0.0, 0
                episodes.append(current[i])
                o, _ = env.reset()  # continues the env's own seeded RNG
                current[i] = {"start": o, "steps": []}
                obs[i] = o
            else:
                obs[i] = next_o
    episodes.extend(c for c in current if c["steps"])
    for env in envs:
        env.close()
    cols = list(zip(*[s for ep in episodes for s in ep["steps"]]))
    episode_ids = np.concatenate([np.full(len(ep["steps"]), k, dtype=np.int64) for k, ep in enumerate(episodes)])
    start_obs = np.stack([ep["start"] for ep in episodes]).astype(np.float32)
    return TransitionBuffer(
        np.stack(cols[0]), np.stack(cols[1]), np.asarray(cols[2]), np.stack(cols[3]),
        np.asarray(cols[4]), np.asarray(cols[5]), episode_ids, start_obs, env_id=env_id,
    )


def evaluate_in_real_env(act_fn, env_id, num_episodes, seed, max_batch=16):
    """Runs `num_episodes` real episodes (seeds seed, seed+1, ...) to completion, each exactly once, so short
    episodes are not over-represented. act_fn(obs_batch np.ndarray) -> actions. Returns (returns, lengths)."""
    returns = np.zeros(num_episodes, dtype=np.float64)
    lengths = np.zeros(num_episodes, dtype=np.int64)
    for lo in range(0, num_episodes, max_batch):
        idx = list(range(lo, min(num_episodes, lo + max_batch)))
        envs = [make_real_env(env_id, "evaluate_in_real_env") for _ in idx]
        action_space = envs[0].action_space
        obs = [env.reset(seed=seed + i)[0] for env, i in zip(envs, idx)]
        active = list(range(len(idx)))
        while active:
            acts = clip_action(act_fn(np.stack([obs[j] for j in active]).astype(np.float32)), action_space)
            if isinstance(action_space, gym.spaces.Discrete):
                acts = acts.reshape(len(active)).astype(np.int64)
            else:
                acts = acts.reshape(len(active), *action_space.shape).astype(action_space.dtype)
            still = []
            for a, j in zip(acts, active):
                obs[j], r, term, trunc, _ = envs[j].step(a.item() if np.ndim(a) == 0 else a)
                returns[idx[j]] += r
                lengths[idx[j]] += 1
                if not (term or trunc):
                    still.append(j)
            active = still
        for env in envs:
            env.close()
    return returns, lengths


def evaluate_in_imagination(act_fn, model, num_episodes, seed, horizon=None):
    """The same policy in the world model (ensemble members as in training, no halt), one episode per row from
    real start states over `horizon` (default: the real time limit). Set against evaluate_in_real_env's return it
    shows how much the policy exploits model errors. Returns the returns."""
    horizon = horizon or model.max_episode_steps or 1000
    envs = make_imagined_vector_env(model, num_episodes, seed=seed, horizon=horizon, start="start")
    obs, _ = envs.reset(seed=seed)
    returns, alive = np.zeros(num_episodes), np.ones(num_episodes, dtype=bool)
    for _ in range(horizon):  # NEXT_STEP autoreset: a row counts until its first episode ends
        obs, rewards, terms, truncs, _ = envs.step(clip_action(act_fn(obs), model.action_space))
        returns += np.asarray(rewards) * alive
        alive &= ~(np.asarray(terms) | np.asarray(truncs))
        if not alive.any():
            break
    envs.close()
    return returns


def clip_action(actions, action_space):
    """Box actions are clipped to the bounds where they enter an env (never inside the learner: the log-prob and
    the replay buffer keep the action the policy sampled); Discrete actions pass unchanged."""
    if isinstance(action_space, gym.spaces.Box):
        return np.clip(_to_numpy(actions), action_space.low, action_space.high).astype(action_space.dtype)
    return _to_numpy(actions)



# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
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
                 env_id=None, max_episode_steps=None):
        super().__init__()
        check_spaces_supported(observation_space, action_space, "EnsembleWorldModel")
        self.observation_space = observation_space
        self.action_space = action_space
        self.env_id = env_id
        self.max_episode_steps = max_episode_steps  # the real env's time limit: the default imagination horizon
        self.ensemble_size = ensemble_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
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
        self.head = EnsembleLinear(ensemble_size, d, 2 * self.out_dim)
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
        self.register_buffer("reward_clip", torch.tensor([-1e6, 1e6]))
        # lowest real rewards of non-terminal and of terminal steps: the halt rule's lower bound on a return
        self.register_buffer("reward_min", torch.zeros(()))
        self.register_buffer("terminal_reward_min", torch.zeros(()))
        # 99th percentile of the members' disagreement on real (obs, action) pairs: the halt rule's unit
        self.register_buffer("disagreement_ref", torch.ones(()))
        if self.discrete:
            self.register_buffer("act_low", torch.zeros(0))
            self.register_buffer("act_high", torch.zeros(0))
        else:
            self.register_buffer("act_low", torch.as_tensor(np.nan_to_num(action_space.low, neginf=-1e6), dtype=torch.float32))
            self.register_buffer("act_high", torch.as_tensor(np.nan_to_num(action_space.high, posinf=1e6), dtype=torch.float32))
        self.register_buffer("start_obs", torch.zeros(0, self.obs_dim), persistent=False)
        self.register_buffer("buffer_obs", torch.zeros(0, self.obs_dim), persistent=False)
        # the real transitions behind a loaded checkpoint (a TransitionBuffer), None when it carries none; Dyna
        # refits of a loaded model start from them so the refit sees all real data, not only the new data
        self.buffer = None

    @property
    def device(self):
        return self.in_mean.device

    def config(self):
        return {"ensemble_size": self.ensemble_size, "hidden_size": self.hidden_size, "num_layers": self.num_layers}

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
    def encode_action(self, action):
        """Actions (numpy/torch/list, batched) -> float features on model.device: one-hot or clipped Box."""
        a = torch.as_tensor(_to_numpy(action) if not isinstance(action, torch.Tensor) else action, device=self.device)
        if self.discrete:
            idx = a.reshape(-1).long() - int(self.action_space.start)
            if idx.numel() and (idx.min() < 0 or idx.max() >= self.act_dim):
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
        for layer in self.hidden:
            h = F.silu(layer(h))
        out = self.head(h)
        mean, logvar = out[..., : self.out_dim], out[..., self.out_dim:]
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

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
    def predict(self, obs, action, members=None, noise=None):
        """One batched step. obs (B,obs_dim) tensor, action batch. members (B,) long chooses one member per row
        (None: ensemble mean). noise (B,out_dim) standard normals or None. Returns next_obs (B,obs_dim),
        reward (B,), termination logit (B,), disagreement (B,): std across members of the normalised prediction.
        All members run in one batched matmul; the chosen member's row is then gathered (no per-row loop)."""
        obs = obs.to(self.device, torch.float32)
        x = self.model_input(obs, self.encode_action(action))
        mean, logvar = self(x)
        if self.ensemble_size > 1:
            disagreement = mean[..., : self.obs_dim].std(0).mean(-1)
        else:
            disagreement = torch.zeros(len(obs), device=self.device)
        if members is None:
            m = mean.mean(0)
        else:
            rows = torch.arange(len(obs), device=self.device)
            m = mean[members, rows]
            if noise is not None:
                m = m + noise * torch.exp(0.5 * logvar[members, rows])
        y = torch.where(self.out_constant, self.out_mean, m * self.out_std + self.out_mean)
        next_obs = torch.minimum(torch.maximum(obs + y[:, : self.obs_dim], self.obs_clip_low), self.obs_clip_high)
        reward = y[:, -1].clamp(self.reward_clip[0], self.reward_clip[1])
        logits = self.termination_logits(x, next_obs)
        if members is None:  # ensemble mean probability, back to a logit
            logit = torch.logit(torch.sigmoid(logits).mean(0).clamp(1e-6, 1 - 1e-6))
        else:
            logit = logits[members, rows]
        return next_obs, reward, logit, disagreement


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
    Each row uses a random member per step (MBPO-style), drawn from a per-row random state seeded by its reset
    seed, so a row's trajectory depends only on its seed and its actions (batched and single envs agree)."""

    def __init__(self, start="start", halt=0.0, gamma=0.99, sample_noise=False):
        if start not in ("start", "buffer"):
            raise ValueError(f"imagined start must be 'start' or 'buffer', got {start!r}")
        if not (isinstance(halt, (int, float)) and halt >= 0):
            raise ValueError(f"halt must be a number >= 0 (0 turns the halt rule off), got {halt!r}")
        self.start, self.halt, self.gamma, self.sample_noise = start, float(halt), float(gamma), bool(sample_noise)

    def batched_reset_fn(self, model, seed=None, options=None):
        """One row per seed; torch tensors on model.device.

        options={"states": obs_batch} starts the rows at those observations (one per row, e.g. real states for
        MBPO's branched rollouts) instead of drawing them from the start/buffer pool; the seeds still seed the rows'
        member draws. Autoresets pass no options, so later episodes of a row start from the pool again."""
        if seed is None:
            seed = np.random.randint(0, 2**31 - 1, size=(1,))
        s = torch.as_tensor(_seed_to_rng_state(np.asarray(seed).reshape(-1)), device=model.device)
        if options and options.get("states") is not None:
            obs = torch.as_tensor(_to_numpy(options["states"]), dtype=torch.float32, device=model.device)
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
            s, member = _draw_index(s, model.ensemble_size)
            noise = None
            if self.sample_noise:
                s, u = _draw_uniform(s, 2 * model.out_dim)
                u1, u2 = u[:, : model.out_dim], u[:, model.out_dim:]
                noise = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)  # Box-Muller
            next_obs, reward, logit, disagreement = model.predict(state["obs"], action, members=member, noise=noise)
        terminated = logit > 0.0  # sigmoid(logit) > 0.5
        info = {"disagreement": disagreement}
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
        out = self.batched_transition_fn(model, batched_state, np.asarray(_to_numpy(action))[None])
        obs = out["observation"][0].cpu().numpy()
        return {"state": {"obs": obs, "rng": int(out["state"]["rng"][0])}, "observation": obs,
                "reward": float(out["reward"][0]), "terminated": bool(out["terminated"][0]),
                "info": {k: v[0].item() for k, v in out["info"].items()}}


def make_imagined_env(model, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99, sample_noise=False):
    """A single `WorldModelEnv` (NumPy) driven by `model`, with the real env's spaces. horizon: the imagined time
    limit (a truncation; default the real env's); start / halt / gamma / sample_noise: see `Imagination`."""
    im = Imagination(start, halt, gamma, sample_noise)
    return WorldModelEnv(model, observation_space=model.observation_space, action_space=model.action_space,
                         reset_fn=im.reset_fn, transition_fn=im.transition_fn,
                         max_episode_steps=model.max_episode_steps if horizon is None else horizon, seed=seed)


def make_imagined_vector_env(model, num_envs, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99,
                             sample_noise=False, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP, output="numpy"):
    """A natively batched `WorldModelVectorEnv`: one model forward steps all `num_envs` imagined envs.
    output="torch" keeps observations, rewards and flags on model.device (no host copies)."""
    im = Imagination(start, halt, gamma, sample_noise)
    return WorldModelVectorEnv(model, observation_space=model.observation_space, action_space=model.action_space,
                               reset_fn=im.batched_reset_fn, transition_fn=im.batched_transition_fn,
                               num_envs=num_envs, max_episode_steps=model.max_episode_steps if horizon is None else horizon,
                               seed=seed, autoreset_mode=autoreset_mode, output=output, device=model.device)


# ----------------------------------------------------------------------------------------------------------------
# Fitting and evaluation
# ----------------------------------------------------------------------------------------------------------------
def _tensors(model, buffer):
    dev = model.device
    obs = torch.as_tensor(buffer.obs, device=dev)
    x = model.model_input(obs, model.encode_action(buffer.actions))
    y = torch.cat([torch.as_tensor(buffer.next_obs, device=dev) - obs, torch.as_tensor(buffer.rewards, device=dev)[:, None]], 1)
    y = (y - model.out_mean) / model.out_std
    term = torch.as_tensor(buffer.terminated, device=dev).float()
    return x, y, term, torch.as_tensor(buffer.next_obs, device=dev)


def fit_world_model(buffer, model=None, *, seed=0, ensemble_size=5, hidden_size=128, num_layers=3,
                    learning_rate=1e-3, weight_decay=1e-5, batch_size=256, max_epochs=40, patience=5,
                    max_updates=None, val_fraction=0.1, num_buffer_states=10000, env_id=None,
                    max_episode_steps=None, termination_pos_weight="sqrt", device="cpu", writer=None,
                    global_step=0, verbose=False):
    """Fits a new EnsembleWorldModel on `buffer`, or refits `model` in place from its current weights (Dyna).

    Whole episodes are split into train/validation (`val_fraction`); training stops once no member improved its
    validation score by >1% for `patience` epochs, or after `max_updates` minibatch updates (the budget of a
    refit, see `dyna_round`), and each member keeps its best snapshot (MBPO-style). A new model takes its
    normalisation from the data; a refit keeps it (so the warm weights stay valid) and only widens the clip range
    and the stored start/buffer states. Returns (model, metrics): epochs, updates, train_loss, val_mse,
    val_term_bce, seconds, num_train, num_val.
    """
    t0 = time.time()
    if termination_pos_weight not in ("ratio", "sqrt", "none"):
        raise ValueError(
            f"fit_world_model: termination_pos_weight must be 'ratio', 'sqrt' or 'none', got {termination_pos_weight!r}"
        )
    if len(buffer) < 2:
        raise ValueError(f"fit_world_model: buffer needs at least 2 transitions, got {len(buffer)}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    new_model = model is None
    if new_model:
        env_id = env_id or buffer.env_id
        if env_id is None:
            raise ValueError("fit_world_model: pass env_id=... (or a buffer from collect_transitions) for a new model")
        spec_env = make_real_env(env_id, "fit_world_model")
        if max_episode_steps is None:
            max_episode_steps = spec_env.spec.max_episode_steps if spec_env.spec is not None else None
        torch.manual_seed(seed)
        model = EnsembleWorldModel(
            spec_env.observation_space, spec_env.action_space, ensemble_size=ensemble_size, hidden_size=hidden_size,
            num_layers=num_layers, env_id=env_id, max_episode_steps=max_episode_steps,
        ).to(device)
        spec_env.close()
    if val_fraction > 0 and len(buffer) >= 4:
        train_buf, val_buf = buffer.split_episodes(val_fraction, seed=int(rng.integers(2**31)))
    else:
        train_buf, val_buf = buffer, None
    model.set_statistics(train_buf, num_buffer_states=num_buffer_states, seed=seed, normalisation=new_model)
    x, y, term, nxt = _tensors(model, train_buf)
    n_pos = float(term.sum())
    # class imbalance: terminations are rare (~1/length of an episode), so up-weight them
    ratio = (len(term) - n_pos) / n_pos if n_pos > 0 else 1.0
    pw = {"ratio": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[termination_pos_weight]
    pos_weight = torch.tensor(pw, device=model.device)
    xv = yv = tv = nv = None
    if val_buf is not None and len(val_buf):
        xv, yv, tv, nv = _tensors(model, val_buf)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    E, N = model.ensemble_size, len(x)

    def val_scores():
        with torch.no_grad():
            mean, _ = model(xv)
            logit = model.termination_logits(xv, nv)
            mse = ((mean - yv) ** 2).mean(dim=(1, 2))
            bce = F.binary_cross_entropy_with_logits(logit, tv.expand_as(logit), reduction="none").mean(1)
        return mse, bce

    if xv is not None:
        mse, bce = val_scores()
        best = (mse + bce).clone()
        # per-member parameters (leading ensemble axis); the shared log-variance bounds are not snapshotted
        snapshot = {k: p.detach().clone() for k, p in model.named_parameters() if "logvar" not in k}
    epochs_since, epoch, updates, train_loss = 0, 0, 0, float("nan")
    val_mse = val_bce = float("nan")
    budget = max_updates if max_updates is not None else math.inf
    while epoch < max_epochs and updates < budget:
        epoch += 1
        model.train()
        perms = torch.stack([torch.randperm(N, generator=gen) for _ in range(E)]).to(model.device)
        total = torch.zeros((), device=model.device)  # summed on the device: no host sync per update
        count = 0
        for lo in range(0, N, batch_size):
            if updates >= budget:
                break
            idx = perms[:, lo: lo + batch_size]
            xb, yb, tb = x[idx], y[idx], term[idx]
            mean, logvar = model(xb)
            logit = model.termination_logits(xb, nxt[idx])
            nll = (((mean - yb) ** 2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2))
            bce = F.binary_cross_entropy_with_logits(logit, tb, pos_weight=pos_weight, reduction="none").mean(1)
            loss = (nll + bce).sum() + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach() / E
            count += 1
            updates += 1
        train_loss = float(total) / max(count, 1)
        model.eval()
        improved = False
        if xv is not None:
            mse, bce = val_scores()
            score = mse + bce
            better = score < best - 0.01 * best.abs()
            if bool(better.any()):
                improved = True
                best = torch.where(better, score, best)
                with torch.no_grad():
                    for k, p in model.named_parameters():
                        if k in snapshot:
                            snapshot[k][better] = p.detach()[better]
            val_mse, val_bce = float(mse.mean()), float(bce.mean())
        if verbose:
            print(f"epoch={epoch} train_loss={train_loss:.4f} val_mse={val_mse:.5f} val_term_bce={val_bce:.4f} "
                  f"t={time.time() - t0:.1f}s", flush=True)
        epochs_since = 0 if improved else epochs_since + 1
        if xv is not None and epochs_since >= patience:
            break
    if xv is not None:
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in snapshot:
                    p.copy_(snapshot[k])
        mse, bce = val_scores()
        val_mse, val_bce = float(mse.mean()), float(bce.mean())
    model.eval()
    model.disagreement_ref.copy_(_disagreement_quantile(model, train_buf, seed))
    metrics = {
        "epochs": epoch, "updates": updates, "train_loss": train_loss, "val_mse": val_mse, "val_term_bce": val_bce,
        "seconds": time.time() - t0, "num_train": len(train_buf), "num_val": 0 if val_buf is None else len(val_buf),
    }
    if writer is not None:
        for k in ("train_loss", "val_mse", "val_term_bce", "updates", "seconds"):
            writer.add_scalar(f"world_model/{k}", metrics[k], global_step)
    return model, metrics


@torch.no_grad()
def _disagreement_quantile(model, buffer, seed, quantile=0.99, max_rows=10000):
    """The members' disagreement that counts as "inside the data": its 99th percentile on real (obs, action)."""
    rows = np.random.default_rng(seed).choice(len(buffer), size=min(max_rows, len(buffer)), replace=False)
    disagreement = model.predict(torch.as_tensor(buffer.obs[rows], device=model.device), buffer.actions[rows])[3]
    return torch.quantile(disagreement.float(), quantile).clamp_min(1e-6)


@torch.no_grad()
def evaluate_world_model(model, buffer, ks=K_STEPS):
    """Accuracy on (held-out) real data, using the ensemble mean:
    one_step_mse: MSE of the normalised obs delta (1.0 = no better than predicting the mean delta);
    reward_mae: mean absolute reward error in reward units;
    termination_precision/recall: for P(terminated) > 0.5 (None when undefined: no predicted/true positives);
    k_step_error_{k}: open-loop error after replaying k real actions from a real obs, as the mean squared error in
    units of the data's per-dimension obs std, over all k-step segments that stay inside one episode
    (k_step_count_{k} says how many segments there were; None when there were none)."""
    dev = model.device
    obs = torch.as_tensor(buffer.obs, device=dev)
    next_obs, reward, logit, _ = model.predict(obs, buffer.actions)
    delta_std = model.out_std[: model.obs_dim]
    true_next = torch.as_tensor(buffer.next_obs, device=dev)
    one_step = (((next_obs - true_next) / delta_std) ** 2).mean()
    reward_mae = (reward - torch.as_tensor(buffer.rewards, device=dev)).abs().mean()
    pred_term = (logit > 0).cpu().numpy()
    true_term = buffer.terminated
    tp = int((pred_term & true_term).sum())
    precision = tp / int(pred_term.sum()) if pred_term.sum() > 0 else None
    recall = tp / int(true_term.sum()) if true_term.sum() > 0 else None
    out = {
        "one_step_mse": float(one_step), "reward_mae": float(reward_mae),
        "termination_precision": precision, "termination_recall": recall,
        "num_test_transitions": len(buffer), "num_test_terminations": int(true_term.sum()),
    }
    ids = buffer.episode_ids
    for k in ks:
        starts = np.nonzero(ids[: len(ids) - k + 1] == ids[k - 1:])[0] if len(ids) >= k else np.zeros(0, np.int64)
        out[f"k_step_count_{k}"] = int(len(starts))
        if len(starts) == 0:
            out[f"k_step_error_{k}"] = None
            continue
        o = obs[torch.as_tensor(starts, device=dev)]
        for j in range(k):
            o, _, _, _ = model.predict(o, buffer.actions[starts + j])
        target = true_next[torch.as_tensor(starts + k - 1, device=dev)]
        out[f"k_step_error_{k}"] = float((((o - target) / model.obs_std) ** 2).mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def _buffer_to_dict(buffer):
    """Serialises a TransitionBuffer to tensors/primitives (safe for torch.load(weights_only=True))."""
    out = {name: torch.from_numpy(np.ascontiguousarray(getattr(buffer, name)))
           for name in (*TransitionBuffer.FIELDS, "start_obs")}
    out["env_id"] = buffer.env_id
    return out


def _buffer_from_dict(d, obs_dim):
    """Rebuilds the TransitionBuffer written by _buffer_to_dict; checks it fits a model with `obs_dim`."""
    if not isinstance(d, dict):
        raise ValueError(f"buffer must be a dict, got {type(d).__name__}")
    arrays = {name: d[name].numpy() for name in (*TransitionBuffer.FIELDS, "start_obs")}
    buffer = TransitionBuffer(**arrays, env_id=d.get("env_id"))
    if len(buffer) and buffer.obs.shape[1] != obs_dim:
        raise ValueError(f"buffer observations have {buffer.obs.shape[1]} dims, the model has {obs_dim}")
    return buffer


def save_world_model(model, path, extra=None, buffer=None):
    """Writes the checkpoint atomically (temporary file in the same directory, then os.replace).
    The payload is tensors and primitive containers only, so it loads with torch.load(weights_only=True).

    `buffer` (a TransitionBuffer, optional): the real transitions the model was fitted on. Stored in the
    checkpoint (CartPole, 20k transitions: ~1 MB) so that a later Dyna refit of the loaded model
    (`fit_world_model(model.buffer.extend(new), model=model)`) sees all real data and recomputes its
    normalisation from it; load_world_model returns it as `model.buffer`. Without it the key is left out."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "env_id": model.env_id,
        "max_episode_steps": model.max_episode_steps,
        "observation_space": _space_to_dict(model.observation_space),
        "action_space": _space_to_dict(model.action_space),
        "config": model.config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "start_obs": model.start_obs.detach().cpu(),
        "buffer_obs": model.buffer_obs.detach().cpu(),
        "extra": json_safe(extra or {}),
    }
    if buffer is not None:
        if not isinstance(buffer, TransitionBuffer):
            raise TypeError(f"save_world_model: buffer must be a TransitionBuffer or None, got {type(buffer).__name__}")
        payload["buffer"] = _buffer_to_dict(buffer)
    return save_torch_atomic(path, payload)


def save_torch_atomic(path, payload):
    """torch.save, atomically (see `atomic_path`): a crash never leaves half a checkpoint. Returns the path."""
    with atomic_path(path, ".pt") as tmp:
        torch.save(payload, tmp)
    return os.fspath(path)


def checkpoint_real_steps(model) -> int:
    """Real transitions a loaded world model was fitted on, for honest `real_env_steps` accounting.

    train_world_model.py records them in extra["summary"]["real_env_steps"], the imagined-training scripts in
    extra["real_env_steps"]; the count is at least the transitions the checkpoint carries (model.buffer, which Dyna
    refits reuse). 0 when the checkpoint neither says nor carries any."""
    extra = getattr(model, "extra", None) or {}
    steps = extra.get("real_env_steps", (extra.get("summary") or {}).get("real_env_steps", 0))
    carried = getattr(model, "buffer", None)
    return max(int(steps or 0), len(carried) if carried is not None else 0)


def load_world_model(path, device="cpu", env_id=None):
    """Rebuilds an EnsembleWorldModel from a checkpoint written by save_world_model / train_world_model.py.
    `model.buffer` is the checkpoint's real data (a TransitionBuffer) or None when it was saved without one
    (the "buffer" key is optional).

    Raises FileNotFoundError for a missing file and ValueError for a truncated/corrupt/foreign/too-new file,
    or when `env_id` is given and its spaces differ from the checkpoint's."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"world-model checkpoint {path!r} does not exist. Train one with "
            "`python train_world_model.py --env-id <ENV_ID>`; it is written to runs/<run_name>/world_model.pt."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors differ between torch versions; all mean the same to the user
        raise ValueError(
            f"{path!r} is not a readable world-model checkpoint (truncated or corrupt): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Re-run train_world_model.py to write a new one."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path!r} is a torch file but not a world-model checkpoint: expected a dict with "
            f"format={CHECKPOINT_FORMAT!r}, found {found}. Load a world_model.pt written by train_world_model.py."
        )
    version = payload.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path!r} has world-model checkpoint version {version!r}, this code reads version {CHECKPOINT_VERSION}. "
            "Re-train with the current train_world_model.py."
        )
    try:
        observation_space = _space_from_dict(payload["observation_space"])
        action_space = _space_from_dict(payload["action_space"])
        cfg = payload["config"]
        model = EnsembleWorldModel(
            observation_space, action_space, ensemble_size=cfg["ensemble_size"], hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_layers"], env_id=payload["env_id"], max_episode_steps=payload["max_episode_steps"],
        )
        model.load_state_dict(payload["state_dict"])
        model.start_obs = payload["start_obs"].float()
        model.buffer_obs = payload["buffer_obs"].float()
        if payload.get("buffer") is not None:  # optional: checkpoints saved without their data have no "buffer"
            model.buffer = _buffer_from_dict(payload["buffer"], model.obs_dim)
    except (KeyError, AttributeError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{path!r} is a damaged world-model checkpoint: {type(e).__name__}: {e}") from None
    model.extra = payload.get("extra", {})
    model.checkpoint_path = path
    model.eval()
    if env_id is not None:
        env = make_real_env(env_id, "load_world_model")
        try:
            check_env_matches(model, env.observation_space, env.action_space, env_id=repr(env_id))
        finally:
            env.close()
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# The entries every script uses
# ----------------------------------------------------------------------------------------------------------------
def load_or_fit_world_model(env_id, world_model_path=None, initial_real_steps=2000, seed=1, device="cpu",
                            writer=None, log=print, until_termination_policy=None, termination_pos_weight="sqrt"):
    """The world model a script starts from: the checkpoint at `world_model_path` (checked against `env_id`),
    else a new model fitted on `initial_real_steps` uniform random real transitions.
    until_termination_policy: when those transitions end no episode in a termination, `initial_real_steps` more
    are collected with it (obs batch -> actions). termination_pos_weight: see `fit_world_model`.
    Returns (model, buffer, real_env_steps): the real data to extend in Dyna rounds (None for a checkpoint saved
    without its data) and the real transitions spent on the model so far (counted honestly for a checkpoint too)."""
    if world_model_path is not None:
        model = load_world_model(world_model_path, device=str(device), env_id=env_id)
        return model, model.buffer, checkpoint_real_steps(model)
    log(f"collecting {initial_real_steps} random real transitions and fitting a world model")
    buffer = collect_transitions(env_id, initial_real_steps, seed=seed)
    if until_termination_policy is not None and not buffer.terminated.any():
        # a model that never saw an episode end predicts no ending anywhere (Acrobot's and MountainCar's goals)
        buffer.extend(collect_transitions(env_id, initial_real_steps, seed=seed + 1, policy=until_termination_policy))
        log(f"no random episode terminated: {initial_real_steps} more steps with the exploration policy, "
            f"{int(buffer.terminated.sum())} termination(s)")
    model, metrics = fit_world_model(buffer, seed=seed, device=str(device), writer=writer,
                                     termination_pos_weight=termination_pos_weight)
    log(f"world model fitted on {len(buffer)} transitions in {metrics['seconds']:.1f}s ({metrics['epochs']} epochs)")
    return model, buffer, len(buffer)


def dyna_round(model, buffer, env_id, policy, num_steps, seed, refit_passes=20, writer=None, global_step=0,
               termination_pos_weight="sqrt"):
    """One Dyna round: `num_steps` real transitions with `policy` (obs batch -> actions), then a warm refit of
    `model` on all real data. The refit costs what the new data is worth: at most as many minibatch updates as
    `refit_passes` passes over the new data would take (drawn from all data), with early stopping on top.
    Returns (model, buffer, metrics); metrics has `new_real_steps` and the fit's metrics."""
    new = collect_transitions(env_id, num_steps, seed=seed, policy=policy)
    buffer = new if buffer is None else buffer.extend(new)
    model, metrics = refit_world_model(model, buffer, len(new), seed, refit_passes, writer, global_step,
                                       termination_pos_weight)
    return model, buffer, {"new_real_steps": len(new), **metrics}


def refit_world_model(model, buffer, num_new, seed, refit_passes=20, writer=None, global_step=0,
                      termination_pos_weight="sqrt"):
    """The warm refit of a Dyna round, for learners that collect real data themselves (sac_imagined.py): `model`
    refit in place on all of `buffer` (which already holds the `num_new` new transitions), with a budget of at
    most as many minibatch updates as `refit_passes` passes over the new data would take. Returns (model, metrics)."""
    if writer is not None:  # the model as it was, on the data it is about to learn from: where it was wrong
        import visualize

        newest = buffer.select_episodes(np.unique(buffer.episode_ids[-num_new:]))
        visualize.write_open_loop(model, newest, writer, global_step, "open_loop_before_refit")
    budget = max(1, math.ceil(refit_passes * num_new / 256))
    return fit_world_model(buffer, model=model, seed=seed, max_updates=budget, writer=writer, global_step=global_step,
                           termination_pos_weight=termination_pos_weight)

