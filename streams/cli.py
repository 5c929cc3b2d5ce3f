"""The ``shopstream`` command: settings are read here, once, and passed down.

shopstream kafka up|down|status|reset|fetch   a real local Apache Kafka (deploy/kafka)
shopstream kafka tools-fetch|tool NAME [ARG...]  Kafka's command-line tools (console-producer, ...)
shopstream settings                           print the effective settings, secrets masked
shopstream topics                             create the topics the service uses
shopstream worker                             run a stream worker (faust)
shopstream replay DATASET [--speed X]         publish a real data set as contract events
shopstream tail [--topic recommendations]     print output records
shopstream forget USER_ID                     publish an erasure request: the user's state is deleted
shopstream consent USER_ID --marketing on|off publish a marketing consent change (off: no promotions)
shopstream demo                               all of the above on the shipped REES46 sample
shopstream schemas [--check]                  write or check the JSON Schema files
shopstream evaluate-promotions DATASET        the promotion policy replayed offline, model vs rules
shopstream evaluate-price-sensitivity DATASET learned price sensitivity vs the heuristic, on later choices
shopstream price-reference DIR --data DATASET add a data set's price reference to an exported model
shopstream uplift-report [--file F | --archive] uplift of promotions against the holdout, from their outcomes
shopstream retrain --data SPEC --model-dir DIR  a challenger, published if not worse than the served model
shopstream archive [convert DATASET|compact]  archive valid events as Parquet; convert a data set; compact
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from streams.errors import ShopstreamError
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[1]
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "local-kafka.sh"
# what `shopstream kafka tool NAME` runs: Kafka's bin/kafka-NAME.sh (the script maps them to classes)
KAFKA_TOOLS = ("console-producer", "console-consumer", "consumer-groups", "topics", "get-offsets")
log = logging.getLogger("streams.cli")


def cmd_kafka(settings: Settings, args: argparse.Namespace) -> int:
    if not KAFKA_SCRIPT.exists():
        raise ShopstreamError(f"{KAFKA_SCRIPT} not found: run from a source checkout (pip install -e .)")
    if args.action == "tool" and not args.args:
        raise ShopstreamError(f"kafka tool: name one of {', '.join(KAFKA_TOOLS)}")
    if args.action != "tool" and args.args:
        raise ShopstreamError(f"kafka {args.action} takes no arguments: {' '.join(args.args)}")
    return subprocess.call(["bash", str(KAFKA_SCRIPT), args.action, *args.args])


def cmd_settings(settings: Settings, args: argparse.Namespace) -> int:
    print("\n".join(settings.dump_env()))
    return 0


def cmd_topics(settings: Settings, args: argparse.Namespace) -> int:
    from streams.admin import ensure_topics

    created = asyncio.run(ensure_topics(settings))
    print(f"topics ready ({len(created)} created) on {settings.kafka_bootstrap_servers}")
    return 0


def ensure_data_dir(path: Path) -> Path:
    """Create the folder of the table stores, parents included (faust creates only the last level,
    so a fresh clone failed with ``FileNotFoundError: 'var/shopstream'``), or say why not."""
    if path.exists() and not path.is_dir():
        raise ShopstreamError(f"SHOPSTREAM_DATA_DIR={path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShopstreamError(
            f"cannot create SHOPSTREAM_DATA_DIR={path}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else "")
            + "; point it at a folder this user can write"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ShopstreamError(f"SHOPSTREAM_DATA_DIR={path} is not writable by this user")
    return path


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    ensure_data_dir(settings.data_dir)  # before anything connects: a bad folder fails fast

    import faust

    from streams.admin import ensure_topics
    from streams.app import build_app
    from streams.kafka_backoff import back_off_failed_metadata_refreshes

    back_off_failed_metadata_refreshes()  # no busy loop while the broker is away
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    log.info("kafka: %s", settings.kafka_summary())
    loop.run_until_complete(ensure_topics(settings))
    app = build_app(settings)
    from streams.gctune import freeze_startup

    log.info("%d objects built at start-up kept out of garbage collection", freeze_startup())
    worker = faust.Worker(app, loglevel=settings.log_level, loop=loop, quiet=True)
    worker.execute_from_commandline()  # exits the process
    return 0  # pragma: no cover


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from streams.admin import ensure_topics
    from streams.replay import replay
    from streams.sources.datasets import load

    events = load(args.dataset, settings.datasets_dir, Path(args.path) if args.path else None)

    async def run() -> tuple[int, float]:
        await ensure_topics(settings, list(settings.input_topics))
        return await replay(settings, events, speed=args.speed, keep_time=args.keep_time, limit=args.limit)

    n, secs = asyncio.run(run())
    print(f"replayed {n} {args.dataset} events in {secs:.1f}s ({n / max(secs, 1e-9):.0f} events/s)")
    return 0


def cmd_tail(settings: Settings, args: argparse.Namespace) -> int:
    from streams.tail import tail

    topic = {
        "recommendations": settings.topic_recommendations,
        "promotions": settings.topic_promotions,
        "outcomes": settings.topic_promotion_outcomes,
        "deadletter": settings.topic_deadletter,
    }.get(args.topic, args.topic)
    asyncio.run(
        tail(settings, topic, limit=args.limit, from_beginning=args.from_beginning, idle_timeout=args.timeout)
    )
    return 0


def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    from streams.privacy import publish, request

    done = asyncio.run(publish(settings, request("erasure", args.user_id)))
    print(
        f"erasure request {done.event_id} published to {done.topic}[{done.partition}]@{done.offset} and "
        "acknowledged: the workers delete the user's state and publish nothing more about them"
    )
    return 0


def cmd_consent(settings: Settings, args: argparse.Namespace) -> int:
    from streams.privacy import publish, request

    allowed = args.marketing == "on"
    done = asyncio.run(publish(settings, request("consent", args.user_id, marketing=allowed)))
    effect = "promotions to the user resume" if allowed else "no more promotions to the user"
    print(
        f"consent request {done.event_id} (marketing {args.marketing}) published to "
        f"{done.topic}[{done.partition}]@{done.offset} and acknowledged: {effect}, recommendations "
        "continue"
    )
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(settings, kafka_script=KAFKA_SCRIPT, events=args.events)


def cmd_uplift_report(settings: Settings, args: argparse.Namespace) -> int:
    from streams.uplift import render, run

    rep = run(settings, args.file, Path(args.out), args.archive, args.since, args.until, args.promotions)
    print(render(rep))
    print(
        f"wrote {Path(args.out) / 'uplift.json'}"
        + (f" and {rep['plot']}" if rep["plot"] else " (no plot: matplotlib not installed)")
    )
    return 0


def cmd_evaluate_price_sensitivity(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from streams.price_response import evaluate, render
    from streams.promotions import heuristic_price_sensitivity
    from streams.records import event_adapter
    from streams.sources.datasets import load

    events = [event_adapter.validate_json(orjson.dumps(d)) for d in load(args.dataset, settings.datasets_dir)]
    results = evaluate(args.dataset, events, heuristic_price_sensitivity, seed=args.seed)
    return _report(render(results), results, args.out, "price-sensitivity")


def _report(text: str, results: dict[str, Any], out_dir: str | None, name: str) -> int:
    """Print a report; with ``--out``, also write it as ``NAME.md`` and ``NAME.json`` there."""
    import json

    print(text)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(text)
        (out / f"{name}.json").write_text(json.dumps(results, indent=2))
        print(f"written to {out}/{name}.md and {name}.json")
    return 0


def cmd_price_reference(settings: Settings, args: argparse.Namespace) -> int:
    import json
    from datetime import datetime

    from exporters.publish import attach
    from streams.price_response import from_log
    from streams.sources.datasets import load

    folder = Path(args.model_dir)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ShopstreamError(f"price-reference: {manifest_path} does not exist (an exported model folder)")
    split = json.loads(manifest_path.read_text()).get("split") or {}
    if args.until:
        try:
            until: float | None = datetime.fromisoformat(args.until).timestamp()
        except ValueError:
            raise ShopstreamError(f"--until {args.until!r}: an ISO 8601 instant") from None
    else:  # the period the model trained on: its manifest's split, else the data set's
        until = split.get("valid_start")
    ref = from_log(args.data, load(args.data, settings.datasets_dir), until)
    if ref is None:
        raise ShopstreamError(
            f"price-reference: {args.data} has no category with priced items before the split"
        )
    entry = attach(folder, ref)
    print(
        f"price reference of {args.data} (events before {entry['until']}: {entry['categories']} categories, "
        f"{entry['items']} items, {entry['users']} users) written to {folder}"
    )
    return 0


def cmd_evaluate_promotions(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import datetime

    from streams.policy_eval import evaluate_promotions, report
    from streams.sources.datasets import load

    if args.since in (None, "test"):
        since = None  # the test period: the model manifest's split, else the data set's
    elif args.since == "all":
        since = 0.0
    else:
        try:
            since = datetime.fromisoformat(args.since).timestamp()
        except ValueError:
            raise ShopstreamError(f"--since {args.since!r}: an ISO 8601 instant, 'test' or 'all'") from None
    model = Path(args.model) if args.model else settings.model_dir
    if args.offer_policy:
        settings = settings.model_copy(update={"offer_policy": args.offer_policy})
    events = list(load(args.dataset, settings.datasets_dir))[: args.limit]
    results = evaluate_promotions(
        events,
        settings,
        model,
        window=args.window_h * 3600,
        since=since,
        dataset=args.dataset,
        horizon=args.horizon_h * 3600,
    )
    return _report(report(results, args.dataset), results, args.out, "promotions")


def cmd_schemas(settings: Settings, args: argparse.Namespace) -> int:
    from streams.schemas import check_schemas, write_schemas

    if args.check:
        stale = check_schemas()
        for name in stale:
            print(f"stale: {name} (run `shopstream schemas`)")
        return 1 if stale else 0
    for path in write_schemas():
        print(path)
    return 0


def _modeling() -> Any:
    """The learning side, imported only by the commands that need it (torch is an extra)."""
    try:
        import torch  # noqa: F401

        from modeling import cli
    except ImportError as exc:
        raise ShopstreamError(
            f"this command needs the training extra ({exc.name} is missing): pip install -e '.[train]'"
        ) from None
    return cli


def cmd_archive(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "compact":
        from streams.archive_compact import compact

        root = args.root or settings.archive_dir
        compacted = compact(root)
        print(
            f"{root}: {compacted.rows_removed} rows of erased users removed; {compacted.files_rewritten} "
            f"files rewritten, {compacted.files_removed} deleted, {compacted.files_read} read"
        )
        return 0
    if args.action != "convert":
        from streams.archive import archive_forever

        asyncio.run(archive_forever(settings))
        return 0
    from itertools import islice

    from streams.archive import convert
    from streams.sources.datasets import load

    root = args.root or settings.archive_dir
    events = load(args.dataset, settings.datasets_dir, Path(args.path) if args.path else None)
    done = convert(islice(events, args.limit), root, settings)
    rejected = ", ".join(f"{reason} {n}" for reason, n in sorted(done.rejected.items())) or "none"
    size = sum(f.bytes for f in done.files)
    print(
        f"archived {done.events} {args.dataset} events in {len(done.files)} files ({size} bytes) under {root}"
    )
    print(f"rejected: {rejected}")
    return 0


def train_data(settings: Settings, args: argparse.Namespace) -> str:
    """The data spec of a run; an archive's carries its time range and split zone."""
    options = (args.since, args.until, args.split_tz)
    if not args.data.startswith("archive:"):
        if any(options):
            raise ShopstreamError("--since, --until and --split-tz apply to --data archive:DIR only")
        return str(args.data)
    from streams.archive_read import ArchiveSpec

    return str(ArchiveSpec.parse(args.data, settings.default_timezone).with_options(*options))


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    m = _modeling()
    out = Path(args.out or f"runs/{args.data.replace(':', '-').replace('/', '_')}-{args.preset}")
    m.run_train(
        train_data(settings, args),
        args.preset,
        out,
        m.parse_overrides(args.set),
        settings.datasets_dir,
        evaluate_after=not args.no_eval,
    )
    return 0


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    _modeling().run_evaluate(Path(args.run), settings.datasets_dir)
    return 0


