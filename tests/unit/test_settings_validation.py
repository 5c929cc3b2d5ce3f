"""Every setting is checked at start: a bad value fails there, naming its SHOPSTREAM_ variable,
not later on some event; the worker creates its data folder or says why it cannot."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from streams.cli import ensure_data_dir, main, setting_errors
from streams.errors import ShopstreamError
from streams.promotions import Budget, Policy
from streams.settings import TOPIC_FIELDS, Settings
from streams.state import UserState


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: no SHOPSTREAM_* or KAFKA_BOOTSTRAP_SERVERS from the shell."""
    for name in list(os.environ):
        if name.startswith("SHOPSTREAM_") or name == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(name)


def refused(**values: Any) -> str:
    """The lines ``shopstream`` prints for these values (they must be refused)."""
    with pytest.raises(ValidationError) as err:
        Settings(**values)
    return "\n".join(setting_errors(err.value))


def test_defaults_are_valid_and_the_new_fields_have_theirs() -> None:
    s = Settings()
    assert (s.reorder_window_s, s.event_clock_tolerance_s, s.wedged_after_s) == (3600.0, 300.0, 120.0)
    assert s.quiet_hours == "22-8" and s.store == "rocksdb://" and s.log_level == "info"
    assert all(field.description for field in Settings.model_fields.values())
    assert "SHOPSTREAM_REORDER_WINDOW_S=3600.0" in s.dump_env()


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"quiet_hours": "22-24"}, "SHOPSTREAM_QUIET_HOURS"),  # raised on every promotion at night
        ({"quiet_hours": "24-6"}, "SHOPSTREAM_QUIET_HOURS"),
        ({"quiet_hours": "8-8"}, "SHOPSTREAM_QUIET_HOURS"),
        ({"quiet_hours": "22:00-08:00"}, "SHOPSTREAM_QUIET_HOURS"),
        ({"quiet_hours": "-3-4"}, "SHOPSTREAM_QUIET_HOURS"),
        ({"default_timezone": "Europe/Atlantis"}, "SHOPSTREAM_DEFAULT_TIMEZONE"),
        ({"default_timezone": "../etc/passwd"}, "SHOPSTREAM_DEFAULT_TIMEZONE"),
        ({"default_timezone": ""}, "SHOPSTREAM_DEFAULT_TIMEZONE"),
        ({"min_event_time": "2000-01-01"}, "SHOPSTREAM_MIN_EVENT_TIME"),
        ({"min_event_time": "2000-01-01T00:00:00"}, "SHOPSTREAM_MIN_EVENT_TIME"),  # no offset
        ({"min_event_time": "2000-02-30T00:00:00Z"}, "SHOPSTREAM_MIN_EVENT_TIME"),
        ({"min_event_time": "yesterday"}, "SHOPSTREAM_MIN_EVENT_TIME"),
        ({"min_event_time": "2999-01-01T00:00:00Z"}, "SHOPSTREAM_MIN_EVENT_TIME"),  # would reject all
        ({"store": "redis://"}, "SHOPSTREAM_STORE"),
        ({"store": "rocksdb"}, "SHOPSTREAM_STORE"),
        ({"log_level": "verbose"}, "SHOPSTREAM_LOG_LEVEL"),
        ({"topic_views": "shop views"}, "SHOPSTREAM_TOPIC_VIEWS"),
        ({"topic_orders": "shop/orders"}, "SHOPSTREAM_TOPIC_ORDERS"),
        ({"topic_deadletter": ""}, "SHOPSTREAM_TOPIC_DEADLETTER"),
        ({"topic_deadletter": ".."}, "SHOPSTREAM_TOPIC_DEADLETTER"),
        ({"topic_promotions": "p" * 250}, "SHOPSTREAM_TOPIC_PROMOTIONS"),
        ({"topic_views": "shop.carts"}, "SHOPSTREAM_TOPIC_VIEWS"),  # two fields, one topic
        ({"topic_views": "shop_carts"}, "SHOPSTREAM_TOPIC_CARTS"),  # Kafka: '.' and '_' collide
        ({"app_id": "shop stream"}, "SHOPSTREAM_APP_ID"),
        ({"app_id": "a" * 230}, "SHOPSTREAM_APP_ID"),  # its derived topics would pass 249
        ({"kafka_bootstrap_servers": "kafka://broker:9092"}, "SHOPSTREAM_KAFKA_BOOTSTRAP_SERVERS"),
        ({"kafka_bootstrap_servers": "broker:99999"}, "SHOPSTREAM_KAFKA_BOOTSTRAP_SERVERS"),
        ({"kafka_bootstrap_servers": "a:9092,,b:9092"}, "SHOPSTREAM_KAFKA_BOOTSTRAP_SERVERS"),
        ({"kafka_bootstrap_servers": "::1:9092"}, "SHOPSTREAM_KAFKA_BOOTSTRAP_SERVERS"),
        ({"web_host": "http://0.0.0.0"}, "SHOPSTREAM_WEB_HOST"),
        ({"web_host": ""}, "SHOPSTREAM_WEB_HOST"),
        ({"data_dir": "var/{app}"}, "SHOPSTREAM_DATA_DIR"),
        ({"reminder_propensity": 0.8, "high_intent_propensity": 0.6}, "SHOPSTREAM_REMINDER_PROPENSITY"),
        ({"user_ttl_s": "inf"}, "SHOPSTREAM_USER_TTL_S"),
        ({"batch_wait_ms": "nan"}, "SHOPSTREAM_BATCH_WAIT_MS"),
        ({"batch_wait_ms": -1}, "SHOPSTREAM_BATCH_WAIT_MS"),
        ({"batch_wait_ms": 0}, "SHOPSTREAM_BATCH_WAIT_MS"),  # faust: no timeout, held until a full batch
        ({"batch_max": 0}, "SHOPSTREAM_BATCH_MAX"),
        ({"reorder_window_s": -1}, "SHOPSTREAM_REORDER_WINDOW_S"),
        ({"event_clock_tolerance_s": -0.5}, "SHOPSTREAM_EVENT_CLOCK_TOLERANCE_S"),
        ({"wedged_after_s": 0}, "SHOPSTREAM_WEDGED_AFTER_S"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/no/such/ca.pem"},
            "SHOPSTREAM_KAFKA_SSL_CAFILE",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_variable(values: dict[str, Any], variable: str) -> None:
    assert variable in refused(**values)


def test_the_message_says_what_is_allowed() -> None:
    text = refused(quiet_hours="22-24")
    assert "SHOPSTREAM_QUIET_HOURS='22-24'" in text and "0-23" in text and "empty" in text
    assert "IANA" in refused(default_timezone="Mars/Olympus")
    assert "RFC 3339" in refused(min_event_time="01/02/2000")
    assert "'rocksdb://' or 'memory://'" in refused(store="s3://")
    assert "debug, info, warning, error" in refused(log_level="trace")
    assert "1-249 characters" in refused(topic_reviews="reviews!")
    assert "must be distinct" in refused(topic_recommendations="shop.promotions")


@pytest.mark.parametrize(
    ("field", "given", "kept"),
    [
        ("quiet_hours", "07-22", "7-22"),
        ("quiet_hours", "0-23", "0-23"),
        ("quiet_hours", " ", ""),
        ("log_level", "WARNING", "warning"),
        ("min_event_time", "2001-02-03t04:05:06.5z", "2001-02-03T04:05:06.5Z"),
        ("min_event_time", "2001-02-03 04:05:06+02:00", "2001-02-03 04:05:06+02:00"),
        ("default_timezone", "America/Sao_Paulo", "America/Sao_Paulo"),
        ("kafka_bootstrap_servers", "k1:9092, k2:9093,[::1]:9094,kafka", "k1:9092, k2:9093,[::1]:9094,kafka"),
        ("web_host", "::", "::"),
        ("web_host", "worker-0.shopstream.svc", "worker-0.shopstream.svc"),
        ("store", "memory://", "memory://"),
        ("app_id", "a" * 229, "a" * 229),
        ("topic_views", "v" * 249, "v" * 249),
    ],
)
def test_good_values_pass_in_canonical_form(field: str, given: str, kept: str) -> None:
    values: dict[str, Any] = {field: given}
    assert getattr(Settings(**values), field) == kept


def test_every_topic_field_is_checked_and_distinct_by_default() -> None:
    s = Settings()
    assert len({getattr(s, f) for f in TOPIC_FIELDS}) == len(TOPIC_FIELDS)
    assert set(TOPIC_FIELDS) == {f for f in Settings.model_fields if f.startswith("topic_")}
    for field in TOPIC_FIELDS:
        assert f"SHOPSTREAM_{field.upper()}" in refused(**{field: "bad topic"})


def test_every_accepted_quiet_hours_value_works_for_the_policy_all_day() -> None:
    """The bug: 22-24 was accepted, then ``replace(hour=24)`` raised on every night-time promotion."""
    day = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
    for end in range(24):
        for start in ((end + 1) % 24, (end + 12) % 24, (end + 23) % 24):  # short, half, whole day
            pol = Policy(Settings(quiet_hours=f"{start}-{end}"), Budget({}, 1.0))
            for minute in range(0, 24 * 60, 30):
                until = pol._quiet_until(UserState(), day + minute * 60)
                assert until is None or until > day + minute * 60


def test_min_event_time_just_in_the_past_is_fine() -> None:
    recent = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert Settings(min_event_time=recent).min_event_time == recent


def test_empty_optional_paths_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """``VAR=`` (compose's unset ``${VAR:-}``) is unset, not the current folder."""
    monkeypatch.setenv("SHOPSTREAM_MODEL_DIR", "")
    monkeypatch.setenv("SHOPSTREAM_KAFKA_SSL_CAFILE", "")
    s = Settings()
    assert s.model_dir is None and s.kafka_ssl_cafile is None


def test_tls_files_must_exist_and_model_dir_be_a_folder(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    assert Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=ca).kafka_ssl_cafile == ca
    assert "no such file" in refused(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "x.pem")
    assert "SHOPSTREAM_MODEL_DIR" in refused(model_dir=ca)
    assert Settings(model_dir=tmp_path / "not-exported-yet").model_dir == tmp_path / "not-exported-yet"


def test_the_cli_names_the_variable_once_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SHOPSTREAM_QUIET_HOURS", "22-24")
    assert main(["settings"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shopstream: invalid setting: SHOPSTREAM_QUIET_HOURS='22-24'")
    assert "Value error" not in err
    monkeypatch.delenv("SHOPSTREAM_QUIET_HOURS")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka://x:1")  # an aliased field
    monkeypatch.setenv("SHOPSTREAM_PARTITIONS", "0")
    assert main(["settings"]) == 2
    err = capsys.readouterr().err
    assert "SHOPSTREAM_SHOPSTREAM_" not in err and "SHOPSTREAM_KAFKA_BOOTSTRAP_SERVERS" in err
    assert "shopstream: invalid SHOPSTREAM_PARTITIONS: Input should be greater than or equal to 1" in err


def test_secrets_stay_out_of_the_new_messages() -> None:
    text = refused(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="svc",
        kafka_sasl_password="s3cret-value",
        quiet_hours="1-99",
        topic_views="bad topic",
    )
    assert "SHOPSTREAM_QUIET_HOURS" in text and "SHOPSTREAM_TOPIC_VIEWS" in text
    assert "s3cret-value" not in text


# --- the data folder ---------------------------------------------------------------------------
def test_the_data_folder_is_created_with_its_parents(tmp_path: Path) -> None:
    folder = tmp_path / "var" / "shopstream"
    assert ensure_data_dir(folder) == folder and folder.is_dir()
    ensure_data_dir(folder)  # again: nothing to do


def test_a_data_folder_that_cannot_be_made_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ShopstreamError, match=r"SHOPSTREAM_DATA_DIR=.*file is a file, not a folder"):
        ensure_data_dir(blocker)
    with pytest.raises(ShopstreamError, match=r"cannot create SHOPSTREAM_DATA_DIR=.*Not a directory"):
        ensure_data_dir(blocker / "shopstream")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_data_folder_without_permission_says_so(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ShopstreamError, match=r"cannot create SHOPSTREAM_DATA_DIR=.*Permission denied"):
            ensure_data_dir(locked / "var" / "shopstream")
    finally:
        locked.chmod(0o700)


def test_the_worker_stops_on_its_data_folder_before_any_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "var").write_text("")
    monkeypatch.setenv("SHOPSTREAM_DATA_DIR", str(tmp_path / "var" / "shopstream"))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # nothing listens: never reached
    assert main(["worker"]) == 1
    assert "cannot create SHOPSTREAM_DATA_DIR=" in capsys.readouterr().err
