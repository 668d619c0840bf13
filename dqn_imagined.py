# DQN trained inside a learned world model (Dyna-style), judged in the real environment (CleanRL-style single file).
#
#   python dqn_imagined.py                                   # fits a world model for CartPole-v1, then DQN in imagination
#   python dqn_imagined.py --world-model-path runs/<wm_run>/world_model.pt   # start from an existing world model
#   python dqn_imagined.py --world-model none --real-iterations 100 --real-steps-per-iteration 2000  # model-free baseline
#   python dqn_imagined.py --eval-checkpoint runs/<run>/agent.pt             # reload a saved agent, play real episodes
#
# Loop: (optionally) collect random real transitions and fit an ensemble world model; then, for each of
# --real-iterations + 1 phases: DQN in imagination for --imagined-steps-per-iteration transitions, real-env evaluation
# (every --eval-every phases; stop once --target-return is reached), then collect --real-steps-per-iteration real
# transitions with the current epsilon-greedy policy and refit the world model (warm start). With --world-model none
# every phase is --real-steps-per-iteration transitions of the very same DQN in the real env.
#
# DQN: Double DQN, Huber loss, hard target copies, a replay of imagined transitions that stores the TRUE next obs and
# drops NEXT_STEP reset steps (transitions_from_step, td_target). Pessimistic imagination (MOReL-style HALT): an
# imagined step whose ensemble disagreement is far above what the model shows on its real data is stored as terminal
# with the lowest possible value, so the agent cannot farm model errors (on CartPole it otherwise parks the cart at
# the model's clip bound, where nothing terminates, and its Q-values climb past 1/(1-gamma)).
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from gymnasium.vector import AutoresetMode

