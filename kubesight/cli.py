"""The ``kubesight`` command.

    kubesight up        run everything on this machine (local Kafka unless one is configured)
    kubesight status    component health, event rates and drops
    kubesight config    print the effective configuration, or check a file
    kubesight topics    create the topics (for an external cluster)
    kubesight probe     run only the node probe (root)
    kubesight worker    run one stream worker
    kubesight sink      run the sinks (Prometheus at 127.0.0.1:9464 by default)
    kubesight meta      follow the Kubernetes API server into the k8s.v1 topic
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, dump, load

EPILOG = """\
configuration:
  One YAML file (--config or $KUBESIGHT_CONFIG); every key can be overridden from the
  environment as KUBESIGHT_<SECTION>__<KEY>, e.g. KUBESIGHT_KAFKA__BOOTSTRAP_SERVERS=b1:9092.
  `kubesight config` prints every key with its effective value.

examples:
  kubesight up                              # as root: everything local; metrics on :9464
  kubesight status                          # is it healthy, what flows, what drops
  KUBESIGHT_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 kubesight worker
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubesight", description="eBPF troubleshooting: golden metrics for every "
        "process's requests, from the kernel, through Kafka.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kubesight {__version__}")
    p.add_argument("-c", "--config", help="YAML config file (default: $KUBESIGHT_CONFIG)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    up = sub.add_parser("up", help="run broker, probe, stream worker and sinks here",
                        description="Start everything on this machine and stay in the "
                        "foreground; Ctrl-C stops every component cleanly.")
    up.add_argument("--no-probe", action="store_true",
                    help="do not load BPF probes (pipeline only, e.g. without root)")
    st = sub.add_parser("status", help="component health, event rates and drops")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    cfg = sub.add_parser("config", help="print the effective configuration")
    cfg.add_argument("--check", action="store_true", help="only validate; exit 1 on errors")
    tp = sub.add_parser("topics", help="create kubesight's topics (idempotent)")
    tp.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="give up if the cluster has not answered by then (default 30)")
    sub.add_parser("probe", help="run the node probe (needs root)")
    sub.add_parser("worker", help="run one stream worker")
    sub.add_parser("sink", help="run the configured sinks")
    sub.add_parser("meta", help="follow the Kubernetes API (pods, services, workloads, "
                   "nodes) into k8s.v1")
    return p


def _setup_logging(config: Config) -> None:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _name_process(command: str) -> None:
    """Show up as ks-probe / ks-worker / ks-sink in ps, top and kubesight's own metrics."""
    import ctypes

    pr_set_name = 15
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(pr_set_name, f"ks-{command}".encode(), 0, 0, 0)


AUTOGROUP = Path("/proc/self/autogroup")


def _renice(target: int) -> None:
    """Move this process to the configured nice value (lowering needs root; then skip).

    With sched_autogroup on (Debian's default), a nice value only ranks a process against
    the others of its session; each component runs in a session of its own (it is started
    with start_new_session), so the session's autogroup gets the same nice, or nice -5 would
    rank the probe nowhere against nginx and wrk. Measured in the wrk e2e test before this:
    the probe's drain thread, at nice -5, waited 671 ms in one 100 ms window for a CPU."""
    log = logging.getLogger("kubesight")
    try:
        os.nice(target - os.nice(0))
    except OSError as exc:
        log.warning("cannot set nice %d: %s", target, exc)
    if os.getsid(0) != os.getpid():
        return  # not a session leader: the autogroup is shared with whoever started us
    try:
        AUTOGROUP.write_text(f"{target}\n")
    except FileNotFoundError:
        return  # a kernel without CONFIG_SCHED_AUTOGROUP
    except OSError as exc:
        log.warning("cannot set the autogroup's nice to %d: %s", target, exc)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"kubesight: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.config:
        os.environ["KUBESIGHT_CONFIG"] = os.path.abspath(args.config)

    if args.command == "config":
        if not args.check:
            print(dump(config), end="")
        else:
            print("kubesight: configuration OK")
        return 0
    if args.command == "status":
        from .status import status

        return status(config, as_json=args.json)
    if args.command == "topics":
        from .topics import TopicError, ensure_topics

        try:
            created = ensure_topics(config, timeout=args.timeout)
        except TopicError as exc:
            print(f"kubesight: {exc}", file=sys.stderr)
            return 1
        print(f"kubesight: topics ready ({len(created)} created)")
        return 0
    if args.command == "up":
        from .supervisor import Supervisor

        if not args.no_probe and os.geteuid() != 0:
            print("kubesight: the probe loads BPF programs and needs root; run with sudo, "
                  "or use --no-probe to run only the pipeline", file=sys.stderr)
            return 2
        from .broker import BrokerError
        from .topics import TopicError

        try:
            return Supervisor(config, args.config, with_probe=not args.no_probe).run()
        except (BrokerError, TopicError) as exc:  # said whole: the port's holder, the log
            print(f"kubesight: {exc}", file=sys.stderr)
            return 1

    _setup_logging(config)
    _name_process(args.command)
    _renice(config.probe.nice if args.command == "probe" else config.streams.nice)
    if args.command == "probe":
        from .probe.libbpf import ProbeError
        from .probe.main import run as run_probe
        from .process import AlreadyRunning

        try:
            run_probe(config)
        except ProbeError as exc:  # its text is whole: a verifier's log, what is missing
            print(f"kubesight probe: {exc}", file=sys.stderr)
            return 1
        except AlreadyRunning as exc:
            print(f"kubesight probe: {exc}", file=sys.stderr)
            return 2
        except PermissionError as exc:
            print(f"kubesight probe: {exc.strerror}: {exc.filename}. The probe runs as root, "
                  "or with the capabilities of deploy/kubernetes/probe-daemonset.yaml",
                  file=sys.stderr)
            return 1
    elif args.command == "sink":
        from .sinks.runner import run as run_sink

        try:
            run_sink(config)
        except ConfigError as exc:  # a sink's own settings, checked as it starts
            print(f"kubesight sink: {exc}", file=sys.stderr)
            return 2
    elif args.command == "meta":
        from .k8smeta import MetadataConfigError
        from .k8smeta import run as run_meta

        try:
            run_meta(config)
        except MetadataConfigError as exc:
            print(f"kubesight: {exc}", file=sys.stderr)
            return 2
    elif args.command == "worker":
        sys.argv = [sys.argv[0]]  # Faust's worker reads argv; give it none of ours
        from .streams.app import main as run_worker

        run_worker()
    return 0


if __name__ == "__main__":
    sys.exit(main())
