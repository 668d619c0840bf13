# Fits a world model on real data and reports how good it is (CleanRL-style script).
#
#   python train_world_model.py                        # CartPole-v1, 20k random-policy transitions, ~20 s
#   python train_world_model.py --env-id Pendulum-v1   # any env with a 1-D Box observation, Discrete or Box actions
#   python train_world_model.py --env-id PendulumPixels32-v1 --world-model rssm   # the latent model, on pixels
#   python train_world_model.py --world-model my_model.py:MyModel   # your own model (see world_model.py)
#
# 1. collects `--total-timesteps` real transitions with a uniform random policy,
# 2. fits the world model: the reference ensemble (a probabilistic MLP ensemble that predicts the observation delta,
#    the reward and termination, sized by the flags below) or the `--world-model` you name (its own `fit`),
# 3. for a model that can be drawn (the ensemble: `predict`; a latent model such as rssm: `open_loop`, `evaluate`),
#    measures its accuracy on held-out real episodes (one-step, reward, termination, open-loop k-step) and draws the
#    open-loop figure (held-out real episodes against the model's prediction with the same actions, from the same
#    start state or from the belief after 5 real steps; real and imagined frames side by side for pixels) as
#    runs/{run_name}/open_loop.png and as a TensorBoard image; other models are fitted and saved only,
# 4. writes runs/{run_name}/world_model.pt (atomic; it carries the real transitions, so Dyna refits of the loaded
#    model see them), runs/{run_name}/summary.json and TensorBoard scalars under world_model/.
# Ctrl-C keeps the run dir: summary.json says "status": "interrupted" (with the checkpoint, once the model is fitted).
import os
import sys
import time
import types
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import gymnasium as gym
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dyna  # noqa: E402
import ensemble  # noqa: E402
import real_env  # noqa: E402
import rl_utils as ru  # noqa: E402
import run_io  # noqa: E402
import world_model  # noqa: E402

ACCURACY_KEYS = ("one_step_mse", "reward_mae", "termination_precision", "termination_recall", "num_test_transitions",
                 "num_test_terminations")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """The name of this experiment (the run dir is runs/{env_id}__{exp_name}__{seed}__{time})."""
    seed: int = 1
    """Seed of the experiment (data collection, split, initialisation, minibatch order)."""
    torch_deterministic: bool = True
    """If toggled, `torch.backends.cudnn.deterministic=True`."""
    cuda: bool = True
    """If toggled, cuda will be used when available."""
    num_threads: int = 1
    """Torch CPU threads (0 keeps torch's default).
    One thread: these small matmuls gain little from more, and lose a lot when the cores are shared."""

    env_id: str = "CartPole-v1"
    """The id of the real environment (1-D Box observations for the ensemble; Discrete or Box actions)."""
    world_model: str = "ensemble"
    """The world model to fit: `ensemble` (the reference MLP ensemble, sized by the flags below), `rssm` (the
    recurrent latent model, its own sizes), or your own as `path/to/file.py:attr` or `package.module:attr` (fitted
    with its own `fit` and saved; the accuracy report and the open-loop figure need the ensemble's `predict` or a
    model's own `open_loop` and `evaluate`, as rssm's)."""
    total_timesteps: int = 20000
    """The number of real transitions collected with a uniform random policy."""
    test_fraction: float = 0.1
    """The fraction of real episodes held out for the accuracy report (never used for fitting or early stopping)."""
    val_fraction: float = 0.1
    """The fraction of the remaining episodes used for early stopping (ensemble)."""

    ensemble_size: int = 5
    """The number of ensemble members."""
    hidden_size: int = 128
    """The width of each hidden layer (128 fits CartPole as well as 200 at a third of the CPU time)."""
    num_layers: int = 3
    """The number of hidden layers."""
    num_elites: Optional[int] = None
    """The members imagination draws from: the best on validation data (None: all; MBPO: 5 of 7)."""
    learning_rate: float = 1e-3
    """The Adam learning rate."""
    weight_decay: float = 1e-5
    """The L2 weight decay."""
    batch_size: int = 256
    """The minibatch size (per ensemble member)."""
    max_epochs: int = 40
    """The upper bound on training epochs (an epoch count, not a time cap, keeps runs reproducible)."""
    patience: int = 5
    """Training stops after this many epochs without a >1% validation improvement of any member."""
    termination_pos_weight: Literal["ratio", "sqrt", "none"] = "sqrt"
    """The class weight of terminations in the BCE: negatives/positives, its square root, or none.
    The square root favours recall: a missed termination teaches a policy that failing states are survivable."""


