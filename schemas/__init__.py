"""Versioned schemas of every kubesight topic, and validation of real records against them.

Records travel as msgpack, so besides JSON Schema's types a field may be ``"binary"`` (msgpack
bin, Python ``bytes``). ``validate("raw.v1", record)`` raises ``SchemaError`` naming the field.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMA_NAMES = ("raw.v1", "requests.v1", "series.v1", "golden.v1", "health.v1", "meta.v1",
                "deadletter.v1", "node.v1", "k8s.v1", "tcp.v1", "netseries.v1", "network.v1",
                "topology.v1")


class SchemaError(ValueError):
    """A record does not match its topic's schema."""


def _is_binary(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, bytes | bytearray | memoryview)


_TypeChecker = Draft202012Validator.TYPE_CHECKER.redefine("binary", _is_binary)
_Validator = jsonschema.validators.extend(Draft202012Validator, type_checker=_TypeChecker)


def load(name: str) -> dict[str, Any]:
    """The JSON Schema document of a topic, e.g. ``load("golden.v1")``."""
    if name not in SCHEMA_NAMES:
        raise KeyError(f"no schema named {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    text = resources.files(__package__).joinpath(f"{name}.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


@functools.cache
def _registry() -> Registry:
    pairs = [(f"kubesight/{n}", Resource.from_contents(load(n))) for n in SCHEMA_NAMES]
    return Registry().with_resources(pairs)


@functools.cache
def _validator(name: str) -> Any:
    return _Validator(load(name), registry=_registry())


def validate(name: str, record: Any) -> None:
    """Raise SchemaError if ``record`` does not match schema ``name``."""
    errors = sorted(_validator(name).iter_errors(record), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "<record>"
        raise SchemaError(f"{name}: {where}: {first.message}")
