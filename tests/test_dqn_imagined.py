"""Tests for dqn_imagined.py: TD targets and replay insertion on crafted trajectories (both autoreset modes),
the seed-style make_env pattern, and tiny end-to-end runs in every vector mode (whole file well under a minute)."""

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import dqn_imagined as dqn  # noqa: E402
import seed_toy  # noqa: E402
from world_model_env import WorldModelVectorEnv  # noqa: E402

NEXT, SAME = AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP
GAMMA = 0.9


# ----------------------------------------------------------------------------------------------- TD target


def test_td_target_bootstraps_truncation_not_termination():
    rewards = torch.tensor([1.0, 1.0, 0.5])
    next_q_target = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    terminated = torch.tensor([0.0, 1.0, 0.0])  # row 0: truncated (stored as not terminated), row 1: terminal
    target = dqn.td_target(rewards, next_q_target, terminated, GAMMA)
    torch.testing.assert_close(target, torch.tensor([1.0 + GAMMA * 2.0, 1.0, 0.5 + GAMMA * 6.0]))


def test_td_target_double_dqn_uses_online_argmax_and_target_value():
    rewards = torch.tensor([0.0, 0.0])
    next_q_target = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    next_q_online = torch.tensor([[9.0, 0.0], [0.0, 9.0]])  # picks action 0 for row 0, action 1 for row 1
    target = dqn.td_target(rewards, next_q_target, torch.zeros(2), GAMMA, next_q_online)
    torch.testing.assert_close(target, torch.tensor([GAMMA * 1.0, GAMMA * 4.0]))


# ------------------------------------------------------------------------------ crafted two-env trajectory
# Env 0: obs 0 -> 1 -> 2, truncated at its 2nd step (final obs 2), then reset to 10 -> 11.
# Env 1: obs 0 -> 5 terminated at its 1st step, then reset to 20 -> 21 -> 22.
# One list entry per vector step: (actions, next_obs as the env returns it, rewards, terminated, truncated,
# final obs of SAME_STEP done rows).


def _crafted(mode):
    obs0 = np.array([[0.0], [0.0]], dtype=np.float32)
    if mode == NEXT:
        steps = [
            ([0, 1], [[1.0], [5.0]], [1.0, 1.0], [False, True], [False, False], None),
            ([1, 0], [[2.0], [20.0]], [1.0, 0.0], [False, False], [True, False], None),  # env 1: reset step
            ([0, 1], [[10.0], [21.0]], [0.0, 1.0], [False, False], [False, False], None),  # env 0: reset step
            ([1, 1], [[11.0], [22.0]], [1.0, 1.0], [False, False], [False, False], None),
        ]
    else:
        steps = [
            ([0, 1], [[1.0], [20.0]], [1.0, 1.0], [False, True], [False, False], {1: [5.0]}),
            ([1, 0], [[10.0], [21.0]], [1.0, 1.0], [False, False], [True, False], {0: [2.0]}),
            ([0, 1], [[11.0], [22.0]], [1.0, 1.0], [False, False], [False, False], None),
        ]
    return obs0, steps


def _store(mode):
    obs, steps = _crafted(mode)
    prev_dones = np.zeros(2, dtype=bool)
    stored = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "terminated")}
    for actions, next_obs, rewards, terms, truncs, finals in steps:
        infos = {}
        if finals:
            final_obs = np.full(2, None, dtype=object)
            for i, f in finals.items():
                final_obs[i] = np.array(f, dtype=np.float32)
            infos = {"final_obs": final_obs, "_final_obs": np.array([i in finals for i in range(2)])}
        next_obs = np.array(next_obs, dtype=np.float32)
        rows, prev_dones = dqn.transitions_from_step(
            obs, np.array(actions), np.array(rewards), next_obs, np.array(terms), np.array(truncs), infos, prev_dones,
            mode
        )
        for k in stored:
            stored[k].extend(list(rows[k]))
        obs = next_obs
    return {k: np.array(v) for k, v in stored.items()}


