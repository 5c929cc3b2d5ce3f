"""The archiver beside a stream worker on the same stream: events/s, CPU per event, bytes per event.

Publishes the shipped REES46 sample (``--dataset``, default ``rees46-demo``) repeated ``--copies``
times with fresh event ids and shifted times (first ``--events`` of it, if given) to fresh input
topics, once. Then drains that same backlog ``--repeat`` times with each process, interleaved
(archiver, worker, archiver, ...), each run with its own consumer group, output and internal topics
and folders (``bench/ceilings.py``'s ``variant``), as the shipped commands:
  archiver: ``python -m streams archive`` (decode, buffer, Parquet files, fsync, rename, commit);
  worker:   ``python -m streams worker`` serving the demo model ``deploy/demo/model`` on the CPU.
Timed from the first event the process takes (its /metrics, polled every 20 ms) to its committed
offsets reaching the end of every topic it reads (for the worker also its by-user hop), so start-up
and group join are left out and shown apart. The archiver is sent SIGTERM once it has taken every
event (its /metrics), as its buffer would otherwise wait ``SHOPSTREAM_ARCHIVE_ROLL_S`` before the
files and the commit: the drain includes that final write. The worker commits every second, so its
drain may read up to 1 s long. CPU is the child's own (user + system, all threads, from
/proc/<pid>/stat) over the same span; the archiver's shutdown after its final commit (leaving the
group, interpreter exit: ``os.wait4`` at exit) is shown apart, the worker's is not measured.
Bytes per event are the Parquet files' over the events archived, beside the JSON messages' own
size. Any process that dies ends the script (exit 1) with the end of its log.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python bench/archive_throughput.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ceilings import variant  # noqa: E402
from worker_throughput import proc_stats  # noqa: E402

from streams.admin import all_topics, ensure_topics  # noqa: E402
from streams.archive_read import archive_files, read_events  # noqa: E402
from streams.replay import replay  # noqa: E402
from streams.sources.datasets import load  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    ArchiverProcess,
    StreamsProcess,
    WorkerProcess,
    free_port,
    group_clients,
    isolated_env,
    partitions_of,
    settings_of,
    uncommitted_before,
)

MODEL = ROOT / "deploy" / "demo" / "model"
TAKEN = {  # samples whose sum counts the events a process has taken so far
    "archiver": {
        "shopstream_archive_buffered_rows",
        "shopstream_archive_events_total",
        "shopstream_archive_rejected_total",
    },
    "worker": {"shopstream_events_total"},
}


class Died(Exception):
    """A process ended (or stalled) before its run was over."""


def long_stream(events: list[dict[str, Any]], copies: int) -> list[dict[str, Any]]:
    """``copies`` of ``events`` back to back in event time, each with fresh event ids."""
    t = [datetime.fromisoformat(e["event_time"]) for e in events]
    span = max(t) - min(t) + timedelta(seconds=1)
    return [
        dict(e, event_id=f"r{k}-{e['event_id']}", event_time=(when + k * span).isoformat())
        for k in range(copies)
        for e, when in zip(events, t, strict=True)
    ]


@dataclass
class Run:
    kind: str  # archiver or worker
    index: int
    events: int  # published and drained (the committed offsets reached their end)
    start_s: float  # process start to the first event taken (imports, group join, recovery)
    drain_s: float  # first event taken to the committed offsets at the end
    cpu_s: float  # the child's user + system CPU over the drain
    shutdown_cpu_s: float  # archiver: its CPU from the final commit to its exit (not in cpu_s)
    rss_mib: float  # the child's peak RSS
    load1: float  # the machine's 1-minute load average when the run ended
    outputs: str  # what it wrote
    parquet_bytes: float = 0.0  # archiver: Parquet bytes per archived event

    @property
    def rate(self) -> float:
        return self.events / max(self.drain_s, 1e-9)

    @property
    def cpu_us(self) -> float:
        return self.cpu_s * 1e6 / max(self.events, 1)


def scrape(port: int, names: set[str]) -> float:
    """Sum of the samples named ``names`` on 127.0.0.1:``port``/metrics (0 while nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in names)


@dataclass
class Child:
    """A started process, reaped here with ``os.wait4`` so that its own CPU and peak RSS are known
    at exit; its ``returncode`` is set for ``StreamsProcess.stop()``."""

    proc: StreamsProcess
    exit: tuple[int, float, float] | None = None  # exit code, CPU seconds, peak RSS MiB

    def poll(self) -> tuple[int, float, float] | None:
        p = self.proc.proc
        if self.exit is None and p is not None:
            pid, status, use = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                self.exit = p.returncode, use.ru_utime + use.ru_stime, use.ru_maxrss / 1024
        return self.exit

    def died(self, why: str) -> Died:
        return Died(f"{self.proc.command} {why}; the end of its log ({self.proc.log}):\n{self.proc.tail()}")


