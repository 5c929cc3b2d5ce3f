"""How the worker's cost and memory grow with catalogue size, sequence length and users in state.

In: the Taobao files in the data folder. Out: Markdown tables on stdout.

1. Catalogue x sequence length: randomly initialised models of the ``events`` preset architecture
   (untrained: cost only, their recommendations mean nothing), exported through
   ``exporters.onnx_export.export`` and cached outside git. Per model, in a fresh process: the
   process RSS after ``load_artifact``, onnxruntime latency at batch 1 and 64 on sequences at the
   cap, and CPU per event of the whole ``Pipeline`` at batch 64 on real Taobao events (users'
   earlier events folded first, so sequences are as long as the data makes them; every item id is
   mapped into the model's vocabulary by hash, so every event is scored by the model).
2. Users in state: stored bytes per user, the bound at the caps, RSS of an in-memory table and
   disk + RSS of faust's RocksDB store (one database per partition, faust's default options)
   holding N users, then the expiry sweep of ``streams.app`` with half the users idle.

Each measurement runs in its own process so RSS figures do not mix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.decode import AnyEvent  # noqa: E402
from streams.records import event_adapter  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.sources.datasets import load  # noqa: E402
from streams.state import UserState, seen_ms_of, user_partition  # noqa: E402

CACHE = Path.home() / ".cache" / "shopstream" / "scale-models"
MODEL_FORMAT = "v1"  # bump when the way the cached models are built changes
DAY_MS = 86_400_000


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --- 1. models ---------------------------------------------------------------------------------
def model_dir(n_items: int, max_len: int) -> Path:
    return CACHE / f"{MODEL_FORMAT}-events-n{n_items}-L{max_len}"


def ensure_model(n_items: int, max_len: int) -> tuple[Path, float]:
    """The exported untrained model (from the cache when there); seconds spent exporting."""
    out = model_dir(n_items, max_len)
    if (out / "manifest.json").exists():
        return out, 0.0
    import torch

    from exporters.onnx_export import export
    from modeling.model import BehaviourModel, ModelConfig
    from modeling.sequences import Cases, Vocab
    from modeling.train import PRESETS
    from streams.state import FEATURE_BUCKETS, MAX_FEATURES, N_GAPS, STATIC_BUCKETS

    started = time.perf_counter()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # the production architecture: the events preset on data with features (as Taobao has)
    preset = {**PRESETS["events"].model, "max_len": max_len}
    cfg = ModelConfig(
        n_items=n_items + 2, n_gaps=N_GAPS, n_feats=FEATURE_BUCKETS, feat_width=MAX_FEATURES, **preset
    )
    model = BehaviourModel(cfg)
    with torch.no_grad():  # one static feature (a category out of 5000) per item, like Taobao's
        model.item_feats[2:, 0] = torch.from_numpy(rng.integers(1, 5000, n_items) * 7 % STATIC_BUCKETS)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        data = f"untrained-n{n_items}-L{max_len}"
        config = {"preset": "events", "data": data, "model": cfg.to_dict(), "train": {}}
        (run / "config.json").write_text(json.dumps(config))
        Vocab(items=[f"i{j}" for j in range(n_items)]).save(run / "vocab.json")
        torch.save(model.state_dict(), run / "model.pt")
        n = 64
        lengths = rng.integers(1, max_len + 1, n)
        valid = np.arange(max_len)[None, :] >= (max_len - lengths)[:, None]
        cases = Cases(
            items=np.where(valid, rng.integers(2, n_items + 2, (n, max_len)), 0),
            kinds=np.where(valid, rng.integers(1, 7, (n, max_len)), 0),
            gaps=np.where(valid, rng.integers(1, N_GAPS, (n, max_len)), 0),
            targets=rng.integers(2, n_items + 2, n),
            bought=np.zeros(n, dtype=np.int64),
            feats=np.where(valid[..., None], rng.integers(0, FEATURE_BUCKETS, (n, max_len, MAX_FEATURES)), 0),
        )
        export(run, out, cases, k=100)  # `shopstream export --top-k` default
    return out, time.perf_counter() - started


def mapped_events(n_items: int) -> list[dict[str, Any]]:
    """Taobao users' full histories, every item id replaced by a vocabulary item chosen by hash."""

    def vocab_id(item: str) -> str:
        return f"i{zlib.crc32(item.encode()) % n_items}"

    out = []
    for e in load("taobao-users", Settings().datasets_dir):
        if "item_id" in e:
            e["item_id"] = vocab_id(e["item_id"])
        for line in e.get("lines", []):
            line["item_id"] = vocab_id(line["item_id"])
        out.append(e)
    return out


