"""How gRPC calls that end early are counted (fast layer: no process)."""
from __future__ import annotations

import grpc

from frontend.oip_grpc.calls import cancel_code


def test_a_reset_at_the_clients_deadline_counts_as_deadline_exceeded():
    # 0.5 s deadline; the client's clock started 20 ms before ours, so its reset comes with 20 ms left here
    assert cancel_code(0.02, 0.48) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancel_code(-0.001, 0.501) is grpc.StatusCode.DEADLINE_EXCEEDED  # our own deadline passed


def test_a_reset_well_before_the_deadline_or_without_one_is_cancelled():
    assert cancel_code(0.4, 0.1) is grpc.StatusCode.CANCELLED      # the client left early
    assert cancel_code(None, 3.0) is grpc.StatusCode.CANCELLED     # no deadline at all
    assert cancel_code(0.06, 0.44) is grpc.StatusCode.CANCELLED    # 12 % of the deadline left: not its end
