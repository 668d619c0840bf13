"""TorchRL PPO trained inside a world model (Dyna), judged in the real environment.

  1. load (--world-model-path) or fit the world model named by --world-model (the world-model interface,
     world_model.py; the reference ensemble by default),
  2. wrap its imagined envs with TorchRL's `GymWrapper` (plus `DoubleToFloat`, `StepCounter`, `RewardSum`) and run
     `check_env_specs` on the single env (`model.imagined_env`) and on the batched one (`model.imagined_vector_env`:
     GymWrapper accepts gymnasium vector envs in SAME_STEP autoreset mode, so one model call steps all envs;
     --vector-env sync|async: gymnasium's SyncVectorEnv / AsyncVectorEnv of single imagined envs instead),
  3. PPO in imagination with TorchRL's own pieces: `Collector`, `GAE`, `ClipPPOLoss`; the actor is
     Categorical for Discrete actions and `TanhNormal` (squashed into the action bounds) for Box actions,
  4. between phases: Dyna rounds (real data from the current policy, warm refit of the model) and real evaluation,
  5. the final judgement in the real env; TensorBoard logs and summary.json in runs/{run_name}/.

The policy acts on what the model shows: the networks and specs come from the imagined env's spaces, and the real
env is seen through `model.real_env`.

Usage:
    python torchrl_example.py                              # CartPole-v1
    python torchrl_example.py --env-id Pendulum-v1         # Box actions: TanhNormal actor
    python torchrl_example.py --world-model-path runs/X/world_model.pt
    python torchrl_example.py --world-model examples/cartpole_physics.py:CartPolePhysics   # a given simulator
    python torchrl_example.py --eval-checkpoint runs/X/agent.pt
"""
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from gymnasium.vector import AutoresetMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dyna  # noqa: E402
import rl_utils as ru  # noqa: E402
import world_model  # noqa: E402

TAG = "torchrl_example"


@dataclass
class Args(ru.DynaArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """The name of this experiment (the run dir is runs/{env_id}__{exp_name}__{seed}__{time})."""
    total_timesteps: Optional[int] = None
    """Imagined environment steps over the whole run, split evenly over the phases in whole collector batches.
    None: 150000 for Discrete actions, 400000 for Box actions."""
    num_envs: int = 16
    """The number of imagined envs stepped side by side by one batched model call."""
    frames_per_batch: int = 2048
    """Imagined steps per collector batch (all envs together); a multiple of --num-envs."""
    update_epochs: Optional[int] = None
    """PPO epochs per batch; None: 20 for Discrete actions, 10 for Box actions."""
    minibatch_size: int = 256
    """The PPO minibatch size."""
    learning_rate: float = 1e-3
    """The Adam learning rate (constant: the Dyna refits change the imagined env, so there is no natural end)."""
    gamma: Optional[float] = None
    """The discount factor; None: 0.98 for Discrete actions, 0.9 for Box actions."""
    gae_lambda: Optional[float] = None
    """The GAE lambda; None: 0.8 for Discrete actions, 0.95 for Box actions."""
    reward_scale: Optional[float] = None
    """Rewards are multiplied by this for GAE and the critic (logged returns are unscaled).
    None: 1 for Discrete actions, 0.1 for Box actions."""
    clip_coef: float = 0.2
    """The PPO clip range."""
    ent_coef: float = 0.0
    """The entropy bonus coefficient."""
    vf_coef: float = 0.5
    """The value loss coefficient."""
    max_grad_norm: float = 0.5
    """The gradient clipping norm (actor and critic separately)."""
    hidden_size: int = 64
    """The width of the two hidden layers of the actor and the critic."""


# Defaults that depend on the action space: CartPole's tuned PPO values / rl-zoo's Pendulum PPO values
DEFAULTS = {
    "Discrete": dict(total_timesteps=150_000, update_epochs=20, gamma=0.98, gae_lambda=0.8, reward_scale=1.0),
    "Box": dict(total_timesteps=400_000, update_epochs=10, gamma=0.9, gae_lambda=0.95, reward_scale=0.1),
}


def imagined_settings(args: Args) -> dict:
    """The imagined env's horizon, start states and halt rule (its penalty uses the learner's discount)."""
    return dict(horizon=args.imagined_horizon, start=args.imagined_start, halt=args.halt_threshold, gamma=args.gamma)


def make_env(args: Args, model_path: Optional[str], seed: int):
    """CleanRL's make_env, for imagined envs stepped one per env (--vector-env sync|async): the thunk builds and
    loads its own copy of the world model, so that AsyncVectorEnv workers share nothing."""

    def thunk():
        torch.set_num_threads(1)
        model = world_model.make(args.world_model, env_id=args.env_id, seed=seed)
        model = model.load(model_path) if model_path else model
        return model.imagined_env(seed=seed, **imagined_settings(args))

    return thunk


def imagined_vector_env(model, args: Args, kind: str, seed: int, model_path=None) -> gym.vector.VectorEnv:
    """The imagined envs, in SAME_STEP autoreset mode (the one TorchRL's GymWrapper accepts): the model's batched
    env, or gymnasium's SyncVectorEnv / AsyncVectorEnv (spawned workers) of `make_env` thunks."""
    if kind == "batched":
        return model.imagined_vector_env(args.num_envs, seed=seed, autoreset_mode=AutoresetMode.SAME_STEP,
                                         **imagined_settings(args))
    thunks = [make_env(args, model_path, seed + i) for i in range(args.num_envs)]
    if kind == "sync":
        return gym.vector.SyncVectorEnv(thunks, autoreset_mode=AutoresetMode.SAME_STEP)
    return gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=AutoresetMode.SAME_STEP)