@pytest.mark.parametrize("mode", [NEXT, SAME])
def test_replay_insertion_keeps_true_final_obs_and_drops_reset_transitions(mode):
    s = _store(mode)
    pairs = sorted(zip(s["obs"][:, 0].tolist(), s["next_obs"][:, 0].tolist(), s["terminated"].tolist()))
    # exactly the MDP transitions: no (final obs -> reset obs) row, no (obs -> reset obs) row
    assert pairs == [(0.0, 1.0, False), (0.0, 5.0, True), (1.0, 2.0, False), (10.0, 11.0, False),
                     (20.0, 21.0, False), (21.0, 22.0, False)]
    assert (s["rewards"] == 1.0).all()  # reset steps (reward 0 in NEXT_STEP) never stored


@pytest.mark.parametrize("mode", [NEXT, SAME])
def test_td_targets_on_crafted_trajectory(mode):
    s = _store(mode)
    # Q(s', a) = s' + a: truncated row (1 -> 2) bootstraps with max_a Q(2, a) = 3; terminal row (0 -> 5) does not
    next_obs = torch.as_tensor(s["next_obs"][:, 0])
    next_q = torch.stack([next_obs, next_obs + 1.0], dim=1)
    target = dqn.td_target(s["rewards"], next_q, s["terminated"], GAMMA)
    by_pair = {(o, n): t for o, n, t in zip(s["obs"][:, 0].tolist(), s["next_obs"][:, 0].tolist(), target.tolist())}
    assert by_pair[(1.0, 2.0)] == pytest.approx(1.0 + GAMMA * 3.0)  # time-limit truncation: bootstrapped
    assert by_pair[(0.0, 5.0)] == pytest.approx(1.0)  # termination: no bootstrap
    assert by_pair[(20.0, 21.0)] == pytest.approx(1.0 + GAMMA * 22.0)


def test_same_step_done_without_final_obs_is_a_clear_error():
    with pytest.raises(ValueError, match="final_obs"):
        dqn.transitions_from_step(np.zeros((1, 1)), np.zeros(1, int), np.zeros(1), np.zeros((1, 1)), np.array([True]),
                                  np.array([False]), {}, np.zeros(1, bool), SAME)


def test_halted_transitions_are_stored_as_pessimistic_terminals():
    # row 0: ordinary step; row 1: left the model's support (HALT) -> terminal, reward r + gamma * V_min
    rows, _ = dqn.transitions_from_step(np.zeros((2, 1)), np.array([0, 1]), np.array([1.0, 1.0]), np.ones((2, 1)),
                                        np.array([False, False]), np.array([False, False]), {}, np.zeros(2, bool),
                                        NEXT, halted=np.array([False, True]), halt_target=-5.0)
    np.testing.assert_array_equal(rows["terminated"], [False, True])
    np.testing.assert_allclose(rows["rewards"], [1.0, -4.0])
    target = dqn.td_target(rows["rewards"], torch.full((2, 2), 10.0), rows["terminated"], GAMMA)
    torch.testing.assert_close(target, torch.tensor([1.0 + GAMMA * 10.0, -4.0]))


def test_step_info_reads_final_info_of_same_step_sync_rows():
    # SyncVectorEnv SAME_STEP: row 1 finished, its step info is under final_info, the top level has its reset info
    infos = {"disagreement": np.array([0.1, 0.0]), "_disagreement": np.array([True, False]),
             "final_info": {"disagreement": np.array([0.0, 0.7]), "_disagreement": np.array([False, True])}}
    np.testing.assert_allclose(dqn.step_info(infos, "disagreement", np.array([False, True])), [0.1, 0.7])
    assert np.isnan(dqn.step_info({}, "disagreement", np.zeros(2, bool))).all()


# -------------------------------------------------------- real vector envs: every stored row obeys the dynamics
# A deterministic batched model: next = obs + STEP[action]; action 2 terminates. With a short time limit both
# termination and truncation happen often, so a stored reset transition would break the dynamics check.
STEP = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)


def _toy_reset(model, seed=None, options=None):
    obs = np.stack([np.random.default_rng(int(s)).uniform(100, 200, size=2) for s in seed]).astype(np.float32)
    return {"state": obs, "observation": obs.copy()}


