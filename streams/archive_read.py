"""The event archive's file layout, and reading it back: deduped, with erasures applied.

Layout (``streams.archive`` writes it): ``{root}/{events|promotions|outcomes}/date=YYYY-MM-DD/
hour=HH/part-<unique>.parquet`` by the UTC date and hour of the event time (a promotion's
``created_at``, an outcome's ``promoted_at``), columns ``SCHEMA``.

In: an archive root (a folder or any fsspec URL) as ``streams.archive`` writes it, an optional
time range, and the erasure list ``{root}/_erasures/*.jsonl`` (one ``{"user_id": ...,
"erased_at": "<ISO-8601 UTC>"}`` a line; a user's events at or before ``erased_at`` are dropped).
Out: the archived payloads (contract event dicts, promotion or outcome dicts) in event-time order,
ties in archive order (files by name, which is their write order, then rows), each ``event_id``
(promotions and outcomes: ``promotion_id``) once: the first copy is kept (a crash before a commit
archives a message twice; an outcome re-sent after a redelivery is the same record).

Also the data spec of ``shopstream train --data archive:DIR`` and its split by calendar days: the
last day of the data tests, the day before validates, the rest trains. No torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import quote, unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from streams.errors import ConfigurationError

SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),  # promotions, outcomes: promotion_id
        ("user_id", pa.string()),
        ("type", pa.string()),  # promotions, outcomes: kind
        ("event_time", pa.timestamp("ms", tz="UTC")),  # promotions: created_at; outcomes: promoted_at
        ("payload", pa.string()),  # the message as received (validated JSON)
        ("topic", pa.string()),
        ("partition", pa.int32()),  # -1: converted from a data set, not read from Kafka
        ("offset", pa.int64()),  # converted: the event's position in the data set
    ]
)
STREAMS = ("events", "promotions", "outcomes")
ERASURES = "_erasures"  # the erasure list's folder under the root
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)


def open_root(url: str) -> tuple[Any, str]:
    """The fsspec file system and path of an archive root (a folder or any fsspec URL)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:  # e.g. s3:// without s3fs
        raise ConfigurationError(f"archive {url}: {exc}") from None
    except ValueError as exc:  # an unknown protocol
        raise ConfigurationError(f"archive {url}: {exc}") from None
    return fs, str(path).rstrip("/") or "/"


def epoch_ms(when: datetime) -> int:
    """Milliseconds since the epoch, exactly (a naive time is UTC)."""
    return ((when if when.tzinfo else when.replace(tzinfo=UTC)) - EPOCH) // MS


class Row(NamedTuple):
    """One archived message, in the order of ``SCHEMA``'s columns."""

    event_id: str
    user_id: str
    type: str
    event_ms: int
    payload: str
    topic: str
    partition: int
    offset: int


DATE_DIR = re.compile(r"date=(\d{4}-\d{2}-\d{2})")
HOUR_DIR = re.compile(r"hour=(\d{2})")
HOUR_MS, DAY_MS = 3_600_000, 86_400_000


