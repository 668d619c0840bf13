# PPO trained inside a learned world model (Dyna-style), judged in the real environment.
#
#   python ppo_imagined.py                                   # trains a world model for CartPole-v1, then PPO in imagination
#   python ppo_imagined.py --world-model-path runs/<wm_run>/world_model.pt   # start from an existing world model
#   python ppo_imagined.py --world-model none                # model-free baseline: the same PPO in the real env
#   python ppo_imagined.py --eval-checkpoint runs/<run>/agent.pt             # reload a saved agent, play real episodes
#
# Loop: (without --world-model-path) collect random real transitions and fit an ensemble world model
# (train_world_model.py); then PPO iterations in imagination, where imagined episodes start from real buffer states and
# run up to the real time limit; every few iterations (--real-iterations rounds in all) collect real transitions with
# the current stochastic policy, refit the world model from its current weights and continue in imagination (Dyna).
# Every --eval-every iterations the greedy (argmax) policy plays --eval-episodes real episodes on fresh seeds; the same
# policy also plays in the model, and imagined minus real return is logged. Once every episode of --stop-after-evals
# consecutive evaluations reaches --target-return, training stops (no more real data). The summary's return is a final,
# separate evaluation of the final policy on its own seeds.
# real_env_steps counts every real transition used for learning: the data behind the world model (including the
# real steps recorded in a given checkpoint) and the Dyna data; with --world-model none, the PPO transitions.
# Evaluation episodes are reported separately as eval_env_steps.
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
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical

