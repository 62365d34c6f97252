"""Sink configs: every message names its dotted key; build_sinks follows kubesight.config."""

from __future__ import annotations

import dataclasses
import urllib.request

import pytest
from kubesight.sinks import (
    SINKS,
    JsonLinesConfig,
    PrometheusConfig,
    PrometheusSink,
    SinkConfigError,
    build_sinks,
)
from kubesight.sinks.topology import TopologySink

from kubesight import config


@pytest.mark.parametrize(("section", "message"), [
    ({"listn": "x:1"},
     r"^sinks\.prometheus\.listn: unknown key \(did you mean 'listen'\?\)"),
    ({"enabled": "yes"}, r"^sinks\.prometheus\.enabled: expected true or false, got 'yes'"),
    ({"listen": 9464}, r"^sinks\.prometheus\.listen: expected host:port"),
    ({"listen": "localhost:http"}, r"^sinks\.prometheus\.listen: port must be 0\.\.65535"),
    ({"listen": "127.0.0.1:70000"}, r"^sinks\.prometheus\.listen: port must be 0\.\.65535"),
])
def test_prometheus_config_errors_name_the_key(section: dict[str, object], message: str) -> None:
    with pytest.raises(SinkConfigError, match=message):
        PrometheusConfig.from_mapping(section)


def test_config_errors_are_config_errors() -> None:
    with pytest.raises(config.ConfigError, match=r"^sinks\.jsonl\.path: required"):
        JsonLinesConfig.from_mapping({"enabled": True})


def test_ipv6_listen_is_accepted() -> None:
    assert PrometheusConfig.from_mapping({"listen": "[::1]:9464"}).listen == "[::1]:9464"


def test_each_main_config_section_matches_its_sink_config() -> None:
    """kubesight.config.SinksConfig and the sinks' own config classes must not drift apart."""
    for section in dataclasses.fields(config.SinksConfig):
        assert section.name in SINKS, f"sinks.{section.name} has no registered sink"
        defaults = dataclasses.asdict(getattr(config.SinksConfig(), section.name))
        assert defaults == dataclasses.asdict(SINKS[section.name].config_class()), section.name


def test_build_sinks_from_the_loaded_config() -> None:
    loaded = config.load(environ={"KUBESIGHT_SINKS__PROMETHEUS__LISTEN": "127.0.0.1:0"})
    sinks = build_sinks(loaded.sinks)
    try:
        assert [type(s) for s in sinks] == [PrometheusSink, TopologySink]
        assert isinstance(sinks[0], PrometheusSink)
        host, port = sinks[0].address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            assert b"# TYPE kubesight_requests_total counter" in response.read()
    finally:
        for sink in sinks:
            sink.close()


def test_disabled_sinks_are_not_built() -> None:
    loaded = config.load(environ={"KUBESIGHT_SINKS__PROMETHEUS__ENABLED": "false",
                                  "KUBESIGHT_SINKS__TOPOLOGY__ENABLED": "false"})
    assert build_sinks(loaded.sinks) == []
