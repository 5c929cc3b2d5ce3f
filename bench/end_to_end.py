"""End to end: the real worker against the real broker, at max rate and at fixed rates.

A long stream is built from real events: the data set (default the Taobao time slice) repeated
``--repeat`` times, each copy with fresh event ids and its times shifted past the previous copy, so
users' histories continue. One worker (fresh topics, the model from ``--model``) then sees:
  1. max rate: the whole stream published as fast as the producer can; sustained events/s from
     the first input to the last recommendation;
  2. fixed rates (``--rates``, default 500, 2000, 5000 events/s), ``--fixed-events`` each, on the
     state the max-rate phase left: achieved events/s and p50/p95/p99 latency from the input's
     Kafka timestamp to the recommendation's, and whether the worker kept up.
Per phase also the worker's CPU per event and peak RSS, and from its /metrics the events per
model call, the wall time per call and per checkpoint. ``--profile FILE`` records the worker with
py-spy through the first fixed-rate phase, ``--profile-max FILE`` through 20 s of the max-rate
phase (py-spy takes CPU: a recorded phase's figures are not comparable with a run without it).

``--workers N`` runs N workers in one group instead (each with its own data folder and port;
their CPU, peak RSS and metrics summed; py-spy records the first); ``--provider cuda`` scores on
a GPU; ``--timeline FILE`` writes each fixed-rate event's input time and latency, to find when
the slow ones came. Under the table, each fixed-rate phase's slowest events (above 0.9 of its
p99): in how many episodes, and how crowded they are in the commit interval (``tail_shape``).

Timestamps (``--timestamps``): ``append`` (default) sets the input topics and the recommendations
topic to ``message.timestamp.type=LogAppendTime``, so the latency runs from the broker's append of
the event to its append of the recommendation: what the worker adds. The p99 from the load
generator's ``send()`` call is printed beside it; on a 2-core machine where the generator shares
the cores with the broker and the worker, the generator's own stalls (its event loop held up, its
records sent late) would otherwise count as the worker's. ``create``: the producers' timestamps, as
before (the input's is the generator's ``send()``, event times are rebased to it).

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python bench/end_to_end.py --model artifacts/taobao-slice
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from model_batching import answers, input_times, publish  # noqa: E402
from worker_throughput import proc_stats, record  # noqa: E402

from streams.admin import ensure_topics  # noqa: E402
from streams.replay import rebase  # noqa: E402
from streams.sources.datasets import load  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    WorkerProcess,
    free_port,
    get_json,
    isolated_env,
    settings_of,
)


def long_stream(events: list[dict[str, Any]], repeat: int) -> list[dict[str, Any]]:
    """``repeat`` copies of ``events`` back to back in event time, each with fresh event ids."""
    t = [datetime.fromisoformat(e["event_time"]) for e in events]
    span = max(t) - min(t) + timedelta(seconds=1)
    out = []
    for k in range(repeat):
        for e, when in zip(events, t, strict=True):
            out.append(dict(e, event_id=f"r{k}-{e['event_id']}", event_time=(when + k * span).isoformat()))
    return out


async def phase(
    settings: Any,
    workers: list[tuple[WorkerProcess, int]],
    label: str,
    evs: list[dict[str, Any]],
    rate: float | None,
    profile: str | None = None,
) -> dict[str, Any]:
    pids = [w.proc.pid for w, _ in workers if w.proc is not None]
    assert len(pids) == len(workers)
    cpu0 = sum(proc_stats(pid)[0] for pid in pids)
    m0 = await scrape_all(workers)
    spy = None
    if profile:  # py-spy over the middle of the phase: from 2 s in, 0.8 of its span (max rate: 20 s)
        span = 0.8 * len(evs) / rate if rate else 20.0
        spy = asyncio.create_task(record(pids[0], profile, 2.0 if rate else 5.0, span))
    evs = [dict(e, event_id=f"{label}-{e['event_id']}") for e in evs]
    rebase(evs, None, time.time())
    wanted = {e["event_id"] for e in evs}
    listener = asyncio.create_task(answers(settings, wanted, timeout=3600))
    called = await publish(settings, evs, rate)  # event_id -> when the generator called send()
    got = await listener
    sent = await input_times(settings)
    lat = np.array([got[e][0] - sent[e] for e in wanted if e in got and e in sent])
    from_call = np.array([got[e][0] - called[e] for e in wanted if e in got and e in called])
    first_in = min(sent[e] for e in wanted if e in sent)
    last_in = max(sent[e] for e in wanted if e in sent)
    last_out = max(t for t, _ in got.values())
    ends = [proc_stats(pid) for pid in pids]
    cpu1, peak = sum(c for c, _ in ends), sum(rss for _, rss in ends)
    if spy is not None:
        await spy
    m1 = await scrape_all(workers)
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
    calls = max(d.get("shopstream_inference_batch_size_count", 0.0), 1.0)
    checkpoints = max(d.get("shopstream_checkpoint_seconds_count", 0.0), 1.0)
    return {
        "phase": label,
        "events": len(evs),
        "answered": len(got),
        "offered": len(evs) / max(last_in - first_in, 1e-9),
        "achieved": len(got) / max(last_out - first_in, 1e-9),
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "p99_call": float(np.percentile(from_call, 99)),
        "timeline": sorted((sent[e], got[e][0] - sent[e]) for e in wanted if e in got and e in sent),
        "cpu_us": (cpu1 - cpu0) * 1e6 / max(len(got), 1),
        "rss_mib": peak / 2**20,
        "batch": d.get("shopstream_inference_batch_size_sum", 0.0) / calls,
        "call_ms": d.get("shopstream_inference_seconds_sum", 0.0) * 1000 / calls,
        "checkpoint_ms": d.get("shopstream_checkpoint_seconds_sum", 0.0) * 1000 / checkpoints,
        # absent from workers that write their checkpoints under the lock (before 2026-12-04)
        "write_ms": d.get("shopstream_checkpoint_write_seconds_sum", 0.0) * 1000 / checkpoints,
    }


async def scrape_all(workers: list[tuple[WorkerProcess, int]]) -> dict[str, float]:
    """The workers' /metrics summed."""
    total: dict[str, float] = {}
    for _, port in workers:
        for k, v in (await asyncio.to_thread(scrape, port)).items():
            total[k] = total.get(k, 0.0) + v
    return total


