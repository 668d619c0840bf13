# SAC with an MBPO-style learned world model, judged in the real environment (continuous actions).
#
#   python sac_imagined.py                                   # Pendulum-v1: SAC on real + branched imagined data
#   python sac_imagined.py --env-id InvertedPendulum-v5      # stops early at the env's reward_threshold (950)
#   python sac_imagined.py --world-model-path runs/<wm_run>/world_model.pt   # start from an existing world model
#   python sac_imagined.py --world-model none                # model-free baseline: plain SAC on the real env
#   python sac_imagined.py --eval-checkpoint runs/<run>/agent.pt             # replay a saved agent's final evaluation
#
# Loop (MBPO, Janner et al. 2019, in the shape of CleanRL's sac_continuous_action.py): unlike the PPO/DQN scripts,
# SAC acts in the REAL env, one step at a time, and every real transition goes to a real replay buffer. Without
# --world-model-path, the first --initial-real-steps uniform-random real transitions fit an ensemble world model.
# Every --model-rollout-every real steps, --rollout-batch-size branched rollouts start from real states drawn from
# the real replay buffer and run --imagined-horizon steps in the model (one batched WorldModelVectorEnv); their
# transitions go to a model replay buffer. Every --real-steps-per-iteration real steps the model is refit, warm and
# budgeted, on all real data. Each real step is followed by --utd-ratio SAC gradient steps on batches that mix
# --real-ratio real data with model data. With --world-model none the same file is plain SAC on the real env.
# real_env_steps counts every real transition used for learning (the world model's data included); evaluation
# episodes are reported separately as eval_env_steps.
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_utils  # noqa: E402
import world_model as wm  # noqa: E402

TAG = "sac_imagined"


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """The name of this experiment."""
    seed: int = 1
    """The seed of the experiment; torch, numpy, the real env and the world model derive theirs from it."""
    torch_deterministic: bool = True
    """If toggled, `torch.backends.cudnn.deterministic=True`."""
    cuda: bool = True
    """If toggled, cuda is used when available (the run falls back to the CPU otherwise)."""
    num_threads: int = 1
    """The number of torch CPU threads.
    One is the fastest for these small networks."""

    # Environment and world model
    env_id: str = "Pendulum-v1"
    """The id of the real Gymnasium environment (1-D Box observations, Box actions)."""
    total_timesteps: int = 5000
    """The real environment steps of the whole run, the --initial-real-steps random ones included.
    SAC acts in the real env; the imagined transitions come on top of these (the summary's imagined_steps)."""
    world_model: Literal["learned", "none"] = "learned"
    """With `learned`, SAC also trains on branched rollouts of a world model (MBPO).
    With `none`, it is plain SAC on the real env: the model-free baseline."""
    world_model_path: Optional[str] = None
    """A world_model.pt from train_world_model.py or from an earlier run to start from.
    Without it, a model is fitted on the first --initial-real-steps random real transitions."""
    initial_real_steps: int = 1000
    """The real steps taken with uniform random actions before SAC acts and learns.
    With a learned model they are also the data of its first fit."""
    real_steps_per_iteration: int = 250
    """The world model is refit (warm, budgeted) on all real data after every this many new real steps."""
    refit_passes: int = 200
    """A refit's budget: at most the minibatch updates that this many passes over the new real data take.
    Early stopping on held-out episodes may end it sooner. Higher than PPO's 20: SAC leaves the data faster,
    and with 20 the HalfCheetah-v5 model fell behind it (seed 1: real return -61.8 after 20,000; 2,453 with 200)."""
    model_rollout_every: int = 250
    """A new batch of branched rollouts is imagined after every this many real steps."""
    rollout_batch_size: int = 10000
    """The number of branched rollouts per batch, each started from a real state of the real replay buffer.
    Rollouts always start from real states, so there is no --imagined-start flag."""
    imagined_horizon: int = 1
    """The length of each branched rollout; its end is a truncation and is bootstrapped.
    MBPO starts with 1: one model step from a real state is where the model is most accurate."""
    model_retain_rollouts: int = 4
    """The model replay buffer keeps the transitions of this many rollout batches (the oldest are overwritten)."""
    halt_threshold: float = 0.0
    """The halt rule's multiplier: a step whose ensemble disagreement exceeds it ends as terminated, pessimistically.
    0 turns the rule off, the default here: short branched rollouts from real states stay close to the data."""
    real_ratio: float = 0.2
    """The fraction of real transitions in each SAC batch; the rest comes from the model replay buffer.
    MBPO uses 0.05; on HalfCheetah-v5 (20,000 real steps, seeds 1-3) 0.05 gave 2,453 / 237 / 986 and 0.2 gave
    1,071 / 3,143 / 2,379: more real data keeps the critic from following the model's errors on every seed."""
    utd_ratio: int = 10
    """The number of SAC gradient steps per real env step (update-to-data ratio).
    MBPO uses 20; 10 learns Pendulum-v1 and InvertedPendulum-v5 as fast per real step at half the compute."""

    # SAC (CleanRL names)
    hidden_size: int = 128
    """The width of the two hidden layers of the actor and the soft Q-networks.
    CleanRL uses 256; 128 is enough here and makes the SAC updates (most of the run time) 2.5x faster on a CPU."""
    gamma: float = 0.99
    """The discount factor gamma."""
    tau: float = 0.005
    """The target smoothing coefficient."""
    batch_size: int = 256
    """The batch size of each gradient step."""
    policy_lr: float = 3e-4
    """The learning rate of the policy network optimizer."""
    q_lr: float = 1e-3
    """The learning rate of the Q network optimizer."""
    policy_frequency: int = 2
    """The policy is trained every this many gradient steps, with as many actor updates then (delayed, as TD3)."""
    target_network_frequency: int = 1
    """The target networks are updated every this many gradient steps."""
    alpha: float = 0.2
    """The entropy regularization coefficient (its start value with --autotune)."""
    autotune: bool = True
    """If toggled, the entropy coefficient is tuned automatically towards the target entropy -act_dim."""

    # Evaluation in the real env
    eval_every: int = 500
    """The deterministic policy is evaluated in the real env after every this many real steps (0: only at the end)."""
    eval_episodes: int = 10
    """The number of real episodes per evaluation; the final summary statistics are over this many episodes."""
    target_return: Optional[float] = None
    """The real return that counts as solved; None means the env's `reward_threshold` (none for Pendulum-v1).
    The summary records the real steps used when an evaluation first reached it."""
    early_stop: bool = True
    """If toggled, the run stops (no more real data) once the mean real return of --stop-after-evals consecutive
    evaluations reached --target-return."""
    stop_after_evals: int = 1
    """The consecutive evaluations (fresh episodes each) whose mean return must reach --target-return to stop early."""
    eval_checkpoint: Optional[str] = None
    """A saved agent (runs/<run>/agent.pt) whose final evaluation is replayed in the real env; nothing is trained."""
    capture_video: bool = False
    """Record the final evaluation's real episodes, and one dream-vs-real video, under runs/<run>/videos/."""