def _toy_transition(model, state, action):
    nxt = (state + STEP[action]).astype(np.float32)
    return {"state": nxt, "observation": nxt.copy(), "reward": np.ones(len(nxt)), "terminated": action == 2}


def _collect(envs, mode, steps, rng, n_actions):
    obs, _ = envs.reset(seed=3)
    prev = np.zeros(envs.num_envs, dtype=bool)
    rows_all, n_done = [], 0
    for _ in range(steps):
        actions = rng.integers(0, n_actions, size=envs.num_envs)
        next_obs, r, term, trunc, infos = envs.step(actions)
        n_done += int((term | trunc).sum())
        rows, prev = dqn.transitions_from_step(obs, actions, r, next_obs, term, trunc, infos, prev, mode)
        rows_all.append(rows)
        obs = next_obs
    cat = {k: np.concatenate([r[k] for r in rows_all]) for k in rows_all[0]}
    return cat, n_done


@pytest.mark.parametrize("mode", [NEXT, SAME])
def test_replay_rows_obey_dynamics_in_batched_world_model_env(mode):
    space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    envs = WorldModelVectorEnv(None, space, gym.spaces.Discrete(3), _toy_reset, _toy_transition, num_envs=4,
                               max_episode_steps=3, autoreset_mode=mode)
    rows, n_done = _collect(envs, mode, 60, np.random.default_rng(0), 3)
    assert n_done > 20
    np.testing.assert_allclose(rows["next_obs"], rows["obs"] + STEP[rows["actions"]])
    np.testing.assert_array_equal(rows["terminated"], rows["actions"] == 2)
    # NEXT_STEP spends one (dropped) step on each reset, except for episodes that end in the last step
    if mode == SAME:
        assert len(rows["actions"]) == 60 * 4
    else:
        assert 60 * 4 - n_done <= len(rows["actions"]) <= 60 * 4 - n_done + 4


@pytest.mark.parametrize("mode", [NEXT, SAME])
def test_replay_rows_obey_dynamics_with_seed_tutorial_make_env(mode):
    # the seed tutorial's CleanRL pattern verbatim: SyncVectorEnv of make_env thunks around WorldModelEnv
    envs = gym.vector.SyncVectorEnv([seed_toy.make_env(seed=i, max_episode_steps=3) for i in range(3)],
                                    autoreset_mode=mode)
    rows, n_done = _collect(envs, mode, 30, np.random.default_rng(1), 3)
    assert n_done >= 20
    np.testing.assert_allclose(rows["next_obs"], rows["obs"] + seed_toy._ACTIONS[rows["actions"]], atol=1e-6)


# ------------------------------------------------------------------------------------ seed-style make_env thunk


@pytest.fixture(scope="module")
def tiny_world_model(tmp_path_factory):
    from train_world_model import collect_transitions, fit_world_model, save_world_model

    torch.set_num_threads(1)
    data = collect_transitions("CartPole-v1", 300, seed=0)
    model, _ = fit_world_model(data, seed=0, max_epochs=2, ensemble_size=2, hidden_size=32, num_layers=2)
    # like train_world_model.py's checkpoints: it carries its 300 real transitions (Dyna refits extend them)
    return save_world_model(model, str(tmp_path_factory.mktemp("wm") / "world_model.pt"), buffer=data)


def test_make_env_thunks_load_independent_models(tiny_world_model):
    envs = gym.vector.SyncVectorEnv([dqn.make_env("CartPole-v1", i, tiny_world_model, max_episode_steps=5,
                                                  start_from="buffer") for i in range(2)])
    models = [env.unwrapped.model for env in envs.envs]
    assert models[0] is not models[1]  # each worker loaded its own copy inside the thunk
    assert all(m.start_from == "buffer" for m in models)
    assert dqn.disagreement_reference(models[0]) > 0.0
    envs.reset(seed=0)
    steps = [envs.step(np.zeros(2, dtype=np.int64)) for _ in range(5)]
    for i in range(2):  # each row ends by termination or, at the 5-step trusted horizon, by truncation
        ended = [bool(term[i] or trunc[i]) for _, _, term, trunc, _ in steps]
        first = ended.index(True)
        assert steps[first][2][i] or (first == 4 and steps[first][3][i])
    real = dqn.make_env("CartPole-v1", 0)()  # no model path: the real env (model-free baseline)
    assert real.spec.id == "CartPole-v1"