# The sibling modules live next to this file; make them importable when the script is run from elsewhere and in
# spawned vector-env workers (spawn copies sys.path to the children).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_world_model import (  # noqa: E402
    collect_transitions,
    evaluate_in_imagination,
    evaluate_in_real_env,
    checkpoint_real_steps,
    fit_world_model,
    load_world_model,
    make_imagined_env,
    make_imagined_vector_env,
    save_torch_atomic,
    save_world_model,
    write_json_atomic,
)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python, env and world-model seeds derive from it)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available (falls back to CPU otherwise)"""
    num_threads: int = 1
    """torch CPU threads (1 is fastest for these small networks and plays well with vector workers)"""
    save_model: bool = True
    """whether to save the agent to runs/{run_name}/agent.pt"""
    eval_checkpoint: Optional[str] = None
    """only evaluate a saved agent (runs/<run>/agent.pt) for --eval-episodes real episodes and exit"""

    # Environment and world model
    env_id: str = "CartPole-v1"
    """the id of the real Gymnasium environment (1-D Box observations, Discrete actions)"""
    world_model: Literal["learned", "none"] = "learned"
    """`learned`: train DQN inside a world model; `none`: model-free baseline, the same DQN in the real env"""
    world_model_path: Optional[str] = None
    """checkpoint from train_world_model.py; if omitted (and --world-model learned) one is trained first. Dyna refits
    start from the real transitions stored in the checkpoint (when it carries them; older ones do not, and then the
    refits see only this run's new real data)"""
    vector_mode: Literal["batched", "sync", "async"] = "batched"
    """batched: WorldModelVectorEnv (one model call per step); sync/async: Sync/AsyncVectorEnv of make_env thunks"""
    autoreset_mode: Literal["next_step", "same_step"] = "next_step"
    """Gymnasium vector autoreset mode used for the training envs (both are handled correctly)"""
    num_envs: int = 16
    """the number of parallel environments"""
    imagined_horizon: Optional[int] = 100
    """trusted imagination horizon: imagined episodes are truncated (and bootstrapped) after this many steps;
    None: the real env's time limit. 100 suffices for DQN: bootstrapping carries values past it, buffer starts put the
    policy's late-episode states in reach, and the HALT rule keeps it away from states the model has not seen"""
    imagined_start: Literal["buffer", "start"] = "buffer"
    """where imagined episodes start: states from the real-data buffer, or real episode start states"""
    halt_threshold: float = 2.0
    """pessimistic imagination (MOReL-style HALT): an imagined transition whose ensemble disagreement exceeds this
    multiple of the 99th percentile of the disagreement on real data is stored as terminal with the lowest possible
    value; 0 disables"""

    # Dyna loop (real data)
    initial_real_steps: int = 2000
    """random-policy real transitions collected to fit the first world model (when none is given)"""
    real_iterations: int = 12
    """Dyna rounds: collect real transitions with the current policy, refit the world model, continue in imagination
    (model-free baseline: the number of DQN phases in the real env)"""
    real_steps_per_iteration: int = 1000
    """real transitions collected per Dyna round (model-free baseline: real DQN transitions per phase)"""
    imagined_steps_per_iteration: int = 40000
    """imagined DQN transitions (over all envs) per phase, i.e. before the first and after every Dyna round"""
    collect_epsilon: float = 0.05
    """epsilon of the epsilon-greedy policy that collects real data in the Dyna rounds"""
    world_model_epochs: Optional[int] = None
    """maximum epochs of each world-model (re)fit (early stopping on held-out loss); None: train_world_model's
    default"""
    world_model_max_seconds: Optional[float] = 20.0
    """wall-clock cap on each world-model (re)fit in seconds (None: no cap)"""

    # DQN (CleanRL names)
    learning_rate: float = 2.3e-3
    """the learning rate of the optimizer"""
    buffer_size: int = 100_000
    """the replay memory buffer size"""
    reset_replay_after_refit: bool = False
    """empty the replay buffer after each world-model refit (its transitions came from the previous model)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 1.0
    """the target network update rate (1.0: hard copy)"""
    target_network_frequency: int = 128
    """the number of gradient steps between target network updates"""
    batch_size: int = 64
    """the batch size of sample from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.04
    """the ending epsilon for exploration"""
    exploration_fraction: float = 0.16
    """the fraction of all DQN transitions it takes from start-e to go end-e"""
    learning_starts: int = 1000
    """transitions in the replay memory before learning starts"""
    train_frequency: int = 16
    """vector steps between gradient phases"""
    gradient_steps: int = 64
    """gradient steps per gradient phase"""
    double_dqn: bool = True
    """Double DQN: the online network picks the next action, the target network values it"""
    loss: Literal["huber", "mse"] = "huber"
    """TD loss"""
    hidden_size: int = 256
    """width of the two hidden layers of the Q-network"""
    max_grad_norm: float = 10.0
    """the maximum norm for the gradient clipping"""

    # Evaluation in the real env
    eval_every: int = 1
    """evaluate in the real env every this many phases (the last phase is always evaluated)"""
    eval_episodes: int = 10
    """real episodes per evaluation (the final summary statistics are over this many episodes)"""
    target_return: Optional[float] = None
    """the real return that counts as solved; None: the env's `reward_threshold` (CartPole-v1: 475). The summary
    records the real steps used when an evaluation first reached it (mean over its episodes)"""
    early_stop: bool = True
    """stop (no more real data, no more training) once EVERY episode of --stop-after-evals consecutive evaluations
    reached --target-return (every episode, not the mean: a lucky evaluation of a policy that still fails now and then
    does not stop the run)"""
    stop_after_evals: int = 1
    """consecutive evaluations (disjoint episode seeds) whose every episode must reach --target-return to stop early"""


class QNetwork(nn.Module):
    """MLP Q-network for flat observations and discrete actions."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_size: int = 256):
        super().__init__()
        self.obs_dim, self.n_actions, self.hidden_size = int(obs_dim), int(n_actions), int(hidden_size)
        self.network = nn.Sequential(
            nn.Linear(self.obs_dim, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, self.n_actions),
        )

    def forward(self, x):
        return self.network(x)

    @torch.no_grad()
    def act(self, obs) -> np.ndarray:
        """Greedy actions for a batch of observations (numpy in, numpy out)."""
        device = next(self.parameters()).device
        q = self(torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device))
        return q.argmax(dim=-1).cpu().numpy()


def linear_schedule(start_e: float, end_e: float, duration: float, t: float) -> float:
    slope = (end_e - start_e) / max(duration, 1.0)
    return max(slope * t + start_e, end_e)


def td_target(rewards, next_q_target, terminated, gamma: float, next_q_online=None):
    """One-step TD target r + gamma * (1 - terminated) * Q_target(s', a*).

    next_q_target / next_q_online: (batch, n_actions) Q-values of the TRUE next observation s' (for a finished
    episode: its final observation). a* = argmax of next_q_online (Double DQN) when given, else of next_q_target.
    Only termination cuts the bootstrap: a time-limit truncation is stored with terminated=False, so it is
    bootstrapped with the value of its final observation.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    terminated = torch.as_tensor(terminated, dtype=torch.float32)
    chooser = next_q_online if next_q_online is not None else next_q_target
    next_value = next_q_target.gather(-1, chooser.argmax(dim=-1, keepdim=True)).squeeze(-1)
    return rewards + gamma * (1.0 - terminated) * next_value


def transitions_from_step(obs, actions, rewards, next_obs, terminations, truncations, infos, prev_dones, autoreset_mode,
                          halted=None, halt_target=0.0):
    """Turns one vector-env step into the transitions to store in the replay buffer.

    Returns (rows, dones): rows is a dict of arrays obs, actions, rewards, next_obs, terminated holding only the rows
    to store; dones (terminated | truncated) must be passed back as `prev_dones` on the next call (start: all False).
    - NEXT_STEP: the step after a row finished only resets that row (action ignored, reward 0, its "next obs" is the
      first obs of the new episode). It is not a transition of the MDP, so it is dropped. At the done step itself
      next_obs is the true final observation.
    - SAME_STEP: next_obs of a finished row is already the first obs of the next episode; the true final
      observation is infos["final_obs"][i] (object array with mask infos["_final_obs"]).
    `terminated` is stored as is and truncation is not stored at all, so a time-limit truncation gets bootstrapped.
    halted: optional (num_envs,) bool, transitions that left the world model's support (--halt-threshold); they are
    stored as terminal with reward r + halt_target (halt_target = gamma * the lowest value, MOReL's HALT state).
    """
    obs, next_obs = np.asarray(obs), np.asarray(next_obs)
    terminations = np.asarray(terminations, dtype=bool)
    dones = terminations | np.asarray(truncations, dtype=bool)
    real_next_obs = next_obs.copy()
    if autoreset_mode == AutoresetMode.NEXT_STEP:
        keep = ~np.asarray(prev_dones, dtype=bool)
    elif autoreset_mode == AutoresetMode.SAME_STEP:
        keep = np.ones(len(obs), dtype=bool)
        if dones.any():
            if "final_obs" not in infos:
                raise ValueError("SAME_STEP autoreset: a row finished but the step infos have no 'final_obs' entry; "
                                 "the vector env does not follow gymnasium's SAME_STEP convention.")
            for i in np.flatnonzero(np.asarray(infos.get("_final_obs", dones), dtype=bool)):
                real_next_obs[i] = np.asarray(infos["final_obs"][i])
    else:
        raise ValueError(f"autoreset_mode: expected AutoresetMode.NEXT_STEP or SAME_STEP, got {autoreset_mode!r}.")
    rewards = np.asarray(rewards, dtype=np.float32)
    if halted is not None:
        halted = np.asarray(halted, dtype=bool)
        rewards = np.where(halted, rewards + np.float32(halt_target), rewards)
        terminations = terminations | halted
    rows = dict(
        obs=obs[keep],
        actions=np.asarray(actions)[keep],
        rewards=rewards[keep],
        next_obs=real_next_obs[keep],
        terminated=terminations[keep],
    )
    return rows, dones


def step_info(infos, key, dones):
    """Per-env values of infos[key] as a float array (NaN where missing). In SAME_STEP mode SyncVectorEnv reports the
    finished rows' step info under infos["final_info"] (the top level then holds their reset info)."""
    n = len(dones)
    values = np.full(n, np.nan)
    for source in (infos, infos.get("final_info") or {}):
        if key in source:
            mask = np.asarray(source.get("_" + key, np.ones(n, dtype=bool)), dtype=bool)
            fill = mask & np.isnan(values)
            values[fill] = np.asarray(source[key], dtype=np.float64)[fill]
    return values


@torch.no_grad()
def disagreement_reference(model, quantile: float = 0.99) -> float:
    """The ensemble disagreement that counts as "inside the data": its `quantile` over the model's stored real
    states (train_world_model.py keeps a subsample of them) paired with every action."""
    obs = model.buffer_obs if len(model.buffer_obs) else model.start_obs
    values = [model.predict(obs, np.full(len(obs), a))[3] for a in range(int(model.action_space.n))]
    return float(torch.quantile(torch.cat(values).float().cpu(), quantile))


class ReplayBuffer:
    """Ring buffer of (obs, action, reward, true next obs, terminated)."""

    def __init__(self, capacity: int, obs_dim: int, seed: int):
        self.capacity, self.pos, self.size = int(capacity), 0, 0
        self.obs = np.zeros((self.capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((self.capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(self.capacity, dtype=np.int64)
        self.rewards = np.zeros(self.capacity, dtype=np.float32)
        self.terminated = np.zeros(self.capacity, dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    def add(self, obs, actions, rewards, next_obs, terminated):
        idx = (self.pos + np.arange(len(actions))) % self.capacity
        self.obs[idx], self.next_obs[idx] = obs, next_obs
        self.actions[idx], self.rewards[idx], self.terminated[idx] = actions, rewards, terminated
        self.pos = int((self.pos + len(actions)) % self.capacity)
        self.size = min(self.size + len(actions), self.capacity)

    def clear(self):
        self.pos, self.size = 0, 0

    def sample(self, batch_size: int, device):
        idx = self.rng.integers(0, self.size, size=batch_size)
        return tuple(torch.as_tensor(x[idx], device=device)
                     for x in (self.obs, self.actions, self.rewards, self.next_obs, self.terminated))


def dqn_update(q_network, target_network, optimizer, batch, args):
    """One gradient step on a replay batch; returns (loss, mean Q of the taken actions)."""
    obs, actions, rewards, next_obs, terminated = batch
    with torch.no_grad():
        next_q_online = q_network(next_obs) if args.double_dqn else None
        target = td_target(rewards, target_network(next_obs), terminated, args.gamma, next_q_online)
    q = q_network(obs).gather(1, actions.view(-1, 1)).squeeze(1)
    loss = F.smooth_l1_loss(q, target) if args.loss == "huber" else F.mse_loss(q, target)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
    optimizer.step()
    return loss.item(), q.mean().item()


def make_env(env_id: str, seed: int, world_model_path: Optional[str] = None,
             max_episode_steps: Optional[int] = None, start_from: Optional[str] = None):
    """CleanRL-style env thunk (the seed tutorial's pattern). With a world-model path the model is loaded *inside* the
    thunk, so every vector worker (sync or async) owns an independent copy and no mutable model state is shared;
    without one it makes the real env (model-free baseline)."""

    def thunk():
        if world_model_path is None:
            env = gym.make(env_id)
        else:
            torch.set_num_threads(1)  # many workers share few cores
            model = load_world_model(world_model_path, device="cpu")
            if start_from is not None:
                model.start_from = start_from
            env = make_imagined_env(model, seed=seed, max_episode_steps=max_episode_steps)
        env.action_space.seed(seed)
        return env

    return thunk


def fail(field: str, expected: str, got, fix: str):
    """Stop with a short, actionable message instead of a deep traceback."""
    raise SystemExit(f"[dqn] invalid {field}: expected {expected}, got {got!r}. {fix}")


def check_args(args: Args):
    for name in ["num_envs", "imagined_steps_per_iteration", "eval_episodes", "eval_every", "batch_size",
                 "buffer_size", "train_frequency", "hidden_size", "target_network_frequency", "num_threads",
                 "stop_after_evals"] + (["imagined_horizon"] if args.imagined_horizon is not None else []):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            fail(f"--{name.replace('_', '-')}", "a positive integer", value, "Pass a value >= 1.")
    for name in ["real_iterations", "real_steps_per_iteration", "initial_real_steps", "gradient_steps",
                 "learning_starts"]:
        value = getattr(args, name)
        if not isinstance(value, int) or value < 0:
            fail(f"--{name.replace('_', '-')}", "an integer >= 0", value, "Pass 0 to disable.")
    for name in ["collect_epsilon", "start_e", "end_e", "exploration_fraction", "tau", "gamma"]:
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            fail(f"--{name.replace('_', '-')}", "a value in [0, 1]", value, "Pass a fraction.")
    if args.world_model == "none" and (args.real_iterations < 1 or args.real_steps_per_iteration < 1):
        fail("--real-iterations/--real-steps-per-iteration", "both >= 1 with --world-model none (they set the "
             "model-free budget)", (args.real_iterations, args.real_steps_per_iteration),
             "E.g. --real-iterations 100 --real-steps-per-iteration 2000.")
    if args.world_model == "learned" and args.world_model_path is None and args.initial_real_steps < 2:
        fail("--initial-real-steps", "at least 2 random real transitions to fit the first world model",
             args.initial_real_steps, "Pass e.g. 2000, or --world-model-path to start from an existing model.")
    if args.world_model == "none" and args.world_model_path is not None:
        fail("--world-model-path", "no path with --world-model none", args.world_model_path,
             "Drop --world-model-path for the model-free baseline, or use --world-model learned.")
    if args.world_model_path is not None and not os.path.isfile(args.world_model_path):
        fail("--world-model-path", "an existing checkpoint file written by train_world_model.py",
             args.world_model_path, "Train one with `python train_world_model.py` or omit the flag to train one here.")


def check_spaces(observation_space: gym.Space, action_space: gym.Space, where: str):
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1):
        fail(f"observation space of {where}", "a 1-D gym.spaces.Box", observation_space,
             "dqn_imagined.py supports flat Box observations only; flatten the observation with a wrapper.")
    if not isinstance(action_space, gym.spaces.Discrete):
        fail(f"action space of {where}", "gym.spaces.Discrete", action_space,
             "DQN needs discrete actions; use ppo_imagined.py's sibling scripts or discretise the actions.")


def save_agent(path: str, q_network: QNetwork, args: Args, world_model_path: Optional[str]):
    """Atomic save (tmp + os.replace) of everything needed to rebuild and evaluate the agent."""
    payload = {
        "format": "dqn_imagined.agent.v1",
        "state_dict": q_network.state_dict(),
        "obs_dim": q_network.obs_dim, "n_actions": q_network.n_actions, "hidden_size": q_network.hidden_size,
        "env_id": args.env_id,
        "world_model": args.world_model,
        "world_model_path": world_model_path,
        "args": vars(args),
    }
    save_torch_atomic(path, payload)


def load_agent(path: str, device="cpu"):
    if not os.path.isfile(path):
        fail("--eval-checkpoint", "an agent.pt file written by dqn_imagined.py", path,
             "Point it at runs/<run_name>/agent.pt.")
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated or foreign file
        fail("--eval-checkpoint", "a readable torch checkpoint", path, f"The file could not be loaded ({e}).")
    if not isinstance(payload, dict) or payload.get("format") != "dqn_imagined.agent.v1":
        fail("--eval-checkpoint", "a checkpoint written by dqn_imagined.py (format dqn_imagined.agent.v1)", path,
             "World-model checkpoints go to --world-model-path; agents are saved as runs/<run>/agent.pt.")
    q_network = QNetwork(payload["obs_dim"], payload["n_actions"], payload["hidden_size"]).to(device)
    q_network.load_state_dict(payload["state_dict"])
    q_network.eval()
    return q_network, payload


def eval_only(args: Args):
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    q_network, payload = load_agent(args.eval_checkpoint, device)
    returns, lengths = evaluate_in_real_env(q_network.act, payload["env_id"], args.eval_episodes,
                                            eval_seed_base(args.seed, 0, args.eval_episodes))
    result = {"checkpoint": args.eval_checkpoint, "env_id": payload["env_id"],
              "world_model_path": payload["world_model_path"], "eval_episodes": args.eval_episodes,
              "real_return_mean": float(returns.mean()), "real_return_std": float(returns.std()),
              "real_length_mean": float(lengths.mean())}
    print(json.dumps(result, indent=2))
    return result


def eval_seed_base(seed: int, index: int, episodes: int) -> int:
    """First episode seed of evaluation `index` (0: the final one): disjoint seed ranges for every evaluation, far
    away from the seeds used for training and data collection (the same rule as ppo_imagined.py)."""
    return 1_000_000 + seed * 100_000 + index * episodes


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:
        eval_only(args)
        sys.exit(0)
    check_args(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)
    start_time = time.time()

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters",
                    "|param|value|\n|-|-|\n%s" % "\n".join([f"|{key}|{value}|" for key, value in vars(args).items()]))

    # seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.num_threads)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    autoreset = {"next_step": AutoresetMode.NEXT_STEP, "same_step": AutoresetMode.SAME_STEP}[args.autoreset_mode]

    try:
        real_spec_env = gym.make(args.env_id)
    except gym.error.Error as e:
        fail("--env-id", "a registered Gymnasium environment id", args.env_id, f"gym.make failed: {e}")
    check_spaces(real_spec_env.observation_space, real_spec_env.action_space, args.env_id)
    obs_dim = int(np.prod(real_spec_env.observation_space.shape))
    n_actions = int(real_spec_env.action_space.n)
    spec = real_spec_env.spec
    target = args.target_return if args.target_return is not None else getattr(spec, "reward_threshold", None)
    real_spec_env.close()

    use_model = args.world_model == "learned"
    real_env_steps = 0  # real transitions used for learning (world-model data, Dyna data, model-free DQN steps)
    eval_env_steps = 0
    imagined_steps = 0
    model = buffer = world_model_path = None
    timing = {"world_model_seconds": 0.0, "real_collect_seconds": 0.0, "eval_seconds": 0.0}  # where the wall time goes
    wm_fit_kwargs = {"max_seconds": args.world_model_max_seconds}
    if args.world_model_epochs is not None:
        wm_fit_kwargs["max_epochs"] = args.world_model_epochs

    if use_model:
        if args.world_model_path is not None:
            world_model_path = os.path.abspath(args.world_model_path)
            try:
                model = load_world_model(world_model_path, device="cpu", env_id=args.env_id)
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"[dqn] invalid --world-model-path: {e}") from None
            # the real data behind the checkpoint counts; Dyna refits extend the checkpoint's own real transitions
            # (already counted here) with this run's new data; None for a checkpoint saved without them
            real_env_steps += checkpoint_real_steps(model)
            buffer = model.buffer
        else:
            print(f"[dqn] collecting {args.initial_real_steps} random real transitions and fitting a world model")
            t0 = time.time()
            buffer = collect_transitions(args.env_id, args.initial_real_steps, seed=args.seed)
            real_env_steps += len(buffer)
            timing["real_collect_seconds"] += time.time() - t0
            t0 = time.time()
            model, metrics = fit_world_model(buffer, seed=args.seed, **wm_fit_kwargs)
            timing["world_model_seconds"] += time.time() - t0
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"world_model/{k}", v, 0)
        if world_model_path is None or args.real_iterations > 0:
            # the (re)fitted model belongs to this run: sync/async workers load it from here, reloads find it here
            world_model_path = os.path.abspath(os.path.join(run_dir, "world_model.pt"))
            save_world_model(model, world_model_path, extra={"real_env_steps": real_env_steps}, buffer=buffer)
        model.start_from = args.imagined_start
        check_spaces(model.observation_space, model.action_space, "the world model")

    def halt_setup():
        """(disagreement threshold, gamma * V_min) for pessimistic imagination, refreshed after every (re)fit.
        V_min = min(0, lowest reward) / (1 - gamma) bounds every return from below: on CartPole (rewards 1) it is 0,
        so a HALT costs exactly what a termination costs; with negative rewards it is strictly worse than any
        termination, so the agent is never drawn to the unknown."""
        if not use_model or args.halt_threshold <= 0:
            return None, 0.0
        # lowest real reward: from this run's data, else the model's reward bound (the checkpoint has no data)
        r_min = float(buffer.rewards.min()) if buffer is not None else float(getattr(model, "reward_clip", [0.0])[0])
        return args.halt_threshold * disagreement_reference(model), args.gamma * min(0.0, r_min) / (1.0 - args.gamma)

    halt_threshold, halt_target = halt_setup()

    def build_envs(seed: int):
        """Training vector env (imagined batched/sync/async, or real for the baseline) with episode statistics."""
        if not use_model:
            thunks = [make_env(args.env_id, seed + i) for i in range(args.num_envs)]
        elif args.vector_mode == "batched":
            envs = make_imagined_vector_env(model, args.num_envs, seed=seed, max_episode_steps=args.imagined_horizon,
                                            autoreset_mode=autoreset)
            return gym.wrappers.vector.RecordEpisodeStatistics(envs)
        else:
            thunks = [make_env(args.env_id, seed + i, world_model_path, args.imagined_horizon, args.imagined_start)
                      for i in range(args.num_envs)]
        if args.vector_mode == "async":
            envs = gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=autoreset)
        else:  # a real env has no batched model to call: `batched` means the in-process SyncVectorEnv there
            envs = gym.vector.SyncVectorEnv(thunks, autoreset_mode=autoreset)
        return gym.wrappers.vector.RecordEpisodeStatistics(envs)

    q_network = QNetwork(obs_dim, n_actions, args.hidden_size).to(device)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    target_network = QNetwork(obs_dim, n_actions, args.hidden_size).to(device)
    target_network.load_state_dict(q_network.state_dict())
    rb = ReplayBuffer(args.buffer_size, obs_dim, args.seed)

    num_phases = args.real_iterations + 1 if use_model else args.real_iterations
    phase_transitions = args.imagined_steps_per_iteration if use_model else args.real_steps_per_iteration
    vector_steps = max(1, phase_transitions // args.num_envs)
    total_transitions = num_phases * vector_steps * args.num_envs
    global_step = grad_steps = dyna_rounds = 0
    train_time = 0.0
    epsilon = args.start_e
    last_real_return = last_train_return = float("nan")
    reached_at = None  # real_env_steps when an evaluation first reached --target-return
    evals_at_stop = 0  # consecutive evaluations in which every episode reached --target-return
    eval_history = []

    def epsilon_greedy(obs, eps, generator):
        actions = q_network.act(obs)
        explore = generator.random(len(actions)) < eps
        actions[explore] = generator.integers(0, n_actions, size=int(explore.sum()))
        return actions

    def run_eval(phase: int):
        """Greedy policy on fresh real episodes (+ the same policy in the world model); returns the WORST return."""
        global eval_env_steps, last_real_return, reached_at
        t0 = time.time()
        seed_base = eval_seed_base(args.seed, 1 + len(eval_history), args.eval_episodes)
        returns, lengths = evaluate_in_real_env(q_network.act, args.env_id, args.eval_episodes, seed_base)
        eval_env_steps += int(lengths.sum())
        last_real_return = float(returns.mean())
        entry = {"phase": phase, "global_step": global_step, "real_env_steps": real_env_steps,
                 "real_return_mean": last_real_return, "real_return_std": float(returns.std()),
                 "real_length_mean": float(lengths.mean())}
        writer.add_scalar("eval/real_episodic_return", last_real_return, global_step)
        writer.add_scalar("eval/real_episodic_length", float(lengths.mean()), global_step)
        writer.add_scalar("eval/real_env_steps", real_env_steps, global_step)
        if use_model:
            imag = evaluate_in_imagination(q_network.act, model, args.eval_episodes, seed_base,
                                           int(model.max_episode_steps or 500))
            entry["imagined_return_mean"] = float(imag.mean())
            entry["imagined_minus_real"] = float(imag.mean()) - last_real_return
            writer.add_scalar("eval/imagined_episodic_return", float(imag.mean()), global_step)
            writer.add_scalar("eval/imagined_minus_real", entry["imagined_minus_real"], global_step)
        eval_history.append(entry)
        timing["eval_seconds"] += time.time() - t0
        if reached_at is None and target is not None and last_real_return >= target:
            reached_at = real_env_steps
        return float(returns.min())

    envs = build_envs(args.seed)
    check_spaces(envs.single_observation_space, envs.single_action_space, "the training env")
    obs, _ = envs.reset(seed=args.seed)
    prev_dones = np.zeros(args.num_envs, dtype=bool)
    phase = 0
    for phase in range(1, num_phases + 1):
        # --- DQN: imagined transitions (or real ones for the baseline) into the replay buffer, one update per step
        t0 = time.time()
        finished, num_halted, stored = [], 0, 0
        for _ in range(vector_steps):
            epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * total_transitions,
                                      global_step)
            actions = epsilon_greedy(obs, epsilon, rng)
            next_obs, rewards, terminations, truncations, infos = envs.step(actions)
            global_step += args.num_envs
            if "episode" in infos:
                for i in np.flatnonzero(infos["_episode"]):
                    finished.append(float(infos["episode"]["r"][i]))
                    writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
                    writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)
            halted = None
            if halt_threshold is not None:
                # NaN (no disagreement reported) compares False: such rows are never halted
                halted = step_info(infos, "disagreement", terminations | truncations) > halt_threshold
                counted = halted & ~prev_dones if autoreset == AutoresetMode.NEXT_STEP else halted  # stored rows only
                num_halted += int(counted.sum())
            rows, prev_dones = transitions_from_step(obs, actions, rewards, next_obs, terminations, truncations,
                                                     infos, prev_dones, autoreset, halted, halt_target)
            rb.add(**rows)
            stored += len(rows["actions"])
            obs = next_obs

            if rb.size >= max(args.learning_starts, args.batch_size) and \
                    (global_step // args.num_envs) % args.train_frequency == 0:
                for _ in range(args.gradient_steps):
                    loss, q_mean = dqn_update(q_network, target_network, optimizer,
                                              rb.sample(args.batch_size, device), args)
                    grad_steps += 1
                    if grad_steps % args.target_network_frequency == 0:
                        for tp, p in zip(target_network.parameters(), q_network.parameters()):
                            tp.data.copy_(args.tau * p.data + (1.0 - args.tau) * tp.data)
                if grad_steps % 100 < args.gradient_steps:
                    writer.add_scalar("losses/td_loss", loss, global_step)
                    writer.add_scalar("losses/q_values", q_mean, global_step)
                    writer.add_scalar("charts/epsilon", epsilon, global_step)
        train_time += time.time() - t0
        # NEXT_STEP reset steps are not transitions of the MDP (a real env only resets there): not counted
        if use_model:
            writer.add_scalar("charts/halted_fraction", num_halted / max(stored, 1), global_step)
            imagined_steps += stored
        else:
            real_env_steps += stored
        if finished:
            last_train_return = float(np.mean(finished))
        sps = int(global_step / max(train_time, 1e-9))
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/real_env_steps", real_env_steps, global_step)

        # --- real-env evaluation (its transitions are never used for learning)
        stop = False
        if phase % args.eval_every == 0 or phase == num_phases:
            worst = run_eval(phase)
            evals_at_stop = evals_at_stop + 1 if target is not None and worst >= target else 0
            stop = args.early_stop and evals_at_stop >= args.stop_after_evals
        label = "imag_return" if use_model else "train_return"
        halt = f" halted {num_halted / max(stored, 1):.3f}" if halt_threshold is not None else ""
        print(f"[dqn] iter {phase}/{num_phases} step {global_step} {label} {last_train_return:.1f} "
              f"real_return {last_real_return:.1f} eps {epsilon:.2f}{halt} real_steps {real_env_steps} SPS {sps}",
              flush=True)
        if stop:
            print(f"[dqn] every episode of {evals_at_stop} consecutive evaluation(s) reached {target}: stopping early")
            break

        # --- Dyna: real data from the current epsilon-greedy policy, then refit the world model from its weights
        if use_model and phase <= args.real_iterations and args.real_steps_per_iteration > 0:
            t0 = time.time()
            collect_rng = np.random.default_rng(args.seed * 7_919 + phase)
            new = collect_transitions(args.env_id, args.real_steps_per_iteration, seed=args.seed + 1_000 * phase,
                                      policy=lambda o: epsilon_greedy(o, args.collect_epsilon, collect_rng))
            real_env_steps += len(new)
            buffer = new if buffer is None else buffer.extend(new)
            timing["real_collect_seconds"] += time.time() - t0
            t0 = time.time()
            model, metrics = fit_world_model(buffer, model=model, seed=args.seed + phase, **wm_fit_kwargs)
            timing["world_model_seconds"] += time.time() - t0
            model.start_from = args.imagined_start
            halt_threshold, halt_target = halt_setup()
            dyna_rounds += 1
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"world_model/{k}", v, global_step)
            save_world_model(model, world_model_path, extra={"real_env_steps": real_env_steps}, buffer=buffer)
            if args.reset_replay_after_refit:
                rb.clear()
            # sync/async workers hold their own copy of the old model: rebuild the env so they load the refit one
            envs.close()
            envs = build_envs(args.seed + 7_919 * phase)
            obs, _ = envs.reset(seed=args.seed + 7_919 * phase)
            prev_dones = np.zeros(args.num_envs, dtype=bool)
    envs.close()

    # --- final judgement: fresh real episodes with the final greedy policy (the same rule as every evaluation)
    t0 = time.time()
    final_returns, final_lengths = evaluate_in_real_env(q_network.act, args.env_id, args.eval_episodes,
                                                        eval_seed_base(args.seed, 0, args.eval_episodes))
    eval_env_steps += int(final_lengths.sum())
    timing["eval_seconds"] += time.time() - t0
    writer.add_scalar("eval/real_episodic_return", float(final_returns.mean()), global_step)
    writer.add_scalar("eval/real_episodic_length", float(final_lengths.mean()), global_step)
    if reached_at is None and target is not None and final_returns.mean() >= target:
        reached_at = real_env_steps
    wall_seconds = time.time() - start_time

    agent_path = os.path.abspath(os.path.join(run_dir, "agent.pt"))
    if args.save_model:
        save_agent(agent_path, q_network, args, world_model_path)
    summary = {
        "algo": "dqn",
        "env_id": args.env_id,
        "seed": args.seed,
        "world_model": args.world_model,
        "world_model_path": world_model_path,
        "vector_mode": args.vector_mode,
        "autoreset_mode": args.autoreset_mode,
        "real_return_mean": float(final_returns.mean()),
        "real_return_std": float(final_returns.std()),
        "real_length_mean": float(final_lengths.mean()),
        "real_returns": final_returns.tolist(),
        "eval_episodes": args.eval_episodes,
        "eval_policy": "greedy (argmax Q) of the final network",
        "real_env_steps": int(real_env_steps),
        "eval_env_steps": int(eval_env_steps),
        "imagined_steps": int(imagined_steps),
        "wall_seconds": float(wall_seconds),
        "dqn_phases": phase,
        "dyna_rounds": dyna_rounds,
        "gradient_steps": grad_steps,
        "SPS": int(global_step / max(train_time, 1e-9)),
        "dqn_seconds": float(train_time),
        **{k: float(v) for k, v in timing.items()},
        "halt_threshold": halt_threshold,
        "target_return": target,
        "real_env_steps_to_target": reached_at,
        "agent_path": agent_path if args.save_model else None,
        "eval_history": eval_history,
    }
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    writer.close()
    print(f"[dqn] final real return {summary['real_return_mean']:.1f} +/- {summary['real_return_std']:.1f} "
          f"over {args.eval_episodes} episodes | real_env_steps {real_env_steps} | imagined_steps {imagined_steps} "
          f"| eval_env_steps {eval_env_steps} | wall {wall_seconds:.1f}s")
    if args.save_model:
        print(f"[dqn] saved {agent_path}; re-evaluate with: python dqn_imagined.py --eval-checkpoint {agent_path}")
