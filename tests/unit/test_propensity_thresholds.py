"""Propensity thresholds: explicit settings win; unset, the policy uses the thresholds of the model
version that produced the propensity (hot reload can swap versions between two events of a user,
and a cart timer decides on a propensity stored earlier); a model without them gets 0.7 / 0.5.
The thresholds used are in the records' scores, which the promotion schema allows."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from streams.pipeline import Message, local_pipeline
from streams.promotions import DEFAULT_HIGH_INTENT, DEFAULT_REMINDER, MODEL_REMINDER, Budget, Policy
from streams.records import Promotion, event_adapter
from streams.scoring import ModelError, PropensityThresholds, load_artifact
from streams.settings import Settings
from streams.state import UserState, user_partition

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "deploy" / "demo" / "model"
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
A = PropensityThresholds(high_intent=0.3, reminder=0.2)
B = PropensityThresholds(high_intent=0.9, reminder=0.8)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SHOPSTREAM_") and name != "SHOPSTREAM_DATASETS_DIR":
            monkeypatch.delenv(name)


def raw(etype: str, eid: str, user: str, at: datetime = T0, **fields: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "type": etype,
        "event_id": eid,
        "user_id": user,
        "event_time": at.isoformat(),
        **fields,
    }


def policy(**overrides: Any) -> Policy:
    s = Settings(**{"holdout_percent": 0.0, "quiet_hours": "", **overrides})
    return Policy(s, Budget({}, 1e9))


def cart_due(pol: Policy, state: UserState) -> dict[str, Any]:
    """The record of ``state``'s cart once it is idle."""
    d = pol.on_cart_due(state, "u1", T0.timestamp() + 7200, 0, "m")
    assert d is not None and d.record is not None
    Promotion.model_validate(d.record)  # the schema's scores take any number
    return d.record


def scored_cart(pol: Policy, p: float, thresholds: PropensityThresholds | None) -> UserState:
    """A user whose cart add the model scored ``p`` with those thresholds."""
    state = UserState()
    ev = event_adapter.validate_json(
        orjson.dumps(raw("cart", "c1", "u1", action="add", item_id="a", quantity=1, unit_price=10.0))
    )
    state.apply(ev, 0, 50)
    pol.on_event(state, ev, 0, p, ["a"], "m", thresholds=thresholds)
    return state


def test_settings_are_unset_by_default_and_auto_or_empty_mean_unset() -> None:
    s = Settings()
    assert s.high_intent_propensity is None and s.reminder_propensity is None
    assert "SHOPSTREAM_HIGH_INTENT_PROPENSITY=" in s.dump_env()  # and reads back as unset:
    assert Settings(high_intent_propensity="", reminder_propensity=" AUTO ").reminder_propensity is None
    assert Settings(reminder_propensity=0.8).reminder_propensity == 0.8  # one alone: no order to check
    with pytest.raises(ValidationError, match=r"SHOPSTREAM_REMINDER_PROPENSITY=0\.8 is above"):
        Settings(reminder_propensity=0.8, high_intent_propensity=0.6)
    with pytest.raises(ValidationError):
        Settings(high_intent_propensity=0.0)


def test_the_model_thresholds_decide_when_the_settings_are_unset() -> None:
    pol = policy()
    assert (pol.high_intent_threshold(A), pol.reminder_threshold(A.reminder)) == (0.3, 0.2)
    assert (pol.high_intent_threshold(None), pol.reminder_threshold(None)) == (0.7, 0.5)
    assert (DEFAULT_HIGH_INTENT, DEFAULT_REMINDER) == (0.7, 0.5)  # the former setting defaults
    pinned = policy(high_intent_propensity=0.65, reminder_propensity=0.45)
    assert (pinned.high_intent_threshold(A), pinned.reminder_threshold(A.reminder)) == (0.65, 0.45)


def test_high_intent_and_cart_offers_use_the_thresholds_of_the_scoring_model() -> None:
    pol = policy()
    state = scored_cart(pol, 0.4, A)  # above A's 0.3: high intent; above A's 0.2: a likely buyer
    assert state.promo[MODEL_REMINDER] == 0.2
    rec = cart_due(pol, state)
    assert rec["offer"]["kind"] == "reminder" and rec["scores"]["reminder_threshold"] == 0.2
    state = scored_cart(pol, 0.4, B)
    assert cart_due(pol, state)["offer"]["kind"] == "percent_off"  # below B's 0.8
    state = scored_cart(pol, 0.6, None)  # a model without thresholds: 0.5 as before
    assert MODEL_REMINDER not in state.promo
    rec = cart_due(pol, state)
    assert rec["offer"]["kind"] == "reminder" and rec["scores"]["reminder_threshold"] == 0.5
    old = UserState(promo={"p": 0.45})  # stored before thresholds existed: 0.5 as before
    old.apply(
        event_adapter.validate_python(raw("cart", "c", "u1", action="add", item_id="a", quantity=1)), 0, 9
    )
    assert cart_due(pol, old)["offer"]["kind"] == "percent_off"
    pinned = policy(reminder_propensity=0.1)  # an explicit setting overrides the model's
    assert cart_due(pinned, scored_cart(pinned, 0.4, B))["offer"]["kind"] == "reminder"


