"""Training data: user token sequences, the item vocabulary and leakage-free splits.

In: the plain ``user item item ...`` benchmark files (S3-Rec / ICLRec), and contract events from
``streams.sources`` (the same converters as ``shopstream replay``), tokenised exactly as the worker
does (``streams.state.event_tokens``). Out: ``Split`` objects holding padded int64 arrays:
training windows (inputs and next-token targets) and evaluation cases (a history and the item
that came next).

Splits: leave-one-out for the benchmark files (last item test, second-to-last validation, the
rest train); a time split for event logs (train before ``valid_start``, validation until
``test_start``, test after). The vocabulary is built from training tokens only; anything else is
UNK.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from modeling.model import PAD, UNK
from streams.records import event_adapter
from streams.state import TokenKind, event_tokens

N_GAPS = 20
FIRST_GAP = 1  # bucket of a token with no predecessor (or no time information)


def gap_bucket(gap_s: float) -> int:
    """Bucket of the time since the previous token: 2 + floor(log2(seconds + 1)), capped."""
    return 2 + min(int(math.log2(max(gap_s, 0.0) + 1.0)), N_GAPS - 3)


@dataclass
class Vocab:
    """Item id (str) <-> vocabulary index; 0 is PAD, 1 is UNK."""

    items: list[str] = field(default_factory=list)  # index i + 2 -> items[i]
    index: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, sequences: Iterable[Sequence[str]], min_count: int = 1) -> Vocab:
        """Items seen at least ``min_count`` times, in order of first appearance."""
        counts: dict[str, int] = {}
        for seq in sequences:
            for item in seq:
                if item:
                    counts[item] = counts.get(item, 0) + 1
        v = cls()
        for item, n in counts.items():
            if n >= min_count:
                v.index[item] = len(v.items) + 2
                v.items.append(item)
        return v

    def __len__(self) -> int:
        return len(self.items) + 2

    def encode(self, item: str) -> int:
        return self.index.get(item, UNK) if item else UNK

    def decode(self, idx: int) -> str | None:
        return self.items[idx - 2] if idx >= 2 else None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"pad": PAD, "unk": UNK, "items": self.items}))

    @classmethod
    def load(cls, path: Path) -> Vocab:
        items = json.loads(path.read_text())["items"]
        return cls(items=items, index={it: i + 2 for i, it in enumerate(items)})


@dataclass
class UserSeq:
    """One user's tokens in time order."""

    user: str
    items: list[str]
    kinds: list[int]
    times: list[float]  # unix seconds; all 0 when the source has no times


@dataclass
class Cases:
    """Evaluation cases: left-padded histories (n, L) and the next item (n,), as vocab ids."""

    items: np.ndarray
    kinds: np.ndarray
    gaps: np.ndarray
    targets: np.ndarray
    bought: np.ndarray  # 1 if a purchase follows within the horizon, 0 if not, -1 if not observed
    history: list[list[int]] = field(default_factory=list)  # full history per case (for exclusion)

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class Split:
    vocab: Vocab
    train: Cases  # windows: targets is (n, L), the next token at every position
    valid: Cases
    test: Cases
    train_histories: list[list[int]]  # per training user, the vocab ids seen (for baselines)
    name: str = ""
    train_cases: Cases | None = None  # event logs: one case per training position (propensity baseline)
    horizon_s: float = 0.0  # propensity horizon


def read_seqrec(path: Path) -> list[UserSeq]:
    """``user item item ...`` lines (items in time order) -> sequences without kinds or times."""
    out = []
    with path.open() as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                n = len(parts) - 1
                out.append(UserSeq(parts[0], parts[1:], [int(TokenKind.PURCHASE)] * n, [0.0] * n))
    return out


def read_pairs(path: Path) -> list[UserSeq]:
    """``user item`` lines in time order (the SASRec and BERT4Rec data files) -> sequences."""
    users: dict[str, list[str]] = {}
    with path.open() as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                users.setdefault(parts[0], []).append(parts[1])
    kind = int(TokenKind.PURCHASE)
    return [UserSeq(u, items, [kind] * len(items), [0.0] * len(items)) for u, items in users.items()]


def sequences_from_events(events: Iterable[dict[str, object]]) -> list[UserSeq]:
    """Contract events (dicts) -> per-user token sequences, tokenised like the worker does."""
    users: dict[str, UserSeq] = {}
    for ev in events:
        event = event_adapter.validate_json(orjson.dumps(ev))
        seq = users.get(event.user_id)
        if seq is None:
            seq = users[event.user_id] = UserSeq(event.user_id, [], [], [])
        for item, kind, t in event_tokens(event):
            seq.items.append(item)
            seq.kinds.append(int(kind))
            seq.times.append(float(t))
    return list(users.values())


def _encode(seq: UserSeq, vocab: Vocab, lo: int, hi: int) -> tuple[list[int], list[int], list[int]]:
    items = [vocab.encode(i) for i in seq.items[lo:hi]]
    kinds = seq.kinds[lo:hi]
    has_time = any(seq.times)
    gaps = [
        FIRST_GAP if (j == 0 or not has_time) else gap_bucket(seq.times[j] - seq.times[j - 1])
        for j in range(lo, hi)
    ]
    return items, kinds, gaps


