"""SQL text shared by the PostgreSQL and MySQL parsers: bounding, literal masking, endpoints.

Statement text is what makes a slow-SQL story actionable, but it also carries whatever the
application put in its literals: e-mail addresses, tokens, ``PASSWORD 'hunter2'``. Literals are
therefore masked by default (``?``), the way pg_stat_statements and the slow-query digests of
MySQL normalise statements; the structure of the statement stays readable.

The metric endpoint of a statement must have bounded cardinality, so it is not the text but the
statement's verb and first table (``SELECT pgbench_accounts``), like OpenTelemetry's
``db.operation`` + ``db.sql.table`` span names.
"""

from __future__ import annotations

import re

MAX_QUERY_CHARS = 1024  # statement text kept per request record

# One alternation, scanned left to right, so a quote inside a comment or an identifier
# never opens a literal: comments and quoted identifiers are kept, literals replaced.
_TOKENS = re.compile(
    r"""
      (?P<comment>--[^\n]*|/\*.*?\*/)
    | (?P<ident>"(?:[^"]|"")*"|`(?:[^`]|``)*`)
    | (?P<string>(?:[EeBbXxNn])?'(?:[^'\\]|''|\\.)*'?)
    | (?P<dollar>\$(?P<tag>[A-Za-z_]*)\$.*?(?:\$(?P=tag)\$|$))
    | (?P<word>[A-Za-z_][A-Za-z0-9_$]*)
    | (?P<param>\$\d+)
    | (?P<number>0[xX][0-9a-fA-F]+|-?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?))
    """,
    re.VERBOSE | re.DOTALL,
)

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_TABLE = re.compile(r'\s*((?:[A-Za-z_][A-Za-z0-9_$]*|"[^"]{1,64}"|`[^`]{1,64}`)'
                    r'(?:\.(?:[A-Za-z_][A-Za-z0-9_$]*|"[^"]{1,64}"|`[^`]{1,64}`))?)')
# After which keyword the statement's first table is named, per verb.
_TABLE_AFTER = {"SELECT": "FROM", "DELETE": "FROM", "INSERT": "INTO", "REPLACE": "INTO",
                "UPDATE": "", "COPY": "", "TRUNCATE": "", "LOCK": ""}
MAX_ENDPOINT = 96


def mask_literals(sql: str) -> str:
    """Replace string, numeric and dollar-quoted literals with ``?``; keep the rest."""

    def replace(m: re.Match[str]) -> str:
        kind = m.lastgroup
        if kind in ("string", "dollar", "number"):
            return "?"
        return m.group(0)

    return _TOKENS.sub(replace, sql)


def bound(sql: str, limit: int = MAX_QUERY_CHARS) -> str:
    """Statement text as records carry it: whitespace collapsed, at most ``limit`` chars."""
    text = " ".join(sql.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def statement_text(raw: bytes | str, *, mask: bool = True, limit: int = MAX_QUERY_CHARS) -> str:
    """Decode, mask (unless disabled) and bound one statement's text."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes | bytearray) else raw
    text = text.rstrip("\x00")
    # Mask before bounding so a literal cut by the bound is still masked, but never scan an
    # unbounded statement: a few times the kept length is plenty for the kept prefix.
    text = text[: limit * 4]
    return bound(mask_literals(text) if mask else text, limit)


def statement_endpoint(sql: str) -> str:
    """``VERB table`` (or just ``VERB``): a bounded-cardinality name for a statement."""
    text = _strip_leading_comments(sql)
    m = _WORD.match(text)
    if m is None:
        return "UNKNOWN" if text.strip() else ""
    verb = m.group(0).upper()
    pos = m.end()
    if verb == "WITH":  # a CTE: name the statement by its main verb
        main = re.search(r"\)\s*(SELECT|INSERT|UPDATE|DELETE)\b", text, re.IGNORECASE)
        if main is None:
            return "WITH"
        verb, pos = main.group(1).upper(), main.end()
    after = _TABLE_AFTER.get(verb)
    if after is None:
        return verb[:MAX_ENDPOINT]
    rest = text[pos : pos + 4096]
    if after:
        kw = re.search(rf"\b{after}\b", rest, re.IGNORECASE)
        if kw is None:
            return verb
        rest = rest[kw.end() :]
    elif verb == "UPDATE":
        rest = re.sub(r"^\s*(LOW_PRIORITY|IGNORE|ONLY)\b", "", rest, flags=re.IGNORECASE)
    if verb == "TRUNCATE":
        rest = re.sub(r"^\s*TABLE\b", "", rest, flags=re.IGNORECASE)
    table = _TABLE.match(rest)
    if table is None or table.group(1).upper() in ("SELECT", "LATERAL", "ONLY"):
        return verb
    return f"{verb} {table.group(1).strip(chr(34) + '`')}"[:MAX_ENDPOINT]


def _strip_leading_comments(sql: str) -> str:
    text = sql.lstrip(" \t\r\n(")
    for _ in range(8):
        if text.startswith("--"):
            nl = text.find("\n")
            text = "" if nl < 0 else text[nl + 1 :].lstrip(" \t\r\n(")
        elif text.startswith("/*"):
            end = text.find("*/")
            text = "" if end < 0 else text[end + 2 :].lstrip(" \t\r\n(")
        else:
            break
    return text