# The sibling modules live next to this file; make them importable when the script is run from elsewhere and in
# spawned vector-env workers (spawn copies sys.path to the children).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_world_model as twm  # noqa: E402


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

    # Environment and world model
    env_id: str = "CartPole-v1"
    """the id of the real Gymnasium environment (1-D Box observations, Discrete actions)"""
    world_model: Literal["learned", "none"] = "learned"
    """`learned`: train PPO inside a world model; `none`: model-free baseline, PPO in the real env"""
    world_model_path: Optional[str] = None
    """checkpoint from train_world_model.py; if omitted (and --world-model learned) one is trained first. Dyna refits
    start from the real transitions stored in the checkpoint (when it carries them; older ones do not, and then the
    refits see only this run's new real data)"""
    vector_mode: Literal["batched", "sync", "async"] = "batched"
    """batched: WorldModelVectorEnv (one model call per step); sync/async: Sync/AsyncVectorEnv of make_env thunks"""
    autoreset_mode: Literal["next_step", "same_step"] = "next_step"
    """Gymnasium vector autoreset mode used for the training envs (both are handled correctly)"""
    env_output: Literal["auto", "numpy", "torch"] = "auto"
    """batched imagined env output; auto: torch tensors on the GPU when cuda is used, numpy otherwise"""
    imagined_horizon: Optional[int] = None
    """trusted imagination horizon: imagined episodes are truncated (and bootstrapped) after this many steps;
    None: the real env's time limit (500 for CartPole-v1). Horizons of ~100 are too short to see the cart drift out"""
    imagined_start: Literal["buffer", "start"] = "buffer"
    """where imagined episodes start: states from the real-data buffer, or real episode start states"""

    # Dyna loop (real data)
    initial_real_steps: int = 2000
    """random-policy real transitions collected to fit the first world model (when none is given)"""
    real_iterations: int = 12
    """Dyna rounds: collect real transitions with the current policy, refit the world model, continue in imagination"""
    real_steps_per_iteration: int = 1000
    """real transitions collected per Dyna round"""
    world_model_epochs: Optional[int] = None
    """maximum epochs of each world-model (re)fit (early stopping on held-out loss); None: train_world_model's default"""
    world_model_max_seconds: Optional[float] = 30.0
    """wall-clock cap on each world-model (re)fit in seconds (None: no cap)"""

    # PPO (CleanRL names)
    total_timesteps: int = 400_000
    """PPO environment steps: imagined steps with a world model, real steps with --world-model none"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 32
    """the number of parallel environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 16
    """the number of mini-batches (16 x 256 samples: more gradient steps per imagined batch than CleanRL's 4)"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function"""
    ent_coef: float = 0.0
    """coefficient of the entropy (0: the policy is judged greedily, and an entropy bonus kept it needlessly noisy)"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""

    # Evaluation in the real env
    eval_every: int = 5
    """evaluate in the real env every this many PPO iterations (0: only at the end)"""
    eval_episodes: int = 10
    """real episodes per evaluation (the final summary statistics are over this many episodes)"""
    target_return: Optional[float] = None
    """the real return that counts as solved; None: the env's `reward_threshold` (CartPole-v1: 475). The summary
    records the real steps used when an evaluation first reached it"""
    early_stop: bool = True
    """stop (no more real data, no more training) once EVERY episode of --stop-after-evals consecutive evaluations
    reached --target-return. Asking every episode, not the mean, keeps the final evaluation (fresh episodes) above
    the target instead of stopping on a lucky evaluation of a policy that still fails now and then"""
    stop_after_evals: int = 2
    """consecutive evaluations (disjoint episode seeds) whose every episode must reach --target-return to stop early"""
    eval_checkpoint: Optional[str] = None
    """only evaluate a saved agent (runs/<run>/agent.pt) in the real env and exit"""

    # filled in at runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


def fail(field: str, expected: str, got, fix: str):
    """Stop with a short, actionable message instead of a deep traceback."""
    raise SystemExit(f"[ppo] invalid {field}: expected {expected}, got {got!r}. {fix}")


def check_args(args: Args):
    for name in ["num_envs", "num_steps", "num_minibatches", "update_epochs", "total_timesteps", "eval_episodes",
                 "num_threads", "stop_after_evals"]:
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            fail(f"--{name.replace('_', '-')}", "a positive integer", value, "Pass a value >= 1.")
    for name in ["real_iterations", "real_steps_per_iteration", "initial_real_steps", "eval_every"]:
        value = getattr(args, name)
        if value < 0:
            fail(f"--{name.replace('_', '-')}", "an integer >= 0", value, "Pass 0 to disable.")
    if args.imagined_horizon is not None and args.imagined_horizon < 1:
        fail("--imagined-horizon", "a positive integer or None", args.imagined_horizon,
             "Pass e.g. 500, or leave it unset to use the real env's time limit.")
    if not 0.0 <= args.gamma <= 1.0:
        fail("--gamma", "a discount in [0, 1]", args.gamma, "CartPole uses 0.99.")
    if not 0.0 <= args.gae_lambda <= 1.0:
        fail("--gae-lambda", "a value in [0, 1]", args.gae_lambda, "The usual value is 0.95.")
    if args.num_envs * args.num_steps < args.num_minibatches:
        fail("--num-minibatches", f"at most num_envs*num_steps={args.num_envs * args.num_steps}",
             args.num_minibatches, "Use fewer minibatches or a larger rollout.")
    if args.world_model == "none" and args.world_model_path is not None:
        fail("--world-model-path", "no path with --world-model none", args.world_model_path,
             "Drop --world-model-path for the model-free baseline, or use --world-model learned.")
    if args.world_model_path is not None and not os.path.isfile(args.world_model_path):
        fail("--world-model-path", "an existing checkpoint file written by train_world_model.py",
             args.world_model_path, "Train one with `python train_world_model.py` or omit the flag to train one here.")
    if args.world_model == "none" and args.env_output == "torch":
        fail("--env-output", "numpy (real envs return numpy)", args.env_output, "Use --env-output auto.")


def check_spaces(observation_space: gym.Space, action_space: gym.Space, where: str):
    if not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1):
        fail(f"observation space of {where}", "a 1-D gym.spaces.Box", observation_space,
             "ppo_imagined.py supports flat Box observations only; flatten the observation with a wrapper.")
    if not isinstance(action_space, gym.spaces.Discrete):
        fail(f"action space of {where}", "gym.spaces.Discrete", action_space,
             "ppo_imagined.py supports discrete actions only.")


def make_env(env_id: str, seed: int, world_model_path: Optional[str] = None,
             max_episode_steps: Optional[int] = None, start_from: Optional[str] = None):
    """CleanRL-style env thunk. With a world-model path, the model is loaded *inside* the thunk, so every vector worker
    (sync or async) owns an independent copy and no mutable model state is shared across workers."""

    def thunk():
        if world_model_path is None:
            env = gym.make(env_id)
        else:
            torch.set_num_threads(1)  # many workers share few cores
            from train_world_model import load_world_model, make_imagined_env

            model = load_world_model(world_model_path, device="cpu")
            if start_from is not None:
                model.start_from = start_from
            env = make_imagined_env(model, seed=seed, max_episode_steps=max_episode_steps)
        env.action_space.seed(seed)
        return env

    return thunk


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """CleanRL's separate actor and critic MLPs for flat observations and discrete actions."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()
        self.obs_dim, self.n_actions, self.hidden = obs_dim, n_actions, hidden
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, n_actions), std=0.01),
        )

    def get_value(self, x):
        return self.critic(x)

    def get_action_and_value(self, x, action=None):
        logits = self.actor(x)
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)

    @torch.no_grad()
    def act(self, x, deterministic: bool = True):
        logits = self.actor(x)
        return logits.argmax(-1) if deterministic else Categorical(logits=logits).sample()


