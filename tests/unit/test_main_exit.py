"""``python -m streams`` leaves without the interpreter's teardown (``streams.cli.run``): what a
command printed and its exit code still come out (a Parquet command: ``test_archive_erasure``)."""

from __future__ import annotations

from pathlib import Path

from tests.commands import streams_cli


def test_a_commands_output_and_exit_code_come_out(tmp_path: Path) -> None:
    done = streams_cli("settings", env={"SHOPSTREAM_DATA_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "SHOPSTREAM_DATA_DIR" in done.stdout or str(tmp_path) in done.stdout
    refused = streams_cli("settings", env={"SHOPSTREAM_PARTITIONS": "0"})
    assert refused.returncode == 2
    assert "SHOPSTREAM_PARTITIONS" in refused.stderr
