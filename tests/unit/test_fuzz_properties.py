"""Bad input of every category, generated: the decoder answers with an event or a RejectedInput
(the one the contract expects), and in a pipeline batch a bad message never blocks valid ones."""

from __future__ import annotations

import time
from itertools import count
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.decode import EventDecoder
from streams.errors import RejectReason
from streams.pipeline import Message, Pipeline, local_pipeline
from streams.records import EVENT_TYPES, OrderLine
from streams.settings import Settings
from streams.sources.datasets import load
from streams.state import user_partition
from tests.fuzzing import ACCEPTED, CATEGORIES, FIELDS, VALID, Case, Fuzzer, outcome

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(model_dir=ROOT / "deploy" / "demo" / "model", quiet_hours="", inference_provider="cpu")
decoder = EventDecoder(
    max_bytes=SETTINGS.max_message_bytes,
    min_event_time=SETTINGS.min_event_time,
    max_clock_skew_s=SETTINGS.max_clock_skew_s,
)
# valid seeds of every type: the literal templates and real REES46 views, carts and orders
REAL = list(load("rees46-demo", SETTINGS.datasets_dir))
SEEDS = list(VALID.values()) + [REAL[i] for i in range(0, len(REAL), 25)]
REAL_SEEDS = {e["type"] for e in SEEDS} - {"search", "review"}
# pydantic refuses it before the pipeline scores it, as the router does: the by-user stage agrees
SCHEMA_LEVEL = {str(RejectReason.EMPTY), str(RejectReason.INVALID_JSON), str(RejectReason.SCHEMA)}


NOW = time.time()  # fixed, so that hypothesis replays the same draws
seeds = st.sampled_from(range(len(SEEDS))).map(SEEDS.__getitem__)


def cases(categories: tuple[str, ...] = CATEGORIES) -> st.SearchStrategy[Case]:
    return st.builds(
        lambda category, seed, rnd: Fuzzer(rnd, decoder).case(category, seed, NOW),
        st.sampled_from(categories),
        seeds,
        st.randoms(use_true_random=False),
    )


def test_the_field_table_covers_the_contract() -> None:
    names = {n for model in EVENT_TYPES.values() for n in model.model_fields} | set(OrderLine.model_fields)
    assert names == set(FIELDS)
    assert {"view", "cart", "order"} == REAL_SEEDS


@pytest.mark.parametrize("category", CATEGORIES)
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_each_category_decodes_or_is_rejected_as_the_contract_says(
    category: str, data: st.DataObject
) -> None:
    case = data.draw(cases((category,)))
    got = outcome(decoder, case)  # any exception but RejectedInput fails the test
    assert got == ACCEPTED or got in set(RejectReason)
    assert case.allows(got), (
        f"{case.category}: {got} not in {sorted(case.expect or ())} for {case.raw!r:.300}"
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"type": "view", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", RejectReason.INVALID_JSON),
        (b'{"a": ' * 5_000 + b"1" + b"}" * 5_000, RejectReason.INVALID_JSON),
        (
            orjson.dumps({**VALID["view"], "user_id": "MARK"}).replace(b"MARK", b"\\ud800"),
            RejectReason.INVALID_JSON,
        ),
        (
            orjson.dumps({**VALID["view"], "item_id": "MARK"}).replace(b"MARK", b"\\udfff"),
            RejectReason.INVALID_JSON,
        ),
        (
            orjson.dumps({**VALID["view"], "user_id": "MARK"}).replace(b"MARK", b"\xed\xa0\x80"),
            RejectReason.INVALID_JSON,
        ),
        (orjson.dumps({**VALID["view"], "price": "MARK"}).replace(b'"MARK"', b"NaN"), RejectReason.SCHEMA),
        (
            orjson.dumps({**VALID["view"], "price": "MARK"}).replace(b'"MARK"', b"-Infinity"),
            RejectReason.SCHEMA,
        ),
        (orjson.dumps({**VALID["view"], "event_time": "1714550400"}), RejectReason.SCHEMA),
        (orjson.dumps({**VALID["view"], "event_time": "1714550400000"}), RejectReason.SCHEMA),
        (
            orjson.dumps({**VALID["view"], "event_time": "0001-01-01T00:00:00+23:59"}),
            RejectReason.IMPOSSIBLE_VALUE,
        ),
        (
            orjson.dumps({**VALID["view"], "event_time": "9999-12-31T23:59:59-23:59"}),
            RejectReason.IMPOSSIBLE_VALUE,
        ),
        (orjson.dumps({**VALID["view"], "item_id": "x" * (1 << 20)}), RejectReason.OVERSIZED),
    ],
)
def test_regressions_found_by_the_generators(raw: bytes, reason: RejectReason) -> None:
    assert outcome(decoder, Case("regression", raw, "view", None)) == reason


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return local_pipeline(SETTINGS, budget_per_partition=100.0)


ids = count()


@settings(max_examples=150, deadline=None)
@given(
    bad=st.lists(cases(), min_size=1, max_size=4),
    valid=st.lists(seeds, min_size=1, max_size=6),
)
def test_a_bad_message_in_a_batch_never_blocks_the_valid_ones(
    pipeline: Pipeline, bad: list[Case], valid: list[dict[str, object]]
) -> None:
    """Bad messages go in front of and between valid events of the same users (the worst place for
    a wave of one user's events); every valid event is still answered."""
    users = [str(v["user_id"]).encode() for v in valid]
    batch: list[Message] = []
    kinds: list[Case | str] = []  # the Case of a bad message, the event id of a valid one
    for i, ev in enumerate(valid):
        if i < len(bad):
            key = users[i % len(users)]
            batch.append(Message(user_partition(key, 8), key, bad[i].raw or b"", None))
            kinds.append(bad[i])
        eid = f"valid-{next(ids)}"
        batch.append(
            Message(user_partition(users[i], 8), users[i], orjson.dumps({**ev, "event_id": eid}), None)
        )
        kinds.append(eid)
    result = pipeline.process(batch)  # never raises
    failed = dict(result.failed)
    assert all(exc.reason != RejectReason.PROCESSING_ERROR for exc in failed.values()), failed
    answered = [
        orjson.loads(o.value)["event_id"] for o in result.outputs if o.topic == SETTINGS.topic_recommendations
    ]
    assert len(answered) == len(batch) - len(failed)
    for i, kind in enumerate(kinds):
        if isinstance(kind, str):
            assert i not in failed and kind in answered, f"valid event {kind} blocked"
            continue
        decoded = outcome(decoder, kind)
        if decoded in SCHEMA_LEVEL:  # the decoder's reason; an empty value is invalid JSON here
            assert str(failed[i].reason) == (
                str(RejectReason.INVALID_JSON) if decoded == str(RejectReason.EMPTY) else decoded
            )
        elif decoded == ACCEPTED:
            assert i not in failed
        # else: oversized, wrong topic, out-of-bounds time are the router's checks; the by-user
        # stage answers them or refuses them, either without a crash
