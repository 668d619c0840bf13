"""The Dyna and evaluation driver the scripts share, written against the world-model interface (`world_model.py`)
only: the model a run starts from (`model_from_args`, `initial_data`), a Dyna round (`dyna_round`: real data from
the current policy through the model's view of the real env, then a warm refit), judging a policy in the real env
and, beside it, in imagination (`Evaluator`), and the phases of the library examples (`DynaRounds`).
"""
import functools
import os
import time

import gymnasium as gym
import numpy as np

import real_env
import rl_utils as ru
import world_model


def model_from_args(args, device):
    """The world model named by --world-model, loaded from --world-model-path when given; None for `none`.
    Runs before the run dir exists: a bad spec or checkpoint is one line and leaves nothing behind."""
    path = getattr(args, "world_model_path", None)
    if args.world_model == world_model.NO_MODEL:
        if path is not None:
            raise ru.ArgError("--world-model-path", "no checkpoint with --world-model none", path,
                              "Drop one of the two flags.")
        return None
    try:
        model = world_model.make(args.world_model, env_id=args.env_id, seed=args.seed, device=device)
    except world_model.WorldModelError as e:
        raise ru.ArgError("--world-model", f"{', '.join(world_model.BUILTIN)}, none, path/to/file.py:attr or "
                          "package.module:attr",
                          args.world_model, str(e)) from None
    except ValueError as e:  # the model cannot be built for this env (its spaces, say)
        raise ru.ArgError("--env-id", f"an env that --world-model {args.world_model} supports", args.env_id,
                          " ".join(str(e).split())) from None
    if path is not None:
        try:
            model = model.load(path)
        except (OSError, ValueError) as e:
            raise ru.ArgError("--world-model-path", f"a world-model checkpoint for {args.env_id}", path,
                              " ".join(str(e).split())) from None
    return model


def imagination_only(args, script):
    """The library examples train only in imagination: --world-model none is one line naming the baselines."""
    if args.world_model == world_model.NO_MODEL:
        raise ru.ArgError("--world-model", "ensemble or your own model (path/to/file.py:attr or package.module:attr): "
                          f"{script} trains in imagination only", args.world_model,
                          "The model-free baselines are ppo_imagined.py, dqn_imagined.py and sac_imagined.py "
                          "with --world-model none.")


def check_model(args, model, script):
    """What a script checks of its model before the run dir exists: the policy's observations (a 1-D Box, for the
    MLP networks) and, for a model that learns and is fitted here, enough random real steps to fit it on."""
    ru.check_policy_observations(model.observation_space, script, args.env_id, args.world_model)
    if getattr(model, "learns", True) and args.world_model_path is None and args.initial_real_steps < 2:
        raise ru.ArgError("--initial-real-steps", "at least 2 transitions to fit a model on", args.initial_real_steps)


def vector_env_kind(args, model):
    """--vector-env: `auto` is `batched` where the model offers a batched env, else `sync`."""
    if model is None:
        return None
    batched = world_model.has_vector_env(model)
    if args.vector_env == "auto":
        return "batched" if batched else "sync"
    if args.vector_env == "batched" and not batched:
        raise ru.ArgError("--vector-env", "sync or async: the model offers no imagined_vector_env", "batched")
    return args.vector_env


