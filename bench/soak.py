"""Soak: a worker under a steady stream of real events while faults are injected on a schedule.

Publishes a real data set at ``--rate`` events/s for ``--minutes``, kills a worker with SIGKILL and
restarts it every ``--kill-every`` seconds and, with ``--private-broker``, stops its own broker for
``--outage`` seconds every ``--broker-every`` seconds (the publisher waits meanwhile, as a shop's
producer would retry). At the end it waits for every event to be answered and prints the fault
tests' no-loss checks over all users (tests/integration/test_faults.py).

    python bench/soak.py --minutes 3 --private-broker --broker-every 75
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.admin import ensure_topics
from streams.replay import rebase
from streams.settings import Settings
from streams.sources.datasets import Event, load
from tests.integration.harness import WorkerProcess, settings_of
from tests.integration.test_faults import (
    PrivateBroker,
    answer_all,
    demo_env,
    first_answers_ms,
    no_loss,
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
        env = demo_env(broker.bootstrap if broker else args.bootstrap, work)
        settings = settings_of(env)
        await ensure_topics(settings)
        events = list(load(args.dataset, settings.datasets_dir))[: int(args.rate * args.minutes * 60)]
        rebase(events, None, time.time())
        worker = WorkerProcess(env, work / "worker.log").start()
        print(
            f"soak: {len(events)} {args.dataset} events, {args.rate}/s for {args.minutes} min; logs: {work}"
        )

        up = asyncio.Event()
        up.set()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        publisher = asyncio.create_task(publish(settings, events, args.rate, end, up))
        faults: list[str] = []
        next_kill, next_outage = t0 + args.kill_every, t0 + (args.broker_every or 1e9)
        while time.monotonic() < end - 5:
            now = time.monotonic()
            if now >= next_kill:
                worker.stop(signal.SIGKILL)
                worker = WorkerProcess(env, work / "worker.log").start()
                faults.append(f"{now - t0:.0f}s kill -9 + restart")
                next_kill += args.kill_every
            elif broker and now >= next_outage:
                up.clear()
                broker.run("down")
                await asyncio.sleep(args.outage)
                broker.run("up")
                up.set()
                faults.append(f"{now - t0:.0f}s broker down {args.outage:.0f}s")
                next_outage += args.broker_every
            assert worker.alive(), worker.tail()
            await asyncio.sleep(0.5)
        sent = await publisher
        published = time.time()
        wanted = {e["event_id"] for e in events[:sent]}
        recs = await answer_all(settings, wanted, timeout=300, worker=worker)
        drained = max(0.0, max(first_answers_ms(recs).values()) / 1000 - published)
        checks = await no_loss(settings, wanted, recs, [settings.web_port], sample=None)
        print(f"faults: {'; '.join(faults) or 'none'}")
        print(f"all answered {drained:.1f}s after the last event was published")
        print(checks.summary())
        for problem in checks.problems():
            print(f"PROBLEM: {problem}")
        worker.stop()
        return 1 if checks.problems() else 0
    finally:
        if broker:
            broker.run("down")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=40.0, help="events per second")
    p.add_argument("--dataset", default="rees46", help="rees46 (17k real events), rees46-demo, taobao, ...")
    p.add_argument("--kill-every", type=float, default=45.0, help="seconds between kill -9 + restart")
    p.add_argument("--private-broker", action="store_true", help="own broker (deploy/kafka/local-kafka.sh)")
    p.add_argument("--broker-every", type=float, default=0.0, help="seconds between broker stops (0: none)")
    p.add_argument("--outage", type=float, default=20.0, help="seconds the broker stays down")
    p.add_argument("--bootstrap", default="127.0.0.1:9092", help="broker to use without --private-broker")
    sys.exit(asyncio.run(main(p.parse_args())))
