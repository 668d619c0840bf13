"""Stable-Baselines3 trained inside a world model (Dyna), judged in the real environment.

  1. load (--world-model-path) or fit the world model named by --world-model (the world-model interface,
     world_model.py; the reference ensemble by default),
  2. run SB3's `check_env` on the model's single imagined env (`model.imagined_env`),
  3. train SB3 PPO, DQN (Discrete actions) or SAC (Box actions) on imagined experience only; with --num-envs > 1
     the model's batched env (`model.imagined_vector_env`) is driven through `WorldModelSB3VecEnv`, an SB3 `VecEnv`
     adapter that steps all imagined envs with ONE model call (--vector-env sync|async: SB3's DummyVecEnv /
     SubprocVecEnv of single imagined envs instead, each loading its own copy of the model),
  4. between phases: Dyna rounds (real data from the current policy, warm refit of the model) and real evaluation,
  5. the final judgement in the real env; TensorBoard logs and summary.json in runs/{run_name}/.

The policy acts on what the model shows (its observation space, and `model.real_env` in the real env).

Usage:
    python sb3_example.py                                  # CartPole-v1, PPO in imagination
    python sb3_example.py --env-id Pendulum-v1             # SAC (the default algo for Box actions)
    python sb3_example.py --world-model-path runs/X/world_model.pt --algo dqn
    python sb3_example.py --world-model examples/cartpole_physics.py:CartPolePhysics   # a given simulator
    python sb3_example.py --eval-checkpoint runs/X/agent.pt
The speed of the adapter against DummyVecEnv of single WorldModelEnvs: python benchmark.py --sb3-vecenv
"""
import os
import sys
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dyna  # noqa: E402
import real_env  # noqa: E402
import rl_utils as ru  # noqa: E402
import world_model  # noqa: E402

TAG = "sb3_example"


@dataclass
class Args(ru.DynaArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """The name of this experiment (the run dir is runs/{env_id}__{exp_name}__{seed}__{time})."""
    algo: Optional[Literal["ppo", "dqn", "sac"]] = None
    """The SB3 algorithm trained in imagination.
    None picks ppo for Discrete actions and sac for Box actions; dqn needs Discrete actions, sac needs Box actions."""
    total_timesteps: Optional[int] = None
    """Imagined environment steps over the whole run, split evenly over the phases.
    None: 150000 for ppo and dqn, 40000 for sac."""
    num_envs: Optional[int] = None
    """The number of imagined envs; more than 1 drives the batched model through WorldModelSB3VecEnv.
    None: 16 for ppo and dqn, 8 for sac."""
    check_env: bool = True
    """Run SB3's check_env on the model's single imagined env first."""


# Settings per algorithm (rl-zoo's tuned CartPole / Pendulum values, with more envs where the batched model makes
# them almost free); values that depend on the number of envs are set in main.
ALGO_KWARGS = {
    "ppo": dict(batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0, learning_rate=1e-3,
                clip_range=0.2),
    "dqn": dict(learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000, gamma=0.99,
                gradient_steps=128, exploration_fraction=0.16, exploration_final_eps=0.04,
                policy_kwargs=dict(net_arch=[256, 256])),
    "sac": dict(learning_rate=1e-3, buffer_size=200_000, learning_starts=1000, batch_size=256, gamma=0.99,
                train_freq=1, policy_kwargs=dict(net_arch=[64, 64])),  # 64 wide: 5x faster updates on a CPU
}
DEFAULTS = {"ppo": (150_000, 16), "dqn": (150_000, 16), "sac": (40_000, 8)}  # (total_timesteps, num_envs)


# ----------------------------------------------------------------------------------------------------------------
# SB3 VecEnv adapter around the natively batched world model
# ----------------------------------------------------------------------------------------------------------------
class WorldModelSB3VecEnv(VecEnv):
    """SB3 `VecEnv` over a `WorldModelVectorEnv`: one batched model call steps all `num_envs` imagined envs.

    The wrapped env must use gymnasium's SAME_STEP autoreset. SB3's VecEnv API has no "reset step": when a row
    finishes, the observation returned by that very step must already be the first observation of the next episode
    and the true final observation goes to `infos[i]["terminal_observation"]`. SAME_STEP gives exactly that. With
    NEXT_STEP we would have to spend a model call on a dummy step and hide a fake transition from the learner.
    Time-limit truncation is reported as `infos[i]["TimeLimit.truncated"]`, which PPO uses to bootstrap with
    V(final obs) and the off-policy replay buffers use to not treat the step as terminal.
    """

    def __init__(self, vector_env: gym.vector.VectorEnv):
        mode = vector_env.metadata.get("autoreset_mode")
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                f"WorldModelSB3VecEnv needs a vector env with autoreset_mode=AutoresetMode.SAME_STEP, got {mode}. "
                "Create it with model.imagined_vector_env(..., autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)."
            )
        self.vector_env = vector_env
        self._actions: Optional[np.ndarray] = None
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
        # Box actions are clipped where they enter the env; SB3 keeps the (unclipped) action it sampled
        self._actions = real_env.clip_action(actions, self.action_space)

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


