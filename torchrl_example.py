"""TorchRL PPO trained entirely inside a learned world model, judged in the real environment.

The seed tutorial's section 3, made real:
  1. load (or train, when no --world-model-path is given) the reference ensemble world model,
  2. wrap it with TorchRL's `GymWrapper` plus the seed's transforms (`DoubleToFloat`, `StepCounter`) and run
     `check_env_specs` -- on the single `WorldModelEnv` and on the natively batched `WorldModelVectorEnv`
     (GymWrapper accepts gymnasium vector envs in SAME_STEP autoreset mode: one model call steps all envs),
  3. train PPO in imagination with TorchRL's own pieces: a `Collector`, `GAE`, `ClipPPOLoss`,
  4. optionally refit the model on real data collected by the current policy (a short Dyna loop),
  5. judge the policy in the real environment (TorchRL `GymEnv`, deterministic actions),
  6. write TensorBoard logs and `summary.json` to runs/{run_name}/.

Usage:
    python torchrl_example.py
    python torchrl_example.py --world-model-path runs/X/world_model.pt --no-batched
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from gymnasium.vector import AutoresetMode

import train_world_model as twm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (world-model data, world-model fit, imagined envs, agent, evaluation)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available (the default run is CPU-sized and fast on CPU)"""
    env_id: str = "CartPole-v1"
    """the real environment the world model imitates (and the policy is judged in); Discrete actions"""

    # world model
    world_model_path: Optional[str] = None
    """checkpoint written by train_world_model.py; if omitted, one is fit here on real random-policy data
    (Dyna refits extend the real transitions stored in the checkpoint with the new real data; a checkpoint saved
    without them -- older files -- is refit on the new data only; --dyna-iterations 1 keeps the loaded model as is)"""
    wm_random_steps: int = 4000
    """real random-policy transitions used to fit the world model when no --world-model-path is given"""
    wm_fit_epochs: Optional[int] = None
    """max epochs per world-model fit (None: train_world_model.fit_world_model's default, with early stopping)"""
    wm_fit_seconds: Optional[float] = 30.0
    """wall-clock cap per world-model fit in seconds (None: no cap)"""

    # imagined environment
    batched: bool = True
    """GymWrapper around ONE batched WorldModelVectorEnv (one model call per step); --no-batched uses a SerialEnv
    of single WorldModelEnvs instead (one model call per env per step)"""
    num_envs: int = 16
    """number of imagined envs stepped side by side"""
    imagination_horizon: Optional[int] = None
    """trusted imagination horizon: imagined episodes are truncated (and bootstrapped) after this many steps
    (None: the real env's time limit)"""
    start_from: Literal["start", "buffer"] = "start"
    """imagined episodes start from real start observations ("start") or from states in the model's data ("buffer")"""
    dyna_iterations: int = 5
    """train in imagination, then collect real data with the policy and refit the model; repeated this many times"""
    dyna_real_steps: int = 1500
    """real transitions collected with the current policy between two Dyna iterations"""

    # PPO
    total_frames: int = 150_000
    """imagined environment steps over the whole run (split evenly over the Dyna iterations)"""
    frames_per_batch: int = 2048
    """imagined steps per collector batch (all envs together)"""
    update_epochs: int = 20
    """PPO epochs per batch"""
    minibatch_size: int = 256
    """PPO minibatch size"""
    learning_rate: float = 1e-3
    """Adam learning rate (constant: the Dyna refits change the imagined env, so there is no natural schedule end)"""
    gamma: float = 0.98
    """discount factor"""
    gae_lambda: float = 0.8
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO clip range"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient clipping norm"""
    hidden_size: int = 64
    """width of the two hidden layers of the actor and the critic"""

    # evaluation
    eval_episodes: int = 10
    """real-env episodes for the final judgement (deterministic actions)"""


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def fail(field: str, expected: str, got, fix: str) -> None:
    raise SystemExit(f"error: --{field.replace('_', '-')}: expected {expected}, got {got!r}. {fix}")


