"""MDP/0.2 frames in both dialects: each direction's builder, its parser, and refusal of malformed messages."""
from __future__ import annotations

import threading

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import protocol as p
from broker.errors import ProtocolError
from broker.protocol import MDPC, MDPW, Dialect
from broker.sockets import NOBLOCK, ZERO_COPY_MIN_BYTES, recv_frames, recv_within, send_frames
from worker.connection import Connection

SENDER = b"\x00peer"  # the routing id a ROUTER puts first
CLIENT = b"\x00client"
BODY = [b"\x81\xa2op\xa4echo", b"tensor bytes"]
MT = b""  # majortomo's leading empty frame


def test_a_client_request_in_each_dialect() -> None:
    rfc = p.parse_at_broker([SENDER, *p.client_request(b"modelhost", BODY)])
    assert rfc == p.ClientRequest(SENDER, Dialect.RFC, b"modelhost", BODY)
    majortomo = p.parse_at_broker([SENDER, MT, b"MDPC02", p.MAJORTOMO_CLIENT_REQUEST, b"modelhost", *BODY])
    assert (majortomo.sender, majortomo.dialect, majortomo.service, majortomo.body) == \
        (SENDER, Dialect.MAJORTOMO, b"modelhost", BODY)


def test_a_request_without_body_parses_for_the_broker_to_answer() -> None:
    assert p.parse_at_broker([SENDER, b"MDPC02", MDPC.REQUEST, b"modelhost"]).body == []


def test_body_frames_are_passed_on_not_copied() -> None:
    frames = [SENDER, *p.client_request(b"modelhost", BODY)]
    assert p.parse_at_broker(frames).body[1] is frames[-1]


@pytest.mark.parametrize("dialect", [Dialect.RFC, Dialect.MAJORTOMO])
def test_worker_commands_in_each_dialect(dialect: Dialect) -> None:
    lead = [SENDER] if dialect is Dialect.RFC else [SENDER, MT]

    def parsed(*frames: bytes) -> tuple:
        message = p.parse_at_broker([*lead, b"MDPW02", *frames])
        assert isinstance(message, p.WorkerCommand) and message.sender == SENDER and message.dialect is dialect
        return message.command, message.address, message.body

    assert parsed(MDPW.READY, b"modelhost") == (MDPW.READY, b"modelhost", [])
    assert parsed(MDPW.FINAL, CLIENT, b"", *BODY) == (MDPW.FINAL, CLIENT, BODY)
    assert parsed(MDPW.PARTIAL, CLIENT, b"", b"part") == (MDPW.PARTIAL, CLIENT, [b"part"])
    assert parsed(MDPW.FINAL, CLIENT, b"") == (MDPW.FINAL, CLIENT, [])
    assert parsed(MDPW.HEARTBEAT) == (MDPW.HEARTBEAT, b"", [])
    assert parsed(MDPW.DISCONNECT) == (MDPW.DISCONNECT, b"", [])


def test_what_our_worker_sends_parses_at_the_broker() -> None:
    for frames, expected in [
        (p.worker_command(MDPW.READY, b"modelhost"), (MDPW.READY, b"modelhost", [])),
        (p.worker_command(MDPW.FINAL, CLIENT, BODY), (MDPW.FINAL, CLIENT, BODY)),
        (p.worker_command(MDPW.HEARTBEAT), (MDPW.HEARTBEAT, b"", [])),
        (p.worker_command(MDPW.DISCONNECT), (MDPW.DISCONNECT, b"", [])),
    ]:
        message = p.parse_at_broker([SENDER, *frames])
        assert (message.dialect, message.command, message.address, message.body) == (Dialect.RFC, *expected)


@pytest.mark.parametrize("frames", [
    [], [SENDER], [SENDER, b"MDPC02"], [SENDER, MT, b"MDPC02"],         # too short for a header and command
    [SENDER, b"MDPX02", b"\x01", b"svc", b"body"],                     # unknown header
    [SENDER, MT, MT, b"\x01", b"svc"],                                  # no header after the empty frame
    [SENDER, b"MDPC02", MDPC.FINAL, b"svc", b"body"],                  # a client sends only REQUEST
    [SENDER, b"MDPC02", MDPC.REQUEST],                                  # no service
    [SENDER, b"MDPC02", p.MAJORTOMO_CLIENT_REQUEST, b"svc", b"body"],  # majortomo's code without its empty frame
    [SENDER, MT, b"MDPC02", MDPC.REQUEST, b"svc", b"body"],            # RFC code with majortomo's empty frame
])
def test_malformed_messages_from_anyone_are_refused(frames: list) -> None:
    with pytest.raises(ProtocolError):
        p.parse_at_broker(frames)
    assert p.worker_sender(frames) is None  # nobody to tell DISCONNECT


