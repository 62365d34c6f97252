"""Keep a client library's retry loop from burying everything else in a component's log.

While a broker is away, aiokafka logs the same connection error every ~100 ms per node (the
broker-restart test's worker wrote ~1,800 such lines in 13 s); the lines that explain what the
worker is doing scroll out of any tail. ``RepeatFilter`` lets one record through per logger and
message template every ``every_s`` and says, on the next one it lets through, how many it held
back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RepeatFilter(logging.Filter):
    def __init__(self, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # key → (last shown, held)

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
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