def _pad(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        row = row[-width:]
        if row:
            out[r, width - len(row) :] = row
    return out


CENSORED = -1  # propensity label of a position whose horizon runs past the observed period


def _bought_within(seq: UserSeq, j: int, hi: int, horizon_s: float, end: float = math.inf) -> int:
    """1 if a purchase follows position j within the horizon (looking only before index ``hi``),
    0 if none does and the whole horizon lies before ``end``, else CENSORED (not known)."""
    t = seq.times[j]
    for k in range(j + 1, hi):
        if seq.times[k] - t > horizon_s:
            return 0
        if seq.kinds[k] == TokenKind.PURCHASE:
            return 1
    return 0 if t + horizon_s <= end else CENSORED


def _windows(
    seqs: list[UserSeq],
    bounds: list[int],
    vocab: Vocab,
    max_len: int,
    horizon_s: float,
    end: float = math.inf,
) -> Cases:
    """Training windows of max_len + 1 tokens (stride max_len) from each user's training prefix."""
    xi, xk, xg, ys, yb = [], [], [], [], []
    for seq, hi in zip(seqs, bounds, strict=True):
        if hi < 2:
            continue
        items, kinds, gaps = _encode(seq, vocab, 0, hi)
        bought = [_bought_within(seq, j, hi, horizon_s, end) for j in range(hi)]
        end = hi
        while end >= 2:
            lo = max(0, end - max_len - 1)
            xi.append(items[lo : end - 1])
            xk.append(kinds[lo : end - 1])
            xg.append(gaps[lo : end - 1])
            ys.append(items[lo + 1 : end])
            yb.append(bought[lo : end - 1])
            end -= max_len
    return Cases(
        _pad(xi, max_len), _pad(xk, max_len), _pad(xg, max_len), _pad(ys, max_len), _pad(yb, max_len)
    )


def _cases(
    seqs: list[UserSeq],
    ranges: list[tuple[int, int]],
    vocab: Vocab,
    max_len: int,
    horizon_s: float,
    label_limits: list[int] | None = None,
    end: float = math.inf,
) -> Cases:
    """One case per target position j in [lo, hi): history = tokens before j.

    The propensity label looks ahead only up to ``label_limits`` (default: the whole sequence), so
    cases of one period never learn from the next period's purchases.
    """
    xi, xk, xg, ys, yb, hist = [], [], [], [], [], []
    limits = label_limits or [len(s.items) for s in seqs]
    for seq, (lo, hi), limit in zip(seqs, ranges, limits, strict=True):
        encoded = [vocab.encode(i) for i in seq.items]
        for j in range(max(lo, 1), hi):
            start = max(0, j - max_len)
            items, kinds, gaps = _encode(seq, vocab, start, j)
            hist.append(encoded[:j])
            xi.append(items)
            xk.append(kinds)
            xg.append(gaps)
            ys.append(vocab.encode(seq.items[j]))
            yb.append(_bought_within(seq, j - 1, limit, horizon_s, end))
    return Cases(
        _pad(xi, max_len),
        _pad(xk, max_len),
        _pad(xg, max_len),
        np.array(ys, dtype=np.int64),
        np.array(yb, dtype=np.int64),
        hist,
    )


def leave_one_out(seqs: list[UserSeq], max_len: int, name: str = "") -> Split:
    """Benchmark protocol: last item test, second-to-last validation, the rest train."""
    seqs = [s for s in seqs if len(s.items) >= 3]
    train_bounds = [len(s.items) - 2 for s in seqs]
    vocab = Vocab.build(s.items[:b] for s, b in zip(seqs, train_bounds, strict=True))
    n = [len(s.items) for s in seqs]
    return Split(
        vocab=vocab,
        train=_windows(seqs, train_bounds, vocab, max_len, 0.0),
        valid=_cases(seqs, [(m - 2, m - 1) for m in n], vocab, max_len, 0.0),
        test=_cases(seqs, [(m - 1, m) for m in n], vocab, max_len, 0.0),
        train_histories=[
            [vocab.encode(i) for i in s.items[:b]] for s, b in zip(seqs, train_bounds, strict=True)
        ],
        name=name,
    )


def time_split(
    seqs: list[UserSeq],
    valid_start: float,
    test_start: float,
    test_end: float,
    max_len: int,
    horizon_s: float,
    name: str = "",
    min_count: int = 2,
) -> Split:
    """Event-log protocol: train before valid_start, validate until test_start, test until test_end."""

    def first_at(s: UserSeq, t: float) -> int:
        return next((j for j, x in enumerate(s.times) if x >= t), len(s.times))

    seqs = [s for s in seqs if s.items]
    train_bounds = [first_at(s, valid_start) for s in seqs]
    test_bounds = [first_at(s, test_start) for s in seqs]
    # event logs have long tails of items seen once: they share UNK, which keeps the softmax affordable
    vocab = Vocab.build((s.items[:b] for s, b in zip(seqs, train_bounds, strict=True)), min_count)
    histories = [[vocab.encode(i) for i in s.items[:b]] for s, b in zip(seqs, train_bounds, strict=True)]
    return Split(
        vocab=vocab,
        train=_windows(seqs, train_bounds, vocab, max_len, horizon_s, valid_start),
        train_cases=_cases(
            seqs, [(1, b) for b in train_bounds], vocab, max_len, horizon_s, train_bounds, valid_start
        ),
        valid=_cases(
            seqs,
            list(zip(train_bounds, test_bounds, strict=True)),
            vocab,
            max_len,
            horizon_s,
            test_bounds,
            test_start,
        ),
        test=_cases(
            seqs,
            [(b, first_at(s, test_end)) for s, b in zip(seqs, test_bounds, strict=True)],
            vocab,
            max_len,
            horizon_s,
            None,
            test_end,
        ),
        train_histories=histories,
        name=name,
        horizon_s=horizon_s,
    )
