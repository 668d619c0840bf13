"""Tests for sb3_example.py and torchrl_example.py (and benchmark.py's --sb3-vecenv section).

* SB3: check_env on WorldModelEnv; the WorldModelSB3VecEnv adapter honours the SB3 VecEnv contract (shapes, dtypes,
  same-step autoreset with infos[i]["terminal_observation"], "TimeLimit.truncated" only for time limits, seeding)
  and behaves exactly like DummyVecEnv of single WorldModelEnvs.
* TorchRL: GymWrapper around the batched env passes check_env_specs; a truncated step keeps the true final
  observation, is not "terminated", and GAE bootstraps it with V(final obs) while a terminated step is not.
* Both scripts run end to end with tiny budgets on CartPole-v1 (Discrete) and Pendulum-v1 (Box) and write
  summary.json; with --vector-env sync (single imagined envs, each thunk loading the model, rebuilt after a refit);
  with a given simulator (examples/cartpole_physics.py: no real transition is used); bad input (Dict observations,
  MultiDiscrete actions, --algo dqn on Box actions, a missing --world-model-path, --world-model none) ends with one
  clear line and leaves no run dir.
"""
import json
import logging
import os
import runpy
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchmark  # noqa: E402
import ensemble  # noqa: E402
import ensemble_imagination  # noqa: E402
import real_env  # noqa: E402
import torchrl_example  # noqa: E402
from unsupported_envs import DICT_OBS_ID, MULTI_DISCRETE_ID  # noqa: E402
from sb3_example import WorldModelSB3VecEnv  # noqa: E402
from world_model_env import WorldModelVectorEnv  # noqa: E402

SAME, NEXT = gym.vector.AutoresetMode.SAME_STEP, gym.vector.AutoresetMode.NEXT_STEP
SUMMARY_KEYS = {"algo", "env_id", "seed", "world_model", "world_model_path", "real_return_mean", "real_return_std",
                "real_returns", "eval_episodes", "real_env_steps", "eval_env_steps", "imagined_steps",
                "imagined_return_mean", "imagined_minus_real", "real_return_scale", "wall_seconds",
                "world_model_seconds", "real_collect_seconds", "eval_seconds", "train_seconds", "target_return",
                "real_env_steps_to_target", "agent_path", "run_dir", "eval_history"}
logging.getLogger("torchrl").setLevel(logging.WARNING)


# ---------------------------------------------------------------- a deterministic toy model with known episode ends
class CounterModel:
    """obs = [t, row]: t counts steps; row `r` terminates when t reaches term_at[r] (others hit the time limit)."""

    def __init__(self, term_at):
        self.term_at = np.asarray(term_at, dtype=np.float32)


def counter_reset(model, seed=None, options=None):
    obs = np.zeros((len(np.asarray(seed).reshape(-1)), 2), np.float32)
    return {"state": obs, "observation": obs.copy()}


def counter_step(model, state, action):
    nxt = state.copy()
    nxt[:, 0] += 1
    nxt[:, 1] = np.arange(len(state))
    return {"state": nxt, "observation": nxt.copy(), "reward": 1.0 + np.asarray(action, np.float32),
            "terminated": nxt[:, 0] >= model.term_at[: len(state)]}


OBS_SPACE = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)


def counter_vec(term_at, horizon, mode=SAME):
    return WorldModelVectorEnv(CounterModel(term_at), OBS_SPACE, gym.spaces.Discrete(2), counter_reset, counter_step,
                               num_envs=len(term_at), max_episode_steps=horizon, autoreset_mode=mode)


@pytest.fixture(scope="module")
def tiny_wm():
    """A tiny but real EnsembleWorldModel (a second to fit)."""
    data = real_env.collect_transitions("CartPole-v1", 400, seed=0)
    model, _ = ensemble.fit_world_model(data, seed=0, max_epochs=2, ensemble_size=2, hidden_size=32, num_layers=2)
    return model


