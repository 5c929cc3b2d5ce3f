"""A straightforward faust app doing the worker's scoring: what a typical faust service reaches.

One agent on the input topics: per event, decode, fold the user's state in a faust Table (changelog
on), score with onnxruntime at batch 1, and ``await topic.send`` the recommendation. No re-keying,
no micro-batching, no promotions. Run by ``bench/ceilings.py`` as a worker process:

    python bench/typical_faust.py worker -l info
Settings come from the same SHOPSTREAM_* environment as the real worker.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import faust
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.records import event_adapter  # noqa: E402
from streams.scoring import load_artifact  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.state import UserState  # noqa: E402

settings = Settings()
(settings.data_dir / "typical").mkdir(parents=True, exist_ok=True)
app = faust.App(
    f"{settings.app_id}-typical",
    broker=f"kafka://{settings.kafka_bootstrap_servers}",
    store="rocksdb://",
    datadir=str(settings.data_dir / "typical"),
    topic_partitions=settings.partitions,
    consumer_auto_offset_reset="earliest",
    web_port=settings.web_port,
    web_host="127.0.0.1",
    web_bind="127.0.0.1",
)
inputs = app.topic(*settings.input_topics, key_type=bytes, value_type=bytes, value_serializer="raw")
outputs = app.topic(settings.topic_recommendations, key_type=bytes, value_type=bytes, value_serializer="raw")
users = app.Table("users", default=None, key_type=bytes, value_type=bytes, partitions=settings.partitions)
assert settings.model_dir is not None, "SHOPSTREAM_MODEL_DIR is required"
model = load_artifact(settings.model_dir, "cpu", 1)


@app.agent(inputs)
async def score(stream: Any) -> None:
    async for event in stream.events():
        ev = event_adapter.validate_json(event.value)
        raw = users.get(event.key)
        state = UserState.loads(raw) if raw else UserState()
        state.apply(ev, 0, settings.sequence_length)
        users[event.key] = state.dumps()
        (pred,) = model.score([state.seq])
        rec = {"user_id": ev.user_id, "event_id": ev.event_id, "source": "model", "items": pred.items[:10]}
        await outputs.send(key=event.key, value=orjson.dumps(rec))


if __name__ == "__main__":
    app.main()
