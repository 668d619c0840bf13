# PPO trained inside a learned world model (Dyna-style), judged in the real environment (CleanRL-style single file).
#
#   python ppo_imagined.py                                   # fits a world model for CartPole-v1, then PPO in imagination
#   python ppo_imagined.py --env-id Pendulum-v1              # Box actions: Gaussian PPO
#   python ppo_imagined.py --world-model-path runs/<wm_run>/world_model.pt   # start from an existing world model
#   python ppo_imagined.py --world-model none                # model-free baseline: the same PPO in the real env
#   python ppo_imagined.py --eval-checkpoint runs/<run>/agent.pt             # replay a saved agent's final evaluation
#   torchrun --nproc_per_node 2 ppo_imagined.py --num-envs 64   # data-parallel: 2 processes of 32 envs (distributed.py)
#
# Loop: fit an ensemble world model on random real transitions (or load one), then PPO in a batched imagined vector
# env, split evenly around --real-iterations Dyna rounds (real data from the current stochastic policy + a warm refit).
# Every --eval-every iterations the deterministic policy plays real episodes (and the same episodes in the model: the
# imagined-minus-real gap). real_env_steps counts every real transition used for learning, eval_env_steps the rest.
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical
from torch.distributions.normal import Normal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distributed  # noqa: E402
import dyna  # noqa: E402
import real_env  # noqa: E402
import rl_utils as ru  # noqa: E402
import world_model  # noqa: E402


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """The name of this experiment (the run dir is runs/{env_id}__{exp_name}__{seed}__{time})."""
    seed: int = 1
    """The seed of the experiment (torch, numpy, the envs and the world model derive theirs from it)."""
    torch_deterministic: bool = True
    """If toggled, `torch.backends.cudnn.deterministic=True`."""
    cuda: bool = True
    """If toggled, cuda is used when available and --num-envs is at least --cuda-min-envs."""
    cuda_min_envs: int = 512
    """The fewest envs for which --cuda uses the GPU (0: always). With fewer, a step is a few dozen tiny kernels
    whose launches cost more than the CPU's arithmetic. Measured on an H200 machine: the default 32 envs train 2.1x
    faster per iteration on its CPU; 256 envs about as fast on either; 4,096 envs 13x faster on the GPU."""
    cuda_graph: bool = True
    """If toggled, the batched imagined env steps as one CUDA graph where it runs on a GPU (world_model_env's
    `use_cuda_graph`: a bad action or a NaN is then raised one step late); --no-cuda-graph steps it eagerly."""
    num_threads: int = 1
    """The number of torch CPU threads."""

    env_id: str = "CartPole-v1"
    """The id of the real Gymnasium environment (Discrete or 1-D Box actions)."""
    world_model: str = "ensemble"
    """The world model: `ensemble` (the reference MLP ensemble), `rssm` (the recurrent latent model, for POMDPs and
    pixels), `none` (no model: the same PPO in the real env), or your own as `path/to/file.py:attr` or `package.module:attr` (see world_model.py for the interface)."""
    world_model_path: Optional[str] = None
    """A world-model checkpoint to start from (train_world_model.py writes one).
    Without it a model is fitted on --initial-real-steps random real transitions first."""
    vector_env: Literal["auto", "batched", "sync", "async"] = "auto"
    """How the imagined envs are stepped: `batched` (one model call steps all; `auto` picks it where the model
    offers it), or `sync` / `async`: gymnasium's SyncVectorEnv / AsyncVectorEnv of single imagined envs, each
    thunk loading its own copy of the model (for models that only offer a single env)."""
    imagined_horizon: Optional[int] = None
    """Imagined episodes are truncated (and bootstrapped with V(final obs)) after this many steps.
    None: the real env's time limit for Discrete actions, 50 for Box actions (pass the time limit to get it)."""
    imagined_start: Literal["buffer", "start"] = "buffer"
    """Imagined episodes start at states of the real data (`buffer`) or at real reset states (`start`)."""
    halt_threshold: float = 2.0
    """The halt rule: an imagined step whose ensemble disagreement exceeds this multiple of its 99th percentile on real data ends the episode with the lowest possible return (0 turns it off)."""

    initial_real_steps: int = 2000
    """The random-policy real transitions the first world model is fitted on (when none is given)."""
    real_iterations: Optional[int] = None
    """The Dyna rounds: a round collects real transitions with the current stochastic policy, then refits the model.
    None: 12 for Discrete actions; for Box actions 18 where the env has a target (the run stops once solved, so the
    rounds are a cap) and 8 where it has none (Pendulum spends every round: 10,000 real steps)."""
    real_steps_per_iteration: int = 1000
    """The real transitions collected per Dyna round."""
    refit_passes: int = 20
    """A refit's budget: at most the minibatch updates that this many passes over the new real data take.
    Early stopping on held-out episodes may end it sooner."""

    total_timesteps: int = 400_000
    """The PPO environment steps: imagined ones with a world model, real ones with --world-model none."""
    learning_rate: Optional[float] = None
    """The learning rate of the optimizer (None: 2.5e-4 for Discrete actions and 3e-4 for Box actions)."""
    num_envs: int = 32
    """The number of parallel environments (under torchrun: in all, split evenly among the processes)."""
    num_steps: int = 128
    """The number of steps to run in each environment per policy rollout."""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks."""
    gamma: float = 0.99
    """The discount factor gamma."""
    gae_lambda: float = 0.95
    """The lambda for the general advantage estimation."""
    num_minibatches: Optional[int] = None
    """The number of mini-batches (None: 16 for Discrete actions and 32 for Box actions)."""
    update_epochs: Optional[int] = None
    """The K epochs to update the policy (None: 4 for Discrete actions and 10 for Box actions)."""
    norm_obs: Optional[bool] = None
    """Normalise observations by a running mean/std kept inside the agent (None: on for Box actions only).
    The statistics are saved with the agent, so evaluation uses them."""
    norm_reward: bool = True
    """Scale rewards by a running std of the discounted return, as NormalizeReward does.
    Unscaled, large returns (LunarLander's crashes, Pendulum's -16 per step) dominate the clipped gradient."""
    norm_adv: bool = True
    """Toggles advantages normalization."""
    clip_coef: float = 0.2
    """The surrogate clipping coefficient."""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function."""
    ent_coef: float = 0.0
    """The coefficient of the entropy bonus (0: the policy is judged deterministically)."""
    vf_coef: float = 0.5
    """The coefficient of the value function."""
    max_grad_norm: float = 0.5
    """The maximum norm for the gradient clipping."""
    target_kl: Optional[float] = None
    """The target KL divergence threshold."""

    eval_every: int = 20480
    """Evaluate in the real env at the first iteration end once this many PPO steps passed since the last
    evaluation (20480: every 5 iterations of 32 x 128 steps; 0: only the final evaluation)."""
    eval_episodes: int = 10
    """The real episodes per evaluation (the final summary is over this many episodes)."""
    target_return: Optional[float] = None
    """The real return that counts as solved (None: the env's reward_threshold; CartPole-v1 475, Pendulum-v1 none)."""
    early_stop: bool = True
    """Stop once the mean real return of --stop-after-evals consecutive evaluations reached --target-return."""
    stop_after_evals: int = 2
    """The consecutive evaluations (fresh episodes each) whose mean return must reach --target-return to stop early."""
    eval_checkpoint: Optional[str] = None
    """Only replay the final evaluation of a saved agent (runs/<run>/agent.pt) with its run's seed, then exit."""
    capture_video: bool = False
    """Record the final evaluation's real episodes, and one dream-vs-real video, under runs/<run>/videos/."""


