"""`make lint`: ruff (pyproject.toml [tool.ruff]) passes on the code."""

import shutil
import subprocess

import pytest
from conftest import REPO


def test_ruff_passes():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip('ruff not installed (pip install -e ".[test]")')
    done = subprocess.run([ruff, "check", "src", "tests", "bench", "run.py", "sweep.py"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
