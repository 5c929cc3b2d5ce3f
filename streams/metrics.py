"""Prometheus metrics of the worker, built against an injected registry.

Names are in base units with Prometheus suffixes; every label has a bounded set of values
(topics from settings, reasons from ``RejectReason``, sources from the record contract).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from streams.scoring import ModelWatcher

INFERENCE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
AGE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0, 604800.0)


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
        self.routed = Counter(
            "shopstream_events_routed_total",
            "Valid input events by how they reached their user's state: scored where they were read "
            "(direct) or forwarded through the by-user topic (hop).",
            ["path"],
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
        self.erasures = Counter(
            "shopstream_erasures_total",
            "Erasure requests applied: the user's state deleted (with a changelog tombstone), their "
            "timers cancelled.",
            registry=registry,
        )
        self.consents = Counter(
            "shopstream_consents_total",
            "Marketing consent changes applied, by the new value (false: opted out of promotions).",
            ["marketing"],
            registry=registry,
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
            "Triggers the policy did not publish, by reason (opt_out, order, frequency_cap, quiet_hours, "
            "duplicate).",
            ["reason"],
            registry=registry,
        )
        # attribution (streams.attribution): per kind, offer and holdout, so conversion rates and
        # revenue per promotion of treated and holdout users (the incremental lift) are PromQL ratios
        self.outcomes = Counter(
            "shopstream_promotion_outcomes_total",
            "Promotion outcomes published, by kind, offer, holdout and converted (an order within the "
            "attribution window); closed early for capacity are counted apart (closed_by).",
            ["kind", "offer", "holdout", "converted", "closed_by"],
            registry=registry,
        )
        self.outcome_revenue = Counter(
            "shopstream_promotion_revenue_total",
            "Revenue of converted promotions, by kind, offer and holdout: scope=items (the promoted items' "
            "order lines) or order (the whole order), in the orders' currency units.",
            ["kind", "offer", "holdout", "scope"],
            registry=registry,
        )
        self.outcome_discount = Counter(
            "shopstream_promotion_discount_cost_total",
            "Discount cost of converted, sent percent_off promotions, by kind and offer.",
            ["kind", "offer"],
            registry=registry,
        )
        self.promotions_resent = Counter(
            "shopstream_promotions_resent_total",
            "Promotions sent again, with their ids, because the event that decided them was redelivered.",
            registry=registry,
        )
        self.inference_failures = Counter(
            "shopstream_inference_failures_total",
            "Batches the model failed to score at run time (the baseline answered them), by version.",
            ["model_version"],
            registry=registry,
        )
        self.records_refetched = Counter(
            "shopstream_records_refetched_total",
            "Seeks back to a record dropped unprocessed, per partition and time: handed to a stream and "
            "cleared from its queue (faust clears its queues when it resumes the flow after a rebalance), "
            "or, on a partition never committed, taken from aiokafka and dropped by faust while paused. "
            "Read again from there, never committed past.",
            ["topic"],
            registry=registry,
        )
        self.offset_jumps = Counter(
            "shopstream_offset_jumps_total",
            "Fetched records whose offset jumped past unread ones (a stale record after a rebalance): "
            "never committed past; the records in between are read again.",
            ["topic"],
            registry=registry,
        )
        self.checkpoint_keys = Counter(
            "shopstream_checkpoint_keys_total",
            "Table keys written to their changelogs at checkpoints (once per changed key per commit "
            "interval; compare with shopstream_events_total for the changelog records per event).",
            registry=registry,
        )
        self.checkpoint_seconds = Histogram(
            "shopstream_checkpoint_seconds",
            "Wall time batches wait for a checkpoint (once per commit): the tables' pending changes "
            "and the records sent so far taken, the offsets to commit computed.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.checkpoint_write_seconds = Histogram(
            "shopstream_checkpoint_write_seconds",
            "Wall time a checkpoint takes to write the changes it took to the stores and changelogs "
            "(once per commit; batches go on meanwhile); their acknowledgements, with the outputs', "
            "are awaited afterwards, before the offsets are committed.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.timer_errors = Counter(
            "shopstream_timer_errors_total",
            "Exceptions caught in a periodic task (it runs again at its next tick), by task.",
            ["timer"],
            registry=registry,
        )
        self.delivered = Counter(
            "shopstream_records_confirmed_total",
            "Records (outputs, dead letters, forwards, changelog writes) acknowledged by the broker "
            "before their input was acked.",
            registry=registry,
        )
        self.progress_stalled = Gauge(
            "shopstream_progress_stalled_seconds",
            "Longest time an assigned input partition has had lag while its committed offset did not move.",
            registry=registry,
        )
        self.cart_timers = Gauge(
            "shopstream_cart_timers", "Cart-abandonment timers pending in this worker.", registry=registry
        )
        self.event_age = Histogram(
            "shopstream_event_age_seconds",
            "Worker clock at publication minus the event's own event_time (includes producer delay).",
            buckets=AGE_BUCKETS,
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "shopstream_consumer_lag_messages",
            "Messages in the partition after the last one this worker read, per assigned partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.table_keys = Gauge(
            "shopstream_table_keys",
            "Keys in each table on this worker's active partitions (users exact; items, budget estimated).",
            ["table"],
            registry=registry,
        )
        self.rebalances = Counter(
            "shopstream_rebalances_total", "Partition assignments this worker received.", registry=registry
        )
        self.recoveries = Counter(
            "shopstream_table_recoveries_total",
            "Table recoveries from changelogs completed.",
            registry=registry,
        )
        self.recovery_seconds = Gauge(
            "shopstream_table_recovery_seconds", "Duration of the last table recovery.", registry=registry
        )
        self.ready = Gauge(
            "shopstream_ready",
            "1 when the worker is consuming with recovered tables and (if configured) a loaded model.",
            registry=registry,
        )
        self.start_time = Gauge(
            "shopstream_worker_start_time_seconds",
            "Unix time this worker process started (a change means a restart).",
            registry=registry,
        )
        self.start_time.set_to_current_time()

    def offset_jumped(self, tp: Any, expected: int, offset: int) -> None:
        """The consumer's ``on_jump``: ``tp`` fetched ``offset`` where ``expected`` was next."""
        self.offset_jumps.labels(tp.topic).inc()

    def refetching(self, tp: Any, offset: int) -> None:
        """The consumer's ``on_refetch``: ``tp`` is sought back to a record dropped unprocessed."""
        self.records_refetched.labels(tp.topic).inc()

    def watch_models(self, models: ModelWatcher, clock: Callable[[], float] = time.time) -> None:
        """Export the served model's age and the model folder's last retrain decisions, from what
        ``models`` read when it last polled the folder (``ModelFolderCollector``)."""
        self.registry.register(ModelFolderCollector(models, clock))


class ModelFolderCollector:
    """``shopstream_model_age_seconds`` and ``shopstream_retrain_last_decision_timestamp_seconds``,
    made when Prometheus scrapes from the watcher's attributes: no file is read here (the watcher
    reads the manifest and ``registry.jsonl`` when it polls) and nothing runs per event."""

    def __init__(self, models: ModelWatcher, clock: Callable[[], float] = time.time) -> None:
        self.models, self.clock = models, clock

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._age(), self._decisions()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        age, decisions = self._age(), self._decisions()
        model = self.models.current
        if model is not None and model.created_at is not None:
            age.add_metric([], self.clock() - model.created_at)
        for decision, at in sorted(self.models.decisions.items()):
            decisions.add_metric([decision], at)
        yield age
        yield decisions

    @staticmethod
    def _age() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "shopstream_model_age_seconds",
            "Seconds since the served model version was exported (its manifest's created_at); absent "
            "without a model or a created_at.",
        )

    @staticmethod
    def _decisions() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "shopstream_retrain_last_decision_timestamp_seconds",
            "Unix time of the model folder's latest retrain decision of each kind (published, "
            "refused), from its registry.jsonl as read at the last poll.",
            labels=["decision"],
        )