class WorldModelRun(ru.Run):
    """ru.Run (run dir, writer, Ctrl-C handling) with this script's summary: a fit has no policy to evaluate, so
    the summary holds the model's accuracy instead of returns; an interrupted one what was done so far."""

    def summary(self, status, final=None, **extra):
        return {"algo": self.tag, "env_id": self.args.env_id, "seed": self.args.seed, "status": status,
                "world_model": self.args.world_model, "real_env_steps": self.figures["real_env_steps"],
                **self.timings, "wall_seconds": time.time() - self.start_time, "run_dir": self.dir, **extra}


def check_args(args: Args):
    """Every bad flag stops here with one line, before a run dir exists. Returns the (unfitted) world model."""
    if args.total_timesteps < 2:
        raise ru.ArgError("--total-timesteps", "at least 2 real transitions", args.total_timesteps)
    ru.check_positive(args, "ensemble_size", "hidden_size", "num_layers", "batch_size", "max_epochs",
                      "patience", "learning_rate")
    if args.num_elites is not None and not 1 <= args.num_elites <= args.ensemble_size:
        raise ru.ArgError("--num-elites", f"a number of members in [1, --ensemble-size {args.ensemble_size}]",
                          args.num_elites)
    for name in ("test_fraction", "val_fraction"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ru.ArgError("--" + name.replace("_", "-"), "a fraction in [0, 1)", getattr(args, name))
    if args.world_model == world_model.NO_MODEL:
        raise ru.ArgError("--world-model", "a model to fit: ensemble, path/to/file.py:attr or package.module:attr",
                          args.world_model, "`none` is the model-free baseline of the training scripts.")
    obs_space = ru.real_env_spaces(args.env_id, "train_world_model.py")[0]
    if not isinstance(obs_space, gym.spaces.Box):  # the real data are arrays (N, *obs_shape)
        raise ru.ArgError("--env-id", "an env with Box observations (the ensemble: a 1-D Box observation space)",
                          args.env_id, f"It has {obs_space}; wrap it with gymnasium.wrappers.FlattenObservation.")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # model_from_args reads --world-model-path, which this script does not have: it always fits a new model
    model = dyna.model_from_args(types.SimpleNamespace(**vars(args), world_model_path=None), device)
    if not getattr(model, "learns", True):
        raise ru.ArgError("--world-model", "a model that learns from real data", args.world_model,
                          f"{type(model).__name__} has learns = False: there is nothing to fit.")
    return model, device


if __name__ == "__main__":
    args = tyro.cli(Args)
    model, device = check_args(args)
    ru.seed_everything(args.seed, args.num_threads, args.torch_deterministic)

    run = WorldModelRun(args, "train_world_model")
    saved = {"fitted": False}  # and the checkpoint once written: an interrupted run's summary names it

    def save_checkpoint(summary=None):
        if saved["fitted"]:
            # all real data (the test episodes too: real_env_steps counts them) travels with the model, so a Dyna
            # refit of the loaded checkpoint sees it together with the new data
            saved["checkpoint"] = model.save(run.path("world_model.pt"), extra={
                "summary": summary or {}, "args": asdict(args), "real_env_steps": run.figures["real_env_steps"]})
        return {"checkpoint": saved.get("checkpoint")}

    run.checkpoint = save_checkpoint
    with run:
        writer = run.writer
        t0 = time.time()
        buffer = real_env.collect_transitions(args.env_id, args.total_timesteps, args.seed)
        run.figures["real_env_steps"] = len(buffer)
        run.timings["real_collect_seconds"] = time.time() - t0
        writer.add_scalar("charts/SPS", int(len(buffer) / max(run.timings["real_collect_seconds"], 1e-9)),
                          len(buffer))
        print(f"[train_world_model] collected {len(buffer)} real transitions ({buffer.num_episodes} episodes) "
              f"in {run.timings['real_collect_seconds']:.1f}s", flush=True)

        # whole episodes are held out, so the k-step segments of the report were never seen in fitting
        fit_buf, test_buf = buffer.split_episodes(args.test_fraction, seed=args.seed)
        t0 = time.time()
        if isinstance(model, ensemble.EnsembleModel):  # the reference ensemble, sized by this script's flags
            model.net, fit = ensemble.fit_world_model(
                fit_buf, seed=args.seed, ensemble_size=args.ensemble_size, hidden_size=args.hidden_size,
                num_layers=args.num_layers, num_elites=args.num_elites, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                batch_size=args.batch_size, max_epochs=args.max_epochs, patience=args.patience,
                val_fraction=args.val_fraction, termination_pos_weight=args.termination_pos_weight,
                env_id=args.env_id, device=device, writer=writer, global_step=len(buffer), verbose=True)
            model.data = buffer  # what its checkpoint carries: all real data
        else:
            fit = model.fit(fit_buf, seed=args.seed, writer=writer, global_step=len(buffer)) or {}
        saved["fitted"] = True
        run.timings["world_model_seconds"] = time.time() - t0

        summary = {"train_epochs": fit.get("epochs"), "fit_seconds": fit.get("seconds", time.time() - t0),
                   "val_mse": fit.get("val_mse")}
        if isinstance(getattr(model, "net", None), ensemble.EnsembleWorldModel):  # a model that can be drawn
            import visualize

            accuracy = ensemble.evaluate_world_model(model.net, test_buf) if len(test_buf) else {}
            summary.update({k: accuracy.get(k) for k in ACCURACY_KEYS})
            for kind in ("error", "count"):
                summary.update({f"k_step_{kind}_{k}": accuracy.get(f"k_step_{kind}_{k}") for k in ensemble.K_STEPS})
            summary["open_loop_figure"] = visualize.write_open_loop(model, test_buf if len(test_buf) else fit_buf,
                                                                    writer, len(buffer))
        elif callable(getattr(model, "open_loop", None)):  # a latent model (rssm): its own report and rollout
            import visualize

            if len(test_buf) and callable(getattr(model, "evaluate", None)):
                summary.update(model.evaluate(test_buf, seed=args.seed))
            summary["open_loop_figure"] = visualize.write_latent_open_loop(model, test_buf if len(test_buf)
                                                                           else fit_buf, writer, len(buffer))
        else:
            print(f"[train_world_model] --world-model {args.world_model} offers neither `predict` nor `open_loop` "
                  "to draw: fitted and saved only (no accuracy report, no open-loop figure)", flush=True)
        summary = run.summary("finished", **summary)
        summary["checkpoint"] = save_checkpoint(summary)["checkpoint"]
        for k, v in summary.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed", "real_env_steps"):
                writer.add_scalar(f"world_model/{k}", v, len(buffer))
        summary["wall_seconds"] = time.time() - run.start_time
        run_io.write_json_atomic(run.path("summary.json"), summary)
        writer.close()

    accuracy = " (accuracy on held-out real episodes)" if "one_step_mse" in summary else ""
    print(f"[train_world_model] summary{accuracy}:")
    for k, v in summary.items():
        print(f"  {k}: {v:.5g}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"[train_world_model] results: {run.path('summary.json')}")
    print(f"[train_world_model] world model: {summary['checkpoint']} (use it: python ppo_imagined.py --env-id "
          f"{args.env_id} --world-model {args.world_model} --world-model-path {summary['checkpoint']})")
    print("[train_world_model] curves: tensorboard --logdir runs")
