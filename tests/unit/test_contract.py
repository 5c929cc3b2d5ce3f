"""The published JSON Schemas, settings and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator, ValidationError

from streams.cli import parser
from streams.pipeline import Message, local_pipeline
from streams.records import Promotion, Recommendation
from streams.schemas import SCHEMA_DIR, check_schemas
from streams.settings import Settings
from streams.state import user_partition
from tests.fuzzing import VALID

DEMO_MODEL = Path(__file__).resolve().parents[2] / "deploy" / "demo" / "model"


def test_schema_files_are_up_to_date() -> None:
    assert check_schemas() == [], "run `shopstream schemas` and commit the result"


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def test_input_schemas_accept_the_contract_and_reject_breaches() -> None:
    view = {
        "schema_version": 1,
        "type": "view",
        "event_id": "e",
        "user_id": "u",
        "event_time": "2024-01-01T00:00:00Z",
        "item_id": "i",
    }
    validator("view-event").validate(view)
    with pytest.raises(ValidationError):
        validator("view-event").validate({**view, "price": -1})
    with pytest.raises(ValidationError):
        validator("cart-event").validate({**view, "type": "cart", "action": "add", "quantity": 0})


def test_promotion_records_match_their_schema() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    promo = Promotion(
        user_id="u",
        promotion_id="p",
        kind="cart_abandonment",
        reason="idle cart",
        trigger_event_id="e",
        items=["i"],
        offer={"kind": "percent_off", "value": 10.0},
        scores={"propensity": 0.2},
        holdout=False,
        created_at=now,
        expires_at=now,
        model_version="m",
    )
    validator("promotion").validate(json.loads(promo.model_dump_json()))


def test_the_workers_outputs_match_their_schemas_with_rfc3339_times() -> None:
    """A recommendation and a cart promotion as the worker writes them (orjson, echoing the event's
    own offset), and as pydantic writes the records (``Z``): RFC 3339 date-times either way."""
    wall = datetime(2026, 3, 2, 12, 0, tzinfo=UTC).timestamp()
    settings = Settings(model_dir=DEMO_MODEL, quiet_hours="", holdout_percent=0.0, inference_provider="cpu")
    pipe = local_pipeline(settings, budget_per_partition=1e9, clock=lambda: wall)
    cart = {**VALID["cart"], "action": "add", "event_time": "2026-03-02T17:30:00.123456789+05:30"}
    part = user_partition(b"u1", settings.partitions)
    result = pipe.process([Message(part, b"u1", orjson.dumps(cart), None)])
    assert result.failed == []
    pipe.timers.observe(part, wall + 7200, wall)  # the partition's event time two hours on
    outputs = [*result.outputs, *pipe.due_carts({part}, wall)]
    recs = [orjson.loads(o.value) for o in outputs if o.topic == settings.topic_recommendations]
    promos = [orjson.loads(o.value) for o in outputs if o.topic == settings.topic_promotions]
    assert [r["event_time"] for r in recs] == ["2026-03-02T17:30:00.123456+05:30"]
    assert [p["kind"] for p in promos] == ["cart_abandonment"]
    validator("recommendation").validate(recs[0])
    validator("promotion").validate(promos[0])
    validator("recommendation").validate(json.loads(Recommendation.model_validate(recs[0]).model_dump_json()))
    validator("promotion").validate(json.loads(Promotion.model_validate(promos[0]).model_dump_json()))
    with pytest.raises(ValidationError):  # the format is checked: a naive time is no RFC 3339
        validator("recommendation").validate({**recs[0], "generated_at": "2026-03-02T12:00:00"})


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-23, minutes=-59))),
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
)
def test_pydantic_writes_output_times_as_rfc3339(when: datetime) -> None:
    rec = Recommendation(
        user_id="u",
        event_id="e",
        event_type="view",
        event_time=when,
        items=[{"item_id": "i", "score": 0.5}],
        source="model",
        model_version="m",
        generated_at=when,
    )
    validator("recommendation").validate(json.loads(rec.model_dump_json()))


def test_settings_honour_kafka_bootstrap_servers_and_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    assert Settings().kafka_bootstrap_servers == "k1:9092,k2:9092"
    monkeypatch.setenv("SHOPSTREAM_KAFKA_BOOTSTRAP_SERVERS", "k3:9092")
    assert Settings().kafka_bootstrap_servers == "k3:9092"
    monkeypatch.setenv("SHOPSTREAM_PARTITIONS", "12")
    assert Settings().partitions == 12


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPSTREAM_KAFKA_SASL_PASSWORD", "hunter2")
    s = Settings()
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_bad_settings_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPSTREAM_PARTITIONS", "0")
    with pytest.raises(Exception, match="partitions"):
        Settings()


def test_cli_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streams", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("kafka", "topics", "worker", "replay", "tail", "demo", "schemas"):
        assert cmd in out
    args = parser().parse_args(["replay", "taobao", "--speed", "10"])
    assert args.speed == 10.0 and args.dataset == "taobao"
