# Fits the reference world model (world_model.py) on real data and reports how good it is (CleanRL-style script).
#
#   python train_world_model.py                        # CartPole-v1, 20k random-policy transitions, ~20 s
#   python train_world_model.py --env-id Pendulum-v1   # any env with a 1-D Box observation, Discrete or Box actions
#
# 1. collects `--total-timesteps` real transitions with a uniform random policy,
# 2. fits a probabilistic MLP ensemble that predicts the observation delta, the reward and termination,
# 3. measures its accuracy on held-out real episodes (one-step, reward, termination, open-loop k-step),
# 4. writes runs/{run_name}/world_model.pt (atomic; it carries the real transitions, so Dyna refits of the loaded
#    model see them), runs/{run_name}/summary.json, TensorBoard scalars under world_model/ and the open-loop figure
#    (held-out real episodes against the model's prediction from the same start with the same actions) as
#    runs/{run_name}/open_loop.png and as a TensorBoard image.
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import rl_utils
import visualize
import world_model as wm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """The name of this experiment."""
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
    """The id of the real environment (1-D Box observations; Discrete or Box actions)."""
    total_timesteps: int = 20000
    """The number of real transitions collected with a uniform random policy."""
    test_fraction: float = 0.1
    """The fraction of real episodes held out for the accuracy report (never used for fitting or early stopping)."""
    val_fraction: float = 0.1
    """The fraction of the remaining episodes used for early stopping."""

    ensemble_size: int = 5
    """The number of ensemble members."""
    hidden_size: int = 128
    """The width of each hidden layer (128 fits CartPole as well as 200 at a third of the CPU time)."""
    num_layers: int = 3
    """The number of hidden layers."""
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
    save_model: bool = True
    """Whether to write runs/{run_name}/world_model.pt."""


def check_args(args: Args):
    if args.total_timesteps < 2:
        raise rl_utils.ArgError("--total-timesteps", "at least 2 real transitions", args.total_timesteps)
    rl_utils.check_positive(args, "ensemble_size", "hidden_size", "num_layers", "batch_size", "max_epochs",
                            "patience", "learning_rate")
    for name in ("test_fraction", "val_fraction"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise rl_utils.ArgError("--" + name.replace("_", "-"), "a fraction in [0, 1)", getattr(args, name))
    rl_utils.real_env_spaces(args.env_id, "train_world_model.py")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    run_name, run_dir, writer = rl_utils.start_run(args, args.exp_name)
    try:
        start_time = time.time()
        rl_utils.seed_everything(args.seed, args.num_threads, args.torch_deterministic)
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

        buffer = wm.collect_transitions(args.env_id, args.total_timesteps, args.seed)
        collect_seconds = time.time() - start_time
        writer.add_scalar("charts/SPS", int(len(buffer) / max(collect_seconds, 1e-9)), len(buffer))
        print(f"[train_world_model] collected {len(buffer)} real transitions ({buffer.num_episodes} episodes) "
              f"in {collect_seconds:.1f}s", flush=True)

        # whole episodes are held out, so the k-step segments of the report were never seen in fitting
        fit_buf, test_buf = buffer.split_episodes(args.test_fraction, seed=args.seed)
        model, fit = wm.fit_world_model(
            fit_buf, seed=args.seed, ensemble_size=args.ensemble_size, hidden_size=args.hidden_size,
            num_layers=args.num_layers, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
            batch_size=args.batch_size, max_epochs=args.max_epochs, patience=args.patience,
            val_fraction=args.val_fraction, termination_pos_weight=args.termination_pos_weight,
            env_id=args.env_id, device=device, writer=writer, global_step=len(buffer), verbose=True,
        )
        accuracy = wm.evaluate_world_model(model, test_buf) if len(test_buf) else {}
        figure = visualize.write_open_loop(model, test_buf if len(test_buf) else fit_buf, writer, len(buffer))
        ckpt_path = os.path.join(run_dir, "world_model.pt")
        summary = {
            "env_id": args.env_id, "seed": args.seed,
            **{k: accuracy.get(k) for k in ("one_step_mse", "reward_mae", "termination_precision",
                                            "termination_recall", "num_test_transitions", "num_test_terminations")},
            **{f"k_step_error_{k}": accuracy.get(f"k_step_error_{k}") for k in wm.K_STEPS},
            **{f"k_step_count_{k}": accuracy.get(f"k_step_count_{k}") for k in wm.K_STEPS},
            "real_env_steps": len(buffer), "train_epochs": fit["epochs"], "fit_seconds": fit["seconds"],
            "val_mse": fit["val_mse"], "checkpoint": ckpt_path if args.save_model else None, "open_loop_figure": figure,
            "run_dir": run_dir,
        }
        if args.save_model:
            # all real data (the test episodes too: real_env_steps counts them) travels with the model, so a Dyna
            # refit of the loaded checkpoint sees it together with the new data
            wm.save_world_model(model, ckpt_path, extra={"summary": summary, "args": dataclasses.asdict(args),
                                                         "real_env_steps": len(buffer)}, buffer=buffer)
        summary["wall_seconds"] = time.time() - start_time
        for k, v in summary.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed", "real_env_steps"):
                writer.add_scalar(f"world_model/{k}", v, len(buffer))
        wm.write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
        writer.close()
    finally:
        rl_utils.remove_run_dir_without_summary(run_dir)

    print("[train_world_model] accuracy on held-out real episodes:")
    for k, v in summary.items():
        print(f"  {k}: {v:.5g}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"[train_world_model] results: {os.path.join(run_dir, 'summary.json')}")
    if args.save_model:
        print(f"[train_world_model] world model: {ckpt_path} (use it: python ppo_imagined.py --env-id {args.env_id} "
              f"--world-model-path {ckpt_path})")
    print("[train_world_model] curves: tensorboard --logdir runs")
