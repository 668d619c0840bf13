"""Tests for ppo_imagined.py: GAE / bootstrapping on crafted trajectories in both autoreset modes, the make_env
pattern, and tiny end-to-end runs in every vector mode (imagined and model-free)."""
import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ppo_imagined  # noqa: E402
from ppo_imagined import Agent, RolloutCollector, compute_gae, make_env  # noqa: E402

GAMMA = 0.9
NEXT, SAME = gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP


# ---------------------------------------------------------------- compute_gae on hand-made tensors
def col(*xs, dtype=torch.float32):
    """One env: a (T, 1) column."""
    return torch.tensor(xs, dtype=dtype)[:, None]


def test_gae_termination_not_bootstrapped():
    # 2-step episode that terminates; next_values at the terminal step is garbage and must be ignored
    rewards, values = col(1.0, 1.0), col(5.0, 3.0)
    next_values = col(3.0, 1000.0)
    term = col(False, True, dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, next_values, term, term, col(True, True, dtype=torch.bool), GAMMA, 1.0)
    assert ret[1, 0].item() == pytest.approx(1.0)
    assert ret[0, 0].item() == pytest.approx(1.0 + GAMMA * 1.0)  # lambda=1: Monte-Carlo return
    assert adv[0, 0].item() == pytest.approx(1.9 - 5.0)


def test_gae_truncation_bootstrapped_with_final_value():
    rewards, values = col(1.0, 1.0), col(5.0, 3.0)
    next_values = col(3.0, 7.0)  # V(final obs) = 7 at the truncated step
    term = col(False, False, dtype=torch.bool)
    done = col(False, True, dtype=torch.bool)
    _, ret = compute_gae(rewards, values, next_values, term, done, col(True, True, dtype=torch.bool), GAMMA, 1.0)
    assert ret[1, 0].item() == pytest.approx(1.0 + GAMMA * 7.0)
    assert ret[0, 0].item() == pytest.approx(1.0 + GAMMA * (1.0 + GAMMA * 7.0))


def test_gae_done_cuts_lambda_chain_and_reset_step_is_masked():
    # NEXT_STEP layout: t0 truncated (final V=4), t1 reset transition (invalid), t2 new episode
    rewards, values = col(1.0, 0.0, 1.0), col(2.0, 4.0, 9.0)
    next_values = col(4.0, 9.0, 6.0)
    term = col(False, False, False, dtype=torch.bool)
    done = col(True, False, False, dtype=torch.bool)
    valid = col(True, False, True, dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, next_values, term, done, valid, GAMMA, 0.95)
    assert adv[1, 0].item() == 0.0  # the reset transition carries no learning signal
    assert adv[0, 0].item() == pytest.approx(1.0 + GAMMA * 4.0 - 2.0)  # nothing leaks across the episode boundary
    assert adv[2, 0].item() == pytest.approx(1.0 + GAMMA * 6.0 - 9.0)


def test_gae_lambda_zero_is_td_error_and_batched_envs_are_independent():
    rewards = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    values = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    next_values = torch.tensor([[2.0, 2.0], [5.0, 6.0]])
    term = torch.tensor([[False, False], [True, False]])
    adv, _ = compute_gae(rewards, values, next_values, term, term, torch.ones(2, 2, dtype=torch.bool), GAMMA, 0.0)
    expected = rewards + GAMMA * next_values * (~term).float() - values
    torch.testing.assert_close(adv, expected)


