"""The one settings object of the service, read from the environment once in ``main()``.

Every field reads ``SHOPSTREAM_<FIELD>``; the broker list also honours the conventional
``KAFKA_BOOTSTRAP_SERVERS``. Nothing deeper in the code reads ``os.environ``: components
receive the ``Settings`` instance they need.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOPIC_FIELDS = (
    "topic_searches",
    "topic_views",
    "topic_carts",
    "topic_orders",
    "topic_reviews",
    "topic_recommendations",
    "topic_promotions",
    "topic_promotion_outcomes",
    "topic_deadletter",
    "topic_events_by_user",
    "topic_erasures",
    "topic_consents",
)
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")  # Kafka's own rule (kafka.common.internals.Topic)
# the longest topic faust derives from the app id: <app_id>-__assignor-__leader (changelogs are shorter)
APP_ID_MAX = 249 - len("-__assignor-__leader")
HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?")
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
LOG_LEVELS = ("debug", "info", "warning", "error")


class Settings(BaseSettings):
    """Service settings. Defaults run against the local broker from ``shopstream kafka up``."""

    # hide_input_in_errors: a validation error would otherwise echo every value read, the
    # password included
    model_config = SettingsConfigDict(
        env_prefix="SHOPSTREAM_",
        frozen=True,
        extra="ignore",
        hide_input_in_errors=True,
        allow_inf_nan=False,  # "inf" passes a lower bound, then breaks timestamps and arithmetic
    )

    # --- Kafka connection -------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        validation_alias=AliasChoices("SHOPSTREAM_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"),
        description="Comma-separated host:port list of Kafka brokers.",
    )
    kafka_security_protocol: str = Field(
        "PLAINTEXT",
        pattern="^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$",
        description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
    )
    kafka_sasl_mechanism: str | None = Field(
        None,
        pattern="^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512)$",
        description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (required with SASL_*).",
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (masked in logs).")
    kafka_ssl_cafile: Path | None = Field(
        None, description="CA bundle (PEM) to verify the brokers with; unset: the system's CAs."
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="Client certificate chain (PEM), for brokers that require mutual TLS."
    )
    kafka_ssl_keyfile: Path | None = Field(
        None, description="Private key (PEM) of the client certificate; unset: read from the certfile."
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="Password of an encrypted private key (masked in logs)."
    )
    kafka_ssl_check_hostname: bool = Field(
        True,
        description="Check that the broker certificate names the host connected to. The certificate "
        "is verified against the CA either way.",
    )

    # --- Topics (the event contract) ----------------------------------------------------------
    topic_searches: str = Field("shop.searches", description="Input: search events.")
    topic_views: str = Field("shop.views", description="Input: product view events.")
    topic_carts: str = Field("shop.carts", description="Input: cart add/remove events.")
    topic_orders: str = Field("shop.orders", description="Input: order events.")
    topic_reviews: str = Field("shop.reviews", description="Input: review events.")
    topic_erasures: str = Field(
        "shop.erasures",
        description="Input: erasure requests (forget a user: their state is deleted, nothing more is "
        "published about them).",
    )
    topic_consents: str = Field(
        "shop.consents",
        description="Input: marketing consent changes (false: no promotions to the user, true: again).",
    )
    topic_recommendations: str = Field("shop.recommendations", description="Output: recommendations.")
    topic_promotions: str = Field("shop.promotions", description="Output: promotion triggers.")
    topic_promotion_outcomes: str = Field(
        "shop.promotion-outcomes",
        description="Output: what each promotion achieved (an order within its attribution window, or none).",
    )
    topic_deadletter: str = Field("shop.deadletter", description="Output: rejected input, raw bytes.")
    topic_events_by_user: str = Field(
        "shopstream.events-by-user",
        description="Internal: validated events repartitioned by user id (the tables' source).",
    )
    partitions: int = Field(
        8, ge=1, le=1024, description="Partitions of the per-user topics and tables (fixed per cluster)."
    )
    replication_factor: int = Field(1, ge=1, description="Replication factor of topics the app creates.")

    # --- Worker ------------------------------------------------------------------------------
    app_id: str = Field("shopstream", description="Consumer group id and prefix of changelog topics.")
    data_dir: Path = Field(Path("var/shopstream"), description="Folder of the persistent table stores.")
    store: Literal["rocksdb://", "memory://"] = Field(
        "rocksdb://", description="Table store URL: rocksdb:// (persistent) or memory://."
    )
    standby_replicas: int = Field(1, ge=0, description="Standby table replicas kept by other workers.")
    web_host: str = Field("127.0.0.1", description="Bind address of the worker's HTTP server.")
    web_port: int = Field(6066, ge=0, le=65535, description="Port of the worker's HTTP server.")
    log_level: str = Field("info", description="Worker log level (debug, info, warning, error).")
    metrics_interval_s: float = Field(
        5.0, gt=0, description="How often lag, table-size and readiness gauges are refreshed."
    )
    wedged_after_s: float = Field(
        120.0,
        gt=0,
        description="The worker reports not ready when a partition has input lag and its committed "
        "offset has not moved for this long.",
    )
    max_message_bytes: int = Field(
        65536, ge=256, description="Input messages larger than this are dead-lettered as oversized."
    )
    max_clock_skew_s: float = Field(
        86400.0, ge=0, description="Events stamped further than this in the future are rejected."
    )
    min_event_time: str = Field(
        "2000-01-01T00:00:00Z",
        description="Events stamped before this instant (RFC 3339, with Z or an offset) are rejected.",
    )

    datasets_dir: Path = Field(
        Path("../shared/data"), description="Folder of the real data sets used by replay and training."
    )

    delivery_timeout_s: float = Field(
        60.0,
        gt=0,
        description="The records a commit waits for (outputs, forwards, dead letters, changelog writes) "
        "must be acknowledged by the broker within this long; otherwise the worker exits before "
        "committing and its input since the last commit is redelivered after the restart.",
    )

    producer_batch_bytes: int = Field(
        512 * 1024,
        ge=16 * 1024,
        description="Largest record batch the worker's producer builds per partition (aiokafka's "
        "max_batch_size; its default is 16 KiB). The producer has one request in flight per broker and "
        "a partition's next batch waits for the previous one to be sent, so a checkpoint of 2,000 "
        "users split into 16 KiB batches took one broker round trip per batch with scoring stopped. "
        "Keep it below the broker's message.max.bytes and the topics' max.message.bytes (1 MiB by "
        "default).",
    )

    direct_input: bool = Field(
        False,
        description="Score an input message on the worker that reads it when it already sits on its "
        "user's partition (input topics with SHOPSTREAM_PARTITIONS partitions, keyed by user id with "
        "Kafka's default murmur2 partitioner) instead of forwarding it through the by-user topic: about "
        "a third less CPU per event. The trade: the by-user topic keeps one durable order of a user's "
        "events from all input topics; without it, the events read again after a crash may interleave "
        "across topics differently than the first time, so a promotion sent before the crash may not "
        "be decided again and its outcome is then never joined.",
    )
    commit_interval_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="How often input offsets are committed. Each commit first writes the tables' "
        "changes since the last one to their changelogs, once per changed key, and waits for them: "
        "longer means fewer changelog records, more input redelivered after a crash, and standby "
        "replicas further behind.",
    )
    checkpoint_max_keys: int = Field(
        50_000,
        ge=1,
        description="Table keys changed and not yet written that make the worker write them before the "
        "next commit is due (bounds the memory they take).",
    )

    # --- Per-user state -------------------------------------------------------------------
    sequence_length: int = Field(
        50, ge=1, le=1000, description="Recent event tokens kept per user (the model's context)."
    )
    user_ttl_s: float = Field(
        30 * 86400.0, gt=0, description="Users idle this long (worker clock) are expired from state."
    )
    expiry_interval_s: float = Field(60.0, gt=0, description="How often idle users are swept.")
    reorder_window_s: float = Field(
        3600.0,
        ge=0,
        description="Cart and order events of a user arriving out of order within this much event "
        "time fold to the same cart.",
    )

    # --- Baseline recommender ----------------------------------------------------------------
    recommendations: int = Field(10, ge=1, le=200, description="Items per recommendation.")
    covisit_neighbors: int = Field(
        50, ge=1, le=1000, description="Co-visited neighbours kept per item in the baseline table."
    )
    covisit_window: int = Field(
        3, ge=1, le=20, description="Recent distinct items of a user that a new item co-visits with."
    )

    # --- Behaviour model (onnxruntime) ----------------------------------------------------------
    model_dir: Path | None = Field(
        None,
        description="Folder of the exported model (manifest.json, model.onnx, vocab.json); unset = baseline "
        "only. Polled for new versions: write model.onnx and vocab.json first, manifest.json last.",
    )
    model_poll_s: float = Field(
        10.0, gt=0, description="How often the model folder is checked for a new version."
    )
    inference_provider: str = Field(
        "auto", pattern="^(auto|cpu|cuda)$", description="auto (CUDA when available, else CPU), cpu or cuda."
    )
    inference_threads: int = Field(1, ge=1, le=64, description="onnxruntime intra-op threads per worker.")
    batch_max: int = Field(
        64, ge=1, le=4096, description="Micro-batch: score up to this many events in one call (1 = off)."
    )
    batch_wait_ms: float = Field(
        5.0,
        gt=0,
        le=1000,
        description=(
            "Micro-batch: wait at most this long for a batch to fill (more than 0: faust's take_events "
            "reads 0 as no timeout and would hold events until SHOPSTREAM_BATCH_MAX of them arrived)."
        ),
    )
    exclude_bought_s: float = Field(
        30 * 86400.0, ge=0, description="Items bought within this many seconds are not recommended."
    )
    max_per_category: int = Field(
        0, ge=0, le=200, description="Diversity: at most this many items per category (0 = no limit)."
    )

    # --- Promotions ----------------------------------------------------------------------------
    promotions: bool = Field(True, description="Publish promotion triggers to topic_promotions.")
    cart_abandon_after_s: float = Field(
        3600.0, gt=0, description="A cart idle this long in event time, with no order, is abandoned."
    )
    promotion_tick_s: float = Field(5.0, gt=0, description="How often cart timers are checked.")
    browse_views: int = Field(
        3, ge=2, le=100, description="Views of one item, without a cart add, that trigger browse abandonment."
    )
    browse_window_s: float = Field(1800.0, gt=0, description="Window for counting those views.")
    high_intent_propensity: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Purchase propensity whose crossing triggers a high-intent nudge; unset (or auto): the "
        "threshold of the model version that scored the event, 0.7 for a model without one.",
    )
    reminder_propensity: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Abandoned carts of users at least this likely to buy get a reminder, not a discount; "
        "unset (or auto): the threshold of the model version that scored the propensity, 0.5 for a "
        "model without one.",
    )
    price_sensitive: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Price-sensitivity score from which a cart removal triggers an offer (the learned score "
        "is the user's rank among the shop's users, streams.price_response).",
    )
    max_discount_percent: float = Field(15.0, ge=0, le=90, description="Largest discount offered.")
    discount_budget_per_day: float = Field(
        1000.0,
        ge=0,
        description="Discount spend (cart value x percent) allowed per event-time day, all "
        "workers together (split evenly over partitions).",
    )
    frequency_cap: int = Field(3, ge=1, description="Promotions per user per frequency window.")
    frequency_window_s: float = Field(86400.0, gt=0, description="The frequency-cap window.")
    quiet_hours: str = Field(
        "22-8",
        description="Local hours without promotions, start-end, each 0-23, start != end "
        "(empty = none); cart abandonment waits for the end, other triggers are dropped.",
    )
    default_timezone: str = Field(
        "UTC", description="IANA zone for users whose events carry no UTC offset (timestamps in Z)."
    )
    holdout_percent: float = Field(
        5.0, ge=0, le=100, description="Users (by a hash of the id) in the holdout group: logged, not sent."
    )
    suppress_after_order_s: float = Field(
        86400.0,
        ge=0,
        description="No marketing promotions this long after an order (review recovery excepted).",
    )
    promotion_ttl_s: float = Field(
        172800.0, gt=0, description="A promotion expires this long after creation."
    )
    offer_policy: Literal["rules", "bandit"] = Field(
        "rules",
        description="How offers are chosen: rules (a reminder for likely buyers, else a discount growing "
        "with price sensitivity) or bandit (Thompson sampling over a reminder and 5 %-step discounts up to "
        "max_discount_percent, learned from attributed outcomes; streams/bandit.py).",
    )
    bandit_exploration: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of bandit decisions spread evenly over the offers: every offer keeps at least "
        "this share divided by the number of offers.",
    )
    attribution_window_s: float = Field(
        259200.0,
        gt=0,
        description="Event time after a promotion (sent or holdout) within which the user's first order "
        "is attributed to it; its outcome goes to topic_promotion_outcomes.",
    )
    event_clock_tolerance_s: float = Field(
        300.0,
        ge=0,
        description="A partition's event-time clock (cart timers, budget day, quiet hours) never runs "
        "ahead of the worker's wall clock by more than this.",
    )

    # --- Event archive (shopstream archive) ------------------------------------------------------
    archive_dir: str = Field(
        "var/archive",
        description="Root of the event archive: a folder or any fsspec URL (s3://bucket/prefix, ...).",
    )
    archive_roll_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="The archiver writes its buffer to Parquet files once it holds this many bytes.",
    )
    archive_roll_s: float = Field(
        300.0,
        gt=0,
        description="The archiver writes its buffer once its oldest row is this many seconds old.",
    )
    archive_metrics_port: int = Field(
        6067, ge=0, le=65535, description="Port of the archiver's /metrics on SHOPSTREAM_WEB_HOST (0: none)."
    )

    # --- Checks: a bad value stops the worker at start, naming its variable ------------------------
    @field_validator(
        "model_dir", "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", mode="before"
    )
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        """``VAR=`` (as compose writes an unset ``${VAR:-}``) means unset, not the current folder."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("high_intent_propensity", "reminder_propensity", mode="before")
    @classmethod
    def _auto_threshold_is_unset(cls, value: Any) -> Any:
        """``auto`` or empty (``settings`` prints an unset one so) mean "the model's threshold"."""
        return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _brokers_are_host_port(cls, value: str) -> str:
        for entry in value.split(","):
            m = HOST_PORT.fullmatch(entry.strip())
            if m is None or (m[2] is not None and not 1 <= int(m[2]) <= 65535):
                raise ValueError(
                    f"SHOPSTREAM_KAFKA_BOOTSTRAP_SERVERS (or KAFKA_BOOTSTRAP_SERVERS): {entry.strip()!r} is "
                    "not host:port; expected a comma-separated list such as broker1:9092,broker2:9092 "
                    "(no scheme, IPv6 in brackets, ports 1-65535)"
                )
        return value

    @field_validator("app_id", *TOPIC_FIELDS)
    @classmethod
    def _topic_name_is_legal(cls, value: str, info: ValidationInfo) -> str:
        """Topic names as Kafka allows them; the app id prefixes the topics faust derives from it."""
        longest = APP_ID_MAX if info.field_name == "app_id" else 249
        if not TOPIC_NAME.fullmatch(value) or len(value) > longest or value in (".", ".."):
            raise ValueError(
                f"SHOPSTREAM_{str(info.field_name).upper()}={value!r} is not a valid Kafka topic name: "
                f"1-{longest} characters of ASCII letters, digits, '.', '_' and '-' (not '.' or '..')"
            )
        return value

    @field_validator("data_dir")
    @classmethod
    def _data_dir_is_literal(cls, value: Path) -> Path:
        if "{" in str(value) or "}" in str(value):  # faust expands the path with str.format
            raise ValueError(f"SHOPSTREAM_DATA_DIR={str(value)!r}: a folder path without '{{' or '}}'")
        return value

    @field_validator("archive_dir")
    @classmethod
    def _archive_dir_is_set(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "SHOPSTREAM_ARCHIVE_DIR is empty: a folder or an fsspec URL such as s3://bucket/x"
            )
        return value.strip()

    @field_validator("model_dir")
    @classmethod
    def _model_dir_is_a_folder(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"SHOPSTREAM_MODEL_DIR={value}: not a folder (it holds manifest.json, ...)")
        return value

    @field_validator("web_host")
    @classmethod
    def _web_host_is_an_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not HOST_NAME.fullmatch(value):
                raise ValueError(
                    f"SHOPSTREAM_WEB_HOST={value!r}: an IP address (0.0.0.0 for all) or a host name"
                ) from None
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level_is_known(cls, value: str) -> str:
        if value.strip().lower() not in LOG_LEVELS:
            raise ValueError(f"SHOPSTREAM_LOG_LEVEL={value!r}: one of {', '.join(LOG_LEVELS)}")
        return value.strip().lower()

    @field_validator("min_event_time")
    @classmethod
    def _min_event_time_is_rfc3339(cls, value: str) -> str:
        text = value.strip().upper()  # RFC 3339 allows t and z; the decoder's parser wants T and Z
        try:
            instant = datetime.fromisoformat(text.replace("Z", "+00:00")) if RFC3339.fullmatch(text) else None
        except ValueError:  # matches the pattern but is no date (month 13, hour 25, ...)
            instant = None
        if instant is None:
            raise ValueError(
                f"SHOPSTREAM_MIN_EVENT_TIME={value!r}: an RFC 3339 date-time with Z or an offset, "
                "e.g. 2000-01-01T00:00:00Z"
            )
        if instant > datetime.now(UTC):
            raise ValueError(
                f"SHOPSTREAM_MIN_EVENT_TIME={value!r} is in the future: it would reject every event"
            )
        return text

    @field_validator("quiet_hours")
    @classmethod
    def _quiet_hours_are_two_hours(cls, value: str) -> str:
        """Two different hours 0-23: the policy sets the clock to the end hour (24 would raise there)."""
        if not value.strip():
            return ""
        m = re.fullmatch(r"(\d{1,2})-(\d{1,2})", value.strip())
        if m is None or max(int(m[1]), int(m[2])) > 23 or int(m[1]) == int(m[2]):
            raise ValueError(
                f"SHOPSTREAM_QUIET_HOURS={value!r}: START-END, two different whole hours 0-23 in the "
                "user's local time (22-8: from 22:00 to 08:00), or empty for no quiet hours"
            )
        return f"{int(m[1])}-{int(m[2])}"

    @field_validator("default_timezone")
    @classmethod
    def _timezone_is_known(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"SHOPSTREAM_DEFAULT_TIMEZONE={value!r}: an IANA time zone name such as UTC or Europe/Berlin"
            ) from None
        return value

    @model_validator(mode="after")
    def _values_agree(self) -> Settings:
        """Checks across fields: topics distinct, propensity thresholds in order (when both are set;
        a model's own thresholds are checked when it loads)."""
        seen: dict[str, str] = {}
        for name in TOPIC_FIELDS:
            topic = getattr(self, name)
            # Kafka refuses topics that differ only in '.' vs '_' (their metric names collide)
            other = seen.setdefault(topic.replace(".", "_"), name)
            if other != name:
                same = (
                    f"both name {topic!r}"
                    if topic == getattr(self, other)
                    else f"{getattr(self, other)!r} and {topic!r} collide in Kafka ('.' and '_' are one)"
                )
                raise ValueError(
                    f"SHOPSTREAM_{other.upper()} and SHOPSTREAM_{name.upper()} {same}: "
                    "every topic must be distinct"
                )
        high, reminder = self.high_intent_propensity, self.reminder_propensity
        if high is not None and reminder is not None and reminder > high:
            raise ValueError(
                f"SHOPSTREAM_REMINDER_PROPENSITY={self.reminder_propensity} is above "
                f"SHOPSTREAM_HIGH_INTENT_PROPENSITY={self.high_intent_propensity}: a user nudged as a "
                "likely buyer would then get a discount, not a reminder, for an abandoned cart"
            )
        return self

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> Settings:
        """A half-configured secure connection fails here, by name, rather than at the broker."""
        sasl = self.kafka_security_protocol.startswith("SASL_")
        tls = self.kafka_security_protocol in ("SSL", "SASL_SSL")
        if sasl and not (self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"SHOPSTREAM_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "SHOPSTREAM_KAFKA_SASL_MECHANISM, SHOPSTREAM_KAFKA_SASL_USERNAME and "
                "SHOPSTREAM_KAFKA_SASL_PASSWORD"
            )
        if self.kafka_sasl_mechanism and not sasl:
            raise ValueError(
                "SHOPSTREAM_KAFKA_SASL_MECHANISM is set but SHOPSTREAM_KAFKA_SECURITY_PROTOCOL="
                f"{self.kafka_security_protocol}: use SASL_SSL (or SASL_PLAINTEXT)"
            )
        tls_files = [self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile]
        if any(tls_files) and not tls:
            raise ValueError(
                "SHOPSTREAM_KAFKA_SSL_* files are set but SHOPSTREAM_KAFKA_SECURITY_PROTOCOL="
                f"{self.kafka_security_protocol}: use SSL or SASL_SSL"
            )
        if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
            raise ValueError("SHOPSTREAM_KAFKA_SSL_KEYFILE needs SHOPSTREAM_KAFKA_SSL_CERTFILE")
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"SHOPSTREAM_{name.upper()}={path}: no such file")
        return self

    def kafka_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of every Kafka client (None without TLS): verifies the brokers against
        ``kafka_ssl_cafile`` and presents the client certificate when one is configured."""
        if self.kafka_security_protocol not in ("SSL", "SASL_SSL"):
            return None
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None
        )
        ctx.check_hostname = self.kafka_ssl_check_hostname  # verify_mode stays CERT_REQUIRED
        if self.kafka_ssl_certfile:
            ctx.load_cert_chain(
                str(self.kafka_ssl_certfile),
                str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
                self.kafka_ssl_key_password.get_secret_value() if self.kafka_ssl_key_password else None,
            )
        return ctx

    def kafka_client_options(self) -> dict[str, object]:
        """Connection options shared by every aiokafka client the service creates."""
        opts: dict[str, object] = {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            opts["sasl_mechanism"] = self.kafka_sasl_mechanism
            opts["sasl_plain_username"] = self.kafka_sasl_username
            opts["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        ctx = self.kafka_ssl_context()
        if ctx is not None:
            opts["ssl_context"] = ctx
        return opts

    def kafka_summary(self) -> str:
        """One line on how the service reaches Kafka, for logs: never the password."""
        parts = [f"{self.kafka_bootstrap_servers} over {self.kafka_security_protocol}"]
        if self.kafka_sasl_mechanism:
            parts.append(f"SASL {self.kafka_sasl_mechanism} as {self.kafka_sasl_username!r}")
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            parts.append(f"CA {self.kafka_ssl_cafile or 'system'}")
            if self.kafka_ssl_certfile:
                parts.append(f"client certificate {self.kafka_ssl_certfile}")
            if not self.kafka_ssl_check_hostname:
                parts.append("host name not checked")
        return ", ".join(parts)

    def dump_env(self) -> list[str]:
        """The effective settings as ``VARIABLE=value`` lines; secrets show as ``**********``."""
        lines = []
        for name, value in self:
            shown = "" if value is None else value
            if isinstance(shown, bool):
                shown = str(shown).lower()
            lines.append(f"SHOPSTREAM_{name.upper()}={shown}")
        return lines

    @property
    def input_topics(self) -> dict[str, str]:
        """Input topic name -> the event type it carries."""
        return {
            self.topic_searches: "search",
            self.topic_views: "view",
            self.topic_carts: "cart",
            self.topic_orders: "order",
            self.topic_reviews: "review",
        }

    @property
    def control_topics(self) -> dict[str, str]:
        """Topic name -> the request type it carries: requests about a user (privacy), routed and
        applied in order with the user's events like the inputs."""
        return {self.topic_erasures: "erasure", self.topic_consents: "consent"}