# ---------------------------------------------------------------- SB3
def test_check_env_on_world_model_env(tiny_wm):
    from stable_baselines3.common.env_checker import check_env

    check_env(ensemble_imagination.make_imagined_env(tiny_wm, seed=0), warn=True)


def test_sb3_adapter_vecenv_contract():
    # row 0 terminates at t=2; rows 1, 2 hit the time limit at t=3
    venv = WorldModelSB3VecEnv(counter_vec([2, 100, 100], horizon=3))
    assert venv.num_envs == 3 and venv.observation_space == OBS_SPACE and venv.action_space == gym.spaces.Discrete(2)
    obs = venv.reset()
    assert obs.shape == (3, 2) and obs.dtype == np.float32
    for t in (1, 2, 3):
        obs, rewards, dones, infos = venv.step(np.array([1, 0, 1]))
        assert obs.shape == (3, 2) and obs.dtype == np.float32
        np.testing.assert_array_equal(rewards, [2.0, 1.0, 2.0])
        assert rewards.dtype == np.float32 and dones.shape == (3,) and dones.dtype == bool
        assert isinstance(infos, list) and len(infos) == 3 and all(isinstance(i, dict) for i in infos)
        if t == 2:  # row 0 terminated: final obs in the info, next episode's first obs returned, no bootstrap
            np.testing.assert_array_equal(dones, [True, False, False])
            np.testing.assert_array_equal(infos[0]["terminal_observation"], [2.0, 0.0])
            assert infos[0]["TimeLimit.truncated"] is False
            np.testing.assert_array_equal(obs[0], [0.0, 0.0])
            assert "terminal_observation" not in infos[1]
        if t == 3:  # rows 1, 2 truncated by the time limit: SB3 must bootstrap them
            np.testing.assert_array_equal(dones, [False, True, True])
            for i in (1, 2):
                np.testing.assert_array_equal(infos[i]["terminal_observation"], [3.0, float(i)])
                assert infos[i]["TimeLimit.truncated"] is True
                np.testing.assert_array_equal(obs[i], [0.0, 0.0])
    obs[:] = 99.0  # the observations handed to SB3 are its own: writing into them leaves the env untouched
    obs2, *_ = venv.step(np.zeros(3, dtype=np.int64))
    assert obs2[1, 0] == 1.0
    assert venv.env_is_wrapped(gym.Wrapper) == [False, False, False]
    venv.close()
    with pytest.raises(ValueError, match="SAME_STEP"):
        WorldModelSB3VecEnv(counter_vec([5, 5], horizon=3, mode=NEXT))