# ---------------------------------------------------------------- the rollout collector on a crafted env
class CountEnv(gym.Env):
    """obs = [k, 0] with k the step index in the episode; reward 1 per step; optionally terminates at k == term_at.
    Wrapped in a TimeLimit, so episodes without termination are truncated."""

    def __init__(self, term_at=None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.term_at = term_at
        self.k = 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return np.array([0.0, 0.0], np.float32), {}

    def step(self, action):
        self.k += 1
        terminated = self.term_at is not None and self.k >= self.term_at
        return np.array([self.k, 0.0], np.float32), 1.0, terminated, False, {}


class FixedValueAgent:
    """V(obs) = 10 * k + 1: every state has a distinct, known value."""

    def get_value(self, x):
        return 10.0 * x[:, :1] + 1.0

    def get_action_and_value(self, x, action=None):
        n = x.shape[0]
        action = torch.zeros(n, dtype=torch.long) if action is None else action
        return action, torch.zeros(n), torch.zeros(n), self.get_value(x)


def V(k):
    return 10.0 * k + 1.0


def collect(mode, term_at=None, limit=3, steps=6):
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.wrappers.TimeLimit(CountEnv(term_at), max_episode_steps=limit)], autoreset_mode=mode)
    collector = RolloutCollector(envs, FixedValueAgent(), torch.device("cpu"), GAMMA, 0.0, seed=0)
    batch = collector.collect(steps)
    return {k: v[:, 0] for k, v in batch.items()}, collector


def test_next_step_truncation_bootstraps_final_obs_and_masks_reset():
    b, collector = collect(NEXT)  # steps: 0->1, 1->2, 2->3 (truncated), reset, 0->1, 1->2
    assert b["valid"].tolist() == [True, True, True, False, True, True]
    assert b["dones"].tolist() == [False, False, True, False, False, False]
    assert b["terminated"].tolist() == [False] * 6
    # at the truncated step next_obs is the final obs (k=3): bootstrapped with V(3)
    assert b["next_values"][2].item() == pytest.approx(V(3))
    assert b["advantages"][2].item() == pytest.approx(1.0 + GAMMA * V(3) - V(2))
    assert b["advantages"][3].item() == 0.0
    assert b["advantages"][4].item() == pytest.approx(1.0 + GAMMA * V(1) - V(0))
    assert collector.finished_returns == [3.0] and collector.finished_lengths == [3]


def test_next_step_termination_not_bootstrapped():
    b, _ = collect(NEXT, term_at=2)  # 0->1, 1->2 (terminated), reset, 0->1, 1->2 (terminated), reset
    assert b["terminated"].tolist() == [False, True, False, False, True, False]
    assert b["valid"].tolist() == [True, True, False, True, True, False]
    assert b["advantages"][1].item() == pytest.approx(1.0 - V(1))
    assert b["returns"][1].item() == pytest.approx(1.0)


def test_same_step_truncation_uses_final_obs_not_reset_obs():
    b, collector = collect(SAME)  # 0->1, 1->2, 2->3 (truncated; next obs is the reset obs k=0), 0->1, ...
    assert b["valid"].all()
    assert b["dones"].tolist() == [False, False, True, False, False, True]
    assert b["next_values"][2].item() == pytest.approx(V(3))  # not V(0) = 1 of the reset observation
    assert b["advantages"][2].item() == pytest.approx(1.0 + GAMMA * V(3) - V(2))
    assert b["advantages"][3].item() == pytest.approx(1.0 + GAMMA * V(1) - V(0))
    assert collector.finished_returns == [3.0, 3.0]


def test_same_step_termination_not_bootstrapped():
    b, _ = collect(SAME, term_at=2)
    assert b["terminated"].tolist() == [False, True, False, True, False, True]
    assert b["returns"][1].item() == pytest.approx(1.0)
    assert b["advantages"][2].item() == pytest.approx(1.0 + GAMMA * V(1) - V(0))


def test_ppo_update_ignores_reset_transitions():
    """A reset transition with a huge fake advantage must not move the policy: only valid rows enter the loss."""
    torch.manual_seed(0)
    agent = Agent(2, 2)
    args = ppo_imagined.Args(num_minibatches=1, update_epochs=1, ent_coef=0.0)
    obs = torch.tensor([[[0.0, 0.0]], [[3.0, 0.0]]])
    batch = {"obs": obs, "actions": torch.zeros(2, 1, dtype=torch.long),
             "logprobs": torch.full((2, 1), np.log(0.5)), "values": torch.zeros(2, 1),
             "advantages": torch.tensor([[0.0], [1e6]]), "returns": torch.zeros(2, 1),
             "valid": torch.tensor([[True], [False]])}
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    stats = ppo_imagined.ppo_update(agent, torch.optim.SGD(agent.parameters(), lr=1.0), batch, args)
    assert stats["losses/policy_loss"] == pytest.approx(0.0, abs=1e-6)
    for k, v in agent.actor.state_dict().items():
        torch.testing.assert_close(v, before["actor." + k])


