# SAC whose actor and critics learn through short differentiable model rollouts (SAC-SVG(H) with MBPO's branched
# rollouts: DHMBPO, "double horizon" model-based policy optimization), judged in the real environment (Box actions).
#
#   python svg_imagined.py                                   # Pendulum-v1
#   python svg_imagined.py --env-id Hopper-v5 --world-model examples/known_termination.py:mbpo_ensemble \
#       --total-timesteps 20000 --eval-every 2500 --eval-episodes 5
#   python svg_imagined.py --eval-checkpoint runs/<run>/agent.pt             # replay a saved agent's final evaluation
#
# Loop (in the shape of sac_imagined.py, whose actor and critics it uses): SAC acts in the REAL env one step at a
# time, into a real replay buffer; the world model is fitted on the first --initial-real-steps random steps and refit
# every --refit-every. Two model horizons:
# - distribution rollouts (long, detached): every --model-rollout-every real steps, --rollout-batch-size branches of
#   --imagined-horizon model steps from real states; the states they visit fill a start-state buffer (MBPO's branched
#   rollouts, kept only for where they lead: states a few steps beyond the real data);
# - training rollouts (short, differentiated): each of the --utd-ratio updates per real step rolls --training-horizon
#   model steps from a batch of start states, with the current actor's reparameterised actions, through the model's
#   `differentiable_step`. The critics regress on the soft value expansion along it (MVE: the rewards and entropy
#   bonuses of the steps, then the target critics at the horizon, a bootstrapped truncation); the actor ascends the
#   same expansion, its gradient flowing through the model's steps (SVG(H)). A termination ends a row's sum.
# Amos et al. 2021 (SAC-SVG(H)), Feinberg et al. 2018 (MVE), Janner et al. 2019 (MBPO), Kubo et al. (DHMBPO, arXiv
# 2512.15439), whose released settings are the defaults here but its networks (--hidden-size, --hidden-layers,
# --activation, --critic-layer-norm, --critic-dropout), its MuJoCo schedule (--initial-real-steps 5000, --refit-every
# 1000, --warm-start, --train-frequency 1000, --reset-optimizers), its actor (--exact-log-prob, --orthogonal-init) and
# six pieces, all flags off by default, the first four because they did not help with MBPO's model (--model-noise,
# --bounded-critics, --normalize-obs, --critic-updates-after-refit, --scaled-critics, --critic-horizon; README).
import copy
import inspect
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.optim as optim
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dyna  # noqa: E402
import rl_utils as ru  # noqa: E402
import sac_imagined as sac  # noqa: E402  (the same actor, critics, branched rollouts and checkpoints)
import world_model  # noqa: E402

