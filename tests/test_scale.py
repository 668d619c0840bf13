"""Issue 20 (scale): the rollout's statistics without host syncs, the ensemble step that runs only what a row
needs, and data-parallel PPO under torchrun (2 CPU processes, gloo)."""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ensemble  # noqa: E402
import ensemble_imagination  # noqa: E402
import real_env  # noqa: E402
from ppo_imagined import RunningMeanStd  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------- RunningMeanStd with a mask: no host sync
def test_masked_update_matches_the_selected_rows():
    x = torch.tensor([1.0, 5.0, -2.0, 7.0, 3.0])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    a, b = RunningMeanStd(), RunningMeanStd()
    for _ in range(3):
        a.update(x[mask.bool()])
        b.update(x, mask=mask)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.var, b.var)
    torch.testing.assert_close(a.count, b.count)
    before = (b.mean.clone(), b.var.clone(), b.count.clone())
    b.update(x, mask=torch.zeros(5))  # no row counts: nothing changes (and no NaN from an empty mean)
    for old, new in zip(before, (b.mean, b.var, b.count)):
        torch.testing.assert_close(old, new)


# ---------------------------------------------------------------- the ensemble step: only what a row needs
@pytest.fixture(scope="module")
def cartpole_net():
    data = real_env.collect_transitions("CartPole-v1", 400, seed=0)
    net, _ = ensemble.fit_world_model(data, seed=0, ensemble_size=5, hidden_size=32, num_layers=2, max_epochs=2,
                                      batch_size=64)
    return net


def reference_predict(net, obs, action, members, noise=None):
    """Every member on every row, then each row's member gathered: what predict computed before issue 20."""
    x = net.model_input(obs, net.encode_action(action))
    mean, logvar = net(x)
    rows = torch.arange(len(obs))
    m = mean[members, rows]
    if noise is not None:
        m = m + noise * torch.exp(0.5 * logvar[members, rows])
    y = torch.where(net.out_constant, net.out_mean, m * net.out_std + net.out_mean)
    next_obs = torch.minimum(torch.maximum(obs + y[:, : net.obs_dim], net.obs_clip_low), net.obs_clip_high)
    reward = y[:, -1].clamp(net.reward_clip[0], net.reward_clip[1])
    logit = net.termination_logits(x, next_obs)[members, rows]
    return next_obs, reward, logit, mean[..., : net.obs_dim].std(0).mean(-1)


@pytest.mark.parametrize("rows", [1, 200, 2500])  # below grouping, grouped, more than one CPU block
@pytest.mark.parametrize("noise", [False, True])
def test_predict_with_members_equals_the_full_ensemble(cartpole_net, rows, noise):
    net = cartpole_net
    g = torch.Generator().manual_seed(rows)
    obs = net.start_obs[torch.randint(len(net.start_obs), (rows,), generator=g)]
    obs = obs + 0.1 * torch.randn(rows, 4, generator=g)
    action = torch.randint(0, 2, (rows,), generator=g)
    members = torch.randint(0, 5, (rows,), generator=g)
    eps = torch.randn(rows, net.out_dim, generator=g) if noise else None
    expected = reference_predict(net, obs, action, members, eps)
    for disagreement in (True, False):
        got = net.predict(obs, action, members=members, noise=eps, disagreement=disagreement)
        for e, x in zip(expected[:3], got[:3]):
            torch.testing.assert_close(x, e, rtol=1e-5, atol=1e-5)
        if disagreement:
            torch.testing.assert_close(got[3], expected[3], rtol=1e-5, atol=1e-6)
        else:
            assert got[3] is None
    # the ensemble mean (members=None), blocks included
    x = net.model_input(obs, net.encode_action(action))
    mean, _ = net(x)
    torch.testing.assert_close(net.predict(obs, action)[0], torch.minimum(torch.maximum(
        obs + torch.where(net.out_constant, net.out_mean, mean.mean(0) * net.out_std + net.out_mean)[:, :4],
        net.obs_clip_low), net.obs_clip_high), rtol=1e-5, atol=1e-5)


def test_imagination_without_disagreement_drops_it_from_info(cartpole_net):
    envs = ensemble_imagination.make_imagined_vector_env(cartpole_net, 300, seed=0, disagreement=False)
    full = ensemble_imagination.make_imagined_vector_env(cartpole_net, 300, seed=0)
    a, _ = envs.reset(seed=3)
    b, _ = full.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(30):
        act = rng.integers(0, 2, 300)
        (a, ra, ta, ua, ia), (b, rb, tb, ub, ib) = envs.step(act), full.step(act)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ta | ua, tb | ub)
        assert "disagreement" not in ia and ib["disagreement"].shape == (300,)
    # the halt rule needs the disagreement: asked for anyway
    assert ensemble_imagination.Imagination(halt=2.0, disagreement=False).disagreement