# Defaults that depend on the action space, for the flags left unset (None). Box actions follow CleanRL's
# ppo_continuous_action.py: more epochs over smaller minibatches, normalised observations and rewards scaled by the
# std of the discounted return (control tasks are far from unit scale: Pendulum's rewards go down to -16 per step and
# its halt penalty to -1600). Box actions also imagine SHORT episodes (50 steps from real buffer states, truncation
# bootstrapped with V(final obs), as in MBPO/Dreamer): open-loop 1,000-step imagined episodes let continuous control
# exploit compounding model error (InvertedPendulum: imagined return ~1,000 while the real one was 58), and short ones
# keep the value's horizon without trusting long model rollouts. Box Dyna rounds: 8 (2,000 + 8 x 1,000 real steps)
# where nothing stops the run; 18 where a target stops it (InvertedPendulum seeds 1-3 with 8 rounds: 1000 / 1000 /
# 559.5, seed 3 still climbing when its rounds ran out; with 18: seed 3 reached 1000 at 13,000 real steps).
# Discrete actions keep the settings measured on CartPole (raw observations; imagined episodes up to the time limit).
# Rewards are scaled for every action space (--norm-reward): measured on CartPole seeds 1-3 it turned 500 / 415 / 500
# with 8,000 / 14,000 / 4,000 real transitions into 500 / 500 / 500 with 7,000 / 6,000 / 6,000, and LunarLander-v3
# from -876 (below a random policy's -335) into -183.
SPACE_DEFAULTS = {
    "Discrete": dict(learning_rate=2.5e-4, num_minibatches=16, update_epochs=4, norm_obs=False,
                     real_iterations=12, imagined_horizon=None),
    "Box": dict(learning_rate=3e-4, num_minibatches=32, update_epochs=10, norm_obs=True,
                real_iterations=8, imagined_horizon=50),
}
BOX_ROUNDS_WITH_TARGET = 18


