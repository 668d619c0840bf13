# SAC with an MBPO-style learned world model, judged in the real environment (continuous actions).
#
#   python sac_imagined.py                                   # Pendulum-v1: SAC on real + branched imagined data
#   python sac_imagined.py --env-id InvertedPendulum-v5      # stops early at the env's reward_threshold (950)
#   python sac_imagined.py --world-model-path runs/<wm_run>/world_model.pt   # start from an existing world model
#   python sac_imagined.py --world-model none                # model-free baseline (or file.py:attr: your model)
#   python sac_imagined.py --eval-checkpoint runs/<run>/agent.pt             # replay a saved agent's final evaluation
#
# Loop (MBPO, Janner et al. 2019, in the shape of CleanRL's sac_continuous_action.py): unlike the PPO/DQN scripts,
# SAC acts in the REAL env (through the model's view of it), one step at a time, into a real replay buffer. The
# first --initial-real-steps uniform-random real transitions fit the model (unless --world-model-path). Every
# --model-rollout-every real steps, --rollout-batch-size branched rollouts run --imagined-horizon model steps from
# real states into a model replay buffer; every --refit-every real steps the model is refit (warm, budgeted) on all
# real data. After each real step, --utd-ratio SAC updates on batches with --real-ratio real data (--world-model
# none: plain SAC). real_env_steps counts every real transition learned from, eval_env_steps the evaluations'.
import inspect
import math
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
import dyna  # noqa: E402
import real_env  # noqa: E402
import rl_utils as ru  # noqa: E402
import world_model  # noqa: E402

TAG = "sac_imagined"


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
    """The number of torch CPU threads (one is the fastest for these small networks: a 5,000-step HalfCheetah run
    spent 546 s in SAC updates with 2 threads against 468 s with 1 on a quiet 2-core machine)."""

    # Environment and world model
    env_id: str = "Pendulum-v1"
    """The id of the real Gymnasium environment (Box actions)."""
    total_timesteps: int = 5000
    """The real steps of the whole run, the --initial-real-steps random ones included (imagined ones come on top)."""
    world_model: str = "ensemble"
    """The world model of the branched rollouts: `ensemble` (the reference MLP ensemble, 5 members of 3x128),
    `mbpo-ensemble` (MBPO's: 7 members of 4x200, rollouts drawn from the 5 best), `rssm` (the recurrent latent
    model: branches start from the beliefs in the replay), `none` (plain SAC on the real env: the model-free
    baseline), or your own as `path/to/file.py:attr` or `package.module:attr` (world_model.py)."""
    world_model_path: Optional[str] = None
    """A world-model checkpoint to start from (train_world_model.py or an earlier run; None: fit one here)."""
    vector_env: Literal["auto", "batched", "sync", "async"] = "auto"
    """How branched rollouts are stepped: `batched` (one model call for all; `auto` where offered), or `sync`/`async`
    workers of make_env thunks, each loading its own model (single-env models: lower --rollout-batch-size then)."""
    initial_real_steps: int = 1000
    """The real steps with uniform random actions before SAC acts and learns (with a model: its first fit's data)."""
    refit_every: int = 250
    """The world model is refit (warm, budgeted) on all real data after every this many new real steps."""
    refit_passes: int = 200
    """A refit's budget: the minibatch updates of this many passes over the new real data (early stopping on top);
    PPO's 20 is too few for SAC (HalfCheetah-v5 seed 1: -61.8 after 20,000 real steps, 2,453 with 200)."""
    model_rollout_every: int = 250
    """A new batch of branched rollouts is imagined after every this many real steps."""
    rollout_batch_size: int = 10000
    """The branched rollouts per batch, each from a real state of the real replay buffer (sync/async: the model's)."""
    imagined_horizon: int = 1
    """The length of each branched rollout, its end a bootstrapped truncation (MBPO's 1: the most accurate step)."""
    model_retain_rollouts: int = 4
    """The model replay buffer keeps the transitions of this many rollout batches (the oldest are overwritten)."""
    sample_noise: bool = False
    """If toggled, each imagined step samples its member's predicted Gaussian (next obs and reward) instead of taking
    its mean, as MBPO's rollouts do (its `deterministic: False`); for models whose imagined envs take `sample_noise`
    (the ensembles)."""
    halt_threshold: float = 0.0
    """The halt rule's disagreement multiple (0, the default, turns it off: short branches stay near the data)."""
    real_ratio: float = 0.2
    """The fraction of real transitions in each SAC batch, the rest from the model replay buffer. MBPO uses 0.05; on
    HalfCheetah-v5 (20,000 real steps, seeds 1-3) 0.05 gave 2,453 / 237 / 986 and 0.2 gave 1,071 / 3,143 / 2,379."""
    utd_ratio: int = 10
    """SAC gradient steps per real step (MBPO: 20, 40 on HalfCheetah; 10 learns Pendulum and InvertedPendulum as fast
    at half the cost, and on HalfCheetah-v5 with MBPO's settings 20 did worse: mean of seeds 1-3 1,865 against 3,013)."""

    # SAC (CleanRL names)
    hidden_size: int = 128
    """The width of the actor's and Q-networks' hidden layers (CleanRL and MBPO: 256; 128 is 2.5x faster on CPU and
    did better on HalfCheetah-v5 with MBPO's settings: mean of seeds 1-3 3,013 at 128, 1,704 at 256)."""
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
    """If toggled, the entropy coefficient is tuned automatically towards --target-entropy."""
    target_entropy: Optional[float] = None
    """The policy entropy --autotune aims at (None: -act_dim, CleanRL's and SB3's; MBPO: -3 on HalfCheetah, -1 on
    Hopper)."""

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


