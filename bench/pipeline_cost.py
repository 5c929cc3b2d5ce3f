"""CPU cost of the worker's per-batch work without Kafka or faust, batch sizes side by side.

Runs ``streams.pipeline.Pipeline`` (validate, fold state, baseline, onnxruntime scoring, filters,
promotion policy) over a real data set with in-memory tables, for each batch size, fresh state
each time. The difference to ``bench/model_batching.py`` is what faust and Kafka cost. Beside
the CPU time per event it prints the wall time per event and the share of it spent inside
onnxruntime's ``run`` (``--provider cuda`` on a GPU, where the two differ most).

    python bench/pipeline_cost.py [--model deploy/demo/model] [--dataset rees46-demo] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.pipeline import Message, Pipeline, local_pipeline  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.sources.datasets import load  # noqa: E402
from streams.state import user_partition  # noqa: E402


def build(settings: Settings) -> Pipeline:
    return local_pipeline(settings, budget_per_partition=1e9)


def timed_model_calls(pipeline: Pipeline) -> list[float]:
    """Wrap the served model's onnxruntime ``run`` with a wall clock: [seconds in it, calls]."""
    total = [0.0, 0.0]
    art = pipeline.models.current
    if art is None:
        return total
    run = art.session.run

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - t
            total[1] += 1

    art.session = SimpleNamespace(run=timed)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "deploy" / "demo" / "model")
    ap.add_argument("--dataset", default="rees46-demo")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--profile", action="store_true", help="cProfile the last batch size, top 15")
    ap.add_argument("--provider", default="cpu", help="onnxruntime execution provider: auto, cpu or cuda")
    args = ap.parse_args()
    settings = Settings(model_dir=args.model, inference_provider=args.provider)
    events = list(load(args.dataset, settings.datasets_dir))[: args.limit]
    msgs = [
        Message(user_partition(e["user_id"].encode(), 8), e["user_id"].encode(), orjson.dumps(e), time.time())
        for e in events
    ]
    print(f"{len(msgs)} {args.dataset} events, model {args.model}")
    sizes = [int(b) for b in args.batches.split(",")]
    for size in sizes:
        pipeline = build(settings)
        in_model = timed_model_calls(pipeline)

        def run(p: Pipeline = pipeline, size: int = size) -> None:
            for i in range(0, len(msgs), size):
                p.process(msgs[i : i + size])

        started, wall_start = time.process_time(), time.perf_counter()
        if args.profile and size == sizes[-1]:
            prof = cProfile.Profile()
            prof.runcall(run)
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        else:
            run()
        cpu, wall = time.process_time() - started, time.perf_counter() - wall_start
        model = f", model calls {in_model[0] / wall:4.0%} of the wall time" if in_model[1] else ""
        print(
            f"batch {size:4d}: {cpu * 1e6 / len(msgs):6.0f} us CPU/event, {len(msgs) / cpu:7.0f} events/s "
            f"of CPU; wall {wall * 1e6 / len(msgs):6.0f} us/event{model} "
            f"({pipeline.models.current.provider if pipeline.models.current else 'no model'})"
        )


if __name__ == "__main__":
    main()
