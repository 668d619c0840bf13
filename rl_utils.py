"""What every training script shares besides the world model: argument errors, run directories, seeding, the
replay buffer, evaluation bookkeeping, agent checkpoints and the last lines a run prints.

The algorithms themselves stay inline in their scripts (as in CleanRL); this file holds only the plumbing that would
otherwise be copied into each of them.
"""
import dataclasses
import math
import os
import random
import signal
import time
import typing

import gymnasium as gym
import numpy as np
import torch

import run_io

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
    """Makes `env_id` once and checks that `script` can handle its action space (of the kinds in `actions`).
    Returns (observation_space, action_space, reward_threshold). What the policy observes is checked by
    `check_policy_observations`, on the world model's space (or the real one, model-free)."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise ArgError("--env-id", "a registered Gymnasium id such as CartPole-v1 or Pendulum-v1", env_id,
                       f"({type(e).__name__}: {e})") from None
    obs_space, act_space = env.observation_space, env.action_space
    threshold = env.spec.reward_threshold if env.spec is not None else None
    env.close()
    alternatives = {"Discrete": "ppo_imagined.py or dqn_imagined.py", "Box": "ppo_imagined.py or sac_imagined.py"}
    kind = type(act_space).__name__
    if kind not in actions or (kind == "Box" and len(act_space.shape) != 1):
        supported = " or ".join(f"{a} actions" for a in actions)
        others = [alternatives[k] for k in ("Discrete", "Box") if k not in actions]
        raise ArgError("--env-id", f"an env with {supported} ({script})", env_id,
                       f"It has {act_space}." + (f" Use {others[0]} for {kind} actions." if kind in alternatives
                                                 and others else " No script here handles that action space."))
    return obs_space, act_space, threshold


def check_policy_observations(space, script, env_id, model_spec):
    """The policy networks here are MLPs: what they observe (the world model's observation space, or the real env's
    without a model) must be a 1-D Box."""
    if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
        where = "the real env's" if model_spec == "none" else f"--world-model {model_spec}'s"
        raise ArgError("--env-id", f"an env whose policy observations are a 1-D Box ({script}'s networks are MLPs)",
                       env_id, f"{where} observation space is {space}; wrap the env with "
                       "gymnasium.wrappers.FlattenObservation first.")
    return space


def real_env_thunk(env_id, seed):
    """CleanRL's make_env for the real env (the model-free baselines, SAC's real steps): its action space seeded."""

    def thunk():
        env = gym.make(env_id)
        env.action_space.seed(seed)
        return env

    return thunk


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------
def seed_everything(seed, num_threads=1, torch_deterministic=True):
    """Seeds Python, NumPy and torch, sets the torch CPU threads, and flushes denormal floats to zero on the CPU: a
    trained ensemble's SiLU units saturate into denormals, which made a 10,000-row HalfCheetah rollout batch 9x and a
    refit 5x slower (1.35 vs 0.15 s, 18 vs 3 s at 20,000 real steps; no effect on values above 1e-38)."""
    torch.set_flush_denormal(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def eval_due(every, step, last_eval_step):
    """`--eval-every` in every script: an evaluation at the first iteration end once `every` learner steps (the unit
    of --total-timesteps) passed since the last one; 0: only the final evaluation."""
    return bool(every) and step - last_eval_step >= every


class Run:
    """runs/{env_id}__{exp_name}[_model_free]__{seed}__{time}/: the TensorBoard writer, the figures so far, the one
    summary builder, and what a run keeps when it stops early.

    Create it after the arguments were checked (a bad flag leaves no run dir), then run the work inside `with run:`.
    Ctrl-C (SIGINT), SIGTERM or an exception inside keeps the run dir: `checkpoint()` (set by the script: it saves
    the latest agent and world model and returns their paths) is called, summary.json gets "status": "interrupted"
    or "failed" (with the error) and the figures so far, one line says where it is, and Ctrl-C exits with code 130
    and no traceback. A finished run's summary says "status": "finished" (`finish`)."""

    def __init__(self, args, tag, model_free=False):
        from torch.utils.tensorboard import SummaryWriter

        self.args, self.tag = args, tag
        name = f"{args.exp_name}_model_free" if model_free else args.exp_name
        self.name = f"{args.env_id}__{name}__{args.seed}__{int(time.time())}"
        self.dir = os.path.join("runs", self.name)
        self.writer = SummaryWriter(self.dir)
        self.writer.add_text("hyperparameters",
                             "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        self.start_time = time.time()
        # what the script updates as it goes; every summary, a partial one too, carries it
        self.figures = {"real_env_steps": 0, "imagined_steps": 0}
        self.timings = {"world_model_seconds": 0.0, "real_collect_seconds": 0.0, "train_seconds": 0.0}
        self.evaluator = None
        self.checkpoint = None
        self.model_fitted = getattr(args, "world_model_path", None) is not None  # a loaded model counts as fitted

    def path(self, name):
        return os.path.join(self.dir, name)

    def add_dyna_round(self, metrics):
        """Counts a Dyna round's (or a refit's) real steps and time: the fit and its picture as world-model time."""
        self.figures["real_env_steps"] += metrics.get("new_real_steps", 0)  # SAC counts its real steps itself
        self.figures["refits"] = self.figures.get("refits", 0) + 1
        self.timings["world_model_seconds"] += metrics["seconds"] + metrics.get("figure_seconds", 0.0)
        self.timings["real_collect_seconds"] += metrics.get("collect_seconds", 0.0)
        self.writer.add_scalar("charts/real_env_steps", self.figures["real_env_steps"],
                               self.figures.get("global_step", 0))

    def summary(self, status, final=None, **extra):
        """The one summary of every script: the final evaluation's figures (the last evaluation's, marked
        `from_last_eval`, for a run that stopped before its final one), the counters, the timings and the history.
        real_return_scale, the unit of the large-gap warning: |target| where there is one, else the largest |mean
        real return| any evaluation saw."""
        ev, args = self.evaluator, self.args
        history = ev.history if ev is not None else []
        last = final or (history[-1] if history else {})
        seen = [abs(e["real_return_mean"]) for e in history + ([final] if final else [])]
        target = ev.target if ev is not None else None
        return {
            "algo": self.tag, "env_id": args.env_id, "seed": args.seed, "status": status,
            "world_model": getattr(args, "world_model", "none"),
            "real_return_mean": last.get("real_return_mean"), "real_return_std": last.get("real_return_std"),
            "real_returns": last.get("returns"), "from_last_eval": final is None and bool(history),
            "eval_episodes": getattr(args, "eval_episodes", None), **self.figures,
            "eval_env_steps": ev.env_steps if ev is not None else 0,
            "imagined_return_mean": last.get("imagined_return_mean"),
            "imagined_minus_real": last.get("imagined_minus_real"),
            "real_return_scale": abs(target) if target else (max(seen) if seen else None),
            "wall_seconds": time.time() - self.start_time, **self.timings,
            "eval_seconds": ev.seconds if ev is not None else 0.0, "target_return": target,
            "real_env_steps_to_target": ev.reached_at if ev is not None else None, "run_dir": self.dir,
            "eval_history": history, **extra,
        }

    def finish(self, final, gap_remedy=None, **extra):
        """summary.json with "status": "finished", then the last lines. Returns the summary."""
        summary = self.summary("finished", final, **(self.checkpoint() if self.checkpoint else {}), **extra)
        self.writer.close()
        finish_run(self.tag, self.dir, summary, gap_remedy or DYNA_GAP_REMEDY)
        return summary

    def __enter__(self):
        def on_sigterm(signum, frame):
            raise KeyboardInterrupt("SIGTERM")

        self._old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
        return self

    def __exit__(self, exc_type, exc, tb):
        signal.signal(signal.SIGTERM, self._old_sigterm)
        if exc_type is None or issubclass(exc_type, ArgError):
            return False
        interrupted = issubclass(exc_type, KeyboardInterrupt)
        status = "interrupted" if interrupted else "failed"
        saved = {}
        try:
            saved = self.checkpoint() if self.checkpoint else {}
        except BaseException as e:  # keep what is there; the summary says what could not be saved
            saved = {"checkpoint_error": f"{type(e).__name__}: {e}"}
        error = None if interrupted else f"{exc_type.__name__}: {exc}"
        run_io.write_json_atomic(self.path("summary.json"), self.summary(status, error=error, **saved))
        self.writer.close()
        print(f"[{self.tag}] {status}{'' if interrupted else f' ({error})'}: what the run wrote is kept in "
              f"{self.dir} (summary.json status {status!r})", flush=True)
        if interrupted:
            raise SystemExit(130) from None
        return False


def fmt(x, spec=".1f"):
    """A number for a status line; '-' until there is one (never 'nan')."""
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


DYNA_GAP_REMEDY = "Collect more real data (--real-iterations) or raise the halt rule (lower --halt-threshold)."


def finish_run(tag, run_dir, summary, gap_remedy=DYNA_GAP_REMEDY):
    """Writes summary.json, then the last lines: the final figures, a warning (with `gap_remedy`: the flags that
    help) when the policy exploits the model, and where the results are."""
    path = os.path.join(run_dir, "summary.json")
    run_io.write_json_atomic(path, summary)
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
    payload = {"format": "world-model-rl/agent", "args": run_io.json_safe(dataclasses.asdict(args)),
               "state_dicts": {k: {n: t.detach().cpu() for n, t in sd.items()} for k, sd in state_dicts.items()},
               "world_model_path": world_model_path, "extra": run_io.json_safe(extra or {})}
    return run_io.save_torch_atomic(path, payload)


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
    world_model: str = "ensemble"
    """The world model: `ensemble` (the reference MLP ensemble), `rssm` (the recurrent latent model) or your own as `path/to/file.py:attr` or
    `package.module:attr` (see world_model.py for the interface). These examples train only in imagination: the
    model-free baselines are ppo_imagined.py / sac_imagined.py --world-model none."""
    world_model_path: typing.Optional[str] = None
    """A world-model checkpoint to start from (train_world_model.py or an earlier run writes one); None fits here."""
    vector_env: typing.Literal["auto", "batched", "sync", "async"] = "auto"
    """How the imagined envs are stepped: `batched` (one model call steps all; `auto` picks it where the model
    offers it), or `sync` / `async`: gymnasium's SyncVectorEnv / AsyncVectorEnv of single imagined envs, each
    thunk loading its own copy of the model (for models that only offer a single env)."""
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
    """Evaluate in the real env at the first phase end once this many imagined steps passed since the last
    evaluation (1: after every phase; 0: only the final evaluation)."""
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


