"""`.ci/run`'s last step: the suite's time is printed whatever pytest's exit, and the run exits with
it (5, no tests collected, included)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def last_step() -> str:
    """The script's `tests` step, as written."""
    text = (ROOT / ".ci" / "run").read_text()
    return text[text.index('step "tests"') :]


@pytest.mark.parametrize("pytest_exit", [0, 1, 5])
def test_the_suite_time_is_printed_and_pytest_exit_is_the_run_exit(tmp_path: Path, pytest_exit: int) -> None:
    fake = tmp_path / "python"  # stands in for the virtualenv's python running pytest
    fake.write_text(f"#!/bin/sh\necho 'pytest ran'\nexit {pytest_exit}\n")
    fake.chmod(0o755)
    script = f'set -euo pipefail\nstep() {{ echo "== $*"; }}\nexport PATH="{tmp_path}:$PATH"\n{last_step()}'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert "pytest ran" in done.stdout
    assert f"(pytest exit {pytest_exit})" in done.stdout and "== suite took" in done.stdout, done.stdout
    assert done.returncode == pytest_exit
