"""Kafka security settings: incomplete combinations fail by name, TLS options reach the context."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from pydantic import ValidationError

from streams.settings import Settings

SASL: dict[str, Any] = {
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "svc",
    "kafka_sasl_password": "s3cret-value",
}


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"kafka_sasl_password": None}, "SHOPSTREAM_KAFKA_SASL_PASSWORD"),
        ({"kafka_security_protocol": "SSL"}, "SHOPSTREAM_KAFKA_SASL_MECHANISM is set"),
        (
            {
                "kafka_security_protocol": "PLAINTEXT",
                "kafka_sasl_mechanism": None,
                "kafka_ssl_cafile": "ca.pem",
            },
            "SHOPSTREAM_KAFKA_SSL_",
        ),
        ({"kafka_sasl_mechanism": "SCRAM-SHA-1"}, "kafka_sasl_mechanism"),
        ({"kafka_ssl_keyfile": "k.pem"}, "SHOPSTREAM_KAFKA_SSL_KEYFILE needs"),
    ],
)
def test_incomplete_security_settings_fail_by_name_without_echoing_the_password(
    override: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**{**SASL, **override})
    assert named in str(err.value) and "s3cret-value" not in str(err.value)


def test_tls_context_verifies_the_broker_and_hostname_check_is_a_setting() -> None:
    ctx = Settings(**SASL).kafka_client_options()["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    loose = Settings(**SASL, kafka_ssl_check_hostname=False).kafka_ssl_context()
    assert loose is not None and loose.verify_mode == ssl.CERT_REQUIRED and not loose.check_hostname
    assert Settings().kafka_ssl_context() is None


def test_summary_and_dump_name_the_user_and_mask_the_secrets() -> None:
    s = Settings(**SASL, kafka_ssl_key_password="k3y-pass")
    assert "SASL SCRAM-SHA-512 as 'svc'" in s.kafka_summary()
    text = "\n".join([s.kafka_summary(), *s.dump_env(), repr(s)])
    assert "s3cret-value" not in text and "k3y-pass" not in text
    assert "SHOPSTREAM_KAFKA_SASL_PASSWORD=**********" in s.dump_env()
