"""Known answers for the ranking weight of the repeat bonus and the prior shift of the propensity
calibration (modeling.heads.choose_repeat_rank, modeling.train.calibrate_propensity)."""

from __future__ import annotations

import numpy as np
import torch

from modeling.heads import REPEAT_RANK_GRID, _last_hidden, choose_repeat_rank
from modeling.model import BehaviourModel, ModelConfig, ServingModel
from modeling.propensity import roc_auc
from modeling.sequences import Cases
from modeling.train import calibrate_propensity, prior_shift, propensity_scores
from streams.state import TokenKind

V = int(TokenKind.VIEW)
CPU = torch.device("cpu")


def repeat_model(bonus: float) -> BehaviourModel:
    torch.manual_seed(0)
    model = BehaviourModel(ModelConfig(n_items=40, d_model=8, n_layers=1, n_heads=1, max_len=6, repeat=True))
    with torch.no_grad():
        model.repeat_kind.weight[V] = bonus  # every earlier view of an item adds `bonus`
    return model.eval()


def cases_of(rows: list[list[int]], targets: list[int]) -> Cases:
    items = np.array(rows, dtype=np.int64)
    return Cases(
        items=items,
        kinds=np.where(items > 0, V, 0),
        gaps=np.where(items > 0, 1, 0),
        targets=np.array(targets, dtype=np.int64),
        bought=np.full(len(rows), -1),
        history=[[i for i in r if i > 1] for r in rows],
        serving_exclude=[[] for _ in rows],
    )


def test_the_ranking_weight_moves_the_ranking_only() -> None:
    model = repeat_model(0.5)
    items = torch.tensor([[0, 0, 5, 7, 5, 9]])
    kinds = torch.where(items > 0, V, 0)
    gaps = torch.where(items > 0, 1, 0)
    at = torch.tensor([5])
    with torch.no_grad():
        h = model(items, kinds, gaps)[:, -1]
        before = model.next_item_scores(h, items, kinds, at)
        model.repeat_rank.fill_(3.0)
        calibrated = model.next_item_scores(h, items, kinds, at)
        ranking = model.next_item_scores(h, items, kinds, at, ranking=True)
        top, _, _ = ServingModel(model, k=3)(items, kinds, gaps)
    assert torch.equal(calibrated, before)  # likelihood and perplexity do not see the weight
    extra = torch.zeros(40)
    extra[5], extra[7], extra[9] = 2 * 2 * 0.5, 2 * 0.5, 2 * 0.5  # item 5 seen twice; (3 - 1) x bonus
    torch.testing.assert_close(ranking - calibrated, extra[None, :])
    assert int(top[0, 0]) == int(ranking[0, 2:].argmax()) + 2  # the served top-K ranks the same way


def test_the_smallest_weight_that_ranks_the_revisited_item_first_is_chosen() -> None:
    model = repeat_model(0.05)
    rng = np.random.default_rng(1)
    seen = rng.integers(2, 40, 60)
    rows = [[0, 0, 0, 0, 0, int(i)] for i in seen]
    cases = cases_of(rows, [int(i) for i in seen])  # every user comes back to the item they viewed
    hidden = _last_hidden(model, cases, CPU)
    with torch.no_grad():
        catalogue = torch.cat([model.item_logits(h) * model.logit_scale for _, h in hidden])[:, 2:]
    t = torch.from_numpy(seen - 2)
    own = catalogue.gather(1, t[:, None])[:, 0]
    others = catalogue.scatter(1, t[:, None], float("-inf")).max(dim=1).values
    # the target ranks first (NDCG 1, the best possible) once own + weight x bonus beats every other
    need = float(((others - own) / 0.05).max())
    expected = min(a for a in REPEAT_RANK_GRID if a > need)
    assert expected > REPEAT_RANK_GRID[0]  # the case is not trivial
    chosen = choose_repeat_rank(model, cases, hidden, CPU)
    assert chosen["repeat_rank"] == expected == float(model.repeat_rank)
    assert chosen["by_weight"][str(expected)] == 1.0


def test_the_weight_stays_at_one_when_users_never_come_back() -> None:
    model = repeat_model(0.5)
    rows = [[0, 0, 0, 0, 3, 4], [0, 0, 0, 0, 5, 6]]
    cases = cases_of(rows, [10, 11])
    chosen = choose_repeat_rank(model, cases, _last_hidden(model, cases, CPU), CPU)
    assert chosen["repeat_rank"] == 1.0


def test_prior_shift_known_answer() -> None:
    assert abs(prior_shift(np.zeros(5), 1 / (1 + np.exp(-0.7))) - 0.7) < 1e-9
    z = np.array([-3.0, -1.0, 0.0, 2.0])
    d = prior_shift(z, 0.2)
    assert abs(float(np.mean(1 / (1 + np.exp(-(z + d))))) - 0.2) < 1e-9


