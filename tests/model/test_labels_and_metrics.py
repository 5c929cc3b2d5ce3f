"""Known answers for the event-log labels, the evaluation metrics and the exporter's id check."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from exporters.onnx_export import id_mismatch
from modeling.metrics import bootstrap_ci, ranks_from_scores
from modeling.model import BehaviourModel, ModelConfig, ServingModel
from modeling.sequences import (
    CENSORED,
    UserSeq,
    Vocab,
    _bought_within,
    _cases,
    _windows,
    case_positions,
    serving_exclusions,
)
from streams.features import N_CONTEXT
from streams.state import TokenKind

V, C, P = int(TokenKind.VIEW), int(TokenKind.CART_ADD), int(TokenKind.PURCHASE)
HOUR = 3600.0


def user(name: str) -> UserSeq:
    # view, cart, view at 0 h / 1 h / 2 h, then nothing until a purchase 10 h later
    return UserSeq(name, ["a", "b", "c", "d"], [V, C, V, P], [0.0, HOUR, 2 * HOUR, 12 * HOUR])


def test_two_identical_users_get_identical_training_labels() -> None:
    seqs = [user("u1"), user("u2")]
    vocab = Vocab.build(s.items for s in seqs)
    cases = _windows(seqs, [4, 4], vocab, max_len=8, horizon_s=6 * HOUR, end=100 * HOUR)
    assert cases.bought[0].tolist() == cases.bought[1].tolist()
    # left-padded: positions 0..2 are the view, the cart add and the view; none buys within 6 h
    assert cases.bought[0][-3:].tolist() == [0, 0, 0]


def test_censoring_does_not_depend_on_the_outcome() -> None:
    seq = UserSeq("u", ["a", "b", "c"], [V, V, P], [0.0, 5 * HOUR, 6 * HOUR])
    # the period ends at 8 h: a 6 h horizon from 5 h runs past it, purchase or not
    assert _bought_within(seq, 1, 3, 6 * HOUR, end=8 * HOUR) == CENSORED
    assert _bought_within(seq, 0, 3, 6 * HOUR, end=8 * HOUR) == 1  # 0 h + 6 h <= 8 h: observed
    quiet = UserSeq("v", ["a", "b"], [V, V], [0.0, 5 * HOUR])
    assert _bought_within(quiet, 1, 2, 6 * HOUR, end=8 * HOUR) == CENSORED
    assert _bought_within(quiet, 0, 2, 6 * HOUR, end=8 * HOUR) == 0


def test_a_multi_line_order_is_one_event() -> None:
    # a view, then an order of two lines (one event), then a view 20 h later
    seq = UserSeq("u", ["a", "b", "c", "d"], [V, P, P, V], [0.0, HOUR, HOUR, 21 * HOUR], events=[0, 1, 1, 2])
    assert _bought_within(seq, 1, 4, 6 * HOUR) == 0  # the order's second line is not a later purchase
    assert _bought_within(seq, 0, 4, 6 * HOUR) == 1
    vocab = Vocab.build([seq.items])
    cases = _cases([seq], [(1, 4)], vocab, max_len=8, horizon_s=6 * HOUR)
    # cases start at the order (history: the view) and at the last view (history: view + whole order)
    assert len(cases) == 2
    assert list(case_positions(seq, 0, 4)) == [1, 3]  # the positions those cases start at
    assert list(case_positions(seq, 2, 4)) == [3]  # never the order's second line
    assert cases.bought.tolist() == [1, 0]
    assert cases.history == [[vocab.encode("a")], [vocab.encode(x) for x in "abc"]]
    assert cases.context is not None and cases.context.shape == (2, N_CONTEXT)
    assert serving_exclusions(seq, 3) == {"b", "c"}  # the order just placed: its own items, bought


def test_ties_count_as_half() -> None:
    scores = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 2.0]])  # target 3 ties with 2 and 4, below 5
    ranks = ranks_from_scores(scores.clone(), torch.tensor([3]), None)
    assert ranks.tolist() == [1.0 + 0.5 * 2]
    alone = ranks_from_scores(torch.tensor([[0.0, 0.0, 1.0, 3.0]]), torch.tensor([3]), None)
    assert alone.tolist() == [0.0]


def test_bootstrap_resamples_users_not_cases() -> None:
    # one user with 99 hits and one with a single miss: two users is all the evidence there is
    values = np.array([1.0] * 99 + [0.0])
    groups = np.array([0] * 99 + [1])
    lo_cases, _ = bootstrap_ci(values, np.mean, n=400)
    lo_users, hi_users = bootstrap_ci(values, np.mean, n=400, groups=groups)
    assert lo_cases > 0.95
    assert lo_users == 0.0 and hi_users == 1.0


def test_parity_check_fails_on_a_swapped_id() -> None:
    torch.manual_seed(0)
    model = BehaviourModel(ModelConfig(n_items=30, d_model=8, n_layers=1, n_heads=1, max_len=6)).eval()
    serving = ServingModel(model, k=5).eval()
    items = torch.randint(2, 30, (3, 6))
    kinds = torch.full_like(items, V)
    gaps = torch.ones_like(items)
    arrays = [a.numpy() for a in (items, kinds, gaps)]
    with torch.no_grad():
        ids, scores, _ = serving(items, kinds, gaps)
    ids_np, scores_np = ids.numpy(), scores.numpy()
    assert id_mismatch(ids_np, scores_np, ids_np, serving, arrays) == 0.0
    swapped = ids_np.copy()
    swapped[0, 0] = next(i for i in range(2, 30) if i not in ids_np[0])  # another id, same reported score
    assert id_mismatch(swapped, scores_np, ids_np, serving, arrays) > 0


def test_propensity_ranks_only_above_chance_with_users_resampled() -> None:
    """Known answers: scores that order every positive above every negative rank; the same
    scores reversed, and scores unrelated to the labels, do not; one class says why."""
    from modeling.heads import propensity_ranks

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 5)  # 200 users, 5 cases each
    labels = (rng.random(1000) < 0.2).astype(np.int64)
    labels[::50] = -1  # censored cases are left out
    perfect = labels + rng.random(1000) * 0.5
    good = propensity_ranks(perfect, labels, users)
    assert good["ranks"] is True and good["valid_ROC-AUC"] == 1.0 and good["ci95"][0] > 0.5
    assert propensity_ranks(-perfect, labels, users)["ranks"] is False
    noise = propensity_ranks(rng.random(1000), labels, users)
    assert noise["ranks"] is False and noise["ci95"][0] < 0.5 < noise["ci95"][1]
    one = propensity_ranks(np.ones(4), np.array([0, 0, -1, 0]), np.arange(4))
    assert one == {"ranks": False, "reason": "3 labelled validation cases, 0 positive"}


def test_thresholds_are_written_only_for_a_propensity_that_ranks(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``write_calibration``: the 90th / 75th percentiles of the validation scores where they rank
    the validation cases, none (and ``propensity_ranks.ranks`` false) where they do not."""
    import json
    from types import SimpleNamespace

    import modeling.heads as heads

    rng = np.random.default_rng(1)
    labels = (rng.random(2000) < 0.2).astype(np.int64)
    users = np.repeat(np.arange(400), 5)
    split = SimpleNamespace(valid=SimpleNamespace(bought=labels, users=users), bounds={"test_start": 1.0})
    informative = 0.1 + 0.5 * labels + 0.3 * rng.random(2000)
    for scores, ranks in ((informative, True), (rng.random(2000), False)):
        monkeypatch.setattr(heads, "propensity_scores", lambda *_a, s=scores: s)
        cal = heads.write_calibration(None, split, None, {}, tmp_path)  # type: ignore[arg-type]
        assert cal["propensity_ranks"]["ranks"] is ranks
        assert json.loads((tmp_path / "calibration.json").read_text()) == cal
        if ranks:
            th = cal["propensity_thresholds"]
            assert th["high_intent"] == pytest.approx(np.quantile(scores, 0.9))
            assert th["reminder"] == pytest.approx(np.quantile(scores, 0.75))
        else:
            assert "propensity_thresholds" not in cal