def validate_args(args: Args) -> None:
    for field in ("num_envs", "total_frames", "frames_per_batch", "update_epochs", "minibatch_size",
                  "dyna_iterations", "eval_episodes", "hidden_size"):
        if getattr(args, field) < 1:
            fail(field, "an integer >= 1", getattr(args, field), "Pass a positive value.")
    for field in ("wm_random_steps", "dyna_real_steps"):
        if getattr(args, field) < 0:
            fail(field, "an integer >= 0", getattr(args, field), "Pass 0 or a positive value.")
    if args.frames_per_batch % args.num_envs:
        fail("frames_per_batch", f"a multiple of --num-envs ({args.num_envs})", args.frames_per_batch,
             f"Use e.g. --frames-per-batch {args.num_envs * max(1, args.frames_per_batch // args.num_envs)}.")
    if args.minibatch_size > args.frames_per_batch:
        fail("minibatch_size", f"at most --frames-per-batch ({args.frames_per_batch})", args.minibatch_size,
             "Lower --minibatch-size or raise --frames-per-batch.")
    if args.world_model_path is None and args.wm_random_steps < 100:
        fail("wm_random_steps", "at least 100 real transitions to fit a world model", args.wm_random_steps,
             "Raise it, or pass --world-model-path to a trained checkpoint.")
    if args.imagination_horizon is not None and args.imagination_horizon < 1:
        fail("imagination_horizon", "None or an integer >= 1", args.imagination_horizon, "Pass a positive horizon.")
    if args.world_model_path is not None and not os.path.isfile(args.world_model_path):
        fail("world_model_path", "an existing checkpoint file", args.world_model_path,
             "Train one with `python train_world_model.py` or omit the flag to train one here.")
    for field in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, field) <= 1.0:
            fail(field, "a value in [0, 1]", getattr(args, field), "Pass e.g. 0.98.")


def fit_kwargs(args: Args) -> dict:
    kwargs = {"max_seconds": args.wm_fit_seconds}
    if args.wm_fit_epochs is not None:
        kwargs["max_epochs"] = args.wm_fit_epochs
    return kwargs


def describe_fit(metrics: dict, args: Args) -> str:
    capped = args.wm_fit_seconds is not None and metrics["seconds"] >= args.wm_fit_seconds
    # early stopping is deterministic; the wall-clock cap is not, so say when it decided
    return (f"{metrics['epochs']} epochs in {metrics['seconds']:.1f}s, val mse {metrics['val_mse']:.4f}"
            + (" (stopped by --wm-fit-seconds: not reproducible)" if capped else ""))


def checkpoint_extra(real_env_steps: int) -> dict:
    """Recorded in the checkpoint like train_world_model.py does, so a later --world-model-path run counts the data."""
    return {"summary": {"real_env_steps": int(real_env_steps)}, "written_by": os.path.basename(__file__)}


def episode_returns(buffer) -> list[float]:
    """Returns of the episodes that finished inside a TransitionBuffer (for logging the Dyna data's real returns)."""
    ends = np.flatnonzero(np.asarray(buffer.terminated) | np.asarray(buffer.truncated))
    rewards = np.asarray(buffer.rewards, dtype=np.float64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [float(rewards[s : e + 1].sum()) for s, e in zip(starts, ends)]


def make_torchrl_env(wm, args: Args, seed: int):
    """The imagined env as a TorchRL env with the seed tutorial's transforms.

    Batched: GymWrapper around one WorldModelVectorEnv. TorchRL only accepts vector envs in SAME_STEP (or
    DISABLED) autoreset mode; it reads infos["final_obs"] and its VecGymEnvTransform puts the true final
    observation in ("next", "observation") of finished rows, so GAE bootstraps truncations from the right state.
    The vector env owns the time limit (StepCounter only counts: a TorchRL-side limit would ask the gym env for a
    partial reset it cannot do). Not batched: a SerialEnv of single WorldModelEnvs, limit by StepCounter as in the
    seed tutorial.
    """
    from torchrl.envs import GymWrapper, SerialEnv, TransformedEnv
    from torchrl.envs.transforms import Compose, DoubleToFloat, RewardSum, StepCounter

    horizon = args.imagination_horizon or wm.max_episode_steps
    if args.batched:
        vector_env = twm.make_imagined_vector_env(
            wm, args.num_envs, seed=seed, max_episode_steps=horizon, autoreset_mode=AutoresetMode.SAME_STEP
        )
        env = GymWrapper(vector_env, categorical_action_encoding=True)  # -> TransformedEnv(env, VecGymEnvTransform)
        env.append_transform(DoubleToFloat())
        env.append_transform(StepCounter())
        env.append_transform(RewardSum())
        return env

    def make_single(i: int):
        return lambda: TransformedEnv(
            GymWrapper(twm.make_imagined_env(wm, seed=seed + i, max_episode_steps=horizon),
                       categorical_action_encoding=True),
            Compose(DoubleToFloat(), StepCounter(max_steps=horizon), RewardSum()),
        )

    env = SerialEnv(args.num_envs, [make_single(i) for i in range(args.num_envs)])
    env.set_seed(seed)
    return env


def make_agent(obs_dim: int, n_actions: int, hidden: int, action_spec):
    """Categorical actor + state-value critic (separate tanh MLPs, CleanRL's PPO initialisation)."""
    from tensordict.nn import TensorDictModule
    from torchrl.modules import ProbabilisticActor, ValueOperator
    from torch.distributions import Categorical

    def layer(i, o, std=np.sqrt(2)):
        lin = torch.nn.Linear(i, o)
        torch.nn.init.orthogonal_(lin.weight, std)
        torch.nn.init.constant_(lin.bias, 0.0)
        return lin

    actor_net = torch.nn.Sequential(layer(obs_dim, hidden), torch.nn.Tanh(), layer(hidden, hidden), torch.nn.Tanh(),
                                    layer(hidden, n_actions, std=0.01))
    critic_net = torch.nn.Sequential(layer(obs_dim, hidden), torch.nn.Tanh(), layer(hidden, hidden), torch.nn.Tanh(),
                                     layer(hidden, 1, std=1.0))
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"], spec=action_spec, distribution_class=Categorical, return_log_prob=True,
    )
    critic = ValueOperator(critic_net, in_keys=["observation"])
    return actor, critic