def imagined_settings(args: Args, gamma: float) -> dict:
    """The imagined env's horizon, start states and halt rule (its penalty uses the learner's discount)."""
    return dict(horizon=args.imagined_horizon, start=args.imagined_start, halt=args.halt_threshold, gamma=gamma)


def make_env(args: Args, model_path: Optional[str], seed: int, gamma: float):
    """CleanRL's make_env, for imagined envs stepped one per env (--vector-env sync|async): the thunk builds and
    loads its own copy of the world model, so that SubprocVecEnv workers share nothing."""

    def thunk():
        from stable_baselines3.common.monitor import Monitor

        torch.set_num_threads(1)
        model = world_model.make(args.world_model, env_id=args.env_id, seed=seed)
        model = model.load(model_path) if model_path else model
        return Monitor(model.imagined_env(seed=seed, **imagined_settings(args, gamma)))

    return thunk


def make_imagined_sb3_env(model, args: Args, kind: str, seed: int, gamma: float, model_path=None) -> VecEnv:
    """The imagined training env as an SB3 VecEnv with episode statistics (VecMonitor / Monitor): the model's
    batched env behind WorldModelSB3VecEnv (SAME_STEP autoreset, see the adapter), or SB3's DummyVecEnv (sync) /
    SubprocVecEnv (async) of `make_env` thunks."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor

    settings = imagined_settings(args, gamma)
    if kind == "batched" and args.num_envs > 1:
        return VecMonitor(WorldModelSB3VecEnv(model.imagined_vector_env(
            args.num_envs, seed=seed, autoreset_mode=AutoresetMode.SAME_STEP, **settings)))
    if kind == "batched":  # one env: nothing to batch
        return DummyVecEnv([lambda: Monitor(model.imagined_env(seed=seed, **settings))])
    thunks = [make_env(args, model_path, seed + i, gamma) for i in range(args.num_envs)]
    return DummyVecEnv(thunks) if kind == "sync" else SubprocVecEnv(thunks, start_method="spawn")


def pick_algo(args: Args, action_space: gym.Space) -> str:
    """--algo, checked against the action space; None picks ppo (Discrete) or sac (Box)."""
    discrete = isinstance(action_space, gym.spaces.Discrete)
    algo = args.algo or ("ppo" if discrete else "sac")
    if algo == "dqn" and not discrete:
        raise ru.ArgError("--algo", f"ppo or sac for {args.env_id}'s Box actions", algo, "DQN needs Discrete actions.")
    if algo == "sac" and discrete:
        raise ru.ArgError("--algo", f"ppo or dqn for {args.env_id}'s Discrete actions", algo, "SAC needs Box actions.")
    return algo


def check_args(args: Args, action_space: gym.Space) -> None:
    """Every bad flag stops here with one line, before a run dir exists; fills in the algo's defaults."""
    dyna.imagination_only(args, f"{TAG}.py")
    args.algo = pick_algo(args, action_space)
    args.total_timesteps = DEFAULTS[args.algo][0] if args.total_timesteps is None else args.total_timesteps
    args.num_envs = DEFAULTS[args.algo][1] if args.num_envs is None else args.num_envs
    ru.check_positive(args, "num_envs")
    ru.check_dyna_args(args)


def policy_for_evaluation(algo: str, observation_space: gym.Space, action_space: gym.Space, state_dict: dict):
    """Rebuilds the SB3 policy this script trained (its class and kwargs follow from the run's --algo)."""
    import stable_baselines3 as sb3

    algo_class = {"ppo": sb3.PPO, "dqn": sb3.DQN, "sac": sb3.SAC}[algo]
    policy = algo_class.policy_aliases["MlpPolicy"](observation_space, action_space, lambda _: 0.0,
                                                     **ALGO_KWARGS[algo].get("policy_kwargs", {}))
    policy.load_state_dict(state_dict)
    return policy.eval()


def evaluate_checkpoint(path: str) -> dict:
    """Rebuilds a saved policy (and its run's world model: what it acts on) and replays its run's final evaluation."""
    payload = ru.load_agent(path)
    if "policy" not in payload["state_dicts"] or payload["args"].get("algo") not in ALGO_KWARGS:
        raise ru.ArgError("--eval-checkpoint", f"an agent.pt written by {TAG}.py", path,
                          f"It holds {sorted(payload['state_dicts'])}; replay it with the script that wrote it.")
    model = dyna.agent_world_model(payload, path)
    policy = policy_for_evaluation(payload["args"]["algo"], model.observation_space, model.action_space,
                                   payload["state_dicts"]["policy"])
    return dyna.replay_final_evaluation(TAG, path, lambda obs: policy.predict(obs, deterministic=True)[0], model)