def make_env(args, model_path, seed, horizon):
    """CleanRL's make_env, for imagined envs stepped one per worker (--vector-env sync|async): the thunk builds and
    loads its own copy of the world model, so that workers share nothing."""

    def thunk():
        torch.set_num_threads(1)
        model = world_model.make(args.world_model, env_id=args.env_id, seed=seed)
        model = model.load(model_path) if model_path else model
        return model.imagined_env(seed=seed, horizon=horizon, start=args.imagined_start, halt=args.halt_threshold,
                                  gamma=args.gamma)

    return thunk


class RunningMeanStd(nn.Module):
    """Running mean and variance (parallel Welford update), as buffers so that they are saved with the agent."""

    def __init__(self, shape=()):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(1e-4))

    def update(self, x, mask=None):
        """mask (rows,) of 0/1 for 1-D x: only those rows count, with no host sync (no rows: nothing changes)."""
        if mask is None:
            return self.update_moments(x.mean(0), x.var(0, unbiased=False), x.shape[0])
        n = mask.sum()
        batch_mean = (x * mask).sum() / n.clamp(min=1.0)
        self.update_moments(batch_mean, ((x - batch_mean) ** 2 * mask).sum() / n.clamp(min=1.0), n)

    def update_moments(self, batch_mean, batch_var, n):
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total)
        self.count += n


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """CleanRL's separate actor and critic MLPs. Discrete actions: a Categorical over the actor's logits. Box
    actions: a Gaussian with the actor's mean and a state-independent log-std; the log-prob is the one of the sampled
    (unclipped) action, which is clipped only where it enters an env. With norm_obs, observations are normalised by
    running statistics inside the agent, so the saved agent carries them and evaluation uses them."""

    def __init__(self, obs_dim, action_space, norm_obs=False):
        super().__init__()
        self.continuous = isinstance(action_space, gym.spaces.Box)
        out = int(np.prod(action_space.shape)) if self.continuous else int(action_space.n)
        self.norm_obs = norm_obs
        self.obs_rms = RunningMeanStd((obs_dim,))
        self.critic = nn.Sequential(layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)),
                                    nn.Tanh(), layer_init(nn.Linear(64, 1), std=1.0))
        self.actor = nn.Sequential(layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(), layer_init(nn.Linear(64, 64)),
                                   nn.Tanh(), layer_init(nn.Linear(64, out), std=0.01))
        if self.continuous:
            self.actor_logstd = nn.Parameter(torch.zeros(1, out))

    def normalize(self, x):
        if not self.norm_obs:
            return x
        return ((x - self.obs_rms.mean) / torch.sqrt(self.obs_rms.var + 1e-8)).clamp(-10.0, 10.0)

    def get_value(self, x):
        return self.critic(self.normalize(x))

    def get_action_and_value(self, x, action=None):
        x = self.normalize(x)
        out = self.actor(x)
        # validate_args=False: the checks compare on the device and read the result on the host, a sync per call
        # (two per rollout step on a GPU); NaN actions are still refused by the envs' action checks
        probs = (Normal(out, self.actor_logstd.expand_as(out).exp(), validate_args=False) if self.continuous
                 else Categorical(logits=out, validate_args=False))
        if action is None:
            action = probs.sample()
        logprob, entropy = probs.log_prob(action), probs.entropy()
        if self.continuous:
            logprob, entropy = logprob.sum(1), entropy.sum(1)
        return action, logprob, entropy, self.critic(x)

    @torch.no_grad()
    def act(self, x):
        """The deterministic policy: the mean action (Box) or the argmax (Discrete)."""
        out = self.actor(self.normalize(x))
        return out if self.continuous else out.argmax(-1)


