"""The README's lists of output fields name every field of the output records, and no other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from streams.records import Promotion, PromotionOutcome, Recommendation

README = Path(__file__).resolve().parents[2] / "README.md"


def listed_fields(topic: str) -> set[str]:
    """Top-level field names in the README's bullet for an output topic (nested ones in brackets
    after a field, like ``items`` (``item_id``, ``score``), are left out)."""
    text = README.read_text()
    bullet = re.search(rf"^- `{re.escape(topic)}`: (.*?)(?=^- |^$)", text, re.M | re.S)
    assert bullet, f"README has no bullet for {topic}"
    flat = re.sub(r"\([^)]*\)", "", bullet.group(1))  # drop (...) asides and nested fields
    return set(re.findall(r"`([a-z_]+)`", flat))


@pytest.mark.parametrize(
    ("topic", "record"),
    [
        ("shop.recommendations", Recommendation),
        ("shop.promotions", Promotion),
        ("shop.promotion-outcomes", PromotionOutcome),
    ],
)
def test_readme_lists_every_output_field(topic: str, record: type[BaseModel]) -> None:
    assert listed_fields(topic) == set(record.model_fields)
