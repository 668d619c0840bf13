"""The real environment: real transitions (`TransitionBuffer`, `collect_transitions`) and evaluation in it
(`evaluate_in_real_env`), both through the world model's view of it when one is given.

A world model may show the policy something other than the raw observation (a latent model shows its belief).
`model.real_env(env)` is that view (see `world_model.py`): the policy acts on what it returns, in imagination and
here alike, while the data the model learns from keeps the raw real observations.
"""
import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers the POMDP and pixel ids: CartPoleNoVel-v1, PendulumNoVel-v1, PendulumPixels-v1)
from world_model_env import _host_to_device as to_device  # noqa: F401  (host array -> tensor, no GPU sync)
from world_model_env import _is_tensor, _torch
from world_model_env import _to_numpy as to_numpy  # noqa: F401  (numpy from arrays and tensors alike)


def _obs_array(x):
    """Observations as the buffer keeps them: float32, except uint8 pixels, which stay uint8."""
    x = np.asarray(x)
    return x if x.dtype == np.uint8 else x.astype(np.float32)


class TransitionBuffer:
    """Real transitions, stored episode-contiguously (sorted by episode id, time order inside an episode).

    Fields (numpy): obs (N, *obs_shape) float32 (uint8 pixels stay uint8: a quarter of the memory), actions (N,)
    int64 for Discrete / (N, act_dim) float32 for Box, rewards (N,) float32, next_obs like obs -- the TRUE next
    observation, also on termination and truncation (never a reset observation) --, terminated (N,) bool,
    truncated (N,) bool (time limit only), episode_ids (N,) int64, and start_obs (M, *obs_shape) like obs: the reset
    observations of the episodes. A model that learns from whole episodes cuts them by `episode_ids`; one that
    learns from transitions ignores it.
    """

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated", "truncated", "episode_ids")

    def __init__(self, obs, actions, rewards, next_obs, terminated, truncated, episode_ids, start_obs, env_id=None):
        self.obs = _obs_array(obs)
        actions = np.asarray(actions)
        self.actions = actions.astype(np.int64) if actions.dtype.kind in "iub" else actions.astype(np.float32)
        self.rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
        self.next_obs = _obs_array(next_obs)
        self.terminated = np.asarray(terminated, dtype=bool).reshape(-1)
        self.truncated = np.asarray(truncated, dtype=bool).reshape(-1)
        self.episode_ids = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
        self.start_obs = np.asarray(start_obs, dtype=self.obs.dtype).reshape(-1, *self.obs.shape[1:])
        self.env_id = env_id
        n = len(self.obs)
        for name in self.FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"TransitionBuffer: field {name!r} has {len(getattr(self, name))} rows, expected {n}")
        if n and self.obs.ndim < 2:
            raise ValueError(f"TransitionBuffer: obs must have shape (N, *obs_shape), got {self.obs.shape}")
        # keep the episode-contiguous invariant that the k-step evaluation and the episode split rely on
        if n and np.any(np.diff(self.episode_ids) < 0):
            order = np.argsort(self.episode_ids, kind="stable")
            for name in self.FIELDS:
                setattr(self, name, getattr(self, name)[order])

    @classmethod
    def from_arrays(cls, obs, actions, rewards, next_obs, terminated, truncated, episode_ids=None, start_obs=None,
                    env_id=None):
        """Builds a buffer from flat arrays. Without `episode_ids` episodes are cut at terminated|truncated;
        without `start_obs` the first observation of each episode is used."""
        terminated = np.asarray(terminated, dtype=bool).reshape(-1)
        truncated = np.asarray(truncated, dtype=bool).reshape(-1)
        if episode_ids is None:
            done = terminated | truncated
            episode_ids = (np.concatenate([[0], np.cumsum(done[:-1])]).astype(np.int64) if len(done)
                           else np.zeros(0, np.int64))
        episode_ids = np.asarray(episode_ids, dtype=np.int64)
        obs = _obs_array(obs)
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
        self.start_obs = (np.concatenate([self.start_obs, other.start_obs]) if len(self.start_obs)
                          else other.start_obs.copy())
        return self

    def select_episodes(self, episode_ids) -> "TransitionBuffer":
        mask = np.isin(self.episode_ids, np.asarray(episode_ids))
        # start observations of the selected episodes (a reset obs is the obs of the episode's first transition)
        _, first = np.unique(self.episode_ids[mask], return_index=True)
        return TransitionBuffer(*(getattr(self, name)[mask] for name in self.FIELDS), start_obs=self.obs[mask][first],
                                env_id=self.env_id)

    def newest_episodes(self, num_transitions) -> "TransitionBuffer":
        """The episodes the last `num_transitions` transitions belong to (what a Dyna round just collected)."""
        return self.select_episodes(np.unique(self.episode_ids[-num_transitions:]))

    def split_episodes(self, fraction, seed=0):
        """Splits by whole episodes (so k-step segments of the held-out part are truly unseen).
        Returns (rest, held_out). With fewer than 2 episodes the data is cut into 100-step pseudo-episodes first."""
        buf, ids, n_held = self._episode_split(fraction, seed)
        return buf.select_episodes(ids[n_held:]), buf.select_episodes(ids[:n_held])

    def split_rows(self, fraction, seed=0):
        """The bool mask (len(self),) of the transitions `split_episodes(fraction, seed)` keeps in its rest (what a
        per-transition array, such as the fit's bootstrap weights, is indexed by)."""
        buf, ids, n_held = self._episode_split(fraction, seed)
        return np.isin(buf.episode_ids, ids[n_held:])

    def _episode_split(self, fraction, seed):
        """(the buffer whose episode ids are split, those ids shuffled, how many of the first are held out)."""
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
        return buf, ids, n_held


