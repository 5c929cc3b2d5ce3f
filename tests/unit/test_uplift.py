"""The uplift report against a simulation with a known answer (tests only, clearly simulated).

The simulator: users get one to three promotions of one kind and offer each; a user in the
holdout group converts with probability ``base``, a treated user with ``base + lift`` (the lift
the report must find), independently per promotion; a converting order is worth ``order`` and a
sent ``percent_off`` offer costs its percent of the promoted items' revenue (``items``). Known
answers: the incremental conversion is ``lift`` and the incremental net revenue per promotion is
``lift * order - (base + lift) * items * pct / 100``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from streams.attribution import dedupe
from streams.errors import ConfigurationError
from streams.offpolicy import evaluate, join
from streams.settings import Settings
from streams.uplift import lift, render, report, run


def simulate(
    seed: int,
    users: int,
    base: float,
    gain: float,
    order: float = 40.0,
    items: float = 25.0,
    pct: float = 10.0,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for u in range(users):
        holdout = bool(rng.random() < 0.5)
        for k in range(int(rng.integers(1, 4))):
            converted = bool(rng.random() < base + (0.0 if holdout else gain))
            out.append(
                {
                    "promotion_id": f"p{u}-{k}",
                    "user_id": f"u{u}",
                    "kind": "cart_abandonment",
                    "offer": {"kind": "percent_off", "value": pct},
                    "holdout": holdout,
                    "converted": converted,
                    "closed_by": "order" if converted else "window",
                    "revenue_order": order if converted else 0.0,
                    "revenue_items": items if converted else 0.0,
                    "discount_cost": items * pct / 100 if converted and not holdout else 0.0,
                }
            )
    return out


def test_the_report_recovers_the_simulated_lift_within_its_interval() -> None:
    base, gain = 0.20, 0.10
    rep = report(simulate(seed=1, users=4000, base=base, gain=gain))
    (r,) = rep["by_kind_offer"].values()
    conv, net = r["incremental_conversion"], r["incremental_net_revenue_per_promotion"]
    assert conv["ci95"][0] <= gain <= conv["ci95"][1]
    assert conv["ci95"][1] - conv["ci95"][0] < 0.05  # informative, not just wide
    want = gain * 40.0 - (base + gain) * 25.0 * 10.0 / 100
    assert net["ci95"][0] <= want <= net["ci95"][1]
    assert r["treated"]["conversion"] == pytest.approx(base + gain, abs=0.02)
    assert "cart_abandonment percent_off:10" in render(rep)


def test_the_interval_covers_the_known_lift_about_95_times_in_100() -> None:
    covered = 0
    for seed in range(40):
        outcomes = simulate(seed=100 + seed, users=300, base=0.2, gain=0.1)
        held = [o for o in outcomes if o["holdout"]]
        sent = [o for o in outcomes if not o["holdout"]]
        lo, hi = lift(sent, held, seed=seed)["incremental_conversion"]["ci95"]
        covered += lo <= 0.1 <= hi
    assert 34 <= covered <= 40  # 95 % nominal; users resampled, so promotions of a user move together


def test_with_the_promotion_records_the_report_adds_the_off_policy_estimates(tmp_path: Path) -> None:
    outcomes = simulate(seed=6, users=300, base=0.2, gain=0.1)
    promos = [
        {
            "promotion_id": o["promotion_id"],
            "user_id": o["user_id"],
            "kind": o["kind"],
            "offer": o["offer"],
            "holdout": o["holdout"],
            "reason": "cart idle",
            "scores": {"offer_probability": 0.5, "offer_arm": 10.0},
        }
        for o in outcomes
    ]
    src, psrc = tmp_path / "outcomes.jsonl", tmp_path / "promotions.jsonl"
    src.write_bytes(b"\n".join(orjson.dumps(o) for o in outcomes))
    psrc.write_bytes(b"\n".join(orjson.dumps(p) for p in promos))
    rep = run(Settings(max_discount_percent=15.0), str(src), tmp_path / "out", promotions=str(psrc))
    rows, left_out = join(promos, outcomes)
    assert left_out == {"holdout": sum(o["holdout"] for o in outcomes)}
    assert rep["off_policy"] == orjson.loads(orjson.dumps(evaluate(rows, 15.0)))
    ten = rep["off_policy"]["cart_abandonment"]["targets"]["percent_off:10"]
    treated = [o for o in outcomes if not o["holdout"]]
    # every treated decision chose 10 % with probability 0.5: SNIPS is the plain mean
    want = sum(o["revenue_order"] - o["discount_cost"] for o in treated) / len(treated)
    assert ten["matched"] == len(treated) and ten["snips_net_revenue"]["value"] == pytest.approx(want)
    assert "Off-policy estimates" in render(rep)
    with pytest.raises(ConfigurationError, match="--file"):
        run(Settings(), None, tmp_path / "o", promotions=str(psrc))


def test_duplicates_count_once_and_capacity_closures_not_at_all() -> None:
    a = {"promotion_id": "p1", "closed_by": "order"}
    assert dedupe([a, dict(a), {"promotion_id": "p2", "closed_by": "capacity"}]) == [a]
    one_sided = report(simulate(seed=3, users=50, base=0.2, gain=0.1, pct=0.0))
    assert all("incremental_conversion" in r for r in one_sided["by_kind_offer"].values())
    only_treated = lift([{"user_id": "u", "converted": True, "revenue_order": 1.0, "discount_cost": 0.0}], [])
    assert only_treated["note"] == "no outcomes on one side: no lift"


def test_the_command_reads_a_file_and_writes_the_report_and_its_plot(tmp_path: Path) -> None:
    outcomes = simulate(seed=5, users=400, base=0.2, gain=0.1)
    src = tmp_path / "outcomes.jsonl"
    src.write_bytes(b"\n".join(orjson.dumps(o) for o in outcomes) + b"\n")
    rep = run(Settings(), str(src), tmp_path / "out")
    written = orjson.loads((tmp_path / "out" / "uplift.json").read_bytes())
    assert written == {**report(outcomes), "off_policy": {}, "off_policy_left_out": {}}
    assert (
        rep["plot"] == str(tmp_path / "out" / "uplift.png")
        and (tmp_path / "out" / "uplift.png").stat().st_size
    )
