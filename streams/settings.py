"""The one settings object of the service, read from the environment once in ``main()``.

Every field reads ``SHOPSTREAM_<FIELD>``; the broker list also honours the conventional
``KAFKA_BOOTSTRAP_SERVERS``. Nothing deeper in the code reads ``os.environ``: components
receive the ``Settings`` instance they need.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings. Defaults run against the local broker from ``shopstream kafka up``."""

    # hide_input_in_errors: a validation error would otherwise echo every value read, the
    # password included
    model_config = SettingsConfigDict(
        env_prefix="SHOPSTREAM_", frozen=True, extra="ignore", hide_input_in_errors=True
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
    topic_recommendations: str = Field("shop.recommendations", description="Output: recommendations.")
    topic_promotions: str = Field("shop.promotions", description="Output: promotion triggers.")
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
    store: str = Field("rocksdb://", description="Table store URL: rocksdb:// (persistent) or memory://.")
    standby_replicas: int = Field(1, ge=0, description="Standby table replicas kept by other workers.")
    web_host: str = Field("127.0.0.1", description="Bind address of the worker's HTTP server.")
    web_port: int = Field(6066, ge=0, le=65535, description="Port of the worker's HTTP server.")
    log_level: str = Field("info", description="Worker log level (debug, info, warning, error).")
    metrics_interval_s: float = Field(
        5.0, gt=0, description="How often lag, table-size and readiness gauges are refreshed."
    )
    max_message_bytes: int = Field(
        65536, ge=256, description="Input messages larger than this are dead-lettered as oversized."
    )
    max_clock_skew_s: float = Field(
        86400.0, ge=0, description="Events stamped further than this in the future are rejected."
    )
    min_event_time: str = Field(
        "2000-01-01T00:00:00Z", description="Events stamped before this instant are rejected."
    )

    datasets_dir: Path = Field(
        Path("../shared/data"), description="Folder of the real data sets used by replay and training."
    )

    direct_input: bool = Field(
        False,
        description="Score input events on the partition they arrive on, without the hop through the "
        "by-user topic, when every input topic has SHOPSTREAM_PARTITIONS partitions (checked at start); "
        "an event on another partition than its user's is re-keyed through the by-user topic. Faster "
        "(bench/ceilings.py), but off by default: with two workers and one killed, the survivor was seen "
        "to take the partitions over and not fetch their input (README, Known issues).",
    )

    # --- Per-user state -------------------------------------------------------------------
    sequence_length: int = Field(
        50, ge=1, le=1000, description="Recent event tokens kept per user (the model's context)."
    )
    user_ttl_s: float = Field(
        30 * 86400.0, gt=0, description="Users idle this long (worker clock) are expired from state."
    )
    expiry_interval_s: float = Field(60.0, gt=0, description="How often idle users are swept.")

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
        5.0, ge=0, le=1000, description="Micro-batch: wait at most this long for a batch to fill."
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
    high_intent_propensity: float = Field(
        0.7, gt=0, le=1, description="Purchase propensity whose crossing triggers a high-intent nudge."
    )
    reminder_propensity: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Abandoned carts of users at least this likely to buy get a reminder, not a discount.",
    )
    price_sensitive: float = Field(
        0.5, ge=0, le=1, description="Price-sensitivity score from which a cart removal triggers an offer."
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
        pattern=r"^(\d{1,2}-\d{1,2})?$",
        description="Local hours without promotions, start-end "
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