# ---------------------------------------------------------------- the seed tutorial's make_env pattern
@pytest.fixture(scope="module")
def world_model_path(tmp_path_factory):
    """A tiny world model checkpoint (seconds to fit): enough to exercise the plumbing, not to learn CartPole."""
    import train_world_model as twm

    torch.manual_seed(0)
    buffer = twm.collect_transitions("CartPole-v1", 300, seed=0)
    model, _ = twm.fit_world_model(buffer, seed=0, ensemble_size=2, hidden_size=32, num_layers=2, max_epochs=2)
    path = str(tmp_path_factory.mktemp("wm") / "world_model.pt")
    twm.save_world_model(model, path, extra={"real_env_steps": len(buffer)})
    return path


def test_make_env_thunks_load_independent_models(world_model_path):
    """CleanRL/seed pattern: SyncVectorEnv of make_env thunks, each loading its own model copy inside the thunk."""
    envs = gym.vector.SyncVectorEnv([make_env("CartPole-v1", 10 + i, world_model_path, max_episode_steps=5)
                                     for i in range(3)])
    models = [env.unwrapped.model for env in envs.envs]
    assert len({id(m) for m in models}) == 3  # no shared mutable model state between workers
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (3, 4)
    agent = Agent(4, 2)
    collector = RolloutCollector(envs, agent, torch.device("cpu"), 0.99, 0.95, seed=0)
    batch = collector.collect(12)  # crosses the 5-step truncation: reset transitions are masked
    assert batch["dones"].any() and not batch["valid"].all()
    assert torch.isfinite(batch["advantages"]).all()
    envs.close()


# ---------------------------------------------------------------- end to end, tiny budgets
TINY = ["--num-envs", "4", "--num-steps", "16", "--total-timesteps", "192", "--num-minibatches", "2",
        "--update-epochs", "1", "--eval-every", "1", "--eval-episodes", "2", "--real-iterations", "1",
        "--real-steps-per-iteration", "40", "--world-model-epochs", "1", "--imagined-horizon", "20",
        "--no-early-stop"]


def run_script(tmp_path, *extra, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "ppo_imagined.py"), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_summary(tmp_path):
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    with open(run_dir / "summary.json") as f:
        return run_dir, json.load(f)


def check_summary(summary, imagined: bool):
    for key in ("real_return_mean", "real_return_std", "real_env_steps", "eval_env_steps", "imagined_steps",
                "wall_seconds"):
        assert key in summary, key
    assert summary["eval_env_steps"] > 0
    assert (summary["imagined_steps"] > 0) == imagined


@pytest.mark.parametrize("vector_mode,autoreset", [("batched", "next_step"), ("sync", "same_step"),
                                                   ("async", "next_step")])
def test_end_to_end_vector_modes(tmp_path, world_model_path, vector_mode, autoreset):
    # spawned workers are slow to start: fewer of them and no Dyna round (which would start a second set)
    extra = ["--num-envs", "2", "--real-iterations", "0"] if vector_mode == "async" else []
    proc = run_script(tmp_path, *TINY, *extra, "--world-model-path", world_model_path, "--vector-mode", vector_mode,
                      "--autoreset-mode", autoreset)
    assert "[ppo] iter 1/" in proc.stdout and "imag_return" in proc.stdout and "SPS" in proc.stdout
    run_dir, summary = read_summary(tmp_path)
    check_summary(summary, imagined=True)
    # the checkpoint's 300 real transitions + the 40 collected by the Dyna round
    dyna_rounds = 0 if vector_mode == "async" else 1
    assert summary["real_env_steps"] == 300 + 40 * dyna_rounds and summary["dyna_rounds"] == dyna_rounds
    assert os.path.isfile(run_dir / "agent.pt")
    # a refitted model belongs to the run and is saved in it; an untouched checkpoint is referenced by its path
    used = str(run_dir / "world_model.pt") if dyna_rounds else os.path.abspath(world_model_path)
    assert summary["world_model_path"] == used and os.path.isfile(used)
    assert torch.load(run_dir / "agent.pt", weights_only=False)["world_model_path"] == used
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))


