"""``shopstream demo``: the main job on a local default, start to finish.

Local Kafka up -> topics -> a worker process serving the shipped demo model
(``deploy/demo/model``, trained on the same REES46 sample: ``shopstream train --data rees46-demo``)
-> the sample replayed -> the recommendations and promotions it produced printed -> worker stopped
(the broker keeps running).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer

from streams.admin import ensure_topics
from streams.errors import ShopstreamError
from streams.replay import replay
from streams.settings import Settings
from streams.sources.datasets import load
from streams.tail import end_offsets

DEMO_MODEL = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "model"


def run_demo(settings: Settings, *, kafka_script: Path, events: int) -> int:
    local = settings.kafka_bootstrap_servers.startswith(("127.0.0.1", "localhost"))
    if local and subprocess.call(["bash", str(kafka_script), "up"]) != 0:
        raise ShopstreamError("the local Kafka broker did not start (see the lines above)")
    asyncio.run(ensure_topics(settings))
    print(f"== starting a worker (log: {settings.data_dir / 'worker.log'})", flush=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log = (settings.data_dir / "worker.log").open("ab")
    env = os.environ.copy()
    model = settings.model_dir or (DEMO_MODEL if (DEMO_MODEL / "manifest.json").exists() else None)
    if model is not None:
        env["SHOPSTREAM_MODEL_DIR"] = str(model)
        print(f"== model: {model}", flush=True)
    if "SHOPSTREAM_QUIET_HOURS" not in env:  # the sample is rebased to now, which may be night
        env["SHOPSTREAM_QUIET_HOURS"] = ""
        print(f"== quiet hours off for the demo (SHOPSTREAM_QUIET_HOURS, default {settings.quiet_hours})")
    worker = subprocess.Popen([sys.executable, "-m", "streams", "worker"], stdout=log, stderr=log, env=env)
    try:
        return asyncio.run(_replay_and_show(settings, events, worker))
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        print("== worker stopped; the broker is still up (`shopstream kafka down` stops it)")
        hint = path_hint()
        if hint:
            print(hint)


def path_hint() -> str | None:
    """The line that puts this ``shopstream`` on the PATH, when the shell would not find it (the
    demo script installs into a virtualenv under the cache folder): the commands the demo
    suggests then work as printed."""
    here = Path(sys.executable).parent
    found = shutil.which("shopstream")
    if found and Path(found).resolve() == (here / "shopstream").resolve():
        return None
    return f"== to run the commands above in this shell: export PATH={here}:$PATH"


async def _replay_and_show(settings: Settings, n: int, worker: subprocess.Popen[bytes]) -> int:
    topics = [settings.topic_recommendations, settings.topic_deadletter, settings.topic_promotions]
    start = {t: await end_offsets(settings, t) for t in topics}
    # a suffix per run on user and event ids: every run starts with fresh users (state and
    # promotion ids of earlier runs on the same broker would otherwise recognise the events)
    run = f"{int(time.time()) % 100000:05d}"
    print(f"== replaying {n} REES46 events (max rate) to the input topics, users as <id>.{run}", flush=True)
    events = list(load("rees46-demo", settings.datasets_dir))[:n]
    for ev in events:
        ev["user_id"] = f"{ev['user_id']}.{run}"
        ev["event_id"] = f"{ev['event_id']}.{run}"
    wanted = {ev["event_id"] for ev in events}
    sent, secs = await replay(settings, events, progress=False)
    print(f"   published {sent} events in {secs:.1f}s", flush=True)
    consumer = AIOKafkaConsumer(**settings.kafka_client_options(), enable_auto_commit=False)
    await consumer.start()
    answered: set[str] = set()
    recs = dead = shown = earlier = 0
    users: set[str] = set()
    sources: Counter[str] = Counter()
    promotions: list[dict[str, object]] = []
    t0 = time.time()
    try:
        parts = [tp for t in topics for tp in start[t]]
        consumer.assign(parts)
        for t in topics:
            for tp, off in start[t].items():
                consumer.seek(tp, off)
        print("== recommendations (user <- event: top items)", flush=True)
        # after the last answer, wait a few cart-timer ticks for promotions that come due
        settle = settings.promotion_tick_s * 2 + 2
        done_at: float | None = None
        while (done_at is None or time.time() - done_at < settle) and time.time() - t0 < 180:
            if done_at is None and len(answered) >= len(wanted):
                done_at = time.time()
            if worker.poll() is not None:
                raise ShopstreamError(f"the worker exited with {worker.returncode}; see its log")
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, records in batch.items():
                for r in records:
                    if tp.topic == settings.topic_deadletter:
                        dead += 1
                        continue
                    rec = orjson.loads(r.value or b"{}")
                    if tp.topic == settings.topic_promotions:
                        if str(rec.get("user_id", "")).endswith(f".{run}"):
                            promotions.append(rec)
                        else:  # a cart left by an earlier run's user, restored and now due
                            earlier += 1
                        continue
                    if rec["event_id"] not in wanted:
                        continue  # an earlier run's output
                    recs += 1
                    answered.add(rec["event_id"])
                    users.add(rec["user_id"])
                    sources[rec["source"]] += 1
                    if shown < 10 and rec["items"] and (rec["source"] == "model" or shown >= 7):
                        top = ", ".join(f"{i['item_id']} ({i['score']:.2f})" for i in rec["items"][:3])
                        print(f"   user {rec['user_id']} <- {rec['event_type']}, {rec['source']}: {top}")
                        shown += 1
    finally:
        await consumer.stop()
    took = (done_at or time.time()) - t0
    kinds = Counter(str(p["kind"]) for p in promotions)
    by_kind = ", ".join(f"{k} {n}" for k, n in kinds.most_common()) or "none"
    before = f"; {earlier} more for users of earlier runs whose carts came due" if earlier else ""
    print(f"== promotions ({len(promotions)}: {by_kind}){before}")
    first_of_kind = {str(p["kind"]): i for i, p in reversed(list(enumerate(promotions)))}
    shown_first = sorted(first_of_kind.values())
    examples = [promotions[i] for i in shown_first] + [
        p for i, p in enumerate(promotions) if i not in set(shown_first)
    ]
    for p in examples[:6]:  # one of each kind first
        offer = p["offer"]
        assert isinstance(offer, dict)
        value = f" {offer['value']:g}%" if offer["kind"] == "percent_off" else ""
        hold = " [holdout: logged, not sent]" if p["holdout"] else ""
        print(f"   user {p['user_id']}: {p['kind']} -> {offer['kind']}{value} ({p['reason']}){hold}")
    by_source = ", ".join(f"{k} {n}" for k, n in sources.items())
    by_source = ", ".join(f"{k} {n}" for k, n in sources.items())
    print(
        f"== {recs} recommendations for {len(users)} users ({by_source}), {dead} dead-lettered; "
        f"{len(answered)}/{sent} events answered within {took:.1f}s of the replay's start"
    )
    print("   more: `shopstream tail --topic promotions --from-beginning --limit 20 --timeout 10`")
    return 0 if len(answered) == len(wanted) else 1