def make_real_env(env_id, where, render_mode=None):
    """gym.make with an error that names the bad field instead of a registry traceback."""
    try:
        return gym.make(env_id, render_mode=render_mode) if render_mode else gym.make(env_id)
    except gym.error.Error as e:
        raise ValueError(
            f"{where}: env_id {env_id!r} cannot be created ({type(e).__name__}: {e}). Pass a registered Gymnasium "
            "id, e.g. CartPole-v1, Acrobot-v1, MountainCar-v0 or Pendulum-v1."
        ) from None


class RecordRealObs(gym.Wrapper):
    """Remembers the raw observation of the env it wraps: the world model's view of the real env (which the policy
    acts on) sits on top of it, and the model's data keeps the raw observations underneath."""

    def reset(self, **kwargs):
        self.last_obs, info = self.env.reset(**kwargs)
        return self.last_obs, info

    def step(self, action):
        self.last_obs, reward, terminated, truncated, info = self.env.step(action)
        return self.last_obs, reward, terminated, truncated, info


def seen_through(model, env):
    """(env as the policy sees it, the raw recorder beneath it): `model.real_env` over the raw env, or the raw env
    itself without a model (the model-free baseline)."""
    raw = RecordRealObs(env)
    return (raw if model is None else model.real_env(raw)), raw


_TORCH_BOUNDS = {}  # (low, high, device) -> the Box bounds as tensors there


def clip_action(actions, action_space, keep_tensor=False):
    """Box actions are clipped to the bounds where they enter an env (never inside the learner: the log-prob and
    the replay buffer keep the action the policy sampled); Discrete actions pass unchanged. NumPy out, or with
    `keep_tensor` a torch tensor stays one on its device (an imagined env with torch output: no host copy)."""
    if keep_tensor and _is_tensor(actions):
        torch = _torch()
        if not isinstance(action_space, gym.spaces.Box):
            return actions
        key = (action_space.low.tobytes(), action_space.high.tobytes(), str(actions.device), actions.dtype)
        if key not in _TORCH_BOUNDS:  # one host->device copy per space and device, not one per step
            _TORCH_BOUNDS[key] = tuple(torch.as_tensor(b, dtype=actions.dtype, device=actions.device)
                                       for b in (action_space.low, action_space.high))
        return torch.clamp(actions, *_TORCH_BOUNDS[key])
    if isinstance(action_space, gym.spaces.Box):
        return np.clip(to_numpy(actions), action_space.low, action_space.high).astype(action_space.dtype)
    return to_numpy(actions)


def _env_actions(acts, action_space, n):
    acts = clip_action(acts, action_space)
    if isinstance(action_space, gym.spaces.Discrete):
        return [int(a) for a in acts.reshape(n)]
    return list(acts.reshape(n, *action_space.shape).astype(action_space.dtype))


