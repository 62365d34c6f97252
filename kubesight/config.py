"""kubesight configuration: one YAML file, environment overrides, strict validation.

Every section is a frozen dataclass. Loading walks the YAML mapping against the dataclass
fields, so an unknown key or a value of the wrong type is rejected with a message that names
the full dotted key (``kafka.bootstrap_server: unknown key (did you mean 'bootstrap_servers'?)``).

Environment overrides use ``KUBESIGHT_<SECTION>__<KEY>`` (double underscore between levels),
e.g. ``KUBESIGHT_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or ``KUBESIGHT_STREAMS__WINDOW_SECONDS=2``.
Values given in the environment are parsed as YAML scalars, so numbers and booleans work.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "KUBESIGHT_"
# Environment variables that are not configuration keys.
NOT_CONFIG_ENV = frozenset({"KUBESIGHT_CONFIG", "KUBESIGHT_BPF_DIR"})
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


def _default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/kubesight"
    return str(Path.home() / ".local" / "state" / "kubesight")


@dataclasses.dataclass(frozen=True)
class LocalBrokerConfig:
    """The single-node KRaft broker that `kubesight up` runs when no cluster is configured."""

    version: str = "3.9.1"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    heap: str = "768m"
    jars_dir: str = ""  # empty: <repo>/.cache/kafka-<version>/libs (filled by `make kafka`)


@dataclasses.dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = ""  # empty: run the local broker
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_ca_location: str = ""
    topic_prefix: str = "kubesight."
    partitions: int = 4
    replication_factor: int = 1
    local: LocalBrokerConfig = dataclasses.field(default_factory=LocalBrokerConfig)

    def __post_init__(self) -> None:
        allowed = {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}
        if self.security_protocol not in allowed:
            raise ConfigError(
                f"kafka.security_protocol: {self.security_protocol!r} is not one of "
                f"{sorted(allowed)}"
            )
        if self.partitions < 1:
            raise ConfigError(f"kafka.partitions: must be >= 1, got {self.partitions}")
        if self.replication_factor < 1:
            raise ConfigError(
                f"kafka.replication_factor: must be >= 1, got {self.replication_factor}"
            )

    @property
    def uses_local_broker(self) -> bool:
        return not self.bootstrap_servers

    @property
    def bootstrap(self) -> str:
        return self.bootstrap_servers or f"{self.local.host}:{self.local.port}"

    def librdkafka(self) -> dict[str, str]:
        """Client settings shared by every confluent-kafka client kubesight creates."""
        conf = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol}
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = self.sasl_password
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        return conf


COMM_MAX = 15  # TASK_COMM_LEN - 1: the kernel cuts longer names
EXCLUDE_COMMS_MAX = 63  # bpf/l7.h L7_MAX_EXCLUDED_COMMS, less "kubesight"


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    capture_bytes: int = 4096  # payload prefix captured per read/write (power of two)
    # Absorbs the time the drain gets no CPU. nginx + wrk flat out on two cores wrote ~1 KiB
    # per event at 150k-290k events/s; the e2e tests saw a niced drain thread runnable without
    # a CPU for 0.58-0.87 s. Under such load the drain runs SCHED_RR where allowed
    # (drain_rt_priority); where it is not, 128 MiB holds ~0.45-0.9 s of it.
    ringbuf_bytes: int = 128 * 1024 * 1024
    poll_interval_ms: int = 10  # events are submitted without wakeup; we poll on this timer
    batch_max_events: int = 512  # events per Kafka message (one connection per message)
    flush_interval_ms: int = 100
    health_interval_s: float = 5.0
    # Process names (as in /proc/<pid>/comm, ≤ 15 bytes) never traced, nor what they start,
    # from the moment they fork or exec. kubesight's own name, "kubesight", always is.
    exclude_comms: tuple[str, ...] = ()
    # Plaintext of TLS connections from uprobes on the OpenSSL libraries processes load.
    tls: bool = True
    # TCP health per connection (bpf/tcp.bpf.c): live connections are re-read this often.
    tcp: bool = True
    tcp_snapshot_s: float = 5.0
    # Node CPU, memory and the top-N processes by CPU, from /proc every node_interval_s.
    node_interval_s: float = 5.0
    top_n: int = 10
    # The probe must keep up with the kernel or events are dropped; the stream workers can lag
    # (Kafka buffers for them). So on a busy node the probe runs slightly ahead of others.
    nice: int = -5
    # While the ring fills fast the drain thread runs SCHED_RR at this priority (1..99; 0: never)
    drain_rt_priority: int = 1
    # Memory for batches a down broker cannot take yet (librdkafka's queue and the overflow
    # behind it); past it batches are dropped and counted. Keep it under the memory limit.
    buffer_mb: int = 1024

    def __post_init__(self) -> None:
        if not -20 <= self.nice <= 19:
            raise ConfigError(f"probe.nice: must be within -20..19, got {self.nice}")
        if not 16 <= self.buffer_mb <= 65536:
            raise ConfigError(f"probe.buffer_mb: must be within 16..65536, got {self.buffer_mb}")
        if not 0 <= self.drain_rt_priority <= 99:
            raise ConfigError("probe.drain_rt_priority: must be within 0..99 (0: not real-time), "
                              f"got {self.drain_rt_priority}")
        cap = self.capture_bytes
        if cap < 64 or cap > 8192 or cap & (cap - 1):
            raise ConfigError(f"probe.capture_bytes: must be a power of two in 64..8192, got {cap}")
        rb = self.ringbuf_bytes
        if rb < 4096 or rb & (rb - 1):
            raise ConfigError(f"probe.ringbuf_bytes: must be a power of two >= 4096, got {rb}")
        if self.batch_max_events < 1:
            raise ConfigError(f"probe.batch_max_events: must be >= 1, got {self.batch_max_events}")
        if not 0.5 <= self.tcp_snapshot_s <= 3600:
            raise ConfigError(
                f"probe.tcp_snapshot_s: must be within 0.5..3600, got {self.tcp_snapshot_s}")
        if not 0.5 <= self.node_interval_s <= 3600:
            raise ConfigError(
                f"probe.node_interval_s: must be within 0.5..3600, got {self.node_interval_s}")
        if not 1 <= self.top_n <= 100:
            raise ConfigError(f"probe.top_n: must be within 1..100, got {self.top_n}")
        if len(self.exclude_comms) > EXCLUDE_COMMS_MAX:
            raise ConfigError(f"probe.exclude_comms: at most {EXCLUDE_COMMS_MAX} names, got "
                              f"{len(self.exclude_comms)}")
        for comm in self.exclude_comms:
            if not 1 <= len(comm.encode()) <= COMM_MAX or "/" in comm:
                raise ConfigError(f"probe.exclude_comms: {comm!r} is not a process name (1..15 "
                                  "bytes, no '/', as the kernel keeps it in /proc/<pid>/comm)")


@dataclasses.dataclass(frozen=True)
class StreamsConfig:
    window_seconds: int = 10
    # A window is emitted once the wall clock is this far past its end; late records reopen it
    # and are emitted as a further delta, so counters stay exact.
    grace_seconds: float = 2.0
    # A request slower than its protocol's threshold counts as slow. Caches and resolvers are
    # expected to answer in a few milliseconds, databases and APIs in tens to hundreds.
    slow_threshold_ms: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"http": 500.0, "http2": 500.0, "grpc": 500.0,
                                 "postgresql": 500.0, "mysql": 500.0, "kafka": 500.0,
                                 "redis": 100.0, "dns": 200.0}
    )
    default_slow_threshold_ms: float = 500.0
    # SQL statement text in request records: literals replaced by ``?`` unless disabled
    # (they carry whatever the application put there, passwords included).
    mask_sql_literals: bool = True
    max_query_chars: int = 1024
    take_max: int = 200  # Kafka messages per batch an agent takes at once
    take_within_s: float = 0.05
    web_port: int = 6066
    app_id: str = "kubesight"
    nice: int = 5  # workers and sinks yield CPU to applications and the probe; Kafka buffers
    # A partition with messages waiting whose position has not moved for this long (while a
    # broker answers) is a stalled consumer: the worker logs why and kicks it, and exits for
    # its supervisor to restart it if that has not helped after stall_restart_after_s more
    # (streams/watchdog.py).
    stall_after_s: float = 30.0
    stall_restart_after_s: float = 60.0


    def __post_init__(self) -> None:
        for key in ("stall_after_s", "stall_restart_after_s"):
            if not 5 <= getattr(self, key) <= 3600:
                raise ConfigError(f"streams.{key}: must be within 5..3600 seconds, got "
                                  f"{getattr(self, key)}")
        if not -20 <= self.nice <= 19:
            raise ConfigError(f"streams.nice: must be within -20..19, got {self.nice}")
        if self.window_seconds < 1:
            raise ConfigError(f"streams.window_seconds: must be >= 1, got {self.window_seconds}")
        if self.grace_seconds < 0:
            raise ConfigError(f"streams.grace_seconds: must be >= 0, got {self.grace_seconds}")
        if not 64 <= self.max_query_chars <= 1024:
            raise ConfigError(
                f"streams.max_query_chars: must be within 64..1024, got {self.max_query_chars}")
        for proto, ms in self.slow_threshold_ms.items():
            if not isinstance(ms, int | float) or ms <= 0:
                raise ConfigError(f"streams.slow_threshold_ms.{proto}: must be > 0, got {ms!r}")

    def slow_threshold_ns(self, protocol: str) -> int:
        ms = self.slow_threshold_ms.get(protocol, self.default_slow_threshold_ms)
        return int(ms * 1_000_000)


@dataclasses.dataclass(frozen=True)
class PrometheusSinkConfig:
    enabled: bool = True
    listen: str = "127.0.0.1:9464"


@dataclasses.dataclass(frozen=True)
class JsonLinesSinkConfig:
    enabled: bool = False
    path: str = ""


@dataclasses.dataclass(frozen=True)
class TopologySinkConfig:
    enabled: bool = True
    idle_seconds: float = 300.0
    retention_seconds: float = 900.0
    publish_interval_s: float = 10.0
    publish_window_s: float = 60.0


@dataclasses.dataclass(frozen=True)
class SinksConfig:
    prometheus: PrometheusSinkConfig = dataclasses.field(default_factory=PrometheusSinkConfig)
    jsonl: JsonLinesSinkConfig = dataclasses.field(default_factory=JsonLinesSinkConfig)
    topology: TopologySinkConfig = dataclasses.field(default_factory=TopologySinkConfig)


@dataclasses.dataclass(frozen=True)
class KubernetesConfig:
    # Where the metadata watcher (`kubesight meta`) finds the API server. Empty: $KUBECONFIG,
    # then ~/.kube/config, then the in-cluster service account; `kubesight up` starts the
    # watcher only when one of them exists.
    kubeconfig: str = ""
    # Server-side timeout of one watch request; the watch is then renewed from where it was.
    watch_timeout_s: int = 300
    # The cluster's service CIDRs (kube-apiserver --service-cluster-ip-range). The probe asks
    # conntrack where a call to an address in them was sent (the backend pod); empty: never.
    service_cidrs: tuple[str, ...] = ()
    # The network namespace whose conntrack table that is, by name (/run/netns/<name>);
    # empty: the probe's own, the node's when the probe runs with hostNetwork.
    conntrack_netns: str = ""

    def __post_init__(self) -> None:
        if not 10 <= self.watch_timeout_s <= 3600:
            raise ConfigError(
                f"kubernetes.watch_timeout_s: must be within 10..3600, got {self.watch_timeout_s}")
        for cidr in self.service_cidrs:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as exc:
                raise ConfigError(f"kubernetes.service_cidrs: {exc}") from None


@dataclasses.dataclass(frozen=True)
class Config:
    node_name: str = dataclasses.field(default_factory=socket.gethostname)
    state_dir: str = dataclasses.field(default_factory=_default_state_dir)
    log_level: str = "info"
    kafka: KafkaConfig = dataclasses.field(default_factory=KafkaConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    streams: StreamsConfig = dataclasses.field(default_factory=StreamsConfig)
    sinks: SinksConfig = dataclasses.field(default_factory=SinksConfig)
    kubernetes: KubernetesConfig = dataclasses.field(default_factory=KubernetesConfig)

    def __post_init__(self) -> None:
        levels = {"debug", "info", "warning", "error"}
        if self.log_level not in levels:
            raise ConfigError(f"log_level: {self.log_level!r} is not one of {sorted(levels)}")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    def topic(self, name: str) -> str:
        """Full topic name for a logical topic (`raw`, `requests`, ...); see kubesight.topics."""
        return f"{self.kafka.topic_prefix}{name}"


def coerce_scalar(value: Any, hint: Any, key: str,
                  error: type[ConfigError] = ConfigError) -> Any:
    """Check (and gently convert) a bool/int/float/str value; ``error`` names ``key``.
    Returns ``NotImplemented`` for other hints. Shared with the sinks' own configs."""
    if hint is bool:
        if not isinstance(value, bool):
            raise error(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise error(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise error(f"{key}: expected a string, got {value!r}")
        return str(value)
    return NotImplemented


def check_key(key: str, dotted: str, names: list[str],
              error: type[ConfigError] = ConfigError) -> None:
    """Reject a key that is not one of ``names``, suggesting the closest one."""
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise error(f"{dotted}: unknown key{hint}; valid keys: {', '.join(names)}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and gently convert) one value against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key)  # type: ignore[arg-type]
    scalar = coerce_scalar(value, hint, key)
    if scalar is not NotImplemented:
        return scalar
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (types.UnionType, typing.Union):
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}")


def _build(cls: type[Any], data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        dotted = f"{prefix}.{key}" if prefix else key
        check_key(key, dotted, names)
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_CONFIG_ENV:
            continue
        if name.startswith(("KUBESIGHT_TEST_", "KUBESIGHT_BENCH_")):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        try:
            node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: cannot parse {raw!r}: {exc}") from exc
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load(path: str | os.PathLike[str] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Load the config file (if any), apply environment overrides, validate everything."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("KUBESIGHT_CONFIG") or None
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {p}: top level must be a mapping")
        data = dict(loaded)
    data = _merge(data, _env_overrides(environ))
    result = _build(Config, data)
    assert isinstance(result, Config)
    return result


def dump(config: Config) -> str:
    """The effective configuration as YAML (passwords redacted)."""
    tree = dataclasses.asdict(config)
    if tree["kafka"].get("sasl_password"):
        tree["kafka"]["sasl_password"] = "<redacted>"
    tree["probe"]["exclude_comms"] = list(tree["probe"]["exclude_comms"])
    return yaml.safe_dump(tree, sort_keys=False)