async def wait_ready(workers: list[tuple[WorkerProcess, int]], timeout: float = 300.0) -> None:
    """Until every worker's /readyz answers 200 (assigned, recovered, model loaded) at once: one
    that joins later rebalances the group, and the others are not ready again until it settles."""
    deadline = time.monotonic() + timeout
    while not all(
        [
            (await asyncio.to_thread(get_json, f"http://127.0.0.1:{port}/readyz", 5.0))[0] == 200
            for _, port in workers
        ]
    ):
        for w, _ in workers:
            if not w.alive():
                raise SystemExit(f"a worker exited during start:\n{w.tail()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"workers not ready after {timeout:.0f}s:\n{workers[0][0].tail()}")
        await asyncio.sleep(0.5)


def scrape(port: int) -> dict[str, float]:
    """The worker's /metrics: each unlabelled sample (histograms' _sum and _count among them)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def tail_shape(timeline: list[tuple[float, float]], period: float, gap: float = 0.3) -> dict[str, Any]:
    """Where a phase's slowest events fell: those above 0.9 of its p99 (``slow``), in how many
    episodes (slow events less than ``gap`` s apart belong to one), and the largest share of
    them in one tenth of ``period`` (the commit interval) when their input times are folded on
    it (``crowded``: 0.1 when they spread evenly, 1.0 when every one falls in the same tenth)."""
    if not timeline:
        return {"slow": 0, "episodes": 0, "crowded": 0.0}
    times = np.array([t for t, _ in timeline])
    lat = np.array([x for _, x in timeline])
    slow = np.sort(times[lat > 0.9 * np.percentile(lat, 99)])
    if len(slow) == 0:
        return {"slow": 0, "episodes": 0, "crowded": 0.0}
    episodes = 1 + int((np.diff(slow) > gap).sum())
    tenths = np.floor(((slow - times.min()) % period) / period * 10).astype(int)
    crowded = float(np.bincount(np.minimum(tenths, 9), minlength=10).max() / len(slow))
    return {"slow": len(slow), "episodes": episodes, "crowded": crowded}


def fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="exported model folder")
    ap.add_argument("--dataset", default="taobao")
    ap.add_argument("--repeat", type=int, default=2, help="copies of the data set in the long stream")
    ap.add_argument("--rates", default="500,2000,5000", help="events/s of the fixed-rate phases")
    ap.add_argument("--fixed-events", type=int, default=10000, help="events per fixed-rate phase")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument(
        "--workers", type=int, default=1, help="workers in the group (CPU, RSS and metrics summed)"
    )
    ap.add_argument("--provider", default="cpu", help="the worker's onnxruntime provider: auto, cpu or cuda")
    ap.add_argument(
        "--timestamps",
        choices=("append", "create"),
        default="append",
        help="latency between the broker's appends (LogAppendTime) or the producers' timestamps",
    )
    ap.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy record the worker (100 Hz) during the first fixed-rate phase (.txt: collapsed "
        "stacks; else speedscope JSON; py-spy on PATH)",
    )
    ap.add_argument("--profile-max", metavar="FILE", help="the same for 20 s of the max-rate phase")
    ap.add_argument(
        "--timeline",
        type=Path,
        metavar="FILE",
        help="write each fixed-rate event's input time (unix s) and latency (s), a CSV line each",
    )
    args = ap.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"shopstream-e2e-{uuid.uuid4().hex[:6]}"
    env = isolated_env(
        bootstrap,
        work,
        SHOPSTREAM_PARTITIONS=str(args.partitions),
        SHOPSTREAM_MODEL_DIR=str(args.model),
        SHOPSTREAM_INFERENCE_PROVIDER=args.provider,
    )
    settings = settings_of(env)
    await ensure_topics(settings)
    if args.timestamps == "append":
        await log_append_time(settings, [*settings.input_topics, settings.topic_recommendations])
    base = list(load(args.dataset, settings.datasets_dir))
    stream = long_stream(base, args.repeat)
    print(
        f"stream: {len(stream)} events ({args.repeat} x {args.dataset}, {len(base)} events), "
        f"{args.partitions} partitions, model {args.model}"
    )
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, broker {bootstrap}")
    workers = []  # the first on the settings' port and data folder, the others on their own
    for i in range(args.workers):
        own = (
            {"SHOPSTREAM_DATA_DIR": str(work / f"data-{i}"), "SHOPSTREAM_WEB_PORT": str(free_port())}
            if i
            else {}
        )
        port = int(own.get("SHOPSTREAM_WEB_PORT", settings.web_port))
        workers.append((WorkerProcess({**env, **own}, work / f"worker-{i}.log").start(), port))
    rows = []
    try:
        t0 = time.time()
        await wait_ready(workers)
        await publish(settings, [dict(base[0], event_id="warm-up")], None)
        await answers(settings, {"warm-up"}, timeout=300)
        print(f"{len(workers)} worker(s) ready and warm after {time.time() - t0:.1f}s")
        rows.append(await phase(settings, workers, "max", stream, None, args.profile_max))
        tail = stream[-args.fixed_events :]
        for i, rate in enumerate(float(r) for r in args.rates.split(",")):
            spy = args.profile if i == 0 else None
            rows.append(await phase(settings, workers, f"{rate:.0f}/s", tail, rate, spy))
    finally:
        for w, _ in workers:
            w.stop()
    if args.timeline:
        with args.timeline.open("w") as out:
            out.write("phase,input_time,latency_s\n")
            for r in rows[1:]:
                out.writelines(f"{r['phase']},{t:.6f},{lat:.6f}\n" for t, lat in r["timeline"])
    print()
    print(
        "| phase | events | offered ev/s | achieved ev/s | p50 | p95 | p99 | p99 from send() | "
        "CPU us/event | peak RSS | events per model call | ms per call | ms per checkpoint (locked / "
        "writing) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['phase']} | {r['answered']}/{r['events']} | {r['offered']:.0f} | {r['achieved']:.0f} | "
            f"{fmt_s(r['p50'])} | {fmt_s(r['p95'])} | {fmt_s(r['p99'])} | {fmt_s(r['p99_call'])} | "
            f"{r['cpu_us']:.0f} | {r['rss_mib']:.0f} MiB | {r['batch']:.1f} | {r['call_ms']:.1f} | "
            f"{r['checkpoint_ms']:.0f} / {r['write_ms']:.0f} |"
        )
    for r in rows[1:]:
        shape = tail_shape(r["timeline"], settings.commit_interval_s)
        print(
            f"{r['phase']}: {shape['slow']} events above 0.9 of the p99, in {shape['episodes']} "
            f"episode(s); the most crowded tenth of the {settings.commit_interval_s:g} s commit "
            f"interval holds {shape['crowded']:.0%} of them (10 % if spread evenly)"
        )
    clock = "broker append times (LogAppendTime)" if args.timestamps == "append" else "producer timestamps"
    print(f"latency: recommendation's Kafka timestamp minus the input's, {clock}; 'from send()': from")
    print("the load generator's send() call. At max rate it is time queued behind the backlog. A fixed")
    print("rate above capacity shows as achieved < offered and growing latency.")


async def log_append_time(settings: Any, topics: list[str]) -> None:
    """Have the broker stamp ``topics``' records with its append time."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from streams.admin import connect_admin

    admin = await connect_admin(settings)
    try:
        await admin.alter_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, t, {"message.timestamp.type": "LogAppendTime"})
                for t in topics
            ]
        )
    finally:
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
