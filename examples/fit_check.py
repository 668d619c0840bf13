"""How well does the ensemble fit a run's newest real data, and what would a longer fit buy? Fresh fits of the
run's own network on its saved buffer, scored on the last episodes, which they never see. Minutes, not a run.

    python examples/fit_check.py runs/<run>/world_model.pt [--max-epochs 40 300 --patience 5 30]

Each (--max-epochs, --patience) pair is one fit (the scripts' refits stop at 40 epochs, patience 5). Training
data: every episode but the last ones, which hold at least --test-transitions transitions; scored there with the
ensemble mean, as the error on the observation deltas and on the reward, each divided by the variance of the true
values (NMSE: 0 is perfect, 1 is no better than their mean). For `EnsembleModel` checkpoints saved with their data
(`sac_imagined.py`, `svg_imagined.py`, `train_world_model.py` runs).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ensemble  # noqa: E402


def fit_check(path, max_epochs=(40,), patience=(5,), test_transitions=2000, seed=0):
    if len(max_epochs) != len(patience) or not max_epochs:
        raise SystemExit(f"fit_check.py: --max-epochs and --patience expected one value each per fit, got "
                         f"{list(max_epochs)} and {list(patience)}")
    checks = (("--max-epochs", max_epochs), ("--patience", patience), ("--test-transitions", [test_transitions]))
    for flag, values in checks:
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise SystemExit(f"fit_check.py: {flag} expected integers >= 1, got {list(values)}")
    if not os.path.isfile(path):
        raise SystemExit(f"fit_check.py: expected a world_model.pt a run wrote, got {path!r}: the file does not exist")
    try:
        saved = ensemble.load_world_model(path)
    except ValueError as e:  # damaged, foreign or too new: the loader's message says which
        raise SystemExit(f"fit_check.py: {e}") from None
    buf = saved.buffer
    if buf is None:
        raise SystemExit(f"fit_check.py: {path} was saved without its data (no 'buffer' key): nothing to fit on")
    ids = np.unique(buf.episode_ids)
    lengths = np.array([np.sum(buf.episode_ids == i) for i in ids[::-1]])
    k = int(np.searchsorted(np.cumsum(lengths), test_transitions)) + 1  # the newest episodes, whole
    if k >= len(ids):
        raise SystemExit(f"fit_check.py: --test-transitions expected fewer than the buffer's {len(buf)} transitions "
                         f"in all but its first episode, got {test_transitions}")
    train, test = buf.select_episodes(ids[:-k]), buf.select_episodes(ids[-k:])
    obs, actions, next_obs, rewards = (torch.as_tensor(x) for x in (test.obs, test.actions, test.next_obs,
                                                                      test.rewards))
    rows = []
    for epochs, pat in zip(max_epochs, patience):
        start = time.time()
        model, metrics = ensemble.fit_world_model(train, seed=seed, max_epochs=epochs, patience=pat,
                                                  env_id=saved.env_id, **saved.config())
        with torch.no_grad():
            pred_obs, pred_reward, _, _ = model.predict(obs, actions)
        # scored in the test data's own units (its variance), not a model's normalisation, which differs between fits
        true_delta = next_obs - obs
        rows.append({
            "max_epochs": epochs, "patience": pat, "epochs": metrics["epochs"], "updates": metrics["updates"],
            "seconds": time.time() - start, "train": len(train), "test": len(test),
            "delta_nmse": float((((pred_obs - next_obs) ** 2).mean(0) / true_delta.var(0)).mean()),
            "reward_nmse": float(((pred_reward - rewards) ** 2).mean() / rewards.var()),
        })
        r = rows[-1]
        print(f"max_epochs {epochs} patience {pat}: {r['epochs']} epochs, {r['updates']} updates, "
              f"{r['seconds']:.0f} s | test ({r['test']} transitions) delta NMSE {r['delta_nmse']:.4f}, "
              f"reward NMSE {r['reward_nmse']:.4f}", flush=True)
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("world_model", help="a run's world_model.pt (saved with its data)")
    p.add_argument("--max-epochs", type=int, nargs="+", default=[40, 300], help="one per fit")
    p.add_argument("--patience", type=int, nargs="+", default=[5, 30], help="one per fit")
    p.add_argument("--test-transitions", type=int, default=2000, help="at least this many, the newest episodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.num_threads)
    fit_check(a.world_model, a.max_epochs, a.patience, a.test_transitions, a.seed)
