"""Topic administration: create the topics the service reads and writes, and check them.

Source topics are created with the app's partition count so that faust never crash-loops on a
partition mismatch; the internal by-user topic must have exactly ``settings.partitions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)

from streams.errors import BrokerUnavailable, ConfigurationError
from streams.settings import Settings

METADATA_WAIT_S = 60.0  # how long a created topic may take to show its partitions
log = logging.getLogger(__name__)


def all_topics(settings: Settings) -> list[str]:
    return [
        *settings.input_topics,
        *settings.control_topics,
        settings.topic_events_by_user,
        settings.topic_recommendations,
        settings.topic_promotions,
        settings.topic_promotion_outcomes,
        settings.topic_deadletter,
    ]


async def refusal(settings: Settings) -> str | None:
    """Why the first broker refuses this client (TLS or SASL), or None when it accepts it or
    cannot be reached at all. aiokafka only says "unable to bootstrap"; retrying a wrong password
    for the whole timeout and then blaming the network would hide the cause."""
    opts = settings.kafka_client_options()
    host, _, port = settings.kafka_bootstrap_servers.split(",")[0].strip().rpartition(":")
    try:
        conn = await create_conn(
            host,
            int(port),
            request_timeout_ms=10_000,
            ssl_context=opts.get("ssl_context"),
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=opts.get("sasl_mechanism"),
            sasl_plain_username=opts.get("sasl_plain_username"),
            sasl_plain_password=opts.get("sasl_plain_password"),
        )
    except (
        AuthenticationFailedError,
        IllegalSaslStateError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    ) as exc:
        return (
            f"SASL {settings.kafka_sasl_mechanism} authentication of user {settings.kafka_sasl_username!r} "
            f"failed: {exc} (check SHOPSTREAM_KAFKA_SASL_MECHANISM, _USERNAME and _PASSWORD)"
        )
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc} (check SHOPSTREAM_KAFKA_SSL_* and the broker's certificate)"
    except KafkaConnectionError:
        # TLS 1.3: a broker that wants a client certificate alerts after the handshake, which
        # aiokafka reports as a closed connection
        ctx = opts.get("ssl_context")
        alert = await _tls_alert(host, int(port), ctx) if isinstance(ctx, ssl.SSLContext) else None
        if alert:
            return (
                f"TLS refused: {alert} (a broker that requires client certificates needs "
                "SHOPSTREAM_KAFKA_SSL_CERTFILE and _KEYFILE signed by a CA it trusts)"
            )
        return None
    except (TimeoutError, OSError, KafkaError, ValueError):
        return None
    conn.close()
    return None


async def _tls_alert(host: str, port: int, ctx: ssl.SSLContext) -> str | None:
    """The TLS alert a broker sends right after the handshake, if any (it waits for a request
    otherwise)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), 10)
    except ssl.SSLError as exc:
        return str(exc)
    except (TimeoutError, OSError):
        return None
    try:
        await asyncio.wait_for(reader.read(1), 1.0)
    except ssl.SSLError as exc:
        return str(exc)
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return None


async def connect_admin(settings: Settings, timeout_s: float = 30.0) -> AIOKafkaAdminClient:
    """An admin client, retrying until the cluster answers or ``timeout_s`` passes; a broker
    that refuses the credentials or the TLS handshake fails at once, with the reason."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(**settings.kafka_client_options(), request_timeout_ms=10_000)
        try:
            await admin.start()
            return admin
        except KafkaConnectionError as exc:
            await admin.close()
            if settings.kafka_security_protocol != "PLAINTEXT":
                reason = await refusal(settings)
                if reason:
                    raise ConfigurationError(
                        f"Kafka at {settings.kafka_bootstrap_servers} refused the connection: {reason}"
                    ) from None
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerUnavailable(
                    f"no Kafka broker answered at {settings.kafka_bootstrap_servers} in {timeout_s:.0f}s"
                    " (start one with `shopstream kafka up`)"
                ) from exc
            await asyncio.sleep(1.0)


async def ensure_topics(settings: Settings, topics: list[str] | None = None) -> list[str]:
    """Create missing topics; fail clearly if the by-user topic has the wrong partition count."""
    wanted = topics or all_topics(settings)
    admin = await connect_admin(settings)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            new = [
                NewTopic(
                    t, num_partitions=settings.partitions, replication_factor=settings.replication_factor
                )
                for t in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent worker was first
                await admin.create_topics(new)
            log.info("created topics %s with %d partitions", missing, settings.partitions)
        internal = settings.topic_events_by_user
        if internal in wanted:
            found = (await partition_counts(admin, [internal]))[internal]
            if found == 0:
                raise ConfigurationError(
                    f"topic {internal} exists but none of its partitions became visible within "
                    f"{METADATA_WAIT_S:.0f}s: check the brokers' health"
                )
            if found != settings.partitions:
                raise ConfigurationError(
                    f"topic {internal} has {found} partitions but SHOPSTREAM_PARTITIONS="
                    f"{settings.partitions}; the tables are partitioned like it: use the same count,"
                    " or a new app id and topic"
                )
        return missing
    finally:
        await admin.close()


async def partition_counts(
    admin: AIOKafkaAdminClient, topics: list[str], wait_s: float = METADATA_WAIT_S
) -> dict[str, int]:
    """Partitions of each topic (0: not visible). A topic created a moment ago may not show them
    yet: a broker that just started on a busy machine took over 10 s to, so wait up to ``wait_s``
    for every count to be known."""
    counts: dict[str, int] = {}
    deadline = time.monotonic() + wait_s
    pause = 0.1
    while True:
        counts = {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(topics)}
        if all(counts.get(t) for t in topics) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)
    return {t: counts.get(t, 0) for t in topics}
