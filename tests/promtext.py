"""A small parser of the Prometheus text exposition format 0.0.4, for tests."""

from __future__ import annotations

import re

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Labels = frozenset[tuple[str, str]]


def parse(text: str) -> tuple[dict[tuple[str, Labels], float], dict[str, str], dict[str, str]]:
    """Text format 0.0.4 -> ({(name, labels): value}, {name: help}, {name: type})."""
    samples: dict[tuple[str, Labels], float] = {}
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            helps[name] = doc
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            types[name] = kind
        elif line:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, raw_labels, value = match.groups()
            pairs = LABEL.findall(raw_labels or "")
            assert "".join(f'{k}="{v}",' for k, v in pairs).rstrip(",") == (raw_labels or "")
            labels = frozenset(
                (k, re.sub(r'\\[\\"n]', lambda m: UNESCAPE[m.group()], v)) for k, v in pairs
            )
            assert (name, labels) not in samples, f"duplicate sample {line!r}"
            samples[(name, labels)] = float(value)
    return samples, helps, types
