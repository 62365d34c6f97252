"""What `kubesight status` lists under drops/errors."""

from __future__ import annotations

from kubesight.status import drops


def test_losses_and_blind_spots_are_listed_and_zeroes_are_not() -> None:
    counters = {"kernel_ringbuf_drops": 3, "kernel_events": 1000, "delivery_errors": 0,
                "tls_libraries_probed": 2, "tls_libraries_not_probed": 1,
                "kernel_truncated": 7, "consumer_lag": 0}
    assert drops(counters) == {"kernel_ringbuf_drops": 3, "tls_libraries_not_probed": 1,
                               "kernel_truncated": 7}
