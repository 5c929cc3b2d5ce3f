"""A peer for the worker: the same job as a plain, idiomatic Quix Streams application.

In: the five behaviour-event topics (``SHOPSTREAM_TOPIC_*``). Out: one recommendation per valid
event on ``SHOPSTREAM_TOPIC_RECOMMENDATIONS`` (the worker's record, keyed by user id), invalid
input on ``SHOPSTREAM_TOPIC_DEADLETTER`` (raw bytes, reason in headers).

    one dataframe per input topic: validate (``EventDecoder``, the worker's) ─┐ concat
      ├─▶ rejected ─▶ dead-letter topic                                       │
      └─▶ group_by user id (Quix's repartition topic: the worker's by-user hop; with
          QUIX_PEER_KEYED=1 none: input keyed by user id, like the worker's direct input)
            ─▶ fold into per-user state (``UserState.apply``; Quix RocksDB state + changelog)
            ─▶ score with onnxruntime at batch 1 (``load_artifact``, top-K, the worker's exclusions
               and per-category cap) ─▶ recommendations topic

Not done here (the worker does): control topics (erasure, consent), the co-visitation baseline
(learned per event, answering where the model does not know an item), promotions with cart
timers, idle-user expiry, micro-batched scoring, metrics and the HTTP endpoints.

Run by ``bench/ceilings.py`` as variant (e), with the worker's SHOPSTREAM_* environment; needs
``pip install '.[bench]'``:

    python bench/quix_peer.py
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

# not in the base or dev install: without it (CI's mypy) its names are Any
from quixstreams import Application, State, message_context  # type: ignore[import-not-found, unused-ignore]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.deadletter import H_DETAIL, H_OFFSET, H_PARTITION, H_REASON, H_TOPIC  # noqa: E402
from streams.decode import EventDecoder  # noqa: E402
from streams.errors import RejectedInput  # noqa: E402
from streams.pipeline import _diverse, _items_of  # noqa: E402
from streams.records import ConsentEvent, ErasureEvent, input_adapter  # noqa: E402
from streams.scoring import Artifact, load_artifact  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.state import UserState  # noqa: E402


def check(decoder: EventDecoder, expected: str, raw: bytes) -> dict[str, Any]:
    """Validate like the worker's router; the accepted event travels on as its raw JSON text."""
    try:
        ev = decoder.decode(raw, expected)
    except RejectedInput as exc:
        ctx = message_context()
        return {
            "raw": raw,
            "headers": [
                (H_TOPIC, ctx.topic.encode()),
                (H_PARTITION, str(ctx.partition).encode()),
                (H_OFFSET, str(ctx.offset).encode()),
                (H_REASON, str(exc.reason).encode()),
                (H_DETAIL, exc.detail.encode("utf-8", "replace")),
            ],
        }
    return {"user_id": ev.user_id, "event": raw.decode()}


def recommend(settings: Settings, model: Artifact, value: dict[str, Any], state: State[str, bytes]) -> bytes:
    """Fold the event into the user's state and answer it with the model's top-K (batch 1)."""
    ev = input_adapter.validate_json(value["event"].encode())  # the worker validates again here too
    if isinstance(ev, ErasureEvent | ConsentEvent):  # ``check`` let behaviour events through only
        raise TypeError(f"a {ev.type!r} request on a behaviour topic")
    raw = state.get_bytes("user")
    user = UserState.loads(raw) if raw else UserState()
    now = time.time()
    tokens = user.apply(ev, int(now * 1000), settings.sequence_length, window_s=settings.reorder_window_s)
    if tokens is not None:  # None: a redelivered event, already folded
        state.set_bytes("user", user.dumps())
    (pred,) = model.score([user.seq])
    horizon = ev.event_time.timestamp() - settings.exclude_bought_s
    exclude = set(user.cart) | {i for i, t in user.bought.items() if t >= horizon} | _items_of(ev)
    ranked = _diverse(
        pred.ranked(exclude), model.category, settings.max_per_category, settings.recommendations
    )
    rec = {
        "schema_version": 1,
        "user_id": ev.user_id,
        "event_id": ev.event_id,
        "event_type": ev.type,
        "event_time": ev.event_time,
        "items": [{"item_id": i, "score": round(float(s), 6)} for i, s in ranked],
        "source": "model",
        "model_version": model.version,
        "generated_at": datetime.fromtimestamp(now, UTC),
    }
    return orjson.dumps(rec)


def main() -> None:
    settings = Settings()
    assert settings.model_dir is not None, "SHOPSTREAM_MODEL_DIR is required"
    model = load_artifact(settings.model_dir, settings.inference_provider, settings.inference_threads)
    decoder = EventDecoder.from_settings(settings)
    app = Application(
        broker_address=settings.kafka_bootstrap_servers,
        consumer_group=f"{settings.app_id}-quix",
        auto_offset_reset="earliest",
        state_dir=tempfile.mkdtemp(prefix="shopstream-quix-"),
    )
    recommendations = app.topic(
        settings.topic_recommendations, key_serializer="str", value_serializer="bytes"
    )
    dead_letters = app.topic(settings.topic_deadletter, value_serializer="bytes")
    # one dataframe per topic (each knows the event type its topic carries), concatenated: one
    # group_by, so one repartition topic and one state store for all of a user's events; with
    # QUIX_PEER_KEYED=1 (input keyed by user id, the topics co-partitioned) no group_by: the state
    # of the concatenated dataframe is keyed by the input key, like the worker's direct input
    keyed = os.environ.get("QUIX_PEER_KEYED") == "1"
    frames = [
        app.dataframe(app.topic(name, key_deserializer="str", value_deserializer="bytes")).apply(
            functools.partial(check, decoder, etype)
        )
        for name, etype in settings.input_topics.items()
    ]
    checked = functools.reduce(lambda a, b: a.concat(b), frames)

    rejected = checked.filter(lambda v: "headers" in v)
    rejected.set_headers(lambda v, _key, _ts, _headers: v["headers"]).apply(lambda v: v["raw"]).to_topic(
        dead_letters
    )

    events = checked.filter(lambda v: "user_id" in v)
    if not keyed:
        events = events.group_by("user_id", key_serializer="str", key_deserializer="str")
    events = events.apply(functools.partial(recommend, settings, model), stateful=True)
    events.to_topic(recommendations)
    app.run()


if __name__ == "__main__":
    main()