def imagined_vector_env(model, kind, num_envs, seed, device, make_env, cuda_graph=False, **settings):
    """The imagined envs a script steps: the model's batched env (torch output on a GPU, stepped as one CUDA graph
    with `cuda_graph`), or gymnasium's
    SyncVectorEnv / AsyncVectorEnv (spawned workers) of the script's `make_env(seed)` thunks, NEXT_STEP autoreset
    either way."""
    if kind == "batched":
        cuda = str(device).startswith("cuda")
        envs = model.imagined_vector_env(num_envs, seed=seed, output="torch" if cuda else "numpy", **settings)
        if cuda and cuda_graph:
            if not callable(getattr(envs, "use_cuda_graph", None)):
                raise ValueError(f"--cuda-graph: {type(model).__name__}.imagined_vector_env returned a "
                                 f"{type(envs).__name__}, which has no use_cuda_graph(); pass --no-cuda-graph")
            envs.use_cuda_graph()
        return envs
    vector_cls = gym.vector.SyncVectorEnv if kind == "sync" else functools.partial(gym.vector.AsyncVectorEnv,
                                                                                    context="spawn")
    return vector_cls([make_env(seed + i) for i in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def make_envs(args, model, run, vector_env, device, make_env):
    """The envs a script's learner steps: the model's batched imagined env, --vector-env sync/async workers of the
    script's `make_env(args, model_path, seed, horizon)` thunks (which load the run's latest world model, saved
    here first), or the real envs without a model (CleanRL's thunks)."""
    if model is None:
        return gym.vector.SyncVectorEnv([ru.real_env_thunk(args.env_id, args.seed + i) for i in range(args.num_envs)],
                                        autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    path = run.checkpoint()["world_model_path"] if vector_env != "batched" else None
    return imagined_vector_env(model, vector_env, args.num_envs, args.seed, device,
                               lambda seed: make_env(args, path, seed, args.imagined_horizon),
                               cuda_graph=getattr(args, "cuda_graph", False),
                               horizon=args.imagined_horizon, start=args.imagined_start, halt=args.halt_threshold,
                               gamma=args.gamma)


def save_checkpoints(run, args, model, nets, extra=None):
    """What a run keeps, finished, interrupted or failed: agent.pt (`nets`: name -> module, those that exist) and,
    where this run fitted or refit the world model, world_model.pt with its real data. Returns the paths."""
    paths = {"world_model_path": args.world_model_path, "agent_path": None}
    fitted_here = args.world_model_path is None or run.figures.get("refits", 0)
    if model is not None and getattr(model, "learns", True) and fitted_here and run.model_fitted:
        paths["world_model_path"] = model.save(run.path("world_model.pt"),
                                               extra={"real_env_steps": run.figures["real_env_steps"]})
    if nets:
        paths["agent_path"] = ru.save_agent(run.path("agent.pt"), {k: v.state_dict() for k, v in nets.items()}, args,
                                            paths["world_model_path"], extra=extra)
    return paths


def loaded_real_steps(model):
    """The real transitions behind a loaded model, counted honestly: what its checkpoint says (train_world_model.py
    keeps them in extra["summary"], the scripts in extra["real_env_steps"]), at least the data it carries."""
    extra = getattr(model, "extra", None) or {}
    steps = extra.get("real_env_steps", (extra.get("summary") or {}).get("real_env_steps", 0))
    data = getattr(model, "data", None)
    return max(int(steps or 0), len(data) if data is not None else 0)


def initial_data(model, args, run, log, until_termination_policy=None):
    """The real data a run starts from, and the real steps spent on it: none without a model or for one that does
    not learn, the
    checkpoint's for a loaded one, else `--initial-real-steps` uniform random transitions and a first fit.
    until_termination_policy: when those end no episode in a termination, as many more are collected with it
    (obs batch -> actions): a model that never saw an episode end predicts no ending (Acrobot's goal)."""
    if model is None or not getattr(model, "learns", True):  # model-free, or nothing to fit
        return None, 0
    if args.world_model_path is not None:
        return getattr(model, "data", None), loaded_real_steps(model)
    t0 = time.time()
    log(f"collecting {args.initial_real_steps} random real transitions and fitting a world model")
    data = real_env.collect_transitions(args.env_id, args.initial_real_steps, seed=args.seed)
    if until_termination_policy is not None and not data.terminated.any():
        data.extend(real_env.collect_transitions(args.env_id, args.initial_real_steps, seed=args.seed + 1,
                                                 policy=until_termination_policy))
        log(f"no random episode terminated: {args.initial_real_steps} more steps with the exploration policy, "
            f"{int(data.terminated.sum())} termination(s)")
    run.figures["real_env_steps"] = len(data)  # counted before the fit: an interrupted fit's summary has them too
    metrics = model.fit(data, seed=args.seed, writer=run.writer, global_step=0)
    run.model_fitted = True
    log(f"world model fitted on {len(data)} transitions in {metrics.get('seconds', time.time() - t0):.1f}s")
    run.timings["world_model_seconds"] += time.time() - t0
    return data, len(data)


def refit(model, data, num_new, seed, refit_passes, writer, global_step, draw=True):
    """A warm refit after `num_new` transitions were appended to `data`. First (`draw`) the old model's open-loop
    picture on the episodes it is about to learn from (where it was wrong about what the policy now does), for
    models that can be drawn (they offer `predict`). Returns the fit's metrics, `figure_seconds` among them."""
    t0 = time.time()
    if draw and writer is not None and callable(getattr(model, "predict", None)):
        import visualize

        visualize.write_open_loop(model, data.newest_episodes(num_new), writer, global_step,
                                  "open_loop_before_refit", refit=global_step)
    figure_seconds = time.time() - t0
    metrics = model.fit(data, num_new, seed=seed, refit_passes=refit_passes, writer=writer, global_step=global_step)
    return {**metrics, "figure_seconds": figure_seconds}


def dyna_round(model, data, env_id, policy, num_steps, seed, refit_passes=20, writer=None, global_step=0):
    """One Dyna round: `num_steps` real transitions with `policy` (obs batch -> actions, on the model's view of the
    real env), then a warm refit on all real data. Returns (data, metrics): `new_real_steps`, `collect_seconds`
    and the refit's metrics (`seconds`: the fit, `figure_seconds`: the picture before it)."""
    t0 = time.time()
    new = real_env.collect_transitions(env_id, num_steps, seed=seed, policy=policy, model=model)
    data = new if data is None else data.extend(new)
    collect_seconds = time.time() - t0
    metrics = refit(model, data, len(new), seed, refit_passes, writer, global_step)
    return data, {"new_real_steps": len(new), "collect_seconds": collect_seconds, **metrics}


class RealSteps:
    """The real side of the off-policy scripts (sac_imagined.py, svg_imagined.py): one real step at a time through
    the model's view of the real env, into two views of the real data. `rb`, the replay, keeps what the policy sees
    (its actor and critics learn on it); `log` (field -> rows, filled in place: the caller's checkpoint reads it)
    keeps what the model learns from: the raw observations, the action the env received, truncations, episode ids
    and reset observations. Where the policy sees the raw observations (the base class's identity view, as the
    ensemble's), the model's first `data` fills the replay too; else the learner starts with random steps of its own.
    `obs` is the policy's current observation."""

    def __init__(self, model, data, args, obs_dim, action_shape, log, writer):
        shared = data is not None and getattr(type(model), "real_env", None) is world_model.WorldModel.real_env
        self.rb = ru.ReplayBuffer((len(data) if shared else 0) + args.total_timesteps, obs_dim, action_shape,
                                  np.float32, seed=args.seed)
        if shared:
            self.rb.add(data.obs, data.actions, data.rewards, data.next_obs, data.terminated)
        log.update({k: list(getattr(data, k)) if data is not None else []
                    for k in (*real_env.TransitionBuffer.FIELDS, "start_obs")})
        self.log, self.writer, self.random_steps = log, writer, args.initial_real_steps
        self.episode_id = int(data.episode_ids.max()) + 1 if data is not None and len(data) else 0
        self.env, self.raw = real_env.seen_through(model, ru.real_env_thunk(args.env_id, args.seed)())
        self.obs, _ = self.env.reset(seed=args.seed)
        log["start_obs"].append(self.raw.last_obs)
        self.episodic_return, self.episodic_length = 0.0, 0

    def step(self, policy, global_step):
        """One real step: uniform random actions (from the space the thunk seeded) until the replay holds
        --initial-real-steps rows, then policy(obs batch of one)[0]. The replay keeps the action as sampled, the
        env and the model's log get it clipped to the bounds. An episode's end writes charts/episodic_return at
        `global_step` (this step's) and resets; the stored next_obs is the true final observation."""
        env, raw, log = self.env, self.raw, self.log
        action = env.action_space.sample() if self.rb.size < self.random_steps else policy(self.obs[None])[0]
        raw_obs = raw.last_obs
        env_action = real_env.clip_action(action, env.action_space)
        next_obs, reward, terminated, truncated, _ = env.step(env_action)
        self.rb.add(self.obs[None], action[None], np.array([reward]), next_obs[None], np.array([terminated]))
        for key, value in zip(log, (raw_obs, env_action, reward, raw.last_obs, terminated, truncated,
                                    self.episode_id)):
            log[key].append(value)
        self.episodic_return, self.episodic_length = self.episodic_return + float(reward), self.episodic_length + 1
        if terminated or truncated:
            self.writer.add_scalar("charts/episodic_return", self.episodic_return, global_step)
            self.writer.add_scalar("charts/episodic_length", self.episodic_length, global_step)
            self.episodic_return, self.episodic_length = 0.0, 0
            self.obs, _ = env.reset()
            log["start_obs"].append(raw.last_obs)
            self.episode_id += 1
        else:
            self.obs = next_obs

    def close(self):
        self.env.close()


def evaluate_in_imagination(act_fn, model, num_episodes, seed, horizon=None):
    """The same policy in the world model (no halt), one episode per row from real start states over `horizon`
    (default: the real time limit). Set against the real return it shows how much the policy exploits model
    errors. Returns the returns."""
    horizon = horizon or getattr(model, "max_episode_steps", None) or 1000
    if world_model.has_vector_env(model):
        envs = model.imagined_vector_env(num_episodes, seed=seed, horizon=horizon, start="start")
    else:
        envs = gym.vector.SyncVectorEnv([lambda: model.imagined_env(horizon=horizon, start="start")
                                            for _ in range(num_episodes)])
    obs, _ = envs.reset(seed=seed)
    returns, alive = np.zeros(num_episodes), np.ones(num_episodes, dtype=bool)
    for _ in range(horizon):  # NEXT_STEP autoreset: a row counts until its first episode ends
        obs, rewards, terms, truncs, _ = envs.step(real_env.clip_action(act_fn(real_env.to_numpy(obs)),
                                                                        model.action_space))
        returns += real_env.to_numpy(rewards) * alive
        alive &= ~(real_env.to_numpy(terms) | real_env.to_numpy(truncs))
        if not alive.any():
            break
    envs.close()
    return returns


class Evaluator:
    """Periodic judgement of a policy in the real env seen through the model (and the same policy in imagination,
    to show the gap).

    Each evaluation plays fresh, disjoint real episode seeds; the final one (index 0) uses seeds that depend only
    on the run's seed, so `--eval-checkpoint` reproduces it. `history` goes into summary.json (plot_runs.py reads
    it); `reached_at` is the real_env_steps of the first evaluation whose mean reached `target`. TensorBoard gets
    each evaluation against the learner's step (`eval/...`) and the real return against real transitions
    (`eval/real_return_by_real_steps`: the sample-efficiency view).

    The stop rule of every script is `solved(n)`: n evaluations in a row whose MEAN return reached `target`.
    Gymnasium's reward_threshold is defined on the mean over episodes; asking it of consecutive evaluations on fresh
    episode seeds keeps one lucky evaluation from stopping a run, and the final evaluation (its own seeds) shows
    whether the policy holds."""

    def __init__(self, env_id, seed, episodes, writer, target=None, model=None):
        self.env_id, self.seed, self.episodes, self.writer, self.target = env_id, seed, episodes, writer, target
        self.model = model
        self.history, self.reached_at, self.seconds, self.env_steps = [], None, 0.0, 0
        self.last_real, self.last_gap = float("nan"), float("nan")
        self.evals_at_target = 0  # consecutive evaluations whose mean reached the target

    def episode_seed(self, index):
        return 10_000 * self.seed + index * self.episodes

    def __call__(self, act_fn, global_step, real_env_steps, final=False, also=None):
        """Evaluates act_fn; `also` (name -> act_fn) are played on the same real episodes beside it, their mean
        returns kept as `{name}_return_mean` (and `eval/{name}_episodic_return`) without counting towards the stop
        rule or the target."""
        t0 = time.time()
        index = 0 if final else 1 + len(self.history)
        returns, lengths = real_env.evaluate_in_real_env(act_fn, self.env_id, self.episodes, self.episode_seed(index),
                                                         model=self.model)
        self.env_steps += int(lengths.sum())
        entry = {"global_step": int(global_step), "real_env_steps": int(real_env_steps),
                 "real_return_mean": float(returns.mean()), "real_return_std": float(returns.std()),
                 "real_length_mean": float(lengths.mean())}
        for name, other_fn in (also or {}).items():
            if name in ("real", "imagined"):
                raise ValueError(f"Evaluator: `also` name {name!r} would overwrite the evaluation's own figures")
            other, other_lengths = real_env.evaluate_in_real_env(other_fn, self.env_id, self.episodes,
                                                                 self.episode_seed(index), model=self.model)
            self.env_steps += int(other_lengths.sum())
            entry[f"{name}_return_mean"] = float(other.mean())
            self.writer.add_scalar(f"eval/{name}_episodic_return", entry[f"{name}_return_mean"], global_step)
        if self.model is not None:
            imagined = evaluate_in_imagination(act_fn, self.model, self.episodes, self.episode_seed(index))
            entry["imagined_return_mean"] = float(imagined.mean())
            entry["imagined_minus_real"] = float(imagined.mean() - returns.mean())
            self.writer.add_scalar("eval/imagined_episodic_return", entry["imagined_return_mean"], global_step)
            self.writer.add_scalar("eval/imagined_minus_real", entry["imagined_minus_real"], global_step)
            self.last_gap = entry["imagined_minus_real"]
        self.writer.add_scalar("eval/real_episodic_return", entry["real_return_mean"], global_step)
        self.writer.add_scalar("eval/real_episodic_length", entry["real_length_mean"], global_step)
        self.writer.add_scalar("eval/real_env_steps", real_env_steps, global_step)
        self.writer.add_scalar("eval/real_return_by_real_steps", entry["real_return_mean"], real_env_steps)
        self.last_real = entry["real_return_mean"]
        if self.reached_at is None and self.target is not None and self.last_real >= self.target:
            self.reached_at = int(real_env_steps)
        if not final:
            at_target = self.target is not None and self.last_real >= self.target
            self.evals_at_target = self.evals_at_target + 1 if at_target else 0
            self.history.append(dict(entry))  # without the returns array below
        self.seconds += time.time() - t0
        entry["returns"] = returns
        return entry

    def solved(self, consecutive):
        return self.evals_at_target >= consecutive


def replay_final_evaluation(tag, path, act_fn, model=None):
    """--eval-checkpoint, the same in every script: the run's own final real evaluation again (same env, episodes
    and seeds, through the run's world model), one line, and the figures as a dict."""
    a = ru.load_agent(path)["args"]
    seed = Evaluator(a["env_id"], a["seed"], a["eval_episodes"], writer=None).episode_seed(0)
    returns, _ = real_env.evaluate_in_real_env(act_fn, a["env_id"], a["eval_episodes"], seed, model=model)
    print(f"[{tag}] {path}: real return {returns.mean():.1f} +/- {returns.std():.1f} over {len(returns)} episodes "
          f"of {a['env_id']} (seed {a['seed']})")
    return {"real_return_mean": float(returns.mean()), "real_return_std": float(returns.std()),
            "real_returns": returns.tolist()}


def agent_world_model(payload, agent_path, device="cpu"):
    """The world model an agent.pt was trained with (its view of the real env), None for a model-free agent.
    Its checkpoint is found where the run recorded it, else beside the agent (a run dir that moved)."""
    a = payload["args"]
    if a.get("world_model", world_model.NO_MODEL) == world_model.NO_MODEL:
        return None
    try:
        model = world_model.make(a["world_model"], env_id=a["env_id"], seed=a["seed"], device=device)
        path = payload.get("world_model_path")
        if path and not os.path.isfile(path):
            path = os.path.join(os.path.dirname(agent_path), os.path.basename(path))
        return model.load(path) if path and getattr(model, "learns", True) else model
    except (OSError, ValueError) as e:
        raise ru.ArgError("--eval-checkpoint", "an agent.pt whose run's world model can be loaded", agent_path,
                          " ".join(str(e).split())) from None


class DynaRounds:
    """args.real_iterations + 1 phases of imagined training with a Dyna round after every phase but the last, a
    real evaluation every args.eval_every imagined steps (and always a final one), the status line and the summary:
    the real-data side of the library examples (sb3_example.py, torchrl_example.py), whose learners run their own
    loops. The script runs its learner for `phase_steps(phase)` imagined steps, then calls `end_phase`."""

    def __init__(self, run, args, model, data, target=None):
        self.run, self.args, self.model, self.data = run, args, model, data
        self.num_phases, self.refits, self.last_eval = args.real_iterations + 1, 0, 0
        self.evaluator = run.evaluator = Evaluator(args.env_id, args.seed, args.eval_episodes, run.writer, target,
                                                   model)

    def phase_steps(self, phase, unit=1):
        """Imagined steps of `phase`: args.total_timesteps split evenly, in whole multiples of `unit`."""
        units = -(-self.args.total_timesteps // unit)
        return unit * (units // self.num_phases + (phase < units % self.num_phases))

    def status(self, phase, global_step, imagined_return, sps):
        print(f"[{self.run.tag}] iter {phase + 1}/{self.num_phases} step {global_step} imagined_return "
              f"{ru.fmt(imagined_return)} real_return {ru.fmt(self.evaluator.last_real)} real_steps "
              f"{self.run.figures['real_env_steps']} gap {ru.fmt(self.evaluator.last_gap)} SPS {int(sps)}", flush=True)

    def end_phase(self, phase, global_step, act_fn, explore_fn):
        """After phase `phase`: evaluate (act_fn: deterministic) when due, then a Dyna round with explore_fn."""
        self.run.figures["imagined_steps"] = int(global_step)
        last = phase == self.num_phases - 1
        if ru.eval_due(self.args.eval_every, global_step, self.last_eval) and not last:
            self.last_eval = global_step
            self.evaluator(act_fn, global_step, self.run.figures["real_env_steps"])
        if not last and getattr(self.model, "learns", True):
            self.data, m = dyna_round(self.model, self.data, self.args.env_id, explore_fn,
                                      self.args.real_steps_per_iteration, seed=self.args.seed + 1000 * (phase + 1),
                                      refit_passes=self.args.refit_passes, writer=self.run.writer,
                                      global_step=global_step)
            self.run.add_dyna_round(m)
            self.refits += 1

    def finish(self, act_fn, global_step, extra=None):
        """The final evaluation, summary.json (with the script's `extra` keys) and the last lines."""
        self.run.figures["imagined_steps"] = int(global_step)
        final = self.evaluator(act_fn, global_step, self.run.figures["real_env_steps"], final=True)
        return self.run.finish(final, **(extra or {}))