def make_env(args, model_path, seed, horizon):
    """CleanRL's make_env for --vector-env sync|async: each thunk builds and loads its own copy of the world model."""

    def thunk():
        torch.set_num_threads(1)
        model = world_model.make(args.world_model, env_id=args.env_id, seed=seed)
        model = model.load(model_path) if model_path else model
        return model.imagined_env(seed=seed, horizon=horizon, start="buffer", halt=args.halt_threshold,
                                  gamma=args.gamma, **noise_setting(args))

    return thunk


def noise_setting(args):
    """The imagined envs' keyword for --sample-noise, only when it is on (a model need not take it otherwise)."""
    return {"sample_noise": True} if args.sample_noise else {}


def check_noise_setting(args, model, kind):
    """--sample-noise needs a model whose imagined envs (`kind`: "batched" or workers) take sample_noise."""
    if args.sample_noise:
        wanted = "imagined_vector_env" if kind == "batched" else "imagined_env"
        if model is None or "sample_noise" not in inspect.signature(getattr(model, wanted)).parameters:
            raise ru.ArgError("--sample-noise", f"a world model whose {wanted} takes sample_noise (the ensembles)",
                              args.world_model, "Drop --sample-noise for this model.")


def add_obs_stats(net, obs_dim, normalize_obs):
    """Gives `net` the input statistics set_obs_stats fills (buffers: saved with the weights) where asked."""
    net.normalize_obs = normalize_obs
    if normalize_obs:
        net.register_buffer("obs_mean", torch.zeros(obs_dim))
        net.register_buffer("obs_std", torch.ones(obs_dim))


def normalized(net, x):
    return (x - net.obs_mean) / net.obs_std if net.normalize_obs else x


ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


