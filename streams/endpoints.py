"""Endpoint normalisation: turn a request path into a low-cardinality endpoint name.

Golden metrics are kept per endpoint, so ``/users/123`` and ``/users/456`` must be one series.
Segments that look like identifiers are replaced by a placeholder, long paths are cut to
``MAX_SEGMENTS`` segments plus ``/…``, and the result is at most ``MAX_LENGTH`` characters.
Heuristics are per segment and cheap; results are cached because the same paths repeat.
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_SEGMENTS = 6
MAX_LENGTH = 128
MAX_SEGMENT_LENGTH = 48  # longer segments are almost always generated

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
_HEX_ID = re.compile(r"(?:0x)?[0-9a-fA-F]{8,}")
_DATE = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
)
_EMAIL = re.compile(r"[^@\s]+(?:@|%40)[^@\s]+\.[A-Za-z]{2,}")
_TOKEN = re.compile(r"[A-Za-z0-9_\-+=~.%]{16,}")  # base64, base64url, JWT parts, slugs of ids
_MIXED = re.compile(r"(?=.*[a-z])(?=.*[A-Z])(?=.*\d)[A-Za-z0-9_\-]{10,}")
_HAS_DIGIT = re.compile(r"\d")
_HAS_ALPHA = re.compile(r"[A-Za-z]")
_EXTENSION = re.compile(r"(.+?)(\.[A-Za-z0-9]{1,5})")


def _placeholder(segment: str) -> str | None:
    """The placeholder for an identifier-like segment, or None to keep it."""
    if segment.isdigit():
        return "{id}"
    if len(segment) > MAX_SEGMENT_LENGTH:
        return "{token}"
    if _UUID.fullmatch(segment):
        return "{uuid}"
    if _DATE.fullmatch(segment):
        return "{date}"
    if _HEX_ID.fullmatch(segment):
        return "{id}"
    if ("@" in segment or "%40" in segment) and _EMAIL.fullmatch(segment):
        return "{email}"
    if _MIXED.fullmatch(segment):
        return "{token}"
    if _TOKEN.fullmatch(segment) and _HAS_DIGIT.search(segment) and _HAS_ALPHA.search(segment):
        return "{token}"
    return None


def _normalise_segment(segment: str) -> str:
    placeholder = _placeholder(segment)
    if placeholder is not None:
        return placeholder
    # "12345.jpg" → "{id}.jpg": keep a short extension, judge the stem.
    with_ext = _EXTENSION.fullmatch(segment)
    if with_ext is not None:
        placeholder = _placeholder(with_ext.group(1))
        if placeholder is not None:
            return placeholder + with_ext.group(2)
    return segment


@lru_cache(maxsize=8192)
def normalise(path: str) -> str:
    """``/api/v1/users/42/orders?x=1`` → ``/api/v1/users/{id}/orders``."""
    for sep in "?#":
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    if not path.startswith("/"):
        # "*" (OPTIONS) or an authority ("host:443", CONNECT): not a path, just bounded.
        return path[:MAX_LENGTH] if path else "/"
    segments = [s for s in path.split("/") if s]
    if not segments:
        return "/"
    cut_short = len(segments) > MAX_SEGMENTS
    parts = [_normalise_segment(s) for s in segments[:MAX_SEGMENTS]]
    endpoint = "/" + "/".join(parts)
    if cut_short:
        endpoint += "/…"
    elif path.endswith("/"):
        endpoint += "/"
    if len(endpoint) > MAX_LENGTH:
        endpoint = endpoint[: MAX_LENGTH - 1] + "…"
    return endpoint