def numpy_policy(agent: Agent, device: torch.device, deterministic: bool):
    """obs batch (numpy) -> actions (numpy); used for real-env data collection and evaluation."""

    def act_fn(obs):
        obs_t = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)
        return agent.act(obs_t, deterministic=deterministic).cpu().numpy()

    return act_fn


def compute_gae(rewards, values, next_values, terminated, dones, valid, gamma: float, gae_lambda: float):
    """Generalised advantage estimation on (num_steps, num_envs) tensors, correct in both autoreset modes.

    next_values[t]: V of the TRUE next observation of transition t (for a finished episode: V(final obs)).
    terminated[t]: real termination -> no bootstrap. dones[t] = terminated | truncated: the episode ends, so the
    lambda-return chain is cut there; a truncated transition still bootstraps with next_values[t].
    valid[t]: False for NEXT_STEP reset transitions (the step after a done); they get zero advantage and are
    excluded from the loss by the caller.
    Returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t].float()) - values[t]
        lastgaelam = (delta + gamma * gae_lambda * (1.0 - dones[t].float()) * lastgaelam) * valid[t].float()
        advantages[t] = lastgaelam
    return advantages, advantages + values


def stack_final_obs(final_obs, rows):
    """infos["final_obs"] is an object array (SyncVectorEnv, numpy WorldModelVectorEnv) or a full tensor (torch)."""
    if isinstance(final_obs, torch.Tensor):
        return final_obs[torch.as_tensor(rows, device=final_obs.device)]
    return np.stack([np.asarray(final_obs[i], dtype=np.float32) for i in rows])


class RolloutCollector:
    """Steps a vector env with the agent and turns the rollout into a masked PPO batch.

    Carries, across rollouts, the current observation, which rows will autoreset on the next step (NEXT_STEP mode)
    and the running episode return/length of every row."""

    def __init__(self, envs, agent: Agent, device: torch.device, gamma: float, gae_lambda: float, seed: int):
        self.envs, self.agent, self.device = envs, agent, device
        self.gamma, self.gae_lambda = gamma, gae_lambda
        mode = envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
        self.same_step = gym.vector.AutoresetMode(mode) == gym.vector.AutoresetMode.SAME_STEP
        self.num_envs = envs.num_envs
        obs, _ = envs.reset(seed=seed)
        self.obs = self._tensor(obs)
        self.torch_actions = isinstance(obs, torch.Tensor)  # torch-output envs take tensors back
        self.reset_next = torch.zeros(self.num_envs, dtype=torch.bool, device=device)
        self.ep_return = torch.zeros(self.num_envs, device=device)
        self.ep_length = torch.zeros(self.num_envs, dtype=torch.long, device=device)
        self.finished_returns, self.finished_lengths = [], []

    def _tensor(self, x, dtype=torch.float32):
        return torch.as_tensor(x, dtype=dtype, device=self.device)

    def collect(self, num_steps: int):
        n, dev = self.num_envs, self.device
        obs = torch.zeros((num_steps, n) + tuple(self.obs.shape[1:]), device=dev)
        actions = torch.zeros((num_steps, n), dtype=torch.long, device=dev)
        logprobs, rewards, values = (torch.zeros((num_steps, n), device=dev) for _ in range(3))
        terminated, dones, valid = (torch.zeros((num_steps, n), dtype=torch.bool, device=dev) for _ in range(3))
        final_values = torch.zeros((num_steps, n), device=dev)
        has_final = torch.zeros((num_steps, n), dtype=torch.bool, device=dev)
        self.finished_returns, self.finished_lengths = [], []

        for step in range(num_steps):
            obs[step] = self.obs
            # NEXT_STEP: this row's step only resets the env (action ignored) -> not a real transition
            valid[step] = ~self.reset_next
            with torch.no_grad():
                action, logprob, _, value = self.agent.get_action_and_value(self.obs)
            actions[step], logprobs[step], values[step] = action, logprob, value.flatten()

            env_action = action if self.torch_actions else action.cpu().numpy()
            next_obs, reward, term, trunc, infos = self.envs.step(env_action)
            reward = self._tensor(reward)
            term = self._tensor(term, torch.bool)
            done = term | self._tensor(trunc, torch.bool)
            rewards[step], terminated[step], dones[step] = reward, term, done

            if self.same_step and "_final_obs" in infos:
                # SAME_STEP: next_obs of a finished row is already the reset obs; bootstrap from final_obs instead
                rows = np.flatnonzero(np.asarray(torch.as_tensor(infos["_final_obs"]).cpu()))
                if len(rows):
                    final = self._tensor(stack_final_obs(infos["final_obs"], rows))
                    with torch.no_grad():
                        final_values[step, rows] = self.agent.get_value(final).flatten()
                    has_final[step, rows] = True

            # episode statistics: only real transitions count
            self.ep_return += reward * valid[step]
            self.ep_length += valid[step].long()
            if done.any():
                rows = done.nonzero().flatten()
                self.finished_returns += self.ep_return[rows].tolist()
                self.finished_lengths += self.ep_length[rows].tolist()
                self.ep_return[rows] = 0.0
                self.ep_length[rows] = 0

            self.obs = self._tensor(next_obs)
            # NEXT_STEP: next_obs of a finished row is its final obs; the following step resets it
            self.reset_next = done if not self.same_step else torch.zeros_like(done)

        with torch.no_grad():
            last_value = self.agent.get_value(self.obs).flatten()
        next_values = torch.cat([values[1:], last_value[None]], dim=0)
        next_values = torch.where(has_final, final_values, next_values)
        advantages, returns = compute_gae(rewards, values, next_values, terminated, dones, valid,
                                          self.gamma, self.gae_lambda)
        return {
            "obs": obs, "actions": actions, "logprobs": logprobs, "values": values, "rewards": rewards,
            "advantages": advantages, "returns": returns, "valid": valid, "terminated": terminated, "dones": dones,
            "next_values": next_values,
        }


def ppo_update(agent: Agent, optimizer, batch, args: Args):
    """CleanRL's clipped PPO update over the valid (non-reset) transitions only."""
    keep = batch["valid"].reshape(-1)
    b = {k: v.reshape((-1,) + tuple(v.shape[2:]))[keep] for k, v in batch.items()
         if k in ("obs", "actions", "logprobs", "values", "advantages", "returns")}
    size = b["obs"].shape[0]
    minibatch_size = max(1, size // args.num_minibatches)
    clipfracs, stats = [], {}
    approx_kl = old_approx_kl = torch.zeros(())
    v_loss = pg_loss = entropy_loss = torch.zeros(())
    for _epoch in range(args.update_epochs):
        perm = torch.randperm(size, device=b["obs"].device)
        for start in range(0, size - minibatch_size + 1, minibatch_size):
            mb = perm[start:start + minibatch_size]
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(b["obs"][mb], b["actions"][mb])
            logratio = newlogprob - b["logprobs"][mb]
            ratio = logratio.exp()
            with torch.no_grad():
                old_approx_kl = (-logratio).mean()
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())

            mb_adv = b["advantages"][mb]
            if args.norm_adv and len(mb) > 1:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg_loss = torch.max(-mb_adv * ratio,
                                -mb_adv * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()

            newvalue = newvalue.view(-1)
            if args.clip_vloss:
                v_unclipped = (newvalue - b["returns"][mb]) ** 2
                v_clipped = b["values"][mb] + torch.clamp(newvalue - b["values"][mb], -args.clip_coef, args.clip_coef)
                v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - b["returns"][mb]) ** 2).mean()
            else:
                v_loss = 0.5 * ((newvalue - b["returns"][mb]) ** 2).mean()

            entropy_loss = entropy.mean()
            loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
        if args.target_kl is not None and approx_kl > args.target_kl:
            break

    y_pred, y_true = b["values"].cpu().numpy(), b["returns"].cpu().numpy()
    var_y = np.var(y_true)
    stats["losses/value_loss"] = v_loss.item()
    stats["losses/policy_loss"] = pg_loss.item()
    stats["losses/entropy"] = entropy_loss.item()
    stats["losses/old_approx_kl"] = old_approx_kl.item()
    stats["losses/approx_kl"] = approx_kl.item()
    stats["losses/clipfrac"] = float(np.mean(clipfracs)) if clipfracs else 0.0
    stats["losses/explained_variance"] = float("nan") if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
    return stats


