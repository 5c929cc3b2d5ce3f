"""The worker against its limits, side by side in one run, on the same broker and input.

Publishes a real data set (default: the Taobao time slice, keyed by user) to fresh topics, then
drains the same backlog four times and reports events/s (first to last output) and CPU per event:
  (a) transport ceiling: a bare aiokafka consume -> produce loop, no work;
  (b) work ceiling: a minimal aiokafka loop running the worker's own per-batch work
      (``streams.pipeline``: fold state, baseline, onnxruntime top-K in micro-batches, filters,
      promotion policy) on in-memory tables, no faust, no changelogs;
  (c) typical faust: ``bench/typical_faust.py``, one agent with a Table, onnxruntime at batch 1 and
      a per-event ``await topic.send`` (what a straightforward faust app does);
  (d) the shopstream worker (faust, two hops, three changelogged tables, micro-batching).
It prints the worker's ratio to (b) and to (c).

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python bench/ceilings.py --model artifacts/taobao-slice
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from pipeline_cost import build  # noqa: E402
from worker_throughput import count_outputs, proc_stats, transport_loop  # noqa: E402

from streams.admin import ensure_topics  # noqa: E402
from streams.pipeline import Message  # noqa: E402
from streams.replay import replay  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.sources.datasets import load  # noqa: E402
from tests.integration.harness import WorkerProcess, free_port, isolated_env, settings_of  # noqa: E402


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


async def run_worker(
    settings: Settings, env: dict[str, str], topic: str, n: int, log: Path, processes: int = 1
) -> tuple[float, float]:
    """``processes`` workers in one consumer group drain the backlog; CPU is summed over them."""
    await ensure_topics(settings_of(env))
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
    try:
        first, last, seen = await count_outputs(settings, topic, n, timeout=1800)
        cpu = sum(proc_stats(p.proc.pid)[0] for p in procs if p.proc is not None)
    finally:
        for p in procs:
            p.stop()
    return (seen - 1) / max(last - first, 1e-9), cpu * 1e6 / max(seen, 1)


def variant(env: dict[str, str], work: Path, name: str, **extra: str) -> dict[str, str]:
    """The worker's env with its own group, state and output topics, on the same input topics."""
    out = {**env, "SHOPSTREAM_APP_ID": f"{env['SHOPSTREAM_APP_ID']}-{name}", **extra}
    out["SHOPSTREAM_DATA_DIR"] = str(work / name)
    for t in ("RECOMMENDATIONS", "PROMOTIONS", "DEADLETTER", "EVENTS_BY_USER"):
        out[f"SHOPSTREAM_TOPIC_{t}"] = f"{env[f'SHOPSTREAM_TOPIC_{t}']}.{name}"
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--dataset", default="taobao")
    ap.add_argument("--limit", type=int, default=30000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--processes", type=int, default=2, help="workers in one group for the scaling line")
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
    events = list(load(args.dataset, settings.datasets_dir))[: args.limit]
    n, secs = await replay(settings, events, progress=False)
    print(
        f"input: {n} {args.dataset} events in {secs:.1f}s, {args.partitions} partitions, model {args.model}"
    )
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, broker {bootstrap}")
    rates: dict[str, tuple[float, float]] = {}

    topic = f"{settings.topic_recommendations}.transport"
    await ensure_topics(settings, [topic])
    cpu0 = self_cpu()
    task = asyncio.create_task(transport_loop(settings, topic, n))
    first, last, seen = await count_outputs(settings, topic, n, timeout=600)
    await task
    rates["a"] = ((seen - 1) / max(last - first, 1e-9), (self_cpu() - cpu0) * 1e6 / max(seen, 1))

    topic = f"{settings.topic_recommendations}.work"
    await ensure_topics(settings, [topic])
    cpu0 = self_cpu()
    task = asyncio.create_task(work_loop(settings, topic, n, args.batch))
    first, last, seen = await count_outputs(settings, topic, n, timeout=1800)
    await task
    rates["b"] = ((seen - 1) / max(last - first, 1e-9), (self_cpu() - cpu0) * 1e6 / max(seen, 1))

    topic = f"{settings.topic_recommendations}.typical"
    await ensure_topics(settings, [topic])
    typical_env = {**env, "SHOPSTREAM_TOPIC_RECOMMENDATIONS": topic}
    argv = [sys.executable, str(ROOT / "bench" / "typical_faust.py"), "worker", "-l", "info"]
    rates["c"] = await run_typical(settings, typical_env, argv, topic, n, work / "typical.log")

    rates["d"] = await run_worker(settings, env, settings.topic_recommendations, n, work / "worker.log")
    group = variant(env, work, "group")
    rates["f"] = await run_worker(
        settings, group, group["SHOPSTREAM_TOPIC_RECOMMENDATIONS"], n, work / "group.log", args.processes
    )

    names = {
        "a": "(a) transport ceiling (aiokafka, no work)",
        "b": f"(b) work ceiling (aiokafka + pipeline, batch {args.batch})",
        "c": "(c) typical faust agent (Table, ONNX batch 1)",
        "d": f"(d) shopstream worker (batch {args.batch}, default)",
        "f": f"(f) {args.processes} shopstream workers in one group",
    }
    for k, (rate, cpu) in rates.items():
        print(
            f"{names[k]:<52}: {rate:8.0f} events/s  {cpu:6.0f} us CPU/event (incl. bench overhead for a, b)"
        )
    for k in ("d",):
        w = rates[k][0]
        print(
            f"{k}: worker / work ceiling = {w / rates['b'][0]:.2f} (target >= 0.40); "
            f"worker / typical faust = {w / rates['c'][0]:.2f} (target >= 2)"
        )
    print(
        f"f: {args.processes} workers / 1 worker = {rates['f'][0] / rates['d'][0]:.2f} "
        f"on {os.cpu_count()} cores (the broker and this script share them)"
    )


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


async def run_typical(
    settings: Settings, env: dict[str, str], argv: list[str], topic: str, n: int, log: Path
) -> tuple[float, float]:
    proc = spawn(argv, env, log)
    try:
        counting = asyncio.create_task(count_outputs(settings, topic, n, timeout=1800))
        while not counting.done():
            if proc.poll() is not None:
                counting.cancel()
                raise RuntimeError(f"{argv[1]} exited with {proc.returncode}: see {log}")
            await asyncio.sleep(1)
        first, last, seen = counting.result()
        cpu, _ = proc_stats(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return (seen - 1) / max(last - first, 1e-9), cpu * 1e6 / max(seen, 1)


if __name__ == "__main__":
    asyncio.run(main())
