from __future__ import annotations

import pytest

from kubesight.config import ConfigError, dump, load


def test_defaults_need_no_file() -> None:
    cfg = load(None, environ={})
    assert cfg.kafka.uses_local_broker
    assert cfg.kafka.bootstrap == "127.0.0.1:9092"
    assert cfg.sinks.prometheus.listen == "127.0.0.1:9464"
    assert cfg.streams.window_seconds == 10
    assert cfg.streams.slow_threshold_ns("http") == 500_000_000


def test_file_and_environment_override(tmp_path) -> None:
    f = tmp_path / "k.yaml"
    f.write_text("kafka:\n  bootstrap_servers: a:1\nstreams:\n  window_seconds: 5\n")
    cfg = load(f, environ={"KUBESIGHT_STREAMS__WINDOW_SECONDS": "2",
                           "KUBESIGHT_PROBE__EXCLUDE_COMMS": "sshd,cron"})
    assert cfg.kafka.bootstrap == "a:1"
    assert cfg.streams.window_seconds == 2
    assert cfg.probe.exclude_comms == ("sshd", "cron")


@pytest.mark.parametrize(("text", "env", "message"), [
    ("kafka:\n  bootstrap_server: x\n", {}, "kafka.bootstrap_server: unknown key (did you mean "
                                            "'bootstrap_servers'?)"),
    ("streams:\n  window_seconds: ten\n", {}, "streams.window_seconds: expected an integer"),
    ("", {"KUBESIGHT_PROBE__CAPTURE_BYTES": "1000"}, "probe.capture_bytes: must be a power of two"),
    ("", {"KUBESIGHT_PROBE__NICE": "-30"}, "probe.nice: must be within -20..19"),
    ("probe:\n  drain_rt_priority: 100\n", {}, "probe.drain_rt_priority: must be within 0..99"),
    ("", {"KUBESIGHT_KAFKA__SECURITY_PROTOCOL": "TLS"}, "kafka.security_protocol: 'TLS'"),
    ("", {"KUBESIGHT_SINKS__PROMETHEUS__LISTN": "x"}, "sinks.prometheus.listn: unknown key"),
    ("streams:\n  slow_threshold_ms:\n    http: -1\n", {}, "streams.slow_threshold_ms.http"),
    ("probe:\n  exclude_comms: [kubesight-worker-1]\n", {},
     "probe.exclude_comms: 'kubesight-worker-1' is not a process name (1..15 bytes"),
    ("", {"KUBESIGHT_PROBE__EXCLUDE_COMMS": "sshd,/usr/sbin/cron"},
     "probe.exclude_comms: '/usr/sbin/cron' is not a process name"),
    ("- a\n- b\n", {}, "top level must be a mapping"),
])
def test_wrong_keys_and_values_are_named(tmp_path, text: str, env: dict[str, str],
                                         message: str) -> None:
    f = tmp_path / "k.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(f, environ=env)
    assert message in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml", environ={})


def test_dump_redacts_password() -> None:
    cfg = load(None, environ={"KUBESIGHT_KAFKA__SASL_PASSWORD": "hunter2",
                              "KUBESIGHT_KAFKA__SASL_MECHANISM": "PLAIN"})
    text = dump(cfg)
    assert "hunter2" not in text
    assert "<redacted>" in text
