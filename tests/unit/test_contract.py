"""The published JSON Schemas, settings and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from jsonschema import Draft202012Validator, ValidationError

from streams.cli import parser
from streams.records import Promotion
from streams.schemas import SCHEMA_DIR, check_schemas
from streams.settings import Settings


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
