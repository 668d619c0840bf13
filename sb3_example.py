"""Stable-Baselines3 trained entirely inside a learned world model, judged in the real environment.

The seed tutorial's section 2, made real:
  1. load (or train, when no --world-model-path is given) the reference ensemble world model,
  2. wrap it as a Gymnasium `WorldModelEnv` and run SB3's `check_env` on it,
  3. train SB3 PPO (or DQN) on imagined experience only. With --n-envs > 1 the batched world model is driven
     through `WorldModelSB3VecEnv`, an SB3 `VecEnv` adapter that steps all envs with ONE model call,
  4. optionally refit the model on real data collected by the current policy (a short Dyna loop),
  5. judge the policy with SB3's `evaluate_policy` on the real environment,
  6. write TensorBoard logs and `summary.json` to runs/{run_name}/.

Usage:
    python sb3_example.py                                  # trains the world model, then PPO in imagination
    python sb3_example.py --world-model-path runs/X/world_model.pt --algo dqn
    python sb3_example.py --speedup-n-envs 8 64            # also time the VecEnv adapter against DummyVecEnv
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

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
    """the real environment the world model imitates (and the policy is judged in)"""

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

    # agent
    algo: Literal["ppo", "dqn"] = "ppo"
    """the SB3 algorithm trained in imagination"""
    n_envs: int = 16
    """number of imagined envs; > 1 drives the batched world model through WorldModelSB3VecEnv (one model call/step)"""
    total_imagined_steps: int = 150_000
    """imagined environment steps over the whole run (split evenly over the Dyna iterations)"""
    imagination_horizon: Optional[int] = None
    """trusted imagination horizon: imagined episodes are truncated (and bootstrapped) after this many steps
    (None: the real env's time limit)"""
    start_from: Literal["start", "buffer"] = "start"
    """imagined episodes start from real start observations ("start") or from states in the model's data ("buffer")"""
    dyna_iterations: int = 5
    """train in imagination, then collect real data with the policy and refit the model; repeated this many times"""
    dyna_real_steps: int = 1500
    """real transitions collected with the current policy between two Dyna iterations"""

    # evaluation and reporting
    eval_episodes: int = 10
    """real-env episodes for the final judgement (SB3 evaluate_policy, deterministic actions)"""
    check_env: bool = True
    """run SB3's check_env on the single WorldModelEnv first"""
    speedup_n_envs: tuple[int, ...] = ()
    """n_envs values at which to time WorldModelSB3VecEnv against DummyVecEnv of single WorldModelEnvs
    (empty: just --n-envs, when it is > 1)"""
    speedup_steps: int = 100
    """vector steps per timing repeat (median of 3 repeats)"""
    status_every: int = 10_000
    """print a status line every this many imagined steps"""


# ----------------------------------------------------------------------------------------------------------------
# SB3 VecEnv adapter around the natively batched world model
# ----------------------------------------------------------------------------------------------------------------
class WorldModelSB3VecEnv(VecEnv):
    """SB3 `VecEnv` over a `WorldModelVectorEnv`: one batched model call steps all `num_envs` imagined envs.

    The wrapped env must use gymnasium's SAME_STEP autoreset. SB3's VecEnv API has no "reset step": when a row
    finishes, the observation returned by that very step must already be the first observation of the next episode
    and the true final observation goes to `infos[i]["terminal_observation"]`. SAME_STEP gives exactly that. With
    NEXT_STEP we would have to spend a model call on a dummy step and hide a fake transition from PPO/DQN.
    Time-limit truncation is reported as `infos[i]["TimeLimit.truncated"]`, which PPO uses to bootstrap with
    V(final obs) and DQN's replay buffer uses to not treat the step as terminal.
    """

    def __init__(self, vector_env: gym.vector.VectorEnv):
        mode = vector_env.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"WorldModelSB3VecEnv needs a vector env with autoreset_mode=AutoresetMode.SAME_STEP, got {mode}. "
                "Create it with make_imagined_vector_env(..., autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)."
            )
        self.vector_env = vector_env
        self._actions: np.ndarray | None = None
        super().__init__(vector_env.num_envs, vector_env.single_observation_space, vector_env.single_action_space)

    def reset(self) -> VecEnvObs:
        # SB3 convention: seed()/set_options() are consumed by the next reset only (SB3 seeds row i with seed+i).
        seeds = self._seeds if any(s is not None for s in self._seeds) else None
        options = self._options[0] or None  # one model for all rows: row 0's options apply to all
        obs, _ = self.vector_env.reset(seed=seeds, options=options)
        self.reset_infos = [{} for _ in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs  # WorldModelVectorEnv hands out fresh arrays the caller owns

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, info = self.vector_env.step(self._actions)
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        dones = terminated | truncated
        # One (empty) dict per env; only finished rows get the SB3 keys, so a step costs O(num_envs) tiny dicts.
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if dones.any():
            final_obs = info["final_obs"]
            for i in np.flatnonzero(dones):
                infos[i]["terminal_observation"] = np.asarray(final_obs[i])
                infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, np.asarray(rewards, dtype=np.float32), dones, infos

    def close(self) -> None:
        self.vector_env.close()

    # The rows share one model, so "per-env" attributes/methods are those of the single vector env.
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.vector_env, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.vector_env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        result = getattr(self.vector_env, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]  # rows are not gym.Env objects, so never wrapped


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def fail(field: str, expected: str, got: Any, fix: str) -> None:
    raise SystemExit(f"error: --{field.replace('_', '-')}: expected {expected}, got {got!r}. {fix}")


def validate_args(args: Args) -> None:
    for field in ("n_envs", "total_imagined_steps", "dyna_iterations", "eval_episodes", "speedup_steps",
                  "status_every"):
        if getattr(args, field) < 1:
            fail(field, "an integer >= 1", getattr(args, field), "Pass a positive value.")
    for field in ("wm_random_steps", "dyna_real_steps"):
        if getattr(args, field) < 0:
            fail(field, "an integer >= 0", getattr(args, field), "Pass 0 or a positive value.")
    if args.world_model_path is None and args.wm_random_steps < 100:
        fail("wm_random_steps", "at least 100 real transitions to fit a world model", args.wm_random_steps,
             "Raise it, or pass --world-model-path to a trained checkpoint.")
    if args.imagination_horizon is not None and args.imagination_horizon < 1:
        fail("imagination_horizon", "None or an integer >= 1", args.imagination_horizon, "Pass a positive horizon.")
    if any(n < 1 for n in args.speedup_n_envs):
        fail("speedup_n_envs", "integers >= 1", args.speedup_n_envs, "Pass e.g. --speedup-n-envs 8 64.")
    if args.world_model_path is not None and not os.path.isfile(args.world_model_path):
        fail("world_model_path", "an existing checkpoint file", args.world_model_path,
             "Train one with `python train_world_model.py` or omit the flag to train one here.")


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


def fit_kwargs(args: Args) -> dict:
    kwargs = {"max_seconds": args.wm_fit_seconds}
    if args.wm_fit_epochs is not None:
        kwargs["max_epochs"] = args.wm_fit_epochs
    return kwargs


def make_sb3_env(wm, args: Args, seed: int) -> VecEnv:
    """The imagined training env as an SB3 VecEnv, with VecMonitor for episode statistics."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

    if args.n_envs > 1:
        venv = WorldModelSB3VecEnv(
            twm.make_imagined_vector_env(
                wm, args.n_envs, seed=seed, max_episode_steps=args.imagination_horizon,
                autoreset_mode=AutoresetMode.SAME_STEP,
            )
        )
        return VecMonitor(venv)
    horizon = args.imagination_horizon
    return DummyVecEnv([lambda: Monitor(twm.make_imagined_env(wm, seed=seed, max_episode_steps=horizon))])


def measure_vecenv_speedup(wm, n_envs: int, steps: int, seed: int, repeats: int = 3) -> dict:
    """Imagined env steps per second: WorldModelSB3VecEnv (one batched model call) vs DummyVecEnv of single envs."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    adapter = WorldModelSB3VecEnv(
        twm.make_imagined_vector_env(wm, n_envs, seed=seed, autoreset_mode=AutoresetMode.SAME_STEP)
    )
    dummy = DummyVecEnv([lambda i=i: twm.make_imagined_env(wm, seed=seed + i) for i in range(n_envs)])
    adapter.action_space.seed(seed)  # the same random actions for both
    actions = [np.array([adapter.action_space.sample() for _ in range(n_envs)]) for _ in range(steps)]
    timings: dict[str, list[float]] = {"adapter": [], "dummy": []}
    for venv in (adapter, dummy):  # warm-up (first torch calls, allocations), not timed
        venv.reset()
        for a in actions[:5]:
            venv.step(a)
    for _ in range(repeats):
        for name, venv in (("adapter", adapter), ("dummy", dummy)):
            venv.seed(seed)
            venv.reset()
            t0 = time.perf_counter()
            for a in actions:
                venv.step(a)
            timings[name].append(time.perf_counter() - t0)
    adapter.close()
    dummy.close()
    t_adapter, t_dummy = statistics.median(timings["adapter"]), statistics.median(timings["dummy"])
    return {
        "n_envs": n_envs,
        "adapter_sps": n_envs * steps / t_adapter,
        "dummy_sps": n_envs * steps / t_dummy,
        "speedup": t_dummy / t_adapter,
    }


