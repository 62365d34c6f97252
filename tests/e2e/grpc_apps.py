"""A gRPC server and client (grpcio, generic handlers, raw bytes) run as their own processes.

    python -m tests.e2e.grpc_apps server <comm> <service>
        prints ``listening <port>``; each line "stats" on stdin prints what it served as JSON
        {method: {status name: calls}}; exits at the end of stdin.
    python -m tests.e2e.grpc_apps client <comm> <port> <service> <plan as JSON>
        makes the calls of the plan on one channel, prints {method: {status name: calls}}.

A plan is {"unary_ok": n, "unary_not_found": n, "stream_ok": n, "stream_fail": n,
"bidi": n}: unary calls (NOT_FOUND ones are trailers-only responses), server-streaming calls
of 5 messages (failing ones end with RESOURCE_EXHAUSTED after 2), bidi calls of 3 messages.
Both set their process name so kubesight names them as workloads.
"""

from __future__ import annotations

import collections
import json
import sys
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

STREAM_MESSAGES, FAIL_AFTER, BIDI_MESSAGES = 5, 2, 3


def set_comm(name: str) -> None:
    """The process name (the main thread's comm; threads started later inherit it)."""
    with open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


class Echo:
    def __init__(self) -> None:
        self.served: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"missing":
            self.served["Unary"]["NOT_FOUND"] += 1
            context.abort(grpc.StatusCode.NOT_FOUND, "no such item")
        self.served["Unary"]["OK"] += 1
        return b"echo:" + request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(STREAM_MESSAGES):
            if request == b"fail" and i == FAIL_AFTER:
                self.served["ServerStream"]["RESOURCE_EXHAUSTED"] += 1
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "stream quota")
            yield b"item %d" % i
        self.served["ServerStream"]["OK"] += 1

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield b"re:" + request
        self.served["Bidi"]["OK"] += 1


def serve(comm: str, service: str) -> None:
    set_comm(comm)
    echo = Echo()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(echo.server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(echo.bidi),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening {port}", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps({m: dict(c) for m, c in echo.served.items()}), flush=True)
    server.stop(None)


def call(comm: str, port: int, service: str, plan: dict[str, int]) -> dict[str, Any]:
    set_comm(comm)
    got: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)]) as ch:
        unary = ch.unary_unary(f"/{service}/Unary")
        stream = ch.unary_stream(f"/{service}/ServerStream")
        bidi = ch.stream_stream(f"/{service}/Bidi")
        total, missing = plan["unary_ok"] + plan["unary_not_found"], plan["unary_not_found"]
        # NOT_FOUND calls spread evenly among the OK ones
        requests = [b"missing" if (i * missing) % total < missing else b"ok" for i in range(total)]
        for request in requests:
            try:
                unary(request, timeout=30)
                got["Unary"]["OK"] += 1
            except grpc.RpcError as exc:
                got["Unary"][exc.code().name] += 1
        for request in [b"ok"] * plan["stream_ok"] + [b"fail"] * plan["stream_fail"]:
            messages = 0
            try:
                for _ in stream(request, timeout=30):
                    messages += 1
                got["ServerStream"]["OK"] += 1
            except grpc.RpcError as exc:
                got["ServerStream"][exc.code().name] += 1
            got["ServerStream messages"][str(messages)] += 1
        for _ in range(plan["bidi"]):
            replies = list(bidi(iter([b"a", b"b", b"c"][:BIDI_MESSAGES]), timeout=30))
            got["Bidi"]["OK" if len(replies) == BIDI_MESSAGES else "SHORT"] += 1
    return {m: dict(c) for m, c in got.items()}


def main() -> None:
    if sys.argv[1] == "server":
        serve(sys.argv[2], sys.argv[3])
    else:
        print(json.dumps(call(sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))))


if __name__ == "__main__":
    main()
