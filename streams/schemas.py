"""JSON Schema files of the event contract, for producers and consumers in other languages.

In: the pydantic records of ``streams.records``. Out: ``streams/schemas/<name>.schema.json``.
``shopstream schemas --check`` (run by the tests) fails when a file is stale. An input schema
accepts what the worker's decoder accepts; its description names the bounds a deployment adds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from streams.records import INPUT_TYPES, JSON_MAX_DEPTH, JSON_MAX_INT_DIGITS, OUTPUT_TYPES, SCHEMA_VERSION
from streams.settings import Settings

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


INPUT_NOTE = (
    "The message is RFC 8259 JSON in UTF-8 without NaN, Infinity or lone surrogates, values nested at "
    f"most {JSON_MAX_DEPTH} deep, numbers of at most {JSON_MAX_INT_DIGITS} digits before the point; "
    "of a repeated member name the last one counts. Besides this schema a deployment refuses messages "
    f"over SHOPSTREAM_MAX_MESSAGE_BYTES (default {_default('max_message_bytes')}) bytes and event "
    f"times before SHOPSTREAM_MIN_EVENT_TIME (default {_default('min_event_time')}) or more than "
    f"SHOPSTREAM_MAX_CLOCK_SKEW_S (default {_default('max_clock_skew_s'):g}) seconds ahead of its clock."
)


def schemas() -> dict[str, dict[str, Any]]:
    models: dict[str, type[BaseModel]] = {f"{k}-event": v for k, v in INPUT_TYPES.items()}
    models.update(OUTPUT_TYPES)
    out = {}
    for name, model in models.items():
        schema = model.model_json_schema(mode="serialization" if name in OUTPUT_TYPES else "validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://shopstream.dev/schemas/v{SCHEMA_VERSION}/{name}.schema.json"
        if name not in OUTPUT_TYPES:
            schema["description"] = f"{schema['description']}\n\n{INPUT_NOTE}"
        out[name] = schema
    return out


def _render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(folder: Path = SCHEMA_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in schemas().items():
        path = folder / f"{name}.schema.json"
        path.write_text(_render(schema))
        paths.append(path)
    return paths


def check_schemas(folder: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing or differ from the records."""
    return [
        name
        for name, schema in schemas().items()
        if not (folder / f"{name}.schema.json").exists()
        or (folder / f"{name}.schema.json").read_text() != _render(schema)
    ]