make_env = rl_utils.make_env  # the real env thunk (CleanRL's make_env), shared by the scripts


class SoftQNetwork(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden_size=256):
        super().__init__()
        self.fc1 = nn.Linear(obs_dim + act_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.fc3 = nn.Linear(hidden_size, 1)

    def forward(self, x, a):
        x = torch.cat([x, a], 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x).view(-1)


LOG_STD_MAX = 2
LOG_STD_MIN = -5


class Actor(nn.Module):
    """A tanh-squashed Gaussian policy whose actions are rescaled to the bounds of the Box action space."""

    def __init__(self, obs_dim, action_space, hidden_size=256):
        super().__init__()
        act_dim = int(np.prod(action_space.shape))
        self.fc1 = nn.Linear(obs_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.fc_mean = nn.Linear(hidden_size, act_dim)
        self.fc_logstd = nn.Linear(hidden_size, act_dim)
        high, low = np.asarray(action_space.high, np.float32), np.asarray(action_space.low, np.float32)
        self.register_buffer("action_scale", torch.tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        mean = self.fc_mean(x)
        log_std = torch.tanh(self.fc_logstd(x))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)  # from [-1, 1] to [MIN, MAX]
        return mean, log_std

    def get_action(self, x):
        """Returns a sampled action (reparameterised), its log-probability (B,) and the deterministic action."""
        mean, log_std = self(x)
        normal = torch.distributions.Normal(mean, log_std.exp())
        x_t = normal.rsample()
        y_t = torch.tanh(x_t)
        action = y_t * self.action_scale + self.action_bias
        # change of variables for the tanh squashing and the rescaling
        log_prob = normal.log_prob(x_t) - torch.log(self.action_scale * (1 - y_t.pow(2)) + 1e-6)
        return action, log_prob.sum(1), torch.tanh(mean) * self.action_scale + self.action_bias


def soft_q_target(rewards, terminated, next_q1, next_q2, next_log_prob, alpha, gamma):
    """The soft Bellman target r + gamma * (1 - terminated) * (min Q'(s', a') - alpha * log pi(a'|s')).
    Only a termination cuts the bootstrap: a time-limit or rollout-horizon truncation is stored as not terminated,
    so its true final observation s' is bootstrapped."""
    next_v = torch.min(next_q1, next_q2) - alpha * next_log_prob
    return rewards + gamma * (1.0 - terminated) * next_v


def policy_fn(actor, device, deterministic):
    """obs batch (numpy or torch) -> actions as numpy; deterministic: the tanh of the mean (evaluation)."""
    @torch.no_grad()
    def act(obs):
        sampled, _, mean = actor.get_action(torch.as_tensor(obs, dtype=torch.float32, device=device))
        return (mean if deterministic else sampled).cpu().numpy()

    return act


def branched_rollouts(envs, policy, start_obs, seed):
    """MBPO's branched rollouts in one batched WorldModelVectorEnv whose time limit is the rollout horizon: row i
    starts at the real state start_obs[i] and runs until its horizon (a truncation) or a learned termination / halt
    (terminated). Returns the rows' live transitions (obs, actions, rewards, next_obs, terminated) as numpy arrays;
    the transition that NEXT_STEP autoreset produces after a row finished is never returned."""
    assert envs.max_episode_steps is not None, "branched rollouts need the horizon as the envs' time limit"
    obs, _ = envs.reset(seed=seed, options={"states": start_obs})
    obs = wm._to_numpy(obs)
    alive = np.ones(envs.num_envs, dtype=bool)
    out = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "terminated")}
    while alive.any():
        actions = policy(obs)  # the learner keeps the sampled action; it is clipped where it enters the env
        env_actions = wm.clip_action(actions, envs.single_action_space)
        if envs.output == "torch":
            env_actions = torch.as_tensor(env_actions, device=envs.device)
        next_obs, rewards, terminated, truncated, _ = envs.step(env_actions)
        next_obs, terminated, truncated = wm._to_numpy(next_obs), wm._to_numpy(terminated), wm._to_numpy(truncated)
        for key, value in (("obs", obs), ("actions", actions), ("rewards", wm._to_numpy(rewards)),
                           ("next_obs", next_obs), ("terminated", terminated)):
            out[key].append(value[alive])
        alive &= ~(terminated | truncated)
        obs = next_obs
    return {k: np.concatenate(v) for k, v in out.items()}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:
        payload = rl_utils.load_agent(args.eval_checkpoint)
        saved = payload["args"]
        obs_space, act_space, _ = rl_utils.real_env_spaces(saved["env_id"], f"{TAG}.py", actions=("Box",))
        actor = Actor(obs_space.shape[0], act_space, saved["hidden_size"])
        actor.load_state_dict(payload["state_dicts"]["actor"])
        rl_utils.replay_final_evaluation(TAG, args.eval_checkpoint, payload, policy_fn(actor, "cpu", True))
        sys.exit(0)

    # bad input: one clear line, before anything is written
    obs_space, act_space, reward_threshold = rl_utils.real_env_spaces(args.env_id, f"{TAG}.py", actions=("Box",))
    rl_utils.check_positive(args, "total_timesteps", "initial_real_steps", "real_steps_per_iteration", "refit_passes",
                            "model_rollout_every", "rollout_batch_size", "imagined_horizon", "model_retain_rollouts",
                            "utd_ratio", "batch_size", "policy_frequency", "target_network_frequency",
                            "eval_episodes", "num_threads", "hidden_size", "stop_after_evals")
    if not 0.0 <= args.real_ratio <= 1.0:
        raise rl_utils.ArgError("--real-ratio", "a fraction in [0, 1]", args.real_ratio)
    if not args.halt_threshold >= 0:
        raise rl_utils.ArgError("--halt-threshold", "a number >= 0 (0 turns the halt rule off)", args.halt_threshold)
    if args.eval_every < 0:
        raise rl_utils.ArgError("--eval-every", "an integer >= 0", args.eval_every)
    learned = args.world_model == "learned"
    if not learned and args.world_model_path is not None:
        raise rl_utils.ArgError("--world-model-path", "no checkpoint with --world-model none", args.world_model_path,
                                "Drop one of the two flags.")
    fits_here = learned and args.world_model_path is None
    if fits_here and args.total_timesteps <= args.initial_real_steps:
        raise rl_utils.ArgError("--total-timesteps", f"more than --initial-real-steps ({args.initial_real_steps})",
                                args.total_timesteps, "The first ones are random steps for the world model.")

    rl_utils.seed_everything(args.seed, args.num_threads, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    start_time = time.time()
    model, model_data, real_env_steps = None, None, 0
    timings = {"world_model_seconds": 0.0, "real_collect_seconds": 0.0, "rollout_seconds": 0.0, "train_seconds": 0.0}
    if learned:  # a checkpoint, or a fit on --initial-real-steps random real transitions
        model, model_data, real_env_steps, timings["world_model_seconds"] = rl_utils.world_model_for(args, device, TAG)
    run_name, run_dir, writer = rl_utils.start_run(args, TAG, model_free=not learned)
    try:
        obs_dim, act_dim = obs_space.shape[0], act_space.shape[0]
        actor = Actor(obs_dim, act_space, args.hidden_size).to(device)
        qf1 = SoftQNetwork(obs_dim, act_dim, args.hidden_size).to(device)
        qf2 = SoftQNetwork(obs_dim, act_dim, args.hidden_size).to(device)
        qf1_target = SoftQNetwork(obs_dim, act_dim, args.hidden_size).to(device)
        qf2_target = SoftQNetwork(obs_dim, act_dim, args.hidden_size).to(device)
        qf1_target.load_state_dict(qf1.state_dict())
        qf2_target.load_state_dict(qf2.state_dict())
        q_optimizer = optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=args.q_lr)
        actor_optimizer = optim.Adam(list(actor.parameters()), lr=args.policy_lr)
        if args.autotune:  # automatic entropy tuning
            target_entropy = -float(act_dim)
            log_alpha = torch.zeros(1, requires_grad=True, device=device)
            alpha = log_alpha.exp().item()
            a_optimizer = optim.Adam([log_alpha], lr=args.q_lr)
        else:
            alpha = args.alpha

        # The real data: the replay buffer SAC samples from, plus what the world model's TransitionBuffer also needs
        # (time-limit truncations, episode ids, reset observations). The model's initial data is real data too.
        initial = len(model_data) if model_data is not None else 0
        capacity = initial + args.total_timesteps
        rb = rl_utils.ReplayBuffer(capacity, obs_dim, act_space.shape, np.float32, seed=args.seed)
        real_truncated = np.zeros(capacity, dtype=bool)
        real_episode_ids = np.zeros(capacity, dtype=np.int64)
        real_start_obs = []
        if model_data is not None:
            rb.add(model_data.obs, model_data.actions, model_data.rewards, model_data.next_obs, model_data.terminated)
            real_truncated[:initial] = model_data.truncated
            real_episode_ids[:initial] = model_data.episode_ids
            real_start_obs.extend(model_data.start_obs)
        episode_id = int(real_episode_ids[:initial].max()) + 1 if initial else 0

        def real_transitions():
            """All real data so far as the TransitionBuffer the world model is fitted on."""
            n = rb.size
            return wm.TransitionBuffer(rb.obs[:n], rb.actions[:n], rb.rewards[:n], rb.next_obs[:n], rb.terminated[:n],
                                       real_truncated[:n], real_episode_ids[:n], np.array(real_start_obs), args.env_id)

        if learned:
            num_rollout_envs = args.rollout_batch_size
            imagined_envs = wm.make_imagined_vector_env(
                model, num_rollout_envs, horizon=args.imagined_horizon, start="buffer", halt=args.halt_threshold,
                gamma=args.gamma, output="torch" if device.type == "cuda" else "numpy")
            model_capacity = args.rollout_batch_size * args.imagined_horizon * args.model_retain_rollouts
            model_rb = rl_utils.ReplayBuffer(model_capacity, obs_dim, act_space.shape, np.float32, seed=args.seed + 1)
        explore = policy_fn(actor, device, deterministic=False)
        greedy = policy_fn(actor, device, deterministic=True)
        target = args.target_return if args.target_return is not None else reward_threshold
        evaluator = rl_utils.Evaluator(args.env_id, args.seed, args.eval_episodes, writer, target)

        # the loop: one real step, then model refits / rollouts when due, then utd_ratio SAC updates
        env = make_env(args.env_id, args.seed)()
        obs, _ = env.reset(seed=args.seed)
        real_start_obs.append(obs)
        episodic_return, episodic_length = 0.0, 0
        collected = args.initial_real_steps if fits_here else 0  # this run's real steps so far
        since_refit = since_rollout = 0
        num_updates = imagined_steps = num_rollouts = 0
        loop_start, loop_steps = time.time(), args.total_timesteps - collected
        for step in range(loop_steps):
            t0 = time.time()
            if rb.size < args.initial_real_steps:
                action = act_space.sample()
            else:
                action = explore(obs[None])[0]
            next_obs, reward, terminated, truncated, info = env.step(wm.clip_action(action, act_space))
            row = rb.size
            rb.add(obs[None], action[None], np.array([reward]), next_obs[None], np.array([terminated]))
            real_truncated[row], real_episode_ids[row] = truncated, episode_id
            real_env_steps += 1
            since_refit += 1
            since_rollout += 1
            global_step = real_env_steps
            episodic_return += float(reward)
            episodic_length += 1
            if terminated or truncated:  # the stored next_obs is the true final obs; a new episode starts
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episodic_length, global_step)
                episodic_return, episodic_length = 0.0, 0
                obs, _ = env.reset()
                real_start_obs.append(obs)
                episode_id += 1
            else:
                obs = next_obs
            timings["real_collect_seconds"] += time.time() - t0
            if rb.size < args.initial_real_steps:
                continue

            if learned and since_refit >= args.real_steps_per_iteration:
                t0 = time.time()  # a warm refit on all real data, its budget set by the new data
                model, _ = wm.refit_world_model(model, real_transitions(), since_refit, seed=args.seed + global_step,
                                                refit_passes=args.refit_passes, writer=writer, global_step=global_step)
                since_refit = 0
                timings["world_model_seconds"] += time.time() - t0
            if learned and (model_rb.size == 0 or since_rollout >= args.model_rollout_every):
                # branched rollouts from real states; a new batch overwrites the oldest in the model buffer
                t0 = time.time()
                starts = rb.obs[rb.rng.integers(0, rb.size, size=num_rollout_envs)]
                imagined = branched_rollouts(imagined_envs, explore, starts, seed=args.seed * 1_000_003 + global_step)
                model_rb.add(imagined["obs"], imagined["actions"], imagined["rewards"], imagined["next_obs"],
                             imagined["terminated"])
                imagined_steps += len(imagined["obs"])
                num_rollouts += 1
                since_rollout = 0
                timings["rollout_seconds"] += time.time() - t0
                writer.add_scalar("world_model/rollout_transitions", len(imagined["obs"]), global_step)
                writer.add_scalar("world_model/rollout_terminated_fraction", imagined["terminated"].mean(), global_step)
                writer.add_scalar("world_model/imagined_steps", imagined_steps, global_step)

            t0 = time.time()
            num_real = args.batch_size if not learned else int(round(args.real_ratio * args.batch_size))
            for _ in range(args.utd_ratio):
                num_updates += 1
                real_batch = rb.sample(num_real, device)
                if num_real < args.batch_size:
                    model_batch = model_rb.sample(args.batch_size - num_real, device)
                    real_batch = [torch.cat(pair) for pair in zip(real_batch, model_batch)]
                b_obs, b_actions, b_rewards, b_next_obs, b_terminated = real_batch
                with torch.no_grad():
                    next_actions, next_log_prob, _ = actor.get_action(b_next_obs)
                    next_q_value = soft_q_target(b_rewards, b_terminated, qf1_target(b_next_obs, next_actions),
                                                 qf2_target(b_next_obs, next_actions), next_log_prob, alpha, args.gamma)
                qf1_a_values = qf1(b_obs, b_actions)
                qf2_a_values = qf2(b_obs, b_actions)
                qf1_loss = F.mse_loss(qf1_a_values, next_q_value)
                qf2_loss = F.mse_loss(qf2_a_values, next_q_value)
                qf_loss = qf1_loss + qf2_loss
                q_optimizer.zero_grad()
                qf_loss.backward()
                q_optimizer.step()

                if num_updates % args.policy_frequency == 0:  # TD3-style delayed update, compensated in number
                    for _ in range(args.policy_frequency):
                        pi, log_pi, _ = actor.get_action(b_obs)
                        min_qf_pi = torch.min(qf1(b_obs, pi), qf2(b_obs, pi))
                        actor_loss = (alpha * log_pi - min_qf_pi).mean()
                        actor_optimizer.zero_grad()
                        actor_loss.backward()
                        actor_optimizer.step()
                        if args.autotune:  # the entropy of the same sample (as SB3 does), no second forward
                            alpha_loss = (-log_alpha.exp() * (log_pi.detach() + target_entropy)).mean()
                            a_optimizer.zero_grad()
                            alpha_loss.backward()
                            a_optimizer.step()
                            alpha = log_alpha.exp().item()

                if num_updates % args.target_network_frequency == 0:
                    with torch.no_grad():
                        for net, target_net in ((qf1, qf1_target), (qf2, qf2_target)):
                            for param, target_param in zip(net.parameters(), target_net.parameters()):
                                target_param.lerp_(param, args.tau)
            timings["train_seconds"] += time.time() - t0

            if step % 100 == 0 and num_updates >= args.policy_frequency:
                writer.add_scalar("losses/qf1_values", qf1_a_values.mean().item(), global_step)
                writer.add_scalar("losses/qf2_values", qf2_a_values.mean().item(), global_step)
                writer.add_scalar("losses/qf1_loss", qf1_loss.item(), global_step)
                writer.add_scalar("losses/qf2_loss", qf2_loss.item(), global_step)
                writer.add_scalar("losses/qf_loss", qf_loss.item() / 2.0, global_step)
                writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                writer.add_scalar("losses/alpha", alpha, global_step)
                if args.autotune:
                    writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
                writer.add_scalar("charts/SPS", int((step + 1) / (time.time() - loop_start)), global_step)
                writer.add_scalar("charts/real_env_steps", real_env_steps, global_step)

            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < loop_steps:
                entry = evaluator(greedy, global_step, real_env_steps, model=model)
                print(f"[{TAG}] step {collected + step + 1}/{args.total_timesteps} real_return "
                      f"{rl_utils.fmt(entry['real_return_mean'])} imagined_return "
                      f"{rl_utils.fmt(entry.get('imagined_return_mean'))} gap {rl_utils.fmt(evaluator.last_gap)} "
                      f"real_steps {real_env_steps} imagined_steps {imagined_steps} updates {num_updates} "
                      f"SPS {int((step + 1) / (time.time() - loop_start))}", flush=True)
                if args.early_stop and evaluator.solved(args.stop_after_evals):
                    print(f"[{TAG}] the mean return of {args.stop_after_evals} consecutive evaluations reached "
                          f"{target}: stopping", flush=True)
                    break
        env.close()

        # one save of the world model (with its real data, for later refits), the agent, the final evaluation
        model_path = None
        if learned:
            model_path = os.path.join(run_dir, "world_model.pt")
            wm.save_world_model(model, model_path, extra={"real_env_steps": real_env_steps}, buffer=real_transitions())
        agent_path = os.path.join(run_dir, "agent.pt")
        rl_utils.save_agent(agent_path, {"actor": actor.state_dict(), "qf1": qf1.state_dict(), "qf2": qf2.state_dict()},
                            args, model_path, extra={"real_env_steps": real_env_steps})
        final = evaluator(greedy, real_env_steps, real_env_steps, model=model, final=True)
        if args.capture_video:
            import visualize

            visualize.capture_videos(greedy, args.env_id, evaluator.episode_seed(0), run_dir, args.eval_episodes, model)
        seen = [abs(e["real_return_mean"]) for e in evaluator.history + [final]]
        summary = {
            "algo": TAG, "env_id": args.env_id, "seed": args.seed, "world_model": args.world_model,
            "world_model_path": model_path, "real_return_mean": final["real_return_mean"],
            "real_return_std": final["real_return_std"], "real_returns": final["returns"],
            "eval_episodes": args.eval_episodes, "real_env_steps": real_env_steps,
            "eval_env_steps": evaluator.env_steps, "imagined_steps": imagined_steps,
            "imagined_return_mean": final.get("imagined_return_mean"),
            "imagined_minus_real": final.get("imagined_minus_real"),
            "real_return_scale": reward_threshold if reward_threshold else max(seen),
            "wall_seconds": time.time() - start_time, **timings, "eval_seconds": evaluator.seconds,
            "sac_updates": num_updates, "rollout_batches": num_rollouts, "target_return": target,
            "real_env_steps_to_target": evaluator.reached_at, "agent_path": agent_path, "run_dir": run_dir,
            "eval_history": evaluator.history,
        }
        writer.close()
        # the gap is measured over whole imagined episodes, SAC learns from short branches: refits and the halt help
        rl_utils.finish_run(TAG, run_dir, summary, gap_remedy="Refit the model harder (raise --refit-passes) or "
                            "turn the halt rule on (--halt-threshold 2).")
    finally:
        rl_utils.remove_run_dir_without_summary(run_dir)