def collect_transitions(env_id, num_steps, seed, policy=None, num_envs=1, model=None, writer=None,
                        global_step_offset=0):
    """Collects `num_steps` real transitions from `gym.make(env_id)` envs.

    policy(obs_batch: np.ndarray) -> actions (n,) or (n, act_dim); None means uniform random. With `model`, the
    policy sees `model.real_env(env)`'s observations (the model's view, e.g. a belief) and the buffer keeps the raw
    ones. Termination and time-limit truncation are recorded separately; next_obs is always the true final obs.
    Episodes cut off by the step budget are kept (neither terminated nor truncated).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps <= 0:
        raise ValueError(f"collect_transitions: num_steps must be a positive int, got {num_steps!r}")
    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"collect_transitions: num_envs must be an int >= 1, got {num_envs!r}")
    pairs = [seen_through(model, make_real_env(env_id, "collect_transitions")) for _ in range(num_envs)]
    action_space = pairs[0][1].action_space
    for i, (_, raw) in enumerate(pairs):
        raw.action_space.seed(seed + i)
    episodes, current, seen = [], [], []  # one list of steps per running episode; contiguous at the end
    ep_returns, ep_lengths = np.zeros(num_envs), np.zeros(num_envs, dtype=np.int64)
    for i, (env, raw) in enumerate(pairs):
        o, _ = env.reset(seed=seed + i)
        seen.append(o)
        current.append({"start": raw.last_obs, "steps": []})
    steps = 0
    while steps < num_steps:
        if policy is None:
            actions = [raw.action_space.sample() for _, raw in pairs]
        else:
            actions = _env_actions(policy(np.stack(seen).astype(np.float32)), action_space, num_envs)
        for i, (env, raw) in enumerate(pairs):
            if steps >= num_steps:
                break
            before = raw.last_obs
            o, r, term, trunc, _ = env.step(actions[i])
            current[i]["steps"].append((before, actions[i], r, raw.last_obs, term, trunc))
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
                current[i] = {"start": raw.last_obs, "steps": []}
            seen[i] = o
    episodes.extend(c for c in current if c["steps"])
    for env, _ in pairs:
        env.close()
    cols = list(zip(*[s for ep in episodes for s in ep["steps"]]))
    episode_ids = np.concatenate([np.full(len(ep["steps"]), k, dtype=np.int64) for k, ep in enumerate(episodes)])
    start_obs = np.stack([ep["start"] for ep in episodes]).astype(np.float32)
    return TransitionBuffer(np.stack(cols[0]), np.stack(cols[1]), np.asarray(cols[2]), np.stack(cols[3]),
                            np.asarray(cols[4]), np.asarray(cols[5]), episode_ids, start_obs, env_id=env_id)


def evaluate_in_real_env(act_fn, env_id, num_episodes, seed, model=None, max_batch=16):
    """Runs `num_episodes` real episodes (seeds seed, seed+1, ...) to completion, each exactly once, so short
    episodes are not over-represented. act_fn(obs_batch np.ndarray) -> actions, on what `model.real_env` shows
    (the raw observations without a model). Returns (returns, lengths)."""
    returns = np.zeros(num_episodes, dtype=np.float64)
    lengths = np.zeros(num_episodes, dtype=np.int64)
    for lo in range(0, num_episodes, max_batch):
        idx = list(range(lo, min(num_episodes, lo + max_batch)))
        real_envs = [seen_through(model, make_real_env(env_id, "evaluate_in_real_env"))[0] for _ in idx]
        action_space = real_envs[0].action_space
        obs = [env.reset(seed=seed + i)[0] for env, i in zip(real_envs, idx)]
        active = list(range(len(idx)))
        while active:
            acts = _env_actions(act_fn(np.stack([obs[j] for j in active]).astype(np.float32)), action_space,
                                len(active))
            still = []
            for a, j in zip(acts, active):
                obs[j], r, term, trunc, _ = real_envs[j].step(a)
                returns[idx[j]] += r
                lengths[idx[j]] += 1
                if not (term or trunc):
                    still.append(j)
            active = still
        for env in real_envs:
            env.close()
    return returns, lengths