TAG = "svg_imagined"


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """The name of this experiment (the run dir is runs/{env_id}__{exp_name}__{seed}__{time})."""
    seed: int = 1
    """The seed of the experiment; torch, numpy, the real env and the world model derive theirs from it."""
    torch_deterministic: bool = True
    """If toggled, `torch.backends.cudnn.deterministic=True`."""
    cuda: bool = True
    """If toggled, cuda is used when available (the run falls back to the CPU otherwise)."""
    num_threads: int = 1
    """The number of torch CPU threads."""

    # Environment and world model
    env_id: str = "Pendulum-v1"
    """The id of the real Gymnasium environment (Box actions)."""
    total_timesteps: int = 5000
    """The real steps of the whole run, the --initial-real-steps random ones included (imagined ones come on top)."""
    world_model: str = "ensemble"
    """The world model, one whose steps can be differentiated (its `differentiable_step`, world_model.py):
    `ensemble`, `mbpo-ensemble` (MBPO's 7 members of 4x200, the 5 best drawn), `dhmbpo-ensemble` (DHMBPO's 8 of
    4x256, all drawn: the best here on HalfCheetah), or your own as `path/to/file.py:attr`
    or `package.module:attr` (examples/known_termination.py:mbpo_ensemble: with the env's known termination rule)."""
    world_model_path: Optional[str] = None
    """A world-model checkpoint to start from (train_world_model.py or an earlier run; None: fit one here)."""
    initial_real_steps: int = 1000
    """The real steps with uniform random actions before SAC acts and learns (the model's first fit's data)."""
    refit_every: int = 250
    """The world model is refit (warm, budgeted) on all real data after every this many new real steps."""
    refit_passes: int = 200
    """A refit's budget: the minibatch updates of this many passes over the new real data (early stopping on top)."""
    model_rollout_every: int = 20
    """A batch of distribution rollouts after every this many real steps (DHMBPO: 20)."""
    rollout_batch_size: int = 256
    """The distribution rollouts per batch, each from a real state of the replay buffer (DHMBPO: 256)."""
    imagined_horizon: int = 20
    """The length of each distribution rollout; the states it visits are the training rollouts' starts (DHMBPO: 20)."""
    model_retain_rollouts: int = 10
    """The start-state buffer keeps the states of this many rollout batches (DHMBPO: 10)."""
    training_horizon: int = 5
    """The model steps each update differentiates through: the actor's SVG(H) and the critics' MVE horizon
    (DHMBPO: 5; 1 is SAC on one-step model branches with the actor's gradient through the model's step)."""
    model_noise: bool = False
    """If toggled, the training rollouts step with a reparameterised sample of each row's member (mean + std *
    noise: DHMBPO's), not its mean (off: on HalfCheetah-v5 seed 1 it ended at 844.6 with --bounded-critics, 2,224.9
    without either; README)."""
    sample_noise: bool = False
    """If toggled, each distribution rollout step samples its member's predicted Gaussian (next obs and reward)
    instead of taking its mean (DHMBPO's; off: the means, as before), so the training rollouts start from states
    spread as the model's noise spreads them (sac_imagined.py's flag; --model-noise is the training rollouts')."""
    halt_threshold: float = 0.0
    """The halt rule's disagreement multiple for the distribution rollouts (0, the default, turns it off)."""
    utd_ratio: int = 1
    """Gradient steps (each a training rollout, a critic and an actor update) per real step (DHMBPO: 1)."""
    critic_updates_after_refit: int = 0
    """After each refit, the start-state buffer is emptied (its states came from the old model), refilled by one
    batch of distribution rollouts, and the critics take this many updates alone before the actor moves again
    (DHMBPO: a quarter of the real steps between its model updates, 250 at its refit every 1,000; 0: neither)."""
    warm_start: bool = False
    """If toggled, the first update is a burst of one update (times --utd-ratio) per real step collected so far,
    the distribution rollouts renewed every --model-rollout-every of them, before the policy first acts (DHMBPO's
    warm_start: 5,000 updates after its 5,000 random steps; off: one update per real step from the first)."""
    train_frequency: int = 1
    """The updates come in bursts: after every this many real steps (and the refit due then), this many times
    --utd-ratio updates, the policy fixed while it collects and the distribution rollouts renewed every
    --model-rollout-every updates of a burst (DHMBPO: 1,000, after each episode; 1: --utd-ratio updates after
    every real step, the distribution rollouts every --model-rollout-every real steps)."""
    reset_optimizers: bool = False
    """If toggled, the actor's, the critics' and the entropy coefficient's Adam optimisers start afresh after
    every refit (DHMBPO's init_optimizer after each model update; off: they keep their moment estimates)."""

    # SAC (CleanRL names)
    num_critics: int = 5
    """The critics of the ensemble (DHMBPO: 5); the actor ascends their mean at the horizon."""
    min_of_critics: int = 2
    """The targets take the minimum of this many critics drawn at random for each update (DHMBPO and REDQ: 2 of
    the ensemble; with --num-critics 2 it is clipped double Q)."""
    bounded_critics: bool = False
    """If toggled, the targets' bootstrap at the horizon is clipped to [1%, 99%] quantiles of the rollouts' soft
    rewards (r - alpha log pi) divided by 1 - gamma, the bounds tracked slowly (DHMBPO's bounded critics): a Q
    the imagined rewards cannot reach is not a target (off by default, see --model-noise)."""
    scaled_critics: bool = False
    """If toggled, the critics' outputs are read in units of the tracked bounds (as --bounded-critics tracks them):
    Q = center + half-width * output, their last layer starting at zero, so every critic starts at the middle of
    what the imagined rewards can reach and learns a scale-free correction (DHMBPO's scaled critics; off: the raw
    output is Q)."""
    critic_horizon: Optional[int] = None
    """The critics regress the Q of the first this many states of each training rollout on their value expansions
    (None: all --training-horizon of them; DHMBPO: 1, the start states only, each on its full --training-horizon
    expansion, so the critics never learn on states the model alone chose)."""
    normalize_obs: bool = False
    """If toggled, the actor's and critics' inputs are standardised by the real observations' mean and std, set at
    the first update and at each refit (DHMBPO's input normalisation; the model keeps its own)."""
    hidden_size: int = 128
    """The width of the actor's and critics' hidden layers (DHMBPO: 256, sized for a GPU; sac_imagined.py's 128
    here: five 256-wide critics made an update's critic step 3.3x slower on the CPU)."""
    hidden_layers: int = 2
    """The number of hidden layers of the actor and of each critic (DHMBPO: 3)."""
    activation: Literal["relu", "silu"] = "relu"
    """The activation of the actor's and critics' hidden layers (DHMBPO: silu)."""
    exact_log_prob: bool = False
    """If toggled, the actor's log-probabilities take the tanh squashing's exact log-determinant, 2 (log 2 - x -
    softplus(-2x)), where CleanRL's log(1 - tanh(x)^2 + 1e-6) floors it: a saturated action keeps its entropy
    penalty and that penalty's gradient (DHMBPO's actor)."""
    orthogonal_init: bool = False
    """If toggled, the actor's layers start from orthogonal weights and zero biases (DHMBPO's actor; off: torch's
    default initialisation)."""
    critic_layer_norm: bool = False
    """If toggled, the input of every critic layer after the first is layer-normalised, without affine weights
    (DHMBPO's critics)."""
    critic_dropout: float = 0.0
    """The dropout rate after every hidden layer of the critics, in their regression and the actor's loss, not in
    the target critics (DHMBPO: 1e-3; 0: none)."""
    gamma: float = 0.99
    """The discount factor gamma."""
    tau: float = 0.005
    """The target smoothing coefficient."""
    batch_size: int = 256
    """The training rollouts of each gradient step."""
    policy_lr: float = 3e-4
    """The learning rate of the policy network optimizer."""
    q_lr: float = 3e-4
    """The learning rate of the critics' optimizer (DHMBPO: the policy's)."""
    alpha: float = 0.1
    """The entropy regularization coefficient (its start value with --autotune; DHMBPO starts at 0.1)."""
    autotune: bool = True
    """If toggled, the entropy coefficient is tuned automatically towards --target-entropy."""
    target_entropy: Optional[float] = None
    """The policy entropy --autotune aims at (None: -act_dim)."""
    deterministic_episodes: int = 0
    """Every this-many-th real episode after the random steps is played by the learning actor's deterministic action
    (the tanh of its mean, as the evaluations act) instead of a sample, so the replay also holds the states that
    policy drifts into late in long episodes, which the sampling actor, falling sooner, rarely reaches (0: every
    episode samples)."""
    actor_average: float = 0.0
    """If positive, the evaluations, the final figures and the saved agent's `actor` are an average of the actor's
    weights, moved towards the learning actor by this fraction after each of its updates (Polyak averaging of the
    policy, as Nikishin et al. 2018 averaged an RL agent's weights; 1e-3: about the last 1,000 updates). The
    learning actor still collects the real data; each evaluation plays it too, on the same episodes
    (`eval/live_actor_episodic_return`, saved as `live_actor`). The average starts at the initial weights (after
    n updates they weigh (1 - TAU)^n), and with --normalize-obs both actors take the new statistics at a refit.
    0: the learning actor throughout."""

    # Evaluation in the real env
    eval_every: int = 500
    """Evaluate once this many real steps passed since SAC began learning or the last evaluation (0: the final only)."""
    eval_episodes: int = 10
    """The number of real episodes per evaluation; the final summary statistics are over this many episodes."""
    target_return: Optional[float] = None
    """The real return that counts as solved (None: the env's `reward_threshold`; none for Pendulum-v1)."""
    early_stop: bool = True
    """Stop (no more real data) once the mean real return of --stop-after-evals consecutive evaluations reached it."""
    stop_after_evals: int = 1
    """The consecutive evaluations (fresh episodes each) whose mean return must reach --target-return to stop early."""
    eval_checkpoint: Optional[str] = None
    """A saved agent (runs/<run>/agent.pt) whose final evaluation is replayed in the real env; nothing is trained."""
    capture_video: bool = False
    """Record the final evaluation's real episodes, and one dream-vs-real video, under runs/<run>/videos/."""