def test_high_intent_records_name_the_threshold_they_crossed() -> None:
    pol = policy()
    state = UserState()
    fired = []
    for i, (p, th) in enumerate([(0.35, A), (0.5, B), (0.95, B), (0.75, None)]):
        ev = event_adapter.validate_json(
            orjson.dumps(raw("view", f"v{i}", "u1", T0 + timedelta(hours=i), item_id="x"))
        )
        state.apply(ev, 0, 50)
        for d in pol.on_event(state, ev, 0, p, ["a"], "m", thresholds=th):
            assert d.record is not None
            Promotion.model_validate(d.record)
            fired.append((d.record["trigger_event_id"], d.record["scores"]["high_intent_threshold"]))
            assert f"crossed {d.record['scores']['high_intent_threshold']:.2f}" in d.record["reason"]
    # 0.5 does not cross B's 0.9; 0.75 crosses the 0.7 of a model without thresholds
    assert fired == [("v0", 0.3), ("v2", 0.9)]


def test_the_pipeline_decides_on_the_thresholds_of_the_version_that_scored(tmp_path: Path) -> None:
    """Model A scores u1's cart, a hot reload swaps in B (same graph, other thresholds), B scores
    u2's cart; when both carts come due under B, u1 is judged on A's reminder threshold."""
    for name, th in (("a", A), ("b", B)):
        shutil.copytree(DEMO_MODEL, tmp_path / name)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        manifest["propensity_thresholds"] = {"high_intent": th.high_intent, "reminder": th.reminder}
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    settings = Settings(
        model_dir=tmp_path / "a", quiet_hours="", holdout_percent=0.0, inference_provider="cpu"
    )
    pipe = local_pipeline(settings, budget_per_partition=1e9, clock=lambda: 0.0)
    assert pipe.models.current is not None and pipe.models.current.thresholds == A
    item = pipe.models.current.vocab[3]  # the demo model scores a cart of it about 0.55

    def send(user: str, eid: str) -> list[dict[str, Any]]:
        e = raw("cart", eid, user, action="add", item_id=item, quantity=1, unit_price=10.0)
        msg = Message(user_partition(user.encode(), 8), user.encode(), orjson.dumps(e), None)
        result = pipe.process([msg])
        assert list(result.propensity) == [0]  # the model scored it
        return [orjson.loads(o.value) for o in result.outputs if o.topic == settings.topic_promotions]

    first = send("u1", "c1")
    assert [(r["kind"], r["scores"]["high_intent_threshold"]) for r in first] == [("high_intent", 0.3)]
    pipe.models.current = load_artifact(tmp_path / "b", "cpu")  # what ModelWatcher.poll does
    assert send("u2", "c2") == []  # about 0.55 does not cross B's 0.9
    for p in range(8):
        pipe.timers.observe(p, T0.timestamp() + 7200, 0.0)
    due = {r["user_id"]: r for r in (orjson.loads(o.value) for o in pipe.due_carts(set(range(8)), 0.0))}
    assert due["u1"]["offer"]["kind"] == "reminder" and due["u1"]["scores"]["reminder_threshold"] == 0.2
    assert due["u2"]["offer"]["kind"] == "percent_off" and due["u2"]["scores"]["reminder_threshold"] == 0.8
    for rec in [*first, *due.values()]:
        Promotion.model_validate(rec)


def test_a_propensity_that_does_not_rank_decides_no_promotion(tmp_path: Path) -> None:
    """A manifest with ``propensity_ranks: false`` (the exporter found the propensity no better
    than chance on validation): the model still recommends, but the same cart that crosses A's
    0.3 above sends no high-intent nudge, and when it comes due it gets the rules' discount, not
    a reminder."""
    shutil.copytree(DEMO_MODEL, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["propensity_thresholds"] = {"high_intent": A.high_intent, "reminder": A.reminder}
    manifest["propensity_ranks"] = False
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    settings = Settings(
        model_dir=tmp_path / "m", quiet_hours="", holdout_percent=0.0, inference_provider="cpu"
    )
    pipe = local_pipeline(settings, budget_per_partition=1e9, clock=lambda: 0.0)
    assert pipe.models.current is not None and pipe.models.current.propensity_ranks is False
    item = pipe.models.current.vocab[3]
    e = raw("cart", "c1", "u1", action="add", item_id=item, quantity=1, unit_price=10.0)
    result = pipe.process([Message(user_partition(b"u1", 8), b"u1", orjson.dumps(e), None)])
    recs = [orjson.loads(o.value) for o in result.outputs if o.topic == settings.topic_recommendations]
    assert [r["source"] for r in recs] == ["model"] and list(result.propensity) == [0]
    assert [o for o in result.outputs if o.topic == settings.topic_promotions] == []
    for p in range(8):
        pipe.timers.observe(p, T0.timestamp() + 7200, 0.0)
    due = [orjson.loads(o.value) for o in pipe.due_carts(set(range(8)), 0.0)]
    assert [(r["kind"], r["offer"]["kind"]) for r in due] == [("cart_abandonment", "percent_off")]
    assert "propensity" not in due[0]["scores"]


@pytest.mark.parametrize("value", ["false", 0, None])
def test_a_propensity_ranks_that_is_not_a_boolean_is_refused(tmp_path: Path, value: Any) -> None:
    shutil.copytree(DEMO_MODEL, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["propensity_ranks"] = value
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="propensity_ranks"):
        load_artifact(tmp_path / "m", "cpu")