def numpy_policy(agent, device, deterministic=True):
    """obs batch (numpy) -> actions (numpy): for real-data collection (stochastic) and evaluation (deterministic)."""

    def act_fn(obs):
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)
        with torch.no_grad():
            action = agent.act(x) if deterministic else agent.get_action_and_value(x)[0]
        return action.cpu().numpy()

    return act_fn


def gae(rewards, values, bootstrap, dones, valid, next_value, gamma, gae_lambda):
    """Generalised advantage estimation on (num_steps, num_envs) tensors with NEXT_STEP autoreset.

    dones[t]: the episode ended at step t (terminated or truncated): nothing flows back across it.
    bootstrap[t]: V(final obs) where step t was truncated and not terminated, else 0 (termination has no future).
    valid[t]: False for the NEXT_STEP reset step after a done (action ignored, reward 0): advantage 0, no target.
    next_value: V of the observation after the last step. Returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        nextnonterminal = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * (bootstrap[t] + nextnonterminal * nextvalues) - values[t]
        lastgaelam = (delta + gamma * gae_lambda * nextnonterminal * lastgaelam) * valid[t].float()
        advantages[t] = lastgaelam
    return advantages, advantages + values


def explained_variance(y_pred, y_true):
    """1 - Var[y - y_pred] / Var[y], on the device: copying 8M values to the host took 15% of an iteration there."""
    var_y, var_res = torch.var(y_true, correction=0).item(), torch.var(y_true - y_pred, correction=0).item()
    return np.nan if var_y == 0 else 1 - var_res / var_y


def check_args(args, model, ddp):
    """Every bad flag stops here with one line, before a run dir exists; fills in the action-space defaults.
    Returns (action_space, target return)."""
    _, action_space, reward_threshold = ru.real_env_spaces(args.env_id, "ppo_imagined.py")
    target = args.target_return if args.target_return is not None else reward_threshold
    space_defaults = dict(SPACE_DEFAULTS[type(action_space).__name__])
    if isinstance(action_space, gym.spaces.Box) and target is not None and args.early_stop:
        space_defaults["real_iterations"] = BOX_ROUNDS_WITH_TARGET
    for name, value in space_defaults.items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    ru.check_positive(args, "num_envs", "num_steps", "total_timesteps", "learning_rate", "num_minibatches",
                      "update_epochs", "eval_episodes", "stop_after_evals", "num_threads", "refit_passes")
    for name in ("initial_real_steps", "real_iterations", "real_steps_per_iteration", "eval_every", "halt_threshold",
                 "cuda_min_envs"):
        if getattr(args, name) < 0:
            raise ru.ArgError("--" + name.replace("_", "-"), "a number >= 0 (0 turns it off)", getattr(args, name))
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ru.ArgError("--" + name.replace("_", "-"), "a value in [0, 1]", getattr(args, name))
    if args.imagined_horizon is not None and args.imagined_horizon < 1:
        raise ru.ArgError("--imagined-horizon", "an int >= 1 or None (the real time limit)", args.imagined_horizon)
    learns = model is not None and getattr(model, "learns", True)
    if learns and args.world_model_path is None and args.initial_real_steps < 2:
        raise ru.ArgError("--initial-real-steps", "at least 2 transitions to fit a model on", args.initial_real_steps)
    ddp.check_args(args, model)  # torchrun's
    return action_space, target


def evaluate_checkpoint(path):
    """Rebuilds a saved agent (and its run's world model) and replays its run's final evaluation."""
    payload = ru.load_agent(path)
    run = payload["args"]
    model = dyna.agent_world_model(payload, path)
    obs_space = model.observation_space if model is not None else ru.real_env_spaces(run["env_id"], "ppo")[0]
    agent = Agent(obs_space.shape[0], ru.real_env_spaces(run["env_id"], "ppo_imagined.py")[1], run["norm_obs"])
    agent.load_state_dict(payload["state_dicts"]["agent"])
    return dyna.replay_final_evaluation("ppo_imagined", path, numpy_policy(agent, "cpu"), model)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:
        evaluate_checkpoint(args.eval_checkpoint)
        sys.exit(0)

    # checks: every bad flag stops here with one line, before a run dir exists
    use_cuda = args.cuda and args.num_envs >= args.cuda_min_envs
    if args.cuda and not use_cuda and torch.cuda.is_available() and os.environ.get("RANK", "0") == "0":
        print(f"[ppo] on the CPU: --num-envs {args.num_envs} < --cuda-min-envs {args.cuda_min_envs} (few envs run "
              "faster there; --cuda-min-envs 0 uses the GPU anyway)", flush=True)
    ddp = distributed.DataParallel(use_cuda)  # under torchrun: this rank; else one rank of one, doing nothing
    model = dyna.model_from_args(args, ddp.device)  # None for --world-model none; loads --world-model-path
    action_space, target = check_args(args, model, ddp)
    vector_env = dyna.vector_env_kind(args, model)
    num_iterations = max(1, args.total_timesteps // (args.num_envs * args.num_steps))
    ru.seed_everything(args.seed + ddp.rank, args.num_threads, args.torch_deterministic)
    local, device, log = ddp.rank_args(args), ddp.device, ddp.print  # local: this rank's share of the envs

    run = ru.Run(args, "ppo_imagined", model_free=model is None) if ddp.leader else distributed.Follower()
    nets = {}  # what the run saves (finished, interrupted or failed): the agent once it exists, and the model
    run.checkpoint = lambda: dyna.save_checkpoints(run, args, model, nets)
    with run:
        data, run.figures["real_env_steps"] = ddp.initial_data(model, args, run, log=lambda s: print("[ppo]", s))
        envs = dyna.make_envs(local, model, run, vector_env, device, make_env)
        obs_space = ru.check_policy_observations(envs.single_observation_space, "ppo_imagined.py", args.env_id,
                                                 args.world_model)
        agent = nets["agent"] = Agent(obs_space.shape[0], action_space, norm_obs=args.norm_obs).to(device)
        ddp.broadcast_module(agent)  # rank 0's initial weights everywhere
        optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
        return_rms = RunningMeanStd().to(device)  # for --norm-reward
        evaluator = run.evaluator = dyna.Evaluator(args.env_id, args.seed, args.eval_episodes, run.writer, target,
                                                   model) if ddp.leader else run.evaluator  # rank 0 judges
        writer, figures = run.writer, run.figures

        # rollout storage; valid: 0 for NEXT_STEP reset steps, truncs: 1 where a step truncated (not terminated)
        obs = torch.zeros((args.num_steps, local.num_envs) + obs_space.shape, device=device)
        actions = torch.zeros((args.num_steps, local.num_envs) + action_space.shape, device=device)
        logprobs, rewards, dones, valid, truncs, values = (
            torch.zeros((args.num_steps, local.num_envs), device=device) for _ in range(6))

        global_step, dyna_rounds, last_eval = 0, 0, 0
        dyna_every = max(1, num_iterations // (args.real_iterations + 1))
        next_obs, _ = envs.reset(seed=local.seed)
        torch_envs = isinstance(next_obs, torch.Tensor)  # the batched env's torch output (a GPU): actions stay there
        next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
        next_done = torch.zeros(local.num_envs, device=device)  # the row finished: its next step is a reset step
        disc_return = torch.zeros(local.num_envs, device=device)
        # per row: the running episode (return, length, 1) and the episodes finished in this iteration (their sums)
        episode, finished = (torch.zeros((3, local.num_envs), device=device) for _ in range(2))
        episode[2] = 1.0
        train_return = float("nan")
        for iteration in range(1, num_iterations + 1):
            t_iter = time.time()
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

            finished.zero_()
            for step in range(args.num_steps):  # no host sync in here: flags and statistics stay tensors
                global_step += args.num_envs
                obs[step] = next_obs
                valid[step] = 1.0 - next_done  # NEXT_STEP: this step of a finished row only resets it
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(next_obs)
                    values[step] = value.flatten()
                actions[step], logprobs[step] = action, logprob

                env_action = real_env.clip_action(action, action_space, keep_tensor=torch_envs)  # no host copy
                next_obs, reward, terminated, truncated, _ = envs.step(env_action)
                next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
                reward = torch.as_tensor(reward, dtype=torch.float32, device=device)
                terminated = torch.as_tensor(terminated, device=device).bool()
                truncated = torch.as_tensor(truncated, device=device).bool() & ~terminated
                next_done = (terminated | truncated).float()
                dones[step], truncs[step], rewards[step] = next_done, truncated.float(), reward
                if args.norm_reward:  # divide by the running std of the discounted return (per row, reset at done)
                    disc_return = disc_return * args.gamma + reward
                    return_rms.update(disc_return, mask=valid[step])
                    disc_return = disc_return * (1.0 - next_done)
                    rewards[step] = reward / torch.sqrt(return_rms.var + 1e-8)
                episode[0] += reward * valid[step]
                episode[1] += valid[step]
                finished.addcmul_(episode, next_done)  # on the device: logged once per iteration
                episode[:2] *= 1.0 - next_done
            # one transfer per iteration: the MDP's transitions (reset steps are none) and the finished episodes
            stats = torch.cat((valid.sum(dtype=torch.float64)[None], finished.sum(1, dtype=torch.float64)))
            transitions, ep_sum, len_sum, episodes = ddp.sum(stats).tolist()  # every rank's
            figures["imagined_steps" if model is not None else "real_env_steps"] += int(transitions)
            figures["global_step"], figures["ppo_iterations"] = global_step, iteration
            if episodes:
                train_return = ep_sum / episodes
                writer.add_scalar("charts/episodic_return", train_return, global_step)
                writer.add_scalar("charts/episodic_length", len_sum / episodes, global_step)

            with torch.no_grad():
                next_value = agent.get_value(next_obs).flatten()
            # NEXT_STEP returns the final obs at the truncating step and the next step acts on it: its value is
            # the next step's value (next_value after the last step), V(final obs) without another forward
            bootstrap = torch.where(truncs.bool(), torch.cat((values[1:], next_value[None])), 0.0)
            advantages, returns = gae(rewards, values, bootstrap, dones, valid, next_value, args.gamma,
                                      args.gae_lambda)

            # flatten the batch, keeping only the valid steps (never train on a NEXT_STEP reset step)
            keep = valid.reshape(-1).bool()
            b_obs = obs.reshape((-1,) + obs_space.shape)[keep]
            b_actions = actions.reshape((-1,) + action_space.shape)[keep]
            b_logprobs, b_advantages = logprobs.reshape(-1)[keep], advantages.reshape(-1)[keep]
            b_returns, b_values = returns.reshape(-1)[keep], values.reshape(-1)[keep]

            b_inds = np.arange(len(b_obs))
            minibatch_size = max(1, len(b_inds) // args.num_minibatches)
            clipfracs = []  # tensors: one host sync per iteration, not per minibatch
            for epoch in range(args.update_epochs):
                if device.type == "cpu":  # NumPy's shuffle: CPU runs reproduce the README's figures
                    np.random.shuffle(b_inds)
                    order = torch.from_numpy(b_inds)
                else:  # a GPU shuffles its own indices: on the host, 8M of them cost more than the update
                    order = torch.randperm(len(b_inds), device=device)
                # as many minibatches on every rank (np.resize's wrap-around when there are fewer rows than them)
                order = order[torch.arange(args.num_minibatches * minibatch_size, device=device) % len(b_inds)]
                for mb_inds in order.view(args.num_minibatches, minibatch_size):
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                        b_obs[mb_inds], b_actions[mb_inds] if agent.continuous else b_actions[mb_inds].long())
                    logratio = newlogprob - b_logprobs[mb_inds]
                    ratio = logratio.exp()
                    with torch.no_grad():
                        old_approx_kl = (-logratio).mean()
                        approx_kl = ((ratio - 1) - logratio).mean()
                        clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean()]

                    mb_advantages = b_advantages[mb_inds]
                    if args.norm_adv and len(mb_inds) > 1:
                        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                    pg_loss1 = -mb_advantages * ratio
                    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                    newvalue = newvalue.view(-1)
                    if args.clip_vloss:
                        v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                        v_clipped = b_values[mb_inds] + torch.clamp(newvalue - b_values[mb_inds], -args.clip_coef,
                                                                    args.clip_coef)
                        v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                    else:
                        v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                    entropy_loss = entropy.mean()
                    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                    optimizer.zero_grad()
                    loss.backward()
                    ddp.average_gradients(agent)  # the same step on every rank: the weights stay the same
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                    optimizer.step()
                if args.target_kl is not None and ddp.mean(approx_kl) > args.target_kl:
                    break
            if args.norm_obs:  # after the update, so a rollout and its update see the same statistics
                agent.obs_rms.update_moments(*ddp.batch_moments(b_obs))  # over every rank's batch
            run.timings["train_seconds"] += time.time() - t_iter

            sps = int(global_step / run.timings["train_seconds"])
            for tag, value in {"charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps,
                               "losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(),
                               "losses/entropy": entropy_loss.item(), "losses/old_approx_kl": old_approx_kl.item(),
                               "losses/approx_kl": approx_kl.item(), "losses/clipfrac": torch.stack(clipfracs).mean().item(),
                               "losses/explained_variance": explained_variance(b_values, b_returns),
                               "charts/real_env_steps": figures["real_env_steps"]}.items():
                writer.add_scalar(tag, value, global_step)

            if ru.eval_due(args.eval_every, global_step, last_eval):
                last_eval = global_step
                evaluator(numpy_policy(agent, device), global_step, figures["real_env_steps"])
            stop = ddp.agree(args.early_stop and evaluator.solved(args.stop_after_evals))  # rank 0's, for all
            log(f"[ppo] iter {iteration}/{num_iterations} step {global_step} "
                f"{'imagined_return' if model is not None else 'train_return'} {ru.fmt(train_return)} "
                f"real_return {ru.fmt(evaluator.last_real)} real_steps {figures['real_env_steps']} "
                + (f"gap {ru.fmt(evaluator.last_gap)} " if model is not None else "") + f"SPS {sps}", flush=True)
            if stop:
                log(f"[ppo] the mean return of {args.stop_after_evals} consecutive evaluations reached {target}: "
                    "stopping")
                break

            # Dyna: real data from the current stochastic policy, then a warm refit (used from the envs' next step)
            if (model is not None and getattr(model, "learns", True) and dyna_rounds < args.real_iterations and args.real_steps_per_iteration > 0
                    and iteration % dyna_every == 0 and iteration < num_iterations):
                dyna_rounds += 1
                if ddp.leader:  # rank 0 collects and refits, then shares the model
                    data, metrics = dyna.dyna_round(
                        model, data, args.env_id, numpy_policy(agent, device, deterministic=False),
                        args.real_steps_per_iteration, seed=args.seed + 1000 * dyna_rounds,
                        refit_passes=args.refit_passes, writer=writer, global_step=global_step)
                    run.add_dyna_round(metrics)
                    log(f"[ppo] dyna round {dyna_rounds}/{args.real_iterations}: +{metrics['new_real_steps']} real "
                        f"steps (total {figures['real_env_steps']}), world model refitted on {len(data)} transitions "
                        f"in {metrics['seconds']:.1f}s", flush=True)
                if ddp.share_world_model(model) or vector_env != "batched":  # stale model copies: new envs
                    envs.close()
                    envs = dyna.make_envs(local, model, run, vector_env, device, make_env)
                    next_obs = torch.as_tensor(envs.reset(seed=local.seed + iteration)[0], dtype=torch.float32,
                                               device=device)
                    next_done = torch.zeros(local.num_envs, device=device)
        envs.close()

        final = evaluator(numpy_policy(agent, device), global_step, figures["real_env_steps"], final=True)
        if args.capture_video and ddp.leader:
            import visualize

            visualize.capture_videos(numpy_policy(agent, device), args.env_id, evaluator.episode_seed(0), run.dir,
                                     args.eval_episodes, model)
        run.finish(final)
    ddp.close()