def test_calibration_to_a_prior_keeps_the_ranking_and_sets_the_mean() -> None:
    torch.manual_seed(0)
    model = BehaviourModel(ModelConfig(n_items=40, d_model=8, n_layers=1, n_heads=1, max_len=6)).eval()
    rng = np.random.default_rng(2)
    rows = rng.integers(2, 40, (300, 6)).tolist()
    cases = cases_of(rows, [2] * 300)
    cases.bought = (rng.random(300) < 0.1).astype(np.int64)
    platt = calibrate_propensity(model, cases, CPU)
    plain = propensity_scores(model, cases, CPU)
    shifted = calibrate_propensity(model, cases, CPU, prior=0.25)
    p = propensity_scores(model, cases, CPU)
    assert shifted["platt"] == platt["platt"] and shifted["prior"] == 0.25
    assert abs(float(p.mean()) - 0.25) < 1e-4  # the mean calibrated score is the prior
    assert abs(float(plain.mean()) - cases.bought.mean()) < 0.02  # Platt alone matches the valid rate
    assert roc_auc(cases.bought, p) == roc_auc(cases.bought, plain)


def propensity_cases(rng: np.random.Generator, n: int, weights: np.ndarray) -> Cases:
    """Cases whose purchase label follows a logistic model of their window features."""
    context = rng.normal(size=(n, len(weights))).astype(np.float32) * 2 + 1
    bought = (rng.random(n) < 1 / (1 + np.exp(-(context @ weights - 1)))).astype(np.int64)
    items = np.tile(np.array([0, 0, 2, 3, 2, 3]), (n, 1))
    cases = cases_of(items.tolist(), [2] * n)
    cases.bought, cases.context = bought, context
    return cases


def test_the_propensity_branch_starts_as_the_logistic_regression_and_keeps_it() -> None:
    from modeling.heads import fit_propensity, start_from_regression
    from modeling.propensity import LogisticPropensity
    from modeling.sequences import Split, Vocab
    from modeling.train import TrainConfig, _propensity
    from streams.features import N_CONTEXT

    rng = np.random.default_rng(3)
    weights = rng.normal(size=N_CONTEXT) * 0.3
    train, valid = propensity_cases(rng, 600, weights), propensity_cases(rng, 300, weights)
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=4, d_model=8, n_layers=1, n_heads=1, max_len=6, n_context=N_CONTEXT)
    model = BehaviourModel(cfg)
    assert model.prop is not None
    chosen = start_from_regression(model.prop, train, valid)
    regression = LogisticPropensity().fit(train, valid)
    assert chosen == regression.chosen
    assert valid.context is not None
    expected = regression.model.decision_function(valid.context.astype(np.float64))
    with torch.no_grad():
        logits = _propensity(model.eval(), valid, slice(None), CPU, calibrated=False).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)  # epoch 0 is the regression

    # training moves the residual only: the regression's weights are those of the fit above
    split = Split(Vocab.build([]), train, valid, valid, [], train_cases=train)
    fitted = fit_propensity(model, split, CPU, TrainConfig(propensity_epochs=3, propensity_patience=3), False)
    assert fitted["regression"] == regression.chosen and 0 <= fitted["epoch"] <= 3
    coef = regression.model[-1].coef_[0]
    np.testing.assert_allclose(model.prop.linear.weight.detach().numpy()[0], coef, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in model.prop.parameters())  # nothing is left frozen
    # the labels follow the features' logistic model: the residual cannot add more than noise, so
    # whatever epoch validation picked, the branch is the regression again
    assert fitted["kept_residual"] is False and fitted["epoch"] == 0
    if fitted["best_epoch"] > 0:
        assert fitted["residual_valid_gain"]["ci95"][0] <= 0
    with torch.no_grad():
        logits = _propensity(model.eval(), valid, slice(None), CPU, calibrated=False).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_the_residual_gain_is_a_paired_interval_over_users() -> None:
    from modeling.heads import residual_gain

    rng = np.random.default_rng(4)
    labels = (rng.random(2000) < 0.2).astype(np.int64)
    labels[:50] = -1  # unlabelled cases are left out
    users = np.arange(2000) // 4
    regression = rng.random(2000)
    same = residual_gain(labels, regression, regression, users)
    assert same == {"value": 0.0, "ci95": [0.0, 0.0]}  # no gain, and not more than noise
    better = residual_gain(labels, labels + rng.random(2000), regression, users)
    # a perfect ranking against a random one: ROC-AUC 1.0 against about 0.5
    assert abs(better["value"] - 0.5) < 0.05 and better["ci95"][0] > 0.4
