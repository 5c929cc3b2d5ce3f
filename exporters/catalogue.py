"""The catalogue step of an exported graph as an int8 first pass and an exact re-rank (opt-in:
``shopstream export --catalogue int8``).

In: an exported serving graph (``exporters.onnx_export``), whose catalogue step is
``MatMul(h, W) -> Mul(logit_scale) -> ScatterElements(add: the repeat bonus) -> TopK(k)`` (without
the scatter for a model without the repeat bonus). Out:
the same graph with that step replaced by
  1. a first pass over the whole catalogue with int8 weights (onnxruntime's
     ``DynamicQuantizeMatMul``, one scale per item, ``logit_scale`` folded into it), the repeat
     bonus added as before, and its top ``candidates``;
  2. the exact fp32 score of each candidate (its row of ``W`` times ``h``, times ``logit_scale``,
     plus its repeat bonus) and the top ``k`` of those.
The outputs keep their names, shapes and meaning: every returned item's score is its exact score
(float error aside); an item is missed only when the first pass ranks it below ``candidates``.

Why: at the batch sizes the worker sees (10-60 events a call), the product reads the whole fp32
item table (4 bytes x d x items: 16.8 MB for the 65k-item Taobao slice) on every call and is the
largest operator of the call (``bench/catalogue_int8.py``). int8 weights are a quarter of the
bytes and run on the cores' int8 dot-product instructions. What it costs in ranking is measured
by the exporter on held-out cases and written to the manifest (``catalogue``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

OPSET_MS = ("com.microsoft", 1)


class CatalogueError(ValueError):
    """The graph's catalogue step is not the shape this module rewrites."""


def _consumers(graph: Any, name: str) -> list[Any]:
    return [n for n in graph.node if name in n.input]


