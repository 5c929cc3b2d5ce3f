"""The README's first command on a machine of its own: the demo, then every command it suggests.

``shopstream demo`` runs as ``scripts/demo`` runs it (the virtualenv's ``shopstream`` not on the
shell's PATH) against a broker it starts itself (free ports, a fresh data folder: a fresh machine's
first run); each command the demo prints in backticks then runs as printed, after the PATH line the
demo prints, ``shopstream kafka down`` last. The shared broker is never touched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import ROOT, PrivateBroker, kafka_jars

pytestmark = pytest.mark.integration


def demo_env(broker: PrivateBroker, workdir: Path) -> dict[str, str]:
    """A shell with no shopstream settings and the virtualenv's bin folder off the PATH."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOPSTREAM_", "KAFKA_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
        SHOPSTREAM_KAFKA_PORT=str(broker.port),
        SHOPSTREAM_KAFKA_CONTROLLER_PORT=str(broker.controller_port),
        SHOPSTREAM_KAFKA_DATA=str(broker.data),
        SHOPSTREAM_KAFKA_HEAP="-Xms256m -Xmx512m",
        SHOPSTREAM_DATA_DIR=str(workdir / "var"),
    )
    for name in ("SHOPSTREAM_DATASETS_DIR", "SHOPSTREAM_KAFKA_HOME", "SHOPSTREAM_KAFKA_VERSION"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def test_the_demo_answers_every_event_and_every_command_it_suggests_works(tmp_path: Path) -> None:
    if not (kafka_jars() / ".complete").exists():
        pytest.fail(f"no Kafka jars in {kafka_jars()}: run `deploy/kafka/local-kafka.sh fetch`")
    broker = PrivateBroker(tmp_path / "kafka")
    env = demo_env(broker, tmp_path)
    try:
        demo = subprocess.run(
            [sys.executable, "-m", "streams", "demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        out = demo.stdout
        assert demo.returncode == 0, f"{out}\n{demo.stderr[-3000:]}"
        assert "3000/3000 events answered" in out and "== promotions (" in out, out
        path_line = next((ln for ln in out.splitlines() if "export PATH=" in ln), None)
        assert path_line is not None, f"the demo never says how to put shopstream on the PATH:\n{out}"
        export = path_line[path_line.index("export PATH=") :]
        suggested = re.findall(r"`(shopstream [^`]+)`", out)
        assert "shopstream kafka down" in suggested, out
        suggested.sort(key=lambda cmd: cmd == "shopstream kafka down")  # stop the broker last
        for cmd in dict.fromkeys(suggested):
            done = subprocess.run(
                ["bash", "-c", f"{export} && {cmd}"],
                cwd=tmp_path,  # anywhere, not only in the repository
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, f"`{cmd}` as printed failed:\n{done.stdout}\n{done.stderr}"
            if cmd.startswith("shopstream tail --topic promotions"):
                assert len(done.stdout.splitlines()) == 20 and '"promotion_id"' in done.stdout, done.stdout
        assert (
            not (broker.data / "kafka.pid").exists()
            or subprocess.run(
                ["bash", "-c", f"{export} && shopstream kafka status"], env=env, capture_output=True
            ).returncode
            != 0
        ), "`shopstream kafka down` left the broker running"
    finally:
        broker.run("down")
