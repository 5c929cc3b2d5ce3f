"""Training from the archive: an archive of a public data set splits exactly as the data set does
(same vocabulary, windows, cases, targets and labels), so training on either gives the same model
up to the run's own noise."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modeling import cli
from modeling.cli import build_split
from modeling.sequences import Cases, Split
from streams.archive import convert
from streams.settings import Settings
from streams.sources.datasets import load


def same_cases(a: Cases | None, b: Cases | None, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is None or b is None:
        return
    for f in dataclasses.fields(Cases):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f"{what}.{f.name}")
        else:
            assert x == y, f"{what}.{f.name}"


def same_split(a: Split, b: Split) -> None:
    assert a.vocab.items == b.vocab.items
    for part in ("train", "valid", "test", "train_cases"):
        same_cases(getattr(a, part), getattr(b, part), part)
    assert a.train_histories == b.train_histories
    assert a.bounds == b.bounds and a.horizon_s == b.horizon_s
    np.testing.assert_array_equal(a.item_feats, b.item_feats)
    assert a.daily.keys() == b.daily.keys()
    for period in a.daily:
        same_cases(a.daily[period], b.daily[period], f"daily.{period}")


def test_an_archive_of_the_demo_sample_splits_as_the_sample(tmp_path: Path, data_dir: Path) -> None:
    root = tmp_path / "archive"
    done = convert(load("rees46-demo", data_dir), str(root), Settings())
    assert done.events == 3000 and not done.rejected
    direct = build_split("rees46-demo", data_dir, max_len=20)
    archived = build_split(f"archive:{root}", data_dir, max_len=20)
    assert len(direct.train) > 100 and len(direct.test) > 100
    same_split(direct, archived)  # 2.4 hours of data: the quantile split of the event logs
    assert archived.name == f"archive:{root}?tz=UTC"  # what the run records, to split again


def test_an_archive_of_taobao_users_splits_by_beijing_days_as_taobao_users(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same inputs to ``time_split`` (a deterministic function: its 30 s of case building is
    skipped here; the test above runs it whole): the same sequences, bounds, horizon, min count."""
    root = tmp_path / "archive"
    done = convert(load("taobao-users", data_dir), str(root), Settings())
    assert done.events == 84287 and not done.rejected
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, {"min_count": 1, **kwargs}))
        return None

    monkeypatch.setattr(cli, "time_split", record)
    build_split("taobao-users", data_dir, max_len=20)
    build_split(f"archive:{root}?tz=Asia/Shanghai", data_dir, max_len=20)
    (direct, kw_direct), (archived, kw_archived) = calls
    assert archived[0] == direct[0]  # every user's tokens, kinds, times and features, in order
    assert archived[1:5] == direct[1:5]  # valid_start, test_start, test_end, max_len
    assert archived[5] == direct[5] == 6 * 3600.0  # the propensity horizon
    assert kw_archived == kw_direct
