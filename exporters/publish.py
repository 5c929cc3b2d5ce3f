"""Publishing an exported artifact into the model folder the workers serve from, atomically.

In: an artifact exported by ``exporters.onnx_export.export`` (``manifest.json``, graph,
vocabulary, the price reference where it has one) in a staging folder. Out: the same artifact in
the model folder under version-named files (``model-<v>.onnx``, ``vocab-<v>.json``,
``prices-<v>.json``, ``manifest-<v>.json`` for rollback), then
``manifest.json`` pointing at them, each written to a temporary name, fsynced and renamed, the
folder fsynced. The graph and vocabulary land first and the manifest last, which is the order the
worker's hot reload (``streams.scoring.ModelWatcher``) expects: it reads ``manifest.json`` and
loads what it names, so a reader sees the old version or the new one, never a mix. Also the
folder's ``registry.jsonl`` (one JSON line per retrain decision) and its lock. No torch here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from streams.archive import fsync_dir
from streams.errors import ShopstreamError
from streams.price_response import REFERENCE_FILE, PriceReference
from streams.scoring import REGISTRY as REGISTRY  # the one name the worker's watcher reads too
from streams.scoring import read_manifest, sha256

KEEP_VERSIONS = 3  # the published version and the two before it (rollback)
VERSIONED = (("model-", ".onnx"), ("vocab-", ".json"), ("manifest-", ".json"), ("prices-", ".json"))


class PublishError(ShopstreamError):
    """A publish that could not complete: a copy that does not match, a folder already locked."""


def write_atomic(path: Path, data: bytes | Path) -> None:
    """``data`` (bytes, or a file to copy) to ``path``: a temporary name in the same folder,
    fsynced, renamed over ``path``, the folder fsynced. Readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            if isinstance(data, Path):
                with data.open("rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(str(path.parent))


def publish(staging: Path, model_dir: Path) -> dict[str, Any]:
    """Publish the artifact exported to ``staging`` into ``model_dir``; returns its manifest."""
    manifest = read_manifest(staging)
    version = str(manifest["model_version"])
    prices = manifest.get("price_reference")  # streams.price_response: optional
    copies = [  # (versioned name, staged name, its sha256)
        (f"model-{version}.onnx", manifest["graph"], manifest["graph_sha256"]),
        (f"vocab-{version}.json", manifest["vocab"], manifest["vocab_sha256"]),
        *([(f"prices-{version}.json", prices["file"], prices["sha256"])] if prices is not None else []),
    ]
    for name, staged, digest in copies:
        write_atomic(model_dir / name, staging / staged)
        if sha256(model_dir / name) != digest:
            raise PublishError(f"{model_dir / name}: sha256 differs from the staged file after copying")
    manifest["graph"], manifest["vocab"] = copies[0][0], copies[1][0]
    if prices is not None:
        manifest["price_reference"] = {**prices, "file": copies[2][0]}
    text = json.dumps(manifest, indent=2, allow_nan=False).encode()
    write_atomic(model_dir / f"manifest-{version}.json", text)  # kept for rollback
    write_atomic(model_dir / "manifest.json", text)  # last: the worker's hot reload starts here
    return manifest


def attach(folder: Path, ref: PriceReference) -> dict[str, Any]:
    """Write the price reference ``ref`` into the exported artifact in ``folder``
    (``price_reference.json``, then the manifest's ``price_reference`` entry with its sha256; each
    written atomically, the manifest last, so a worker polling the folder never loads one without
    the other) and return the entry."""
    path = folder / REFERENCE_FILE
    write_atomic(path, json.dumps(ref.to_json(), allow_nan=False).encode())
    manifest = read_manifest(folder)
    manifest["price_reference"] = entry = {"file": REFERENCE_FILE, "sha256": sha256(path), **ref.fitted}
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2, allow_nan=False).encode())
    return entry


def prune(model_dir: Path, keep: set[str]) -> list[str]:
    """Delete the version-named files of versions outside ``keep`` (never those the current
    manifest names) and temporary files a crashed publish left; returns the names deleted."""
    current = read_manifest(model_dir) if (model_dir / "manifest.json").exists() else {}
    prices = current.get("price_reference")
    protected = {  # a rollback may name any version
        current.get("graph"),
        current.get("vocab"),
        prices.get("file") if isinstance(prices, dict) else None,
    }
    keep = keep | {str(current.get("model_version"))}
    removed = []
    for path in sorted(model_dir.iterdir()):
        name = path.name
        ours = next(
            (name[len(a) : -len(b)] for a, b in VERSIONED if name.startswith(a) and name.endswith(b)), None
        )
        stale_tmp = name.startswith(".") and ".tmp-" in name and path.is_file()
        if (ours is not None and ours not in keep and name not in protected) or stale_tmp:
            path.unlink(missing_ok=True)
            removed.append(name)
    return removed


def registry_entries(model_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (model_dir / REGISTRY).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a torn last line after a crash
            out.append(json.loads(line))
    return out


def append_registry(model_dir: Path, entry: Mapping[str, Any]) -> None:
    with (model_dir / REGISTRY).open("a") as f:
        f.write(json.dumps(entry, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def folder_lock(model_dir: Path) -> Iterator[None]:
    """One retrain per model folder at a time."""
    with (model_dir / ".retrain.lock").open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PublishError(f"another retrain holds {model_dir / '.retrain.lock'}") from None
        yield