async def wait_for(
    what: str, cond: Callable[[], Awaitable[bool]], child: Child, timeout: float, every: float
) -> float:
    """Poll ``cond`` until it holds and return when (``perf_counter``); ``Died`` if the process
    exits first (a clean exit gets one last look: the archiver commits as it stops) or by ``timeout``."""
    deadline = time.perf_counter() + timeout
    while True:
        if await cond():
            return time.perf_counter()
        if (ended := child.poll()) is not None:
            if ended[0] == 0 and await cond():
                return time.perf_counter()
            raise child.died(f"exited with code {ended[0]} while waiting for {what}")
        if time.perf_counter() > deadline:
            raise child.died(f"gave no {what} within {timeout:.0f}s")
        await asyncio.sleep(every)


async def exit_of(child: Child, timeout: float) -> tuple[float, float]:
    """CPU seconds and peak RSS MiB of a process asked to stop, once it has exited with code 0."""
    deadline = time.perf_counter() + timeout
    while (ended := child.poll()) is None:
        if time.perf_counter() > deadline:
            raise child.died(f"did not exit within {timeout:.0f}s of SIGTERM")
        await asyncio.sleep(0.05)
    if ended[0] != 0:
        raise child.died(f"exited with code {ended[0]} on SIGTERM")
    return ended[1], ended[2]


def archived(root: str) -> tuple[str, float]:
    """What the archive holds, and its Parquet bytes per event."""
    files = archive_files(root)
    rows = len(read_events(root))
    size = sum(os.path.getsize(p) for p in files)
    return f"{rows} rows in {len(files)} Parquet files", size / max(rows, 1)


class Bench:
    """The published stream, the clients that watch the groups' commits, and one run of either kind."""

    def __init__(self, env: dict[str, str], work: Path, n: int, timeout: float) -> None:
        self.env, self.work, self.n, self.timeout = env, work, n, timeout
        self.admin: AIOKafkaAdminClient
        self.consumer: AIOKafkaConsumer

    async def drained(self, group: str, topics: list[str], hop: list[str]) -> bool:
        """``group`` committed every message of ``topics``, then (once those are final) of ``hop``."""
        for names in (topics, hop):
            if names:
                end = await self.consumer.end_offsets(await partitions_of(self.consumer, names))
                if await uncommitted_before(self.admin, group, end):
                    return False
        return True

    async def run(self, kind: str, index: int) -> Run:
        name = f"{kind}{index}"
        port = free_port()
        run_env = variant(
            self.env,
            self.work,
            name,
            SHOPSTREAM_WEB_PORT=str(port),
            SHOPSTREAM_ARCHIVE_METRICS_PORT=str(port),
            SHOPSTREAM_ARCHIVE_DIR=str(self.work / name / "archive"),
        )
        s = settings_of(run_env)
        await ensure_topics(s, all_topics(s))  # fresh output and by-user topics, not timed
        archiver = kind == "archiver"
        proc: StreamsProcess
        if archiver:
            proc, group = ArchiverProcess(run_env, self.work / f"{name}.log"), f"{s.app_id}-archive"
            topics, hop = [*s.input_topics, s.topic_promotions, s.topic_erasures], []
        else:
            proc, group = WorkerProcess(run_env, self.work / f"{name}.log"), s.app_id
            topics, hop = [*s.input_topics, *s.control_topics], [s.topic_events_by_user]

        async def taken(least: float) -> bool:
            return await asyncio.to_thread(scrape, port, TAKEN[kind]) >= least

        async def committed() -> bool:
            return await self.drained(group, topics, hop)

        t0 = time.perf_counter()
        child = Child(proc.start())
        assert proc.proc is not None
        try:
            first = await wait_for("first event taken", lambda: taken(1), child, self.timeout, 0.02)
            cpu0, _ = proc_stats(proc.proc.pid)
            if archiver:
                await wait_for("every event taken", lambda: taken(self.n), child, self.timeout, 0.1)
                proc.proc.send_signal(signal.SIGTERM)  # roll what it holds, commit, exit
                done = await wait_for("the final commit", committed, child, self.timeout, 0.02)
                # a zombie's /proc entry still holds its CPU; reaped already: CPU at exit
                cpu1 = proc_stats(proc.proc.pid)[0] if child.exit is None else child.exit[1]
                cpu_exit, rss = await exit_of(child, proc.stop_timeout)
                shutdown = cpu_exit - cpu1
            else:
                done = await wait_for("commits at the end", committed, child, self.timeout, 0.1)
                cpu1, peak = proc_stats(proc.proc.pid)
                rss, shutdown = peak / 2**20, 0.0
        finally:
            proc.stop()
        if archiver:
            outputs, per_event = archived(s.archive_dir)
        else:
            counts = {}
            for t in (s.topic_recommendations, s.topic_promotions, s.topic_deadletter):
                ends = await self.consumer.end_offsets(await partitions_of(self.consumer, [t]))
                counts[t.rsplit(".", 2)[-2]] = sum(ends.values())
            outputs, per_event = ", ".join(f"{v} {k}" for k, v in counts.items()), 0.0
        return Run(
            kind,
            index,
            self.n,
            first - t0,
            done - first,
            cpu1 - cpu0,
            shutdown,
            rss,
            os.getloadavg()[0],
            outputs,
            per_event,
        )