def add_catalogue_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--catalogue",
        choices=("fp32", "int8"),
        default="fp32",
        help="the product over the catalogue: exact (fp32), or an int8 first pass and an exact re-rank of "
        "its candidates, checked on the test cases (README, Serving the model)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="items the int8 first pass keeps (default and at least --top-k)",
    )


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    _modeling().run_export(
        Path(args.run), Path(args.out), settings.datasets_dir, args.top_k, args.catalogue, args.candidates
    )
    return 0


def cmd_retrain(settings: Settings, args: argparse.Namespace) -> int:
    m = _modeling()  # the training extra, or a one-line error
    from modeling.retrain import run_retrain

    model_dir = Path(args.model_dir) if args.model_dir else settings.model_dir
    if model_dir is None:
        raise ShopstreamError(
            "retrain: --model-dir DIR (or SHOPSTREAM_MODEL_DIR) names the folder workers serve"
        )
    return int(
        run_retrain(
            args.data or f"archive:{args.archive}",
            model_dir,
            settings.datasets_dir,
            preset=args.preset,
            overrides=m.parse_overrides(args.set),
            metric=args.metric,
            margin=args.margin,
            window_days=args.window_days,
            default_tz=settings.default_timezone,
            top_k=args.top_k,
            catalogue=args.catalogue,
            candidates=args.candidates,
            replace_broken=args.replace_broken,
            evaluate_run=not args.no_eval,
        )
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shopstream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser(
        "kafka",
        help="a local Apache Kafka broker (KRaft) and Kafka's command-line tools",
        description="tool NAME [ARG...] runs Kafka's bin/kafka-NAME.sh with the arguments, NAME one of:\n  "
        + ", ".join(KAFKA_TOOLS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    k.add_argument("action", choices=["up", "down", "status", "reset", "fetch", "tools-fetch", "tool"])
    k.add_argument("args", nargs=argparse.REMAINDER, help="tool: the tool's name and its arguments")
    k.set_defaults(func=cmd_kafka)
    sub.add_parser("settings", help="print the effective settings (secrets masked)").set_defaults(
        func=cmd_settings
    )
    sub.add_parser("topics", help="create the topics").set_defaults(func=cmd_topics)
    sub.add_parser("worker", help="run a stream worker").set_defaults(func=cmd_worker)
    r = sub.add_parser("replay", help="publish a real data set as contract events")
    r.add_argument(
        "dataset",
        help="rees46-demo, taobao, taobao-users, rees46, instacart, bestbuy, amazon-beauty, amazon-fashion",
    )
    r.add_argument("--path", help="read this file instead of the data folder's")
    r.add_argument("--speed", type=float, default=None, help="x real time (default: max rate)")
    r.add_argument("--limit", type=int, default=None, help="publish only the first N events")
    r.add_argument("--keep-time", action="store_true", help="keep original event times")
    r.set_defaults(func=cmd_replay)
    t = sub.add_parser("tail", help="print output records")
    t.add_argument(
        "--topic", default="recommendations", help="recommendations, promotions, outcomes, deadletter"
    )
    t.add_argument("--limit", type=int, default=None)
    t.add_argument("--from-beginning", action="store_true")
    t.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")
    t.set_defaults(func=cmd_tail)
    fg = sub.add_parser("forget", help="publish an erasure request: forget a user (privacy)")
    fg.add_argument("user_id", help="the shop's id of the user")
    fg.set_defaults(func=cmd_forget)
    cs = sub.add_parser("consent", help="publish a marketing consent change of a user")
    cs.add_argument("user_id", help="the shop's id of the user")
    cs.add_argument(
        "--marketing", required=True, choices=["on", "off"], help="off: no promotions; on: promotions again"
    )
    cs.set_defaults(func=cmd_consent)
    d = sub.add_parser("demo", help="local Kafka + worker + the REES46 sample replayed")
    d.add_argument("--events", type=int, default=3000, help="sample events to replay")
    d.set_defaults(func=cmd_demo)
    up = sub.add_parser(
        "uplift-report", help="uplift of promotions against the holdout group, from their outcome records"
    )
    up.add_argument(
        "--file", help="a JSON-lines file of outcome records (default: read the outcomes topic to its end)"
    )
    up.add_argument(
        "--archive",
        nargs="?",
        const="",
        metavar="ROOT",
        help="read the outcomes the archiver kept (default root: SHOPSTREAM_ARCHIVE_DIR), past the "
        "topic's retention",
    )
    up.add_argument(
        "--promotions",
        help="with --file: a JSON-lines file of the promotion records, for the off-policy estimates of "
        "the bandit's offers (from the archive or the topics they are read with the outcomes)",
    )
    up.add_argument("--since", help="with --archive: promotions decided at or after this time (ISO-8601)")
    up.add_argument("--until", help="with --archive: promotions decided before this time (ISO-8601)")
    up.add_argument("--out", default="var/uplift", help="folder for uplift.json and uplift.png")
    up.set_defaults(func=cmd_uplift_report)
    pe = sub.add_parser(
        "evaluate-promotions", help="replay a data set through the promotion policy: model vs rule-only"
    )
    pe.add_argument("dataset", help="taobao-users, taobao, rees46, rees46-demo, instacart, ...")
    pe.add_argument("--model", help="exported model folder (default: SHOPSTREAM_MODEL_DIR; none: rules only)")
    pe.add_argument("--window-h", type=float, default=24.0, help="outcome window after a trigger, hours")
    pe.add_argument(
        "--since",
        help="count from this instant (ISO 8601), or 'all' (the whole log); default 'test': the test "
        "period of the model's manifest split, else of the data set (with --limit: of the events read)",
    )
    pe.add_argument(
        "--horizon-h", type=float, default=6.0, help="purchase horizon of the propensity ranking, hours"
    )
    pe.add_argument("--limit", type=int, default=None, help="first N events only")
    pe.add_argument(
        "--offer-policy",
        choices=("rules", "bandit"),
        help="how offers are chosen (default: SHOPSTREAM_OFFER_POLICY); with bandit the report adds the "
        "off-policy estimates of every offer from the bandit's decisions",
    )
    pe.add_argument("--out", help="folder for promotions.md and promotions.json")
    pe.set_defaults(func=cmd_evaluate_promotions)
    ps = sub.add_parser(
        "evaluate-price-sensitivity",
        help="how well the learned price sensitivity ranks users by the prices they later choose, vs the "
        "heuristic",
    )
    ps.add_argument(
        "dataset", help="a data set with prices: rees46, rees46-demo (others report no reference)"
    )
    ps.add_argument("--seed", type=int, default=0, help="seed of the user resampling")
    ps.add_argument("--out", help="folder for price-sensitivity.md and price-sensitivity.json")
    ps.set_defaults(func=cmd_evaluate_price_sensitivity)
    pr = sub.add_parser(
        "price-reference", help="fit the price reference of a data set into an exported model folder"
    )
    pr.add_argument("model_dir", help="the exported model folder (its manifest gains price_reference)")
    pr.add_argument(
        "--data", required=True, help="the data set the model trained on (rees46, rees46-demo, ...)"
    )
    pr.add_argument(
        "--until",
        help="fit on events before this instant (ISO 8601); default: the manifest's validation start, else "
        "the data set's (streams.splits)",
    )
    pr.set_defaults(func=cmd_price_reference)
    s = sub.add_parser("schemas", help="write streams/schemas/*.json from the records")
    s.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    s.set_defaults(func=cmd_schemas)
    tr = sub.add_parser("train", help="train the behaviour model (pip install -e '.[train]')")
    tr.add_argument(
        "--data",
        required=True,
        help="seqrec:Beauty, seqrec:Sports_and_Outdoors, taobao-users, rees46, rees46-demo, archive:DIR "
        "(an event archive, any fsspec URL), or a 'user item item ...' file",
    )
    tr.add_argument("--since", help="archive: events from this ISO 8601 instant (no offset: split zone)")
    tr.add_argument("--until", help="archive: events before this ISO 8601 instant (no offset: split zone)")
    tr.add_argument(
        "--split-tz",
        help="archive: IANA zone of the calendar days of the split (default SHOPSTREAM_DEFAULT_TIMEZONE)",
    )
    tr.add_argument("--preset", default="seqrec", help="tiny, seqrec or events")
    tr.add_argument("--out", help="run folder (default runs/<data>-<preset>)")
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model or training setting, e.g. --set dropout=0.3",
    )
    tr.add_argument("--no-eval", action="store_true", help="skip the test evaluation after training")
    tr.set_defaults(func=cmd_train)
    ar = sub.add_parser(
        "archive",
        help="archive valid events and promotions as Parquet (own group)",
        description="Without a subcommand: run the archiver (its own consumer group) until SIGTERM.",
    )
    ar.set_defaults(func=cmd_archive)
    arsub = ar.add_subparsers(dest="action")
    conv = arsub.add_parser("convert", help="write a public data set into an archive, without a broker")
    conv.add_argument("dataset", help="rees46-demo, taobao, taobao-users, rees46, instacart, bestbuy, ...")
    conv.add_argument("--root", help="archive folder or fsspec URL (default SHOPSTREAM_ARCHIVE_DIR)")
    conv.add_argument("--path", help="read this file instead of the data folder's")
    conv.add_argument("--limit", type=int, default=None, help="only the first N events")
    comp = arsub.add_parser("compact", help="rewrite the files that hold rows of erased users")
    comp.add_argument("--root", help="archive folder or fsspec URL (default SHOPSTREAM_ARCHIVE_DIR)")
    ev = sub.add_parser("evaluate", help="evaluate a run against baselines, write its report")
    ev.add_argument("run", help="run folder")
    ev.set_defaults(func=cmd_evaluate)
    ex = sub.add_parser("export", help="export a run to ONNX + manifest for serving")
    ex.add_argument("run", help="run folder")
    ex.add_argument("--out", required=True, help="artifact folder")
    ex.add_argument("--top-k", type=int, default=100, help="items the graph returns per event")
    add_catalogue_option(ex)
    ex.set_defaults(func=cmd_export)
    rt = sub.add_parser(
        "retrain",
        help="train a challenger, score it and the served model on the same held-out cases, publish it "
        "if not worse (pip install -e '.[train]')",
    )
    data = rt.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="a data spec as `train --data` takes it: rees46-demo, taobao-users, ...")
    data.add_argument("--archive", metavar="DIR", help="shorthand for --data archive:DIR")
    rt.add_argument(
        "--model-dir", metavar="DIR", help="the folder workers serve (default: SHOPSTREAM_MODEL_DIR)"
    )
    rt.add_argument(
        "--window-days",
        metavar="N",
        type=float,
        default=None,
        help="archive data only: train on the events of the last N days; other data sets are split "
        "as `train` splits them and the window does not apply (default: all)",
    )
    rt.add_argument(
        "--metric",
        default="auto",
        choices=["auto", "NDCG@10", "HR@10", "serving-NDCG@10", "serving-HR@10", "ROC-AUC"],
        help="what decides; auto: NDCG@10 under serving's exclusions on event logs, else NDCG@10",
    )
    rt.add_argument(
        "--margin",
        metavar="X",
        type=float,
        default=0.001,
        help="publish unless the challenger is worse than the champion by more than this (absolute; "
        "default 0.001)",
    )
    rt.add_argument("--preset", default="events", help="tiny, seqrec or events (default)")
    rt.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a model or training setting"
    )
    rt.add_argument("--top-k", type=int, default=100, help="items the exported graph returns per event")
    add_catalogue_option(rt)
    rt.add_argument(
        "--replace-broken",
        action="store_true",
        help="when the published model does not load, publish the challenger on its own",
    )
    rt.add_argument("--no-eval", action="store_true", help="skip the run's baseline evaluation (eval.json)")
    rt.set_defaults(func=cmd_retrain)
    return p