def training_rollout(model, actor, start_obs, horizon, sample=False):
    """`horizon` model steps from start_obs (B,d) with the actor's reparameterised actions, the autograd graph kept
    through actions and model steps (sample: the model's reparameterised samples, not its means). Returns obs
    (H+1,B,d), actions (H+1,B,a), log_probs (H+1,B), rewards (H,B) and alive (H+1,B) float: 1 where no termination
    came before that state (a state after one is not real)."""
    obs, actions, log_probs, rewards, alive = [start_obs], [], [], [], [start_obs.new_ones(len(start_obs))]
    for _ in range(horizon):
        action, log_prob, _ = actor.get_action(obs[-1])
        next_obs, reward, terminated = (model.differentiable_step(obs[-1], action, sample=True) if sample
                                        else model.differentiable_step(obs[-1], action))
        actions.append(action), log_probs.append(log_prob), rewards.append(reward), obs.append(next_obs)
        alive.append(alive[-1] * (~terminated).float())
    action, log_prob, _ = actor.get_action(obs[-1])  # the horizon's action, for the critics' bootstrap
    actions.append(action), log_probs.append(log_prob)
    return tuple(torch.stack(x) for x in (obs, actions, log_probs, rewards, alive))


def soft_value_expansion(rewards, log_probs, alive, terminal_q, alpha, gamma):
    """The soft H-step value expansion along a rollout. rewards (H,B), log_probs and alive (H+1,B), terminal_q (B,)
    the critics' Q(s_H, a_H). V_H = alive_H (Q(s_H,a_H) - alpha log pi_H), V_t = alive_t (r_t - alpha log pi_t +
    gamma V_{t+1}): the value the actor ascends is V_0. The critics' targets are Q_t = alive_t (r_t + gamma V_{t+1})
    for t < H (a_t's own entropy bonus is not Q's). The horizon bootstraps (a truncation), a termination does not.
    Returns V_0 (B,) and the targets (H,B)."""
    values = alive[-1] * (terminal_q - alpha * log_probs[-1])
    targets = []
    for t in reversed(range(len(rewards))):
        targets.append(alive[t] * (rewards[t] + gamma * values))
        values = targets[-1] - alive[t] * alpha * log_probs[t]
    return values, torch.stack(targets[::-1])


