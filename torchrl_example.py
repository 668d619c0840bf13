"""TorchRL PPO trained inside a learned world model (Dyna), judged in the real environment.

  1. load (--world-model-path) or fit the reference ensemble world model (world_model.py),
  2. wrap it with TorchRL's `GymWrapper` (plus `DoubleToFloat`, `StepCounter`, `RewardSum`) and run
     `check_env_specs` on the single `WorldModelEnv` and on the natively batched `WorldModelVectorEnv`
     (GymWrapper accepts gymnasium vector envs in SAME_STEP autoreset mode: one model call steps all envs),
  3. PPO in imagination with TorchRL's own pieces: `Collector`, `GAE`, `ClipPPOLoss`; the actor is
     Categorical for Discrete actions and `TanhNormal` (squashed into the action bounds) for Box actions,
  4. between phases: Dyna rounds (real data from the current policy, warm refit of the model) and real evaluation,
  5. the final judgement in the real env; TensorBoard logs and summary.json in runs/{run_name}/.

Usage:
    python torchrl_example.py                              # CartPole-v1
    python torchrl_example.py --env-id Pendulum-v1         # Box actions: TanhNormal actor
    python torchrl_example.py --world-model-path runs/X/world_model.pt
    python torchrl_example.py --eval-checkpoint runs/X/agent.pt
"""
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from gymnasium.vector import AutoresetMode

import rl_utils as rl
import world_model as wm

TAG = "torchrl_example"


@dataclass
class Args(rl.DynaArgs):
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


def make_torchrl_env(model, args: Args, seed: int):
    """The imagined env as a TorchRL env: GymWrapper around one batched WorldModelVectorEnv.

    TorchRL only accepts vector envs in SAME_STEP (or DISABLED) autoreset mode; it reads infos["final_obs"] and
    its VecGymEnvTransform puts the true final observation in ("next", "observation") of finished rows, so GAE
    bootstraps truncations from the right state. The vector env owns the time limit (StepCounter only counts).
    RewardSum sees the true reward (for logging); RewardScaling then scales what GAE and the critic see.
    """
    from torchrl.envs import GymWrapper
    from torchrl.envs.transforms import DoubleToFloat, RewardScaling, RewardSum, StepCounter

    vector_env = wm.make_imagined_vector_env(
        model, args.num_envs, seed=seed, horizon=args.imagined_horizon, start=args.imagined_start,
        halt=args.halt_threshold, gamma=args.gamma, autoreset_mode=AutoresetMode.SAME_STEP)
    env = GymWrapper(vector_env, categorical_action_encoding=True)  # -> TransformedEnv(env, VecGymEnvTransform)
    for transform in (DoubleToFloat(), StepCounter(), RewardSum(), RewardScaling(loc=0.0, scale=args.reward_scale)):
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