def test_sb3_adapter_matches_dummy_vec_env(tiny_wm):
    """One batched model call per step must give what N single WorldModelEnvs in a DummyVecEnv give."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    n, horizon = 4, 6
    adapter = WorldModelSB3VecEnv(ensemble_imagination.make_imagined_vector_env(tiny_wm, n, horizon=horizon,
                                                                                autoreset_mode=SAME))
    dummy = DummyVecEnv([lambda: ensemble_imagination.make_imagined_env(tiny_wm, horizon=horizon) for _ in range(n)])
    for venv in (adapter, dummy):
        venv.seed(123)
    np.testing.assert_allclose(adapter.reset(), dummy.reset(), atol=1e-5)
    rng = np.random.default_rng(0)
    for _ in range(3 * horizon):
        actions = rng.integers(0, 2, size=n)
        o1, r1, d1, i1 = adapter.step(actions)
        o2, r2, d2, i2 = dummy.step(actions)
        np.testing.assert_allclose(o1, o2, atol=1e-4)
        np.testing.assert_allclose(r1, r2, atol=1e-4)
        np.testing.assert_array_equal(d1, d2)
        for a, b in zip(i1, i2):
            if "terminal_observation" in b:
                np.testing.assert_allclose(a["terminal_observation"], b["terminal_observation"], atol=1e-4)
                assert a["TimeLimit.truncated"] == b["TimeLimit.truncated"]


def test_benchmark_sb3_vecenv_section(tmp_path):
    out = tmp_path / "sb3.json"
    summary = benchmark.sb3_vecenv_main(benchmark.Args(sb3_vecenv=True, sb3_sizes=(2,), repeats=1, min_time=0.01,
                                                       json=str(out)))
    row = json.loads(out.read_text())["sb3_vecenv"]["2"]
    assert row == summary["sb3_vecenv"]["2"] and row["adapter"] > 0 and row["dummy"] > 0 and row["speedup"] > 0


# ---------------------------------------------------------------- TorchRL
def test_torchrl_batched_env_specs_and_truncation_bootstrap():
    from tensordict.nn import TensorDictModule
    from torchrl.envs.utils import check_env_specs
    from torchrl.objectives.value import GAE

    env = torchrl_example.make_torchrl_env(counter_vec([2, 100], horizon=3), reward_scale=1.0)
    assert tuple(env.batch_size) == (2,)
    check_env_specs(env, seed=0)

    td = env.rollout(4, break_when_any_done=False)  # [2 envs, 4 steps]
    nxt = td["next"]
    # row 0: terminates every 2 steps (indices 1, 3); row 1: truncated by the time limit at step 3 (index 2)
    assert nxt["terminated"][0, :, 0].tolist() == [False, True, False, True]
    assert nxt["truncated"][0, :, 0].tolist() == [False, False, False, False]
    assert nxt["terminated"][1, :, 0].tolist() == [False, False, False, False]
    assert nxt["truncated"][1, :, 0].tolist() == [False, False, True, False]
    # the step's "next" observation is the TRUE final obs; the following root obs is the reset obs
    assert nxt["observation"][0, 1].tolist() == [2.0, 0.0] and td["observation"][0, 2].tolist() == [0.0, 0.0]
    assert nxt["observation"][1, 2].tolist() == [3.0, 1.0] and td["observation"][1, 3].tolist() == [0.0, 0.0]
    assert nxt["step_count"][1, 2, 0].item() == 3 and td["step_count"][1, 3, 0].item() == 0

    # GAE with V(obs) = 10 * t, gamma 0.5, lambda 0: advantage = r + gamma * V(s') * (1 - terminated) - V(s)
    critic = TensorDictModule(lambda o: 10.0 * o[..., :1], in_keys=["observation"], out_keys=["state_value"])
    GAE(gamma=0.5, lmbda=0.0, value_network=critic)(td)
    adv, r = td["advantage"][..., 0], td["next", "reward"][..., 0]
    assert adv[0, 1].item() == pytest.approx(r[0, 1].item() + 0.0 - 10.0)  # terminated: no bootstrap
    assert adv[1, 2].item() == pytest.approx(r[1, 2].item() + 0.5 * 30.0 - 20.0)  # truncated: V(final obs)
    env.close()


def test_torchrl_box_actor_stays_in_bounds():
    """The TanhNormal actor samples (and its mode) lie inside the Box; log-probs are finite."""
    from tensordict import TensorDict
    from torchrl.envs.utils import ExplorationType

    obs_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    act_space = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    actor, critic = torchrl_example.make_agent(obs_space, act_space, hidden=16)
    td = actor(TensorDict({"observation": torch.randn(64, 3) * 5}, batch_size=[64]))
    assert td["action"].shape == (64, 1) and td["action"].abs().max() <= 2.0
    assert torch.isfinite(td["action_log_prob"]).all()
    mode = torchrl_example.numpy_policy(actor, ExplorationType.DETERMINISTIC, "cpu")(np.zeros((2, 3), np.float32))
    assert mode.shape == (2, 1) and np.abs(mode).max() <= 2.0


# ---------------------------------------------------------------- end to end, tiny budgets
def run_main(monkeypatch, cwd, script, *flags):
    """Runs the script's __main__ in this process (its imports are already paid for) with cwd as working dir."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *flags])
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


