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
import typing

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


def make_env(env_id, seed):
    """CleanRL's thunk for the real env (the model-free baselines, SAC's real steps): its action space seeded."""

    def thunk():
        env = gym.make(env_id)
        env.action_space.seed(seed)
        return env

    return thunk


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


DYNA_GAP_REMEDY = "Collect more real data (--real-iterations) or raise the halt rule (lower --halt-threshold)."


def finish_run(tag, run_dir, summary, gap_remedy=DYNA_GAP_REMEDY):
    """Writes summary.json, then the last lines: the final figures, a warning (with `gap_remedy`: the flags that
    help) when the policy exploits the model, and where the results are."""
    path = os.path.join(run_dir, "summary.json")
    wm.write_json_atomic(path, summary)
    print(f"[{tag}] final real return {fmt(summary['real_return_mean'])} +/- {fmt(summary['real_return_std'])} "
          f"({summary['eval_episodes']} episodes) | real_env_steps {summary['real_env_steps']} | "
          f"imagined_steps {summary.get('imagined_steps', 0)} | wall {summary['wall_seconds']:.1f}s")
    gap = summary.get("imagined_minus_real")
    if gap is not None and gap_is_large(gap, summary.get("real_return_scale")):
        print(f"[{tag}] WARNING: the policy scores {gap:+.1f} more in imagination than in the real env: it exploits "
              f"errors of the world model. {gap_remedy}")
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
    it); `reached_at` is the real_env_steps of the first evaluation whose mean reached `target`.

    The stop rule of every script is `solved(n)`: n evaluations in a row whose MEAN return reached `target`.
    Gymnasium's reward_threshold is defined on the mean over episodes; asking it of consecutive evaluations on fresh
    episode seeds keeps one lucky evaluation from stopping a run, and the final evaluation (its own seeds) shows
    whether the policy holds."""

    def __init__(self, env_id, seed, episodes, writer, target=None):
        self.env_id, self.seed, self.episodes, self.writer, self.target = env_id, seed, episodes, writer, target
        self.history, self.reached_at, self.seconds, self.env_steps = [], None, 0.0, 0
        self.last_real, self.last_gap = float("nan"), float("nan")
        self.evals_at_target = 0  # consecutive evaluations whose mean reached the target

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
            at_target = self.target is not None and self.last_real >= self.target
            self.evals_at_target = self.evals_at_target + 1 if at_target else 0
            self.history.append(dict(entry))  # without the returns array below
        self.seconds += time.time() - t0
        entry["returns"] = returns
        return entry

    def solved(self, consecutive):
        return self.evals_at_target >= consecutive


def held_random_policy(action_space, repeat, seed):
    """A random exploration policy for collect_transitions: each uniformly drawn action is held for `repeat` calls.
    Held actions explore further than per-step noise (on Acrobot-v1 they swing the tip up now and then, per-step
    random actions almost never do); repeat=1 is the uniform random policy."""
    space = gym.vector.utils.batch_space(action_space, 1)
    space.seed(seed)
    held = {"calls": 0, "actions": None}

    def policy(obs_batch):
        if held["calls"] % repeat == 0 or held["actions"] is None or len(held["actions"]) != len(obs_batch):
            held["actions"] = np.stack([space.sample()[0] for _ in range(len(obs_batch))])
        held["calls"] += 1
        return held["actions"]

    return policy


# ----------------------------------------------------------------------------------------------------------------
# Replay buffer (DQN, SAC): stores `terminated`, never `done`, so truncation is bootstrapped
# ----------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """A ring buffer of (obs, action, reward, next_obs, terminated); `next_obs` is the true next observation.
    Multi-step rows also keep `discounts`, the gamma**k their bootstrap is discounted by (k: the steps they span)."""

    def __init__(self, capacity, obs_dim, action_shape=(), action_dtype=np.int64, seed=0):
        self.capacity, self.size, self.pos = int(capacity), 0, 0
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.actions = np.zeros((capacity, *action_shape), action_dtype)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.float32)
        self.discounts = np.ones(capacity, np.float32)
        self.rng = np.random.default_rng(seed)

    def add(self, obs, actions, rewards, next_obs, terminated, discounts=1.0):
        """Adds a batch of rows."""
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.actions[idx], self.rewards[idx] = obs, actions, rewards
        self.next_obs[idx], self.terminated[idx], self.discounts[idx] = next_obs, terminated, discounts
        self.pos = int(idx[-1] + 1) % self.capacity if len(idx) else self.pos
        self.size = min(self.size + len(idx), self.capacity)

    def clear(self):
        self.size = self.pos = 0

    def sample(self, batch_size, device, discounts=False):
        idx = self.rng.integers(0, self.size, size=batch_size)
        columns = (self.obs, self.actions, self.rewards, self.next_obs, self.terminated)
        return tuple(torch.as_tensor(a[idx], device=device) for a in columns + ((self.discounts,) if discounts else ()))


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


# ----------------------------------------------------------------------------------------------------------------
# Dyna driver shared by the library examples (sb3_example.py, torchrl_example.py): the learner's own loop stays in
# the script; this holds the real-data side between its phases (evaluation, Dyna round, status line, summary)
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DynaArgs:
    """The flags of a Dyna run in imagination that the example scripts share (their Args extend it)."""

    env_id: str = "CartPole-v1"
    """The real environment the world model imitates and the policy is judged in."""
    seed: int = 1
    """The seed of the world-model data and fit, the imagined envs, the agent and the evaluation."""
    torch_deterministic: bool = True
    """If toggled, `torch.backends.cudnn.deterministic=True`."""
    cuda: bool = True
    """If toggled, cuda is used when available."""
    num_threads: int = 1
    """The number of torch threads."""
    world_model_path: typing.Optional[str] = None
    """A world_model.pt written by train_world_model.py or by an earlier run; None fits one here."""
    initial_real_steps: int = 2000
    """Random-policy real transitions the world model is fitted on when no --world-model-path is given."""
    real_iterations: int = 4
    """The number of Dyna rounds, one after each phase of imagined training but the last.
    A round collects real transitions with the current policy and refits the model (warm, budgeted) on all real data."""
    real_steps_per_iteration: int = 1000
    """Real transitions collected per Dyna round."""
    refit_passes: int = 20
    """A refit's budget: at most the minibatch updates that this many passes over the new real data take.
    Early stopping on held-out episodes may end it sooner."""
    imagined_horizon: typing.Optional[int] = None
    """Imagined episodes are truncated (and bootstrapped) after this many steps; None: the real env's time limit."""
    imagined_start: typing.Literal["buffer", "start"] = "start"
    """Imagined episodes start from real reset observations (start) or from real states in the model's data."""
    halt_threshold: float = 2.0
    """The halt rule's multiple of the ensemble disagreement's 99th percentile on real data (0 turns it off).
    An imagined step above it ends as terminated with the lowest possible value, so the policy is not drawn to
    states where the model is wrong."""
    eval_episodes: int = 10
    """Real-env episodes per evaluation (deterministic actions)."""
    eval_every: int = 1
    """Evaluate in the real env after every this many phases (0: only the final evaluation)."""
    eval_checkpoint: typing.Optional[str] = None
    """An agent.pt written by this script: replay the run's final real evaluation with its seed, then exit."""