@pytest.mark.parametrize("dialect", [Dialect.RFC, Dialect.MAJORTOMO])
@pytest.mark.parametrize("rest", [
    [MDPW.READY], [MDPW.READY, b""], [MDPW.READY, b"svc", b"extra"],   # READY names one service
    [MDPW.FINAL], [MDPW.FINAL, CLIENT], [MDPW.PARTIAL, CLIENT, b"not empty", b"body"],  # no envelope
    [MDPW.REQUEST, CLIENT, b"", b"body"],                             # the broker's command, not a worker's
    [b"\x07"], [b""],                                                  # unknown commands
])
def test_malformed_worker_messages_name_whom_to_disconnect(dialect: Dialect, rest: list) -> None:
    frames = [SENDER, b"MDPW02", *rest] if dialect is Dialect.RFC else [SENDER, MT, b"MDPW02", *rest]
    with pytest.raises(ProtocolError):
        p.parse_at_broker(frames)
    assert p.worker_sender(frames) == (SENDER, dialect)


@pytest.mark.parametrize("dialect", [Dialect.RFC, Dialect.MAJORTOMO])
def test_replies_to_a_client_go_back_in_its_dialect(dialect: Dialect) -> None:
    final = p.client_reply(CLIENT, dialect, b"modelhost", BODY)
    partial = p.client_reply(CLIENT, dialect, b"modelhost", [b"part"], final=False)
    if dialect is Dialect.RFC:
        assert final == [CLIENT, b"MDPC02", MDPC.FINAL, b"modelhost", *BODY]
        assert partial == [CLIENT, b"MDPC02", MDPC.PARTIAL, b"modelhost", b"part"]
        assert p.parse_client_reply(final[1:]) == p.ClientReply(MDPC.FINAL, b"modelhost", BODY)
        assert p.parse_client_reply(partial[1:]) == p.ClientReply(MDPC.PARTIAL, b"modelhost", [b"part"])
    else:  # majortomo: no service frame, its own codes
        assert final == [CLIENT, MT, b"MDPC02", p.MAJORTOMO_CLIENT_FINAL, *BODY]
        assert partial == [CLIENT, MT, b"MDPC02", p.MAJORTOMO_CLIENT_PARTIAL, b"part"]


@pytest.mark.parametrize("dialect", [Dialect.RFC, Dialect.MAJORTOMO])
def test_commands_to_a_worker_go_in_its_dialect(dialect: Dialect) -> None:
    lead = [SENDER] if dialect is Dialect.RFC else [SENDER, MT]
    assert p.broker_command(SENDER, dialect, MDPW.REQUEST, CLIENT, BODY) == \
        [*lead, b"MDPW02", MDPW.REQUEST, CLIENT, b"", *BODY]
    assert p.broker_command(SENDER, dialect, MDPW.HEARTBEAT) == [*lead, b"MDPW02", MDPW.HEARTBEAT]
    assert p.broker_command(SENDER, dialect, MDPW.DISCONNECT) == [*lead, b"MDPW02", MDPW.DISCONNECT]


def test_our_worker_reads_what_the_broker_sends() -> None:
    request = p.broker_command(SENDER, Dialect.RFC, MDPW.REQUEST, CLIENT, BODY)[1:]  # the DEALER drops the id
    assert p.parse_broker_command(request) == p.BrokerCommand(MDPW.REQUEST, CLIENT, BODY)
    for command in (MDPW.HEARTBEAT, MDPW.DISCONNECT):
        assert p.parse_broker_command(p.broker_command(SENDER, Dialect.RFC, command)[1:]) == \
            p.BrokerCommand(command, b"", [])


@pytest.mark.parametrize("frames", [[b"MDPW02", MDPW.REQUEST, CLIENT], [b"MDPW02", MDPW.REQUEST, CLIENT, b"x", b"b"],
                                    [b"MDPW02", MDPW.REQUEST, CLIENT, b""]])