class SoftQNetworks(nn.Module):
    """The twin soft Q-networks of clipped double Q as one module: each layer holds both critics' weights in one
    (2, in, out) tensor and runs them in one batched matmul (`baddbmm`). The same networks as two `nn.Linear` MLPs
    (the same init), in half the ops: a CPU update is bound by the number of ops, not their FLOPs.
    hidden_layers, activation, layer_norm and dropout give DHMBPO's critics (3, "silu", True, 1e-3): a layer norm
    without affine weights on the input of every layer after the first, dropout after every hidden matmul.
    forward(obs, actions) -> (num_q, B)."""

    def __init__(self, obs_dim, act_dim, hidden_size=256, num_q=2, normalize_obs=False, hidden_layers=2,
                 activation="relu", layer_norm=False, dropout=0.0):
        super().__init__()
        add_obs_stats(self, obs_dim, normalize_obs)
        self.activation, self.layer_norm, self.dropout = ACTIVATIONS[activation], layer_norm, dropout
        sizes = [obs_dim + act_dim] + [hidden_size] * hidden_layers + [1]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(num_q, i, o)) for i, o in zip(sizes, sizes[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(num_q, 1, o)) for o in sizes[1:])
        for w, b in zip(self.weights, self.biases):  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / np.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @classmethod
    def from_run_args(cls, run_args, obs_dim, act_dim):
        """The critics a run with these args (a saved agent's "args") built: the flags a run lacks at their defaults
        (sac_imagined.py's twin critics; svg_imagined.py's ensemble and DHMBPO's shape)."""
        return cls(obs_dim, act_dim, run_args["hidden_size"], run_args.get("num_critics", 2),
                   run_args.get("normalize_obs", False), run_args.get("hidden_layers", 2),
                   run_args.get("activation", "relu"), run_args.get("critic_layer_norm", False),
                   run_args.get("critic_dropout", 0.0))

    def forward(self, x, a):
        x = normalized(self, x)
        h = torch.cat([x, a], 1).expand(len(self.weights[0]), -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if self.layer_norm and i > 0:
                h = F.layer_norm(h, h.shape[-1:], eps=1e-5)
            h = torch.baddbmm(b, h, w)
            if i < len(self.weights) - 1:
                if self.dropout > 0:
                    h = F.dropout(h, self.dropout, self.training)
                h = self.activation(h)
        return h.squeeze(-1)


LOG_STD_MAX, LOG_STD_MIN = 2, -5
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
LOG_2 = math.log(2.0)


class Actor(nn.Module):
    """A tanh-squashed Gaussian policy whose actions are rescaled to the bounds of the Box action space.
    exact_log_prob: the squashing's log-determinant log(1 - tanh(x)^2) in its exact, stable form (no 1e-6 floor,
    so a saturated action keeps its entropy penalty and its gradient); orthogonal_init: orthogonal weights and zero
    biases (both DHMBPO's actor; off: CleanRL's floor and torch's default initialisation)."""

    def __init__(self, obs_dim, action_space, hidden_size=256, normalize_obs=False, hidden_layers=2, activation="relu",
                 exact_log_prob=False, orthogonal_init=False):
        super().__init__()
        self.exact_log_prob = exact_log_prob
        add_obs_stats(self, obs_dim, normalize_obs)
        act_dim = int(np.prod(action_space.shape))
        self.activation = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(obs_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        # layers past the second in their own list, so a 2-layer actor's state dict keeps its keys
        self.fc_deeper = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(hidden_layers - 2))
        self.fc_mean = nn.Linear(hidden_size, act_dim)
        self.fc_logstd = nn.Linear(hidden_size, act_dim)
        high, low = np.asarray(action_space.high, np.float32), np.asarray(action_space.low, np.float32)
        self.register_buffer("action_scale", torch.tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((high + low) / 2.0, dtype=torch.float32))
        if orthogonal_init:
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, x):
        x = normalized(self, x)
        x = self.activation(self.fc1(x))
        x = self.activation(self.fc2(x))
        for layer in self.fc_deeper:
            x = self.activation(layer(x))
        mean = self.fc_mean(x)
        log_std = torch.tanh(self.fc_logstd(x))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)  # from [-1, 1] to [MIN, MAX]
        return mean, log_std

    @classmethod
    def from_run_args(cls, run_args, obs_dim, action_space):
        """The actor a run with these args (a saved agent's "args") built: the flags an older run lacks at their
        defaults."""
        return cls(obs_dim, action_space, run_args["hidden_size"], run_args.get("normalize_obs", False),
                   run_args.get("hidden_layers", 2), run_args.get("activation", "relu"),
                   run_args.get("exact_log_prob", False), run_args.get("orthogonal_init", False))

    def get_action(self, x):
        """Returns a sampled action (reparameterised), its log-probability (B,) and the deterministic action."""
        mean, log_std = self(x)
        eps = torch.randn_like(mean)
        x_t = mean + log_std.exp() * eps  # reparameterised, as Normal(mean, std).rsample()
        y_t = torch.tanh(x_t)
        action = y_t * self.action_scale + self.action_bias
        # log N(x_t; mean, std) is -eps^2/2 - log std - log(2 pi)/2 (Normal.log_prob's value and gradients, fewer ops),
        # then the change of variables for the tanh squashing and the rescaling
        if self.exact_log_prob:  # log(1 - tanh(x)^2) = 2 (log 2 - x - softplus(-2x)), exact for any x
            squash = 2.0 * (LOG_2 - x_t - F.softplus(-2.0 * x_t)) + torch.log(self.action_scale)
        else:
            squash = torch.log(self.action_scale * (1 - y_t.pow(2)) + 1e-6)
        log_prob = -0.5 * eps.pow(2) - log_std - HALF_LOG_2PI - squash
        return action, log_prob.sum(1), torch.tanh(mean) * self.action_scale + self.action_bias

    def deterministic_action(self, x):
        """The tanh of the mean, rescaled: get_action's third output without drawing a sample (an evaluation takes
        nothing from the training's random stream)."""
        return torch.tanh(self(x)[0]) * self.action_scale + self.action_bias


