"""Writes deploy/grafana/dashboards/shopstream.json (run after editing the panels below).

Every panel's PromQL is evaluated against a real Prometheus scraping a real worker and a real
archiver in tests/integration/test_dashboard.py, which fails on an invalid query or one without data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "shopstream.json"
J = '{job=~"$job"}'  # every worker query is filtered by the job template variable
A = '{job=~"$archive_job"}'  # archiver queries by their own (its scrape job may have another name)
RI = "[$__rate_interval]"
OK = '{job=~"$job",outcome="ok"}'
NOT_OK = '{job=~"$job",outcome!="ok"}'
HOLDOUT = '{job=~"$job",holdout="true"}'
CARTS = '{job=~"$job",kind="cart_abandonment"}'
LIFT_RANGE = "[7d]"  # lift is read over days: the holdout group is small (5 % by default)
OUTCOMES = "shopstream_promotion_outcomes_total"
REVENUE = "shopstream_promotion_revenue_total"


def outcomes(by: str, **labels: str) -> str:
    """Outcomes over ``LIFT_RANGE`` (those closed early for capacity left out), summed ``by``."""
    sel = ",".join(['job=~"$job"', 'closed_by!="capacity"', *(f'{k}="{v}"' for k, v in labels.items())])
    return f"sum by ({by}) (increase({OUTCOMES}{{{sel}}}{LIFT_RANGE}))"


def conversion(by: str, holdout: str) -> str:
    return f"({outcomes(by, holdout=holdout, converted='true')} / {outcomes(by, holdout=holdout)})"


def revenue_per_outcome(by: str, holdout: str) -> str:
    sel = f'{{job=~"$job",holdout="{holdout}",scope="order"}}'
    return f"(sum by ({by}) (increase({REVENUE}{sel}{LIFT_RANGE})) / {outcomes(by, holdout=holdout)})"


def discount_per_outcome(by: str) -> str:
    cost = f"sum by ({by}) (increase(shopstream_promotion_discount_cost_total{J}{LIFT_RANGE}))"
    none = f"(0 * {outcomes(by, holdout='false')})"  # no discount series for a kind: a cost of 0
    return f"(({cost} or {none}) / {outcomes(by, holdout='false')})"


def q(expr: str, legend: str = "") -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend, "datasource": {"type": "prometheus", "uid": "prometheus"}}


def panel(
    title: str,
    targets: list[dict[str, Any]],
    unit: str,
    *,
    kind: str = "timeseries",
    thresholds: list[tuple[str, float | None]] | None = None,
    description: str = "",
    w: int = 8,
) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for c, v in (thresholds or [("green", None)])]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "targets": [dict(t, refId=chr(65 + i)) for i, t in enumerate(targets)],
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {},
        "gridPos": {"h": 8, "w": w},
    }


def job_variable(name: str, metric: str) -> dict[str, Any]:
    """A multi-value template variable over the scrape jobs that export ``metric``."""
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "query": {"query": f"label_values({metric}, job)", "refId": name},
        "definition": f"label_values({metric}, job)",
        "includeAll": True,
        "multi": True,
        "allValue": ".+",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
    }


def quantiles(metric: str) -> list[dict[str, Any]]:
    return [
        q(f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket{J}{RI})))", f"p{int(p * 100)}")
        for p in (0.5, 0.99)
    ]


ROWS: list[tuple[str, list[dict[str, Any]]]] = [
    (
        "Health",
        [
            panel(
                "Events consumed / s",
                [q(f"sum by (topic) (rate(shopstream_events_total{OK}{RI}))", "{{topic}}")],
                "reqps",
                description="Valid input messages per second, per input topic.",
            ),
            panel(
                "Consumer lag",
                [q(f"sum by (topic) (shopstream_consumer_lag_messages{J})", "{{topic}}")],
                "short",
                thresholds=[("green", None), ("orange", 1000), ("red", 10000)],
                description="Messages not yet read, summed over partitions and workers.",
            ),
            panel(
                "Dead letters / s",
                [
                    q(
                        f"sum by (outcome) (rate(shopstream_events_total{NOT_OK}{RI}))",
                        "{{outcome}}",
                    )
                ],
                "reqps",
                thresholds=[("green", None), ("red", 1)],
                description="Input messages sent to shop.deadletter, by reason.",
            ),
            panel(
                "Workers ready",
                [q(f"sum(shopstream_ready{J})", "ready"), q(f"count(shopstream_ready{J})", "workers")],
                "short",
                kind="stat",
                thresholds=[("red", None), ("green", 1)],
                description="Consuming, tables recovered, model loaded (see /readyz).",
            ),
            panel(
                "Event to recommendation latency",
                quantiles("shopstream_event_to_output_seconds"),
                "s",
                thresholds=[("green", None), ("orange", 1), ("red", 2)],
                description="Worker clock at publication minus the input's Kafka timestamp.",
            ),
            panel(
                "Restarts, rebalances, recovery",
                [
                    q(f"sum(changes(shopstream_worker_start_time_seconds{J}[1h]))", "restarts (1h)"),
                    q(f"sum(increase(shopstream_rebalances_total{J}[1h]))", "assignments (1h)"),
                    q(f"max(shopstream_table_recovery_seconds{J})", "last recovery (s)"),
                ],
                "short",
                kind="stat",
            ),
            panel(
                "Table keys",
                [q(f"sum by (table) (shopstream_table_keys{J})", "{{table}}")],
                "short",
                description="Keys on active partitions (RocksDB estimate), all workers.",
            ),
            panel(
                "Users expired / s",
                [q(f"sum(rate(shopstream_users_expired_total{J}{RI}))", "expired")],
                "reqps",
            ),
            panel(
                "Cart timers pending",
                [q(f"sum(shopstream_cart_timers{J})", "timers")],
                "short",
            ),
        ],
    ),
    (
        "Model",
        [
            panel(
                "Inference latency (one call)",
                quantiles("shopstream_inference_seconds"),
                "s",
                thresholds=[("green", None), ("orange", 0.05), ("red", 0.2)],
            ),
            panel(
                "Micro-batch size",
                [
                    q(
                        f"sum(rate(shopstream_inference_batch_size_sum{J}{RI}))"
                        f" / sum(rate(shopstream_inference_batch_size_count{J}{RI}))",
                        "mean events per call",
                    )
                ],
                "short",
            ),
            panel(
                "Model version and provider",
                [q(f"max by (version, provider) (shopstream_model_info{J})", "{{version}} on {{provider}}")],
                "short",
                kind="table",
                description="One row per version and execution provider serving now.",
            ),
            panel(
                "Model loads",
                [q(f"sum by (outcome) (increase(shopstream_model_reloads_total{J}[1h]))", "{{outcome}}")],
                "short",
                kind="stat",
                description="loaded at start, reloaded (hot swap), failed (refused, old one kept).",
            ),
            panel(
                "Recommendations by source / s",
                [q(f"sum by (source) (rate(shopstream_recommendations_total{J}{RI}))", "{{source}}")],
                "reqps",
                description="model, or baseline (cold users, unknown items, no model).",
            ),
        ],
    ),
    (
        "Business",
        [
            panel(
                "Recommendations / s",
                [q(f"sum(rate(shopstream_recommendations_total{J}{RI}))", "recommendations")],
                "reqps",
            ),
            panel(
                "Promotions by kind / s",
                [q(f"sum by (kind) (rate(shopstream_promotions_total{J}{RI}))", "{{kind}}")],
                "reqps",
            ),
            panel(
                "Holdout share",
                [
                    q(
                        f"sum(increase(shopstream_promotions_total{HOLDOUT}[1h]))"
                        f" / sum(increase(shopstream_promotions_total{J}[1h]))",
                        "holdout",
                    )
                ],
                "percentunit",
                kind="stat",
                description="Share of promotions logged for the holdout group (SHOPSTREAM_HOLDOUT_PERCENT).",
            ),
            panel(
                "Cart abandonment triggers (1h)",
                [
                    q(
                        f"sum(increase(shopstream_promotions_total{CARTS}[1h]))",
                        "carts",
                    )
                ],
                "short",
                kind="stat",
            ),
            panel(
                "Suppressed triggers / s",
                [q(f"sum by (reason) (rate(shopstream_promotions_suppressed_total{J}{RI}))", "{{reason}}")],
                "reqps",
                description="Triggers held back: after an order, frequency cap, quiet hours, duplicate.",
            ),
        ],
    ),
    (
        "Incremental lift",
        [
            panel(
                "Conversion, treated and holdout (7d)",
                [
                    q(conversion("kind", "false"), "{{kind}} treated"),
                    q(conversion("kind", "true"), "{{kind}} holdout"),
                ],
                "percentunit",
                description="Share of promotions whose user ordered within the attribution window "
                "(SHOPSTREAM_ATTRIBUTION_WINDOW_S), for promotions sent (treated) and logged for the "
                "holdout group (not contacted), by kind.",
            ),
            panel(
                "Incremental conversion (7d)",
                [q(f"{conversion('kind', 'false')} - {conversion('kind', 'true')}", "{{kind}}")],
                "percentunit",
                description="Treated conversion minus holdout conversion: the orders the promotion caused, "
                "per promotion. Noisy while the holdout side has few outcomes: read it over days.",
            ),
            panel(
                "Net incremental revenue per promotion (7d)",
                [
                    q(
                        f"{revenue_per_outcome('kind', 'false')} - {revenue_per_outcome('kind', 'true')}"
                        f" - {discount_per_outcome('kind')}",
                        "{{kind}}",
                    )
                ],
                "short",
                description="Order revenue per treated promotion minus per holdout promotion, less the "
                "discount cost per treated promotion, in the orders' currency units.",
            ),
            panel(
                "Conversion by offer (7d)",
                [
                    q(conversion("kind, offer", "false"), "{{kind}} {{offer}} treated"),
                    q(conversion("kind, offer", "true"), "{{kind}} {{offer}} holdout"),
                ],
                "percentunit",
                description="As the first panel, by offer (reminder, percent_off:N, service_recovery).",
            ),
            panel(
                "Outcomes / s",
                [
                    q(
                        f"sum by (kind, converted) (rate({OUTCOMES}{J}{RI}))",
                        "{{kind}} converted={{converted}}",
                    )
                ],
                "reqps",
                description="Outcome records published to shop.promotion-outcomes: an order in the window "
                "(converted=true) or the window's end.",
            ),
        ],
    ),
    (
        "Learning",
        [
            panel(
                "Model age",
                [q(f"max(shopstream_model_age_seconds{J})", "oldest served")],
                "s",
                kind="stat",
                thresholds=[("green", None), ("orange", 2 * 86400), ("red", 7 * 86400)],
                description="Since the served version was exported (its manifest's created_at); the "
                "oldest any worker serves. A nightly retrain that publishes keeps it under two days.",
                w=6,
            ),
            panel(
                "Since the last retrain decision",
                [
                    q(
                        f"time() - max by (decision) (shopstream_retrain_last_decision_timestamp_seconds{J})",
                        "{{decision}}",
                    )
                ],
                "s",
                kind="stat",
                thresholds=[("green", None), ("orange", 36 * 3600), ("red", 2 * 86400)],
                description="Time since the latest published and the latest refused challenger "
                "(registry.jsonl in the model folder, read by the workers): the smaller is the last "
                "decision; none means no retrain has run.",
                w=6,
            ),
            panel(
                "Archive commit age",
                [q(f"max(shopstream_archive_commit_age_seconds{A})", "oldest uncommitted")],
                "s",
                kind="stat",
                thresholds=[("green", None), ("orange", 600), ("red", 900)],
                description="Since an archiver last committed while rows wait (0: nothing waits). It "
                "rolls every SHOPSTREAM_ARCHIVE_ROLL_S (300 s) or SHOPSTREAM_ARCHIVE_ROLL_BYTES.",
                w=6,
            ),
            panel(
                "Archive files written (1h)",
                [q(f"sum by (stream) (increase(shopstream_archive_files_total{A}[1h]))", "{{stream}}")],
                "short",
                kind="stat",
                description="Parquet files written by the archivers in the last hour, by stream.",
                w=6,
            ),
            panel(
                "Archive lag",
                [q(f"sum by (topic) (shopstream_archive_consumer_lag_messages{A})", "{{topic}}")],
                "short",
                description="Messages not yet durably archived (end offset minus committed), all "
                "archivers; it includes what waits for the next roll, so it saw-tooths.",
            ),
            panel(
                "Archive events / s",
                [q(f"sum by (stream) (rate(shopstream_archive_events_total{A}{RI}))", "{{stream}}")],
                "reqps",
                description="Rows written to Parquet files, by stream (events, promotions).",
            ),
            panel(
                "Archive bytes written / s",
                [q(f"sum by (stream) (rate(shopstream_archive_bytes_total{A}{RI}))", "{{stream}}")],
                "Bps",
                description="Parquet (zstd) bytes written, by stream.",
            ),
        ],
    ),
]


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for title, row in ROWS:
        panels.append(
            {
                "type": "row",
                "title": title,
                "id": pid,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid += 1
        y += 1
        x = 0
        for p in row:
            if x + p["gridPos"]["w"] > 24:
                x, y = 0, y + 8
            p["gridPos"].update(x=x, y=y)
            p["id"] = pid
            pid += 1
            x += p["gridPos"]["w"]
            panels.append(p)
        y += 8
    return {
        "uid": "shopstream",
        "title": "shopstream",
        "tags": ["shopstream", "kafka"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                job_variable("job", "shopstream_events_total"),
                job_variable("archive_job", "shopstream_archive_commit_age_seconds"),
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT}")