BOUND_QUANTILES = (0.01, 0.99)
BOUND_RATE = 3e-4  # the bounds move this share of the way to each update's figures (DHMBPO: its learning rate)


def critic_bounds(bounds, rewards, log_probs, alive, alpha, gamma):
    """DHMBPO's bounded critics: the [1%, 99%] quantiles of the alive steps' soft rewards r_t - alpha log pi_t,
    over 1 - gamma (the returns of living on the lowest or the highest soft reward for ever), moved from `bounds`
    (a (2,) tensor, None at first) by BOUND_RATE. Returns the new (2,) bounds."""
    soft = (rewards - alpha * log_probs[:-1])[alive[:-1] > 0]
    if len(soft) == 0:
        return bounds
    new = torch.quantile(soft, torch.tensor(BOUND_QUANTILES, device=soft.device)) / (1.0 - gamma)
    return new if bounds is None else bounds.lerp_(new, BOUND_RATE)


def in_bound_units(q, bounds):
    """DHMBPO's scaled critics: raw critic outputs q read as center + half-width * q of bounds (lower, upper);
    bounds None (none tracked yet) leaves q as it is."""
    if bounds is None:
        return q
    return 0.5 * (bounds[1] + bounds[0]) + 0.5 * (bounds[1] - bounds[0]) * q


def evaluate_checkpoint(path):
    """Rebuilds a saved actor (and its run's world model) and replays its run's final evaluation."""
    payload = ru.load_agent(path)
    model = dyna.agent_world_model(payload, path)
    _, act_space, _ = ru.real_env_spaces(payload["args"]["env_id"], f"{TAG}.py", actions=("Box",))
    actor = sac.Actor.from_run_args(payload["args"], model.observation_space.shape[0], act_space)
    actor.load_state_dict(payload["state_dicts"]["actor"])
    return dyna.replay_final_evaluation(TAG, path, sac.policy_fn(actor, "cpu", True), model)


