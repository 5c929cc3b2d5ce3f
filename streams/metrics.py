"""Prometheus metrics of the worker, built against an injected registry.

Names are in base units with Prometheus suffixes; every label has a bounded set of values
(topics from settings, reasons from ``RejectReason``, sources from the record contract).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric the worker exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events = Counter(
            "shopstream_events_total",
            "Input messages consumed, by topic and outcome (ok, or the dead-letter reason).",
            ["topic", "outcome"],
            registry=registry,
        )
        self.duplicates = Counter(
            "shopstream_duplicate_events_total",
            "Events whose event_id was already folded into the user's state (redeliveries).",
            registry=registry,
        )
        self.recommendations = Counter(
            "shopstream_recommendations_total",
            "Recommendations published, by source (model or baseline).",
            ["source"],
            registry=registry,
        )
        self.users_expired = Counter(
            "shopstream_users_expired_total", "Idle users removed from state.", registry=registry
        )
        self.end_to_end = Histogram(
            "shopstream_event_to_output_seconds",
            "Worker clock at publication minus the message's Kafka timestamp.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