def save_agent(path: str, agent: Agent, args: Args, world_model_path: Optional[str], extra: Optional[dict] = None):
    """Atomic save (tmp + os.replace) of everything needed to rebuild and evaluate the agent."""
    payload = {
        "format": "ppo_imagined.agent.v1",
        "state_dict": agent.state_dict(),
        "obs_dim": agent.obs_dim, "n_actions": agent.n_actions, "hidden": agent.hidden,
        "env_id": args.env_id,
        "world_model": args.world_model,
        "world_model_path": world_model_path,
        "args": vars(args),
        **(extra or {}),
    }
    twm.save_torch_atomic(path, payload)


def load_agent(path: str, device="cpu"):
    if not os.path.isfile(path):
        fail("--eval-checkpoint", "an agent.pt file written by ppo_imagined.py", path,
             "Point it at runs/<run_name>/agent.pt.")
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # truncated or foreign file
        fail("--eval-checkpoint", "a readable torch checkpoint", path, f"The file could not be loaded ({e}).")
    if not isinstance(payload, dict) or payload.get("format") != "ppo_imagined.agent.v1":
        fail("--eval-checkpoint", "a checkpoint written by ppo_imagined.py (format ppo_imagined.agent.v1)", path,
             "World-model checkpoints go to --world-model-path; agents are saved as runs/<run>/agent.pt.")
    agent = Agent(payload["obs_dim"], payload["n_actions"], payload.get("hidden", 64)).to(device)
    agent.load_state_dict(payload["state_dict"])
    agent.eval()
    return agent, payload