def make_torchrl_env(vector_env: gym.vector.VectorEnv, reward_scale: float):
    """The imagined envs as one TorchRL env: GymWrapper around a SAME_STEP gymnasium vector env.

    TorchRL only accepts vector envs in SAME_STEP (or DISABLED) autoreset mode; it reads infos["final_obs"] and
    its VecGymEnvTransform puts the true final observation in ("next", "observation") of finished rows, so GAE
    bootstraps truncations from the right state. The vector env owns the time limit (StepCounter only counts).
    RewardSum sees the true reward (for logging); RewardScaling then scales what GAE and the critic see.
    """
    from torchrl.envs import GymWrapper
    from torchrl.envs.transforms import DoubleToFloat, RewardScaling, RewardSum, StepCounter

    env = GymWrapper(vector_env, categorical_action_encoding=True)  # -> TransformedEnv(env, VecGymEnvTransform)
    for transform in (DoubleToFloat(), StepCounter(), RewardSum(), RewardScaling(loc=0.0, scale=reward_scale)):
        env.append_transform(transform)
    return env


def layer(i: int, o: int, std: float = np.sqrt(2)) -> torch.nn.Linear:
    lin = torch.nn.Linear(i, o)
    torch.nn.init.orthogonal_(lin.weight, std)
    torch.nn.init.constant_(lin.bias, 0.0)
    return lin


def make_agent(observation_space: gym.Space, action_space: gym.Space, hidden: int, action_spec=None):
    """Actor (Categorical over logits, or TanhNormal with a state-independent scale) and state-value critic:
    separate tanh MLPs with CleanRL's PPO initialisation."""
    from tensordict.nn import AddStateIndependentNormalScale, TensorDictModule
    from torch.distributions import Categorical
    from torchrl.modules import ProbabilisticActor, TanhNormal, ValueOperator

    obs_dim = int(np.prod(observation_space.shape))
    discrete = isinstance(action_space, gym.spaces.Discrete)
    out_dim = int(action_space.n) if discrete else int(np.prod(action_space.shape))

    def mlp(out, std):
        return [layer(obs_dim, hidden), torch.nn.Tanh(), layer(hidden, hidden), torch.nn.Tanh(), layer(hidden, out, std)]

    if discrete:
        net, out_keys, dist, dist_kwargs = torch.nn.Sequential(*mlp(out_dim, 0.01)), ["logits"], Categorical, {}
    else:
        net = torch.nn.Sequential(*mlp(out_dim, 0.01), AddStateIndependentNormalScale(out_dim))
        out_keys, dist = ["loc", "scale"], TanhNormal
        dist_kwargs = {"low": torch.as_tensor(action_space.low), "high": torch.as_tensor(action_space.high)}
    actor = ProbabilisticActor(TensorDictModule(net, in_keys=["observation"], out_keys=out_keys), in_keys=out_keys,
                               spec=action_spec, distribution_class=dist, distribution_kwargs=dist_kwargs,
                               return_log_prob=True)
    critic = ValueOperator(torch.nn.Sequential(*mlp(1, 1.0)), in_keys=["observation"])
    return actor, critic


def numpy_policy(actor, exploration, device):
    """obs batch (numpy) -> actions (numpy): the mode (DETERMINISTIC) or a sample (RANDOM) of the actor."""
    from tensordict import TensorDict
    from torchrl.envs.utils import set_exploration_type

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad(), set_exploration_type(exploration):
            obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
            return actor(TensorDict({"observation": obs_t}, batch_size=[len(obs)]))["action"].cpu().numpy()

    return act