def set_obs_stats(obs, *nets):
    """Standardise the inputs of nets built with normalize_obs=True by the mean and std of obs (N, d), a std under
    1e-3 (a constant feature) counted as 1e-3."""
    obs = torch.as_tensor(obs, dtype=torch.float32)
    mean, std = obs.mean(0), obs.std(0).clamp_min(1e-3)
    for net in nets:
        net.obs_mean.copy_(mean.to(net.obs_mean.device))
        net.obs_std.copy_(std.to(net.obs_std.device))


def soft_q_target(rewards, terminated, next_q1, next_q2, next_log_prob, alpha, gamma):
    """r + gamma (1 - terminated) (min Q'(s',a') - alpha log pi(a'|s')): a truncation is stored as not terminated."""
    next_v = torch.min(next_q1, next_q2) - alpha * next_log_prob
    return rewards + gamma * (1.0 - terminated) * next_v


def policy_fn(actor, device, deterministic):
    """obs batch (numpy or torch) -> actions as numpy; deterministic: the tanh of the mean (evaluation)."""
    @torch.no_grad()
    def act(obs):
        obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        return (actor.deterministic_action(obs) if deterministic else actor.get_action(obs)[0]).cpu().numpy()

    return act


def branched_rollouts(envs, policy, start_obs, seed, horizon):
    """MBPO's branched rollouts: row i starts at the real state start_obs[i] (None: where the envs start it) and runs
    until the horizon (the envs' time limit: a truncation) or a learned termination / halt. Returns the rows' live
    transitions (obs, actions, rewards, next_obs, terminated), never the NEXT_STEP autoreset one after a row ended."""
    # one start state per row goes to a batched env; Sync/AsyncVectorEnv workers start from the model's data instead
    obs = real_env.to_numpy(envs.reset(seed=seed, options=None if start_obs is None else {"states": start_obs})[0])
    alive = np.ones(envs.num_envs, dtype=bool)
    out = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "terminated")}
    for _ in range(horizon):  # every row has ended by then (its horizon is a truncation)
        actions = policy(obs)  # the learner keeps the sampled action; it is clipped where it enters the env
        env_actions = real_env.clip_action(actions, envs.single_action_space)
        if getattr(envs, "output", "numpy") == "torch":
            env_actions = torch.as_tensor(env_actions, device=envs.device)
        next_obs, rewards, terminated, truncated, _ = envs.step(env_actions)
        next_obs, terminated, truncated = (real_env.to_numpy(x) for x in (next_obs, terminated, truncated))
        for key, value in (("obs", obs), ("actions", actions), ("rewards", real_env.to_numpy(rewards)),
                           ("next_obs", next_obs), ("terminated", terminated)):
            out[key].append(value[alive])
        alive &= ~(terminated.astype(bool) | truncated.astype(bool))
        obs = next_obs
        if not alive.any():
            break
    return {k: np.concatenate(v) for k, v in out.items()}