def check_dyna_args(args):
    """The world-model / Dyna / imagination flags every imagined-training script shares."""
    check_positive(args, "total_timesteps", "initial_real_steps", "eval_episodes", "num_threads", "refit_passes")
    for name in ("real_iterations", "eval_every"):
        if getattr(args, name) < 0:
            raise ArgError("--" + name.replace("_", "-"), "an integer >= 0", getattr(args, name))
    if args.real_iterations > 0:
        check_positive(args, "real_steps_per_iteration")
    if args.imagined_horizon is not None and args.imagined_horizon < 1:
        raise ArgError("--imagined-horizon", "None or an integer >= 1", args.imagined_horizon)
    if not args.halt_threshold >= 0:
        raise ArgError("--halt-threshold", "a number >= 0 (0 turns the halt rule off)", args.halt_threshold)


def world_model_for(args, device, tag):
    """wm.load_or_fit_world_model with the run's flags; a bad --world-model-path becomes one clear line.
    Returns (model, buffer, real_env_steps, seconds)."""
    t0 = time.time()
    try:
        model, buffer, steps = wm.load_or_fit_world_model(args.env_id, args.world_model_path, args.initial_real_steps,
                                                          args.seed, str(device), log=lambda m: print(f"[{tag}] {m}"))
    except (FileNotFoundError, ValueError) as e:
        raise ArgError("--world-model-path", f"a world_model.pt that fits {args.env_id}", args.world_model_path,
                       str(e)) from None
    return model, buffer, steps, time.time() - t0


