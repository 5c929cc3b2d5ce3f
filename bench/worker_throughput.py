"""Worker throughput on a real data set, beside the raw transport ceiling, in one run.

Publishes a real data set (default: the Taobao time slice, 96,168 events) to fresh input topics,
then measures on the same broker and input:
  (a) transport: a bare aiokafka loop, getmany -> one output per event (no validation, no state);
  (b) worker:    ``shopstream worker`` (faust, tables with changelogs, baseline recommender).
Each drains the whole backlog; throughput is counted from the first to the last output, so the
group join and start-up are excluded and reported separately. Also prints the worker's CPU
seconds and peak RSS.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python bench/worker_throughput.py [--dataset taobao]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.admin import ensure_topics  # noqa: E402
from streams.replay import replay  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.sources.datasets import load  # noqa: E402
from tests.integration.harness import WorkerProcess, isolated_env, settings_of  # noqa: E402


async def count_outputs(settings: Settings, topic: str, n: int, timeout: float) -> tuple[float, float, int]:
    """Wall-clock times of the first and last of ``n`` records on ``topic``."""
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_options(), enable_auto_commit=False, max_poll_records=10000
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, first, last = 0, 0.0, 0.0
        deadline = time.monotonic() + timeout
        while seen < n and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            got = sum(len(r) for r in batch.values())
            if got:
                now = time.time()
                first = first or now
                last = now
                seen += got
        return first, last, seen
    finally:
        await consumer.stop()


async def transport_loop(settings: Settings, out_topic: str, n: int) -> None:
    """The ceiling: consume the inputs and produce one record per event, nothing else."""
    consumer = AIOKafkaConsumer(
        *settings.input_topics,
        **settings.kafka_client_options(),
        group_id=f"bench-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        max_poll_records=10000,
        fetch_max_wait_ms=100,
    )
    producer = AIOKafkaProducer(**settings.kafka_client_options(), linger_ms=2)
    await consumer.start()
    await producer.start()
    try:
        done = 0
        while done < n:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    await producer.send(out_topic, r.value, key=r.key)
                    done += 1
        await producer.flush()
    finally:
        await consumer.stop()
        await producer.stop()


def cpu_times(stat: Path) -> tuple[float, float]:
    """User and system CPU seconds from a ``/proc/PID/stat`` or ``/proc/PID/task/TID/stat`` file."""
    fields = stat.read_text().rsplit(")", 1)[1].split()  # field 3 of proc(5) onwards
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds (user+system) and peak RSS in bytes of a live process."""
    cpu = sum(cpu_times(Path(f"/proc/{pid}/stat")))
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu, peak


async def record(pid: int, out: str, after: float, seconds: float, rate: int = 100) -> None:
    """``py-spy record`` of ``pid`` (py-spy on PATH) for ``seconds`` at ``rate`` Hz, ``after``
    seconds from now (.txt: collapsed stacks, else speedscope JSON)."""
    await asyncio.sleep(after)
    fmt = "raw" if out.endswith(".txt") else "speedscope"
    cmd = ["py-spy", "record", "-r", str(rate), "-d", str(max(1, int(seconds))), "-f", fmt, "-o", out]
    spy = await asyncio.create_subprocess_exec(*cmd, "-p", str(pid), stdout=asyncio.subprocess.DEVNULL)
    await spy.wait()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="taobao")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--model", type=Path, help="exported model folder the worker serves (default: none)")
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy record with py-spy (.txt: collapsed stacks; else speedscope JSON)",
    )
    ap.add_argument("--profile-s", type=int, default=10, help="seconds to record")
    args = ap.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"shopstream-bench-{uuid.uuid4().hex[:6]}"
    model = {}
    if args.model:
        model = {"SHOPSTREAM_MODEL_DIR": str(args.model), "SHOPSTREAM_INFERENCE_PROVIDER": "cpu"}
    env = isolated_env(bootstrap, work, SHOPSTREAM_PARTITIONS=str(args.partitions), **model)
    settings = settings_of(env)
    await ensure_topics(settings)
    events = list(load(args.dataset, settings.datasets_dir))
    if args.limit:
        events = events[: args.limit]
    n, secs = await replay(settings, events, progress=False)
    print(f"input: {n} {args.dataset} events published in {secs:.1f}s, {settings.partitions} partitions")
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, broker {bootstrap}")

    ceiling_topic = f"{settings.topic_recommendations}.transport"
    await ensure_topics(settings, [ceiling_topic])
    t0 = time.time()
    loop_task = asyncio.create_task(transport_loop(settings, ceiling_topic, n))
    first, last, seen = await count_outputs(settings, ceiling_topic, n, timeout=600)
    await loop_task
    ceiling = (seen - 1) / max(last - first, 1e-9)
    print(f"(a) transport ceiling  : {ceiling:9.0f} events/s  ({seen} outputs, start {first - t0:.1f}s)")

    t0 = time.time()
    worker = WorkerProcess(env, work / "worker.log").start()
    assert worker.proc is not None
    spy = None
    if args.profile:  # attach once the worker has joined and is busy: 10 s of steady state
        spy = asyncio.create_task(record(worker.proc.pid, args.profile, 12, args.profile_s, rate=200))
    try:
        first, last, seen = await count_outputs(settings, settings.topic_recommendations, n, timeout=900)
        cpu, peak = proc_stats(worker.proc.pid)
        if spy is not None:
            await spy
    finally:
        worker.stop()
    rate = (seen - 1) / max(last - first, 1e-9)
    print(
        f"(b) shopstream worker  : {rate:9.0f} events/s  ({seen} outputs, first after {first - t0:.1f}s"
        f" of start-up and group join)"
    )
    print(
        f"    worker CPU {cpu:.1f}s = {cpu * 1e6 / max(seen, 1):.0f} us/event, peak RSS "
        f"{peak / 2**20:.0f} MiB; ratio to (a) {rate / ceiling:.2f}"
    )
    print(f"    bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