def check_args(args: Args, action_space: gym.Space) -> None:
    """Every bad flag stops here with one line, before a run dir exists; fills in the action space's defaults."""
    dyna.imagination_only(args, f"{TAG}.py")
    for name, value in DEFAULTS[type(action_space).__name__].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    ru.check_positive(args, "num_envs", "frames_per_batch", "update_epochs", "minibatch_size", "hidden_size",
                      "learning_rate", "reward_scale")
    ru.check_dyna_args(args)
    if args.frames_per_batch % args.num_envs:
        raise ru.ArgError("--frames-per-batch", f"a multiple of --num-envs ({args.num_envs})", args.frames_per_batch,
                          f"Use e.g. --frames-per-batch {args.num_envs * max(1, args.frames_per_batch // args.num_envs)}.")
    if args.minibatch_size > args.frames_per_batch:
        raise ru.ArgError("--minibatch-size", f"at most --frames-per-batch ({args.frames_per_batch})",
                          args.minibatch_size)
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ru.ArgError("--" + name.replace("_", "-"), "a value in [0, 1]", getattr(args, name))


def evaluate_checkpoint(path: str) -> dict:
    """Rebuilds a saved actor (and its run's world model: what it acts on) and replays its run's final evaluation."""
    from torchrl.envs.utils import ExplorationType

    payload = ru.load_agent(path)
    if "actor" not in payload["state_dicts"]:
        raise ru.ArgError("--eval-checkpoint", f"an agent.pt written by {TAG}.py", path,
                          f"It holds {sorted(payload['state_dicts'])}; replay it with the script that wrote it.")
    model = dyna.agent_world_model(payload, path)
    actor, _ = make_agent(model.observation_space, model.action_space, payload["args"]["hidden_size"])
    actor.load_state_dict(payload["state_dicts"]["actor"])
    return dyna.replay_final_evaluation(TAG, path, numpy_policy(actor, ExplorationType.DETERMINISTIC, "cpu"), model)