def setting_errors(exc: ValidationError) -> list[str]:
    """One line per invalid setting, naming its variable. pydantic's echo of the input stays off
    (it may be the password); the checks in ``Settings`` show a value only where it is no secret."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        where = "_".join(str(x) for x in err["loc"]).upper()  # an aliased field: already SHOPSTREAM_...
        name = where if where.startswith("SHOPSTREAM_") else f"SHOPSTREAM_{where}"
        msg = err["msg"].removeprefix("Value error, ")  # our checks name the variable themselves
        lines.append(f"invalid {name}: {msg}" if where and name not in msg else f"invalid setting: {msg}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        settings = Settings()
        return int(args.func(settings, args))
    except ValidationError as exc:
        for line in setting_errors(exc):
            print(f"shopstream: {line}", file=sys.stderr)
        return 2
    except ShopstreamError as exc:
        print(f"shopstream: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> NoReturn:
    """The command line as a process (``shopstream``, ``python -m streams``): ``main()``, then
    out without the interpreter's teardown (``os._exit``, once the standard streams and the logs
    are flushed). A native thread pool still alive at teardown can abort it and turn a finished
    command's exit code into -6: pyarrow's, after reading Parquet (apache/arrow#34314; seen in
    CI once ``archive compact`` had printed its result). Every command closes its files and joins
    its threads before it returns."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run()
