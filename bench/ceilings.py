"""The worker against its limits and a peer, side by side in one run, on the same broker and input.

Publishes a real data set (default: the Taobao time slice, keyed by user; ``--copies`` k: k copies
with suffixed user, event, order and session ids, interleaved in event time) to fresh topics once,
then drains that same backlog with each of these, ``--repeat`` rounds, interleaved (c, d, e, g and
h rotate their order each round), every run printed, then the median of each:
  (a) transport ceiling: a bare aiokafka consume -> produce loop, no work;
  (b) work ceiling: a minimal aiokafka loop running the worker's own per-batch work
      (``streams.pipeline``: fold state, baseline, onnxruntime top-K in micro-batches, filters,
      promotion policy) on in-memory tables, no faust, no changelogs;
  (c) typical faust: ``bench/typical_faust.py``, one agent with a Table, onnxruntime at batch 1 and
      a per-event ``await topic.send`` (what a straightforward faust app does);
  (d) the shopstream worker (faust, two hops, three changelogged tables, micro-batching; default
      settings);
  (e) a plain Quix Streams app doing the same job (``bench/quix_peer.py``: validation, group_by
      user, fold into RocksDB state with changelog, onnxruntime at batch 1; no baseline, no
      promotions), skipped with a note where quixstreams is not installed (``pip install '.[bench]'``);
  (g) the same Quix app without group_by (keyed input, state keyed by the input key): the peer of (h);
  (h) the worker with SHOPSTREAM_DIRECT_INPUT=true: the input is keyed by user id, so every event is
      scored where it is read, one hop (the peer of g);
  (f) ``--processes`` workers in one group, once at the end (``--processes 1``: not run).
Every run has its own consumer group, state and output/internal topics. Events/s are counted from
the first to the last output. CPU per event: (a), (b) this process (with the counting consumer);
(c)-(h) the app process's own (user + system, /proc, sampled every 0.25 s) between its first and
last output, and in brackets including start-up (imports, model load, group join). Records per
event: every record the app wrote (outputs, dead letters, by-user or repartition hop, changelogs),
counted from the end offsets of its topics after it stopped.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python bench/ceilings.py --model artifacts/taobao-slice
    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python bench/ceilings.py --model deploy/demo/model \
        --dataset rees46 --copies 2 --limit 40000 --repeat 3 --processes 1
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from pipeline_cost import build  # noqa: E402
from worker_throughput import count_outputs, proc_stats, transport_loop  # noqa: E402

from streams.admin import ensure_topics  # noqa: E402
from streams.pipeline import Message  # noqa: E402
from streams.replay import replay  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.sources.datasets import Event, load  # noqa: E402
from tests.integration.harness import WorkerProcess, free_port, isolated_env, settings_of  # noqa: E402

NAMES = {
    "a": "(a) transport ceiling (aiokafka, no work)",
    "b": "(b) work ceiling (aiokafka + pipeline)",
    "c": "(c) typical faust agent (Table, ONNX batch 1)",
    "d": "(d) shopstream worker",
    "e": "(e) Quix Streams peer (state, ONNX batch 1)",
    "g": "(g) Quix Streams peer, keyed input (no group_by)",
    "h": "(h) shopstream worker, direct input",
    "f": "(f) shopstream workers in one group",
}


@dataclass
class Run:
    kind: str
    rate: float  # events/s, first to last output
    cpu_us: float  # CPU per event over the drain (a, b: this process, with the counting consumer)
    total_us: float | None = None  # CPU per event including start-up (app processes)
    written: dict[str, int] = field(default_factory=dict)  # topic label -> records the app wrote
    events: int = 0

    @property
    def per_event(self) -> float | None:
        return sum(self.written.values()) / self.events if self.written and self.events else None


async def work_loop(settings: Settings, out_topic: str, n: int, batch: int) -> None:
    """The work ceiling: getmany -> Pipeline.process -> produce, nothing else."""
    pipeline = build(settings)
    consumer = AIOKafkaConsumer(
        *settings.input_topics,
        **settings.kafka_client_options(),
        group_id=f"bench-work-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        max_poll_records=batch,
        fetch_max_wait_ms=100,
    )
    producer = AIOKafkaProducer(**settings.kafka_client_options(), linger_ms=2)
    await consumer.start()
    await producer.start()
    try:
        done = 0
        while done < n:
            fetched = await consumer.getmany(timeout_ms=500, max_records=batch)
            msgs = [
                Message(tp.partition, r.key or b"", r.value or b"", r.timestamp / 1000)
                for tp, records in fetched.items()
                for r in records
            ]
            if not msgs:
                continue
            for out in pipeline.process(msgs).outputs:
                if out.topic == settings.topic_recommendations:
                    await producer.send(out_topic, out.value, key=out.key)
            done += len(msgs)
        await producer.flush()
    finally:
        await consumer.stop()
        await producer.stop()


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def in_process(kind: str, settings: Settings, topic: str, n: int, loop: Any) -> Run:
    await ensure_topics(settings, [topic])
    cpu0 = self_cpu()
    task = asyncio.create_task(loop)
    first, last, seen = await count_outputs(settings, topic, n, timeout=1800)
    await task
    return Run(kind, (seen - 1) / max(last - first, 1e-9), (self_cpu() - cpu0) * 1e6 / max(seen, 1))


async def drain(
    settings: Settings, topic: str, n: int, pids: Callable[[], list[int]], alive: Callable[[], str | None]
) -> tuple[float, float, int, float, float]:
    """Count ``n`` outputs on ``topic`` while sampling the app processes' CPU; returns events/s's
    (first, last, seen), the CPU between the first and the last output, and the CPU since start."""
    samples: list[tuple[float, float]] = []

    def sample() -> None:
        samples.append((time.time(), sum(proc_stats(p)[0] for p in pids())))

    counting = asyncio.create_task(count_outputs(settings, topic, n, timeout=1800))
    while not counting.done():
        died = alive()
        if died is not None:
            counting.cancel()
            raise RuntimeError(died)
        sample()
        await asyncio.wait([counting], timeout=0.25)
    first, last, seen = counting.result()
    sample()

    def at(t: float) -> float:  # CPU at wall time t, linear between the samples around it
        before = [s for s in samples if s[0] <= t] or samples[:1]
        after = [s for s in samples if s[0] >= t] or samples[-1:]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 <= t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)

    return first, last, seen, at(last) - at(first), samples[-1][1]


def app_run(kind: str, first: float, last: float, seen: int, cpu: float, total: float) -> Run:
    return Run(
        kind,
        (seen - 1) / max(last - first, 1e-9),
        cpu * 1e6 / max(seen - 1, 1),
        total * 1e6 / max(seen, 1),
        events=seen,
    )


async def run_worker(
    kind: str, settings: Settings, env: dict[str, str], n: int, log: Path, processes: int = 1
) -> Run:
    """``processes`` workers in one consumer group drain the backlog; CPU is summed over them."""
    await ensure_topics(settings)
    procs = [
        WorkerProcess(
            {
                **env,
                "SHOPSTREAM_DATA_DIR": f"{env['SHOPSTREAM_DATA_DIR']}-{i}",
                "SHOPSTREAM_WEB_PORT": str(free_port()),
            },
            log.with_suffix(f".{i}.log"),
        ).start()
        for i in range(processes)
    ]

    def died() -> str | None:
        gone = [p for p in procs if not p.alive()]
        return f"a worker exited: see {gone[0].log}" if gone else None

    try:
        got = await drain(
            settings, settings.topic_recommendations, n, lambda: [p.proc.pid for p in procs if p.proc], died
        )
    finally:
        for p in procs:
            p.stop()
    run = app_run(kind, *got)
    run.written = await records_written(
        settings, lambda t: t.startswith(f"{settings.app_id}-"), outputs(settings)
    )
    return run


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def run_app(
    kind: str,
    settings: Settings,
    env: dict[str, str],
    argv: list[str],
    log: Path,
    n: int,
    ours: Callable[[str], bool],
) -> Run:
    """An app as its own process (c, e): drain, stop it (SIGTERM: its last commit and changelog
    writes), count what it wrote to its outputs and to the topics ``ours`` picks."""
    await ensure_topics(settings)
    proc = spawn(argv, env, log)

    def died() -> str | None:
        return None if proc.poll() is None else f"{argv[1]} exited with {proc.returncode}: see {log}"

    try:
        got = await drain(settings, settings.topic_recommendations, n, lambda: [proc.pid], died)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    run = app_run(kind, *got)
    run.written = await records_written(settings, ours, outputs(settings))
    return run


def outputs(settings: Settings) -> set[str]:
    return {
        settings.topic_events_by_user,
        settings.topic_recommendations,
        settings.topic_promotions,
        settings.topic_deadletter,
    }


async def records_written(settings: Settings, ours: Callable[[str], bool], named: set[str]) -> dict[str, int]:
    """Records on every topic the run wrote (fresh topics: the sum of their end offsets), by label."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t in named or ours(t)]
        described = await admin.describe_topics(topics) if topics else []
    finally:
        await admin.close()
    tps = [TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]]
    consumer = AIOKafkaConsumer(**settings.kafka_client_options())
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()
    out: dict[str, int] = {}
    for tp, end in ends.items():
        if end:
            label = label_of(tp.topic, settings)
            out[label] = out.get(label, 0) + end
    return out


