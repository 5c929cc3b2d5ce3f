"""A worker process with its own topics, and Kafka helpers, for integration tests."""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    GroupLoadInProgressError,
    NotCoordinatorForGroupError,
)
from aiokafka.structs import ConsumerRecord

from streams import tail
from streams.admin import connect_admin, ensure_topics
from streams.settings import TOPIC_FIELDS, Settings

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = ROOT / "deploy" / "kafka" / "local-kafka.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# the topic-name prefixes of every isolated_env made in this process, with its env: their topics
# are deleted when the process exits (``delete_run_topics``) unless SHOPSTREAM_KEEP_TOPICS is set
_RUNS: list[tuple[tuple[str, ...], dict[str, str]]] = []
STOPPED = "no broker listening"


def isolated_env(bootstrap: str, workdir: Path, **extra: str) -> dict[str, str]:
    """Settings env for one test: unique topic names and app id, its own data dir. Its topics
    (the settings' and the app's internal ones) are deleted when the process exits."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SHOPSTREAM_APP_ID": f"test-{tag}",
        "SHOPSTREAM_PARTITIONS": "4",
        "SHOPSTREAM_DATA_DIR": str(workdir / "data"),
        "SHOPSTREAM_WEB_PORT": str(free_port()),
    }
    for topic in TOPIC_FIELDS:  # every topic of the settings, so a new one cannot be shared by tests
        name = topic.removeprefix("topic_")
        env[f"SHOPSTREAM_TOPIC_{name.upper()}"] = f"t-{tag}.{name}"
    env.update(extra)
    if not _RUNS:
        atexit.register(_delete_topics_at_exit)
    # derived app ids too (bench/ceilings.py), and the Quix peer's changelogs (bench/quix_peer.py)
    _RUNS.append(((f"t-{tag}.", f"test-{tag}-", f"changelog__test-{tag}-"), env))
    return env


async def delete_run_topics(
    runs: Sequence[tuple[tuple[str, ...], dict[str, str]]], timeout_s: float = 2.0
) -> dict[str, int | str]:
    """Delete the topics whose names start with the runs' prefixes, on each run's broker;
    returns per bootstrap address how many were deleted, or why none could be (``STOPPED``:
    nothing listens there any more)."""
    by_broker: dict[str, list[tuple[tuple[str, ...], dict[str, str]]]] = {}
    for run in runs:
        by_broker.setdefault(run[1]["KAFKA_BOOTSTRAP_SERVERS"], []).append(run)
    done: dict[str, int | str] = {}
    for bootstrap, group in by_broker.items():
        prefixes = tuple(p for ps, _ in group for p in ps)
        host, _, port = bootstrap.split(",")[0].rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
        except OSError:  # a test's own broker, stopped: its topics went with it
            done[bootstrap] = STOPPED
            continue
        try:
            admin = await connect_admin(settings_of(group[0][1]), timeout_s)
            try:
                doomed = [t for t in await admin.list_topics() if t.startswith(prefixes)]
                deleted = 0
                if doomed:
                    response = await admin.delete_topics(doomed)
                    # 3: gone already (a listing can still show a topic being deleted)
                    codes = {code for _, code in response.topic_error_codes} - {0, 3}
                    if codes:
                        raise RuntimeError(f"the broker refused to delete topics: errors {sorted(codes)}")
                    deleted = sum(1 for _, code in response.topic_error_codes if code == 0)
                done[bootstrap] = deleted
            finally:
                await admin.close()
        except Exception as exc:
            done[bootstrap] = f"{type(exc).__name__}: {exc}"
    return done


def _delete_topics_at_exit() -> None:
    if os.environ.get("SHOPSTREAM_KEEP_TOPICS") or not _RUNS:
        return
    for bootstrap, outcome in asyncio.run(delete_run_topics(_RUNS)).items():
        if isinstance(outcome, str) and outcome != STOPPED:
            print(f"topics of this run's tests left on {bootstrap}: {outcome}", file=sys.stderr)


def get_json(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    """A worker endpoint's status and JSON body: (0, None) while nothing listens, (code, None) for
    an HTTP error (a 503 from ``/readyz`` during a rebalance or recovery)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:  # not listening (yet)
        return 0, None


def settings_of(env: dict[str, str]) -> Settings:
    old = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(old)


@dataclass
class StreamsProcess:
    """``python -m streams <command>`` with the given env; its log goes to ``log``."""

    env: dict[str, str]
    log: Path
    prefix: Sequence[str] = ()  # e.g. a profiler command line
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    command: ClassVar[str]
    stop_timeout: ClassVar[float] = 30.0  # how long a clean shutdown may take before the kill

    def start(self) -> Self:
        full = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        full.pop("PYTEST_CURRENT_TEST", None)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams", self.command],
                cwd=ROOT,
                env=full,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def notable(self, n: int = 60) -> str:
        """The log's last ``n`` warnings, errors and rebalance lines (what a failed check reads)."""
        if not self.log.exists():
            return ""
        marks = ("WARNING", "ERROR", "CRITICAL", "assigned", "revoked", "Seek")
        lines = self.log.read_text(errors="replace").splitlines()
        lines = [ln for ln in lines if any(m in ln for m in marks)]
        return "\n".join(lines[-n:])


class WorkerProcess(StreamsProcess):
    """``python -m streams worker``: a stream worker."""

    command = "worker"


