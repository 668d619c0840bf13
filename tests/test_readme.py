"""The README's Python snippets run as pasted (each in a fresh interpreter, in an empty folder), and the package
metadata covers every module, so `pip install -e .` makes all of them importable from anywhere."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as f:
    README = f.read()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_pasted(tmp_path, index):
    code = SNIPPETS[index]
    (tmp_path / "snippet.py").write_text(code)  # a file, as a user pastes it (spawn workers import it again)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, f"README snippet {index} failed:\n{code}\n{out.stderr[-3000:]}"


def test_pyproject_lists_every_module():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    listed = set(re.findall(r'"(\w+)"', text.split("py-modules = [")[1].split("]")[0]))
    modules = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
    assert listed == modules
    for name in modules:  # each is a module that imports without running anything (scripts keep a __main__ guard)
        ast.parse(open(os.path.join(ROOT, name + ".py")).read())
