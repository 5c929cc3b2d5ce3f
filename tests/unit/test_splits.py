"""The data sets' validation and test periods (``streams.splits``), shared by training and the
offline policy report, importable without torch."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from streams.splits import split_bounds


def test_taobao_users_splits_on_beijing_days() -> None:
    beijing_midnight = [datetime(2017, 12, d, 16, tzinfo=UTC).timestamp() for d in (1, 2, 3)]
    assert split_bounds("taobao-users", []) == tuple(beijing_midnight)
    assert split_bounds("taobao-users", [0.0, 1.0]) == tuple(beijing_midnight)  # times not read


def test_other_logs_split_at_the_70_and_85_percent_quantiles_of_token_time() -> None:
    times = [float(t) for t in range(1000, 1100)]
    random.Random(0).shuffle(times)
    assert split_bounds("rees46", times) == (1070.0, 1085.0, 1100.0)
    # int() truncates as modeling's build_split did: 7 tokens -> positions 4 and 5
    assert split_bounds("rees46-demo", [10, 20, 30, 40, 50, 60, 70]) == (50.0, 60.0, 71.0)
    assert split_bounds("instacart", [5, 5, 5]) == (5.0, 5.0, 6.0)
    with pytest.raises(ValueError, match="no events"):
        split_bounds("rees46", [])


def test_splits_and_the_offline_report_import_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import streams.splits, streams.policy_eval"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