class ArchiverProcess(StreamsProcess):
    """``python -m streams archive``: the archiver (its shutdown writes and commits what it holds)."""

    command = "archive"
    stop_timeout = 60.0


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


@asynccontextmanager
async def reading_from_start(
    settings: Settings, topic: str, deadline: float
) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
    """A consumer assigned every partition of ``topic`` at its first offset, once the topic exists
    (``TimeoutError`` if it does not by ``deadline``, a ``time.monotonic()`` value); stopped on exit."""
    consumer = AIOKafkaConsumer(**settings.kafka_client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        while True:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
            if parts:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} never appeared")
            await asyncio.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        yield consumer, tps
    finally:
        await consumer.stop()


async def collect(
    settings: Settings, topic: str, until: Any, timeout: float = 90.0, worker: WorkerProcess | None = None
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topic`` from the beginning until ``until(records)`` is true or ``timeout`` passes."""
    out: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    async with reading_from_start(settings, topic, deadline) as (consumer, _):
        while not until(out):
            if time.monotonic() > deadline:
                break
            if worker is not None and not worker.alive():
                raise AssertionError(f"worker died:\n{worker.tail()}")
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    return out


async def read_to_end(
    settings: Settings, topics: Sequence[str], timeout: float = 120.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topics`` up to their end offsets as of the call (not a quiet period: a
    busy machine only makes it slower)."""
    return await tail.read_to_end(settings, topics, timeout)


def values(records: list[ConsumerRecord[bytes, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in records if r.value is not None]


async def quiet_promotions(settings: Settings, quiet_s: float = 5.0) -> list[dict[str, Any]]:
    """All promotions so far, once none has arrived for ``quiet_s`` (what should not come had its chance)."""
    seen = -1
    while True:
        got = values(await collect(settings, settings.topic_promotions, lambda rs: False, timeout=quiet_s))
        if len(got) == seen:
            return got
        seen = len(got)


async def user_state(port: int, user: str, until: Callable[[Any], Any], timeout: float = 120.0) -> Any:
    """GET the worker's view of a user until ``until(state)`` holds (None: no state)."""
    deadline = time.monotonic() + timeout
    last: Any = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/users/{user}/", timeout=5) as resp:
                last = orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 404: no state; 503: recovering, ask again
            last = None if exc.code == 404 else f"HTTP {exc.code}"
        except OSError:
            last = "no answer"
        if not isinstance(last, str) and until(last):  # a state, or None for no state
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"the state of user {user} never matched; last: {last}")


@asynccontextmanager
async def group_clients(settings: Settings) -> AsyncIterator[tuple[AIOKafkaAdminClient, AIOKafkaConsumer]]:
    """An admin client and an unassigned consumer on the test's broker, both closed on exit."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    consumer = AIOKafkaConsumer(**settings.kafka_client_options(), enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        yield admin, consumer
    finally:
        await consumer.stop()
        await admin.close()


async def partitions_of(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of ``topics`` the broker knows now."""
    cluster = await consumer._client.fetch_all_metadata()
    return [TopicPartition(t, p) for t in topics for p in sorted(cluster.partitions_for_topic(t) or ())]


async def uncommitted_before(admin: AIOKafkaAdminClient, group: str, end: dict[TopicPartition, int]) -> int:
    """Messages before the ``end`` offsets that ``group`` has not committed (no commit: from 0).
    While the group's coordinator is not ready (a broker started a moment ago is still creating
    ``__consumer_offsets``) nothing counts as committed: callers poll until it is."""
    return sum((await uncommitted_by_partition(admin, group, end)).values())


async def uncommitted_by_partition(
    admin: AIOKafkaAdminClient, group: str, end: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """``uncommitted_before`` per partition (only the partitions with something uncommitted)."""
    try:
        done = await admin.list_consumer_group_offsets(group, partitions=list(end))
    except (GroupCoordinatorNotAvailableError, GroupLoadInProgressError, NotCoordinatorForGroupError):
        return {tp: n for tp, n in end.items() if n}
    behind = {tp: end[tp] - max(done[tp].offset if tp in done else 0, 0) for tp in end}
    return {tp: n for tp, n in behind.items() if n}


# --- a private broker ---------------------------------------------------------------------------


@dataclass
class PrivateBroker:
    """A broker of its own (deploy/kafka/local-kafka.sh on free ports and a private data folder)."""

    data: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, action: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPSTREAM_KAFKA_")}
        env.update(
            SHOPSTREAM_KAFKA_PORT=str(self.port),
            SHOPSTREAM_KAFKA_CONTROLLER_PORT=str(self.controller_port),
            SHOPSTREAM_KAFKA_DATA=str(self.data),
            SHOPSTREAM_KAFKA_HEAP="-Xms256m -Xmx512m",
        )
        for name in ("SHOPSTREAM_KAFKA_HOME", "SHOPSTREAM_KAFKA_VERSION"):  # where the jars are
            if name in os.environ:
                env[name] = os.environ[name]
        done = subprocess.run(["bash", str(KAFKA_SCRIPT), action], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            log = self.data / "kafka.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"local-kafka.sh {action} failed:\n{done.stderr}\n{tail}")


def kafka_jars() -> Path:
    version = os.environ.get("SHOPSTREAM_KAFKA_VERSION", "4.1.1")
    default = Path.home() / ".cache" / "shopstream" / f"kafka-{version}"
    return Path(os.environ.get("SHOPSTREAM_KAFKA_HOME", default)) / "libs"