class DynaRounds:
    """args.real_iterations + 1 phases of imagined training with a Dyna round (wm.dyna_round: real data from the
    current policy, warm refit of the model) after every phase but the last, a real evaluation every
    args.eval_every phases (and always a final one), the status line and the summary.

    The script runs its learner for `phase_steps(phase)` imagined steps, then calls `end_phase`; at the end
    `finish` saves the (refit) world model once, evaluates with the run's seed and writes summary.json."""

    def __init__(self, tag, args, model, buffer, real_env_steps, writer, target=None, world_model_seconds=0.0,
                 start_time=None):
        self.tag, self.args, self.model, self.buffer, self.writer = tag, args, model, buffer, writer
        self.real_env_steps, self.num_phases, self.refits = int(real_env_steps), args.real_iterations + 1, 0
        self.evaluator = Evaluator(args.env_id, args.seed, args.eval_episodes, writer, target)
        self.timings = {"world_model_seconds": world_model_seconds, "real_collect_seconds": 0.0, "train_seconds": 0.0}
        self.start_time = time.time() if start_time is None else start_time

    def phase_steps(self, phase, unit=1):
        """Imagined steps of `phase`: args.total_timesteps split evenly, in whole multiples of `unit`."""
        units = -(-self.args.total_timesteps // unit)
        return unit * (units // self.num_phases + (phase < units % self.num_phases))

    def status(self, phase, global_step, imagined_return, sps):
        print(f"[{self.tag}] iter {phase + 1}/{self.num_phases} step {global_step} imagined_return "
              f"{fmt(imagined_return)} real_return {fmt(self.evaluator.last_real)} real_steps {self.real_env_steps} "
              f"gap {fmt(self.evaluator.last_gap)} SPS {int(sps)}", flush=True)

    def end_phase(self, phase, global_step, act_fn, explore_fn):
        """After phase `phase`: evaluate (act_fn: deterministic) when due, then a Dyna round with explore_fn."""
        every = self.args.eval_every
        if every and (phase + 1) % every == 0 and phase < self.num_phases - 1:
            self.evaluator(act_fn, global_step, self.real_env_steps, model=self.model)
        if phase < self.num_phases - 1:
            t0 = time.time()
            self.model, self.buffer, m = wm.dyna_round(
                self.model, self.buffer, self.args.env_id, explore_fn, self.args.real_steps_per_iteration,
                seed=self.args.seed + 1000 * (phase + 1), refit_passes=self.args.refit_passes, writer=self.writer,
                global_step=global_step)
            self.real_env_steps += m["new_real_steps"]
            self.refits += 1
            self.timings["world_model_seconds"] += m["seconds"]
            self.timings["real_collect_seconds"] += time.time() - t0 - m["seconds"]
            self.writer.add_scalar("charts/real_env_steps", self.real_env_steps, global_step)

    def finish(self, act_fn, global_step, run_dir, agent_path=None, scale=None, extra=None):
        """Saves the world model (when refit here or fitted here), runs the final evaluation, writes summary.json
        (with the script's `extra` keys) and prints the last lines. Returns the summary."""
        args, model_path = self.args, self.args.world_model_path
        if args.world_model_path is None or self.refits:
            model_path = os.path.join(run_dir, "world_model.pt")
            wm.save_world_model(self.model, model_path, extra={"real_env_steps": self.real_env_steps},
                                buffer=self.buffer)
        final = self.evaluator(act_fn, global_step, self.real_env_steps, model=self.model, final=True)
        seen = [abs(e["real_return_mean"]) for e in self.evaluator.history + [final]]
        summary = {
            "algo": self.tag, "env_id": args.env_id, "seed": args.seed, "world_model": "learned",
            "world_model_path": model_path, "real_return_mean": final["real_return_mean"],
            "real_return_std": final["real_return_std"], "real_returns": final["returns"],
            "eval_episodes": args.eval_episodes, "real_env_steps": self.real_env_steps,
            "eval_env_steps": self.evaluator.env_steps, "imagined_steps": int(global_step),
            "imagined_return_mean": final["imagined_return_mean"], "imagined_minus_real": final["imagined_minus_real"],
            "real_return_scale": scale if scale else max(seen), "wall_seconds": time.time() - self.start_time,
            **self.timings, "eval_seconds": self.evaluator.seconds, "target_return": self.evaluator.target,
            "real_env_steps_to_target": self.evaluator.reached_at, "agent_path": agent_path, "run_dir": run_dir,
            "eval_history": self.evaluator.history, **(extra or {}),
        }
        self.writer.close()
        finish_run(self.tag, run_dir, summary)
        return summary


def replay_final_evaluation(tag, path, payload, act_fn):
    """--eval-checkpoint: the run's own final real evaluation again (same env, episodes and seeds)."""
    a = payload["args"]
    seed = Evaluator(a["env_id"], a["seed"], a["eval_episodes"], writer=None).episode_seed(0)
    returns, _ = wm.evaluate_in_real_env(act_fn, a["env_id"], a["eval_episodes"], seed)
    print(f"[{tag}] {path}: real return {returns.mean():.1f} +/- {returns.std():.1f} over {len(returns)} episodes "
          f"of {a['env_id']} (seed {a['seed']})")
    return returns