def label_of(topic: str, settings: Settings) -> str:
    if topic.startswith(f"{settings.app_id}-"):  # faust: <app id>[-typical]-<table>-changelog
        return topic[len(settings.app_id) + 1 :].removeprefix("typical-")
    if "__" in topic:  # Quix: repartition__<group>--..., changelog__<group>--...
        return topic.split("__")[0]
    return topic.split(".")[1] if "." in topic else topic


def variant(env: dict[str, str], work: Path, name: str, **extra: str) -> dict[str, str]:
    """The worker's env with its own group, state and output topics, on the same input topics."""
    out = {**env, "SHOPSTREAM_APP_ID": f"{env['SHOPSTREAM_APP_ID']}-{name}", **extra}
    out["SHOPSTREAM_DATA_DIR"] = str(work / name)
    for t in ("RECOMMENDATIONS", "PROMOTIONS", "DEADLETTER", "EVENTS_BY_USER"):
        out[f"SHOPSTREAM_TOPIC_{t}"] = f"{env[f'SHOPSTREAM_TOPIC_{t}']}.{name}"
    return out


def copies(events: list[Event], k: int) -> list[Event]:
    """``k`` copies of the data set, copy i > 0 with ids suffixed ``-c<i>`` (other users, other
    events), interleaved in event time."""
    ids = ("user_id", "event_id", "order_id", "session_id")
    out = [
        ev if i == 0 else {**ev, **{f: f"{ev[f]}-c{i}" for f in ids if f in ev}}
        for ev in events
        for i in range(k)
    ]
    return sorted(out, key=lambda ev: datetime.fromisoformat(ev["event_time"]))