def evaluate_real(actor, env_id: str, episodes: int, seed: int):
    """Real-env judgement with TorchRL: GymEnv rollouts with the actor's mode (argmax) action."""
    from torchrl.envs import GymEnv
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    env = GymEnv(env_id, categorical_action_encoding=True)
    returns, lengths = [], []
    max_steps = env.spec.max_episode_steps if getattr(env, "spec", None) is not None else None
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for i in range(episodes):
            env.set_seed(seed + i)
            td = env.rollout(max_steps or 100_000, actor, break_when_any_done=True)
            returns.append(float(td["next", "reward"].sum()))
            lengths.append(int(td.shape[0]))
    env.close()
    return np.asarray(returns), np.asarray(lengths)


if __name__ == "__main__":
    args = tyro.cli(Args)
    validate_args(args)

    from tensordict import TensorDict
    from torch.utils.tensorboard import SummaryWriter
    from torchrl.collectors import Collector
    from torchrl.data import LazyTensorStorage, ReplayBuffer
    from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
    from torchrl.envs.utils import ExplorationType, check_env_specs, set_exploration_type
    from torchrl.objectives import ClipPPOLoss
    from torchrl.objectives.value import GAE

    logging.getLogger("torchrl").setLevel(logging.WARNING)  # keep the output to our own status lines
    torch.set_num_threads(1)  # the examples are sized for 2 shared cores; more threads only contend
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )
    start_time = time.time()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # 1. the world model -----------------------------------------------------------------------------------------
    real_env_steps = 0
    data = None
    if args.world_model_path is not None:
        try:
            wm = twm.load_world_model(args.world_model_path, device=str(device), env_id=args.env_id)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise SystemExit(f"error: --world-model-path {args.world_model_path!r}: {e}") from None
        # the real data behind the checkpoint counts too (train_world_model.py records it in the checkpoint)
        real_env_steps += twm.checkpoint_real_steps(wm)
        # its real transitions (already counted above; None if it carries none): Dyna refits extend them
        data = wm.buffer
        print(f"[torchrl] loaded world model from {args.world_model_path}")
    else:
        print(f"[torchrl] fitting a world model on {args.wm_random_steps} real random-policy transitions ...")
        data = twm.collect_transitions(args.env_id, args.wm_random_steps, seed=args.seed)
        real_env_steps += len(data)
        wm, fit = twm.fit_world_model(data, seed=args.seed, device=str(device), **fit_kwargs(args))
        twm.save_world_model(wm, os.path.join(run_dir, "world_model.pt"), extra=checkpoint_extra(real_env_steps),
                             buffer=data)
        print(f"[torchrl] world model: {describe_fit(fit, args)}")
    if not isinstance(wm.action_space, gym.spaces.Discrete):
        raise SystemExit(f"error: --env-id {args.env_id}: this example's actor is Categorical and needs a Discrete "
                         f"action space, got {wm.action_space}. Pick a Discrete-action env such as CartPole-v1.")
    wm.start_from = args.start_from

    # 2. the seed tutorial's wrapping + TorchRL's spec check ------------------------------------------------------
    from torchrl.envs import GymWrapper, TransformedEnv
    from torchrl.envs.transforms import Compose, DoubleToFloat, StepCounter

    horizon = args.imagination_horizon or wm.max_episode_steps
    single = TransformedEnv(
        GymWrapper(twm.make_imagined_env(wm, seed=args.seed, max_episode_steps=horizon),
                   categorical_action_encoding=True),
        Compose(DoubleToFloat(), StepCounter(max_steps=horizon)),
    )
    check_env_specs(single, seed=args.seed)
    single.close()
    env = make_torchrl_env(wm, args, seed=args.seed)
    check_env_specs(env, seed=args.seed)
    print(f"[torchrl] check_env_specs passed (single WorldModelEnv and {'batched' if args.batched else 'serial'} "
          f"env, batch_size {tuple(env.batch_size)})")

    # 3. PPO in imagination ---------------------------------------------------------------------------------------
    obs_dim = int(np.prod(wm.observation_space.shape))
    actor, critic = make_agent(obs_dim, int(wm.action_space.n), args.hidden_size, env.full_action_spec["action"])
    actor, critic = actor.to(device), critic.to(device)
    advantage = GAE(gamma=args.gamma, lmbda=args.gae_lambda, value_network=critic)
    loss_module = ClipPPOLoss(
        actor, critic, clip_epsilon=args.clip_coef, entropy_bonus=args.ent_coef > 0,
        entropy_coeff=args.ent_coef, critic_coeff=args.vf_coef, loss_critic_type="l2",
        normalize_advantage=True,  # per minibatch, as SB3 and CleanRL do
    )
    optimizer = torch.optim.Adam(loss_module.parameters(), lr=args.learning_rate, eps=1e-5)
    replay = ReplayBuffer(
        storage=LazyTensorStorage(args.frames_per_batch, device=device),
        sampler=SamplerWithoutReplacement(), batch_size=args.minibatch_size,
    )
    # whole collector batches per Dyna iteration (rounded up)
    batches_per_iteration = max(1, -(-args.total_frames // (args.dyna_iterations * args.frames_per_batch)))
    frames_per_iteration = batches_per_iteration * args.frames_per_batch
    global_step = 0
    recent_returns: deque[float] = deque(maxlen=50)
    dyna_returns: list[float] = []

    for iteration in range(args.dyna_iterations):
        if iteration > 0:
            env = make_torchrl_env(wm, args, seed=args.seed + iteration)
        collector = Collector(
            env, actor, frames_per_batch=args.frames_per_batch, total_frames=frames_per_iteration, device=device,
            auto_register_policy_transforms=False,  # the MLP policy is stateless: no InitTracker needed
        )
        for batch in collector:
            # batch: [num_envs, T]; finished rows carry the TRUE final obs in ("next", "observation")
            global_step += batch.numel()
            done = batch["next", "done"].squeeze(-1)
            if done.any():  # imagined episodes that ended in this batch (RewardSum / StepCounter at the last step)
                for r, l in zip(batch["next", "episode_reward"][done].squeeze(-1).tolist(),
                                batch["next", "step_count"][done].squeeze(-1).tolist()):
                    recent_returns.append(r)
                    writer.add_scalar("charts/episodic_return", r, global_step)
                    writer.add_scalar("charts/episodic_length", l, global_step)
            with torch.no_grad():
                advantage(batch)  # "terminated" -> no bootstrap; "truncated" -> bootstrap V(final obs)
            flat = batch.reshape(-1)
            replay.extend(flat)
            for _ in range(args.update_epochs):
                for _ in range(args.frames_per_batch // args.minibatch_size):
                    mb = replay.sample()
                    losses = loss_module(mb)
                    loss = losses["loss_objective"] + losses["loss_critic"] + losses.get("loss_entropy", 0.0)
                    optimizer.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(loss_module.parameters(), args.max_grad_norm)
                    optimizer.step()
            collector.update_policy_weights_()
            sps = int(global_step / max(time.time() - start_time, 1e-9))
            ret = np.mean(recent_returns) if recent_returns else float("nan")
            print(f"[torchrl] dyna {iteration + 1}/{args.dyna_iterations} imagined frames {global_step:>7}/"
                  f"{args.dyna_iterations * frames_per_iteration}  imagined return {ret:6.1f}  SPS {sps}"
                  f"  wall {time.time() - start_time:5.0f}s")
            writer.add_scalar("losses/policy_loss", float(losses["loss_objective"].detach()), global_step)
            writer.add_scalar("losses/value_loss", float(losses["loss_critic"].detach()), global_step)
            writer.add_scalar("charts/learning_rate", args.learning_rate, global_step)
            writer.add_scalar("charts/SPS", sps, global_step)
        collector.shutdown()  # also closes env
        if iteration == args.dyna_iterations - 1 or args.dyna_real_steps == 0:
            continue
        # Dyna: real data from the current policy covers the states it actually visits; refit the model on it.
        # The mode action: the new data shows the model where the policy we will judge actually goes.
        def policy_fn(obs: np.ndarray) -> np.ndarray:
            with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
                obs_td = TensorDict({"observation": torch.as_tensor(obs, dtype=torch.float32)}, batch_size=[len(obs)])
                td = actor(obs_td)
            return td["action"].numpy()

        new = twm.collect_transitions(args.env_id, args.dyna_real_steps, seed=args.seed + 1000 * (iteration + 1),
                                      policy=policy_fn)
        real_env_steps += len(new)
        returns = episode_returns(new)
        dyna_returns.extend(returns)
        if data is None:
            data = new
        else:
            data.extend(new)
        wm, fit = twm.fit_world_model(data, model=wm, seed=args.seed + iteration + 1, **fit_kwargs(args))
        wm.start_from = args.start_from
        print(f"[torchrl] dyna {iteration + 1}/{args.dyna_iterations - 1}: {len(new)} real steps with the policy, "
              f"real return {np.mean(returns) if returns else float('nan'):.1f}, model refit on {len(data)}: "
              f"{describe_fit(fit, args)}")
    imagined_steps = global_step
    if data is not None and args.dyna_iterations > 1 and args.dyna_real_steps > 0:  # the refit model
        twm.save_world_model(wm, os.path.join(run_dir, "world_model.pt"), extra=checkpoint_extra(real_env_steps),
                             buffer=data)
    train_seconds = time.time() - start_time

    # 4. the judgement: the real environment ----------------------------------------------------------------------
    ep_returns, ep_lengths = evaluate_real(actor, args.env_id, args.eval_episodes, seed=args.seed + 10_000)
    for i, (r, l) in enumerate(zip(ep_returns, ep_lengths)):
        writer.add_scalar("eval/real_episodic_return", r, i)
        writer.add_scalar("eval/real_episodic_length", l, i)
    wall_seconds = time.time() - start_time
    summary = {
        "script": "torchrl_example.py",
        "env_id": args.env_id,
        "seed": args.seed,
        "real_return_mean": float(np.mean(ep_returns)),
        "real_return_std": float(np.std(ep_returns)),
        "real_returns": [float(r) for r in ep_returns],
        "real_env_steps": int(real_env_steps),
        "real_eval_steps": int(np.sum(ep_lengths)),
        "imagined_steps": int(imagined_steps),
        "wall_seconds": wall_seconds,
        "train_seconds": train_seconds,
        "batched": args.batched,
        "num_envs": args.num_envs,
        "dyna_real_returns_mean": float(np.mean(dyna_returns)) if dyna_returns else None,
        "world_model_path": args.world_model_path,
    }
    torch.save({"actor": actor.state_dict(), "critic": critic.state_dict()}, os.path.join(run_dir, "agent.pt"))
    twm.write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    writer.close()
    print(f"[torchrl] real return {summary['real_return_mean']:.1f} +/- {summary['real_return_std']:.1f} over "
          f"{args.eval_episodes} episodes | real steps {real_env_steps} | imagined steps {imagined_steps} | "
          f"{wall_seconds:.0f}s")
    print(f"[torchrl] wrote {os.path.join(run_dir, 'summary.json')}")
