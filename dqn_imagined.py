"""Double DQN with n-step targets trained inside a learned world model (Dyna-style), judged in the real env
(CleanRL-style single file).

    python dqn_imagined.py                                         # CartPole-v1: fit a world model, DQN in imagination
    python dqn_imagined.py --env-id Acrobot-v1
    python dqn_imagined.py --world-model-path runs/<run>/world_model.pt    # start from an existing world model
    python dqn_imagined.py --world-model none --total-timesteps 500000     # model-free baseline in the real env
    python dqn_imagined.py --world-model examples/cartpole_physics.py:CartPolePhysics   # your own world model
    python dqn_imagined.py --eval-checkpoint runs/<run>/agent.pt           # replay a run's final evaluation

The learner's budget, --total-timesteps, is split into --real-iterations + 1 equal phases. A phase is DQN on imagined
steps (real ones with --world-model none), then an evaluation in the real env (when --eval-every learner steps
passed), then a Dyna round: real transitions from the epsilon-greedy policy and a warm refit of the world model.
Imagined steps that leave the region the model knows end as terminations with the lowest possible value (the world
model's halt rule, --halt-threshold). real_env_steps counts every real transition used for learning.
"""
import collections
import os
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling modules, from any cwd
import dyna  # noqa: E402
import real_env  # noqa: E402
import rl_utils as ru  # noqa: E402
import world_model  # noqa: E402


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """The name of this experiment (the run dir is runs/{env_id}__{exp_name}__{seed}__{time})."""
    seed: int = 1
    """The seed of the experiment; every other seed (envs, world model, evaluation episodes) derives from it."""
    torch_deterministic: bool = True
    """If toggled, `torch.backends.cudnn.deterministic=True`."""
    cuda: bool = True
    """If toggled, cuda is used when it is available."""
    num_threads: int = 1
    """The number of torch CPU threads.
    One is the fastest for these small networks."""
    eval_checkpoint: Optional[str] = None
    """Only replay the final evaluation of a saved agent (runs/<run>/agent.pt) with its run's seed, then exit."""
    capture_video: bool = False
    """Record the final evaluation's real episodes, and one dream-vs-real video, under runs/<run>/videos/."""

    # Environment, world model and the Dyna loop
    env_id: str = "CartPole-v1"
    """The id of the real Gymnasium environment (Discrete actions)."""
    total_timesteps: int = 520_000
    """The learner's env steps: imagined ones with a world model, real ones with --world-model none.
    They are split into --real-iterations + 1 equal phases, with --num-envs steps per vector step."""
    world_model: str = "ensemble"
    """The world model: `ensemble` (the reference MLP ensemble), `rssm` (the recurrent latent model, for POMDPs and
    pixels), `none` (no model: the same DQN in the real env), or your own as `path/to/file.py:attr` or `package.module:attr` (see world_model.py for the interface)."""
    world_model_path: Optional[str] = None
    """A world-model checkpoint (train_world_model.py or an earlier run) to start from.
    Without it a model is fitted on --initial-real-steps random real transitions."""
    vector_env: Literal["auto", "batched", "sync", "async"] = "auto"
    """How the imagined envs are stepped: `batched` (one model call steps all; `auto` picks it where the model
    offers it), or `sync` / `async`: gymnasium's SyncVectorEnv / AsyncVectorEnv of single imagined envs, each
    thunk loading its own copy of the model (for models that only offer a single env)."""
    initial_real_steps: int = 2000
    """Random-policy real transitions for the first world model (when no --world-model-path is given)."""
    initial_action_repeat: int = 4
    """When the --initial-real-steps uniform random steps end no episode in a termination, the first model could
    predict no ending (Acrobot-v1: per-step noise never swings the tip up). --initial-real-steps more random steps
    are then taken, each drawn action held for this many steps: held actions explore further. They are real steps
    and count as such. 1 turns this off."""
    real_iterations: int = 12
    """The number of Dyna rounds: real data from the current policy, then a warm refit of the world model.
    With --world-model none there are no rounds, but the phases (and evaluations) stay the same."""
    real_steps_per_iteration: int = 1000
    """Real transitions collected in each Dyna round."""
    refit_passes: int = 200
    """A refit's budget: at most the minibatch updates that this many passes over the new real data take.
    Early stopping on held-out episodes may end it sooner. On Acrobot-v1 20 let the model fall behind the policy."""
    collect_epsilon: float = 0.05
    """The epsilon of the epsilon-greedy policy that collects the real data of the Dyna rounds."""
    imagined_horizon: int = 100
    """Imagined episodes are truncated (and bootstrapped) after this many steps.
    Bootstrapping carries values past it, and buffer start states put late-episode states within reach."""
    imagined_start: Literal["buffer", "start"] = "buffer"
    """Imagined episodes start from real states of the data (`buffer`) or from real reset states (`start`)."""
    halt_threshold: float = 2.0
    """The halt rule: an imagined step whose ensemble disagreement exceeds this multiple of its 99th percentile on real data ends the episode.
    It ends as a termination with the lowest possible value; 0 turns the rule off."""

    # DQN
    num_envs: int = 16
    """The number of parallel (imagined) environments."""
    learning_rate: float = 2.3e-3
    """The learning rate of the optimizer."""
    buffer_size: int = 100_000
    """The replay memory buffer size."""
    gamma: float = 0.99
    """The discount factor gamma."""
    n_step: int = 3
    """Multi-step TD targets over this many steps (1: CleanRL's one-step target), cut where the episode ends.
    They carry reward back n steps per update, across Acrobot's long swing-up and CartPole's ~100-step values."""
    tau: float = 1.0
    """The target network update rate (1.0 is a hard copy)."""
    target_network_frequency: int = 128
    """The number of gradient steps between target network updates."""
    batch_size: int = 64
    """The batch size of a sample from the replay memory."""
    start_e: float = 1.0
    """The starting epsilon for exploration."""
    end_e: float = 0.04
    """The ending epsilon for exploration."""
    exploration_fraction: float = 0.16
    """The fraction of --total-timesteps it takes to go from start-e to end-e."""
    learning_starts: int = 1000
    """Transitions in the replay memory before learning starts."""
    train_frequency: int = 16
    """The number of vector steps between gradient phases."""
    gradient_steps: int = 64
    """The number of gradient steps in each gradient phase."""
    hidden_size: int = 256
    """The width of the two hidden layers of the Q-network."""
    max_grad_norm: float = 10.0
    """The maximum norm for the gradient clipping."""

    # Evaluation in the real env
    eval_every: int = 1
    """Evaluate in the real env at the first phase end once this many learner steps (the unit of --total-timesteps)
    passed since the last evaluation (1: after every phase; 0: only the final evaluation)."""
    eval_episodes: int = 10
    """Real episodes per evaluation; the final figures are over this many episodes."""
    target_return: Optional[float] = None
    """The real return that counts as solved (default: the env's reward_threshold, 475 for CartPole-v1)."""
    early_stop: bool = True
    """Stop (no more real data, no more training) once the mean real return of --stop-after-evals consecutive
    evaluations reached --target-return."""
    stop_after_evals: int = 1
    """The consecutive evaluations (fresh episodes each) whose mean return must reach --target-return to stop early."""