def check_args(args: Args) -> None:
    rl.check_positive(args, "num_envs", "frames_per_batch", "update_epochs", "minibatch_size", "hidden_size",
                      "learning_rate", "reward_scale")
    rl.check_dyna_args(args)
    if args.frames_per_batch % args.num_envs:
        raise rl.ArgError("--frames-per-batch", f"a multiple of --num-envs ({args.num_envs})", args.frames_per_batch,
                          f"Use e.g. --frames-per-batch {args.num_envs * max(1, args.frames_per_batch // args.num_envs)}.")
    if args.minibatch_size > args.frames_per_batch:
        raise rl.ArgError("--minibatch-size", f"at most --frames-per-batch ({args.frames_per_batch})",
                          args.minibatch_size)
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise rl.ArgError("--" + name.replace("_", "-"), "a value in [0, 1]", getattr(args, name))


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
        payload = rl.load_agent(args.eval_checkpoint)
        obs_space, act_space, _ = rl.real_env_spaces(payload["args"]["env_id"], TAG)
        actor, _ = make_agent(obs_space, act_space, payload["args"]["hidden_size"])
        actor.load_state_dict(payload["state_dicts"]["actor"])
        rl.replay_final_evaluation(TAG, args.eval_checkpoint, payload,
                                   numpy_policy(actor, ExplorationType.DETERMINISTIC, "cpu"))
        raise SystemExit(0)
    obs_space, act_space, threshold = rl.real_env_spaces(args.env_id, TAG)
    for name, value in DEFAULTS[type(act_space).__name__].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(args)
    rl.seed_everything(args.seed, args.num_threads, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    start_time = time.time()

    # 1. the world model, wrapped for TorchRL, and TorchRL's spec check ----------------------------------------------
    model, buffer, real_env_steps, wm_seconds = rl.world_model_for(args, device, TAG)
    single = TransformedEnv(GymWrapper(wm.make_imagined_env(model, seed=args.seed, horizon=args.imagined_horizon,
                                                            start=args.imagined_start, halt=args.halt_threshold,
                                                            gamma=args.gamma), categorical_action_encoding=True),
                            DoubleToFloat())
    single.append_transform(StepCounter(max_steps=args.imagined_horizon or model.max_episode_steps))
    check_env_specs(single, seed=args.seed)
    single.close()
    env = make_torchrl_env(model, args, seed=args.seed)
    check_env_specs(env, seed=args.seed)
    print(f"[{TAG}] check_env_specs passed (single WorldModelEnv and batched env, batch_size {tuple(env.batch_size)})")
    run_name, run_dir, writer = rl.start_run(args, TAG)
    try:
        dyna = rl.DynaRounds(TAG, args, model, buffer, real_env_steps, writer, target=threshold,
                             world_model_seconds=wm_seconds, start_time=start_time)

        # 2. PPO in imagination ----------------------------------------------------------------------------------
        actor, critic = make_agent(obs_space, act_space, args.hidden_size, env.full_action_spec["action"])
        actor, critic = actor.to(device), critic.to(device)
        advantage = GAE(gamma=args.gamma, lmbda=args.gae_lambda, value_network=critic)
        loss_module = ClipPPOLoss(actor, critic, clip_epsilon=args.clip_coef, entropy_bonus=args.ent_coef > 0,
                                  entropy_coeff=args.ent_coef, critic_coeff=args.vf_coef, loss_critic_type="l2",
                                  normalize_advantage=True)  # per minibatch, as SB3 and CleanRL do
        optimizer = torch.optim.Adam(loss_module.parameters(), lr=args.learning_rate, eps=1e-5)
        replay = ReplayBuffer(storage=LazyTensorStorage(args.frames_per_batch, device=device),
                              sampler=SamplerWithoutReplacement(), batch_size=args.minibatch_size)
        phase_frames = [dyna.phase_steps(p, unit=args.frames_per_batch) for p in range(dyna.num_phases)]
        phase_ends = np.cumsum(phase_frames)
        collector = Collector(env, actor, frames_per_batch=args.frames_per_batch, total_frames=int(phase_ends[-1]),
                              device=device, auto_register_policy_transforms=False)  # a stateless MLP policy
        act_fn = numpy_policy(actor, ExplorationType.DETERMINISTIC, device)
        explore_fn = numpy_policy(actor, ExplorationType.RANDOM, device)
        global_step, phase, batches, t_phase, phase_start = 0, 0, 0, time.time(), 0
        recent: deque = deque(maxlen=50)
        for batch in collector:
            # batch: [num_envs, T]; finished rows carry the TRUE final obs in ("next", "observation")
            global_step += batch.numel()
            batches += 1
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
                dyna.timings["train_seconds"] += time.time() - t_phase
                dyna.end_phase(phase, global_step, act_fn, explore_fn)
                dyna.status(phase, global_step, imagined_return, sps)
                phase, t_phase, phase_start = phase + 1, time.time(), global_step
            elif batches % 10 == 0:
                dyna.status(phase, global_step, imagined_return, sps)
        collector.shutdown()  # also closes env

        # 3. the judgement in the real env, summary.json ------------------------------------------------------------
        agent_path = rl.save_agent(os.path.join(run_dir, "agent.pt"),
                                   {"actor": actor.state_dict(), "critic": critic.state_dict()}, args,
                                   args.world_model_path)
        dyna.finish(act_fn, global_step, run_dir, agent_path=agent_path, scale=threshold)
    finally:
        rl.remove_run_dir_without_summary(run_dir)