def line(r: Run, json_bytes: float) -> str:
    text = (
        f"{r.kind:<8} run {r.index}: {r.events} events, start {r.start_s:5.1f}s, drain {r.drain_s:6.2f}s, "
        f"{r.rate:7.0f} events/s, CPU {r.cpu_us:5.0f} us/event ({r.cpu_s / max(r.drain_s, 1e-9):.2f} cores), "
        f"peak RSS {r.rss_mib:.0f} MiB, load {r.load1:.1f}; {r.outputs}"
    )
    if r.kind == "archiver":
        text += (
            f"; {r.parquet_bytes:.1f} Parquet bytes/event against {json_bytes:.0f} of JSON; "
            f"shutdown after the commit {r.shutdown_cpu_s * 1e3:.0f} ms CPU"
        )
    return text


def summary(runs: list[Run], json_bytes: float) -> None:
    def cell(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} ({', '.join(f'{v:{fmt}}' for v in values)})"

    print()
    print("| process | runs | events/s | CPU us/event | drain s | start s | Parquet B/event (JSON) |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for kind in ("archiver", "worker"):
        rs = [r for r in runs if r.kind == kind]
        medians[kind] = statistics.median(r.cpu_us for r in rs), statistics.median(r.rate for r in rs)
        size = (
            cell([r.parquet_bytes for r in rs], ".1f") + f" ({json_bytes:.0f})" if kind == "archiver" else "-"
        )
        cells = [
            cell([r.rate for r in rs], ".0f"),
            cell([r.cpu_us for r in rs], ".0f"),
            cell([r.drain_s for r in rs], ".2f"),
            cell([r.start_s for r in rs], ".1f"),
            size,
        ]
        print(f"| {kind} | {len(rs)} | {' | '.join(cells)} |")
    print("median (every run in order); drain: first event taken to committed offsets at the end.")
    (a_cpu, a_rate), (w_cpu, w_rate) = medians["archiver"], medians["worker"]
    print(
        f"archiver / worker: {a_rate / w_rate:.1f}x the events/s, {a_cpu / w_cpu:.2f}x the CPU per event "
        f"(the archiver costs {100 * a_cpu / w_cpu:.0f}% of a worker's CPU per event)"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="runs of each process, interleaved")
    ap.add_argument("--copies", type=int, default=10, help="copies of the data set, fresh ids")
    ap.add_argument("--events", type=int, default=None, help="only the first N events of the stream")
    ap.add_argument("--dataset", default="rees46-demo")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a run may wait for each step")
    args = ap.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"shopstream-archive-bench-{uuid.uuid4().hex[:6]}"
    env = isolated_env(
        bootstrap,
        work,
        SHOPSTREAM_PARTITIONS=str(args.partitions),
        SHOPSTREAM_MODEL_DIR=str(MODEL),
        SHOPSTREAM_INFERENCE_PROVIDER="cpu",
    )
    settings = settings_of(env)
    await ensure_topics(settings, [*settings.input_topics, *settings.control_topics])
    events = long_stream(list(load(args.dataset, settings.datasets_dir)), args.copies)[: args.events]
    n, secs = await replay(settings, events, progress=False)
    json_bytes = sum(len(orjson.dumps(e)) for e in events) / n
    print(
        f"input: {n} events ({args.copies} x {args.dataset}) published in {secs:.1f}s, "
        f"{args.partitions} partitions; worker model {MODEL.relative_to(ROOT)}"
    )
    print(
        f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}, "
        f"broker {bootstrap}"
    )
    bench = Bench(env, work, n, args.timeout)
    runs = []
    async with group_clients(settings) as (bench.admin, bench.consumer):
        for i in range(1, args.repeat + 1):
            for kind in ("archiver", "worker"):
                runs.append(await bench.run(kind, i))
                print(line(runs[-1], json_bytes), flush=True)
    summary(runs, json_bytes)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Died as exc:
        sys.exit(f"archive_throughput: {exc}")
