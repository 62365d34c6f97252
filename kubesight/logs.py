"""Keep a client library's retry loop from burying everything else in a component's log.

While a broker is away, aiokafka logs the same connection error every ~100 ms per node (the
broker-restart test's worker wrote ~1,800 such lines in 13 s); the lines that explain what the
worker is doing scroll out of any tail. ``RepeatFilter`` lets one record through per logger and
message template every ``every_s`` and says, on the next one it lets through, how many it held
back.

librdkafka is the same: while a broker is down, each confluent-kafka client logs a refused
connection every ~50 ms (a sink's four clients wrote 423 lines in 10 s). ``RdkafkaLog`` is what
kubesight gives those clients as their ``logger``: their lines go through Python logging, one
per message per ``every_s``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any


class RepeatFilter(logging.Filter):
    def __init__(self, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # key → (last shown, held)

    def filter(self, record: logging.LogRecord) -> bool:
        # repeat_key: what makes two records "the same" when their text is already formatted
        key = (record.name, str(getattr(record, "repeat_key", record.msg)))
        now = self._clock()
        shown = self._seen.get(key)
        if shown is not None and now - shown[0] < self.every_s:
            self._seen[key] = (shown[0], shown[1] + 1)
            return False
        if shown is not None and shown[1]:
            record.msg = f"{record.msg} [{shown[1]} more like this in {now - shown[0]:.0f}s]"
        self._seen[key] = (now, 0)
        return True


def quiet_repeats(prefix: str, every_s: float = 10.0) -> RepeatFilter:
    """Put one ``RepeatFilter`` on every logger already created under ``prefix`` (a filter on a
    logger sees only the records made on that logger, not its children's)."""
    flt = RepeatFilter(every_s)
    names = [name for name in logging.Logger.manager.loggerDict
             if name == prefix or name.startswith(prefix + ".")]
    for name in names:
        logging.getLogger(name).addFilter(flt)
    return flt


_DIGITS = re.compile(r"\d+")
_QUIETED: dict[str, RepeatFilter] = {}


class RdkafkaLog:
    """A confluent-kafka client's ``logger``: it calls ``log(level, fmt, *args)`` (the level
    already a Python one) when the client is polled (``poll``, ``consume``, ``flush``); a
    client that is never polled keeps its lines queued until it is closed, so give one only to
    clients that are.

    The lines go to the Python logger ``name`` as plain text, and two lines that differ only in
    numbers (milliseconds, client and broker ids) count as repeats. ``level``: log everything at
    this level instead (``kubesight status`` reports the broker itself and logs at debug)."""

    def __init__(self, name: str, *, every_s: float = 10.0, level: int | None = None) -> None:
        self.logger = logging.getLogger(name)
        if name not in _QUIETED:  # one filter per logger, however many clients share it
            _QUIETED[name] = RepeatFilter(every_s)
            self.logger.addFilter(_QUIETED[name])
        self.level = level

    def log(self, level: int, fmt: str, *args: Any) -> None:
        text = fmt % args if args else fmt
        self.logger.log(self.level if self.level is not None else level, text,
                        extra={"repeat_key": _DIGITS.sub("#", text)})