def read_run(cwd):
    (run_dir,) = list((cwd / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert any(f.name.startswith("events.out.tfevents") for f in run_dir.iterdir())
    return run_dir, summary


TINY = ["--initial-real-steps", "200", "--real-iterations", "1", "--real-steps-per-iteration", "100",
        "--eval-episodes", "2", "--total-timesteps", "512", "--num-envs", "4"]
TORCHRL_TINY = ["--frames-per-batch", "128", "--minibatch-size", "64", "--update-epochs", "1"]


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_sb3_example_end_to_end(tmp_path, monkeypatch, capsys, env_id):
    run_main(monkeypatch, tmp_path, "sb3_example.py", "--env-id", env_id, *TINY)
    stdout = capsys.readouterr().out
    run_dir, summary = read_run(tmp_path)
    assert "check_env(WorldModelEnv) passed" in stdout and "iter 2/2" in stdout
    assert summary["imagined_steps"] >= 512 and summary["real_env_steps"] == 200 + 100
    assert len(summary["eval_history"]) == 1 and summary["imagined_minus_real"] is not None
    # the refit world model carries all its real data; --eval-checkpoint replays the final evaluation exactly
    assert len(ensemble.load_world_model(run_dir / "world_model.pt").buffer) == 300
    if env_id == "CartPole-v1":  # as a separate process, from another working dir
        replay = subprocess.run([sys.executable, os.path.join(ROOT, "sb3_example.py"), "--eval-checkpoint",
                                 str(run_dir / "agent.pt")], cwd=tmp_path.parent, capture_output=True, text=True,
                                timeout=120)
        assert replay.returncode == 0, replay.stderr[-3000:]
        expected = f"real return {summary['real_return_mean']:.1f} +/- {summary['real_return_std']:.1f}"
        assert expected in replay.stdout, replay.stdout
        # DQN from the saved model without Dyna rounds: its real data is counted, the checkpoint is not rewritten
        again = tmp_path / "again"
        again.mkdir()
        run_main(monkeypatch, again, "sb3_example.py", "--world-model-path", str(run_dir / "world_model.pt"),
                 "--algo", "dqn", *TINY[6:], "--real-iterations", "0")
        _, summary2 = read_run(again)
        assert summary2["sb3_algo"] == "dqn" and summary2["real_env_steps"] == 300
        assert summary2["world_model_path"] == str(run_dir / "world_model.pt") and summary2["eval_history"] == []


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_torchrl_example_end_to_end(tmp_path, monkeypatch, capsys, env_id):
    run_main(monkeypatch, tmp_path, "torchrl_example.py", "--env-id", env_id, *TINY, *TORCHRL_TINY)
    stdout = capsys.readouterr().out
    run_dir, summary = read_run(tmp_path)
    assert "check_env_specs passed" in stdout and "iter 2/2" in stdout
    assert summary["imagined_steps"] >= 512 and summary["real_env_steps"] == 200 + 100
    assert summary["algo"] == "torchrl_example" and summary["env_id"] == env_id


EXAMPLES = [("sb3_example.py", TINY), ("torchrl_example.py", TINY + TORCHRL_TINY)]
PHYSICS = os.path.join(ROOT, "examples", "cartpole_physics.py") + ":CartPolePhysics"


@pytest.mark.parametrize("script, flags", EXAMPLES)
def test_examples_sync_vector_env(tmp_path, monkeypatch, capsys, script, flags):
    """--vector-env sync: single imagined envs whose thunks load the saved model, rebuilt after the refit."""
    run_main(monkeypatch, tmp_path, script, *flags, "--num-envs", "2", "--vector-env", "sync")
    stdout = capsys.readouterr().out
    run_dir, summary = read_run(tmp_path)
    assert "iter 2/2" in stdout and summary["real_env_steps"] == 300 and summary["refits"] == 1
    assert summary["imagined_steps"] >= 512 and summary["status"] == "finished"
    assert len(ensemble.load_world_model(run_dir / "world_model.pt").buffer) == 300


@pytest.mark.parametrize("script, flags", EXAMPLES)
def test_examples_given_simulator_uses_no_real_data(tmp_path, monkeypatch, capsys, script, flags):
    """A model that does not learn (the true CartPole equations): imagined training only, judged in the real env,
    no real transition spent, no world_model.pt; --eval-checkpoint rebuilds the simulator and replays."""
    run_main(monkeypatch, tmp_path, script, *flags, "--world-model", PHYSICS)
    stdout = capsys.readouterr().out
    run_dir, summary = read_run(tmp_path)
    assert "iter 2/2" in stdout and summary["real_env_steps"] == 0 and summary["world_model"] == PHYSICS
    assert summary["world_model_path"] is None and not (run_dir / "world_model.pt").exists()
    assert len(summary["eval_history"]) == 1 and summary["imagined_minus_real"] is not None
    with pytest.raises(SystemExit) as exc:
        run_main(monkeypatch, tmp_path, script, "--eval-checkpoint", str(run_dir / "agent.pt"))
    assert exc.value.code == 0
    expected = f"real return {summary['real_return_mean']:.1f} +/- {summary['real_return_std']:.1f}"
    assert expected in capsys.readouterr().out


# ---------------------------------------------------------------- bad input: one clear line, no run dir


@pytest.mark.parametrize("script", ["sb3_example.py", "torchrl_example.py"])
@pytest.mark.parametrize("flags, message", [
    (["--env-id", DICT_OBS_ID], "--env-id: expected an env that --world-model ensemble supports"),
    (["--env-id", MULTI_DISCRETE_ID], "--env-id: expected an env with Discrete actions or Box actions"),
    (["--world-model-path", "missing/world_model.pt"], "--world-model-path: expected a world-model checkpoint"),
    (["--world-model", "none"], "--world-model: expected ensemble or your own model"),
    (["--world-model", "no_such_module:Model"], "--world-model: expected ensemble, mbpo-ensemble, dhmbpo-ensemble, rssm, none"),
    (["--env-id", "Pendulum-v1", "--algo", "dqn"], "--algo: expected ppo or sac for Pendulum-v1's Box actions"),
    (["--real-iterations", "-1"], "--real-iterations: expected an integer >= 0"),
])
def test_bad_input_one_line_and_no_run_dir(tmp_path, monkeypatch, script, flags, message):
    if "--algo" in flags and script == "torchrl_example.py":
        pytest.skip("torchrl_example.py has no --algo")
    with pytest.raises(SystemExit) as exc:
        run_main(monkeypatch, tmp_path, script, *flags)
    text = str(exc.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- examples/known_termination.py
KNOWN_TERMINATION = os.path.join(ROOT, "examples", "known_termination.py")


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Walker2d-v5", "InvertedPendulum-v5", "HalfCheetah-v5"])
def test_known_termination_rules_match_the_real_envs(env_id):
    import world_model

    rule = world_model.resolve(f"{KNOWN_TERMINATION}:termination_rule")(env_id)
    data = real_env.collect_transitions(env_id, 1000, seed=0)  # random actions: Hopper falls in ~20 steps
    predicted = rule(torch.as_tensor(data.next_obs, dtype=torch.float32)).numpy()
    terminated = np.asarray(data.terminated, bool)
    assert env_id == "HalfCheetah-v5" or terminated.sum() >= 10
    np.testing.assert_array_equal(predicted, terminated)


def test_known_termination_replaces_the_learned_head(tiny_wm):
    def rule(obs):  # CartPole's cart to the right of the centre
        return obs[:, 0] > 0.0

    envs = ensemble_imagination.make_imagined_vector_env(tiny_wm, 16, seed=0, termination_fn=rule, output="torch")
    envs.reset(seed=0)
    fresh = torch.zeros(16, dtype=torch.bool)  # NEXT_STEP: the step after a done row is its reset step
    seen = 0
    for _ in range(30):
        obs, _, terminated, truncated, _ = envs.step(torch.ones(16, dtype=torch.long))
        assert torch.equal(terminated[~fresh], rule(obs)[~fresh])
        seen += int(terminated.sum())
        fresh = terminated | truncated
    assert seen > 0


def test_known_termination_model_by_its_spec():
    import world_model

    model = world_model.make(f"{KNOWN_TERMINATION}:mbpo_ensemble", "InvertedPendulum-v5")
    assert model.termination_fn is not None and model.sizes["ensemble_size"] == 7
    with pytest.raises(ValueError, match="no termination rule for env_id='Pendulum-v1'"):
        world_model.make(f"{KNOWN_TERMINATION}:ensemble_model", "Pendulum-v1")
    with pytest.raises(ValueError, match="termination_fn must be callable"):
        ensemble_imagination.Imagination(termination_fn=0.5)


def test_known_termination_full_dhmbpo_model_keeps_its_fit_options():
    import world_model

    model = world_model.make(f"{KNOWN_TERMINATION}:dhmbpo_full", "Hopper-v5")
    assert model.termination_fn is not None and model.renormalise and model.bootstrap
    assert model.fit_options == dict(max_epochs=300, patience=30, batch_size=256)
    assert model.sizes == dict(ensemble_size=8, hidden_size=256, num_layers=3, num_elites=8, homoscedastic=True,
                               layer_norm=True, dropout=0.01)
    with pytest.raises(ValueError, match="max_epochs must be an int >= 1, got 0"):
        ensemble.dhmbpo_network("Hopper-v5", max_epochs=0)

def test_hopper_gait_reports_each_episode(tmp_path):
    import rl_utils as ru
    import sac_imagined

    gait = runpy.run_path(os.path.join(ROOT, "examples", "hopper_gait.py"))["gait"]
    env = gym.make("Hopper-v5")
    torch.manual_seed(0)
    actor = sac_imagined.Actor(env.observation_space.shape[0], env.action_space, 16)
    path = str(tmp_path / "agent.pt")
    ru.save_agent(path, {"actor": actor.state_dict()}, sac_imagined.Args(env_id="Hopper-v5", hidden_size=16))
    (row,) = gait(path, episodes=1)
    assert row["ended"] in ("terminated", "truncated") and 1 <= row["length"] <= 1000
    assert 0.0 <= row["airborne"] <= 1.0 and 0 <= row["take_offs"] <= row["length"]
    assert row["x_velocity"] == pytest.approx(row["x_displacement"] / (row["length"] * env.unwrapped.dt), rel=0.05)
    with pytest.raises(SystemExit, match="--foresight needs a run with a world model .* records none"):
        gait(path, episodes=1, foresight=True)
    # --foresight: the run's world model, rolled from the real states before the fall
    buf = real_env.collect_transitions("Hopper-v5", 300, seed=0)
    model, _ = ensemble.fit_world_model(buf, seed=0, ensemble_size=2, hidden_size=16, num_layers=2, max_epochs=1)
    model_path = str(tmp_path / "world_model.pt")
    ensemble.save_world_model(model, model_path, buffer=buf)
    ru.save_agent(path, {"actor": actor.state_dict()},
                  sac_imagined.Args(env_id="Hopper-v5", hidden_size=16, world_model="ensemble"), model_path)
    (seen,) = gait(path, episodes=1, foresight=True)
    assert seen["ended"] == "terminated" and {k: v for k, v in seen.items() if k != "foresight"} == row
    steps = [k for k in (30, 20, 10, 5) if k <= seen["length"]]  # from the reset state on
    assert list(seen["foresight"]) == steps and all(0.0 <= v <= 1.0 for v in seen["foresight"].values())
    with pytest.raises(SystemExit, match="--critics needs an agent.pt with its critics"):
        gait(path, episodes=1, critics=True)
    # --critics: svg_imagined.py's critic ensemble, rebuilt from the run's args
    import svg_imagined

    svg_args = svg_imagined.Args(env_id="Hopper-v5", hidden_size=16, num_critics=3, hidden_layers=3,
                                 critic_layer_norm=True)
    qf = sac_imagined.SoftQNetworks.from_run_args(vars(svg_args), 11, 3)
    assert qf.weights[0].shape == (3, 14, 16) and len(qf.weights) == 4 and qf.layer_norm
    actor = sac_imagined.Actor.from_run_args(vars(svg_args), 11, env.action_space)
    ru.save_agent(path, {"actor": actor.state_dict(), "qf": qf.state_dict()}, svg_args, model_path)
    (valued,) = gait(path, episodes=1, critics=True)
    steps = [k for k in (200, 100, 60, 30, 10, 1) if k <= valued["length"]]
    assert list(valued["critics"]) == ["start", *steps]
    with torch.no_grad():  # the critics' mean at the start state and the actor's deterministic action there
        obs, _ = env.reset(seed=10_000)
        start_q = qf(torch.as_tensor(obs[None], dtype=torch.float32),
                     torch.as_tensor(sac_imagined.policy_fn(actor, "cpu", True)(obs[None]))).mean()
    assert valued["critics"]["start"] == pytest.approx(float(start_q), abs=1e-5)
    # a --scaled-critics run's agent.pt keeps the tracked bounds: the same outputs read in return units
    scaled_args = svg_imagined.Args(**{**vars(svg_args), "scaled_critics": True})
    ru.save_agent(path, {"actor": actor.state_dict(), "qf": qf.state_dict()}, scaled_args, model_path,
                  extra={"critic_bounds": [10.0, 30.0]})
    (scaled,) = gait(path, episodes=1, critics=True)
    assert scaled["critics"]["start"] == pytest.approx(20.0 + 10.0 * float(start_q), abs=1e-4)
    # bounds without --scaled-critics (--bounded-critics alone): the outputs are Q already
    ru.save_agent(path, {"actor": actor.state_dict(), "qf": qf.state_dict()}, svg_args, model_path,
                  extra={"critic_bounds": [10.0, 30.0]})
    assert gait(path, episodes=1, critics=True)[0]["critics"]["start"] == pytest.approx(float(start_q), abs=1e-5)
    os.remove(model_path)
    with pytest.raises(SystemExit, match="--foresight needs the run's world model"):
        gait(path, episodes=1, foresight=True)
    ru.save_agent(path, {"actor": actor.state_dict()}, sac_imagined.Args(env_id="Walker2d-v5", hidden_size=16))
    with pytest.raises(SystemExit, match="expected Hopper-v5"):
        gait(path)
    with pytest.raises(SystemExit, match="does not exist"):
        gait(str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match="--episodes expected an integer >= 1, got 0"):
        gait(path, episodes=0)


def test_fit_check_scores_fresh_fits_on_the_newest_episodes(tmp_path):
    fit_check = runpy.run_path(os.path.join(ROOT, "examples", "fit_check.py"))["fit_check"]
    torch.set_num_threads(1)
    buf = real_env.collect_transitions("Pendulum-v1", 1000, seed=0)  # 5 episodes of 200
    model, _ = ensemble.fit_world_model(buf, seed=0, ensemble_size=2, hidden_size=16, num_layers=2, max_epochs=1)
    path = str(tmp_path / "world_model.pt")
    ensemble.save_world_model(model, path, buffer=buf)
    rows = fit_check(path, max_epochs=(1, 3), patience=(1, 3), test_transitions=300)
    assert [r["train"] for r in rows] == [600, 600] and [r["test"] for r in rows] == [400, 400]  # 2 whole episodes
    assert rows[0]["epochs"] <= 1 and 1 <= rows[1]["epochs"] <= 3
    assert all(0.0 < r["delta_nmse"] < 10.0 and 0.0 < r["reward_nmse"] < 10.0 for r in rows)
    with pytest.raises(SystemExit, match="one value each per fit"):
        fit_check(path, max_epochs=(1, 3), patience=(1,))
    with pytest.raises(SystemExit, match="fewer than the buffer's 1000 transitions"):
        fit_check(path, test_transitions=900)
    ensemble.save_world_model(model, path)
    with pytest.raises(SystemExit, match="saved without its data"):
        fit_check(path)
    with pytest.raises(SystemExit, match=r"--test-transitions expected integers >= 1, got \[0\]"):
        fit_check(path, test_transitions=0)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(SystemExit, match="fit_check.py: .* is not a readable world-model checkpoint"):
        fit_check(path)