if __name__ == "__main__":
    args = tyro.cli(Args)
    from torchrl.collectors import Collector
    from torchrl.data import LazyTensorStorage, ReplayBuffer
    from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
    from torchrl.envs import GymWrapper, TransformedEnv
    from torchrl.envs.transforms import DoubleToFloat, StepCounter
    from torchrl.envs.utils import ExplorationType, check_env_specs
    from torchrl.objectives import ClipPPOLoss
    from torchrl.objectives.value import GAE

    logging.getLogger("torchrl").setLevel(logging.WARNING)  # keep the output to our own status lines
    if args.eval_checkpoint is not None:
        evaluate_checkpoint(args.eval_checkpoint)
        sys.exit(0)
    _, act_space, threshold = ru.real_env_spaces(args.env_id, f"{TAG}.py")
    check_args(args, act_space)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    model = dyna.model_from_args(args, device)  # loads --world-model-path
    dyna.check_model(args, model, f"{TAG}.py")
    vector_env = dyna.vector_env_kind(args, model)
    ru.seed_everything(args.seed, args.num_threads, args.torch_deterministic)

    run = ru.Run(args, TAG)
    nets = {}  # what the run saves (finished, interrupted or failed): actor and critic once they exist, and the model
    run.checkpoint = lambda: dyna.save_checkpoints(run, args, model, nets)
    with run:
        # 1. the world model, its imagined envs wrapped for TorchRL, and TorchRL's spec check ------------------------
        data, run.figures["real_env_steps"] = dyna.initial_data(model, args, run, log=lambda s: print(f"[{TAG}] {s}"))
        single = TransformedEnv(GymWrapper(model.imagined_env(seed=args.seed, **imagined_settings(args)),
                                           categorical_action_encoding=True), DoubleToFloat())
        single.append_transform(StepCounter(max_steps=args.imagined_horizon
                                            or getattr(model, "max_episode_steps", None)))
        check_env_specs(single, seed=args.seed)
        single.close()

        def make_envs():  # sync/async workers load the model as saved now (the refit one after a Dyna round)
            path = run.checkpoint()["world_model_path"] if vector_env != "batched" else None
            return imagined_vector_env(model, args, vector_env, args.seed, path)

        envs = make_envs()  # the gymnasium vector env: its spaces are what the policy sees
        env = make_torchrl_env(envs, args.reward_scale)
        check_env_specs(env, seed=args.seed)
        print(f"[{TAG}] check_env_specs passed (single imagined env and {vector_env} env, batch_size "
              f"{tuple(env.batch_size)})")
        rounds = dyna.DynaRounds(run, args, model, data, target=threshold)
        writer = run.writer

        # 2. PPO in imagination: the networks and the action spec come from the imagined env -------------------------
        obs_space = ru.check_policy_observations(envs.single_observation_space, f"{TAG}.py", args.env_id,
                                                 args.world_model)
        actor, critic = make_agent(obs_space, envs.single_action_space, args.hidden_size,
                                   env.full_action_spec["action"])
        actor, critic = nets["actor"], nets["critic"] = actor.to(device), critic.to(device)
        advantage = GAE(gamma=args.gamma, lmbda=args.gae_lambda, value_network=critic)
        loss_module = ClipPPOLoss(actor, critic, clip_epsilon=args.clip_coef, entropy_bonus=args.ent_coef > 0,
                                  entropy_coeff=args.ent_coef, critic_coeff=args.vf_coef, loss_critic_type="l2",
                                  normalize_advantage=True)  # per minibatch, as SB3 and CleanRL do
        optimizer = torch.optim.Adam(loss_module.parameters(), lr=args.learning_rate, eps=1e-5)
        replay = ReplayBuffer(storage=LazyTensorStorage(args.frames_per_batch, device=device),
                              sampler=SamplerWithoutReplacement(), batch_size=args.minibatch_size)
        phase_frames = [rounds.phase_steps(p, unit=args.frames_per_batch) for p in range(rounds.num_phases)]
        phase_ends = np.cumsum(phase_frames)

        def make_collector(frames):
            return Collector(env, actor, frames_per_batch=args.frames_per_batch, total_frames=int(frames),
                             device=device, auto_register_policy_transforms=False)  # a stateless MLP policy

        collector = make_collector(phase_ends[-1])
        batches_left = iter(collector)
        act_fn = numpy_policy(actor, ExplorationType.DETERMINISTIC, device)
        explore_fn = numpy_policy(actor, ExplorationType.RANDOM, device)
        global_step, phase, batches, t_phase, phase_start = 0, 0, 0, time.time(), 0
        recent: deque = deque(maxlen=50)
        while global_step < phase_ends[-1]:
            batch = next(batches_left)
            # batch: [num_envs, T]; finished rows carry the TRUE final obs in ("next", "observation")
            global_step += batch.numel()
            batches += 1
            run.figures["global_step"] = run.figures["imagined_steps"] = global_step
            done = batch["next", "done"].squeeze(-1)
            for r, length in zip(batch["next", "episode_reward"][done].squeeze(-1).tolist(),
                                 batch["next", "step_count"][done].squeeze(-1).tolist()):
                recent.append(r)
                writer.add_scalar("charts/episodic_return", r, global_step)
                writer.add_scalar("charts/episodic_length", length, global_step)
            with torch.no_grad():
                advantage(batch)  # "terminated" -> no bootstrap; "truncated" -> bootstrap with V(final obs)
            replay.extend(batch.reshape(-1))
            for _ in range(args.update_epochs):
                for _ in range(args.frames_per_batch // args.minibatch_size):
                    losses = loss_module(replay.sample())
                    loss = losses["loss_objective"] + losses["loss_critic"] + losses.get("loss_entropy", 0.0)
                    optimizer.zero_grad()
                    loss.backward()
                    for net in (actor, critic):  # separately: the critic's large early gradients must not
                        torch.nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm)  # mute the actor's
                    optimizer.step()
            collector.update_policy_weights_()
            sps = (global_step - phase_start) / max(time.time() - t_phase, 1e-9)
            imagined_return = float(np.mean(recent)) if recent else None
            writer.add_scalar("losses/policy_loss", float(losses["loss_objective"].detach()), global_step)
            writer.add_scalar("losses/value_loss", float(losses["loss_critic"].detach()), global_step)
            writer.add_scalar("charts/SPS", sps, global_step)
            if global_step >= phase_ends[phase]:
                run.timings["train_seconds"] += time.time() - t_phase
                refits = rounds.refits
                rounds.end_phase(phase, global_step, act_fn, explore_fn)
                rounds.status(phase, global_step, imagined_return, sps)
                # the batched env holds the model, which is refit in place; sync/async workers hold stale copies
                if rounds.refits > refits and vector_env != "batched":
                    collector.shutdown()  # also closes env
                    env = make_torchrl_env(make_envs(), args.reward_scale)
                    collector = make_collector(phase_ends[-1] - global_step)
                    batches_left = iter(collector)
                phase, t_phase, phase_start = phase + 1, time.time(), global_step
            elif batches % 10 == 0:
                rounds.status(phase, global_step, imagined_return, sps)
        collector.shutdown()  # also closes env

        # 3. the judgement in the real env, summary.json ------------------------------------------------------------
        rounds.finish(act_fn, global_step)