async def one(kind: str, env: dict[str, str], work: Path, name: str, n: int, args: argparse.Namespace) -> Run:
    """One run of app ``kind`` (c, d, e, f) on fresh topics and state."""
    v = variant(env, work, name)
    settings = settings_of(v)
    if kind == "c":
        argv = [sys.executable, str(ROOT / "bench" / "typical_faust.py"), "worker", "-l", "info"]
        typical = f"{settings.app_id}-typical-"
        return await run_app(
            kind, settings, v, argv, work / f"{name}.log", n, lambda t: t.startswith(typical)
        )
    if kind in "eg":
        argv = [sys.executable, str(ROOT / "bench" / "quix_peer.py")]
        v["QUIX_PEER_KEYED"] = "1" if kind == "g" else "0"
        group = f"__{settings.app_id}-quix--"
        return await run_app(kind, settings, v, argv, work / f"{name}.log", n, lambda t: group in t)
    if kind == "h":
        v["SHOPSTREAM_DIRECT_INPUT"] = "true"
    return await run_worker(kind, settings, v, n, work / f"{name}.log", args.processes if kind == "f" else 1)


def line(i: int, r: Run) -> str:
    text = f"run {i}  {NAMES[r.kind]:<48}: {r.rate:7.0f} events/s  {r.cpu_us:5.0f} us CPU/event"
    if r.total_us is not None:
        text += f" ({r.total_us:4.0f} incl. start-up)"
    if r.per_event is not None:
        parts = ", ".join(f"{k} {v / r.events:.2f}" for k, v in sorted(r.written.items()))
        text += f"  {r.per_event:.2f} records/event [{parts}]"
    return text


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--dataset", default="taobao")
    ap.add_argument("--copies", type=int, default=1, help="copies of the data set, suffixed ids")
    ap.add_argument("--limit", type=int, default=30000, help="events published at most")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds of a-e")
    ap.add_argument("--processes", type=int, default=2, help="workers in one group for (f); 1: no (f)")
    ap.add_argument(
        "--apps", default="abdgeh", help="which of a-e, g, h to run each round (default: all but c)"
    )
    args = ap.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"shopstream-ceilings-{uuid.uuid4().hex[:6]}"
    env = isolated_env(
        bootstrap,
        work,
        SHOPSTREAM_PARTITIONS=str(args.partitions),
        SHOPSTREAM_MODEL_DIR=str(args.model),
        SHOPSTREAM_INFERENCE_PROVIDER="cpu",
        SHOPSTREAM_BATCH_MAX=str(args.batch),
    )
    settings = settings_of(env)
    await ensure_topics(settings)
    events = copies(list(load(args.dataset, settings.datasets_dir)), args.copies)[: args.limit]
    n, secs = await replay(settings, events, progress=False)
    users = len({ev["user_id"] for ev in events})
    print(
        f"input: {n} events of {users} users ({args.copies} x {args.dataset}) in {secs:.1f}s, "
        f"{args.partitions} partitions, model {args.model}, batch {args.batch}"
    )
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, broker {bootstrap}")
    apps = [a for a in "cdgeh" if a in args.apps]
    if importlib.util.find_spec("quixstreams") is None:
        for kind in {"e", "g"} & set(apps):
            print(f"({kind}) skipped: quixstreams is not installed (pip install '.[bench]')")
            apps.remove(kind)
    runs: list[Run] = []
    for i in range(1, args.repeat + 1):
        if "a" in args.apps:
            topic = f"{settings.topic_recommendations}.transport-{i}"
            runs.append(await in_process("a", settings, topic, n, transport_loop(settings, topic, n)))
            print(line(i, runs[-1]), flush=True)
        if "b" in args.apps:
            topic = f"{settings.topic_recommendations}.work-{i}"
            runs.append(await in_process("b", settings, topic, n, work_loop(settings, topic, n, args.batch)))
            print(line(i, runs[-1]), flush=True)
        turn = (i - 1) % len(apps)
        for kind in apps[turn:] + apps[:turn]:
            runs.append(await one(kind, env, work, f"{kind}{i}", n, args))
            print(line(i, runs[-1]), flush=True)
    if args.processes > 1:
        runs.append(await one("f", env, work, "f1", n, args))
        print(line(1, runs[-1]).replace(NAMES["f"], f"{NAMES['f']} ({args.processes})"), flush=True)
    summary(runs, args.repeat)