# ------------------------------------------------------------------------------------------ end-to-end runs
TINY = ["--num-envs", "2", "--imagined-steps-per-iteration", "64", "--learning-starts", "32", "--batch-size", "16",
        "--hidden-size", "16", "--eval-episodes", "2", "--world-model-epochs", "2", "--real-steps-per-iteration", "60",
        "--train-frequency", "2", "--exploration-fraction", "0.5"]


def _run(tmp_path, *flags, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dqn_imagined.py"), *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _summary(tmp_path):
    (path,) = list((tmp_path / "runs").glob("*/summary.json"))
    return json.loads(path.read_text())


def test_end_to_end_batched_trains_its_own_world_model_then_reloads(tmp_path):
    proc = _run(tmp_path, *TINY, "--initial-real-steps", "150", "--real-iterations", "1",
                "--autoreset-mode", "same_step")
    s = _summary(tmp_path)
    for key in ("real_return_mean", "real_return_std", "real_env_steps", "imagined_steps", "wall_seconds",
                "eval_env_steps"):
        assert key in s
    assert s["real_env_steps"] == 150 + 60  # world-model data + one Dyna round; evaluation excluded
    assert s["imagined_steps"] == 2 * 64 and s["dyna_rounds"] == 1 and s["eval_env_steps"] > 0
    assert os.path.isfile(s["world_model_path"]) and os.path.isfile(s["agent_path"])
    assert "[dqn] iter 2/2 step 128 imag_return" in proc.stdout and "SPS" in proc.stdout
    out = _run(tmp_path, "--eval-checkpoint", s["agent_path"], "--eval-episodes", "2").stdout
    result = json.loads(out[out.index("{"):])
    assert result["world_model_path"] == s["world_model_path"] and result["eval_episodes"] == 2


@pytest.mark.parametrize("vector_mode,autoreset,refits", [("sync", "next_step", "1"), ("async", "same_step", "0")])
def test_end_to_end_worker_vector_modes(tmp_path, tiny_world_model, vector_mode, autoreset, refits):
    _run(tmp_path, *TINY, "--world-model-path", tiny_world_model, "--vector-mode", vector_mode,
         "--autoreset-mode", autoreset, "--real-iterations", refits)
    s = _summary(tmp_path)
    phases = int(refits) + 1
    assert s["vector_mode"] == vector_mode
    if autoreset == "same_step":
        assert s["imagined_steps"] == 64 * phases
    else:  # NEXT_STEP reset steps are not transitions and are not counted
        assert 0.5 * 64 * phases < s["imagined_steps"] < 64 * phases
    assert s["real_env_steps"] == 300 + 60 * int(refits)  # the checkpoint's real data counts, evaluation does not
    if refits == "0":
        assert s["world_model_path"] == tiny_world_model  # used as is, not copied
    assert os.path.isfile(s["agent_path"])


def test_end_to_end_model_free_baseline(tmp_path):
    _run(tmp_path, *TINY, "--world-model", "none", "--real-iterations", "2", "--autoreset-mode", "same_step")
    s = _summary(tmp_path)
    assert s["world_model"] == "none" and s["world_model_path"] is None
    assert s["real_env_steps"] == 2 * 60 and s["imagined_steps"] == 0


def test_bad_env_gives_a_clear_error_not_a_traceback(tmp_path):
    proc = _run(tmp_path, "--env-id", "Pendulum-v1", check=False)
    assert proc.returncode != 0 and "gym.spaces.Discrete" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("fields,needle", [
    ({"world_model_path": "missing.pt"}, "--world-model-path"),
    ({"num_envs": 0}, "--num-envs"),
    ({"world_model": "none", "world_model_path": __file__}, "--world-model-path"),
    ({"collect_epsilon": 1.5}, "--collect-epsilon"),
])
def test_bad_args_name_the_field(fields, needle):
    with pytest.raises(SystemExit, match=needle):
        dqn.check_args(dqn.Args(**fields))