def instant(value: datetime | str, tz: str = "UTC") -> datetime:
    """An aware datetime from a datetime or ISO 8601 text; without an offset it is in ``tz``."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value.strip())
    return when if when.tzinfo else when.replace(tzinfo=zone(tz))


def zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(f"{tz!r} is not an IANA time zone (UTC, Asia/Shanghai, ...)") from None


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def archive_files(
    root: str, stream: str = "events", since_ms: int | None = None, until_ms: int | None = None
) -> list[str]:
    """Parquet files of ``stream`` whose date and hour folders overlap ``[since_ms, until_ms)``,
    in archive order (by file name). Temporary files (``.part-*.tmp``) are never listed."""
    fs, base = open_root(root)
    lo, hi = since_ms if since_ms is not None else -(2**62), until_ms if until_ms is not None else 2**62
    top = f"{base}/{stream}"
    if not fs.isdir(top):
        return []
    files = []
    for day_dir in fs.ls(top, detail=False):
        m = DATE_DIR.fullmatch(_name(day_dir))
        if not m:
            continue
        day = epoch_ms(datetime.fromisoformat(m[1]).replace(tzinfo=UTC))
        if day + DAY_MS <= lo or day >= hi:
            continue  # pruned without listing it
        for hour_dir in fs.ls(day_dir, detail=False):
            h = HOUR_DIR.fullmatch(_name(hour_dir))
            if not h or not (day + int(h[1]) * HOUR_MS < hi and day + (int(h[1]) + 1) * HOUR_MS > lo):
                continue
            files += [
                p
                for p in fs.ls(hour_dir, detail=False)
                if _name(p).startswith("part-") and _name(p).endswith(".parquet")
            ]
    return sorted(files, key=_name)


def newest_event_ms(root: str, stream: str = "events") -> int | None:
    """The latest event time (ms) archived in ``stream``, reading only its newest hour folder."""
    files = archive_files(root, stream)
    if not files:
        return None
    folder = max(p.rsplit("/", 1)[0] for p in files)  # date=YYYY-MM-DD/hour=HH sort in time order
    fs, _ = open_root(root)
    newest = None
    for path in (p for p in files if p.rsplit("/", 1)[0] == folder):
        with fs.open(path, "rb") as f:
            times = pq.read_table(f, columns=["event_time"]).column("event_time").cast(pa.int64())
        top = max(times.to_pylist(), default=None)
        if top is not None and (newest is None or top > newest):
            newest = top
    return newest


def read_erasures(root: str) -> dict[str, int]:
    """User id -> the latest ``erased_at`` (ms) of the erasure list. A line that cannot be read
    fails the read: an erased user must never come back because of a typo."""
    fs, base = open_root(root)
    folder = f"{base}/{ERASURES}"
    out: dict[str, int] = {}
    if not fs.isdir(folder):
        return out
    for path in sorted(p for p in fs.ls(folder, detail=False) if _name(p).endswith(".jsonl")):
        with fs.open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = orjson.loads(line)
                    user, at = str(rec["user_id"]), epoch_ms(instant(rec["erased_at"]))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise ConfigurationError(
                        f"erasure list {path}:{n}: expected {{'user_id': ..., 'erased_at': ISO-8601}} ({exc})"
                    ) from None
                out[user] = max(at, out.get(user, at))
    return out


def read_events(
    root: str,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    stream: str = "events",
) -> list[dict[str, Any]]:
    """The archived payloads with event time in ``[since, until)`` (naive: UTC), each ``event_id``
    once (the first copy), erased users' rows dropped, sorted by event time then archive order."""
    if stream not in STREAMS:
        raise ValueError(f"stream {stream!r}: one of {', '.join(STREAMS)}")
    lo = epoch_ms(instant(since)) if since is not None else None
    hi = epoch_ms(instant(until)) if until is not None else None
    erased = read_erasures(root)
    fs, _ = open_root(root)
    seen: set[str] = set()
    kept: list[tuple[int, str]] = []
    for path in archive_files(root, stream, lo, hi):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["event_id", "user_id", "event_time", "payload"])
        ids = table.column("event_id").to_pylist()
        users = table.column("user_id").to_pylist()
        times = table.column("event_time").cast(pa.int64()).to_pylist()
        payloads = table.column("payload").to_pylist()
        for event_id, user, t, payload in zip(ids, users, times, payloads, strict=True):
            if (lo is not None and t < lo) or (hi is not None and t >= hi) or event_id in seen:
                continue
            seen.add(event_id)
            if user in erased and t <= erased[user]:
                continue
            kept.append((t, payload))
    kept.sort(key=lambda row: row[0])  # stable: ties stay in archive order
    return [orjson.loads(payload) for _, payload in kept]


# --- training from the archive ----------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveSpec:
    """``archive:ROOT[?since=ISO&until=ISO&tz=ZONE]``: what ``shopstream train --data`` reads;
    ``str()`` gives the canonical form a run records (so ``evaluate`` and ``export`` rebuild the
    same split)."""

    root: str
    since: datetime | None = None
    until: datetime | None = None
    tz: str = "UTC"

    @classmethod
    def parse(cls, spec: str, default_tz: str = "UTC") -> ArchiveSpec:
        body = spec.removeprefix("archive:")
        root, _, query = body.partition("?")
        opts = {}
        for pair in filter(None, query.split("&")):
            key, _, value = pair.partition("=")
            if key not in ("since", "until", "tz"):
                raise ConfigurationError(f"{spec}: unknown option {key!r} (since, until, tz)")
            opts[key] = unquote(value)
        if not root:
            raise ConfigurationError(f"{spec}: archive:DIR, e.g. archive:var/archive")
        return cls(root).with_options(opts.get("since"), opts.get("until"), opts.get("tz") or default_tz)

    def with_options(self, since: str | None, until: str | None, tz: str | None) -> ArchiveSpec:
        """Since and until without an offset are read in the split's time zone."""
        tz = tz or self.tz
        zone(tz)
        try:
            return replace(
                self,
                since=instant(since, tz).astimezone(UTC) if since else self.since,
                until=instant(until, tz).astimezone(UTC) if until else self.until,
                tz=tz,
            )
        except ValueError as exc:
            raise ConfigurationError(f"archive since/until: an ISO 8601 date or instant ({exc})") from None

    def __str__(self) -> str:
        opts = [(k, getattr(self, k)) for k in ("since", "until")]
        parts = [f"{k}={v.isoformat().replace('+00:00', 'Z')}" for k, v in opts if v is not None]
        return f"archive:{self.root}?" + "&".join([*parts, f"tz={quote(self.tz, safe='/')}"])


def calendar_day_bounds(times: list[float], tz: str) -> tuple[float, float, float] | None:
    """``(valid_start, test_start, test_end)``: the day before the last calendar day (in ``tz``) of
    ``times`` validates, the last day tests; None when the data covers fewer than three days
    (nothing would be left to train on)."""
    if not times:
        return None
    z = zone(tz)
    first, last = (datetime.fromtimestamp(t, z).date() for t in (min(times), max(times)))
    if (last - first).days < 2:
        return None

    def midnight(d: date) -> float:
        return datetime(d.year, d.month, d.day, tzinfo=z).timestamp()

    return midnight(last - timedelta(days=1)), midnight(last), midnight(last + timedelta(days=1))