def test_a_request_with_a_broken_envelope_reaches_the_worker_without_body(frames: list) -> None:
    """The worker answers it (an error: no body frame) rather than leave the broker's request hanging."""
    assert p.parse_broker_command(frames) == p.BrokerCommand(MDPW.REQUEST, CLIENT, [])


@pytest.mark.parametrize("frames", [[], [b"MDPW02"], [b"MDPC02", MDPW.REQUEST, CLIENT, b"", b"body"],
                                    [b"MDPW02", MDPW.REQUEST]])
def test_the_worker_refuses_what_is_not_a_command_to_it(frames: list) -> None:
    with pytest.raises(ProtocolError):
        p.parse_broker_command(frames)


@pytest.mark.parametrize("frames", [[], [b"MDPC02", MDPC.FINAL], [b"MDPW02", MDPC.FINAL, b"svc"],
                                    [b"MDPC02", MDPC.REQUEST, b"svc", b"body"]])
def test_the_client_refuses_what_is_not_a_reply(frames: list) -> None:
    with pytest.raises(ProtocolError):
        p.parse_client_reply(frames)


HEADERS = st.sampled_from([b"MDPC02", b"MDPW02", b"", b"MDPC01"]) | st.binary(max_size=8)
COMMANDS = st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"", b"\x07"])
FRAMES = st.lists(st.binary(max_size=16), max_size=5)


@given(st.lists(HEADERS | COMMANDS, max_size=4), FRAMES)
@settings(max_examples=1000)
def test_any_frames_parse_to_a_record_or_raise_protocol_error(head: list, tail: list) -> None:
    frames = [*head, *tail]
    for parse in (p.parse_at_broker, p.parse_broker_command, p.parse_client_reply):
        try:
            parse(frames)
        except ProtocolError:
            pass
    p.worker_sender(frames)


def test_a_worker_connection_speaks_what_the_broker_parses() -> None:
    """worker/connection.py's messages, over a real socket to a ROUTER standing in for the broker."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    endpoint = "inproc://frames-connection"
    router.bind(endpoint)
    conn = Connection(context, endpoint, b"modelhost", 1.0, 3.0, 1.0, threading.Event(), 0)
    try:
        def next_message() -> p.WorkerCommand:
            assert router.poll(2000), "nothing came"
            message = p.parse_at_broker(router.recv_multipart())
            assert isinstance(message, p.WorkerCommand) and message.dialect is Dialect.RFC
            return message

        conn.connect()
        ready = next_message()
        assert (ready.command, ready.address) == (MDPW.READY, b"modelhost")
        conn.heartbeat()
        assert next_message().command == MDPW.HEARTBEAT
        conn.final(CLIENT, BODY)
        final = next_message()
        assert (final.sender, final.command, final.address, final.body) == (ready.sender, MDPW.FINAL, CLIENT, BODY)
        conn.close()
        assert next_message().command == MDPW.DISCONNECT
    finally:
        router.close(linger=0)
        context.term()


def test_recv_frames_returns_a_multipart_message_as_it_was_sent() -> None:
    """broker/sockets.py's receive (every peer's hot path): every frame as bytes and in order, empty
    frames and a frame past ZERO_COPY_MIN_BYTES included; one message per call; NOBLOCK with nothing
    waiting raises zmq.Again, as recv_multipart does; recv_within gives up after its timeout."""
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    a.linger = b.linger = 0
    a.bind("inproc://frames-recv")
    b.connect("inproc://frames-recv")
    big = bytes(range(256)) * (ZERO_COPY_MIN_BYTES // 256 + 1)
    try:
        first, second = [p.CLIENT_HEADER, MDPC.FINAL, b"", b"modelhost", big], [b"one frame"]
        send_frames(a, first)
        send_frames(a, second)
        got = recv_frames(b)
        assert got == first and all(type(frame) is bytes for frame in got)
        assert recv_frames(b, NOBLOCK) == second
        with pytest.raises(zmq.Again):
            recv_frames(b, NOBLOCK)
        with pytest.raises(zmq.Again):
            recv_within(b, 10)
        send_frames(a, second)
        assert recv_within(b, 2000) == second
    finally:
        a.close()
        b.close()
        context.term()
