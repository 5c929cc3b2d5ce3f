"""Exceptions of the service.

ShopstreamError
 ├── RejectedInput        an input message that breaks the contract: dead-lettered, never fatal
 ├── ConfigurationError   settings or files that cannot work: the process exits with the message
 ├── BrokerUnavailable    the Kafka cluster cannot be reached within the timeout
 └── DeliveryFailed       the broker did not acknowledge an output: the worker exits unacked
"""

from __future__ import annotations

from enum import StrEnum


class ShopstreamError(Exception):
    """Base of every error this package raises on purpose."""


class RejectReason(StrEnum):
    """Why an input was dead-lettered (a bounded label for metrics and DLQ headers)."""

    EMPTY = "empty"
    OVERSIZED = "oversized"
    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    WRONG_TOPIC = "wrong_topic"
    IMPOSSIBLE_VALUE = "impossible_value"
    UNKNOWN_TOPIC = "unknown_topic"
    PROCESSING_ERROR = "processing_error"


class RejectedInput(ShopstreamError):
    """An input message that cannot be processed; carries a bounded reason and a short detail."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:1000]


class ConfigurationError(ShopstreamError):
    """Settings or files that cannot work."""


class BrokerUnavailable(ShopstreamError):
    """The Kafka cluster did not answer in time."""


class DeliveryFailed(ShopstreamError):
    """The broker did not acknowledge a record (or not within the deadline): fatal for the worker,
    which exits without acking the batch so that its input is redelivered."""
