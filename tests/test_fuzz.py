"""Property-based fuzzing: random frames and bodies never crash or wedge the decoder, broker or worker."""
from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol as p
from broker.client import Client
from broker.errors import FractalError, ProtocolError

from .harness import dealer

# NOTE: the decoder tests run in process; those on the cluster fixture are marked slow by conftest.py.

HEADERS = st.sampled_from([b"MDPC02", b"MDPW02", b"", b"MDPC01", b"\x00"]) | st.binary(max_size=8)
COMMANDS = st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"", b"\x07"])
FRAME = st.binary(max_size=64)
MESSAGES = st.lists(FRAME, min_size=0, max_size=6).flatmap(
    lambda rest: st.tuples(HEADERS, COMMANDS).map(lambda hc: [hc[0], hc[1], *rest]))
INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
PLAIN = st.recursive(st.none() | st.booleans() | INTS | st.floats() | st.text(max_size=10)
                     | st.binary(max_size=20),
                     lambda inner: (st.lists(inner, max_size=4)
                                    | st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=12)
EXT = st.builds(msgpack.ExtType, st.integers(0, 5), st.binary(max_size=40))
BODIES = st.recursive(PLAIN | EXT, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
@settings(max_examples=500)
def test_the_decoder_returns_or_raises_protocol_error_only(frames):
    try:
        p.unpack_body(frames)
    except ProtocolError:
        pass


@given(BODIES, st.lists(st.binary(max_size=64), max_size=3))
@settings(max_examples=500)
def test_structured_garbage_with_tensor_extensions_decodes_or_is_refused(body, extra):
    try:
        p.unpack_body([msgpack.packb(body, use_bin_type=True), *extra])
    except ProtocolError:
        pass


def test_random_frames_never_crash_or_wedge_the_broker(cluster):
    with dealer(cluster.url) as sock:
        @given(MESSAGES)
        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        def send(frames):
            sock.send_multipart(frames)
        send()
    with Client(cluster.url, timeout_s=5) as client:
        assert client.predict("iris.onnx", {"float_input": [[2, 5, 1, 4]]})["label"].tolist() == [1]
        assert len({client.echo(i)["node"] for i in range(4)}) == 2  # both workers still there


def test_random_requests_get_answers_and_leave_the_workers_serving(cluster):
    ops = st.sampled_from(["predict", "predict_image", "info", "describe", "upload", "delete", "echo", "load",
                           "unload", "repository", "status", "models", "nope"])
    fields = st.dictionaries(st.sampled_from(["model", "inputs", "outputs", "data", "image", "description"]),
                             PLAIN | st.integers() | st.sampled_from(["iris.onnx", "../x.onnx", "digits.onnx"]),
                             max_size=4)  # st.integers(): unbounded, so the client's own refusal is fuzzed too
    with Client(cluster.url, timeout_s=10) as client:
        @given(ops, fields)
        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        def call(op, body):
            if op in ("delete", "unload", "upload", "describe"):
                body = {**body, "model": "scratch.onnx"}  # keep the bundled models in the pool
            try:
                client.call(op, body)
            except FractalError:
                pass
        call()
        assert client.predict("iris.onnx", {"float_input": [[2, 5, 1, 4]]})["label"].tolist() == [1]
        assert len({client.echo(i)["node"] for i in range(4)}) == 2
