"""Would an int8 first pass over the catalogue pay? The serving graph's catalogue-wide step (the
hidden state times the item table, then top-K) in fp32 beside the same step with int8 weights
(onnxruntime's ``DynamicQuantizeMatMul``, one scale per item), side by side in one run.

The item table is the exported model's own (``--model``). Its graph does not expose hidden states,
so stand-ins are used: the vectors of random catalogue items plus noise (``--noise`` times the
table's spread). Printed per batch size: microseconds per row of each, and how much of the exact
top-10 and top-100 lies inside the int8 pass's top ``--candidates`` (what an exact re-rank of those
candidates could recover). The probe that led to the serving path: ``shopstream export --catalogue
int8`` (``exporters/catalogue.py``; README, Benchmarks, "An int8 first pass over the catalogue").

    python bench/catalogue_int8.py --model artifacts/taobao-slice [--candidates 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def item_table(model: Path) -> tuple[np.ndarray, np.ndarray]:
    """The graph's catalogue product weights (d, items) and the item table without PAD and UNK."""
    inits = {i.name: i for i in onnx.load(str(model / "model.onnx")).graph.initializer}
    table = numpy_helper.to_array(inits["table"])[2:]
    n, d = table.shape
    weights = next(numpy_helper.to_array(i) for i in inits.values() if list(i.dims) == [d, n])
    return weights.astype(np.float32), table.astype(np.float32)


def session(weights: np.ndarray, k: int, quantized: bool) -> Any:
    """hidden (b, d) -> top-k scores and ids, in fp32 or with int8 weights."""
    d, _ = weights.shape
    inits = [numpy_helper.from_array(np.array([k], dtype=np.int64), "k")]
    if quantized:
        scale = (np.abs(weights).max(axis=0) / 127.0).astype(np.float32)
        q = np.round(weights / scale).astype(np.int8)
        inits += [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale, "scale")]
        product = helper.make_node(
            "DynamicQuantizeMatMul", ["h", "wq", "scale"], ["s"], domain="com.microsoft"
        )
    else:
        inits.append(numpy_helper.from_array(weights, "w"))
        product = helper.make_node("MatMul", ["h", "w"], ["s"])
    graph = helper.make_graph(
        [product, helper.make_node("TopK", ["s", "k"], ["v", "i"], axis=1)],
        "catalogue",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", d])],
        [
            helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", k]),
            helper.make_tensor_value_info("i", TensorProto.INT64, ["b", k]),
        ],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def per_row_us(sess: Any, h: np.ndarray, reps: int) -> float:
    for _ in range(3):
        sess.run(None, {"h": h})
    t = time.perf_counter()
    for _ in range(reps):
        sess.run(None, {"h": h})
    return (time.perf_counter() - t) / reps * 1e6 / len(h)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True, help="exported model folder")
    ap.add_argument("--candidates", type=int, default=200, help="top-K of the int8 pass")
    ap.add_argument("--noise", type=float, default=0.5, help="stand-in hidden states: noise / table spread")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    weights, table = item_table(args.model)
    fp32, int8 = session(weights, args.candidates, False), session(weights, args.candidates, True)
    rng = np.random.default_rng(0)
    print(f"item table {table.shape[0]} x {table.shape[1]}; stand-in hidden states, noise {args.noise}")
    print("| batch | fp32 us/row | int8 us/row | exact top-10 in int8 candidates | exact top-100 |")
    print("|---|---|---|---|---|")
    for n in (1, 8, 32, 64):
        picked = table[rng.integers(0, len(table), n)]
        h = (picked + args.noise * table.std() * rng.standard_normal(picked.shape)).astype(np.float32)
        a = [per_row_us(s, h, args.reps) for s in (fp32, int8, fp32, int8)]  # interleaved
        exact = np.argsort(-(h @ weights), axis=1)
        candidates = int8.run(None, {"h": h})[1]
        inside = {
            top: np.mean([len(set(exact[r, :top]) & set(candidates[r])) / top for r in range(n)])
            for top in (10, 100)
        }
        print(
            f"| {n} | {min(a[0], a[2]):.0f} | {min(a[1], a[3]):.0f} | {inside[10]:.4f} | {inside[100]:.4f} |"
        )


if __name__ == "__main__":
    main()
