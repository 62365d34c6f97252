"""A caller with a name of its own, for the troubleshooting stories.

    python -m tests.e2e.story_client COMM N TIMEOUT URL...

N rounds; each round GETs every URL once, each call on a new connection (so every call has
its own handshake on the path). Prints one JSON line: per URL, the statuses (0: failed), the
latencies the client measured (connect included) and the request latencies alone (from
sending the request to the end of the response: what kubesight measures on the client side).
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.parse

from tests.e2e.servers import _set_comm


def main() -> None:
    comm, rounds, timeout, urls = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
    _set_comm(comm)
    out: dict[str, dict[str, list[float]]] = {
        u: {"statuses": [], "latencies": [], "request_latencies": []} for u in urls}
    for _ in range(rounds):
        for url in urls:
            u = urllib.parse.urlsplit(url)
            start = time.monotonic()
            conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=timeout)
            sent = None
            try:
                conn.connect()
                sent = time.monotonic()
                conn.request("GET", u.path or "/", headers={"Connection": "close"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except OSError:
                status = 0
            finally:
                conn.close()
            done = time.monotonic()
            out[url]["statuses"].append(status)
            out[url]["latencies"].append(done - start)
            if status and sent is not None:
                out[url]["request_latencies"].append(done - sent)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
