"""Prometheus metrics of the worker, built against an injected registry.

Names are in base units with Prometheus suffixes; every label has a bounded set of values
(topics from settings, reasons from ``RejectReason``, sources from the record contract).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

INFERENCE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
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
        self.inference_seconds = Histogram(
            "shopstream_inference_seconds",
            "Wall time of one onnxruntime call (a micro-batch), including input encoding.",
            buckets=INFERENCE_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "shopstream_inference_batch_size",
            "Events scored per onnxruntime call.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.model_info = Gauge(
            "shopstream_model_info",
            "1 for the model version and execution provider serving now (absent: baseline only).",
            ["version", "provider"],
            registry=registry,
        )
        self.model_reloads = Counter(
            "shopstream_model_reloads_total",
            "Model loads by outcome (loaded at start, reloaded, failed: refused, old one kept).",
            ["outcome"],
            registry=registry,
        )
        self.promotions = Counter(
            "shopstream_promotions_total",
            "Promotion records published, by kind and holdout (holdout=true: logged, not to be sent).",
            ["kind", "holdout"],
            registry=registry,
        )
        self.promotions_suppressed = Counter(
            "shopstream_promotions_suppressed_total",
            "Triggers the policy did not publish, by reason (order, frequency_cap, quiet_hours, duplicate).",
            ["reason"],
            registry=registry,
        )
        self.cart_timers = Gauge(
            "shopstream_cart_timers", "Cart-abandonment timers pending in this worker.", registry=registry
        )
