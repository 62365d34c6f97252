"""Tag a connection's raw.v1 metadata: its process's container and pod, its service backend.

The stream workers name the side that observed a request by the pod of its process when they
know it (``streams/identity.py``: container id → pod from ``k8s.v1``), which also covers pods
that share their node's network (their addresses name nobody). The probe only adds the two ids
it reads from the process's cgroup (``identity.py``); host processes get no tags, so their
batches are no bigger.

One lookup per process every ``refresh_s`` at most: a batch is tagged from a cache keyed by
tgid, re-resolved when stale (the resolver itself notices pid reuse and exec).

A client's socket keeps the address it connected to, so a call to a service's cluster IP is
seen going to the cluster IP; kube-proxy's DNAT chose a backend pod, and the node's conntrack
table remembers which. For client connections to an address in the service CIDRs,
``BackendLookup`` asks conntrack once per connection (netlink, ~1 ms) and the batch carries
``backend_addr``/``backend_port``: the stream workers then name the pod that served the call.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from .identity import IdentityResolver

log = logging.getLogger("kubesight.probe")

MAX_CACHED = 20_000
ROLE_CLIENT = 1


class BackendLookup:
    """(client addr, port, cluster IP, port) → the backend (addr, port) conntrack DNATed to."""

    def __init__(self, service_cidrs: Iterable[str], netns: str = "") -> None:
        self.networks = [ipaddress.ip_network(c) for c in service_cidrs]
        self._netns = netns
        self._ct: Any = None
        self._cache: collections.OrderedDict[tuple[str, int, str, int], tuple[str, int] | None] = (
            collections.OrderedDict())
        self.lookups = self.found = self.errors = 0

    def is_service(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def backend(self, laddr: str, lport: int, raddr: str, rport: int) -> tuple[str, int] | None:
        key = (laddr, lport, raddr, rport)
        if key in self._cache:
            return self._cache[key]
        found = self._ask(laddr, lport, raddr, rport)
        self._cache[key] = found
        if len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return found

    def _ask(self, laddr: str, lport: int, raddr: str, rport: int) -> tuple[str, int] | None:
        from pyroute2 import Conntrack
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        family = socket.AF_INET6 if ":" in raddr else socket.AF_INET
        self.lookups += 1
        try:
            if self._ct is None:
                self._ct = Conntrack(netns=self._netns) if self._netns else Conntrack()
            msg = self._ct.entry("get", tuple_orig=NFCTAttrTuple(
                family=family, saddr=laddr, daddr=raddr, proto=socket.IPPROTO_TCP,
                sport=lport, dport=rport))
            reply = NFCTAttrTuple.from_netlink(family, msg.get_attr("CTA_TUPLE_REPLY"))
        except NetlinkError:  # no such entry: not NATed here (or already gone)
            return None
        except (OSError, ValueError, AttributeError) as exc:
            self.errors += 1
            if self.errors == 1:
                log.warning("conntrack lookup failed: %s", exc)
            self.close()
            return None
        # The reply comes from the backend: its source is where the call really went.
        if (reply.saddr, reply.sport) == (raddr, rport):
            return None
        self.found += 1
        return str(reply.saddr), int(reply.sport)

    def close(self) -> None:
        if self._ct is not None:
            self._ct.close()
            self._ct = None

    def annotate(self, meta: dict[str, Any]) -> None:
        if meta.get("role") != ROLE_CLIENT or not self.is_service(str(meta.get("raddr", ""))):
            return
        found = self.backend(meta["laddr"], int(meta["lport"]), meta["raddr"],
                             int(meta["rport"]))
        if found is not None:
            meta["backend_addr"], meta["backend_port"] = found


class ConnectionTagger:
    def __init__(self, resolver: IdentityResolver | None = None, *, refresh_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 backends: BackendLookup | None = None) -> None:
        self._resolver = resolver if resolver is not None else IdentityResolver()
        self.backends = backends
        self._refresh_s = refresh_s
        self._clock = clock
        self._cache: dict[int, tuple[float, dict[str, str]]] = {}

    def tags(self, tgid: int) -> dict[str, str]:
        now = self._clock()
        cached = self._cache.get(tgid)
        if cached is not None and now - cached[0] < self._refresh_s:
            return cached[1]
        ident = self._resolver.identify(tgid)
        tags: dict[str, str] = {}
        if ident is not None:
            if ident.container_id:
                tags["container_id"] = ident.container_id
            if ident.pod_uid:
                tags["pod_uid"] = ident.pod_uid
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items()
                           if now - v[0] < self._refresh_s}
        self._cache[tgid] = (now, tags)
        return tags

    def annotate(self, meta: dict[str, Any]) -> None:
        """Add ``container_id`` / ``pod_uid`` (and ``backend_addr``/``backend_port`` for a call to
        a service) to a batch's connection metadata, when there are any."""
        tags = self.tags(int(meta["tgid"]))
        if tags:
            meta.update(tags)
        if self.backends is not None:
            self.backends.annotate(meta)

    def close(self) -> None:
        if self.backends is not None:
            self.backends.close()