# Terminations are weighted by the full negative/positive ratio in the model's loss (the other scripts: its square
# root). A greedy DQN only reaches a goal the model predicts: on Acrobot, with 2-4 goals in 4,000 steps, the
# square root left the goal unpredicted and seeds 2 and 3 at -500 for 10,000 real transitions or more.
TERMINATION_POS_WEIGHT = "ratio"


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


class QNetwork(nn.Module):
    def __init__(self, obs_dim, n_actions, hidden_size=256):
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(obs_dim, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, n_actions),
        )

    def forward(self, x):
        return self.network(x)

    @torch.no_grad()
    def act(self, obs, epsilon=0.0, rng=None):
        """Epsilon-greedy actions for a batch of observations (numpy in, numpy out); greedy for epsilon 0."""
        q_values = self(torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=next(self.parameters()).device))
        actions = q_values.argmax(dim=1).cpu().numpy()
        if epsilon > 0:
            explore = rng.random(len(actions)) < epsilon
            actions[explore] = rng.integers(0, q_values.shape[1], size=int(explore.sum()))
        return actions


def linear_schedule(start_e: float, end_e: float, duration: int, t: int):
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def n_step_rows(window, gamma):
    """The multi-step transitions that start at the oldest vector step in `window` (a deque of (obs, actions,
    rewards, next_obs, terminations, truncations, valid) per vector step). Per row: the discounted reward sum up to
    the step where its episode ended (terminated or truncated) or the window does, and next_obs, terminated and
    gamma**steps of that step. Rows that were NEXT_STEP reset steps at the oldest step are left out."""
    obs, actions, _, _, _, _, valid = window[0]
    rewards, discounts = np.zeros(len(obs), np.float32), np.ones(len(obs), np.float32)
    next_obs, terminated, running = np.zeros_like(obs), np.zeros(len(obs), bool), np.ones(len(obs), bool)
    for _, _, r, nxt, term, trunc, _ in window:
        rewards[running] += discounts[running] * r[running]
        discounts[running] *= gamma
        next_obs[running], terminated[running] = nxt[running], term[running]
        running &= ~(term | trunc)  # the next step of a finished row is a reset step: never crossed
    return obs[valid], actions[valid], rewards[valid], next_obs[valid], terminated[valid], discounts[valid]


