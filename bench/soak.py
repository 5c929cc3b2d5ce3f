"""Soak: two workers in one group under a steady stream of real events while faults are injected.

Publishes a real data set at ``--rate`` events/s for ``--minutes``. Every ``--fault-every`` seconds
one fault, in turn: worker a killed with SIGKILL and restarted; worker b stopped (SIGTERM) and
started again; the recommendations topic refusing records for ``--refuse`` seconds (its
``max.message.bytes`` lowered: the workers exit with code 70, unacked); with ``--private-broker``,
its own broker stopped for ``--outage`` seconds (the publisher waits meanwhile, as a shop's
producer would retry). Every fault moves partitions (a rebalance). Like Kubernetes, the soak
restarts a worker that exited. At the end it waits for every event to be answered and prints the
fault tests' checks over all users (tests/integration/test_faults.py): every event answered,
tables equal to the recomputation, promotions equal to a one-by-one recomputation (none lost,
none with a reused id), every by-user record committed.

    python bench/soak.py --minutes 10 --private-broker
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.admin import ensure_topics
from streams.replay import rebase
from streams.settings import Settings
from streams.sources.datasets import Event, load
from tests.integration.harness import PrivateBroker, WorkerProcess, free_port, settings_of
from tests.integration.test_faults import (
    answer_all,
    demo_env,
    first_answers_ms,
    no_loss,
    set_topic_config,
)


async def publish(
    settings: Settings, events: list[Event], rate: float, until: float, up: asyncio.Event
) -> int:
    """Send events at ``rate``/s until the clock reaches ``until``; pauses while ``up`` is clear."""
    topic_of = {etype: topic for topic, etype in settings.input_topics.items()}
    producer = AIOKafkaProducer(**settings.kafka_client_options(), acks="all", linger_ms=5)
    await producer.start()
    sent, start = 0, time.monotonic()
    try:
        while time.monotonic() < until and sent < len(events):
            await up.wait()
            due = min(len(events), int((time.monotonic() - start) * rate))
            for ev in events[sent:due]:
                await producer.send(topic_of[ev["type"]], orjson.dumps(ev), key=ev["user_id"].encode())
            sent = max(sent, due)
            await asyncio.sleep(0.1)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="shopstream-soak-"))
    broker = PrivateBroker(work / "kafka") if args.private_broker else None
    if broker:
        broker.run("up")
    try:
        env = demo_env(broker.bootstrap if broker else args.bootstrap, work, SHOPSTREAM_STANDBY_REPLICAS="1")
        settings = settings_of(env)
        envs = {
            name: {**env, "SHOPSTREAM_DATA_DIR": str(work / name), "SHOPSTREAM_WEB_PORT": str(free_port())}
            for name in ("a", "b")
        }
        await ensure_topics(settings)
        events = list(load(args.dataset, settings.datasets_dir))[: int(args.rate * args.minutes * 60)]
        rebase(events, None, time.time())
        workers = {n: WorkerProcess(e, work / f"worker-{n}.log").start() for n, e in envs.items()}
        print(
            f"soak: {len(events)} {args.dataset} events, {args.rate}/s for {args.minutes} min; logs: {work}"
        )

        up = asyncio.Event()
        up.set()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        publisher = asyncio.create_task(publish(settings, events, args.rate, end, up))
        faults: list[str] = []
        exits: Counter[str] = Counter()
        kinds = ["kill", "stop", "refuse", *(["broker"] if broker else [])]
        next_fault, n_fault = t0 + args.fault_every, 0

        def supervise() -> None:
            for n, w in workers.items():
                if not w.alive():
                    exits[f"worker {n} exited {w.proc.returncode if w.proc else None}"] += 1
                    workers[n] = WorkerProcess(envs[n], work / f"worker-{n}.log").start()

        while time.monotonic() < end - 5:
            now = time.monotonic()
            if now >= next_fault:
                kind = kinds[n_fault % len(kinds)]
                if kind == "kill":
                    workers["a"].stop(signal.SIGKILL)
                    workers["a"] = WorkerProcess(envs["a"], work / "worker-a.log").start()
                    faults.append(f"{now - t0:.0f}s a: kill -9 + restart")
                elif kind == "stop":
                    workers["b"].stop()
                    workers["b"] = WorkerProcess(envs["b"], work / "worker-b.log").start()
                    faults.append(f"{now - t0:.0f}s b: stop + start")
                elif kind == "refuse":
                    topic = settings.topic_recommendations
                    await set_topic_config(settings, topic, {"max.message.bytes": "200"})
                    await asyncio.sleep(args.refuse)
                    await set_topic_config(settings, topic, {"max.message.bytes": "1048588"})
                    faults.append(f"{now - t0:.0f}s recommendations refused {args.refuse:.0f}s")
                elif broker is not None:
                    up.clear()
                    broker.run("down")
                    await asyncio.sleep(args.outage)
                    broker.run("up")
                    up.set()
                    faults.append(f"{now - t0:.0f}s broker down {args.outage:.0f}s")
                n_fault += 1
                next_fault += args.fault_every
            supervise()
            await asyncio.sleep(0.5)
        sent = await publisher
        published = time.time()
        wanted = {e["event_id"] for e in events[:sent]}
        recs = await answer_all(settings, wanted, timeout=600)
        supervise()
        drained = max(0.0, max(first_answers_ms(recs).values()) / 1000 - published)
        ports = [int(e["SHOPSTREAM_WEB_PORT"]) for e in envs.values()]
        checks = await no_loss(settings, wanted, recs, ports, sample=None)
        print(f"faults ({len(faults)}): {'; '.join(faults) or 'none'}")
        print(f"worker exits seen by the supervisor: {dict(exits) or 'none'}")
        print(f"{len(wanted)} events published; all answered {drained:.1f}s after the last was published")
        print(checks.summary())
        for problem in checks.problems():
            print(f"PROBLEM: {problem}")
        for w in workers.values():
            w.stop()
        return 1 if checks.problems() else 0
    finally:
        if broker:
            broker.run("down")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=40.0, help="events per second")
    p.add_argument("--dataset", default="rees46", help="rees46 (17k real events), rees46-demo, taobao, ...")
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    p.add_argument("--refuse", type=float, default=10.0, help="seconds the output topic refuses records")
    p.add_argument("--private-broker", action="store_true", help="own broker (deploy/kafka/local-kafka.sh)")
    p.add_argument("--outage", type=float, default=20.0, help="seconds the broker stays down")
    p.add_argument("--bootstrap", default="127.0.0.1:9092", help="broker to use without --private-broker")
    sys.exit(asyncio.run(main(p.parse_args())))