def evaluate_real(agent: Agent, env_id: str, num_episodes: int, seed: int, device):
    """Deterministic (argmax) policy in the real env: the same rule for periodic and final evaluation."""
    from train_world_model import evaluate_in_real_env

    returns, lengths = evaluate_in_real_env(numpy_policy(agent, device, deterministic=True), env_id,
                                            num_episodes, seed)
    return np.asarray(returns, dtype=np.float64), np.asarray(lengths, dtype=np.int64)


def eval_seed_base(seed: int, index: int, episodes: int) -> int:
    """First episode seed of evaluation `index` (0: the final one): disjoint seed ranges for every evaluation and
    far away from the seeds used for training and data collection."""
    return 1_000_000 + seed * 100_000 + index * episodes


def eval_only(args: Args):
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    agent, payload = load_agent(args.eval_checkpoint, device)
    env_id = payload["env_id"]
    returns, lengths = evaluate_real(agent, env_id, args.eval_episodes, eval_seed_base(args.seed, 0, args.eval_episodes),
                                     device)
    result = {"checkpoint": args.eval_checkpoint, "env_id": env_id, "world_model_path": payload["world_model_path"],
              "eval_episodes": args.eval_episodes, "real_return_mean": float(returns.mean()),
              "real_return_std": float(returns.std()), "real_length_mean": float(lengths.mean())}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:
        eval_only(args)
        sys.exit(0)
    check_args(args)
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = max(1, args.total_timesteps // args.batch_size)
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
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    autoreset = {"next_step": gym.vector.AutoresetMode.NEXT_STEP,
                 "same_step": gym.vector.AutoresetMode.SAME_STEP}[args.autoreset_mode]

    try:
        real_spec_env = gym.make(args.env_id)
    except gym.error.Error as e:
        fail("--env-id", "a registered Gymnasium environment id", args.env_id, f"gym.make failed: {e}")
    check_spaces(real_spec_env.observation_space, real_spec_env.action_space, args.env_id)
    target = args.target_return
    if target is None and real_spec_env.spec is not None:
        target = real_spec_env.spec.reward_threshold  # may be None too: then no early stop
    obs_dim = int(np.prod(real_spec_env.observation_space.shape))
    n_actions = int(real_spec_env.action_space.n)
    real_spec_env.close()

    agent = Agent(obs_dim, n_actions).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    use_model = args.world_model == "learned"
    real_env_steps = 0  # real transitions used for learning (world-model data or model-free PPO steps)
    eval_env_steps = 0
    imagined_steps = 0
    model = buffer = None
    world_model_path = None
    timing = {"world_model_seconds": 0.0, "real_collect_seconds": 0.0, "eval_seconds": 0.0}  # where the wall time goes
    wm_fit_kwargs = {"max_seconds": args.world_model_max_seconds}
    if args.world_model_epochs is not None:
        wm_fit_kwargs["max_epochs"] = args.world_model_epochs

    if use_model:
        if args.world_model_path is not None:
            world_model_path = os.path.abspath(args.world_model_path)
            try:
                model = twm.load_world_model(world_model_path, device=str(device), env_id=args.env_id)
            except (OSError, ValueError) as e:  # train_world_model.py's messages already say what to do
                fail("--world-model-path", f"a world-model checkpoint for {args.env_id}", args.world_model_path, str(e))
            # the real data behind a given checkpoint counts as real steps used for learning
            real_env_steps += twm.checkpoint_real_steps(model)
            # Dyna refits extend the checkpoint's own real transitions (already counted above) with this run's new
            # data, so they keep the original data and its normalisation; None for a checkpoint without them
            buffer = model.buffer
        else:
            print(f"[ppo] collecting {args.initial_real_steps} random real transitions and fitting a world model")
            t0 = time.time()
            buffer = twm.collect_transitions(args.env_id, args.initial_real_steps, seed=args.seed)
            real_env_steps += len(buffer)
            timing["real_collect_seconds"] += time.time() - t0
            t0 = time.time()
            model, metrics = twm.fit_world_model(buffer, seed=args.seed, device=str(device), **wm_fit_kwargs)
            timing["world_model_seconds"] += time.time() - t0
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"world_model/{k}", v, 0)
            world_model_path = os.path.abspath(os.path.join(run_dir, "world_model.pt"))
            twm.save_world_model(model, world_model_path, extra={"real_env_steps": real_env_steps}, buffer=buffer)
        if hasattr(model, "start_from"):
            model.start_from = args.imagined_start
        check_spaces(model.observation_space, model.action_space, "the world model")

    def build_envs(seed: int):
        """Training vector env: imagined (batched / sync / async) or real for the model-free baseline."""
        if not use_model:
            thunks = [make_env(args.env_id, seed + i) for i in range(args.num_envs)]
            if args.vector_mode == "async":
                return gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=autoreset)
            # batched has no meaning for a real env; the in-process SyncVectorEnv is its closest analogue
            return gym.vector.SyncVectorEnv(thunks, autoreset_mode=autoreset)
        if args.vector_mode == "batched":
            output = args.env_output if args.env_output != "auto" else ("torch" if device.type == "cuda" else "numpy")
            return twm.make_imagined_vector_env(model, args.num_envs, seed=seed,
                                                max_episode_steps=args.imagined_horizon,
                                                autoreset_mode=autoreset, output=output)
        thunks = [make_env(args.env_id, seed + i, world_model_path, args.imagined_horizon, args.imagined_start)
                  for i in range(args.num_envs)]
        if args.vector_mode == "async":
            return gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=autoreset)
        return gym.vector.SyncVectorEnv(thunks, autoreset_mode=autoreset)

    envs = build_envs(args.seed)
    check_spaces(envs.single_observation_space, envs.single_action_space, "the training env")
    collector = RolloutCollector(envs, agent, device, args.gamma, args.gae_lambda, seed=args.seed)

    # Dyna schedule: the PPO iterations are split evenly around the real-data rounds
    dyna_every = max(1, args.num_iterations // (args.real_iterations + 1)) if use_model else 0
    dyna_rounds = 0
    eval_history = []
    last_real_return = float("nan")
    last_train_return = float("nan")
    reached_at = None  # real_env_steps when an evaluation first reached --target-return
    evals_at_stop = 0  # consecutive evaluations in which every episode reached --target-return
    ppo_time = 0.0
    stop = False

    def run_eval(iteration: int, global_step: int):
        global eval_env_steps, last_real_return, reached_at
        t0 = time.time()
        # every evaluation plays fresh, disjoint episode seeds (evaluate_in_real_env uses seed, seed+1, ...)
        returns, lengths = evaluate_real(agent, args.env_id, args.eval_episodes,
                                         eval_seed_base(args.seed, 1 + len(eval_history), args.eval_episodes), device)
        eval_env_steps += int(lengths.sum())
        last_real_return = float(returns.mean())
        entry = {"iteration": iteration, "global_step": global_step, "real_env_steps": real_env_steps,
                 "real_return_mean": last_real_return, "real_return_std": float(returns.std()),
                 "real_length_mean": float(lengths.mean())}
        writer.add_scalar("eval/real_episodic_return", last_real_return, global_step)
        writer.add_scalar("eval/real_episodic_length", float(lengths.mean()), global_step)
        writer.add_scalar("eval/real_env_steps", real_env_steps, global_step)
        if use_model:
            imag = twm.evaluate_in_imagination(numpy_policy(agent, device, deterministic=True), model,
                                               args.eval_episodes,
                                               eval_seed_base(args.seed, 1 + len(eval_history), args.eval_episodes),
                                               int(getattr(model, "max_episode_steps", None) or 500))
            entry["imagined_return_mean"] = float(imag.mean())
            entry["imagined_minus_real"] = float(imag.mean()) - last_real_return
            writer.add_scalar("eval/imagined_episodic_return", float(imag.mean()), global_step)
            writer.add_scalar("eval/imagined_minus_real", entry["imagined_minus_real"], global_step)
        eval_history.append(entry)
        timing["eval_seconds"] += time.time() - t0
        if reached_at is None and target is not None and last_real_return >= target:
            reached_at = real_env_steps
        return float(returns.min())

    global_step = 0
    iteration = 0
    for iteration in range(1, args.num_iterations + 1):
        t0 = time.time()
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            optimizer.param_groups[0]["lr"] = frac * args.learning_rate

        batch = collector.collect(args.num_steps)
        global_step += args.batch_size
        # NEXT_STEP reset steps are not transitions of the MDP (and never touch a real env's dynamics): not counted
        transitions = int(batch["valid"].sum())
        if use_model:
            imagined_steps += transitions
        else:
            real_env_steps += transitions
        for ret, length in zip(collector.finished_returns, collector.finished_lengths):
            writer.add_scalar("charts/episodic_return", ret, global_step)
            writer.add_scalar("charts/episodic_length", length, global_step)
        if collector.finished_returns:
            last_train_return = float(np.mean(collector.finished_returns))

        stats = ppo_update(agent, optimizer, batch, args)
        ppo_time += time.time() - t0
        sps = int(global_step / max(ppo_time, 1e-9))
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for k, v in stats.items():
            writer.add_scalar(k, v, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/real_env_steps", real_env_steps, global_step)

        if args.eval_every and iteration % args.eval_every == 0:
            worst = run_eval(iteration, global_step)
            evals_at_stop = evals_at_stop + 1 if target is not None and worst >= target else 0
            stop = args.early_stop and evals_at_stop >= args.stop_after_evals
        label = "imag_return" if use_model else "train_return"
        print(f"[ppo] iter {iteration}/{args.num_iterations} step {global_step} {label} {last_train_return:.1f} "
              f"real_return {last_real_return:.1f} real_steps {real_env_steps} SPS {sps}", flush=True)
        if stop:
            print(f"[ppo] every episode of {evals_at_stop} consecutive evaluations reached {target}: stopping early")
            break

        # Dyna: real data from the current (stochastic) policy, then refit the world model from its current weights
        if use_model and dyna_rounds < args.real_iterations and iteration % dyna_every == 0 \
                and args.real_steps_per_iteration > 0 and iteration < args.num_iterations:
            t0 = time.time()
            new = twm.collect_transitions(args.env_id, args.real_steps_per_iteration,
                                          seed=args.seed + 1000 * (dyna_rounds + 1),
                                          policy=numpy_policy(agent, device, deterministic=False))
            real_env_steps += len(new)
            buffer = new if buffer is None else buffer.extend(new)
            timing["real_collect_seconds"] += time.time() - t0
            t0 = time.time()
            model, metrics = twm.fit_world_model(buffer, model=model, seed=args.seed + dyna_rounds + 1,
                                                 **wm_fit_kwargs)
            timing["world_model_seconds"] += time.time() - t0
            if hasattr(model, "start_from"):
                model.start_from = args.imagined_start
            dyna_rounds += 1
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(f"world_model/{k}", v, global_step)
            # the refitted model belongs to this run: save it so sync/async workers (and reloads) use it
            world_model_path = os.path.abspath(os.path.join(run_dir, "world_model.pt"))
            twm.save_world_model(model, world_model_path, extra={"real_env_steps": real_env_steps}, buffer=buffer)
            print(f"[ppo] dyna round {dyna_rounds}/{args.real_iterations}: +{len(new)} real steps (total "
                  f"{real_env_steps}), world model refitted on {len(buffer)} transitions in "
                  f"{metrics.get('seconds', float('nan')):.1f}s", flush=True)
            envs.close()
            envs = build_envs(args.seed + 7919 * dyna_rounds)
            collector = RolloutCollector(envs, agent, device, args.gamma, args.gae_lambda,
                                         seed=args.seed + 7919 * dyna_rounds)
    envs.close()

    # final judgement: fresh real episodes with the final policy (deterministic argmax, like every evaluation)
    t0 = time.time()
    final_returns, final_lengths = evaluate_real(agent, args.env_id, args.eval_episodes,
                                                 eval_seed_base(args.seed, 0, args.eval_episodes), device)
    eval_env_steps += int(final_lengths.sum())
    timing["eval_seconds"] += time.time() - t0
    writer.add_scalar("eval/real_episodic_return", float(final_returns.mean()), global_step)
    writer.add_scalar("eval/real_episodic_length", float(final_lengths.mean()), global_step)
    if reached_at is None and target is not None and final_returns.mean() >= target:
        reached_at = real_env_steps
    wall_seconds = time.time() - start_time

    agent_path = os.path.join(run_dir, "agent.pt")
    save_agent(agent_path, agent, args, world_model_path)
    summary = {
        "algo": "ppo",
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
        "eval_policy": "deterministic (argmax)",
        "real_env_steps": int(real_env_steps),
        "eval_env_steps": int(eval_env_steps),
        "imagined_steps": int(imagined_steps),
        "wall_seconds": float(wall_seconds),
        "ppo_iterations": iteration,
        "dyna_rounds": dyna_rounds,
        "SPS": int(global_step / max(ppo_time, 1e-9)),
        "ppo_seconds": float(ppo_time),
        **{k: float(v) for k, v in timing.items()},
        "target_return": target,
        "real_env_steps_to_target": reached_at,
        "agent_path": os.path.abspath(agent_path),
        "eval_history": eval_history,
    }
    twm.write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    writer.close()
    print(f"[ppo] final real return {summary['real_return_mean']:.1f} +/- {summary['real_return_std']:.1f} "
          f"over {args.eval_episodes} episodes | real_env_steps {real_env_steps} | imagined_steps {imagined_steps} "
          f"| eval_env_steps {eval_env_steps} | wall {wall_seconds:.1f}s")
    print(f"[ppo] saved {agent_path}; re-evaluate with: python ppo_imagined.py --eval-checkpoint {agent_path}")
