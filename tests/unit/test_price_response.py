"""Price sensitivity learned from chosen prices (``streams.price_response``): known answers for the
reference, the posterior, the state fold, Spearman with ties, and a simulated shop whose users'
price levels are known; the artifact's file checked like the graph's."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from exporters.publish import attach
from streams import price_response as pr
from streams.pipeline import Message, local_pipeline
from streams.promotions import heuristic_price_sensitivity, price_sensitivity
from streams.records import event_adapter
from streams.scoring import ModelError, load_artifact
from streams.settings import Settings
from streams.state import UserState

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "deploy" / "demo" / "model"
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
_n = 0


def ev(
    kind: str, user: str, item: str, price: float | None, cat: str | None = "c", minutes: float = 0
) -> Any:
    global _n
    _n += 1
    d: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"e{_n}",
        "user_id": user,
        "event_time": (T0 + timedelta(minutes=minutes)).isoformat(),
        "item_id": item,
        "category": cat,
    }
    if kind == "view":
        d |= {"type": "view", "price": price}
    else:
        d |= {"type": "cart", "action": kind, "quantity": 1, "unit_price": price}
    return event_adapter.validate_json(orjson.dumps(d))


def test_mid_rank_and_thinning_known_answers() -> None:
    points = [10.0, 20.0, 30.0, 40.0]
    assert pr.mid_rank(points, 5) == 0 and pr.mid_rank(points, 50) == 1
    assert pr.mid_rank(points, 20) == pytest.approx(3 / 8)  # one below, itself half
    assert pr.mid_rank(points, 25) == pytest.approx(0.5)
    thin = pr._thin([float(i) for i in range(1000)], 64)
    assert len(thin) == 64 and thin[0] == 0 and thin[-1] == 999 and thin == sorted(thin)


def test_fit_by_hand_cheap_viewer_ranks_above_dear_viewer() -> None:
    events = [
        ev("view", "a", "i10", 10),
        ev("view", "a", "i20", 20),
        ev("view", "b", "i40", 40),
        ev("view", "b", "i30", 30, minutes=120),  # after `until`: not fitted
        ev("view", "b", "x", 5, cat="rare"),  # a category with one item: not placed
    ]
    ref = pr.fit(events, (T0 + timedelta(minutes=60)).timestamp())
    assert ref is not None
    assert list(ref.categories) == ["c"] and list(ref.categories["c"]) == [10, 20, 40]
    # observations 1 - mid-rank: 10 -> 5/6, 20 -> 1/2, 40 -> 1/6
    assert ref.observation("c", 10) == pytest.approx(5 / 6, abs=1e-6)
    assert ref.observation("rare", 5) is None
    prior = (5 / 6 + 1 / 2 + 1 / 6) / 3
    assert ref.prior == pytest.approx(prior, abs=1e-6)
    a, b = (5 / 6 + 1 / 2 + 2 * prior) / 4, (1 / 6 + 2 * prior) / 3
    assert ref.estimate(2, 5 / 6 + 1 / 2) == pytest.approx(a, abs=1e-6)
    assert ref.ranks[0] == pytest.approx(b, abs=1e-6) and ref.ranks[-1] == pytest.approx(a, abs=1e-6)
    assert ref.score(2, 5 / 6 + 1 / 2) == pytest.approx(1 - 1 / 202, abs=1e-4)  # at the top point
    assert ref.score(1, 1 / 6) == pytest.approx(1 / 202, abs=1e-4)
    assert ref.fitted["users"] == 2 and ref.fitted["observations"] == 3
    assert pr.fit([ev("view", "a", "i1", None)], T0.timestamp() + 1) is None  # no prices: no reference


def test_the_fold_counts_priced_views_and_adds_only_and_scores_every_event() -> None:
    ref = pr.PriceReference({"c": [10.0, 20.0, 30.0, 40.0]}, 0.5, [0.3, 0.5, 0.7])
    state = UserState()
    pr.observe(state, ev("view", "u", "i10", 10), ref)
    assert state.promo[pr.EVIDENCE] == [1, 0.875]
    pr.observe(state, ev("add", "u", "i20", 20), ref)
    assert state.promo[pr.EVIDENCE] == [2, 0.875 + 0.625]
    for other in (
        ev("remove", "u", "i20", 20),
        ev("view", "u", "y", 5, cat="unknown"),
        ev("view", "u", "z", None),
    ):
        pr.observe(state, other, ref)
    assert state.promo[pr.EVIDENCE] == [2, 1.5]
    estimate = (1.5 + 2 * 0.5) / 4  # 0.625: between the 0.5 and 0.7 points
    assert state.promo[pr.SCORE] == pytest.approx(pr.mid_rank([0.3, 0.5, 0.7], estimate), abs=1e-4)
    assert state.promo[pr.SCORE] == pytest.approx(2 / 3, abs=1e-4)
    assert price_sensitivity(state) == state.promo[pr.SCORE]  # the policy reads the learned score
    pr.observe(state, ev("view", "u", "i30", 30), None)  # a served model without a reference
    assert pr.SCORE not in state.promo and state.promo[pr.EVIDENCE] == [2, 1.5]
    assert price_sensitivity(state) == heuristic_price_sensitivity(state)
    fresh = UserState(counts={"cart_add": 1, "cart_remove": 1})
    assert price_sensitivity(fresh) == heuristic_price_sensitivity(fresh) == 0.5  # no reference: the rule


def test_spearman_known_answers() -> None:
    assert pr.spearman([1, 2, 3], [2, 4, 9]) == pytest.approx(1)
    assert pr.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert pr.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / np.sqrt(3))  # average ranks for ties
    assert pr.spearman([0, 0, 0], [1, 2, 3]) == 0  # a constant ranks nobody


def shop(seed: int, users: int = 120) -> list[Any]:
    """A simulated shop (tests only): 6 categories of 20 items priced 1..20 (times the category's
    scale); user u has a known price level tau_u in (0, 1) and views, then adds to the cart, items
    whose price rank is tau_u plus noise, in random categories. Nobody removes anything."""
    rng = np.random.default_rng(seed)
    out: list[tuple[float, Any]] = []
    for u in range(users):
        tau = (u + 0.5) / users
        for k in range(8):
            cat = int(rng.integers(6))
            rank = int(np.clip(round((tau + rng.normal(0, 0.12)) * 19), 0, 19))
            item, price = f"c{cat}-{rank}", float((rank + 1) * (cat + 1))
            minutes = k * 30 + float(rng.uniform(0, 20))
            kind = "add" if k in (4, 7) else "view"
            out.append((minutes, ev(kind, f"u{u:03d}", item, price, cat=f"c{cat}", minutes=minutes)))
    return [e for _, e in sorted(out, key=lambda p: p[0])]


def test_a_simulated_shop_the_learned_score_ranks_users_by_their_known_price_level() -> None:
    events = shop(0)
    ref = pr.fit(events, (T0 + timedelta(minutes=100)).timestamp())
    assert ref is not None
    states: dict[str, UserState] = {}
    for e in events:
        state = states.setdefault(e.user_id, UserState())
        state.apply(e, 0, 50)
        pr.observe(state, e, ref)
    users = sorted(states)
    tau = [(int(u[1:]) + 0.5) / 120 for u in users]
    # cheap users are the price-driven ones: the score falls as the price level rises
    assert pr.spearman([states[u].promo[pr.SCORE] for u in users], tau) < -0.9
    assert pr.spearman([heuristic_price_sensitivity(states[u]) for u in users], tau) == 0  # no removals

    rows = pr.choices(events, ref, (T0 + timedelta(minutes=100)).timestamp(), heuristic_price_sensitivity)
    assert len(rows) == 240 and len({r.user for r in rows}) == 120
    rep = pr.compare(rows, resamples=200)
    assert rep["spearman"]["learned"]["ci95"][0] > 0.6
    assert rep["spearman"]["heuristic"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    assert rep["learned_minus"]["heuristic"]["ci95"][0] > 0.6
    # the plain mean price cannot compare across categories priced on other scales
    assert rep["learned_minus"]["mean_price"]["ci95"][0] > 0


def test_the_report_says_what_it_could_not_score() -> None:
    events = [ev("view", "u", f"i{p}", p, minutes=p) for p in (10, 20, 30, 40, 50)]  # no cart add
    rep = pr.evaluate("some-log", events, heuristic_price_sensitivity)
    assert rep["choices"] == 0 and "No cart add" in pr.render(rep)
    rep = pr.evaluate("some-log", [ev("view", "u", "i1", None)], heuristic_price_sensitivity)
    assert rep["reference"] is None and "The heuristic stays" in pr.render(rep)


def test_a_choice_is_scored_without_the_chosen_items_own_views() -> None:
    ref = pr.PriceReference({"c": [10.0, 20.0, 30.0, 40.0]}, 0.5, [0.3, 0.5, 0.7])
    events = [ev("view", "u", "i10", 10), ev("add", "u", "i10", 10, minutes=1)]
    [row] = pr.choices(events, ref, T0.timestamp(), heuristic_price_sensitivity)
    assert row.target == 0.875
    assert row.scores["learned"] == ref.score(0, 0)  # the prior only
    assert row.scores["learned_served"] == ref.score(1, 0.875)


def test_reference_files_are_checked_like_the_graph(tmp_path: Path) -> None:
    good = pr.PriceReference({"c": [1.0, 2.0, 3.0]}, 0.5, [0.2, 0.8], fitted={"until": "x"})
    assert pr.PriceReference.from_json(good.to_json()) == good
    for broken, why in (
        ({**good.to_json(), "format": 9}, "format 1"),
        ({**good.to_json(), "prior": 1.5}, "prior"),
        ({**good.to_json(), "ranks": [0.8, 0.2]}, "ranks"),
        ({**good.to_json(), "categories": {"c": [3.0, 1.0]}}, "category 'c'"),
    ):
        with pytest.raises(ValueError, match=why):
            pr.PriceReference.from_json(broken)
    art = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, art)
    assert load_artifact(art, "cpu").prices is not None  # the shipped demo model carries one
    entry = attach(art, good)
    assert load_artifact(art, "cpu").prices == good
    (art / entry["file"]).write_text(json.dumps({**good.to_json(), "prior": 0.6}))
    with pytest.raises(ModelError, match="does not match the manifest"):
        load_artifact(art, "cpu")
    (art / entry["file"]).unlink()
    with pytest.raises(ModelError, match=r"price reference file .* is missing"):
        load_artifact(art, "cpu")


def test_the_worker_folds_prices_and_its_promotions_carry_the_learned_score() -> None:
    settings = Settings(
        model_dir=DEMO_MODEL, quiet_hours="", inference_provider="cpu", cart_abandon_after_s=60
    )
    p = local_pipeline(settings, budget_per_partition=100.0)
    served = p.models.current
    assert served is not None and served.prices is not None
    ref = served.prices
    cat, points = next((c, v) for c, v in ref.categories.items() if len(v) >= 4)
    cheap = points[0]
    raw = []
    for i, kind in enumerate(("view", "view", "add")):
        d: dict[str, Any] = {
            "schema_version": 1,
            "event_id": f"p{i}",
            "user_id": "shopper",
            "event_time": (T0 + timedelta(seconds=i)).isoformat(),
            "item_id": f"item{i}",
            "category": cat,
        }
        d |= (
            {"type": "view", "price": cheap}
            if kind == "view"
            else {"type": "cart", "action": "add", "quantity": 1, "unit_price": cheap}
        )
        raw.append(d)
    raw.append(
        {
            "schema_version": 1,
            "event_id": "p9",
            "user_id": "shopper",
            "type": "search",
            "query": "x",
            "event_time": (T0 + timedelta(hours=2)).isoformat(),
        }
    )  # moves event time: the cart is due
    outputs = []
    for d in raw:
        outputs += p.process([Message(0, b"shopper", orjson.dumps(d), T0.timestamp())]).outputs
    state = UserState.loads(p.users[b"shopper"])
    x = ref.observation(cat, cheap)
    assert x is not None and state.promo[pr.EVIDENCE] == [3, pytest.approx(3 * x)]
    assert state.promo[pr.SCORE] == ref.score(3, 3 * x) > 0.5  # three cheapest-item choices
    promos = [orjson.loads(o.value) for o in outputs if o.topic == settings.topic_promotions]
    assert promos and all(r["scores"]["price_sensitivity"] == state.promo[pr.SCORE] for r in promos)
