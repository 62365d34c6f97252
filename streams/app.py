"""The one Faust app of kubesight's stream workers, its topics and its tables.

The whole data path, in one place (agents live in ``agents.py``):

    topic             agent            state                         writes to
    ───────────────── ──────────────── ───────────────────────────── ─────────────────────────
    raw.v1            reassemble       live parsers, per connection  requests.v1, series.v1
    meta.v1           follow_          listener → workload           (in memory, both users;
    (all partitions,  listeners (a                                    raw.v1 and tcp.v1 wait
     every worker)    task)                                          for the first read through)
    k8s.v1            follow_k8s_      pod IP, container id, cluster (in memory; reassemble
    (all partitions,  identity (a      IP → pod, service              names both ends of a
     every worker)    task)            (streams/identity.py)          request with it)
    series.v1         golden           windows table (changelog)     golden.v1
    (timer, 1 s)      tick             -                             series.v1 (1 tick/partition)
    tcp.v1            network          listener names (in memory)    netseries.v1; network.v1
                                                                     (the node's conntrack usage)
    netseries.v1      network_windows  network table (changelog)     network.v1
    (timer, 1 s)      network_tick     -                             netseries.v1 (1 tick/partition)
    golden.v1 + health.v1 are read by ``kubesight sink`` (sinks/runner.py), fanned out to sinks.
    network.v1 is read by ``kubesight sink`` too: kubesight_tcp_* and kubesight_conntrack_*.
    golden.v1 + network.v1 → topology sink (sinks/topology.py, in ``kubesight sink``): the
    service map, served at /topology and written to topology.v1 (compacted, key: edge).
    node.v1 (node CPU, memory, top-N from the probe's /proc sampling) goes straight to the sink:
    it needs no stream processing.

``series.v1`` is the repartition step: the reassembler pre-aggregates each batch per
(series, window) and sends the partials keyed by series, so the windows table is keyed like
the topic that feeds it (what Faust's ``group_by`` does, but one message per series per
batch instead of one per request). The golden agent closes windows when a *tick* for its
partition arrives, because Faust tables may only be changed while processing a message of
the partition that owns the key.

Configuration comes from ``kubesight.config.load()`` (``KUBESIGHT_CONFIG`` and
``KUBESIGHT_*`` environment variables) when this module is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust

from kubesight import config as _config
from kubesight.logs import quiet_repeats

config = _config.load()


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def _credentials() -> Any:
    k = config.kafka
    if k.sasl_mechanism:
        ssl_context = None
        if k.security_protocol == "SASL_SSL":
            import ssl

            ssl_context = ssl.create_default_context(cafile=k.ssl_ca_location or None)
        return faust.SASLCredentials(username=k.sasl_username, password=k.sasl_password,
                                     mechanism=k.sasl_mechanism, ssl_context=ssl_context)
    if k.security_protocol == "SSL":
        import ssl

        return faust.SSLCredentials(ssl.create_default_context(cafile=k.ssl_ca_location or None))
    return None


app = faust.App(
    config.streams.app_id,
    broker=_broker_urls(config.kafka.bootstrap),
    broker_credentials=_credentials(),
    store="memory://",
    # Faust makes <datadir>/v1/tables even for in-memory tables; default is ./<app id>-data
    datadir=str(config.state_path / "streams" / config.streams.app_id),  # made by main()
    autodiscover=False,
    topic_partitions=config.kafka.partitions,
    topic_replication_factor=config.kafka.replication_factor,
    topic_allow_declare=True,  # for its changelog topics; ours are created by kubesight.topics
    consumer_auto_offset_reset="earliest",
    web_host="127.0.0.1",
    web_port=config.streams.web_port,
    web_in_thread=False,
    producer_compression_type="lz4",
    producer_max_request_size=4_000_000,
    broker_commit_every=1000,
    broker_commit_interval=1.0,
    stream_buffer_maxsize=8192,
)


def _topic(name: str) -> Any:
    return app.topic(config.topic(name), key_type=bytes, value_type=bytes,
                     key_serializer="raw", value_serializer="raw",
                     partitions=config.kafka.partitions, internal=False)


raw_topic = _topic("raw.v1")
requests_topic = _topic("requests.v1")
series_topic = _topic("series.v1")
golden_topic = _topic("golden.v1")
health_topic = _topic("health.v1")
deadletter_topic = _topic("deadletter.v1")
tcp_topic = _topic("tcp.v1")
netseries_topic = _topic("netseries.v1")
network_topic = _topic("network.v1")

windows_table = app.Table(
    "golden-windows", partitions=config.kafka.partitions, default=None,
    key_type=bytes, value_type=bytes,  # what sets the changelog's serializers (else json)
    schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw",
                        value_serializer="raw"),
)


# Network windows (streams/network.py), mirrored like the golden windows.
network_table = app.Table(
    "network-windows", partitions=config.kafka.partitions, default=None,
    key_type=bytes, value_type=bytes,
    schema=faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw",
                        value_serializer="raw"),
)


def _broker_answers() -> bool:
    """Wait for the broker before Faust starts (Faust gives up at once on a broker it cannot
    reach, with a traceback); False if SIGTERM or SIGINT came first."""
    import signal

    from kubesight.topics import wait_for_cluster

    # A flag, not a threading.Event: a handler that takes the Event's lock while the main
    # thread holds it in Event.wait waits for itself (kubesight.process.stop_on_signals).
    stopped: list[bool] = []
    previous = {sig: signal.signal(sig, lambda *_: stopped.append(True))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return wait_for_cluster(config, lambda: bool(stopped))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main() -> None:
    """Run one stream worker (``kubesight worker``)."""
    from faust.worker import Worker

    from . import agents  # noqa: F401  (registers agents and timers on ``app``)

    Path(app.conf.datadir).parent.mkdir(parents=True, exist_ok=True)  # Faust makes one level
    import aiokafka.client  # noqa: F401  (loaded by Faust on start; their loggers exist now)
    import faust.transport.drivers.aiokafka  # noqa: F401

    quiet_repeats("aiokafka")  # one line per error per 10 s while a broker is away
    if not _broker_answers():
        return  # stopped while waiting: nothing started, nothing to clean up

    try:
        Worker(app, loglevel=config.log_level.upper(), quiet=True).execute_from_commandline()
    except SystemExit:
        if agents.exit_status is not None:  # the stall watch stopped it: say so to the supervisor
            raise SystemExit(agents.exit_status) from None
        raise
