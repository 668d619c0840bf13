"""The ensemble with a known termination rule: the network learns dynamics and reward, the rule says where an
imagined episode ends. MBPO does this with its `static_fns`; a learned termination head that is wrong near the
edge of the healthy region teaches a policy either to fear states that are safe or to seek ones that end.

    python sac_imagined.py --env-id Hopper-v5 --world-model examples/known_termination.py:mbpo_ensemble \
        --rollout-batch-size 100000 --real-ratio 0.05 --target-entropy -1

The rules are the ones Gymnasium's v5 envs apply with their default arguments, written on the observation (which
excludes the x position): Hopper ends outside z > 0.7, |angle| < 0.2 and |obs[1:]| < 100, Walker2d outside
0.8 < z < 2 and |angle| < 1, InvertedPendulum past |angle| > 0.2; HalfCheetah never ends. The real envs clip
velocities to +-10 in the observation, so Hopper's state range can only be broken by the joint angles here.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ensemble  # noqa: E402


def hopper(obs):
    z, angle = obs[:, 0], obs[:, 1]
    healthy = (z > 0.7) & (angle.abs() < 0.2) & (obs[:, 1:].abs() < 100.0).all(dim=1)
    return ~(healthy & obs.isfinite().all(dim=1))


def walker2d(obs):
    z, angle = obs[:, 0], obs[:, 1]
    healthy = (z > 0.8) & (z < 2.0) & (angle.abs() < 1.0)
    return ~(healthy & obs.isfinite().all(dim=1))


def inverted_pendulum(obs):
    return ~((obs[:, 1].abs() <= 0.2) & obs.isfinite().all(dim=1))


def half_cheetah(obs):
    return torch.zeros(len(obs), dtype=torch.bool, device=obs.device)


RULES = {"Hopper-v5": hopper, "Walker2d-v5": walker2d, "InvertedPendulum-v5": inverted_pendulum,
         "HalfCheetah-v5": half_cheetah}


def termination_rule(env_id):
    if env_id not in RULES:
        raise ValueError(f"examples/known_termination.py: no termination rule for env_id={env_id!r}; the rules "
                         f"known are {', '.join(RULES)}. Add one to RULES (next_obs (B, obs_dim) -> bool (B,)).")
    return RULES[env_id]


def mbpo_ensemble(env_id, seed=0, device="cpu"):
    """MBPO's network (`--world-model mbpo-ensemble`) with the env's known termination rule."""
    return ensemble.mbpo_ensemble(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id))


def ensemble_model(env_id, seed=0, device="cpu"):
    """The default ensemble (`--world-model ensemble`) with the env's known termination rule."""
    return ensemble.EnsembleModel(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id))


def dhmbpo_ensemble(env_id, seed=0, device="cpu"):
    """DHMBPO's network size (`--world-model dhmbpo-ensemble`) with the env's known termination rule."""
    return ensemble.dhmbpo_ensemble(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id))


def dhmbpo_homoscedastic(env_id, seed=0, device="cpu"):
    """`dhmbpo_ensemble` with DHMBPO's noise model as well: each member learns one noise level per output, so
    svg_imagined.py's --model-noise gradients do not pass through a noise that depends on the state and action."""
    return ensemble.dhmbpo_ensemble(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id),
                                    homoscedastic=True)


def dhmbpo_renormalise(env_id, seed=0, device="cpu"):
    """`dhmbpo_homoscedastic` whose refits set the model's normalisation again from all the data, as DHMBPO's do
    (the others keep the first fit's, taken from the random steps alone)."""
    return ensemble.dhmbpo_ensemble(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id),
                                    homoscedastic=True, renormalise=True)


def dhmbpo_network(env_id, seed=0, device="cpu"):
    """DHMBPO's dynamics network as released (`ensemble.dhmbpo_network`: 3 hidden layers of 256, its noise model,
    layer normalisation and dropout) with the env's known termination rule."""
    return ensemble.dhmbpo_network(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id))


def dhmbpo_bootstrap(env_id, seed=0, device="cpu"):
    """`dhmbpo_homoscedastic` whose members weight every transition by their own Exp(1) draw, DHMBPO's Bayesian
    bootstrap (the others weight every transition 1, their members differing only in initialisation and order)."""
    return ensemble.dhmbpo_ensemble(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id),
                                    homoscedastic=True, bootstrap=True)


def dhmbpo_long_fit(env_id, seed=0, device="cpu"):
    """`dhmbpo_homoscedastic` whose fits run longer, nearer DHMBPO's: up to 300 epochs, stopping after 30 without
    a 1% gain on validation data (the others: 40 and 5). A warm refit then runs to its budget (--refit-passes)."""
    return ensemble.dhmbpo_ensemble(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id),
                                    homoscedastic=True, max_epochs=300, patience=30)


def dhmbpo_big_fit(env_id, seed=0, device="cpu"):
    """`dhmbpo_long_fit` on minibatches of 2,048 rows, DHMBPO's: eight times the rows per update, for a GPU, where
    an update of 2,048 rows costs about what one of 256 does. Pass eight times the --refit-passes for the same
    number of updates per refit (a refit's budget counts passes over the new data)."""
    return ensemble.dhmbpo_ensemble(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id),
                                    homoscedastic=True, max_epochs=300, patience=30, batch_size=2048)


def dhmbpo_full(env_id, seed=0, device="cpu"):
    """All of erl_lib's model pieces at once: `dhmbpo_network` fitted as `dhmbpo_renormalise`, `dhmbpo_bootstrap`
    and `dhmbpo_long_fit` are. Meant for erl_lib's schedule (--refit-every 1000), where its 15 long fits cost about
    what 76 short ones do."""
    return ensemble.dhmbpo_network(env_id, seed=seed, device=device, termination_fn=termination_rule(env_id),
                                   renormalise=True, bootstrap=True, max_epochs=300, patience=30)
