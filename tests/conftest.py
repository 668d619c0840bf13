import os
import sys

# Tests import the top-level scripts (world_model_env, train_world_model, ...) and tests/seed_toy.py.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

# One torch thread per test process: `pytest -n 2` (pytest.ini) runs two processes on CI's two cores, and the
# scripts the tests start use one thread by default (--num-threads 1) too.
import torch  # noqa: E402

torch.set_num_threads(1)
