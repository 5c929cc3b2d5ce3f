"""``bench/pipeline_cost.py``'s share of the wall time in onnxruntime: a known answer."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.unit.bench_scripts import bench_script


def bench_module() -> ModuleType:
    return bench_script("pipeline_cost")


def test_model_calls_are_timed_and_counted_failed_ones_too(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = bench_module()
    ticks = iter([10.0, 12.5, 20.0, 20.25, 30.0, 31.0])  # start and end of each of three calls
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    seen: list[tuple[Any, ...]] = []

    def run(*args: Any) -> str:
        seen.append(args)
        if len(seen) == 3:
            raise RuntimeError("onnxruntime failed")
        return f"scores {len(seen)}"

    art = SimpleNamespace(session=SimpleNamespace(run=run))
    pipeline = SimpleNamespace(models=SimpleNamespace(current=art))
    total = bench.timed_model_calls(pipeline)
    assert art.session.run(["out"], {"items": 1}) == "scores 1"
    assert art.session.run(["out"], {"items": 2}) == "scores 2"
    with pytest.raises(RuntimeError):
        art.session.run(["out"], {"items": 3})
    assert seen == [(["out"], {"items": 1}), (["out"], {"items": 2}), (["out"], {"items": 3})]
    assert total == [2.5 + 0.25 + 1.0, 3]


def test_no_model_means_nothing_timed() -> None:
    bench = bench_module()
    assert bench.timed_model_calls(SimpleNamespace(models=SimpleNamespace(current=None))) == [0.0, 0.0]
