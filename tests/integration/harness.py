"""A worker process with its own topics, and Kafka helpers, for integration tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from streams.admin import ensure_topics
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_env(bootstrap: str, workdir: Path, **extra: str) -> dict[str, str]:
    """Settings env for one test: unique topic names and app id, its own data dir."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SHOPSTREAM_APP_ID": f"test-{tag}",
        "SHOPSTREAM_PARTITIONS": "4",
        "SHOPSTREAM_DATA_DIR": str(workdir / "data"),
        "SHOPSTREAM_WEB_PORT": str(free_port()),
    }
    for name in (
        "searches",
        "views",
        "carts",
        "orders",
        "reviews",
        "recommendations",
        "promotions",
        "deadletter",
        "events_by_user",
        "erasures",
        "consents",
    ):
        env[f"SHOPSTREAM_TOPIC_{name.upper()}"] = f"t-{tag}.{name}"
    env.update(extra)
    return env


def settings_of(env: dict[str, str]) -> Settings:
    old = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(old)


@dataclass
class WorkerProcess:
    """``python -m streams worker`` with the given env; its log goes to ``log``."""

    env: dict[str, str]
    log: Path
    prefix: Sequence[str] = ()  # e.g. a profiler command line
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> WorkerProcess:
        full = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        full.pop("PYTEST_CURRENT_TEST", None)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams", "worker"],
                cwd=ROOT,
                env=full,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


@contextmanager
def started_worker(bootstrap: str, workdir: Path, **extra: str) -> Iterator[tuple[Settings, WorkerProcess]]:
    """A worker on its own freshly created topics, stopped on exit."""
    env = isolated_env(bootstrap, workdir, **extra)
    settings = settings_of(env)
    asyncio.run(ensure_topics(settings))
    worker = WorkerProcess(env, workdir / "worker.log").start()
    try:
        yield settings, worker
    finally:
        worker.stop()


async def produce(settings: Settings, records: Sequence[tuple[str, bytes | None, bytes | None]]) -> None:
    """Send (topic, key, value) records and wait for every acknowledgement."""
    producer = AIOKafkaProducer(**settings.kafka_client_options(), acks="all")
    await producer.start()
    try:
        futs = [await producer.send(t, v, key=k) for t, k, v in records]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def collect(
    settings: Settings, topic: str, until: Any, timeout: float = 90.0, worker: WorkerProcess | None = None
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topic`` from the beginning until ``until(records)`` is true or ``timeout`` passes."""
    consumer = AIOKafkaConsumer(**settings.kafka_client_options(), enable_auto_commit=False)
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout
        parts: set[int] | None = None
        while not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} never appeared")
            await asyncio.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while not until(out):
            if time.monotonic() > deadline:
                break
            if worker is not None and not worker.alive():
                raise AssertionError(f"worker died:\n{worker.tail()}")
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def values(records: list[ConsumerRecord[bytes, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in records if r.value is not None]
