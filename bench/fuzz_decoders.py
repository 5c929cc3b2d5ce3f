"""Fuzz run over the decoders, without Kafka: bad input of every category, then the real pipeline.

Generates ``--n`` input messages with the generators of ``tests/fuzzing.py`` (pure random bytes,
byte-level mutations, truncations and field-level breakage of real contract events, encoded as
``streams.replay`` publishes them), decodes each with the worker's ``EventDecoder`` and feeds them
in micro-batches, between valid events of the same users, through the worker's ``Pipeline`` (the
demo model, in-memory tables). Prints what the decoder answered per category and what the pipeline
did; exits 1 on a crash (any exception but ``RejectedInput``, a valid event left unanswered, a
processing error) or on an answer the contract does not allow, with the bytes to reproduce it.

With ``--agreement`` it instead compares, input by input, the decoder (with wide deployment bounds)
and the published JSON Schema of the topic's type (after the reference JSON parse), and prints
"N inputs, D disagreements"; exits 1 on any disagreement.

    SHOPSTREAM_INFERENCE_PROVIDER=cpu python bench/fuzz_decoders.py [--n 200000] [--seed 0]
    python bench/fuzz_decoders.py --agreement [--n 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.decode import EventDecoder  # noqa: E402
from streams.errors import ConfigurationError, RejectReason  # noqa: E402
from streams.pipeline import Message, Pipeline, local_pipeline  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.sources.datasets import load  # noqa: E402
from streams.state import user_partition  # noqa: E402
from tests.fuzzing import (  # noqa: E402
    ACCEPTED,
    CATEGORIES,
    CONTROL,
    VALID,
    Case,
    Event,
    Fuzzer,
    agreement,
    outcome,
)

OUTCOMES = [ACCEPTED, *(str(r) for r in RejectReason if r not in (RejectReason.UNKNOWN_TOPIC,))]
SCHEMA_LEVEL = {str(RejectReason.EMPTY), str(RejectReason.INVALID_JSON), str(RejectReason.SCHEMA)}


def seed_events(settings: Settings, per_dataset: int) -> list[Event]:
    """Real events of every type: REES46 views, carts and orders (shipped sample), Best Buy
    searches and Amazon reviews from the shared data folder when present, else literal ones."""
    events = list(load("rees46-demo", settings.datasets_dir))
    for name, etype in (("bestbuy", "search"), ("amazon-beauty", "review")):
        try:
            events += list(islice(load(name, settings.datasets_dir), per_dataset))
        except ConfigurationError:
            events.append(VALID[etype])
    return events


class Run:
    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.s = settings
        self.pipeline = pipeline
        self.decoded: dict[str, Counter[str]] = defaultdict(Counter)
        self.crashes: list[tuple[str, str, bytes | None]] = []
        self.mismatches: list[tuple[Case, str]] = []
        self.piped: Counter[str] = Counter()
        self.batch: list[Message] = []
        self.kinds: list[tuple[Case, str] | str] = []  # (case, decoder outcome) or a valid event id

    def decode(self, decoder: EventDecoder, case: Case) -> None:
        try:
            got = outcome(decoder, case)
        except Exception as exc:  # the crash this run looks for
            self.crashes.append((case.category, f"decode: {exc!r}", case.raw))
            got = "crash"
        self.decoded[case.category][got] += 1
        if got != "crash" and not case.allows(got):
            self.mismatches.append((case, got))
        self.kinds.append((case, got))

    def add(self, key: bytes, value: bytes, valid_id: str | None = None) -> None:
        self.batch.append(Message(user_partition(key, self.s.partitions), key, value, time.time()))
        if valid_id is not None:
            self.kinds.append(valid_id)

    def flush(self) -> None:
        batch, kinds = self.batch, self.kinds
        self.batch, self.kinds = [], []
        if not batch:
            return
        try:
            result = self.pipeline.process(batch)
            self.pipeline.due_carts({m.partition for m in batch}, time.time())
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            what = f"process: {exc!r} at {Path(where.filename).name}:{where.lineno}"
            self.crashes.append(("pipeline", what, b"\n".join(m.value for m in batch)))
            return
        failed = dict(result.failed)
        answered = {
            orjson.loads(o.value)["event_id"]
            for o in result.outputs
            if o.topic == self.s.topic_recommendations
        }
        for i, kind in enumerate(kinds):
            why = failed.get(i)
            if why is not None and why.reason == RejectReason.PROCESSING_ERROR:
                self.crashes.append(("pipeline", f"processing_error: {why.detail}", batch[i].value))
            if isinstance(kind, str):
                self.piped["valid"] += 1
                if why is not None or kind not in answered:
                    self.piped["valid blocked"] += 1
                    self.crashes.append(("pipeline", f"valid event {kind} not answered", batch[i].value))
                continue
            case, decoded = kind
            self.piped["bad"] += 1
            self.piped[f"bad refused: {why.reason}" if why else "bad answered"] += 1
            if decoded in SCHEMA_LEVEL and why is None:
                self.mismatches.append((case, "answered by the pipeline"))
            elif decoded == ACCEPTED and why is not None:
                self.mismatches.append((case, f"refused by the pipeline: {why.reason}"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000, help="bad inputs to generate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64, help="pipeline micro-batch size")
    ap.add_argument("--valid-every", type=int, default=4, help="a valid event after every k bad inputs")
    ap.add_argument("--model", type=Path, default=ROOT / "deploy" / "demo" / "model")
    ap.add_argument("--agreement", action="store_true", help="decoder vs JSON Schemas, no pipeline")
    args = ap.parse_args()
    settings = Settings(model_dir=args.model, quiet_hours="")
    if args.agreement:
        sys.exit(agree(seed_events(settings, per_dataset=500) + list(CONTROL.values()), args.n, args.seed))
    decoder = EventDecoder.from_settings(settings)
    seeds = seed_events(settings, per_dataset=500)
    rng = random.Random(args.seed)
    fuzzer = Fuzzer(rng, decoder)
    run = Run(settings, local_pipeline(settings, budget_per_partition=1e9))
    types = Counter(e["type"] for e in seeds)
    print(f"{len(seeds)} seed events ({', '.join(f'{t} {n}' for t, n in types.items())})")
    print(f"model {args.model} on {settings.inference_provider}; seed {args.seed}")
    started = time.perf_counter()
    decode_s = 0.0
    for i in range(args.n):
        seed = rng.choice(seeds)
        case = fuzzer.case(rng.choice(CATEGORIES), seed, time.time())
        t0 = time.perf_counter()
        run.decode(decoder, case)
        decode_s += time.perf_counter() - t0
        key = str(seed["user_id"]).encode()
        run.add(key, case.raw or b"")
        if i % args.valid_every == 0:  # the same user's next event, behind the bad one
            eid = f"fuzz-valid-{i}"
            run.add(key, orjson.dumps({**seed, "event_id": eid}), eid)
        if len(run.batch) >= args.batch:
            run.flush()
    run.flush()
    elapsed = time.perf_counter() - started
    report(run, args.n, elapsed, decode_s)
    sys.exit(1 if run.crashes or run.mismatches else 0)


def agree(seeds: list[Event], n: int, seed: int) -> int:
    """Decoder vs schema on ``n`` seeded inputs of every category; 1 on any disagreement."""
    wide = EventDecoder(max_bytes=1 << 40, min_event_time="1970-01-01T00:00:00Z", max_clock_skew_s=1e11)
    started = time.perf_counter()
    tried, disagreements = agreement(wide, seeds, n, seed, time.time())
    elapsed = time.perf_counter() - started
    against = Counter(c.category for c, _ in disagreements)
    width = max(len(c) for c in CATEGORIES) + 1
    print(f"{len(seeds)} seed events; seed {seed}\n\n{'category':<{width}}{'tried':>8}{'disagree':>10}")
    for cat in CATEGORIES:
        print(f"{cat:<{width}}{tried[cat]:>8}{against[cat]:>10}")
    print(f"\n{sum(tried.values())} inputs, {len(disagreements)} disagreements ({elapsed:.0f} s)")
    for case, got in disagreements[:5]:
        schema = "refused" if got == ACCEPTED else "accepted"
        print(f"  {case.category} on {case.topic_type}: decoder {got}, schema {schema}")
        print(f"    repro: {case.raw!r:.400}")
    return 1 if disagreements else 0


def report(run: Run, n: int, elapsed: float, decode_s: float) -> None:
    cols = [*OUTCOMES, "crash"]
    width = max(len(c) for c in CATEGORIES) + 1
    head = f"{'category':<{width}}{'tried':>8}" + "".join(f"{c[:12]:>13}" for c in cols)
    print("\n" + head + "\n" + "-" * len(head))
    total: Counter[str] = Counter()
    for cat in CATEGORIES:
        row = run.decoded[cat]
        total.update(row)
        print(f"{cat:<{width}}{sum(row.values()):>8}" + "".join(f"{row[c]:>13}" for c in cols))
    print("-" * len(head))
    print(f"{'all':<{width}}{sum(total.values()):>8}" + "".join(f"{total[c]:>13}" for c in cols))
    rejected = sum(v for k, v in total.items() if k not in (ACCEPTED, "crash"))
    print(f"\ninputs tried {n}: accepted {total[ACCEPTED]}, rejected {rejected}, crashes {total['crash']}")
    print(f"decoder: {n / decode_s:,.0f} inputs/s; end to end with the pipeline: {n / elapsed:,.0f} inputs/s")
    print("pipeline: " + ", ".join(f"{k} {v}" for k, v in sorted(run.piped.items())))
    print(f"crashes {len(run.crashes)}, answers the contract does not allow {len(run.mismatches)}")
    for cat, what, raw in run.crashes[:5]:
        print(f"  CRASH {cat}: {what}\n    repro: {raw!r:.400}")
    for case, got in run.mismatches[:5]:
        expected = sorted(case.expect or ())
        print(f"  UNEXPECTED {case.category}: {got}, expected {expected}\n    repro: {case.raw!r:.400}")


if __name__ == "__main__":
    main()
