"""Offers chosen from measured response: Thompson sampling over offer arms, per context.

Arms: a reminder, or a discount of 5, 10, 15 ... percent up to ``max_discount_percent``. Context:
the trigger kind, the user's propensity bucket (none, below the reminder threshold of the model
that scored the user, at or above it) and price-sensitivity bucket (below 0.2, below 0.5, above). Reward:
the net revenue of the attributed outcome (the order's revenue less the discount cost when the
user converted in the window, else 0), learned from treated promotions only (the holdout group
was not contacted: its outcomes say nothing about an offer).

Posterior: per arm, a normal model of the mean reward, from the arm's count, sum and sum of
squares, with one pseudo-observation at the context's pooled mean and the context's pooled
variance (at least ``MIN_VAR``). Thompson sampling draws each arm's mean ``DRAWS`` times; the share
of draws an arm wins is its Thompson probability; the chosen arm is drawn from those probabilities
mixed with ``exploration`` spread evenly over the arms, so every arm keeps at least
``exploration / arms`` (bounded exploration, and a known propensity for offline evaluation: the
probability of the chosen arm goes into the promotion's ``scores["offer_probability"]``). All draws
come from a generator seeded by the promotion id: the same input state gives the same offer, so a
redelivered event decides what it decided before.

State: in the changelogged budget table (``streams.promotions.Budget``), one key per partition
and context (``b"bandit/<partition>/<context>"``): a partition's posterior is learned from the
outcomes of its own users and moves with the partition on a rebalance, restored from the
changelog after a restart. Partitions do not share what they learn: with N partitions each learns
from 1/N of the traffic (a deliberate trade: exact, restart-safe state without a cross-partition
protocol; pooling partitions is future work).
"""

from __future__ import annotations

import hashlib
from collections.abc import MutableMapping
from dataclasses import dataclass

import numpy as np
import orjson

DRAWS = 256  # Thompson draws per decision (the arm probabilities' resolution)
MIN_VAR = 1.0  # floor of the reward variance (currency units squared): a new context explores


def arms(max_discount_percent: float) -> list[float]:
    """0 (a reminder) and the discounts of 5 % steps up to the maximum."""
    return [0.0, *[float(p) for p in range(5, int(max_discount_percent) + 1, 5)]]


def context(kind: str, propensity: float | None, reminder: float, sensitivity: float) -> str:
    """The context key of a decision (module docstring)."""
    p = "none" if propensity is None else "low" if propensity < reminder else "high"
    s = "low" if sensitivity < 0.2 else "mid" if sensitivity < 0.5 else "high"
    return f"{kind}|p={p}|s={s}"


@dataclass
class Choice:
    percent: float  # 0: a reminder
    probability: float  # of this arm under the policy that chose it
    context: str


class Bandit:
    """Thompson sampling over ``arms`` with posteriors in ``table`` (module docstring)."""

    def __init__(
        self, table: MutableMapping[bytes, bytes], arm_values: list[float], exploration: float
    ) -> None:
        self.table = table
        self.arms = arm_values
        self.exploration = exploration

    def _key(self, partition: int, ctx: str) -> bytes:
        return b"bandit/%d/%s" % (partition, ctx.encode())

    def stats(self, partition: int, ctx: str) -> np.ndarray:
        """(arms, 3): count, sum and sum of squares of the rewards seen per arm."""
        raw = self.table.get(self._key(partition, ctx))
        held = orjson.loads(raw) if raw else {}
        return np.array([held.get(f"{a:g}", [0.0, 0.0, 0.0]) for a in self.arms], dtype=np.float64)

    def probabilities(self, partition: int, ctx: str, seed: str) -> np.ndarray:
        """Each arm's probability of being chosen now (Thompson share mixed with exploration)."""
        s = self.stats(partition, ctx)
        n, total, squares = s[:, 0], s[:, 1], s[:, 2]
        seen = n.sum()
        pooled = total.sum() / seen if seen else 0.0
        var = max(MIN_VAR, squares.sum() / seen - pooled**2) if seen > 1 else MIN_VAR
        mean = (total + pooled) / (n + 1)
        rng = _rng(seed, "draws")
        draws = rng.normal(mean, np.sqrt(var / (n + 1)), size=(DRAWS, len(self.arms)))
        wins = np.bincount(draws.argmax(axis=1), minlength=len(self.arms)) / DRAWS
        return (1 - self.exploration) * wins + self.exploration / len(self.arms)

    def choose(self, partition: int, ctx: str, seed: str) -> Choice:
        p = self.probabilities(partition, ctx, seed)
        u = _rng(seed, "pick").random()
        i = min(int(np.searchsorted(np.cumsum(p), u, side="right")), len(p) - 1)
        return Choice(self.arms[i], float(p[i]), ctx)

    def learn(self, partition: int, ctx: str, percent: float, reward: float) -> None:
        key = self._key(partition, ctx)
        raw = self.table.get(key)
        held = orjson.loads(raw) if raw else {}
        n, total, squares = held.get(f"{percent:g}", [0.0, 0.0, 0.0])
        held[f"{percent:g}"] = [n + 1, total + reward, squares + reward * reward]
        self.table[key] = orjson.dumps(held)


def _rng(seed: str, purpose: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}\x1f{purpose}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))
