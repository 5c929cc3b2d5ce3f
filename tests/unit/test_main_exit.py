"""``python -m streams`` leaves without the interpreter's teardown (``streams.cli.run``): what a
command printed and its exit code still come out (a Parquet command: ``test_archive_erasure``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.commands import streams_cli


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return streams_cli(*args, env=env)


def test_a_commands_output_and_exit_code_come_out(tmp_path: Path) -> None:
    done = run("settings", SHOPSTREAM_DATA_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "SHOPSTREAM_DATA_DIR" in done.stdout or str(tmp_path) in done.stdout
    refused = run("settings", SHOPSTREAM_PARTITIONS="0")
    assert refused.returncode == 2
    assert "SHOPSTREAM_PARTITIONS" in refused.stderr
