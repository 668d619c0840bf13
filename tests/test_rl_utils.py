"""dyna.Evaluator's stop rule (consecutive evaluations whose MEAN real return reached the target), the one scale
rule of the large-gap warning, and what rl_utils.Run keeps of a run that stops early."""
import numpy as np

import dyna
import real_env
import rl_utils


class _Writer:
    def add_scalar(self, *args, **kwargs):
        pass


def test_solved_counts_consecutive_evaluations_whose_mean_reached_the_target(monkeypatch):
    planned = iter([
        [480.0, 480.0],  # mean 480 >= 475: one at target
        [500.0, 300.0],  # mean 400: the streak is broken
        [500.0, 460.0],  # mean 480 although one episode is below 475: counts (the threshold is on the mean)
        [475.0, 475.0],  # exactly the target counts
        [10.0, 10.0],    # the final evaluation: never part of the streak
    ])

    def fake_eval(act_fn, env_id, episodes, seed, model=None):
        returns = np.array(next(planned))
        return returns, np.ones_like(returns, dtype=np.int64)

    monkeypatch.setattr(real_env, "evaluate_in_real_env", fake_eval)
    evaluator = dyna.Evaluator("CartPole-v1", seed=1, episodes=2, writer=_Writer(), target=475.0)
    solved = []
    for _ in range(4):
        evaluator(lambda obs: obs, global_step=0, real_env_steps=0)
        solved.append((evaluator.solved(1), evaluator.solved(2)))
    assert solved == [(True, False), (False, False), (True, False), (True, True)]
    evaluator(lambda obs: obs, global_step=0, real_env_steps=0, final=True)
    assert evaluator.solved(2) and evaluator.evals_at_target == 2
    assert evaluator.reached_at == 0 and len(evaluator.history) == 4


def test_without_a_target_nothing_is_solved(monkeypatch):
    monkeypatch.setattr(real_env, "evaluate_in_real_env", lambda *a, **k: (np.array([1e9]), np.array([1])))
    evaluator = dyna.Evaluator("Pendulum-v1", seed=1, episodes=1, writer=_Writer(), target=None)
    evaluator(lambda obs: obs, global_step=0, real_env_steps=0)
    assert not evaluator.solved(1)


def test_finish_run_warns_about_a_large_gap_with_the_scripts_remedy(tmp_path, capsys):
    summary = {"real_return_mean": 100.0, "real_return_std": 0.0, "eval_episodes": 1, "real_env_steps": 10,
               "wall_seconds": 1.0, "imagined_minus_real": 400.0, "real_return_scale": 500.0}
    rl_utils.finish_run("x", str(tmp_path), summary, gap_remedy="Use --some-flag.")
    out = capsys.readouterr().out
    assert "WARNING: the policy scores +400.0 more in imagination" in out and "Use --some-flag." in out
    assert (tmp_path / "summary.json").exists()
    rl_utils.finish_run("x", str(tmp_path), {**summary, "imagined_minus_real": 10.0})
    assert "WARNING" not in capsys.readouterr().out


class _Args:
    exp_name, env_id, seed, eval_episodes, world_model = "test", "CartPole-v1", 3, 2, "ensemble"


def test_a_run_that_fails_keeps_its_dir_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = rl_utils.Run(_Args(), "test")
    run.evaluator = dyna.Evaluator("CartPole-v1", seed=3, episodes=2, writer=_Writer(), target=-200.0)
    run.evaluator.history.append({"real_return_mean": -300.0, "real_return_std": 1.0, "real_env_steps": 5})
    run.figures["real_env_steps"] = 5
    run.checkpoint = lambda: {"agent_path": "saved"}
    try:
        with run:
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    import json

    with open(tmp_path / run.dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"
    assert summary["real_return_mean"] == -300.0 and summary["from_last_eval"] and summary["agent_path"] == "saved"
    assert summary["real_env_steps"] == 5 and summary["real_return_scale"] == 200.0  # |target|, the one scale rule
    assert "failed (RuntimeError: boom): what the run wrote is kept in runs/" in capsys.readouterr().out


def test_the_scale_without_a_target_is_the_largest_mean_return_seen(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = rl_utils.Run(_Args(), "test")
    run.evaluator = dyna.Evaluator("Pendulum-v1", seed=1, episodes=2, writer=_Writer(), target=None)
    run.evaluator.history += [{"real_return_mean": -900.0}, {"real_return_mean": -150.0}]
    summary = run.summary("finished", final={"real_return_mean": -120.0, "returns": [-120.0]})
    assert summary["real_return_scale"] == 900.0 and summary["real_return_mean"] == -120.0
    assert not summary["from_last_eval"]
    run.writer.close()
