"""Every sink kubesight has, in one table, and the function that builds them from the config.

Adding a sink: write its ``Sink`` subclass and config class, add it to ``SINKS``, add its
section to ``kubesight.config.SinksConfig``, and give the compliance test a config for it.

``JsonLinesSink`` lives here for now, until it gets its own module (``sinks/jsonl.py``).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

from kubesight.config import SinksConfig

from .base import Sink, SinkConfig, SinkConfigError, SinkHealth, WindowRecord
from .prometheus import PrometheusSink
from .topology import TopologySink

__all__ = ["SINKS", "JsonLinesConfig", "JsonLinesSink", "build_sinks"]


@dataclasses.dataclass(frozen=True)
class JsonLinesConfig(SinkConfig):
    section: ClassVar[str] = "sinks.jsonl"

    enabled: bool = False
    path: str = ""  # appended to; one window record per line

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.enabled and not self.path:
            yield "path", "required when the sink is enabled"


class JsonLinesSink(Sink[JsonLinesConfig]):
    """Window records as JSON lines, appended to a file (for data-lake style imports)."""

    name = "jsonl"
    config_class = JsonLinesConfig

    def __init__(self, config: JsonLinesConfig) -> None:
        super().__init__(config)
        if not config.path:
            raise SinkConfigError(f"{config.section}.path: required")
        self._lock = threading.Lock()
        self._path = Path(config.path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self._path.open("a", encoding="utf-8")
        self._error = ""

    def write(self, batch: Sequence[WindowRecord]) -> None:
        lines = "".join(json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in batch)
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"jsonl sink {self._path} is closed")
            try:
                self._file.write(lines)
                self._file.flush()  # one batch is visible to readers as a whole
            except OSError as exc:
                self._error = f"write to {self._path} failed: {exc}"
                raise
            self._error = ""

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def healthcheck(self) -> SinkHealth:
        with self._lock:
            if self._file is None:
                return SinkHealth(False, "closed")
            if self._error:
                return SinkHealth(False, self._error)
        return SinkHealth(True, f"appending to {self._path}")


SINKS: dict[str, type[Sink[Any]]] = {
    PrometheusSink.name: PrometheusSink,
    JsonLinesSink.name: JsonLinesSink,
    TopologySink.name: TopologySink,
}


def build_sinks(config: SinksConfig) -> list[Sink[Any]]:
    """The enabled sinks for every section of ``config.sinks``, each under its own name."""
    sinks: list[Sink[Any]] = []
    try:
        for field in dataclasses.fields(config):
            if field.name not in SINKS:
                raise SinkConfigError(f"sinks.{field.name}: no sink of that name is registered")
            sink_class = SINKS[field.name]
            section = dataclasses.asdict(getattr(config, field.name))
            sink_config = sink_class.config_class.from_mapping(section)
            if sink_config.enabled:
                sinks.append(sink_class(sink_config))
    except BaseException:
        for sink in sinks:  # e.g. the second sink's port is taken: free the first one's
            sink.close()
        raise
    # Pages of sinks without a server of their own (/topology) go on the Prometheus sink's.
    for server in (s for s in sinks if isinstance(s, PrometheusSink)):
        for sink in sinks:
            for path, route in sink.routes().items():
                server.mount(path, route)
    return sinks