def measure_model(folder: Path, max_len: int, n_items: int, timed: int, calls: int) -> dict[str, Any]:
    """One model in this (fresh) process: RSS, onnxruntime latency, pipeline CPU per event."""
    from streams.pipeline import Message, local_pipeline
    from streams.scoring import OUTPUTS, load_artifact

    settings = Settings(model_dir=folder, inference_provider="cpu", sequence_length=max_len)
    events = mapped_events(n_items)
    rss_before = rss_bytes()
    art = load_artifact(folder, "cpu", settings.inference_threads)
    rss_loaded = rss_bytes()

    # onnxruntime alone, on sequences at the cap (real tokens of the data, mapped ids)
    states: dict[str, UserState] = {}
    parsed = [event_adapter.validate_python(e) for e in events]
    for ev in parsed:
        states.setdefault(ev.user_id, UserState()).apply(ev, 0, max_len)
    long = sorted((s.seq for s in states.values()), key=len, reverse=True)
    lat: dict[str, float] = {}
    for batch in (1, 64):
        seqs = [long[i % len(long)] for i in range(batch)]
        art.score(seqs)  # fills the input buffers with these sequences
        feeds = {name: buf[:batch] for name, buf in art.buffers[min(max_len, len(seqs[0]))].items()}
        times = []
        for _ in range(calls if batch == 1 else max(10, calls // 5)):
            t = time.perf_counter()
            art.session.run(list(OUTPUTS), feeds)
            times.append(time.perf_counter() - t)
        lat[f"b{batch}_p50_ms"], lat[f"b{batch}_p99_ms"] = pct(times, 50) * 1e3, pct(times, 99) * 1e3
        lat[f"b{batch}_width"] = feeds["items"].shape[1]
    del art

    # the whole pipeline at batch 64: fold the earlier events (untimed), then time the last ones
    pipeline = local_pipeline(settings, budget_per_partition=1e9)
    warm, tail = parsed[:-timed], events[-timed:]
    folded: dict[bytes, UserState] = {}
    for ev in warm:
        folded.setdefault(ev.user_id.encode(), UserState()).apply(ev, int(time.time() * 1000), max_len)
    for key, state in folded.items():
        pipeline.users[key] = state.dumps()
    msgs = [
        Message(user_partition(e["user_id"].encode(), 8), e["user_id"].encode(), orjson.dumps(e), time.time())
        for e in tail
    ]
    widths = [min(max_len, len(folded.get(m.key, UserState()).seq)) for m in msgs]  # before the event
    model_answers = 0
    started = time.process_time()
    for i in range(0, len(msgs), 64):
        result = pipeline.process(msgs[i : i + 64])
        model_answers += sum(b'"source":"model"' in o.value for o in result.outputs)
    cpu = time.process_time() - started
    return {
        "rss_before": rss_before,
        "rss_loaded": rss_loaded,
        "file": (folder / "model.onnx").stat().st_size,
        **lat,
        "pipeline_us": cpu * 1e6 / len(msgs),
        "events": len(msgs),
        "scored_by_model": model_answers / len(msgs),
        "mean_history": statistics.mean(widths) + 1,
    }


# --- 2. users in state -------------------------------------------------------------------------
def templates(max_len: int) -> tuple[list[bytes], list[list[AnyEvent]]]:
    """Each real Taobao user's full history folded into a state (bytes after the last-seen prefix)."""
    per_user: dict[str, list[AnyEvent]] = {}
    for e in load("taobao-users", Settings().datasets_dir):
        ev = event_adapter.validate_python(e)
        per_user.setdefault(ev.user_id, []).append(ev)
    histories = list(per_user.values())
    bodies = []
    for hist in histories:
        s = UserState()
        for ev in hist:
            s.apply(ev, 0, max_len)
        bodies.append(s.dumps()[8:])
    return bodies, histories


def synthetic_users(n: int, bodies: list[bytes], now_ms: int, ttl_ms: int) -> Iterable[tuple[bytes, bytes]]:
    """N fresh user ids, user i replaying real user i mod R; last seen spread over 2 x TTL (half idle)."""
    for i in range(n):
        seen = now_ms - (i * 2 * ttl_ms) // n
        yield f"scale-user-{i:08d}".encode(), struct.pack(">q", seen) + bodies[i % len(bodies)]


def measure_dict(n: int, max_len: int, ttl_s: float) -> dict[str, Any]:
    bodies, histories = templates(max_len)
    # a replay under a fresh id gives the same bytes as the template: check it on a sample
    for hist, body in list(zip(histories, bodies, strict=True))[:200]:
        s = UserState()
        for ev in hist:
            s.apply(ev, 0, max_len)
        assert s.dumps()[8:] == body
    now_ms, ttl_ms = int(time.time() * 1000), int(ttl_s * 1000)
    rss0 = rss_bytes()
    users: dict[bytes, bytes] = {}
    for key, value in synthetic_users(n, bodies, now_ms, ttl_ms):
        users[key] = value
    rss1 = rss_bytes()
    sizes = [len(v) for v in users.values()]
    started = time.perf_counter()
    cutoff = int((time.time() - ttl_s) * 1000)  # streams.app expire_idle_users
    expired = [k for k, v in users.items() if seen_ms_of(v) < cutoff]
    for key in expired:
        del users[key]
    return {
        "rss_growth": rss1 - rss0,
        "mean": statistics.mean(sizes),
        "p99": pct([float(s) for s in sizes], 99),
        "max": max(sizes),
        "expiry_s": time.perf_counter() - started,
        "keys_after": len(users),
        "bytes_after": sum(len(v) for v in users.values()),
        "rss_after_expiry": rss_bytes() - rss0,
    }


def measure_rocksdb(n: int, max_len: int, ttl_s: float, partitions: int) -> dict[str, Any]:
    from faust.stores.rocksdb import RocksDBOptions

    bodies, _ = templates(max_len)
    now_ms, ttl_ms = int(time.time() * 1000), int(ttl_s * 1000)
    root = Path(tempfile.mkdtemp(prefix="shopstream-scale-rocks-"))
    try:
        rss0 = rss_bytes()
        dbs = [RocksDBOptions().open(root / f"users-{p}.db") for p in range(partitions)]
        started = time.perf_counter()
        for key, value in synthetic_users(n, bodies, now_ms, ttl_ms):
            dbs[user_partition(key, partitions)][key] = value  # faust's Store._set: one put per key
        write_s = time.perf_counter() - started
        rss_written = rss_bytes() - rss0
        for db in dbs:
            db.flush()
        disk = du(root)
        started = time.perf_counter()
        cutoff = int((time.time() - ttl_s) * 1000)
        keys_after = 0
        for db in dbs:  # streams.app expire_idle_users, per partition database
            expired = [k for k, v in db.items() if seen_ms_of(v) < cutoff]
            for key in expired:
                del db[key]
        expiry_s = time.perf_counter() - started
        for db in dbs:
            db.flush()
        disk_deleted = du(root)
        for db in dbs:
            db.compact_range(None, None)
            keys_after += sum(1 for _ in db.keys())  # noqa: SIM118 (keys only, not values)
        disk_compacted = du(root)
        rss_end = rss_bytes() - rss0
        for db in dbs:
            db.close()
        return {
            "write_s": write_s,
            "rss_written": rss_written,
            "disk": disk,
            "expiry_s": expiry_s,
            "disk_deleted": disk_deleted,
            "disk_compacted": disk_compacted,
            "keys_after": keys_after,
            "rss_end": rss_end,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bound_table(max_len: int) -> list[str]:
    """Stored size of a long real user and of a worst-case user, at 1x and 10x the caps."""
    _, histories = templates(max_len)
    longest = max(histories, key=len)
    rows = [
        "| user | events folded | tokens kept | cart lines | bought | recent ids | bytes |",
        "|" + "---|" * 7,
    ]

    def row(name: str, events: Iterable[AnyEvent]) -> None:
        s, count = UserState(), 0
        for ev in events:
            s.apply(ev, 0, max_len)
            count += 1
        rows.append(
            f"| {name} | {count} | {len(s.seq)} | {len(s.cart)} | {len(s.bought)} | "
            f"{len(s.recent_ids)} | {len(s.dumps())} |"
        )

    for n in (max_len, 10 * max_len):
        row("longest real Taobao user", longest[:n])
    for mult in (1, 10):
        row(f"worst case x{mult} (128-char ids, 200 cart lines+)", worst_case(max_len * mult, mult))
    return rows


def worst_case(n: int, mult: int) -> Iterable[AnyEvent]:
    """Events that fill every per-user collection: distinct 128-char items, carts, long orders."""
    t0 = datetime(2024, 1, 1, tzinfo=UTC)

    def ident(prefix: str, i: int) -> str:
        return f"{prefix}{i:012d}".ljust(128, "x")

    def event(i: int, body: dict[str, Any]) -> AnyEvent:
        base = {
            "schema_version": 1,
            "event_id": ident("e", i),
            "user_id": "u",
            "event_time": t0 + timedelta(i),
        }
        return event_adapter.validate_python({**base, **body})

    i = 0
    for _ in range(mult * 210):  # more cart lines than MAX_CART_LINES
        i += 1
        yield event(i, {"type": "cart", "action": "add", "item_id": ident("c", i), "quantity": 1,
                        "unit_price": 12.5, "category": "c" * 256, "brand": "b" * 256})  # fmt: skip
    for _ in range(mult * 2):  # orders with more lines than MAX_BOUGHT
        i += 1
        lines = [{"item_id": ident("o", i * 1000 + j), "quantity": 1, "unit_price": 3.0} for j in range(110)]
        yield event(i, {"type": "order", "order_id": ident("o", i), "lines": lines})
    for _ in range(n):  # long searches, then views with every feature
        i += 1
        yield event(i, {"type": "search", "query": " ".join(f"w{i}{j}" for j in range(50)),
                        "clicked_item": ident("s", i)})  # fmt: skip
        i += 1
        yield event(i, {"type": "view", "item_id": ident("v", i), "category": "c" * 256, "brand": "b" * 256,
                        "price": 99.0, "favorite": True})  # fmt: skip


# --- driver ------------------------------------------------------------------------------------
def child(argv: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def machine_line() -> str:
    import onnxruntime

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    return (
        f"machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, {platform.system()} {platform.release()}"
    )


def run_models(items: list[int], lengths: list[int], timed: int, calls: int) -> None:
    print("\n## Catalogue size x sequence length (untrained models: cost only, their answers mean nothing)\n")
    print(
        "Randomly initialised `events`-preset models (d_model 64, 2 layers, 2 heads, features on, repeat "
        "bonus, top-100), exported with `exporters.onnx_export.export` and cached in "
        f"`{CACHE}`. onnxruntime on CPU, {Settings().inference_threads} intra-op thread "
        "(SHOPSTREAM_INFERENCE_THREADS default), inputs at the full width (sequences at the cap). "
        f"Pipeline: CPU per event of `Pipeline.process` at batch 64 over the last {timed} events of "
        "`taobao-users` (its users' earlier events folded first; item ids mapped into the vocabulary by "
        "hash). RSS: a fresh worker-like process after imports and after `load_artifact`.\n"
    )
    print(
        "| items | max_len | model.onnx MiB | RSS after load MiB (+ model) | ort b1 p50 / p99 ms "
        "| ort b64 p50 / p99 ms | ort b64 us/row | pipeline b64 us/event | mean history | by model |"
    )
    print("|" + "---:|" * 10)
    for n in items:
        for length in lengths:
            folder, export_s = ensure_model(n, length)
            r = child(["--measure-model", str(folder), str(length), str(n), str(timed), str(calls)])
            print(
                f"| {n:,} | {length} | {mib(r['file'])} | {mib(r['rss_loaded'])} "
                f"(+{mib(r['rss_loaded'] - r['rss_before'])}) "
                f"| {r['b1_p50_ms']:.2f} / {r['b1_p99_ms']:.2f} "
                f"| {r['b64_p50_ms']:.1f} / {r['b64_p99_ms']:.1f} "
                f"| {r['b64_p50_ms'] * 1e3 / 64:.0f} | {r['pipeline_us']:.0f} | {r['mean_history']:.0f} "
                f"| {r['scored_by_model']:.0%} |",
                flush=True,
            )
            if export_s:
                print(f"<!-- exported n={n} L={length} in {export_s:.0f}s -->", file=sys.stderr)


def run_users(counts: list[int], max_len: int, partitions: int) -> None:
    ttl_s = Settings().user_ttl_s
    print(f"\n## Users in state (sequence_length {max_len}, user_ttl_s {ttl_s:.0f})\n")
    print(
        "States are real: each of the 814 `taobao-users` histories folded with `UserState.apply`; user i "
        "(a fresh id) replays history i mod 814, so its state is that fold's bytes (checked on a sample "
        "by replaying). Last-seen times are spread over 2 x user_ttl_s, so the expiry sweep "
        "(`streams.app.expire_idle_users`: `seen_ms_of(v) < now - ttl`) finds half the users idle.\n"
    )
    print("### The bound: stored bytes stop growing at the caps\n")
    print("\n".join(bound_table(max_len)))
    print(
        "\nCaps in `streams/state.py`: `seq` sequence_length tokens (features <= MAX_FEATURES each), "
        "`recent_ids` RECENT_IDS=32, `bought` MAX_BOUGHT=100, `cart` MAX_CART_LINES=200, `counts` one "
        "key per event kind; promotion `ids` KEEP_IDS=20 and `fired` <= frequency_cap "
        "(streams/promotions.py). "
        "Counters (`counts` values, `reviews` sums, `promo.abandoned`) grow only in digits. Ids are <= 128 "
        "chars by the contract, so the worst case row above is the bound for this sequence_length.\n"
    )
    print("### Memory of N users\n")
    print(
        "| users | bytes/state mean / p99 / max | in-memory dict RSS MiB (per user B) "
        f"| RocksDB ({partitions} partition DBs, faust defaults) write s | RocksDB disk MiB (per user B) "
        "| RocksDB RSS MiB | expiry s (dict / RocksDB) | keys after expiry | dict bytes after "
        "| RocksDB disk after deletes / compaction MiB |"
    )
    print("|" + "---:|" * 10)
    for n in counts:
        d = child(["--measure-dict", str(n), str(max_len), str(ttl_s)])
        r = child(["--measure-rocksdb", str(n), str(max_len), str(ttl_s), str(partitions)])
        print(
            f"| {n:,} | {d['mean']:.0f} / {d['p99']:.0f} / {d['max']} "
            f"| {mib(d['rss_growth'])} ({d['rss_growth'] / n:.0f}) | {r['write_s']:.1f} "
            f"| {mib(r['disk'])} ({r['disk'] / n:.0f}) | {mib(r['rss_written'])} "
            f"| {d['expiry_s']:.1f} / {r['expiry_s']:.1f} | {d['keys_after']:,} / {r['keys_after']:,} "
            f"| {mib(d['bytes_after'])} | {mib(r['disk_deleted'])} / {mib(r['disk_compacted'])} |",
            flush=True,
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("--measure-"):
        what, a = sys.argv[1], sys.argv[2:]
        if what == "--measure-model":
            out = measure_model(Path(a[0]), int(a[1]), int(a[2]), int(a[3]), int(a[4]))
        elif what == "--measure-dict":
            out = measure_dict(int(a[0]), int(a[1]), float(a[2]))
        else:
            out = measure_rocksdb(int(a[0]), int(a[1]), float(a[2]), int(a[3]))
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a small subset: a smoke test")
    ap.add_argument("--items", default="10000,50000,200000", help="catalogue sizes")
    ap.add_argument("--lengths", default="20,50,100,200", help="sequence lengths (model max_len)")
    ap.add_argument("--users", default="100000,1000000", help="users held in state")
    ap.add_argument("--part", choices=("all", "models", "users"), default="all")
    args = ap.parse_args()
    items = [int(x) for x in args.items.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    users = [int(x) for x in args.users.split(",")]
    timed, calls = 8000, 300
    if args.quick:
        items, lengths, users, timed, calls = items[:1], lengths[:1], [10_000], 1000, 50
    settings = Settings()
    started = time.perf_counter()
    print(f"# Scale ({'quick' if args.quick else 'full'})\n")
    print(machine_line())
    print(
        "\nNotes: figures are CPU time or wall time on a shared machine where other work runs at the same "
        "time (CPU-contended): compare rows with each other, not with another machine. The models are "
        "untrained (random weights): cost only."
    )
    if args.part in ("all", "models"):
        run_models(items, lengths, timed, calls)
    if args.part in ("all", "users"):
        run_users(users, settings.sequence_length, settings.partitions)
    print(f"\nwall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
