"""The worker with the ONNX model on the hot path: micro-batching on versus off, in one run.

For each batch setting (``SHOPSTREAM_BATCH_MAX``; 1 = off), a fresh worker on fresh topics:
  1. start-up and group join, then one warm-up event answered (excluded from the figures);
  2. max rate: a real data set (default the Taobao time slice, 96,168 events) published as fast
     as the producer can; reports sustained events/s (first input to last recommendation), and
     p50/p99 event-to-recommendation latency (output minus input Kafka timestamps; at max rate
     this is mostly time spent queued behind the backlog);
  3. fixed rate (``--rate``, below capacity): latency when the worker keeps up.
Also: the worker's CPU per event, peak RSS, and how many events the model scored (the rest went
to the baseline: unknown items or cold users).

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python bench/model_batching.py --model DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from worker_throughput import proc_stats  # noqa: E402

from streams.admin import ensure_topics  # noqa: E402
from streams.replay import rebase  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.sources.datasets import load  # noqa: E402
from tests.integration.harness import WorkerProcess, isolated_env, settings_of  # noqa: E402


async def publish(settings: Settings, events: list[dict[str, Any]], rate: float | None) -> dict[str, float]:
    """Send events (at ``rate`` events/s, or as fast as possible); returns event_id -> send time."""
    producer = AIOKafkaProducer(**settings.kafka_client_options(), linger_ms=5, max_batch_size=262144)
    await producer.start()
    topic_of = {etype: topic for topic, etype in settings.input_topics.items()}
    sent: dict[str, float] = {}
    try:
        start = time.perf_counter()
        for i, ev in enumerate(events):
            if rate and i % 10 == 0:
                ahead = i / rate - (time.perf_counter() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await producer.send(topic_of[ev["type"]], orjson.dumps(ev), key=ev["user_id"].encode())
            sent[ev["event_id"]] = time.time()
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def answers(settings: Settings, wanted: set[str], timeout: float) -> dict[str, tuple[float, str]]:
    """event_id -> (Kafka timestamp of its first recommendation, source), until all are answered."""
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_options(), enable_auto_commit=False, max_poll_records=10000
    )
    await consumer.start()
    out: dict[str, tuple[float, str]] = {}
    try:
        tps = [TopicPartition(settings.topic_recommendations, p) for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while len(out) < len(wanted) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    rec = orjson.loads(r.value or b"{}")
                    eid = rec.get("event_id")
                    if eid in wanted and eid not in out:
                        out[eid] = (r.timestamp / 1000, rec["source"])
    finally:
        await consumer.stop()
    return out


async def input_times(settings: Settings) -> dict[str, float]:
    """event_id -> Kafka timestamp of the input record (what the latency is measured from)."""
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_options(), enable_auto_commit=False, max_poll_records=10000
    )
    await consumer.start()
    out: dict[str, float] = {}
    try:
        await consumer._client.force_metadata_update()
        tps = [
            TopicPartition(t, p)
            for t in settings.input_topics
            for p in consumer.partitions_for_topic(t) or ()
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    out[orjson.loads(r.value or b"{}")["event_id"]] = r.timestamp / 1000
    finally:
        await consumer.stop()
    return out


async def run_mode(args: argparse.Namespace, batch: int, events: list[dict[str, Any]]) -> dict[str, Any]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"shopstream-bench-{uuid.uuid4().hex[:6]}"
    env = isolated_env(
        bootstrap,
        work,
        SHOPSTREAM_PARTITIONS=str(args.partitions),
        SHOPSTREAM_MODEL_DIR=str(args.model),
        SHOPSTREAM_BATCH_MAX=str(batch),
        SHOPSTREAM_BATCH_WAIT_MS=str(args.wait_ms),
        SHOPSTREAM_INFERENCE_PROVIDER=args.provider,
    )
    settings = settings_of(env)
    await ensure_topics(settings)
    worker = WorkerProcess(env, work / "worker.log").start()
    assert worker.proc is not None
    result: dict[str, Any] = {"batch": batch}
    try:
        t0 = time.time()
        warm = [dict(events[0], event_id=f"warm-{uuid.uuid4().hex[:6]}")]
        await publish(settings, warm, None)
        await answers(settings, {warm[0]["event_id"]}, timeout=180)
        result["ready_s"] = time.time() - t0
        cpu0, _ = proc_stats(worker.proc.pid)
        for label, evs, rate in (("max", events, None), ("fixed", events[: args.fixed_events], args.rate)):
            evs = [dict(e, event_id=f"{label}-{e['event_id']}") for e in evs]
            rebase(evs, None, time.time())
            wanted = {e["event_id"] for e in evs}
            listener = asyncio.create_task(answers(settings, wanted, timeout=1800))
            await publish(settings, evs, rate)
            got = await listener
            sent = await input_times(settings)
            lat = np.array([got[e][0] - sent[e] for e in wanted if e in got and e in sent])
            first_in = min(sent[e] for e in wanted if e in sent)
            last_out = max(t for t, _ in got.values())
            cpu1, peak = proc_stats(worker.proc.pid)
            result[label] = {
                "events": len(evs),
                "answered": len(got),
                "events_per_s": len(got) / max(last_out - first_in, 1e-9),
                "p50_ms": float(np.percentile(lat, 50) * 1000),
                "p99_ms": float(np.percentile(lat, 99) * 1000),
                "model_share": sum(1 for _, s in got.values() if s == "model") / max(len(got), 1),
                "cpu_us_per_event": (cpu1 - cpu0) * 1e6 / max(len(got), 1),
                "peak_rss_mib": peak / 2**20,
            }
            cpu0 = cpu1
    finally:
        worker.stop()
    return result


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="exported model folder")
    ap.add_argument("--dataset", default="taobao")
    ap.add_argument("--limit", type=int, default=None, help="events of the data set (default: all)")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--batches", default="1,64", help="SHOPSTREAM_BATCH_MAX values to compare")
    ap.add_argument("--wait-ms", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=300.0, help="events/s of the fixed-rate phase")
    ap.add_argument("--fixed-events", type=int, default=9000, help="events of the fixed-rate phase")
    ap.add_argument("--provider", default="cpu", help="auto, cpu or cuda")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    manifest = json.loads((args.model / "manifest.json").read_text())
    settings = Settings()
    events = list(load(args.dataset, settings.datasets_dir))[: args.limit]
    print(
        f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; "
        f"model {manifest['model_version']} "
        f"({manifest['n_items']} items, max_len {manifest['max_len']}, top-{manifest['top_k']}); "
        f"{len(events)} {args.dataset} events, {args.partitions} partitions, provider {args.provider}"
    )
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        r = await run_mode(args, batch, events)
        results.append(r)
        name = "off" if batch == 1 else f"on (max {batch}, {args.wait_ms:g} ms)"
        print(f"micro-batching {name}: worker ready after {r['ready_s']:.1f}s")
        for label in ("max", "fixed"):
            m = r[label]
            rate = "max rate" if label == "max" else f"{args.rate:g}/s"
            print(
                f"  {rate:>9}: {m['events_per_s']:7.0f} events/s, latency p50 {m['p50_ms']:8.1f} ms "
                f"p99 {m['p99_ms']:8.1f} ms, {m['cpu_us_per_event']:5.0f} us CPU/event, "
                f"model scored {m['model_share']:.0%}, peak RSS {m['peak_rss_mib']:.0f} MiB "
                f"({m['answered']}/{m['events']} answered)"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
