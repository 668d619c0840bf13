"""The reference world model: a probabilistic MLP ensemble learned from real transitions, and `EnsembleModel`, its
implementation of the world-model interface (`world_model.py`).

The network (`EnsembleWorldModel`, in `ensemble_net.py`), its fitting (`fit_world_model`: warm-started and budgeted for Dyna refits),
its accuracy on held-out data (`evaluate_world_model`) and its atomic checkpoints (`save_world_model`,
`load_world_model`). Its imagination adapters live in `ensemble_imagination.py`.
"""
import contextlib
import math
import os
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

import world_model
from ensemble_imagination import make_imagined_env, make_imagined_vector_env
from ensemble_net import EnsembleLinear, EnsembleWorldModel, check_spaces_supported  # noqa: F401 (re-exported)
from real_env import TransitionBuffer, make_real_env
from run_io import json_safe, save_torch_atomic

CHECKPOINT_FORMAT = "world-model-env/ensemble"
CHECKPOINT_VERSION = 2
K_STEPS = (1, 10, 50)

def _space_to_dict(space):
    """Serialises a supported space to tensors/primitives (safe for torch.load(weights_only=True))."""
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "low": torch.from_numpy(np.array(space.low, copy=True)),
            "high": torch.from_numpy(np.array(space.high, copy=True)),
            "shape": [int(s) for s in space.shape],
            "dtype": str(np.dtype(space.dtype)),
        }
    raise ValueError(f"cannot serialise space {space!r}")


def _space_from_dict(d):
    if d["type"] == "Discrete":
        return gym.spaces.Discrete(int(d["n"]), start=int(d.get("start", 0)))
    if d["type"] == "Box":
        return gym.spaces.Box(
            low=d["low"].numpy(), high=d["high"].numpy(), shape=tuple(d["shape"]), dtype=np.dtype(d["dtype"])
        )
    raise ValueError(f"unknown space type {d['type']!r}")


def _describe_space_difference(expected, got):
    """Returns None when the spaces match (type, shape, dtype, bounds/n), else a short description."""
    if type(expected) is not type(got):
        return f"{type(got).__name__} instead of {type(expected).__name__}"
    if isinstance(expected, gym.spaces.Discrete):
        if expected.n != got.n or expected.start != got.start:
            return f"Discrete(n={got.n}, start={got.start}) instead of Discrete(n={expected.n}, start={expected.start})"
        return None
    if expected.shape != got.shape:
        return f"shape {got.shape} instead of {expected.shape}"
    if expected.dtype != got.dtype:
        return f"dtype {got.dtype} instead of {expected.dtype}"
    if not (np.array_equal(expected.low, got.low) and np.array_equal(expected.high, got.high)):
        return f"bounds [{got.low}, {got.high}] instead of [{expected.low}, {expected.high}]"
    return None


def check_env_matches(model, observation_space, action_space, env_id="the given env"):
    """Raises a clear ValueError if the spaces differ from the ones the model was trained on."""
    for name, expected, got in (
        ("observation_space", model.observation_space, observation_space),
        ("action_space", model.action_space, action_space),
    ):
        diff = _describe_space_difference(expected, got)
        if diff is not None:
            raise ValueError(
                f"world model trained on {model.env_id!r} does not fit {env_id}: {name} is {diff}. "
                f"Train a model for this env with `python train_world_model.py --env-id {env_id}` "
                "or load the checkpoint that belongs to it."
            )


# ----------------------------------------------------------------------------------------------------------------
# Fitting and evaluation
# ----------------------------------------------------------------------------------------------------------------
def _tensors(model, buffer):
    dev = model.device
    obs = torch.as_tensor(buffer.obs, device=dev)
    x = model.model_input(obs, model.encode_action(buffer.actions))
    y = torch.cat([torch.as_tensor(buffer.next_obs, device=dev) - obs, torch.as_tensor(buffer.rewards, device=dev)[:, None]], 1)
    y = (y - model.out_mean) / model.out_std
    term = torch.as_tensor(buffer.terminated, device=dev).float()
    return x, y, term, torch.as_tensor(buffer.next_obs, device=dev)