def check_args(args):
    """Every bad flag stops here with one line, before a run dir exists; returns what __main__ starts from."""
    _, act_space, reward_threshold = ru.real_env_spaces(args.env_id, f"{TAG}.py", actions=("Box",))
    if args.world_model == world_model.NO_MODEL:
        raise ru.ArgError("--world-model", "a world model to differentiate through", args.world_model,
                          "For model-free SAC run `python sac_imagined.py --world-model none`.")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    model = dyna.model_from_args(args, device)
    lacks = [name for name in ("differentiable_step", "imagined_vector_env")
             if not callable(getattr(model, name, None))]
    if lacks:
        raise ru.ArgError("--world-model", "a model with differentiable_step and imagined_vector_env (the ensembles; "
                          "world_model.py)", args.world_model, f"{type(model).__name__} lacks {', '.join(lacks)}. "
                          "sac_imagined.py trains on any model's imagined envs.")
    ru.check_positive(args, "total_timesteps", "initial_real_steps", "refit_every", "refit_passes",
                      "model_rollout_every", "rollout_batch_size", "imagined_horizon", "model_retain_rollouts",
                      "training_horizon", "utd_ratio", "train_frequency", "num_critics", "min_of_critics",
                      "hidden_size", "batch_size", "eval_episodes", "num_threads", "stop_after_evals")
    if args.model_noise and "sample" not in inspect.signature(model.differentiable_step).parameters:
        raise ru.ArgError("--model-noise", "a model whose differentiable_step takes sample=True (world_model.py)",
                          args.world_model, f"{type(model).__name__}.differentiable_step has no `sample`: "
                          "drop --model-noise (off by default) to step with its output as it is.")
    sac.check_noise_setting(args, model, "batched")
    if args.critic_horizon is not None and not 1 <= args.critic_horizon <= args.training_horizon:
        raise ru.ArgError("--critic-horizon", f"a number from 1 to --training-horizon ({args.training_horizon}), or "
                          "None for all of them", args.critic_horizon)
    if args.hidden_layers < 2:
        raise ru.ArgError("--hidden-layers", "2 or more (the actor's first two are fc1 and fc2)", args.hidden_layers)
    if not 0.0 <= args.critic_dropout < 1.0:
        raise ru.ArgError("--critic-dropout", "a rate in [0, 1) (0: no dropout)", args.critic_dropout)
    if args.min_of_critics > args.num_critics:
        raise ru.ArgError("--min-of-critics", f"at most --num-critics ({args.num_critics})", args.min_of_critics)
    if not 0.0 <= args.gamma <= 1.0:
        raise ru.ArgError("--gamma", "a value in [0, 1]", args.gamma)
    if args.deterministic_episodes < 0:
        raise ru.ArgError("--deterministic-episodes", "a number >= 0 (0: every real episode samples)",
                          args.deterministic_episodes)
    if not 0.0 <= args.actor_average <= 1.0:
        raise ru.ArgError("--actor-average", "a fraction in [0, 1] (0: no averaged actor)", args.actor_average)
    for flag in ("bounded_critics", "scaled_critics"):
        if getattr(args, flag) and args.gamma == 1.0:
            flag = "--" + flag.replace("_", "-")
            raise ru.ArgError("--gamma", f"a value below 1 with {flag} (the bounds divide by 1 - gamma)", args.gamma,
                              f"Drop {flag} (off by default).")
    for name in ("halt_threshold", "eval_every"):
        if not getattr(args, name) >= 0:
            raise ru.ArgError("--" + name.replace("_", "-"), "a number >= 0 (0 turns it off)", getattr(args, name))
    if args.target_entropy is not None and not args.autotune:
        raise ru.ArgError("--target-entropy", "no value with --no-autotune (the entropy coefficient is fixed at "
                          f"--alpha {args.alpha})", args.target_entropy, "Drop one of the two flags.")
    if getattr(model, "learns", True) and args.world_model_path is None and \
            args.total_timesteps <= args.initial_real_steps:
        raise ru.ArgError("--total-timesteps", f"more than --initial-real-steps ({args.initial_real_steps})",
                          args.total_timesteps, "The first ones are random steps for the world model.")
    obs_space = ru.check_policy_observations(model.observation_space, f"{TAG}.py", args.env_id, args.world_model)
    updates = (args.total_timesteps - (0 if args.warm_start else args.initial_real_steps)) * args.utd_ratio
    print(f"[{TAG}] about {updates:,} updates through {args.training_horizon}-step model "
          "rollouts: minutes on a CPU for Pendulum, about two hours for MuJoCo at 20,000 steps", flush=True)
    return device, model, obs_space, act_space, reward_threshold


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:
        evaluate_checkpoint(args.eval_checkpoint)
        sys.exit(0)

    device, model, obs_space, act_space, reward_threshold = check_args(args)
    learns = getattr(model, "learns", True)
    ru.seed_everything(args.seed, args.num_threads, args.torch_deterministic)

    run = ru.Run(args, TAG)
    nets, log = {}, {}  # what the run saves: the agent once it exists; the raw real data the model is saved with
    q_bounds = None  # the critics' (lower, upper) bounds, once --bounded-critics / --scaled-critics track them
    # agent.pt keeps the critics' tracked bounds too: with --scaled-critics the critics' outputs are in their units
    run.checkpoint = lambda: sac.save_checkpoints(
        run, args, model, nets, log, extra={"critic_bounds": None if q_bounds is None else q_bounds.tolist()})
    with run:
        data, run.figures["real_env_steps"] = dyna.initial_data(model, args, run, log=lambda s: print(f"[{TAG}]", s))
        figures, timings, writer = run.figures, run.timings, run.writer
        obs_dim, act_dim = obs_space.shape[0], act_space.shape[0]
        actor = nets["actor"] = sac.Actor.from_run_args(vars(args), obs_dim, act_space).to(device)
        qf = nets["qf"] = sac.SoftQNetworks.from_run_args(vars(args), obs_dim, act_dim).to(device)
        qf_target = sac.SoftQNetworks.from_run_args(vars(args), obs_dim, act_dim).to(device)
        if args.scaled_critics:  # every critic starts at the bounds' center
            torch.nn.init.zeros_(qf.weights[-1]), torch.nn.init.zeros_(qf.biases[-1])
        qf_target.load_state_dict(qf.state_dict())
        qf_target.eval()  # no dropout in the targets (erl_lib's target critics run in eval mode)
        critic_horizon = args.training_horizon if args.critic_horizon is None else args.critic_horizon
        q_params, q_target_params = list(qf.parameters()), list(qf_target.parameters())
        actor_params = list(actor.parameters())
        # --actor-average: the averaged actor is the one evaluated and saved as "actor"; the learner is "live_actor"
        averaged = copy.deepcopy(actor) if args.actor_average else actor
        if args.actor_average:
            nets["actor"], nets["live_actor"] = averaged, actor
        averaged_params = list(averaged.parameters())
        log_alpha = torch.full((1,), float(np.log(args.alpha)), requires_grad=args.autotune, device=device)
        alpha = args.alpha
        target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy

        def new_optimizers():
            """The critics', the actor's and the entropy coefficient's Adam optimisers, their moments at zero."""
            return (optim.Adam(q_params, lr=args.q_lr, fused=True),
                    optim.Adam(actor_params, lr=args.policy_lr, fused=True), optim.Adam([log_alpha], lr=args.q_lr))

        q_optimizer, actor_optimizer, alpha_optimizer = new_optimizers()

        # the real env seen through the model, the replay `rb` of what the policy sees, the model's `log` of raw data
        real = dyna.RealSteps(model, data, args, obs_dim, act_space.shape, log, writer)
        rb = real.rb
        # the distribution rollouts' visited states (their transitions' obs: the real start and the imagined ones)
        start_rb = ru.ReplayBuffer(args.rollout_batch_size * args.imagined_horizon * args.model_retain_rollouts,
                                   obs_dim, act_space.shape, np.float32, seed=args.seed + 1)
        imagined_envs = dyna.imagined_vector_env(model, "batched", args.rollout_batch_size, args.seed, device, None,
                                                 horizon=args.imagined_horizon, start="buffer",
                                                 halt=args.halt_threshold, gamma=args.gamma,
                                                 **sac.noise_setting(args))
        explore, greedy = sac.policy_fn(actor, device, False), sac.policy_fn(averaged, device, True)
        live_greedy = sac.policy_fn(actor, device, True)
        also = {"live_actor": live_greedy} if args.actor_average else None
        target = args.target_return if args.target_return is not None else reward_threshold
        evaluator = run.evaluator = dyna.Evaluator(args.env_id, args.seed, args.eval_episodes, writer, target, model)
        train_rng = np.random.default_rng(args.seed + 2)

        def distribution_rollouts(seed):
            """One batch of detached branched rollouts from real states, their visited states into start_rb."""
            t0 = time.time()
            starts = rb.obs[rb.rng.integers(0, rb.size, size=args.rollout_batch_size)]
            imagined = sac.branched_rollouts(imagined_envs, explore, starts, seed, args.imagined_horizon)
            start_rb.add(*imagined.values())
            figures["imagined_steps"] += len(imagined["obs"])
            figures["rollout_batches"] += 1
            timings["rollout_seconds"] += time.time() - t0
            writer.add_scalar("world_model/rollout_transitions", len(imagined["obs"]), global_step)
            writer.add_scalar("world_model/rollout_terminated_fraction", imagined["terminated"].mean(), global_step)

        collected = figures["real_env_steps"] if args.world_model_path is None else 0
        since_refit, since_rollout, since_train, num_updates, refit_pending = 0, 0, 0, 0, False
        per_step_rollouts = args.train_frequency == 1  # else the bursts renew the start states themselves
        timings["rollout_seconds"], figures["updates"], figures["rollout_batches"] = 0.0, 0, 0
        figures["critic_only_updates"] = figures["warm_start_updates"] = figures["deterministic_real_steps"] = 0
        global_step = last_eval = figures["global_step"] = figures["real_env_steps"]
        drawn_after = None
        loop_start, loop_steps = time.time(), args.total_timesteps - collected
        for step in range(loop_steps):
            t0 = time.time()
            global_step = figures["global_step"] = figures["real_env_steps"] = global_step + 1
            deterministic = args.deterministic_episodes > 0 and real.episode_id % args.deterministic_episodes == 0
            figures["deterministic_real_steps"] += deterministic and rb.size >= args.initial_real_steps
            # random actions until the replay holds --initial-real-steps
            real.step(live_greedy if deterministic else explore, global_step)
            since_refit, since_rollout = since_refit + 1, since_rollout + 1
            timings["real_collect_seconds"] += time.time() - t0
            if rb.size < args.initial_real_steps:
                continue

            refitted = False
            if learns and since_refit >= args.refit_every:  # a warm refit on all real data, its budget the new data
                run.add_dyna_round(dyna.refit(model, sac.transitions(log, args.env_id), since_refit,
                                              seed=args.seed + global_step, refit_passes=args.refit_passes,
                                              writer=writer, global_step=global_step, draw=drawn_after != last_eval))
                since_refit, drawn_after, refitted = 0, last_eval, True
                if args.critic_updates_after_refit:
                    start_rb.clear()
                if args.reset_optimizers:
                    q_optimizer, actor_optimizer, alpha_optimizer = new_optimizers()
            if args.normalize_obs and (refitted or num_updates == 0):
                sac.set_obs_stats(rb.obs[:rb.size], actor, averaged, qf, qf_target)
            if start_rb.size == 0 or (per_step_rollouts and since_rollout >= args.model_rollout_every):
                distribution_rollouts(args.seed * 1_000_003 + global_step)
                since_rollout = 0

            t0, rollout_seconds = time.time(), timings["rollout_seconds"]
            # --utd-ratio updates per real step since the last ones: after every --train-frequency real steps, and
            # at the first learning step (its one step's worth)
            since_train += 1
            due = since_train * args.utd_ratio if since_train >= args.train_frequency or num_updates == 0 else 0
            since_train = 0 if due else since_train
            refit_pending = refit_pending or refitted  # the critics' updates alone come before the next burst
            critic_only = args.critic_updates_after_refit if refit_pending and due else 0
            refit_pending = refit_pending and not due
            figures["critic_only_updates"] += critic_only
            # the first step's own updates and the burst: one (times --utd-ratio) per real step collected so far
            warm = (rb.size - 1) * args.utd_ratio if args.warm_start and num_updates == 0 else 0
            if warm:
                figures["warm_start_updates"] = warm
                print(f"[{TAG}] warm start: {warm:,} updates before the policy acts (minutes for MuJoCo)")
            for update in range(critic_only + warm + due):
                num_updates += 1
                actor_moves = update >= critic_only
                burst = update - critic_only
                if burst % (args.model_rollout_every * args.utd_ratio) == 0 and \
                        (0 < burst < warm or (not per_step_rollouts and burst >= 0)):
                    # fresh starts from the actor the burst has trained so far, as one per real step would have
                    seed = np.random.SeedSequence([args.seed, global_step, burst]).generate_state(1)[0]
                    distribution_rollouts(int(seed))
                start_obs = start_rb.sample(args.batch_size, device)[0]
                with torch.enable_grad() if actor_moves else torch.no_grad():  # a critic-only update needs no graph
                    b_obs, b_actions, log_probs, rewards, alive = training_rollout(
                        model, actor, start_obs, args.training_horizon, args.model_noise)
                h, b = rewards.shape
                figures["imagined_steps"] += h * b
                # critics: regress Q(s_t, a_t) on the soft value expansion, with a random subset's min at the horizon
                with torch.no_grad():
                    subset = torch.as_tensor(train_rng.choice(args.num_critics, args.min_of_critics, replace=False))
                    if args.bounded_critics or args.scaled_critics:
                        q_bounds = critic_bounds(q_bounds, rewards, log_probs, alive, alpha, args.gamma)
                    units = q_bounds if args.scaled_critics else None
                    q_end = in_bound_units(qf_target(b_obs[-1], b_actions[-1]), units)[subset].min(0).values
                    if args.bounded_critics and q_bounds is not None:
                        q_end = q_end.clamp(q_bounds[0], q_bounds[1])
                    _, q_targets = soft_value_expansion(rewards, log_probs, alive, q_end, alpha, args.gamma)
                k = critic_horizon
                q_pred = in_bound_units(qf(b_obs[:k].detach().reshape(k * b, -1),
                                           b_actions[:k].detach().reshape(k * b, -1)), units)
                q_errors = (q_pred.view(-1, k, b) - q_targets[:k]).pow(2) * alive[:k]  # no loss on states after an end
                qf_loss = q_errors.mean((1, 2)).sum()
                q_optimizer.zero_grad()
                qf_loss.backward()
                q_optimizer.step()
                with torch.no_grad():
                    torch._foreach_lerp_(q_target_params, q_params, args.tau)
                if not actor_moves:
                    continue

                # actor: ascend V_0 of the same rollout, through its actions and model steps, the critics' mean at H
                q_end = in_bound_units(qf(b_obs[-1], b_actions[-1]), units).mean(0)
                v0, _ = soft_value_expansion(rewards, log_probs, alive, q_end, alpha, args.gamma)
                actor_loss = -v0.mean()
                # autograd.grad asks for the actor's gradients only: none is computed for the critics' or the
                # model's weights, which the loss passes through
                for p, g in zip(actor_params, torch.autograd.grad(actor_loss, actor_params)):
                    p.grad = g
                actor_optimizer.step()
                if args.actor_average:
                    with torch.no_grad():
                        torch._foreach_lerp_(averaged_params, actor_params, args.actor_average)
                if args.autotune:  # the entropy of the rollout's first actions
                    alpha_loss = (-log_alpha.exp() * (log_probs[0].detach() + target_entropy)).mean()
                    alpha_optimizer.zero_grad()
                    alpha_loss.backward()
                    alpha_optimizer.step()
                    alpha = log_alpha.exp().item()
            figures["updates"] = num_updates
            timings["train_seconds"] += time.time() - t0 - (timings["rollout_seconds"] - rollout_seconds)

            sps = int((step + 1) / (time.time() - loop_start))
            if step % 100 == 0:
                for tag, value in {"losses/qf_loss": qf_loss.item() / args.num_critics,
                                   "losses/qf_values": q_pred.mean().item(), "losses/actor_loss": actor_loss.item(),
                                   "losses/alpha": alpha, "losses/rollout_alive": alive[-1].mean().item(),
                                   **({"losses/q_lower_bound": q_bounds[0].item(),
                                       "losses/q_upper_bound": q_bounds[1].item()} if q_bounds is not None else {}),
                                   **({"losses/alpha_loss": alpha_loss.item()} if args.autotune else {}),
                                   "charts/SPS": sps, "charts/real_env_steps": global_step}.items():
                    writer.add_scalar(tag, value, global_step)

            if ru.eval_due(args.eval_every, global_step, last_eval) and step + 1 < loop_steps:
                last_eval = global_step
                entry = evaluator(greedy, global_step, global_step, also=also)
                live = f" live_actor {ru.fmt(entry['live_actor_return_mean'])}" if also else ""
                print(f"[{TAG}] step {collected + step + 1}/{args.total_timesteps} real_return "
                      f"{ru.fmt(entry['real_return_mean'])}{live} "
                      f"imagined_return {ru.fmt(entry.get('imagined_return_mean'))}"
                      f" gap {ru.fmt(evaluator.last_gap)} real_steps {global_step} updates {num_updates} "
                      f"alpha {alpha:.3f} SPS {sps} left {int((loop_steps - step - 1) / max(sps, 1))}s", flush=True)
                if args.early_stop and evaluator.solved(args.stop_after_evals):
                    print(f"[{TAG}] the mean return of {args.stop_after_evals} consecutive evaluations reached "
                          f"{target}: stopping", flush=True)
                    break
        real.close()
        imagined_envs.close()

        final = evaluator(greedy, global_step, global_step, final=True, also=also)
        if args.capture_video:
            import visualize

            visualize.capture_videos(greedy, args.env_id, evaluator.episode_seed(0), run.dir, args.eval_episodes, model)
        live = {"live_actor_return_mean": final["live_actor_return_mean"]} if also else {}
        run.finish(final, **live, gap_remedy="Refit the model harder (raise --refit-passes, lower --refit-every) or "
                   "shorten --training-horizon.")