def quantize_catalogue(path: Path, candidates: int) -> dict[str, Any]:
    """Rewrite the graph at ``path`` in place (see the module docstring); returns what the
    manifest records of it: the product, the number of candidates and the items' count."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    topk = next((n for n in graph.node if n.op_type == "TopK" and "top_scores" in n.output), None)
    if topk is None:
        raise CatalogueError(f"{path}: no TopK node that yields top_scores")
    scatter = producer.get(topk.input[0])  # the repeat bonus, where the model has one
    if scatter is not None and scatter.op_type != "ScatterElements":
        scatter = None
    mul = producer.get(scatter.input[0] if scatter is not None else topk.input[0])
    if mul is None or mul.op_type != "Mul":
        raise CatalogueError(f"{path}: the top-K does not read the scaled catalogue logits (or their bonus)")
    scale_name = next((i for i in mul.input if i in inits), None)
    logits_name = next((i for i in mul.input if i not in inits), None)
    matmul = producer.get(logits_name) if logits_name else None
    if scale_name is None or matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in inits:
        raise CatalogueError(f"{path}: the catalogue logits are not MatMul(h, W) * logit_scale")
    if len(_consumers(graph, logits_name or "")) != 1 or len(_consumers(graph, mul.output[0])) != 1:
        raise CatalogueError(f"{path}: the catalogue logits are read elsewhere too")
    weights = numpy_helper.to_array(inits[matmul.input[1]]).astype(np.float32)  # (d, items)
    scale = np.asarray(numpy_helper.to_array(inits[scale_name]), dtype=np.float32)
    if weights.ndim != 2 or scale.size != 1:
        raise CatalogueError(f"{path}: W of shape {weights.shape}, logit_scale of {scale.size} values")
    d, n_items = weights.shape
    c = int(min(max(candidates, 1), n_items))
    k_name = topk.input[1]
    k = int(numpy_helper.to_array(inits[k_name]) if k_name in inits else _constant(graph, k_name))
    if c < k:
        raise CatalogueError(f"{candidates} candidates for a top-{k}: at least {k} are needed")

    # int8 weights, symmetric, one scale per item (column); logit_scale folded into the scales
    col = np.abs(weights).max(axis=0) / 127.0
    col[col == 0] = 1.0
    quantized = np.clip(np.round(weights / col), -127, 127).astype(np.int8)
    h = matmul.input[0]
    ids_name = topk.output[1]

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    pre = "catalogue_int8/"
    const(pre + "wq", quantized)
    const(pre + "wq_scale", (col * float(scale.reshape(()))).astype(np.float32))
    # a candidate's exact row: the graph's own item table where W is its transpose past PAD and
    # UNK (as ``ServingModel`` exports it: no second copy of the catalogue), else W's rows
    table, offset = _rows_of(inits.values(), weights)
    if table is None:
        table, offset = const(pre + "rows", np.ascontiguousarray(weights.T)), 0
    const(pre + "scale", scale.reshape(()).astype(np.float32))
    const(pre + "c", np.array([c], dtype=np.int64))
    const(pre + "axis1", np.array([1], dtype=np.int64))
    const(pre + "axis2", np.array([2], dtype=np.int64))

    # 1. the first pass replaces MatMul -> Mul; the bonus scatter stays, its top-K keeps c
    approx = pre + "approx"
    first = helper.make_node(
        "DynamicQuantizeMatMul",
        [h, pre + "wq", pre + "wq_scale"],
        [approx],
        name=pre + "first_pass",
        domain="com.microsoft",
    )
    if scatter is not None:
        scatter.input[0] = approx
    else:
        topk.input[0] = approx
    # the first pass's scores get the named shape the exact ones had (``annotate_shapes``): with
    # it onnxruntime can prove the bonus scatter may work in place instead of copying every row
    named = next((v for v in graph.value_info if v.name == mul.output[0]), None)
    if named is not None:
        annotation = graph.value_info.add()
        annotation.CopyFrom(named)
        annotation.name = approx
    topk.input[1] = pre + "c"
    cand_scores, cand = pre + "candidate_scores", pre + "candidates"
    topk.output[0], topk.output[1] = cand_scores, cand

    # 2. exact scores of the candidates: rows[cand] . h * logit_scale + their repeat bonus
    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        graph.node.append(helper.make_node(op, inputs, [pre + out], name=pre + out, **attrs))
        return pre + out

    at = (
        node("Add", [cand, const(pre + "offset", np.array(offset, dtype=np.int64))], "rows_at")
        if offset
        else cand
    )
    rows = node("Gather", [table, at], "rows_of_candidates", axis=0)  # (b, c, d)
    h_col = node("Unsqueeze", [h, pre + "axis2"], "h_column")  # (b, d, 1)
    dots = node("Squeeze", [node("MatMul", [rows, h_col], "dots3"), pre + "axis2"], "dots")  # (b, c)
    total = exact = node("Mul", [dots, pre + "scale"], "exact")
    if scatter is not None:
        idx, bonus = scatter.input[1], scatter.input[2]  # (b, length): item positions, their bonus
        same = node(
            "Equal",
            [
                node("Unsqueeze", [cand, pre + "axis2"], "cand3"),
                node("Unsqueeze", [idx, pre + "axis1"], "idx3"),
            ],
            "same",
        )  # (b, c, length): which of the user's positions name the candidate
        picked = node(
            "MatMul",
            [
                node("Cast", [same], "same_f", to=TensorProto.FLOAT),
                node("Unsqueeze", [bonus, pre + "axis2"], "bonus3"),
            ],
            "bonus_of_candidates3",
        )
        total = node("Add", [exact, node("Squeeze", [picked, pre + "axis2"], "bonus_of_candidates")], "total")
    graph.node.append(
        helper.make_node(
            "TopK", [total, k_name], ["top_scores", pre + "top_positions"], name=pre + "top", axis=1
        )
    )
    graph.node.append(
        helper.make_node(
            "GatherElements", [cand, pre + "top_positions"], [ids_name], name=pre + "top_ids", axis=1
        )
    )

    # the fp32 product and its weights go; the first pass replaces them
    graph.node.remove(matmul)
    graph.node.remove(mul)
    for name in (matmul.input[1], scale_name):
        if not _consumers(graph, name):
            graph.initializer.remove(inits[name])
    graph.node.insert(0, first)
    if not any(o.domain == OPSET_MS[0] for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(*OPSET_MS))
    produced = {out for n in graph.node for out in n.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for v in stale:  # the annotations of the tensors that went
        graph.value_info.remove(v)
    sorted_graph = _toposort(graph)
    del graph.node[:]
    graph.node.extend(sorted_graph)
    onnx.save(model, str(path))
    return {"product": "int8", "candidates": c, "items": n_items, "dim": d}


def _rows_of(initializers: Any, weights: np.ndarray) -> tuple[str | None, int]:
    """The name of an initializer (rows, d) whose last ``items`` rows are ``weights`` transposed,
    and where those rows start; (None, 0) when the graph holds none."""
    from onnx import numpy_helper

    d, n_items = weights.shape
    for init in initializers:
        dims = list(init.dims)
        if len(dims) == 2 and dims[1] == d and dims[0] >= n_items and init.data_type == 1:  # float32
            rows = numpy_helper.to_array(init)
            if np.array_equal(rows[dims[0] - n_items :], weights.T):
                return init.name, dims[0] - n_items
    return None, 0


def _constant(graph: Any, name: str) -> int:
    from onnx import numpy_helper

    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            return int(numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0])
    raise CatalogueError(f"the top-K's K ({name}) is neither an initializer nor a Constant")


def _toposort(graph: Any) -> list[Any]:
    """The graph's nodes in an order where each comes after the producers of its inputs."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[Any] = []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise CatalogueError("the rewritten graph has a cycle or an input nothing produces")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    return ordered
