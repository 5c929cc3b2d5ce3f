"""Exported graphs side by side: milliseconds per onnxruntime call at several batch sizes.

Each ``--models`` folder's graph gets the same inputs (token rows of 50 that repeat a dozen
catalogue items each, so the repeat bonus is at work; random kinds, gaps and context), one
onnxruntime thread, as the worker runs it. ``--rounds`` rounds, the graphs interleaved within a
round; every round is printed, then the medians. For ``shopstream export --catalogue int8``
against the exact export of the same run:

    python bench/graph_speed.py --models artifacts/taobao-slice artifacts/taobao-slice-int8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def session(folder: Path) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def feeds(
    sess: Any, n_items: int, rows: int, rng: np.random.Generator, length: int = 50
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for spec in sess.get_inputs():
        shape = [rows if i == 0 else (d if isinstance(d, int) else length) for i, d in enumerate(spec.shape)]
        if spec.name == "items":
            pool = rng.integers(2, n_items, size=(rows, 12))
            out["items"] = np.take_along_axis(pool, rng.integers(0, 12, size=(rows, length)), axis=1)
        elif "int" in spec.type:
            out[spec.name] = rng.integers(0, 5, size=shape).astype(np.int64)
        else:
            out[spec.name] = rng.random(shape).astype(np.float32)
    return out


def ms_per_call(sess: Any, inputs: dict[str, np.ndarray], calls: int) -> float:
    for _ in range(2):
        sess.run(None, inputs)
    start = time.perf_counter()
    for _ in range(calls):
        sess.run(None, inputs)
    return (time.perf_counter() - start) / calls * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, nargs="+", required=True, help="exported model folders")
    ap.add_argument("--batches", default="1,8,20,34,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10, help="calls per graph, batch and round")
    args = ap.parse_args()
    manifests = [json.loads((m / "manifest.json").read_text()) for m in args.models]
    if len({m["n_items"] for m in manifests}) != 1:
        raise SystemExit("the graphs score different catalogues: compare exports of one run")
    sessions = [session(m) for m in args.models]
    names = [
        f"{m.name} ({doc.get('catalogue', {}).get('product', 'fp32')})"
        for m, doc in zip(args.models, manifests, strict=True)
    ]
    rng = np.random.default_rng(0)
    print(
        f"{manifests[0]['n_items']} items; ms per call, one onnxruntime thread; "
        f"{args.rounds} rounds interleaved"
    )
    table: dict[int, list[list[float]]] = {}
    for rows in (int(b) for b in args.batches.split(",")):
        inputs = feeds(sessions[0], manifests[0]["n_items"], rows, rng)
        runs: list[list[float]] = [[] for _ in sessions]
        for r in range(args.rounds):
            for i, sess in enumerate(sessions):
                runs[i].append(ms_per_call(sess, inputs, args.calls))
            print(
                f"batch {rows}, round {r + 1}: "
                + "; ".join(f"{n} {x[-1]:.2f}" for n, x in zip(names, runs, strict=True))
            )
        table[rows] = runs
    print("| batch | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for rows, runs in table.items():
        print(f"| {rows} | " + " | ".join(f"{statistics.median(x):.2f} ms" for x in runs) + " |")


if __name__ == "__main__":
    main()