@contextlib.contextmanager
def torch_threads(num_threads):
    """Runs the block with `num_threads` torch threads (0: leave them). A fit works on 256-row minibatches of a
    128-wide net: one thread is as fast as two on a quiet 2-core machine, and two threads collapse while anything
    else uses a core (measured, the README's snippet: 6.5 s with one thread, 56-143 s with torch's default two)."""
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_world_model(buffer, model=None, *, num_threads=1, **kwargs):
    """Fits a new EnsembleWorldModel on `buffer`, or refits `model` in place from its current weights (Dyna), with
    `num_threads` torch threads (see `torch_threads`). Keywords: see `_fit_world_model`. Returns (model, metrics).
    It turns on torch's flush-denormal mode for the process (torch has no getter to restore it): a trained model's
    saturated units produce denormals, and a HalfCheetah refit at 20,000 transitions took 18 s with them, 3 s without."""
    torch.set_flush_denormal(True)
    with torch_threads(num_threads):
        return _fit_world_model(buffer, model, **kwargs)


def _fit_world_model(buffer, model=None, *, seed=0, ensemble_size=5, hidden_size=128, num_layers=3,
                    num_elites=None, homoscedastic=False, layer_norm=False, dropout=0.0, renormalise=False,
                    bootstrap_seed=None, learning_rate=1e-3, weight_decay=1e-5, batch_size=256, max_epochs=40,
                    patience=5, max_updates=None, val_fraction=0.1, num_buffer_states=10000, env_id=None,
                    max_episode_steps=None, termination_pos_weight="sqrt", device="cpu", writer=None, global_step=0,
                    verbose=False):
    """The fit behind `fit_world_model`.

    Whole episodes are split into train/validation (`val_fraction`); training stops once no member improved its
    validation score by >1% for `patience` epochs, or after `max_updates` minibatch updates (the budget of a
    refit, see `EnsembleModel.fit`), and each member keeps its best snapshot (MBPO-style); the `num_elites` members
    best on validation data are the ones imagination draws from (None: all). A new model takes its
    normalisation from the data; a refit keeps it (so the warm weights stay valid) and only widens the clip range
    and the stored start/buffer states, unless `renormalise`: then a refit sets it again from all the data, as
    erl_lib's DHMBPO does, and the warm weights absorb the shift (a policy that leaves the first random data's
    range, a Hopper that hops, is otherwise seen in units of that data: tens of its stds). `bootstrap_seed` (None:
    off) weights each member's loss on each transition by its own Exp(1) draw, erl_lib's Bayesian bootstrap, so the
    members see the data differently, not only shuffled differently; the draws are a function of the seed and the
    transition's row, so a refit on a longer buffer gives the old rows the same weights. Returns (model,
    metrics): epochs, updates, train_loss, val_mse, val_term_bce, seconds, num_train, num_val.
    """
    t0 = time.time()
    if termination_pos_weight not in ("ratio", "sqrt", "none"):
        raise ValueError(
            f"fit_world_model: termination_pos_weight must be 'ratio', 'sqrt' or 'none', got {termination_pos_weight!r}"
        )
    if len(buffer) < 2:
        raise ValueError(f"fit_world_model: buffer needs at least 2 transitions, got {len(buffer)}")
    if not isinstance(renormalise, bool):
        raise ValueError(f"fit_world_model: renormalise must be True or False, got {renormalise!r}")
    if bootstrap_seed is not None and (isinstance(bootstrap_seed, bool)
                                       or not isinstance(bootstrap_seed, (int, np.integer))):
        raise ValueError(f"fit_world_model: bootstrap_seed must be an int or None, got {bootstrap_seed!r}")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    new_model = model is None
    if new_model:
        env_id = env_id or buffer.env_id
        if env_id is None:
            raise ValueError("fit_world_model: pass env_id=... (or a buffer from collect_transitions) for a new model")
        spec_env = make_real_env(env_id, "fit_world_model")
        if max_episode_steps is None:
            max_episode_steps = spec_env.spec.max_episode_steps if spec_env.spec is not None else None
        torch.manual_seed(seed)
        model = EnsembleWorldModel(
            spec_env.observation_space, spec_env.action_space, ensemble_size=ensemble_size, hidden_size=hidden_size,
            num_layers=num_layers, num_elites=num_elites, homoscedastic=homoscedastic, layer_norm=layer_norm,
            dropout=dropout, env_id=env_id,
            max_episode_steps=max_episode_steps,
        ).to(device)
        spec_env.close()
    train_rows = slice(None)  # the training split's rows of `buffer`, which the bootstrap weights are drawn for
    if val_fraction > 0 and len(buffer) >= 4:
        split_seed = int(rng.integers(2**31))
        train_buf, val_buf = buffer.split_episodes(val_fraction, seed=split_seed)
        if bootstrap_seed is not None:
            train_rows = buffer.split_rows(val_fraction, seed=split_seed)
    else:
        train_buf, val_buf = buffer, None
    model.set_statistics(train_buf, num_buffer_states=num_buffer_states, seed=seed,
                         normalisation=new_model or renormalise)
    x, y, term, nxt = _tensors(model, train_buf)
    n_pos = float(term.sum())
    # class imbalance: terminations are rare (~1/length of an episode), so up-weight them
    ratio = (len(term) - n_pos) / n_pos if n_pos > 0 else 1.0
    pw = {"ratio": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[termination_pos_weight]
    pos_weight = torch.tensor(pw, device=model.device)
    xv = yv = tv = nv = None
    if val_buf is not None and len(val_buf):
        xv, yv, tv, nv = _tensors(model, val_buf)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    E, N = model.ensemble_size, len(x)
    weights = None
    if bootstrap_seed is not None:  # (E, N_train)
        draws = bootstrap_weights(len(buffer), E, bootstrap_seed)
        weights = torch.as_tensor(draws[train_rows].T.copy(), device=model.device)

    def val_scores():
        model.eval()  # no dropout in a score (a new module starts in training mode)
        with torch.no_grad():
            mean, _ = model(xv)
            logit = model.termination_logits(xv, nv)
            mse = ((mean - yv) ** 2).mean(dim=(1, 2))
            bce = F.binary_cross_entropy_with_logits(logit, tv.expand_as(logit), reduction="none").mean(1)
        return mse, bce

    if xv is not None:
        mse, bce = val_scores()
        best = (mse + bce).clone()
        # per-member parameters (leading ensemble axis); the shared log-variance bounds are not snapshotted
        snapshot = {k: p.detach().clone() for k, p in model.named_parameters() if "logvar" not in k}
    epochs_since, epoch, updates, train_loss = 0, 0, 0, float("nan")
    val_mse = val_bce = float("nan")
    budget = max_updates if max_updates is not None else math.inf
    while epoch < max_epochs and updates < budget:
        epoch += 1
        model.train()
        perms = torch.stack([torch.randperm(N, generator=gen) for _ in range(E)]).to(model.device)
        total = torch.zeros((), device=model.device)  # summed on the device: no host sync per update
        count = 0
        for lo in range(0, N, batch_size):
            if updates >= budget:
                break
            idx = perms[:, lo: lo + batch_size]
            xb, yb, tb = x[idx], y[idx], term[idx]
            mean, logvar = model(xb)
            logit = model.termination_logits(xb, nxt[idx])
            nll = ((mean - yb) ** 2) * torch.exp(-logvar) + logvar
            nll = (nll.mean(dim=(1, 2)) if weights is None
                   else (nll.mean(dim=2) * torch.gather(weights, 1, idx)).mean(dim=1))
            bce = F.binary_cross_entropy_with_logits(logit, tb, pos_weight=pos_weight, reduction="none").mean(1)
            loss = (nll + bce).sum() + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach() / E
            count += 1
            updates += 1
        train_loss = float(total) / max(count, 1)
        model.eval()
        improved = False
        if xv is not None:
            mse, bce = val_scores()
            score = mse + bce
            better = score < best - 0.01 * best.abs()
            if bool(better.any()):
                improved = True
                best = torch.where(better, score, best)
                with torch.no_grad():
                    for k, p in model.named_parameters():
                        if k in snapshot:
                            snapshot[k][better] = p.detach()[better]
            val_mse, val_bce = float(mse.mean()), float(bce.mean())
        if verbose:
            print(f"epoch={epoch} train_loss={train_loss:.4f} val_mse={val_mse:.5f} val_term_bce={val_bce:.4f} "
                  f"t={time.time() - t0:.1f}s", flush=True)
        epochs_since = 0 if improved else epochs_since + 1
        if xv is not None and epochs_since >= patience:
            break
    if xv is not None:
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in snapshot:
                    p.copy_(snapshot[k])
        mse, bce = val_scores()
        val_mse, val_bce = float(mse.mean()), float(bce.mean())
        # MBPO's elites: imagination draws from the members best on validation data (all of them by default)
        model.elites.copy_(torch.sort(torch.argsort(mse + bce)[: model.num_elites]).values)
    model.eval()
    model.disagreement_ref.copy_(_disagreement_quantile(model, train_buf, seed))
    metrics = {
        "epochs": epoch, "updates": updates, "train_loss": train_loss, "val_mse": val_mse, "val_term_bce": val_bce,
        "seconds": time.time() - t0, "num_train": len(train_buf), "num_val": 0 if val_buf is None else len(val_buf),
    }
    if writer is not None:
        for k in ("train_loss", "val_mse", "val_term_bce", "updates", "seconds"):
            writer.add_scalar(f"world_model/{k}", metrics[k], global_step)
    return model, metrics


def bootstrap_weights(num_rows, ensemble_size, seed):
    """(num_rows, ensemble_size) float32 Exp(1) draws, row n's the n-th ensemble_size draws of `seed`'s generator:
    a longer buffer's first rows get the same weights, so a transition keeps its weights across refits."""
    return np.random.default_rng(seed).standard_exponential((num_rows, ensemble_size), dtype=np.float32)


@torch.no_grad()
def _disagreement_quantile(model, buffer, seed, quantile=0.99, max_rows=10000):
    """The members' disagreement that counts as "inside the data": its 99th percentile on real (obs, action)."""
    rows = np.random.default_rng(seed).choice(len(buffer), size=min(max_rows, len(buffer)), replace=False)
    disagreement = model.predict(torch.as_tensor(buffer.obs[rows], device=model.device), buffer.actions[rows])[3]
    return torch.quantile(disagreement.float(), quantile).clamp_min(1e-6)


@torch.no_grad()
def evaluate_world_model(model, buffer, ks=K_STEPS):
    """Accuracy on (held-out) real data, using the ensemble mean:
    one_step_mse: MSE of the normalised obs delta (1.0 = no better than predicting the mean delta);
    reward_mae: mean absolute reward error in reward units;
    termination_precision/recall: for P(terminated) > 0.5 (None when undefined: no predicted/true positives);
    k_step_error_{k}: open-loop error after replaying k real actions from a real obs, as the mean squared error in
    units of the data's per-dimension obs std, over all k-step segments that stay inside one episode
    (k_step_count_{k} says how many segments there were; None when there were none)."""
    dev = model.device
    obs = torch.as_tensor(buffer.obs, device=dev)
    next_obs, reward, logit, _ = model.predict(obs, buffer.actions)
    delta_std = model.out_std[: model.obs_dim]
    true_next = torch.as_tensor(buffer.next_obs, device=dev)
    one_step = (((next_obs - true_next) / delta_std) ** 2).mean()
    reward_mae = (reward - torch.as_tensor(buffer.rewards, device=dev)).abs().mean()
    pred_term = (logit > 0).cpu().numpy()
    true_term = buffer.terminated
    tp = int((pred_term & true_term).sum())
    precision = tp / int(pred_term.sum()) if pred_term.sum() > 0 else None
    recall = tp / int(true_term.sum()) if true_term.sum() > 0 else None
    out = {
        "one_step_mse": float(one_step), "reward_mae": float(reward_mae),
        "termination_precision": precision, "termination_recall": recall,
        "num_test_transitions": len(buffer), "num_test_terminations": int(true_term.sum()),
    }
    ids = buffer.episode_ids
    for k in ks:
        starts = np.nonzero(ids[: len(ids) - k + 1] == ids[k - 1:])[0] if len(ids) >= k else np.zeros(0, np.int64)
        out[f"k_step_count_{k}"] = int(len(starts))
        if len(starts) == 0:
            out[f"k_step_error_{k}"] = None
            continue
        o = obs[torch.as_tensor(starts, device=dev)]
        for j in range(k):
            o, _, _, _ = model.predict(o, buffer.actions[starts + j])
        target = true_next[torch.as_tensor(starts + k - 1, device=dev)]
        out[f"k_step_error_{k}"] = float((((o - target) / model.obs_std) ** 2).mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def _buffer_to_dict(buffer):
    """Serialises a TransitionBuffer to tensors/primitives (safe for torch.load(weights_only=True))."""
    out = {name: torch.from_numpy(np.ascontiguousarray(getattr(buffer, name)))
           for name in (*TransitionBuffer.FIELDS, "start_obs")}
    out["env_id"] = buffer.env_id
    return out


def _buffer_from_dict(d, obs_dim):
    """Rebuilds the TransitionBuffer written by _buffer_to_dict; checks it fits a model with `obs_dim`."""
    if not isinstance(d, dict):
        raise ValueError(f"buffer must be a dict, got {type(d).__name__}")
    arrays = {name: d[name].numpy() for name in (*TransitionBuffer.FIELDS, "start_obs")}
    buffer = TransitionBuffer(**arrays, env_id=d.get("env_id"))
    if len(buffer) and buffer.obs.shape[1] != obs_dim:
        raise ValueError(f"buffer observations have {buffer.obs.shape[1]} dims, the model has {obs_dim}")
    return buffer


def save_world_model(model, path, extra=None, buffer=None):
    """Writes the checkpoint atomically (temporary file in the same directory, then os.replace).
    The payload is tensors and primitive containers only, so it loads with torch.load(weights_only=True).

    `buffer` (a TransitionBuffer, optional): the real transitions the model was fitted on. Stored in the
    checkpoint (CartPole, 20k transitions: ~1 MB) so that a later Dyna refit of the loaded model
    (`fit_world_model(model.buffer.extend(new), model=model)`) sees all real data and recomputes its
    normalisation from it; load_world_model returns it as `model.buffer`. Without it the key is left out."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "env_id": model.env_id,
        "max_episode_steps": model.max_episode_steps,
        "observation_space": _space_to_dict(model.observation_space),
        "action_space": _space_to_dict(model.action_space),
        "config": model.config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "start_obs": model.start_obs.detach().cpu(),
        "buffer_obs": model.buffer_obs.detach().cpu(),
        "elites": model.elites.detach().cpu(),
        "extra": json_safe(extra or {}),
    }
    if buffer is not None:
        if not isinstance(buffer, TransitionBuffer):
            raise TypeError(f"save_world_model: buffer must be a TransitionBuffer or None, got {type(buffer).__name__}")
        payload["buffer"] = _buffer_to_dict(buffer)
    return save_torch_atomic(path, payload)



def load_world_model(path, device="cpu", env_id=None):
    """Rebuilds an EnsembleWorldModel from a checkpoint written by save_world_model / train_world_model.py.
    `model.buffer` is the checkpoint's real data (a TransitionBuffer) or None when it was saved without one
    (the "buffer" key is optional).

    Raises FileNotFoundError for a missing file and ValueError for a truncated/corrupt/foreign/too-new file,
    or when `env_id` is given and its spaces differ from the checkpoint's."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"world-model checkpoint {path!r} does not exist. Train one with "
            "`python train_world_model.py --env-id <ENV_ID>`; it is written to runs/<run_name>/world_model.pt."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors differ between torch versions; all mean the same to the user
        raise ValueError(
            f"{path!r} is not a readable world-model checkpoint (truncated or corrupt): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Re-run train_world_model.py to write a new one."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path!r} is a torch file but not a world-model checkpoint: expected a dict with "
            f"format={CHECKPOINT_FORMAT!r}, found {found}. Load a world_model.pt written by train_world_model.py."
        )
    version = payload.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path!r} has world-model checkpoint version {version!r}, this code reads version {CHECKPOINT_VERSION}. "
            "Re-train with the current train_world_model.py."
        )
    try:
        observation_space = _space_from_dict(payload["observation_space"])
        action_space = _space_from_dict(payload["action_space"])
        cfg = payload["config"]
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: loading draws no random numbers
            model = EnsembleWorldModel(
                observation_space, action_space, ensemble_size=cfg["ensemble_size"], hidden_size=cfg["hidden_size"],
                num_layers=cfg["num_layers"], num_elites=cfg.get("num_elites"),
                homoscedastic=cfg.get("homoscedastic", False), layer_norm=cfg.get("layer_norm", False),
                dropout=cfg.get("dropout", 0.0), env_id=payload["env_id"],
                max_episode_steps=payload["max_episode_steps"],
            )
        model.load_state_dict(payload["state_dict"])
        model.start_obs = payload["start_obs"].float()
        model.buffer_obs = payload["buffer_obs"].float()
        if payload.get("elites") is not None:  # checkpoints from before elites draw from every member
            model.elites = payload["elites"].long()
        if payload.get("buffer") is not None:  # optional: checkpoints saved without their data have no "buffer"
            model.buffer = _buffer_from_dict(payload["buffer"], model.obs_dim)
    except (KeyError, AttributeError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{path!r} is a damaged world-model checkpoint: {type(e).__name__}: {e}") from None
    model.extra = payload.get("extra", {})
    model.checkpoint_path = path
    model.eval()
    if env_id is not None:
        env = make_real_env(env_id, "load_world_model")
        try:
            check_env_matches(model, env.observation_space, env.action_space, env_id=repr(env_id))
        finally:
            env.close()
    return model.to(device)




class EnsembleModel(world_model.WorldModel):
    """The reference ensemble behind the world-model interface (`world_model.py`): it learns from transitions,
    steps all imagined envs in one batched call, and sees the real env as it is (its observation is the state).
    `net` is the `EnsembleWorldModel` once fitted or loaded; `data` the real transitions it was fitted on.
    ensemble_size / hidden_size / num_layers / num_elites size a new fit (a loaded checkpoint keeps its own), and
    homoscedastic gives each member one learned noise level per output instead of one per input (DHMBPO's), and
    layer_norm / dropout add DHMBPO's regularisation (see `EnsembleWorldModel`):
    `--world-model ensemble` is 5 members of 3x128, all drawn; `--world-model mbpo-ensemble` is MBPO's network
    (`mbpo_ensemble`: 7 members of 4x200, the 5 best on validation data drawn).
    renormalise: every refit sets the normalisation again from all the data (DHMBPO's; off: the first fit's stays).
    bootstrap: each member weights each transition by its own Exp(1) draw, fixed for the run (DHMBPO's Bayesian
    bootstrap, seeded by `seed`; off: every member weights every transition 1).
    max_epochs / patience / batch_size: how long a fit may run, the epochs without a 1% gain on validation data
    after which it stops, and the rows of each minibatch (see `_fit_world_model`); a refit also stops at its budget
    (`fit`'s refit_passes, passes over the new data). DHMBPO's fits run far longer than the defaults (erl_lib: a
    patience of 124 epochs of up to 6 minibatches of 2,048 rows).
    termination_fn: a known termination rule on next observations (`ensemble_imagination.Imagination`) that the
    imagined envs use instead of the learned head (which is still fitted and reported); None: the learned one."""

    def __init__(self, env_id, seed=0, device="cpu", termination_pos_weight="sqrt", *, ensemble_size=5,
                 hidden_size=128, num_layers=3, num_elites=None, homoscedastic=False, layer_norm=False, dropout=0.0,
                 termination_fn=None, renormalise=False, bootstrap=False, max_epochs=40, patience=5,
                 batch_size=256):
        for name, value in (("max_epochs", max_epochs), ("patience", patience), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"EnsembleModel: {name} must be an int >= 1, got {value!r}")
        env = make_real_env(env_id, "EnsembleModel")
        check_spaces_supported(env.observation_space, env.action_space, f"EnsembleModel(env_id={env_id!r})")
        self.observation_space, self.action_space = env.observation_space, env.action_space
        self.max_episode_steps = env.spec.max_episode_steps if env.spec is not None else None
        env.close()
        self.env_id, self.seed, self.device = env_id, seed, str(device)
        # terminations are weighted by sqrt(negatives/positives) in the loss; "ratio" for a learner that only goes
        # where the model predicts a rare goal (DQN on Acrobot, see dqn_imagined.py)
        self.termination_pos_weight = termination_pos_weight
        self.sizes = dict(ensemble_size=ensemble_size, hidden_size=hidden_size, num_layers=num_layers,
                          num_elites=num_elites, homoscedastic=homoscedastic, layer_norm=layer_norm, dropout=dropout)
        self.termination_fn = termination_fn
        self.renormalise = renormalise  # refits set the normalisation again (see _fit_world_model)
        if not isinstance(bootstrap, bool):
            raise ValueError(f"EnsembleModel: bootstrap must be True or False, got {bootstrap!r}")
        self.bootstrap = bootstrap
        # fit options, not saved with the model (as renormalise and bootstrap)
        self.fit_options = dict(max_epochs=int(max_epochs), patience=int(patience), batch_size=int(batch_size))
        self.net, self.data, self.extra = None, None, {}

    def fit(self, data, num_new=None, *, seed=0, refit_passes=20, writer=None, global_step=0):
        """A new fit on `data`, or (num_new: the transitions just appended) a warm refit from the current weights
        whose budget is what the new data is worth: at most the minibatch updates of `refit_passes` passes over
        it, drawn from all data, early stopping on top."""
        batch = self.fit_options["batch_size"]
        budget = None if num_new is None else max(1, math.ceil(refit_passes * num_new / batch))
        self.net, metrics = fit_world_model(data, self.net if num_new is not None else None, seed=seed,
                                            max_updates=budget, env_id=self.env_id, device=self.device, writer=writer,
                                            global_step=global_step,
                                            termination_pos_weight=self.termination_pos_weight,
                                            renormalise=self.renormalise,
                                            bootstrap_seed=self.seed if self.bootstrap else None,
                                            **self.fit_options, **self.sizes)
        self.data = data
        return metrics

    def _settings(self, horizon, start, halt, gamma, sample_noise, disagreement):
        if self.net is None:
            raise ValueError("EnsembleModel: fit() or load() it before imagining")
        return dict(horizon=horizon, start=start, halt=halt, gamma=gamma, sample_noise=sample_noise,
                    disagreement=disagreement, termination_fn=self.termination_fn)

    # disagreement=False with halt 0: each row runs only its own member (about ensemble_size x fewer FLOPs) and
    # info carries no "disagreement" (ensemble_imagination.Imagination); the scripts keep the default
    def imagined_env(self, *, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99, sample_noise=False,
                     disagreement=True):
        return make_imagined_env(self.net, seed=seed,
                                 **self._settings(horizon, start, halt, gamma, sample_noise, disagreement))

    def imagined_vector_env(self, num_envs, *, seed=None, horizon=None, start="start", halt=0.0, gamma=0.99,
                            sample_noise=False, output="numpy", autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
                            disagreement=True):
        return make_imagined_vector_env(self.net, num_envs, seed=seed, output=output, autoreset_mode=autoreset_mode,
                                        **self._settings(horizon, start, halt, gamma, sample_noise, disagreement))

    def predict(self, obs, action, members=None, noise=None):
        """The network's one batched step (see `EnsembleWorldModel.predict`): what the pictures draw."""
        return self.net.predict(obs, action, members=members, noise=noise)

    def differentiable_step(self, obs, action, sample=False):
        """The interface's step for learners that differentiate through imagination (svg_imagined.py): obs (B,d)
        and Box action (B,a) tensors -> next_obs (B,d) and reward (B,) with the autograd graph back to obs and
        action, terminated (B,) bool without one. Each row draws one of the elites (torch's global generator: a
        seeded run repeats on the CPU) and takes its mean (sample=False, as the imagined envs without
        --sample-noise do) or a reparameterised sample of its Gaussian (sample=True)."""
        if self.net is None:
            raise ValueError("EnsembleModel: fit() or load() it before imagining")
        net = self.net
        members = net.elites[torch.randint(net.num_elites, (len(obs),), device=net.elites.device)]
        next_obs, reward, logit = net.predict_with_grad(obs, action, members, termination=self.termination_fn is None,
                                                        sample=sample)
        terminated = logit > 0.0 if self.termination_fn is None else self.termination_fn(next_obs.detach())
        return next_obs, reward, terminated

    def save(self, path, extra=None):
        return save_world_model(self.net, path, extra=extra, buffer=self.data)

    def load(self, path):
        self.net = load_world_model(path, device=self.device, env_id=self.env_id)
        self.data, self.extra = self.net.buffer, self.net.extra
        return self


def dhmbpo_ensemble(env_id, seed=0, device="cpu", termination_fn=None, homoscedastic=False, renormalise=False,
                    bootstrap=False, max_epochs=40, patience=5, batch_size=256):
    """`--world-model dhmbpo-ensemble`: the reference ensemble at DHMBPO's width (Kubo et al.): 8 members of 256
    units, every member drawn, with 4 hidden layers (erl_lib's released config has 3: `dhmbpo_network`) and no
    layer normalisation or dropout. With svg_imagined.py on HalfCheetah-v5 it did better than MBPO's network
    (README). homoscedastic: DHMBPO's noise model too, one learned level per member and output (off: the reference
    ensemble's, per input). renormalise: refits set the normalisation again from all data (DHMBPO's; off: the
    first fit's stays). bootstrap: DHMBPO's per-member Exp(1) weights on every transition (off: all 1).
    max_epochs / patience / batch_size: the fits' length (`EnsembleModel`)."""
    return EnsembleModel(env_id, seed=seed, device=device, ensemble_size=8, hidden_size=256, num_layers=4,
                         num_elites=8, homoscedastic=homoscedastic, termination_fn=termination_fn,
                         renormalise=renormalise, bootstrap=bootstrap, max_epochs=max_epochs, patience=patience,
                         batch_size=batch_size)


def dhmbpo_network(env_id, seed=0, device="cpu", termination_fn=None, renormalise=False, bootstrap=False,
                   max_epochs=40, patience=5):
    """DHMBPO's dynamics network as erl_lib releases it (`config/agent/dynamics_model/deep_ensemble.yaml`): 8 members
    of 3 hidden layers of 256 SiLU units, every member drawn, one learned noise level per member and output, layer
    normalisation and dropout 0.01 by depth. Not here: its AdamW weight decay growing with depth (at most 1e-3,
    decoupled), its 2,048-row minibatches and its initialisation. renormalise / bootstrap / max_epochs / patience:
    the fits, as in `dhmbpo_ensemble`."""
    return EnsembleModel(env_id, seed=seed, device=device, ensemble_size=8, hidden_size=256, num_layers=3,
                         num_elites=8, homoscedastic=True, layer_norm=True, dropout=0.01,
                         termination_fn=termination_fn, renormalise=renormalise, bootstrap=bootstrap,
                         max_epochs=max_epochs, patience=patience)


def mbpo_ensemble(env_id, seed=0, device="cpu", termination_fn=None):
    """`--world-model mbpo-ensemble`: the reference ensemble with MBPO's network (Janner et al. 2019, its released
    configs): 7 members of 4 hidden layers of 200 units, imagination drawing from the 5 best on validation data."""
    return EnsembleModel(env_id, seed=seed, device=device, ensemble_size=7, hidden_size=200, num_layers=4,
                         num_elites=5, termination_fn=termination_fn)