def test_dyna_refit_of_a_given_checkpoint_keeps_its_data(tmp_path):
    """A checkpoint that carries its real transitions: the Dyna refit sees them plus the new data (not only the new
    data), they are counted once, and the run's refit checkpoint carries them all."""
    import train_world_model as twm

    torch.manual_seed(0)
    buffer = twm.collect_transitions("CartPole-v1", 300, seed=0)
    model, _ = twm.fit_world_model(buffer, seed=0, ensemble_size=2, hidden_size=32, num_layers=2, max_epochs=2)
    path = str(tmp_path / "given.pt")
    twm.save_world_model(model, path, extra={"real_env_steps": len(buffer)}, buffer=buffer)
    proc = run_script(tmp_path, *TINY, "--world-model-path", path)
    assert "+40 real steps (total 340), world model refitted on 340 transitions" in proc.stdout
    run_dir, summary = read_summary(tmp_path)
    assert summary["real_env_steps"] == 300 + 40 and summary["dyna_rounds"] == 1  # not counted twice
    refit = twm.load_world_model(summary["world_model_path"])
    assert summary["world_model_path"] == str(run_dir / "world_model.pt") and len(refit.buffer) == 340
    np.testing.assert_array_equal(refit.buffer.obs[:300], buffer.obs)
    assert refit.extra["real_env_steps"] == 340


def test_default_trains_its_own_world_model_and_reloads(tmp_path):
    # torch output + SAME_STEP: final_obs comes back as a full tensor with a mask
    run_script(tmp_path, *TINY, "--initial-real-steps", "200", "--env-output", "torch", "--autoreset-mode", "same_step")
    run_dir, summary = read_summary(tmp_path)
    check_summary(summary, imagined=True)
    assert summary["real_env_steps"] == 240
    assert summary["world_model_path"] == str(run_dir / "world_model.pt")
    saved = torch.load(run_dir / "agent.pt", weights_only=False)
    assert saved["world_model_path"] == summary["world_model_path"]
    # the documented reload-and-evaluate command
    proc = run_script(tmp_path, "--eval-checkpoint", str(run_dir / "agent.pt"), "--eval-episodes", "2")
    result = json.loads(proc.stdout)
    assert result["real_return_mean"] == pytest.approx(summary["real_return_mean"])


def test_model_free_baseline(tmp_path):
    run_script(tmp_path, *TINY, "--world-model", "none")
    _, summary = read_summary(tmp_path)
    check_summary(summary, imagined=False)
    # 3 iterations x 4 envs x 16 steps, minus the NEXT_STEP reset steps (not transitions, not counted)
    assert 150 < summary["real_env_steps"] < 192 and summary["world_model_path"] is None


def test_bad_input_gives_a_clear_message(tmp_path):
    """Errors name the field, what was expected, what came and how to fix it (checked in-process: no subprocess)."""
    with pytest.raises(SystemExit, match=r"--world-model-path.*existing checkpoint.*missing\.pt"):
        ppo_imagined.check_args(ppo_imagined.Args(world_model_path=str(tmp_path / "missing.pt")))
    with pytest.raises(SystemExit, match=r"--num-envs.*positive integer"):
        ppo_imagined.check_args(ppo_imagined.Args(num_envs=0))
    with pytest.raises(SystemExit, match=r"--world-model-path.*--world-model none"):
        ppo_imagined.check_args(ppo_imagined.Args(world_model="none", world_model_path="x.pt"))
    pendulum = gym.make("Pendulum-v1")
    with pytest.raises(SystemExit, match=r"action space.*Discrete.*Box"):
        ppo_imagined.check_spaces(pendulum.observation_space, pendulum.action_space, "Pendulum-v1")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=r"--eval-checkpoint.*readable torch checkpoint"):
        ppo_imagined.load_agent(str(tmp_path / "junk.pt"))