def transitions(log, env_id):
    """`log` (field -> rows, start_obs too) as the TransitionBuffer the world model is (re)fitted on and saved with."""
    return real_env.TransitionBuffer(*(np.asarray(log[k]) for k in (*real_env.TransitionBuffer.FIELDS, "start_obs")),
                                     env_id=env_id)


def save_checkpoints(run, args, model, nets, log, extra=None):
    """dyna.save_checkpoints, the world model with every raw real transition (those since its last refit too);
    `extra` goes into agent.pt beside the real steps."""
    if model is not None and getattr(model, "learns", True) and hasattr(model, "data") and log.get("obs"):
        model.data = transitions(log, args.env_id)
    return dyna.save_checkpoints(run, args, model, nets,
                                 extra={"real_env_steps": run.figures["real_env_steps"], **(extra or {})})


def evaluate_checkpoint(path):
    """Rebuilds a saved actor (and its run's world model) and replays its run's final evaluation."""
    payload = ru.load_agent(path)
    model = dyna.agent_world_model(payload, path)
    real_obs_space, act_space, _ = ru.real_env_spaces(payload["args"]["env_id"], f"{TAG}.py", actions=("Box",))
    obs_space = model.observation_space if model is not None else real_obs_space
    actor = Actor.from_run_args(payload["args"], obs_space.shape[0], act_space)
    actor.load_state_dict(payload["state_dicts"]["actor"])
    return dyna.replay_final_evaluation(TAG, path, policy_fn(actor, "cpu", True), model)