if __name__ == "__main__":
    args = tyro.cli(Args)
    validate_args(args)

    import stable_baselines3 as sb3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_checker import check_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.logger import KVWriter, Logger
    from stable_baselines3.common.monitor import Monitor
    from torch.utils.tensorboard import SummaryWriter

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
    data = None  # real transitions the model was fit on here (the Dyna loop extends them)
    if args.world_model_path is not None:
        try:
            wm = twm.load_world_model(args.world_model_path, device=str(device), env_id=args.env_id)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise SystemExit(f"error: --world-model-path {args.world_model_path!r}: {e}") from None
        # the real data behind the checkpoint counts too (train_world_model.py records it in the checkpoint)
        real_env_steps += twm.checkpoint_real_steps(wm)
        # its real transitions (already counted above; None if it carries none): Dyna refits extend them
        data = wm.buffer
        print(f"[sb3] loaded world model from {args.world_model_path}")
    else:
        print(f"[sb3] fitting a world model on {args.wm_random_steps} real random-policy transitions ...")
        data = twm.collect_transitions(args.env_id, args.wm_random_steps, seed=args.seed)
        real_env_steps += len(data)
        wm, fit = twm.fit_world_model(data, seed=args.seed, device=str(device), **fit_kwargs(args))
        twm.save_world_model(wm, os.path.join(run_dir, "world_model.pt"), extra=checkpoint_extra(real_env_steps),
                             buffer=data)
        print(f"[sb3] world model: {describe_fit(fit, args)}")
    if hasattr(wm, "start_from"):
        wm.start_from = args.start_from

    # 2. the seed tutorial's single env + SB3's checker ------------------------------------------------------------
    if args.check_env:
        check_env(twm.make_imagined_env(wm, seed=args.seed, max_episode_steps=args.imagination_horizon), warn=True)
        print("[sb3] check_env(WorldModelEnv) passed")

    # 3. the agent, trained on imagined experience ---------------------------------------------------------------
    class _TensorBoardWriter(KVWriter):
        """Routes SB3's logger into our SummaryWriter, renaming train/* to losses/* (CleanRL key convention)."""

        def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
            for key, value in key_values.items():
                if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                    key = key.replace("train/", "losses/", 1).replace("time/fps", "charts/SPS_sb3")
                    writer.add_scalar(key, float(value), step)

        def close(self) -> None:
            pass

    class StatusCallback(BaseCallback):
        """Logs imagined episodes to TensorBoard and prints a status line every `status_every` imagined steps."""

        def __init__(self, every: int):
            super().__init__()
            self.every, self.next_print = every, every
            self.recent: deque[float] = deque(maxlen=50)
            self.t0, self.steps0 = time.time(), 0

        def _on_training_start(self) -> None:
            self.t0, self.steps0 = time.time(), self.num_timesteps

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.recent.append(info["episode"]["r"])
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], self.num_timesteps)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], self.num_timesteps)
            if self.num_timesteps >= self.next_print:
                self.next_print += self.every
                sps = int((self.num_timesteps - self.steps0) / max(time.time() - self.t0, 1e-9))
                writer.add_scalar("charts/SPS", sps, self.num_timesteps)
                ret = f"{np.mean(self.recent):7.1f}" if self.recent else "    n/a"
                print(f"[sb3] imagined step {self.num_timesteps:>7}/{args.total_imagined_steps}"
                      f"  imagined return {ret}  SPS {sps}  wall {time.time() - start_time:5.0f}s")
            return True

    env = make_sb3_env(wm, args, seed=args.seed)
    if args.algo == "ppo":
        # rl-zoo's tuned CartPole PPO settings, with more envs (the batched model makes them almost free)
        agent = sb3.PPO(
            "MlpPolicy", env, n_steps=max(2048 // args.n_envs, 16), batch_size=256, gae_lambda=0.8, gamma=0.98,
            n_epochs=20, ent_coef=0.0, learning_rate=1e-3, clip_range=0.2, seed=args.seed, device=device, verbose=0,
        )
    else:
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise SystemExit(f"error: --algo dqn needs a Discrete action space, {args.env_id} has {env.action_space}. "
                             "Use --algo ppo.")
        agent = sb3.DQN(
            "MlpPolicy", env, learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000,
            gamma=0.99, target_update_interval=max(10, args.n_envs), train_freq=max(256 // args.n_envs, 1),
            gradient_steps=128,
            exploration_fraction=0.16, exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256]),
            seed=args.seed, device=device, verbose=0,
        )
    agent.set_logger(Logger(folder=run_dir, output_formats=[_TensorBoardWriter()]))
    callback = StatusCallback(args.status_every)

    steps_per_iteration = args.total_imagined_steps // args.dyna_iterations
    dyna_returns: list[float] = []
    for iteration in range(args.dyna_iterations):
        agent.learn(steps_per_iteration, callback=callback, reset_num_timesteps=(iteration == 0))
        if iteration == args.dyna_iterations - 1 or args.dyna_real_steps == 0:
            continue
        # Dyna: real data from the current policy covers the states it actually visits; refit the model on it.
        # Stochastic actions (as PPO explores): a little wider coverage of the states around the policy's path.
        policy_fn = lambda obs: agent.predict(obs, deterministic=False)[0]  # noqa: E731
        new = twm.collect_transitions(args.env_id, args.dyna_real_steps, seed=args.seed + 1000 * (iteration + 1),
                                      policy=policy_fn)
        real_env_steps += len(new)
        returns = episode_returns(new)
        dyna_returns.extend(returns)
        if returns:
            writer.add_scalar("charts/real_episodic_return_dyna", float(np.mean(returns)), agent.num_timesteps)
        if data is None:
            data = new
        else:
            data.extend(new)
        wm, fit = twm.fit_world_model(data, model=wm, seed=args.seed + iteration + 1, **fit_kwargs(args))
        if hasattr(wm, "start_from"):
            wm.start_from = args.start_from
        env.close()
        env = make_sb3_env(wm, args, seed=args.seed + iteration + 1)
        agent.set_env(env)
        print(f"[sb3] dyna {iteration + 1}/{args.dyna_iterations - 1}: {len(new)} real steps with the policy, "
              f"real return {np.mean(returns) if returns else float('nan'):.1f}, model refit on {len(data)}: "
              f"{describe_fit(fit, args)}")
    env.close()
    imagined_steps = int(agent.num_timesteps)
    if data is not None and args.dyna_iterations > 1 and args.dyna_real_steps > 0:  # the refit model
        twm.save_world_model(wm, os.path.join(run_dir, "world_model.pt"), extra=checkpoint_extra(real_env_steps),
                             buffer=data)
    agent.save(os.path.join(run_dir, f"{args.algo}_agent.zip"))
    train_seconds = time.time() - start_time

    # 4. the judgement: the real environment ----------------------------------------------------------------------
    eval_env = Monitor(gym.make(args.env_id))
    eval_env.reset(seed=args.seed + 10_000)
    ep_returns, ep_lengths = evaluate_policy(
        agent, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True, return_episode_rewards=True
    )
    eval_env.close()
    for i, (r, l) in enumerate(zip(ep_returns, ep_lengths)):
        writer.add_scalar("eval/real_episodic_return", r, i)
        writer.add_scalar("eval/real_episodic_length", l, i)
    wall_seconds = time.time() - start_time
    summary = {
        "script": "sb3_example.py",
        "env_id": args.env_id,
        "algo": args.algo,
        "seed": args.seed,
        "real_return_mean": float(np.mean(ep_returns)),
        "real_return_std": float(np.std(ep_returns)),
        "real_returns": [float(r) for r in ep_returns],
        "real_env_steps": int(real_env_steps),
        "real_eval_steps": int(np.sum(ep_lengths)),
        "imagined_steps": imagined_steps,
        "wall_seconds": wall_seconds,
        "train_seconds": train_seconds,
        "n_envs": args.n_envs,
        "dyna_real_returns_mean": float(np.mean(dyna_returns)) if dyna_returns else None,
        "world_model_path": args.world_model_path,
    }
    print(f"[sb3] real return {summary['real_return_mean']:.1f} +/- {summary['real_return_std']:.1f} over "
          f"{args.eval_episodes} episodes | real steps {real_env_steps} | imagined steps {imagined_steps} | "
          f"{wall_seconds:.0f}s")

    # 5. optional: how much the batched adapter buys over N single-env copies (not counted in wall_seconds)
    speedup_n = list(args.speedup_n_envs) or ([args.n_envs] if args.n_envs > 1 else [])
    if speedup_n:
        results = [measure_vecenv_speedup(wm, n, args.speedup_steps, seed=args.seed) for n in speedup_n]
        for res in results:
            print(f"[sb3] n_envs {res['n_envs']:>4}: WorldModelSB3VecEnv {res['adapter_sps']:9.0f} steps/s, "
                  f"DummyVecEnv {res['dummy_sps']:8.0f} steps/s -> speed-up x{res['speedup']:.1f}")
            writer.add_scalar("charts/vecenv_speedup_vs_dummy", res["speedup"], res["n_envs"])
        summary["vecenv_speedup"] = results
        summary["vecenv_speedup_vs_dummy"] = results[0]["speedup"] if args.n_envs not in speedup_n else next(
            r["speedup"] for r in results if r["n_envs"] == args.n_envs)
    twm.write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    writer.close()
    print(f"[sb3] wrote {os.path.join(run_dir, 'summary.json')}")