if __name__ == "__main__":
    args = tyro.cli(Args)
    import stable_baselines3 as sb3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_checker import check_env
    from stable_baselines3.common.logger import configure

    if args.eval_checkpoint is not None:
        evaluate_checkpoint(args.eval_checkpoint)
        sys.exit(0)
    _, act_space, threshold = ru.real_env_spaces(args.env_id, f"{TAG}.py")
    check_args(args, act_space)
    algo, n = args.algo, args.num_envs
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    model = dyna.model_from_args(args, device)  # loads --world-model-path
    dyna.check_model(args, model, f"{TAG}.py")
    vector_env = dyna.vector_env_kind(args, model)
    ru.seed_everything(args.seed, args.num_threads, args.torch_deterministic)

    run = ru.Run(args, TAG)
    nets = {}  # what the run saves (finished, interrupted or failed): the policy once it exists, and the model
    run.checkpoint = lambda: dyna.save_checkpoints(run, args, model, nets)
    with run:
        # 1. the world model, and SB3's checker on the single imagined env -----------------------------------------
        data, run.figures["real_env_steps"] = dyna.initial_data(model, args, run, log=lambda s: print(f"[{TAG}] {s}"))
        kwargs = dict(ALGO_KWARGS[algo])
        if args.check_env:
            single = model.imagined_env(seed=args.seed, **imagined_settings(args, kwargs["gamma"]))
            check_env(single, warn=True)
            print(f"[{TAG}] check_env({type(single).__name__}) passed")
        rounds = dyna.DynaRounds(run, args, model, data, target=threshold)

        # 2. the agent, trained on imagined experience -------------------------------------------------------------
        if algo == "ppo":
            kwargs.update(n_steps=max(2048 // n, 16))
        else:  # tiny runs (tests) still train
            kwargs.update(learning_starts=min(kwargs["learning_starts"], args.total_timesteps // 10))
        if algo == "dqn":
            kwargs.update(target_update_interval=max(10, n), train_freq=max(256 // n, 1))
        elif algo == "sac":  # one gradient step per two imagined transitions
            kwargs.update(gradient_steps=max(1, n // 2))

        def make_envs():  # sync/async workers load the model as saved now (the refit one after a Dyna round)
            path = run.checkpoint()["world_model_path"] if vector_env != "batched" else None
            return make_imagined_sb3_env(model, args, vector_env, args.seed, kwargs["gamma"], path)

        env = make_envs()  # SB3 sizes the policy from its spaces: what the model shows
        algo_class = {"ppo": sb3.PPO, "dqn": sb3.DQN, "sac": sb3.SAC}[algo]
        agent = algo_class("MlpPolicy", env, seed=args.seed, device=device, verbose=0, **kwargs)
        nets["policy"] = agent.policy
        agent.set_logger(configure(run.dir, ["tensorboard"]))  # SB3's own train/* curves
        writer = run.writer

        class StatusCallback(BaseCallback):
            """Imagined episodes to TensorBoard, and a status line about every twentieth of the run."""

            def __init__(self):
                super().__init__()
                self.recent: deque = deque(maxlen=50)
                self.every = max(args.total_timesteps // 20, 1)
                self.next_print, self.phase, self.t0, self.steps0 = self.every, 0, time.time(), 0

            def _on_training_start(self) -> None:  # each phase: SPS counts imagined training only
                self.t0, self.steps0 = time.time(), self.num_timesteps

            def _on_step(self) -> bool:
                run.figures["global_step"] = run.figures["imagined_steps"] = self.num_timesteps
                for info in self.locals["infos"]:
                    if "episode" in info:
                        self.recent.append(info["episode"]["r"])
                        writer.add_scalar("charts/episodic_return", info["episode"]["r"], self.num_timesteps)
                        writer.add_scalar("charts/episodic_length", info["episode"]["l"], self.num_timesteps)
                if self.num_timesteps >= self.next_print:
                    self.next_print = (self.num_timesteps // self.every + 1) * self.every
                    writer.add_scalar("charts/SPS", self.sps(), self.num_timesteps)
                    rounds.status(self.phase, self.num_timesteps, self.imagined_return(), self.sps())
                return True

            def sps(self) -> float:
                return (self.num_timesteps - self.steps0) / max(time.time() - self.t0, 1e-9)

            def imagined_return(self) -> Optional[float]:
                return float(np.mean(self.recent)) if self.recent else None

        callback = StatusCallback()
        act_fn = lambda obs: agent.predict(obs, deterministic=True)[0]  # noqa: E731
        explore_fn = lambda obs: agent.predict(obs, deterministic=False)[0]  # noqa: E731
        for phase in range(rounds.num_phases):
            callback.phase = phase
            t0 = time.time()
            agent.learn(rounds.phase_steps(phase), callback=callback, reset_num_timesteps=phase == 0)
            run.timings["train_seconds"] += time.time() - t0
            # Dyna: the batched env holds the model, which is refit in place (start states, clip range and halt
            # reference too), so it continues with the refit model; sync/async workers hold stale copies
            refits = rounds.refits
            rounds.end_phase(phase, agent.num_timesteps, act_fn, explore_fn)
            rounds.status(phase, agent.num_timesteps, callback.imagined_return(), callback.sps())
            if rounds.refits > refits and vector_env != "batched":
                env.close()
                env = make_envs()
                agent.set_env(env)  # SB3 resets it at the next learn()
        env.close()

        # 3. the judgement in the real env, summary.json ------------------------------------------------------------
        rounds.finish(act_fn, agent.num_timesteps, extra={"sb3_algo": algo, "num_envs": n})
