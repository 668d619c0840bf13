"""What every training script shares besides the world model: argument errors, run directories, seeding, the
replay buffer, evaluation bookkeeping, agent checkpoints and the last lines a run prints.

The algorithms themselves stay inline in their scripts (as in CleanRL); this file holds only the plumbing that would
otherwise be copied into each of them.
"""
import dataclasses
import math
import os
import random
import shutil
import time

import gymnasium as gym
import numpy as np
import torch

import world_model as wm

# A run that ends with imagined-minus-real above this fraction of the real return's scale says so in its last lines.
GAP_WARNING_FRACTION = 0.25


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line that names the flag, what was expected and what came
# ----------------------------------------------------------------------------------------------------------------
class ArgError(SystemExit):
    """Raised for a bad flag or env; exits with one line (no traceback) and leaves no run dir behind."""

    def __init__(self, flag, expected, got, fix=""):
        super().__init__(f"error: {flag}: expected {expected}, got {got!r}." + (f" {fix}" if fix else ""))


def check_positive(args, *names):
    """Every named field of `args` must be an int/float > 0."""
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            raise ArgError("--" + name.replace("_", "-"), "a number > 0", value)


def real_env_spaces(env_id, script, actions=("Discrete", "Box")):
    """Makes `env_id` once and checks that `script` can handle its spaces: a 1-D Box observation and an action
    space of the kinds in `actions`. Returns (observation_space, action_space, reward_threshold)."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise ArgError("--env-id", "a registered Gymnasium id such as CartPole-v1 or Pendulum-v1", env_id,
                       f"({type(e).__name__}: {e})") from None
    obs_space, act_space = env.observation_space, env.action_space
    threshold = env.spec.reward_threshold if env.spec is not None else None
    env.close()
    alternatives = {"Discrete": "ppo_imagined.py or dqn_imagined.py", "Box": "ppo_imagined.py or sac_imagined.py"}
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        raise ArgError("--env-id", f"an env with a 1-D Box observation space ({script} supports flat vectors)",
                       env_id, f"It has {obs_space}; wrap it with gymnasium.wrappers.FlattenObservation first.")
    kind = type(act_space).__name__
    if kind not in actions or (kind == "Box" and len(act_space.shape) != 1):
        supported = " or ".join(f"{a} actions" for a in actions)
        others = [alternatives[k] for k in ("Discrete", "Box") if k not in actions]
        raise ArgError("--env-id", f"an env with {supported} ({script})", env_id,
                       f"It has {act_space}." + (f" Use {others[0]} for {kind} actions." if kind in alternatives
                                                 and others else " No script here handles that action space."))
    return obs_space, act_space, threshold


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed, num_threads=1, torch_deterministic=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def start_run(args, script, model_free=False):
    """runs/{env_id}__{script}[_model_free]__{seed}__{time}/ with a TensorBoard writer that has the hyper-parameters.
    Call it after the arguments were checked, so a bad flag leaves no run dir behind."""
    from torch.utils.tensorboard import SummaryWriter

    name = f"{script}_model_free" if model_free else script
    run_name = f"{args.env_id}__{name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters",
                    "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return run_name, run_dir, writer


def remove_run_dir_without_summary(run_dir):
    """A run that failed before writing summary.json leaves nothing behind that TensorBoard would show."""
    if run_dir and os.path.isdir(run_dir) and not os.path.exists(os.path.join(run_dir, "summary.json")):
        shutil.rmtree(run_dir, ignore_errors=True)


def fmt(x, spec=".1f"):
    """A number for a status line; '-' until there is one (never 'nan')."""
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def finish_run(tag, run_dir, summary):
    """Writes summary.json, then the last lines: the final figures, a warning when the policy exploits the model,
    and where the results are."""
    path = os.path.join(run_dir, "summary.json")
    wm.write_json_atomic(path, summary)
    print(f"[{tag}] final real return {fmt(summary['real_return_mean'])} +/- {fmt(summary['real_return_std'])} "
          f"({summary['eval_episodes']} episodes) | real_env_steps {summary['real_env_steps']} | "
          f"imagined_steps {summary.get('imagined_steps', 0)} | wall {summary['wall_seconds']:.1f}s")
    gap = summary.get("imagined_minus_real")
    if gap is not None and gap_is_large(gap, summary.get("real_return_scale")):
        print(f"[{tag}] WARNING: the policy scores {gap:+.1f} more in imagination than in the real env: it exploits "
              "errors of the world model. Collect more real data (--real-iterations) or raise the halt rule "
              "(lower --halt-threshold).")
    print(f"[{tag}] results: {path}")
    if summary.get("agent_path"):
        print(f"[{tag}] agent: {summary['agent_path']} (re-evaluate: python {tag}.py --eval-checkpoint "
              f"{summary['agent_path']})")
    print(f"[{tag}] curves: tensorboard --logdir runs")


def gap_is_large(gap, scale):
    return scale is not None and scale > 0 and gap > GAP_WARNING_FRACTION * scale


# ----------------------------------------------------------------------------------------------------------------
# Evaluation bookkeeping
# ----------------------------------------------------------------------------------------------------------------
class Evaluator:
    """Periodic judgement of a policy in the real env (and the same policy in imagination, to show the gap).

    Each evaluation plays fresh, disjoint real episode seeds; the final one (index 0) uses seeds that depend only
    on the run's seed, so `--eval-checkpoint` reproduces it. `history` goes into summary.json (plot_runs.py reads
    it); `reached_at` is the real_env_steps of the first evaluation whose mean reached `target`."""

    def __init__(self, env_id, seed, episodes, writer, target=None):
        self.env_id, self.seed, self.episodes, self.writer, self.target = env_id, seed, episodes, writer, target
        self.history, self.reached_at, self.seconds, self.env_steps = [], None, 0.0, 0
        self.last_real, self.last_gap = float("nan"), float("nan")

    def episode_seed(self, index):
        return 10_000 * self.seed + index * self.episodes

    def __call__(self, act_fn, global_step, real_env_steps, model=None, final=False, action_space=None):
        t0 = time.time()
        index = 0 if final else 1 + len(self.history)
        returns, lengths = wm.evaluate_in_real_env(act_fn, self.env_id, self.episodes, self.episode_seed(index))
        self.env_steps += int(lengths.sum())
        entry = {"global_step": int(global_step), "real_env_steps": int(real_env_steps),
                 "real_return_mean": float(returns.mean()), "real_return_std": float(returns.std()),
                 "real_length_mean": float(lengths.mean())}
        if model is not None:
            imagined = wm.evaluate_in_imagination(act_fn, model, self.episodes, self.episode_seed(index))
            entry["imagined_return_mean"] = float(imagined.mean())
            entry["imagined_minus_real"] = float(imagined.mean() - returns.mean())
            self.writer.add_scalar("eval/imagined_episodic_return", entry["imagined_return_mean"], global_step)
            self.writer.add_scalar("eval/imagined_minus_real", entry["imagined_minus_real"], global_step)
            self.last_gap = entry["imagined_minus_real"]
        self.writer.add_scalar("eval/real_episodic_return", entry["real_return_mean"], global_step)
        self.writer.add_scalar("eval/real_episodic_length", entry["real_length_mean"], global_step)
        self.writer.add_scalar("eval/real_env_steps", real_env_steps, global_step)
        self.last_real = entry["real_return_mean"]
        if self.reached_at is None and self.target is not None and self.last_real >= self.target:
            self.reached_at = int(real_env_steps)
        if not final:
            self.history.append(entry)
        self.seconds += time.time() - t0
        entry["returns"] = returns
        return entry


# ----------------------------------------------------------------------------------------------------------------
# Replay buffer (DQN, SAC): stores `terminated`, never `done`, so truncation is bootstrapped
# ----------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """A ring buffer of (obs, action, reward, next_obs, terminated); `next_obs` is the true next observation."""

    def __init__(self, capacity, obs_dim, action_shape=(), action_dtype=np.int64, seed=0):
        self.capacity, self.size, self.pos = int(capacity), 0, 0
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros((capacity, *action_shape), action_dtype)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.float32)
        self.rng = np.random.default_rng(seed)

    def add(self, obs, actions, rewards, next_obs, terminated):
        """Adds a batch of rows."""
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.actions[idx], self.rewards[idx] = obs, actions, rewards
        self.next_obs[idx], self.terminated[idx] = next_obs, terminated
        self.pos = int(idx[-1] + 1) % self.capacity if len(idx) else self.pos
        self.size = min(self.size + len(idx), self.capacity)

    def clear(self):
        self.size = self.pos = 0

    def sample(self, batch_size, device):
        idx = self.rng.integers(0, self.size, size=batch_size)
        return tuple(torch.as_tensor(a[idx], device=device)
                     for a in (self.obs, self.actions, self.rewards, self.next_obs, self.terminated))


# ----------------------------------------------------------------------------------------------------------------
# Agent checkpoints: the run's args (its seed too) travel with the weights, so --eval-checkpoint replays the run's
# own final evaluation
# ----------------------------------------------------------------------------------------------------------------
def save_agent(path, state_dicts, args, world_model_path=None, extra=None):
    payload = {"format": "world-model-rl/agent", "args": wm.json_safe(dataclasses.asdict(args)),
               "state_dicts": {k: {n: t.detach().cpu() for n, t in sd.items()} for k, sd in state_dicts.items()},
               "world_model_path": world_model_path, "extra": wm.json_safe(extra or {})}
    return wm.save_torch_atomic(path, payload)


def load_agent(path):
    """Returns the payload written by save_agent; a clear error for a missing or foreign file."""
    if not os.path.isfile(path):
        raise ArgError("--eval-checkpoint", "the agent.pt a training run wrote (runs/<run>/agent.pt)", path,
                       "The file does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArgError("--eval-checkpoint", "a readable agent checkpoint", path, f"({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != "world-model-rl/agent":
        raise ArgError("--eval-checkpoint", "an agent.pt written by a training script of this collection", path,
                       "A world_model.pt goes to --world-model-path instead.")
    return payload
