"""train_world_model.py with --world-model: a model of your own is fitted and saved (no accuracy report: that needs
the ensemble's `predict` or a model's `open_loop`), models with nothing to fit are refused, and an interrupted fit
keeps its run dir.
(The ensemble's tiny run and the bad-flag checks are in test_world_model.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_world_model.py")

# A world model that learns the mean reward and imagines nothing (a stand-in for your own model); STOP_IN_FIT makes
# its fit send the process a SIGTERM, as a scheduler stopping the job would.
MEAN_MODEL = '''
import os, signal
import gymnasium as gym
import run_io, world_model


class MeanReward(world_model.WorldModel):
    def __init__(self, env_id, seed=0, device="cpu"):
        env = gym.make(env_id)
        self.observation_space, self.action_space = env.observation_space, env.action_space
        env.close()
        self.mean_reward = None

    def fit(self, data, num_new=None, *, seed=0, refit_passes=20, writer=None, global_step=0):
        if os.environ.get("STOP_IN_FIT"):
            os.kill(os.getpid(), signal.SIGTERM)
        self.mean_reward = float(data.rewards.mean())
        return {"seconds": 0.0}

    def imagined_env(self, **kwargs):
        raise NotImplementedError

    def save(self, path, extra=None):
        return run_io.save_torch_atomic(path, {"mean_reward": self.mean_reward, "extra": extra})
'''


def run_script(cwd, *flags, **env):
    return subprocess.run([sys.executable, SCRIPT, *flags], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})


@pytest.fixture
def mean_model(tmp_path):
    (tmp_path / "mean_model.py").write_text(MEAN_MODEL)
    return "mean_model.py:MeanReward"


def test_own_model_is_fitted_and_saved_without_accuracy_report(tmp_path, mean_model):
    out = run_script(tmp_path, "--world-model", mean_model, "--total-timesteps", "200")
    assert out.returncode == 0, out.stderr
    assert "offers neither `predict` nor `open_loop` to draw: fitted and saved only" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_model"] == mean_model
    assert summary["real_env_steps"] == 200 and "one_step_mse" not in summary and "open_loop_figure" not in summary
    payload = torch.load(tmp_path / summary["checkpoint"], weights_only=True)
    assert payload["mean_reward"] == 1.0  # CartPole pays 1 per step
    assert payload["extra"]["real_env_steps"] == 200 and payload["extra"]["summary"]["status"] == "finished"


def test_interrupted_fit_keeps_the_run_dir_with_its_status(tmp_path, mean_model):
    out = run_script(tmp_path, "--world-model", mean_model, "--total-timesteps", "200", STOP_IN_FIT="1")
    assert out.returncode == 130 and "Traceback" not in out.stderr, out.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"kept in runs/{run_dir.name}" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["real_env_steps"] == 200
    assert summary["checkpoint"] is None and not (run_dir / "world_model.pt").exists()  # nothing fitted to keep


@pytest.mark.parametrize("spec, words", [
    ("none", "`none` is the model-free baseline"),
    (os.path.join(ROOT, "examples", "cartpole_physics.py") + ":CartPolePhysics", "nothing to fit"),
    ("no_such_file.py:Model", "does not exist"),
])
def test_models_with_nothing_to_fit_are_refused(tmp_path, spec, words):
    out = run_script(tmp_path, "--world-model", spec)
    assert out.returncode != 0 and words in out.stderr and "--world-model" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "runs").exists()
