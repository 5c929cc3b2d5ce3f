"""Where a data set's validation and test periods start: one definition for training and serving.

In: a data set name (as ``shopstream replay`` and ``shopstream train --data`` spell it) and the
event times of its tokens (unix seconds, one per token as ``streams.state.event_tokens`` makes
them: an order contributes one per line). Out: ``(valid_start, test_start, test_end)`` in unix
seconds; training learns before ``valid_start``, the model is chosen on ``[valid_start,
test_start)`` and tested on ``[test_start, test_end)``.

- ``taobao-users``: calendar days in Beijing time (UTC+8): validation 2017-12-02, test 2017-12-03.
- any other event log: the 70 % and 85 % quantiles of its token times; the test period runs to one
  second past the last token.

``modeling`` splits its sequences with this and ``shopstream evaluate-promotions`` counts from the
test start, so the offline policy report is scored on events the model did not learn from. No
torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

BEIJING = timezone(timedelta(hours=8))
VALID_QUANTILE, TEST_QUANTILE = 0.70, 0.85


def _beijing_day(day: int) -> float:
    return datetime(2017, 12, day, tzinfo=BEIJING).timestamp()


def split_bounds(name: str, times: Sequence[float]) -> tuple[float, float, float]:
    """``(valid_start, test_start, test_end)`` of data set ``name`` whose token times are ``times``
    (any order; not read for ``taobao-users``). Raises ``ValueError`` for an empty log."""
    if name == "taobao-users":
        return _beijing_day(2), _beijing_day(3), _beijing_day(4)
    if not times:
        raise ValueError(f"{name}: no events to split")
    ordered = sorted(times)
    n = len(ordered)
    return (
        float(ordered[int(VALID_QUANTILE * n)]),
        float(ordered[int(TEST_QUANTILE * n)]),
        float(ordered[-1] + 1),
    )