@torch.no_grad()
def td_target(q_network, target_network, rewards, next_obs, terminated, discounts):
    """Double DQN: r + discount * (1 - terminated) * Q_target(s', argmax_a Q_online(s', a)), where r is the n-step
    reward sum and discount gamma**n (fewer steps where the episode ended). next_obs is the true next observation,
    also for a finished episode; only a termination cuts the bootstrap, a truncation (never stored as terminated)
    is bootstrapped."""
    next_actions = q_network(next_obs).argmax(dim=1, keepdim=True)
    next_values = target_network(next_obs).gather(1, next_actions).squeeze(1)
    return rewards + discounts * (1.0 - terminated) * next_values


def check_args(args, model):
    """Every bad flag stops here with one line, before a run dir exists. Returns (action_space, target return)."""
    ru.check_positive(args, "total_timesteps", "initial_action_repeat", "real_steps_per_iteration", "refit_passes",
                      "imagined_horizon", "num_envs", "learning_rate", "buffer_size", "target_network_frequency",
                      "batch_size", "train_frequency", "gradient_steps", "hidden_size", "num_threads", "n_step",
                      "eval_episodes", "stop_after_evals")
    for name in ("initial_real_steps", "real_iterations", "learning_starts", "halt_threshold", "eval_every"):
        if getattr(args, name) < 0:
            raise ru.ArgError("--" + name.replace("_", "-"), "a number >= 0", getattr(args, name))
    for name in ("gamma", "tau", "start_e", "end_e", "exploration_fraction", "collect_epsilon"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ru.ArgError("--" + name.replace("_", "-"), "a number in [0, 1]", getattr(args, name))
    _, action_space, reward_threshold = ru.real_env_spaces(args.env_id, "dqn_imagined.py", actions=("Discrete",))
    learns = model is not None and getattr(model, "learns", True)
    if learns and args.world_model_path is None and args.initial_real_steps < 2:
        raise ru.ArgError("--initial-real-steps", "at least 2 transitions to fit a model on", args.initial_real_steps)
    return action_space, args.target_return if args.target_return is not None else reward_threshold


def evaluate_checkpoint(path):
    """Rebuilds a saved agent (and its run's world model) and replays its run's final evaluation."""
    payload = ru.load_agent(path)
    run = payload["args"]
    model = dyna.agent_world_model(payload, path)
    obs_space, act_space, _ = ru.real_env_spaces(run["env_id"], "dqn_imagined.py", actions=("Discrete",))
    obs_space = model.observation_space if model is not None else obs_space
    q_network = QNetwork(obs_space.shape[0], act_space.n, run["hidden_size"])
    q_network.load_state_dict(payload["state_dicts"]["q_network"])
    return dyna.replay_final_evaluation("dqn_imagined", path, q_network.act, model)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:
        evaluate_checkpoint(args.eval_checkpoint)
        sys.exit(0)

    # checks: every bad flag stops here with one line, before a run dir exists
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    model = dyna.model_from_args(args, device)  # None for --world-model none; loads --world-model-path
    # DQN needs rare terminations predicted (see TERMINATION_POS_WEIGHT); set by attribute so that any model with
    # this knob (the ensemble) gets it and the script need not know the model's class
    if hasattr(model, "termination_pos_weight"):
        model.termination_pos_weight = TERMINATION_POS_WEIGHT
    action_space, target = check_args(args, model)
    learns = model is not None and getattr(model, "learns", True)
    vector_env = dyna.vector_env_kind(args, model)
    ru.seed_everything(args.seed, args.num_threads, args.torch_deterministic)

    run = ru.Run(args, "dqn_imagined", model_free=model is None)
    nets = {}  # what the run saves (finished, interrupted or failed): the agent once it exists, and the model
    run.checkpoint = lambda: dyna.save_checkpoints(run, args, model, nets)
    with run:
        held = (ru.held_random_policy(action_space, args.initial_action_repeat, args.seed)
                if args.initial_action_repeat > 1 else None)
        data, run.figures["real_env_steps"] = dyna.initial_data(
            model, args, run, log=lambda s: print("[dqn_imagined]", s, flush=True), until_termination_policy=held)

        envs = dyna.make_envs(args, model, run, vector_env, device, make_env)
        obs_space = ru.check_policy_observations(envs.single_observation_space, "dqn_imagined.py", args.env_id,
                                                 args.world_model)
        n_actions = int(action_space.n)
        q_network = nets["q_network"] = QNetwork(obs_space.shape[0], n_actions, args.hidden_size).to(device)
        # fused: one kernel for the whole parameter update, ~13% less time per gradient step on a CPU
        optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)
        target_network = QNetwork(obs_space.shape[0], n_actions, args.hidden_size).to(device)
        target_network.load_state_dict(q_network.state_dict())
        rb = ru.ReplayBuffer(args.buffer_size, obs_space.shape[0], seed=args.seed)
        rng = np.random.default_rng(args.seed)
        evaluator = run.evaluator = dyna.Evaluator(args.env_id, args.seed, args.eval_episodes, run.writer, target,
                                                   model)
        writer, figures = run.writer, run.figures

        num_phases = args.real_iterations + 1
        vector_steps_per_phase = max(1, args.total_timesteps // (num_phases * args.num_envs))
        total_steps = num_phases * vector_steps_per_phase * args.num_envs
        global_step = grad_steps = last_eval = 0
        recent_returns, epsilon = [], args.start_e

        def reset(seed):  # numpy observations (a batched env on a GPU gives tensors), nothing pending
            first_obs = real_env.to_numpy(envs.reset(seed=seed)[0])
            return (first_obs, np.zeros(args.num_envs, dtype=bool), np.zeros(args.num_envs), np.zeros(args.num_envs),
                    collections.deque(maxlen=args.n_step))  # the deque: the last n vector steps, for n-step rows

        obs, prev_done, ep_return, ep_length, window = reset(args.seed)
        for iteration in range(1, num_phases + 1):
            phase_start = time.time()
            halted = kept = 0
            for _ in range(vector_steps_per_phase):
                epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * total_steps,
                                          global_step)
                actions = q_network.act(obs, epsilon, rng)
                next_obs, rewards, terminations, truncations, infos = envs.step(actions)
                next_obs, rewards, terminations, truncations = (real_env.to_numpy(x) for x in (
                    next_obs, rewards, terminations, truncations))
                global_step += args.num_envs

                # NEXT_STEP autoreset: a row that finished at the previous step was only reset now (its action
                # ignored, reward 0): not a transition, never stored. At a finishing step next_obs is the true final
                # observation. The buffer stores `terminated`, not `done`, so a truncated row is bootstrapped.
                keep = ~prev_done
                window.append(tuple(np.array(a, copy=True) for a in (obs, actions, rewards, next_obs, terminations,
                                                                        truncations, keep)))
                if len(window) == args.n_step:
                    rb.add(*n_step_rows(window, args.gamma))
                kept += int(keep.sum())
                figures["imagined_steps" if model is not None else "real_env_steps"] += int(keep.sum())
                halted += int(np.sum(real_env.to_numpy(infos.get("halted", False)).astype(bool) & keep))
                prev_done = terminations | truncations
                obs = next_obs
                ep_return += rewards * keep
                ep_length += keep
                if prev_done.any():  # one point per vector step, the mean over the episodes that ended (not a call each)
                    recent_returns = (recent_returns + ep_return[prev_done].tolist())[-20:]
                    writer.add_scalar("charts/episodic_return", ep_return[prev_done].mean(), global_step)
                    writer.add_scalar("charts/episodic_length", ep_length[prev_done].mean(), global_step)
                ep_return[prev_done], ep_length[prev_done] = 0.0, 0.0

                # training: gradient phases of Double DQN on replay samples
                if rb.size >= args.learning_starts and (global_step // args.num_envs) % args.train_frequency == 0:
                    for _ in range(args.gradient_steps):
                        b_obs, b_actions, b_rewards, b_next_obs, b_terminated, b_discounts = rb.sample(
                            args.batch_size, device, discounts=True)
                        target_q = td_target(q_network, target_network, b_rewards, b_next_obs, b_terminated,
                                             b_discounts)
                        q_taken = q_network(b_obs).gather(1, b_actions.view(-1, 1)).squeeze(1)
                        loss = F.smooth_l1_loss(q_taken, target_q)
                        optimizer.zero_grad()
                        loss.backward()
                        nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
                        optimizer.step()
                        grad_steps += 1

                        if grad_steps % args.target_network_frequency == 0:
                            for target_param, param in zip(target_network.parameters(), q_network.parameters()):
                                target_param.data.copy_(args.tau * param.data + (1.0 - args.tau) * target_param.data)
                    writer.add_scalar("losses/td_loss", loss.item(), global_step)
                    writer.add_scalar("losses/q_values", q_taken.mean().item(), global_step)
                    writer.add_scalar("charts/epsilon", epsilon, global_step)
                figures["global_step"], figures["gradient_steps"] = global_step, grad_steps  # so far, for a summary
            run.timings["train_seconds"] += time.time() - phase_start
            sps = int(global_step / run.timings["train_seconds"])
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/halted_fraction", halted / max(kept, 1), global_step)

            # evaluation in the real env (its episodes are never learned from)
            stop = False
            if ru.eval_due(args.eval_every, global_step, last_eval):
                last_eval = global_step
                evaluator(q_network.act, global_step, figures["real_env_steps"])
                stop = args.early_stop and evaluator.solved(args.stop_after_evals)
            print(f"[dqn_imagined] iter {iteration}/{num_phases} step {global_step} "
                  f"{'imagined_return' if model is not None else 'train_return'} "
                  f"{ru.fmt(np.mean(recent_returns[-20:]) if recent_returns else None)} "
                  f"real_return {ru.fmt(evaluator.last_real)} real_steps {figures['real_env_steps']} "
                  f"gap {ru.fmt(evaluator.last_gap)} eps {epsilon:.2f} halted {halted / max(kept, 1):.3f} SPS {sps}",
                  flush=True)
            if stop:
                print(f"[dqn_imagined] the mean return of {args.stop_after_evals} consecutive evaluations reached "
                      f"{target}: stopping early", flush=True)
                break

            # Dyna round: real data from the epsilon-greedy policy, then a warm refit of the world model (in place:
            # a batched imagined env sees the new model at its next step)
            if learns and iteration < num_phases:
                collect_rng = np.random.default_rng([args.seed, iteration])
                data, metrics = dyna.dyna_round(
                    model, data, args.env_id, lambda o: q_network.act(o, args.collect_epsilon, collect_rng),
                    args.real_steps_per_iteration, seed=args.seed + 1000 * iteration, refit_passes=args.refit_passes,
                    writer=writer, global_step=global_step)
                run.add_dyna_round(metrics)
                if vector_env != "batched":  # the workers' copies are stale: new workers load the refit model
                    envs.close()
                    envs = dyna.make_envs(args, model, run, vector_env, device, make_env)
                    obs, prev_done, ep_return, ep_length, window = reset(args.seed + iteration)
        envs.close()

        # the final evaluation: fresh real episodes whose seeds depend only on the run's seed (--eval-checkpoint
        # replays it)
        final = evaluator(q_network.act, global_step, figures["real_env_steps"], final=True)
        if args.capture_video:
            import visualize

            visualize.capture_videos(q_network.act, args.env_id, evaluator.episode_seed(0), run.dir,
                                     args.eval_episodes, model)
        run.finish(final)