def summary(runs: list[Run], repeat: int) -> None:
    med: dict[str, float] = {}
    cpu: dict[str, float] = {}
    print(f"median of {repeat} run(s) each (min-max):")
    for kind, name in NAMES.items():
        mine = [r for r in runs if r.kind == kind]
        if not mine:
            continue
        rates, cpus = [r.rate for r in mine], [r.cpu_us for r in mine]
        med[kind], cpu[kind] = statistics.median(rates), statistics.median(cpus)
        text = (
            f"  {name:<48}: {med[kind]:7.0f} events/s ({min(rates):.0f}-{max(rates):.0f})  "
            f"{statistics.median(cpus):5.0f} us CPU/event ({min(cpus):.0f}-{max(cpus):.0f})"
        )
        per = [r.per_event for r in mine if r.per_event is not None]
        if per:
            text += f"  {statistics.median(per):.2f} records/event"
        print(text)
    if "d" in med and "b" in med:
        print(f"d: worker / work ceiling = {med['d'] / med['b']:.2f} (events/s, target >= 0.60)")
    if "d" in med and "c" in med:
        print(f"c: worker / typical faust = {med['d'] / med['c']:.2f} (events/s, target >= 2)")
    for worker, peer in (("d", "e"), ("h", "g")):
        if worker in med and peer in med:
            print(
                f"{worker}/{peer}: worker / Quix = {med[worker] / med[peer]:.2f} (events/s, target >= 1);"
                f" CPU per event {cpu[worker] / cpu[peer]:.2f} (target <= 1)"
            )
    if "h" in med and "b" in med:
        print(f"h: direct-input worker / work ceiling = {med['h'] / med['b']:.2f} (events/s)")
    if "f" in med:
        print(
            f"f: group / 1 worker = {med['f'] / med['d']:.2f} on {os.cpu_count()} cores (broker shares them)"
        )


if __name__ == "__main__":
    asyncio.run(main())
