"""Recency, frequency and clock features of a user's recent tokens, shared by training and serving.

In: the kinds and event times (unix seconds) of a user's newest tokens, oldest first: at serving
time the window ``UserState.seq[-max_len:]`` the graph reads, in training the same window before a
case's position. Out: ``N_CONTEXT`` floats (``CONTEXT_NAMES``) that the purchase-propensity head
reads beside the sequence model's hidden state, and that the propensity baselines (logistic
regression, gradient-boosted trees) are trained on.

One function computes them for both sides, so the served propensity sees exactly what training saw.
Every feature is a function of the window only: a user's history beyond the model's context is
not in the state the worker keeps per user, so it is not used in training either. "Now" is the
newest token's event time (the event being answered).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from streams.state import TokenKind

SESSION_GAP_S = 1800.0  # a pause this long starts a new session
_KINDS = [int(k) for k in TokenKind]
_LOG_DAY = math.log1p(24.0 * 3600)

CONTEXT_NAMES: tuple[str, ...] = (
    "log_tokens",
    *(f"log_{k.name.lower()}" for k in TokenKind),
    *(f"last_is_{k.name.lower()}" for k in TokenKind),
    "purchase_share",
    "cart_add_share",
    "log_since_purchase",  # seconds since the newest purchase token (window span + 1 day when none)
    "no_purchase",
    "log_cart_adds_since_purchase",
    "log_since_previous",  # the gap before the newest token
    "log_window_span",
    "log_tokens_1h",
    "log_tokens_24h",
    "log_session_tokens",
    "log_session_span",
    "log_session_items",
    "session_cart_adds",
    "hour_sin",  # hour of day (UTC) of the newest token
    "hour_cos",
    "weekend",
)
N_CONTEXT = len(CONTEXT_NAMES)


def _log(x: float) -> float:
    return math.log1p(max(x, 0.0))


def context_features(
    kinds: Sequence[int], times: Sequence[float], items: Sequence[str] | None = None, now: float | None = None
) -> list[float]:
    """The ``N_CONTEXT`` features of one window (kinds and times oldest first; may be empty), as
    of ``now`` (default: the newest token's time, as the worker answers an event; a daily batch
    scores users as of the day's start)."""
    n = len(kinds)
    if n == 0:
        return [0.0] * N_CONTEXT
    now = float(times[-1]) if now is None else now
    counts = dict.fromkeys(_KINDS, 0)
    last_purchase = -1
    for j, k in enumerate(kinds):
        if k in counts:
            counts[k] += 1
        if k == TokenKind.PURCHASE:
            last_purchase = j
    span = now - float(times[0])
    since_purchase = now - float(times[last_purchase]) if last_purchase >= 0 else span + 24 * 3600.0
    adds_after = sum(1 for k in kinds[last_purchase + 1 :] if k == TokenKind.CART_ADD)
    previous = float(times[-1]) - float(times[-2]) if n > 1 else 0.0
    in_1h = sum(1 for t in times if now - t <= 3600)
    in_24h = sum(1 for t in times if now - t <= 86400)
    start = n - 1
    while start > 0 and float(times[start]) - float(times[start - 1]) < SESSION_GAP_S:
        start -= 1
    session_items = len(set(items[start:])) if items is not None else n - start
    session_adds = sum(1 for k in kinds[start:] if k == TokenKind.CART_ADD)
    hour = (now % 86400) / 3600.0
    angle = 2 * math.pi * hour / 24.0
    day = int(now // 86400) % 7  # 1970-01-01 was a Thursday: day 2 is Saturday, 3 Sunday
    return [
        _log(n),
        *(_log(counts[k]) for k in _KINDS),
        *(1.0 if kinds[-1] == k else 0.0 for k in _KINDS),
        counts[int(TokenKind.PURCHASE)] / n,
        counts[int(TokenKind.CART_ADD)] / n,
        _log(since_purchase) / _LOG_DAY,
        1.0 if last_purchase < 0 else 0.0,
        _log(adds_after),
        _log(previous) / _LOG_DAY,
        _log(span) / _LOG_DAY,
        _log(in_1h),
        _log(in_24h),
        _log(n - start),
        _log(now - float(times[start])) / _LOG_DAY,
        _log(session_items),
        _log(session_adds),
        math.sin(angle),
        math.cos(angle),
        1.0 if day in (2, 3) else 0.0,
    ]
