"""onnxruntime vs torch eager: throughput and latency of the serving graph on CPU, in one run.

The graph is the exported one (last hidden state -> top-K items + propensity). Weights do not
change the cost, so by default a model of the Beauty benchmark's size is built at random; pass
``--run`` to load a trained run instead.

    python bench/model_inference.py [--run runs/seqrec-Beauty-seqrec] [--length 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.onnx_export import OUTPUTS, export_graph
from modeling.model import BehaviourModel, ModelConfig, ServingModel
from modeling.train import load_model


def timed(fn, reps: int) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    lat = []
    start = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return total / reps, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path)
    ap.add_argument("--items", type=int, default=12_103)
    ap.add_argument("--length", type=int, default=50)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    model = (
        load_model(args.run)
        if args.run
        else BehaviourModel(
            ModelConfig(n_items=args.items, d_model=64, n_layers=2, n_heads=2, max_len=50)
        ).eval()
    )
    serving = ServingModel(model, args.top_k).eval()
    length = min(args.length, model.cfg.max_len)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        ex_items = torch.from_numpy(rng.integers(2, model.cfg.n_items, (2, length)))
        ex: tuple[torch.Tensor, ...] = (ex_items, torch.full_like(ex_items, 2), torch.ones_like(ex_items))
        if model.cfg.n_feats:
            ex = (
                *ex,
                torch.from_numpy(rng.integers(0, model.cfg.n_feats, (2, length, model.cfg.feat_width))),
            )
        export_graph(serving, ex, path, 17)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        print(
            f"model: {model.cfg.n_items} items, d={model.cfg.d_model}, {model.cfg.n_layers} layers; length "
            f"{length}; top-{serving.k}; {args.threads} thread(s); torch {torch.__version__}, onnxruntime "
            f"{ort.__version__}"
        )
        print(
            f"{'batch':>5} | {'torch events/s':>14} {'p50 ms':>8} {'p99 ms':>8} | {'onnxrt events/s':>15} "
            f"{'p50 ms':>8} {'p99 ms':>8} | speed-up"
        )
        for batch in (1, 8, 32, 128):
            items = rng.integers(2, model.cfg.n_items, (batch, length))
            kinds = np.full_like(items, 2)
            gaps = np.ones_like(items)
            feeds = {"items": items, "kinds": kinds, "gaps": gaps}
            if model.cfg.n_feats:  # a few features per token, the rest padding, as in real data
                feats = rng.integers(1, model.cfg.n_feats, (batch, length, model.cfg.feat_width))
                feats[:, :, 3:] = 0
                feeds["feats"] = feats
            tensors = [torch.from_numpy(a) for a in feeds.values()]
            reps = max(20, 2000 // batch)

            def run_torch(tensors: list[torch.Tensor] = tensors) -> None:
                with torch.inference_mode():
                    serving(*tensors)

            def run_ort(feeds: dict[str, np.ndarray] = feeds) -> None:
                sess.run(list(OUTPUTS), feeds)

            t_mean, t50, t99 = timed(run_torch, reps)
            o_mean, o50, o99 = timed(run_ort, reps)
            print(
                f"{batch:>5} | {batch / t_mean:>14.0f} {t50 * 1e3:>8.2f} {t99 * 1e3:>8.2f} | "
                f"{batch / o_mean:>15.0f} {o50 * 1e3:>8.2f} {o99 * 1e3:>8.2f} | {t_mean / o_mean:.2f}x"
            )


if __name__ == "__main__":
    main()
