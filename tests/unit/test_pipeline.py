"""The per-batch pipeline without Kafka: micro-batching never changes a user's answers."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams.pipeline import Message, Pipeline, local_pipeline
from streams.scoring import ModelError, load_artifact
from streams.settings import Settings
from streams.sources.datasets import load
from streams.state import UserState, user_partition

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "deploy" / "demo" / "model"


def pipeline(settings: Settings) -> tuple[Pipeline, MutableMapping[bytes, bytes]]:
    p = local_pipeline(settings, budget_per_partition=100.0)
    return p, p.users


def run(
    settings: Settings, msgs: list[Message], batch: int
) -> tuple[dict[str, Any], MutableMapping[bytes, bytes]]:
    p, users = pipeline(settings)
    outputs: dict[str, Any] = {}
    for i in range(0, len(msgs), batch):
        for out in p.process(msgs[i : i + batch]).outputs:
            rec = orjson.loads(out.value)
            outputs[rec.get("event_id") or rec["promotion_id"]] = rec
    return outputs, users


def test_micro_batches_give_each_user_the_answers_of_one_by_one_processing() -> None:
    settings = Settings(model_dir=DEMO_MODEL, quiet_hours="", inference_provider="cpu")
    events = list(load("rees46-demo", settings.datasets_dir))[:1500]
    msgs = [
        Message(user_partition(e["user_id"].encode(), 8), e["user_id"].encode(), orjson.dumps(e), time.time())
        for e in events
    ]
    one, users_one = run(settings, msgs, 1)
    batched, users_batched = run(settings, msgs, 64)
    assert set(one) == set(batched)
    model_recs = [k for k, r in one.items() if r.get("source") == "model"]
    assert len(model_recs) > 1000  # the demo model knows most of the sample's items
    for k in model_recs:
        assert batched[k]["source"] == "model"
        assert [i["item_id"] for i in batched[k]["items"]] == [i["item_id"] for i in one[k]["items"]], k
    promos = {k for k, r in one.items() if "promotion_id" in r}
    assert promos and promos == {k for k, r in batched.items() if "promotion_id" in r}
    assert {k: UserState.loads(v).seq for k, v in users_one.items()} == {
        k: UserState.loads(v).seq for k, v in users_batched.items()
    }


def test_a_corrupt_or_foreign_artifact_is_refused_with_the_reason(tmp_path: Path) -> None:
    import shutil

    art = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, art)
    shipped = load_artifact(art, "cpu")  # the shipped one loads, with its items' categories
    assert shipped.with_feats and len(shipped.category) == len(shipped.vocab)
    (art / "model.onnx").write_bytes((art / "model.onnx").read_bytes()[:-10])
    with pytest.raises(ModelError, match=r"sha256 .* does not match the manifest"):
        load_artifact(art, "cpu")
    shutil.copytree(DEMO_MODEL, art, dirs_exist_ok=True)
    manifest = orjson.loads((art / "manifest.json").read_bytes())
    manifest["token_ids"]["feature_buckets"] = 1024
    (art / "manifest.json").write_bytes(orjson.dumps(manifest))
    with pytest.raises(ModelError, match="hashes features into 1024"):
        load_artifact(art, "cpu")
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable manifest"):
        load_artifact(art, "cpu")
    with pytest.raises(ModelError, match="inference_provider=cuda"):
        from streams.scoring import select_providers

        select_providers("cuda", ["CPUExecutionProvider"])


def test_diversity_caps_items_per_category_and_keeps_the_order() -> None:
    from streams.pipeline import _diverse

    ranked = [("a", 9.0), ("b", 8.0), ("c", 7.0), ("d", 6.0), ("e", 5.0)]
    category = {"a": 1, "b": 1, "c": 1, "d": 2}  # e: category unknown, never capped
    assert _diverse(ranked, category, 0, 3) == ranked[:3]
    assert _diverse(ranked, category, 1, 3) == [("a", 9.0), ("d", 6.0), ("e", 5.0)]
    assert _diverse(ranked, category, 2, 10) == [("a", 9.0), ("b", 8.0), ("d", 6.0), ("e", 5.0)]

    def read_once(upto: int) -> Any:  # the model's ranking, read lazily: no further than ``upto``
        yield from ranked[:upto]
        raise AssertionError(f"read past item {upto}")

    assert _diverse(read_once(3), category, 0, 3) == ranked[:3]
    assert _diverse(read_once(4), category, 1, 2) == [("a", 9.0), ("d", 6.0)]