def check_args(args):
    """Every bad flag stops here with one line, before a run dir exists; returns what __main__ starts from."""
    real_obs_space, act_space, reward_threshold = ru.real_env_spaces(args.env_id, f"{TAG}.py", actions=("Box",))
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    model = dyna.model_from_args(args, device)  # None for --world-model none; loads --world-model-path
    ru.check_positive(args, "total_timesteps", "initial_real_steps", "refit_every", "refit_passes",
                      "model_rollout_every", "rollout_batch_size", "imagined_horizon", "model_retain_rollouts",
                      "utd_ratio", "batch_size", "policy_frequency", "target_network_frequency", "eval_episodes",
                      "num_threads", "hidden_size", "stop_after_evals")
    for name in ("real_ratio", "gamma"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ru.ArgError("--" + name.replace("_", "-"), "a value in [0, 1]", getattr(args, name))
    for name in ("halt_threshold", "eval_every"):
        if not getattr(args, name) >= 0:
            raise ru.ArgError("--" + name.replace("_", "-"), "a number >= 0 (0 turns it off)", getattr(args, name))
    check_noise_setting(args, model, dyna.vector_env_kind(args, model))
    if args.target_entropy is not None and not args.autotune:
        raise ru.ArgError("--target-entropy", "no value with --no-autotune (the entropy coefficient is fixed at "
                          f"--alpha {args.alpha})", args.target_entropy, "Drop one of the two flags.")
    fits_here = model is not None and getattr(model, "learns", True) and args.world_model_path is None
    if fits_here and args.total_timesteps <= args.initial_real_steps:
        raise ru.ArgError("--total-timesteps", f"more than --initial-real-steps ({args.initial_real_steps})",
                          args.total_timesteps, "The first ones are random steps for the world model.")
    obs_space = ru.check_policy_observations(model.observation_space if model is not None else real_obs_space,
                                             f"{TAG}.py", args.env_id, args.world_model)
    # the updates cost most of a run (Pendulum's defaults: ~200 s on a quiet 2-core CPU): say so before they start
    print(f"[{TAG}] up to {args.total_timesteps * args.utd_ratio:,} SAC updates: minutes on a CPU for Pendulum, 20-60 "
          "minutes for MuJoCo at 20,000 steps", flush=True)
    return device, model, obs_space, act_space, reward_threshold, fits_here


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_checkpoint is not None:
        evaluate_checkpoint(args.eval_checkpoint)
        sys.exit(0)

    device, model, obs_space, act_space, reward_threshold, fits_here = check_args(args)
    learns, vector_env = model is not None and getattr(model, "learns", True), dyna.vector_env_kind(args, model)
    ru.seed_everything(args.seed, args.num_threads, args.torch_deterministic)

    run = ru.Run(args, TAG, model_free=model is None)
    nets, log = {}, {}  # what the run saves: the agent once it exists; the raw real data the model is saved with
    run.checkpoint = lambda: save_checkpoints(run, args, model, nets, log)
    with run:
        data, run.figures["real_env_steps"] = dyna.initial_data(model, args, run, log=lambda s: print(f"[{TAG}]", s))
        figures, timings, writer = run.figures, run.timings, run.writer
        obs_dim, act_dim = obs_space.shape[0], act_space.shape[0]
        actor = nets["actor"] = Actor(obs_dim, act_space, args.hidden_size).to(device)
        qf = nets["qf"] = SoftQNetworks.from_run_args(vars(args), obs_dim, act_dim).to(device)  # both critics
        qf_target = SoftQNetworks.from_run_args(vars(args), obs_dim, act_dim).to(device)
        qf_target.load_state_dict(qf.state_dict())
        # fused: one kernel for all parameters (on the CPU Adam otherwise loops over them one op at a time)
        q_params, q_target_params = list(qf.parameters()), list(qf_target.parameters())
        q_optimizer = optim.Adam(q_params, lr=args.q_lr, fused=True)
        actor_optimizer = optim.Adam(list(actor.parameters()), lr=args.policy_lr, fused=True)
        if args.autotune:  # automatic entropy tuning
            target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy
            log_alpha = torch.zeros(1, requires_grad=True, device=device)
            alpha = log_alpha.exp().item()
            # log_alpha is a second parameter group of the actor's optimizer: the actor's and alpha's losses share
            # no parameter, so one backward and one step of their sum are the two updates (3% of an update saved)
            actor_optimizer.add_param_group({"params": [log_alpha], "lr": args.q_lr})
        else:
            alpha = args.alpha

        # the real env seen through the model, and the real data in two views: SAC's replay `rb` keeps what the
        # policy sees, the model's `log` the raw real observations with what a model also needs (dyna.RealSteps)
        real = dyna.RealSteps(model, data, args, obs_dim, act_space.shape, log, writer)
        rb = real.rb

        # without the halt rule no branch needs the members' disagreement: a model that can skip it (the ensemble
        # then runs each row's own member only: MBPO's 7-member network spent 391 of 3,345 s in rollouts with it)
        skip_disagreement = ({"disagreement": False} if vector_env == "batched" and args.halt_threshold == 0
                             and "disagreement" in inspect.signature(model.imagined_vector_env).parameters else {})

        def make_envs():  # the batched imagined env, or sync/async workers of single ones loading the saved model
            path = run.checkpoint()["world_model_path"] if vector_env != "batched" else None
            return dyna.imagined_vector_env(model, vector_env, args.rollout_batch_size, args.seed, device,
                                            lambda seed: make_env(args, path, seed, args.imagined_horizon),
                                            horizon=args.imagined_horizon, start="buffer", halt=args.halt_threshold,
                                            gamma=args.gamma, **skip_disagreement, **noise_setting(args))

        if model is not None:
            imagined_envs = make_envs()
            model_rb = ru.ReplayBuffer(args.rollout_batch_size * args.imagined_horizon * args.model_retain_rollouts,
                                       obs_dim, act_space.shape, np.float32, seed=args.seed + 1)
        explore, greedy = policy_fn(actor, device, deterministic=False), policy_fn(actor, device, deterministic=True)
        target = args.target_return if args.target_return is not None else reward_threshold
        evaluator = run.evaluator = dyna.Evaluator(args.env_id, args.seed, args.eval_episodes, writer, target, model)

        # the loop: one real step, then model refits / rollouts when due, then utd_ratio SAC updates
        collected = figures["real_env_steps"] if fits_here else 0  # this run's real steps so far
        since_refit, since_rollout, num_updates = 0, 0, 0
        timings["rollout_seconds"], figures["sac_updates"], figures["rollout_batches"] = 0.0, 0, 0
        global_step = last_eval = figures["global_step"] = figures["real_env_steps"]
        drawn_after = None  # the evaluation (its step) after which the last open-loop picture was drawn
        loop_start, loop_steps = time.time(), args.total_timesteps - collected
        for step in range(loop_steps):
            t0 = time.time()
            global_step = figures["global_step"] = figures["real_env_steps"] = global_step + 1
            real.step(explore, global_step)  # random actions until the replay holds --initial-real-steps
            since_refit, since_rollout = since_refit + 1, since_rollout + 1
            timings["real_collect_seconds"] += time.time() - t0
            if rb.size < args.initial_real_steps:
                continue

            if learns and since_refit >= args.refit_every:  # a warm refit on all real data, its budget the new data
                # the open-loop picture before the first refit after each evaluation: before every refit it was
                # 8% of a 20,000-step HalfCheetah run (76 pictures, 177 s)
                run.add_dyna_round(dyna.refit(model, transitions(log, args.env_id), since_refit,
                                              seed=args.seed + global_step, refit_passes=args.refit_passes,
                                              writer=writer, global_step=global_step, draw=drawn_after != last_eval))
                since_refit, drawn_after = 0, last_eval
                if vector_env != "batched":  # the workers' copies are stale: new workers load the refit model
                    imagined_envs.close()
                    imagined_envs = make_envs()
            if model is not None and (model_rb.size == 0 or since_rollout >= args.model_rollout_every):
                # branched rollouts from real states; a new batch overwrites the oldest in the model buffer
                t0 = time.time()
                batched = vector_env == "batched"  # sync/async workers start from the model's data (see make_env)
                starts = rb.obs[rb.rng.integers(0, rb.size, size=args.rollout_batch_size)] if batched else None
                imagined = branched_rollouts(imagined_envs, explore, starts, args.seed * 1_000_003 + global_step,
                                             args.imagined_horizon)
                model_rb.add(*imagined.values())  # obs, actions, rewards, next_obs, terminated
                figures["imagined_steps"] += len(imagined["obs"])
                figures["rollout_batches"] += 1
                since_rollout = 0
                timings["rollout_seconds"] += time.time() - t0
                writer.add_scalar("world_model/rollout_transitions", len(imagined["obs"]), global_step)
                writer.add_scalar("world_model/rollout_terminated_fraction", imagined["terminated"].mean(), global_step)
                writer.add_scalar("world_model/imagined_steps", figures["imagined_steps"], global_step)

            t0 = time.time()
            num_real = args.batch_size if model is None else int(round(args.real_ratio * args.batch_size))
            # this real step's --utd-ratio batches drawn at once (the buffers do not change in between): each is
            # num_real real rows and the rest from the model buffer, as drawn one at a time, in fewer ops
            batches = rb.sample(num_real * args.utd_ratio, device)
            batches = [t.view(args.utd_ratio, num_real, *t.shape[1:]) for t in batches]
            if num_real < args.batch_size:
                model_batches = model_rb.sample((args.batch_size - num_real) * args.utd_ratio, device)
                batches = [torch.cat((t, m.view(args.utd_ratio, -1, *m.shape[1:])), 1)
                           for t, m in zip(batches, model_batches)]
            for b_obs, b_actions, b_rewards, b_next_obs, b_terminated in zip(*batches):
                num_updates += 1
                with torch.no_grad():
                    next_actions, next_log_prob, _ = actor.get_action(b_next_obs)
                    next_q = qf_target(b_next_obs, next_actions)
                    next_q_value = soft_q_target(b_rewards, b_terminated, next_q[0], next_q[1], next_log_prob, alpha,
                                                 args.gamma)
                q_a_values = qf(b_obs, b_actions)  # (2, B)
                q_losses = (q_a_values - next_q_value).pow(2).mean(1)  # each critic's MSE
                qf_loss = q_losses.sum()
                q_optimizer.zero_grad()
                qf_loss.backward()
                q_optimizer.step()

                if num_updates % args.policy_frequency == 0:  # TD3-style delayed update, compensated in number
                    for _ in range(args.policy_frequency):
                        pi, log_pi, _ = actor.get_action(b_obs)
                        for p in q_params:  # the actor's loss needs no critic weight gradients: two matmuls less
                            p.requires_grad_(False)
                        min_qf_pi = qf(b_obs, pi).min(0).values
                        for p in q_params:
                            p.requires_grad_(True)
                        actor_loss = (alpha * log_pi - min_qf_pi).mean()
                        if args.autotune:  # the entropy of the same sample (as SB3 does), no second forward
                            alpha_loss = (-log_alpha.exp() * (log_pi.detach() + target_entropy)).mean()
                        actor_optimizer.zero_grad()
                        (actor_loss + alpha_loss if args.autotune else actor_loss).backward()
                        actor_optimizer.step()
                        if args.autotune:
                            alpha = log_alpha.exp().item()

                if num_updates % args.target_network_frequency == 0:
                    with torch.no_grad():  # every target parameter in one call
                        torch._foreach_lerp_(q_target_params, q_params, args.tau)
            figures["sac_updates"] = num_updates
            timings["train_seconds"] += time.time() - t0

            sps = int((step + 1) / (time.time() - loop_start))
            if step % 100 == 0 and num_updates >= args.policy_frequency:
                (qf1_value, qf2_value), (qf1_loss, qf2_loss) = q_a_values.mean(1).tolist(), q_losses.tolist()
                for tag, value in {"losses/qf1_values": qf1_value, "losses/qf2_values": qf2_value,
                                   "losses/qf1_loss": qf1_loss, "losses/qf2_loss": qf2_loss,
                                   "losses/qf_loss": qf_loss.item() / 2.0,
                                   "losses/actor_loss": actor_loss.item(), "losses/alpha": alpha,
                                   **({"losses/alpha_loss": alpha_loss.item()} if args.autotune else {}),
                                   "charts/SPS": sps, "charts/real_env_steps": global_step}.items():
                    writer.add_scalar(tag, value, global_step)

            if ru.eval_due(args.eval_every, global_step, last_eval) and step + 1 < loop_steps:
                last_eval = global_step
                entry = evaluator(greedy, global_step, global_step)
                print(f"[{TAG}] step {collected + step + 1}/{args.total_timesteps} real_return "
                      f"{ru.fmt(entry['real_return_mean'])} imagined_return {ru.fmt(entry.get('imagined_return_mean'))}"
                      f" gap {ru.fmt(evaluator.last_gap)} real_steps {global_step} imagined_steps "
                      f"{figures['imagined_steps']} updates {num_updates} SPS {sps} "
                      f"left {int((loop_steps - step - 1) / max(sps, 1))}s", flush=True)
                if args.early_stop and evaluator.solved(args.stop_after_evals):
                    print(f"[{TAG}] the mean return of {args.stop_after_evals} consecutive evaluations reached "
                          f"{target}: stopping", flush=True)
                    break
        real.close()
        if model is not None:
            imagined_envs.close()

        final = evaluator(greedy, global_step, global_step, final=True)
        if args.capture_video:
            import visualize

            visualize.capture_videos(greedy, args.env_id, evaluator.episode_seed(0), run.dir, args.eval_episodes, model)
        # the gap is measured over whole imagined episodes, SAC learns from short branches: refits and the halt help
        run.finish(final, gap_remedy="Refit the model harder (raise --refit-passes, lower --refit-every) or turn the "
                   "halt rule on (--halt-threshold 2).")
