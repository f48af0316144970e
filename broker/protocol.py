"""MDP/0.2 frames (RFC 18, with MMI from RFC 8) and msgpack bodies: the only module that knows the wire.

Frame layouts, as the RFC writes them (no empty leading frame; peers use DEALER sockets):

    client -> broker  REQUEST     MDPC02, 0x01, service, body...
    broker -> client  PARTIAL     MDPC02, 0x02, service, body...
                      FINAL       MDPC02, 0x03, service, body...
    worker -> broker  READY       MDPW02, 0x01, service
                      PARTIAL     MDPW02, 0x03, client, "", body...
                      FINAL       MDPW02, 0x04, client, "", body...
                      HEARTBEAT   MDPW02, 0x05
                      DISCONNECT  MDPW02, 0x06
    broker -> worker  REQUEST     MDPW02, 0x02, client, "", body...
                      HEARTBEAT, DISCONNECT as above

The broker also speaks the dialect of `majortomo` 0.2.0 to peers that use it (MAJORTOMO below): an empty
frame before the header on every message, client REQUEST = 0x02, and replies to clients PARTIAL = 0x03 /
FINAL = 0x04 with no service frame. Bodies and the tensor extension type are described in
docs/protocol.md.
"""
from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

import msgpack
import numpy as np

from .errors import BadInput, FractalError, InternalError, ProtocolError, error_from_wire

CLIENT_HEADER = b"MDPC02"
WORKER_HEADER = b"MDPW02"
MMI_PREFIX = b"mmi."
MMI_SERVICE = b"mmi.service"
MMI_WORKERS = b"mmi.workers"  # our extension in RFC 8's namespace: msgpack status of broker and workers


class MDPC:
    """MDP/Client command codes (RFC 18)."""
    REQUEST = b"\x01"
    PARTIAL = b"\x02"
    FINAL = b"\x03"


class MDPW:
    """MDP/Worker command codes (RFC 18)."""
    READY = b"\x01"
    REQUEST = b"\x02"
    PARTIAL = b"\x03"
    FINAL = b"\x04"
    HEARTBEAT = b"\x05"
    DISCONNECT = b"\x06"


class Dialect(enum.Enum):
    RFC = "rfc"
    MAJORTOMO = "majortomo"


# majortomo's client codes; its worker codes equal the RFC's.
MAJORTOMO_CLIENT_REQUEST = b"\x02"
MAJORTOMO_CLIENT_PARTIAL = b"\x03"
MAJORTOMO_CLIENT_FINAL = b"\x04"

# ---------------------------------------------------------------------------------------------
# Frames: each inbound message is parsed once into a record, each outbound one built by one function,
# one per direction; no other module knows a frame's position. Records are NamedTuples made with
# tuple.__new__ (a dataclass, or the NamedTuple's own __new__, costs more per message on the hot path).


class ClientRequest(NamedTuple):
    """client -> broker: a REQUEST (the only command a client sends), as the broker's ROUTER got it."""
    sender: bytes     # the client's routing id
    dialect: Dialect  # how to answer it
    service: bytes
    body: list        # the body frames (RFC 18 requires one at least; the broker checks)


class WorkerCommand(NamedTuple):
    """worker -> broker: READY, PARTIAL, FINAL, HEARTBEAT or DISCONNECT, as the broker's ROUTER got it."""
    sender: bytes     # the worker's routing id
    dialect: Dialect
    command: bytes    # an MDPW code (the same in both dialects)
    address: bytes    # READY: the service; PARTIAL, FINAL: the client's address; else b""
    body: list        # PARTIAL, FINAL: the reply's body frames; else []


class BrokerCommand(NamedTuple):
    """broker -> worker: REQUEST, HEARTBEAT or DISCONNECT, as a worker's DEALER got it (RFC dialect)."""
    command: bytes    # an MDPW code
    client: bytes     # REQUEST: the client's address, to send back with the reply; else b""
    body: list        # REQUEST: the body frames; [] when its envelope is broken (answer it with an error)


class ClientReply(NamedTuple):
    """broker -> client: PARTIAL or FINAL, as a client's DEALER got it (RFC dialect)."""
    command: bytes    # MDPC.PARTIAL or MDPC.FINAL
    service: bytes    # the service the request named (an MMI service for MMI answers)
    body: list


_new = tuple.__new__
_DIALECT_AT = (None, Dialect.RFC, Dialect.MAJORTOMO)   # by the index of the header frame, after the sender
_CLIENT_REQUEST_AT = (None, MDPC.REQUEST, MAJORTOMO_CLIENT_REQUEST)


def parse_at_broker(frames: list) -> ClientRequest | WorkerCommand:
    """A message the broker's ROUTER received (its first frame the sender's routing id), in either
    dialect: a ClientRequest or a WorkerCommand. Raises ProtocolError when it breaks MDP/0.2; for a
    message with the worker header, `worker_sender` then says whom to answer with DISCONNECT."""
    count = len(frames)
    if count < 3:
        raise ProtocolError(f"{count} frames is too short for MDP")
    at = 1 if frames[1] else 2  # NOTE: majortomo leads with an empty frame
    if count < at + 2:
        raise ProtocolError("no header and command")
    header, command = frames[at], frames[at + 1]
    if header == CLIENT_HEADER:
        if command != _CLIENT_REQUEST_AT[at] or count < at + 3:
            raise ProtocolError(f"client command {command[:4]!r} is not REQUEST with a service")
        return _new(ClientRequest, (frames[0], _DIALECT_AT[at], frames[at + 2], frames[at + 3:]))
    if header != WORKER_HEADER:
        raise ProtocolError(f"unknown header {header[:16]!r}")
    if command == MDPW.FINAL or command == MDPW.PARTIAL:
        if count < at + 4 or frames[at + 3]:
            raise ProtocolError("a reply without its client address and empty frame")
        return _new(WorkerCommand, (frames[0], _DIALECT_AT[at], command, frames[at + 2], frames[at + 4:]))
    if command == MDPW.HEARTBEAT or command == MDPW.DISCONNECT:
        return _new(WorkerCommand, (frames[0], _DIALECT_AT[at], command, b"", []))
    if command == MDPW.READY:
        if count != at + 3 or not frames[at + 2]:
            raise ProtocolError("READY without a service, or with more")
        return _new(WorkerCommand, (frames[0], _DIALECT_AT[at], command, frames[at + 2], []))
    raise ProtocolError(f"unknown worker command {command[:4]!r}")


def worker_sender(frames: list) -> tuple[bytes, Dialect] | None:
    """The sender and dialect of a message parse_at_broker refused that carries the worker header and
    a command (the broker answers it with DISCONNECT); None for any other message."""
    if len(frames) < 3:
        return None
    at = 1 if frames[1] else 2
    if len(frames) < at + 2 or frames[at] != WORKER_HEADER:
        return None
    return frames[0], _DIALECT_AT[at]  # type: ignore[return-value]  # at is 1 or 2


def parse_broker_command(frames: list) -> BrokerCommand:
    """A message a worker's DEALER received from the broker. Raises ProtocolError when it is not
    worker traffic or a REQUEST has no client address; a REQUEST whose envelope is broken comes back
    with no body frames, so the worker answers it with an error instead of leaving it unanswered."""
    if len(frames) < 2 or frames[0] != WORKER_HEADER:
        raise ProtocolError(f"not MDP/0.2 worker traffic ({len(frames)} frames)")
    command = frames[1]
    if command != MDPW.REQUEST:
        return _new(BrokerCommand, (command, b"", []))
    if len(frames) < 3:
        raise ProtocolError("a REQUEST without a client address")
    body = frames[4:] if len(frames) > 4 and frames[3] == b"" else []
    return _new(BrokerCommand, (command, frames[2], body))


def parse_client_reply(frames: list) -> ClientReply:
    """A message a client's DEALER received from the broker (RFC dialect); raises ProtocolError when it
    is not a PARTIAL or FINAL with a service."""
    if len(frames) < 3 or frames[0] != CLIENT_HEADER or frames[1] not in (MDPC.PARTIAL, MDPC.FINAL):
        raise ProtocolError(f"not an MDP/0.2 client reply ({len(frames)} frames)")
    return _new(ClientReply, (frames[1], frames[2], frames[3:]))


def client_request(service: bytes, body: list) -> list:
    """client -> broker: the frames of a REQUEST for `service` (RFC dialect; a DEALER sends no routing id)."""
    return [CLIENT_HEADER, MDPC.REQUEST, service, *body]


def client_reply(client: bytes, dialect: Dialect, service: bytes, body: list, final: bool = True) -> list:
    """broker -> client: the ROUTER frames of a reply to `client`, in the dialect that client spoke."""
    if dialect is Dialect.RFC:
        return [client, CLIENT_HEADER, MDPC.FINAL if final else MDPC.PARTIAL, service, *body]
    return [client, b"", CLIENT_HEADER, MAJORTOMO_CLIENT_FINAL if final else MAJORTOMO_CLIENT_PARTIAL, *body]


def broker_command(worker: bytes, dialect: Dialect, command: bytes, client: bytes | None = None,
                   body: list | tuple = ()) -> list:
    """broker -> worker: the ROUTER frames of `command` to `worker` in its dialect; a REQUEST carries the
    `client`'s address and the body frames, HEARTBEAT and DISCONNECT nothing."""
    if client is None:
        return [worker, WORKER_HEADER, command] if dialect is Dialect.RFC else [worker, b"", WORKER_HEADER, command]
    if dialect is Dialect.RFC:
        return [worker, WORKER_HEADER, command, client, b"", *body]
    return [worker, b"", WORKER_HEADER, command, client, b"", *body]


def worker_command(command: bytes, address: bytes | None = None, body: list | tuple = ()) -> list:
    """worker -> broker: the frames of `command` (RFC dialect; a DEALER sends no routing id). READY
    carries the service as `address`; PARTIAL and FINAL the client's address and the body frames."""
    if address is None:
        return [WORKER_HEADER, command]
    if command == MDPW.READY:
        return [WORKER_HEADER, command, address]
    return [WORKER_HEADER, command, address, b"", *body]


# ---------------------------------------------------------------------------------------------
# Tensors: msgpack extension type TENSOR_EXT, payload = header + raw C-contiguous bytes.
#   u8 len(dtype) | dtype as numpy's dtype.str (ASCII, e.g. "<f4") | u8 ndim | ndim x int64 LE | data
# Large tensors travel out of band: TENSOR_FRAME_EXT, payload = header + u32 LE index of the MDP
# body frame that holds the raw bytes. They are sent without copying (copy=False) and read with
# np.frombuffer over the received frame, so tensor bytes are never re-encoded on the way.

TENSOR_EXT = 1
TENSOR_FRAME_EXT = 2
OUT_OF_BAND_MIN_BYTES = 64 * 1024
MAX_NDIM = 32
_KINDS = frozenset("biufU")  # bool, signed, unsigned, float, unicode; never object or void
_DIMS = [struct.Struct(f"<{n}q") for n in range(MAX_NDIM + 1)]


_HEADS: dict[np.dtype, bytes] = {}   # dtype -> its header prefix (length byte + dtype string)
_DTYPES: dict[bytes, np.dtype] = {}  # dtype string on the wire -> checked dtype
_CACHE_MAX = 256                     # both caches: text dtypes vary in width, peers choose strings
_NDIM_DIMS = [struct.Struct(f"<B{n}q") for n in range(MAX_NDIM + 1)]
_new_tuple = tuple.__new__


def encode_tensor(array: np.ndarray) -> msgpack.ExtType:
    if array.dtype.kind == "O":
        array = array.astype(str)
    if array.dtype.kind not in _KINDS or array.ndim > MAX_NDIM:
        raise ProtocolError(f"cannot send a tensor of dtype {array.dtype} with {array.ndim} dims")
    # NOTE: tobytes() is C order whatever the layout, and for the small tensors sent inline a copy
    # costs less than building a memoryview over the array. The ExtType is made without its Python
    # __new__, whose checks (an int code in 0..127, bytes data) hold here by construction: 0.45 us less
    # per tensor, two per iris reply.
    return _new_tuple(msgpack.ExtType, (TENSOR_EXT, _header(array) + array.tobytes()))


def _header(array: np.ndarray) -> bytes:
    dtype = array.dtype
    head = _HEADS.get(dtype)
    if head is None:
        text = dtype.str.encode()
        head = bytes((len(text),)) + text
        if len(_HEADS) < _CACHE_MAX:
            _HEADS[dtype] = head
    ndim = array.ndim
    return head + _NDIM_DIMS[ndim].pack(ndim, *array.shape)


def _dtype(text: bytes) -> np.dtype:
    """The dtype a tensor header names, checked against the allowed kinds (cached)."""
    dtype = _DTYPES.get(text)
    if dtype is None:
        dtype = np.dtype(text.decode("ascii"))
        if dtype.kind not in _KINDS:
            raise ValueError(f"dtype {dtype} is not allowed")
        if len(_DTYPES) < _CACHE_MAX:
            _DTYPES[text] = dtype
    return dtype


def decode_tensor(data: bytes, frames: list | None = None) -> np.ndarray:
    """Rebuild a tensor over `data` (or, out of band, over one of `frames`) without copying.

    Raises ProtocolError on any inconsistency.
    """
    try:
        dlen = data[0]
        dtype = _dtype(data[1:1 + dlen])
        ndim = data[1 + dlen]
        if ndim > MAX_NDIM:
            raise ValueError(f"{ndim} dims is too many")
        offset = 2 + dlen + 8 * ndim
        shape = _DIMS[ndim].unpack_from(data, 2 + dlen)
        count = 1
        for dim in shape:
            if dim < 0:
                raise ValueError("negative dimension")
            count *= dim
        if frames is not None:  # out of band: the rest of the payload is the frame's index
            (index,) = struct.unpack_from("<I", data, offset)
            if len(data) != offset + 4 or not 1 <= index < len(frames):
                raise ValueError(f"no body frame {index} for an out-of-band tensor")
            data, offset = frames[index], 0
        if count * dtype.itemsize != len(data) - offset:
            raise ValueError(f"{len(data) - offset} data bytes for shape {list(shape)} of {dtype}")
        return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    except (IndexError, ValueError, TypeError, OverflowError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad tensor: {exc}") from None


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return encode_tensor(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot pack {type(obj).__name__}")


def pack(obj: Any) -> bytes:
    """One msgpack frame, every tensor inline (small control bodies, MMI answers)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def _out_of_band(frames: list) -> Any:
    """A msgpack `default` that moves tensors of OUT_OF_BAND_MIN_BYTES or more into `frames`."""
    def default(value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.nbytes >= OUT_OF_BAND_MIN_BYTES and value.dtype.kind in _KINDS:
            if not value.flags.c_contiguous:
                value = value.copy(order="C")
            frames.append(value.reshape(-1).view(np.uint8).data)
            return msgpack.ExtType(TENSOR_FRAME_EXT, _header(value) + struct.pack("<I", len(frames) - 1))
        return _default(value)
    return default


def pack_body(obj: Any) -> list:
    """Body frames: msgpack first, then the raw bytes of each tensor of OUT_OF_BAND_MIN_BYTES or more."""
    frames: list = [b""]
    frames[0] = msgpack.packb(obj, default=_out_of_band(frames), use_bin_type=True)
    return frames


def unpack(data: bytes) -> Any:
    """Decode a one-frame body; any malformed input raises ProtocolError, never something else."""
    return unpack_body([data])


def unpack_body(frames: list) -> Any:
    """Decode body frames (see pack_body); any malformed input raises ProtocolError."""
    def ext_hook(code: int, data: bytes) -> Any:
        if code == TENSOR_EXT:
            return decode_tensor(data)
        if code == TENSOR_FRAME_EXT:
            return decode_tensor(data, frames)
        raise ProtocolError(f"unknown msgpack extension type {code}")
    if not frames:
        raise ProtocolError("no body frame")
    try:
        return msgpack.unpackb(frames[0], ext_hook=ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(f"body is not msgpack: {exc.__class__.__name__}") from None


def unpack_request(frames: list) -> dict:
    body = unpack_body(frames)
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        raise ProtocolError("request body must be a map with a string 'op'")
    return body


# ---------------------------------------------------------------------------------------------
# Bodies (schema in docs/protocol.md)


# Operations a client may send again, under the same id, when its connection to the broker dropped
# while they were in flight (the broker restarted): they change nothing, so running one twice is
# harmless, and the client keeps only the first reply to an id. Every other operation (upload,
# describe, delete, load, unload) fails at once with BrokerLost (503) instead: it may have happened.
REPEATABLE_OPS = frozenset({"predict", "predict_image", "models", "information", "info", "repository",
                            "config", "echo", "status"})


def request_body(rid: int, op: str, fields: dict, deadline_ms: int | None = None) -> list:
    """Body frames of a request (one frame unless it carries large tensors), led by the routing header
    when `deadline_ms` (what is left of the caller's deadline) is given; raises BadInput for values
    msgpack cannot carry (integers beyond 64 bits, arbitrary objects)."""
    frames: list = [b""]
    try:
        packer = msgpack.Packer(default=_out_of_band(frames), use_bin_type=True)
        obj = {"id": rid, "op": op, **fields}
        frames[0] = packer.pack(obj) if deadline_ms is None else routed_request(packer, obj, deadline_ms)
        return frames
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInput(f"cannot encode the request: {exc}") from None


def ok_body(rid: Any, node: str, result: Any) -> list:
    return pack_body({"id": rid, "status": 200, "node": node, "result": result})


def error_body(rid: Any, node: str, error: FractalError) -> list:
    return [pack({"id": rid, "status": error.http_status, "node": node,
                  "error": {"type": error.__class__.__name__, "message": str(error)}})]


_STATUS_KEY = b"\xa6status"
# msgpack's lead byte -> bytes of the whole value, for the ids of fixed width: nil, bools, ints, floats
_ID_WIDTH = {0xc0: 1, 0xc2: 1, 0xc3: 1, 0xca: 5, 0xcb: 9, 0xcc: 2, 0xcd: 3, 0xce: 5, 0xcf: 9, 0xd0: 2, 0xd1: 3,
             0xd2: 5, 0xd3: 9}


def reply_status(first_frame: bytes) -> int | None:
    """The `status` of a reply whose first body frame is `first_frame`, read without decoding it: O(1).
    Our replies (ok_body, error_body, PackWriter.reply) are maps that start {"id": <id>, "status": <int>};
    None for any other body (another implementation's, or an id other than nil, a bool, a number or a
    string of up to 255 bytes). A pack's reply is 200 whatever its members' outcomes."""
    if len(first_frame) < 6 or first_frame[1:4] != _ID_KEY or not 0x80 <= first_frame[0] <= 0x8f:
        return None
    lead = first_frame[4]
    if lead < 0x80 or lead >= 0xe0:  # a fixint
        at = 5
    elif 0xa0 <= lead <= 0xbf:  # a fixstr
        at = 5 + (lead & 0x1f)
    elif lead == 0xd9:  # a str8
        at = 6 + first_frame[5]
    elif lead in _ID_WIDTH:
        at = 4 + _ID_WIDTH[lead]
    else:
        return None
    if first_frame[at:at + 7] != _STATUS_KEY:
        return None
    value = first_frame[at + 7:at + 10]
    if value[:1] == b"\xcc" and len(value) >= 2:
        return value[1]
    if value[:1] == b"\xcd" and len(value) == 3:
        return int.from_bytes(value[1:], "big")
    return value[0] if value and value[0] < 0x80 else None


def result_of(reply: dict) -> Any:
    """The result of a reply body, or the error it carries raised as its FractalError class."""
    if reply.get("status") == 200:
        return reply.get("result")
    error = reply.get("error")
    if not isinstance(error, dict):
        raise ProtocolError(f"reply with status {reply.get('status')!r} carries no error description")
    raise error_from_wire(str(error.get("type")), str(error.get("message", "")))


def request_id_of(body: bytes) -> Any:
    """Best-effort id of a request body, for error replies the broker writes itself."""
    try:
        decoded = msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=lambda c, d: None)
        return decoded.get("id") if isinstance(decoded, dict) else None
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Packs: several independent requests in one MDP REQUEST, answered by one FINAL (docs/protocol.md).
#   request: {"op": "pack", "n": <count>, "id": <pack id>, "requests": [<request map>, ...]}
#   reply:   {"id": <pack id>, "status": 200, "node": ..., "replies": [<reply map>, ...]} (same order)
# The request map starts with fixed bytes (PACK_PREFIX, then n as a big-endian uint16: valid msgpack),
# so the broker reads a message's request count without decoding its body (request_count).

PACK_MAX_REQUESTS = 64          # sub-requests in one pack
PACK_MAX_BYTES = 4 << 20        # body bytes of one pack, out-of-band frames included (one request may exceed it)
PACK_PREFIX = b"\x84\xa2op\xa4pack\xa1n\xcd"  # map of 4; "op": "pack"; "n": uint16 follows
_COUNT_AT = len(PACK_PREFIX)
_ID_KEY, _REQUESTS_KEY, _REPLIES_KEY = b"\xa2id", b"\xa8requests", b"\xa7replies"


def request_count(first_frame: bytes) -> int:
    """User requests in a message whose first body frame is `first_frame`: a pack's n, else 1. O(1)."""
    return route_of(first_frame)[2]


def _unrouted_count(first_frame: bytes) -> int:
    if first_frame.startswith(PACK_PREFIX) and len(first_frame) > _COUNT_AT + 1:
        return max(1, int.from_bytes(first_frame[_COUNT_AT:_COUNT_AT + 2], "big"))
    return 1


# ---------------------------------------------------------------------------------------------
# The routing header (docs/protocol.md, "Routing header"): the first entries of every request map our
# clients send, at fixed offsets, so the broker reads a message's model and deadline without decoding:
#   de <u16 entries>                        the map, always in its 16-bit form
#   ab "deadline_ms" ce <u32 big-endian>    milliseconds left of the caller's deadline when this hop sent it
#   a5 "model" d9 <u8 length> <name>        the model (UTF-8; "" for an op that names none), always str8
# then the map's other entries. A pack's map carries one too (its calls' one model, their latest
# deadline), followed by the pack's keys `op`, `n` as in PACK_PREFIX. A body without it is model "".

_DEADLINE_KEY = b"\xabdeadline_ms\xce"
_DEADLINE_AT = 3 + len(_DEADLINE_KEY)
_MODEL_KEY = b"\xa5model\xd9"
_MODEL_KEY_AT = _DEADLINE_AT + 4
_MODEL_AT = _MODEL_KEY_AT + len(_MODEL_KEY) + 1
_PACK_KEYS = PACK_PREFIX[1:]  # "op": "pack", "n": uint16 follows, without PACK_PREFIX's map byte
MAX_DEADLINE_MS = 0xFFFFFFFF
MAX_ROUTED_NAME_BYTES = 0xFF


def route_of(first_frame: bytes) -> tuple[bytes, int | None, int]:
    """(model, milliseconds left of its deadline or None, user requests) of a message whose first body
    frame is `first_frame`, read at fixed offsets: O(1). Without a routing header: (b"", None, 1)."""
    if (first_frame[:1] != b"\xde" or first_frame[3:_DEADLINE_AT] != _DEADLINE_KEY
            or first_frame[_MODEL_KEY_AT:_MODEL_AT - 1] != _MODEL_KEY or len(first_frame) < _MODEL_AT):
        return b"", None, _unrouted_count(first_frame)
    end = _MODEL_AT + first_frame[_MODEL_AT - 1]
    count = 1
    if first_frame[end:end + len(_PACK_KEYS)] == _PACK_KEYS:
        count = max(1, int.from_bytes(first_frame[end + len(_PACK_KEYS):end + len(_PACK_KEYS) + 2], "big"))
    return first_frame[_MODEL_AT:end], int.from_bytes(first_frame[_DEADLINE_AT:_MODEL_KEY_AT], "big"), count


def with_deadline(first_frame: bytes, deadline_ms: int) -> bytes:
    """`first_frame`, which route_of found a routing header in, with `deadline_ms` left (a copy)."""
    value = min(max(0, deadline_ms), MAX_DEADLINE_MS).to_bytes(4, "big")
    return b"".join((first_frame[:_DEADLINE_AT], value, first_frame[_MODEL_KEY_AT:]))


_HEAD = struct.Struct(f">BH{len(_DEADLINE_KEY)}sI{len(_MODEL_KEY)}sB")  # everything before the model's bytes


def _route_head(entries: int, model: bytes, deadline_ms: int) -> bytes:
    ms = deadline_ms if 0 <= deadline_ms <= MAX_DEADLINE_MS else min(max(0, int(deadline_ms)), MAX_DEADLINE_MS)
    return _HEAD.pack(0xDE, entries, _DEADLINE_KEY, ms, _MODEL_KEY, len(model)) + model


def _routed_model(obj: dict) -> bytes | None:
    """The header's model of a request map: its `model` as UTF-8 (b"" when it has none), or None when
    that cannot go in a header (not a string, or too long: the request is sent without one)."""
    model = obj.get("model", "")
    if model.__class__ is not str:
        return None
    try:
        name = model.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name if len(name) <= MAX_ROUTED_NAME_BYTES else None


def routed_request(packer: msgpack.Packer, obj: dict, deadline_ms: int) -> bytes:
    """`obj` (a request map) encoded with the routing header first; without one when its model cannot
    go in a header (the worker then refuses the name as it would anyway)."""
    return _routed(packer, obj, deadline_ms)[0]


def _routed(packer: msgpack.Packer, obj: dict, deadline_ms: int) -> tuple[bytes, bytes | None]:
    """routed_request's bytes, and the model in its header (None: sent without one)."""
    name = _routed_model(obj)
    if name is None:
        return packer.pack(obj), None
    rest = obj.copy()
    rest.pop("model", None)
    rest.pop("deadline_ms", None)
    body = packer.pack(rest)
    head = body[0]  # NOTE: strip the map's own header: the routing header opens a larger map
    skip = 1 if head & 0xF0 == 0x80 else 3 if head == 0xDE else 5
    return _route_head(len(rest) + 2, name, deadline_ms) + body[skip:], name


def deadline_of(request: dict, received_at: float, shift_ms: int = 0) -> float:
    """The monotonic time by which `request` (decoded, received at `received_at`) must be answered:
    its `deadline_ms` less `shift_ms` (a pack's time in the broker's queue, for its sub-requests), or
    infinity when it carries none."""
    remaining = request.get("deadline_ms")
    if remaining.__class__ is not int:
        return float("inf")
    return received_at + (remaining - shift_ms) / 1000


class PackWriter:
    """Encodes maps one at a time into the body of one message, sharing its out-of-band frames.

    `add` encodes at once, so a map msgpack cannot carry fails alone (BadInput) and the pack stays as
    it was; `size` is the body bytes so far, for the PACK_MAX_BYTES bound.
    """

    def __init__(self) -> None:
        self.frames: list = [b""]
        self.parts: list[bytes] = []
        self.size = 0
        self._packer = msgpack.Packer(default=_out_of_band(self.frames), use_bin_type=True)
        self._model: bytes | None = None  # the routing header of the pack: its requests' one model,
        self._deadline_ms = -1             # and their latest deadline; -1: no request with a header

    def add(self, obj: dict, max_bytes: int | None = None, deadline_ms: int | None = None) -> bool:
        """Encode `obj` into the pack (a request led by the routing header when `deadline_ms` is given);
        False (and the pack as it was) when it would take a non-empty pack past `max_bytes`. Raises
        BadInput for a map msgpack cannot carry."""
        mark = len(self.frames)
        try:
            part, name = (self._packer.pack(obj), None) if deadline_ms is None else \
                _routed(self._packer, obj, deadline_ms)
        except (TypeError, ValueError, OverflowError) as exc:
            del self.frames[mark:]
            raise BadInput(f"cannot encode the request: {exc}") from None
        size = len(part) + sum(len(f) for f in self.frames[mark:]) if len(self.frames) > mark else len(part)
        if max_bytes is not None and self.parts and self.size + size > max_bytes:
            del self.frames[mark:]
            return False
        self.parts.append(part)
        self.size += size
        if deadline_ms is not None:
            self._model = name if self._model is None or self._model == name else b""
            self._deadline_ms = max(self._deadline_ms, deadline_ms)
        return True

    def request(self, pack_id: int | None) -> list:
        """Body frames of the pack request; a lone map is sent as it is, an ordinary request. A pack of
        requests with routing headers gets one of its own (their model when they share one, else "")."""
        if len(self.parts) == 1:
            self.frames[0] = self.parts[0]
            return self.frames
        count = len(self.parts).to_bytes(2, "big")
        if self._deadline_ms >= 0:
            head = b"".join((_route_head(6, self._model or b"", self._deadline_ms), _PACK_KEYS, count))
        else:
            head = PACK_PREFIX + count
        self.frames[0] = b"".join((head, _ID_KEY, self._packer.pack(pack_id), _REQUESTS_KEY,
                                   self._packer.pack_array_header(len(self.parts)), *self.parts))
        return self.frames

    def reply(self, pack_id: Any, node: str) -> list:
        """Body frames of the reply to a pack: one FINAL, the replies in the pack's order."""
        self.frames[0] = b"".join((b"\x84", _ID_KEY, self._packer.pack(pack_id), self._packer.pack("status"),
                                   b"\xcc\xc8", self._packer.pack("node"), self._packer.pack(node), _REPLIES_KEY,
                                   self._packer.pack_array_header(len(self.parts)), *self.parts))
        return self.frames

    def add_reply(self, rid: Any, node: str, outcome: Any) -> None:
        """Add one sub-request's reply: its result, or the FractalError it failed with. A result that
        cannot be encoded becomes that sub-request's error alone."""
        if not isinstance(outcome, FractalError):
            try:
                self.add({"id": rid, "status": 200, "node": node, "result": outcome})
                return
            except BadInput as exc:
                outcome = InternalError(f"the reply could not be encoded on {node}: {exc}")
        self.add({"id": rid, "status": outcome.http_status, "node": node,
                  "error": {"type": outcome.__class__.__name__, "message": str(outcome)}})


def unpack_pack(request: dict) -> list:
    """The sub-requests of a decoded pack request; raises ProtocolError when it is malformed."""
    subs = request.get("requests")
    if not isinstance(subs, list) or request.get("n") != len(subs) or not subs:
        raise ProtocolError("a pack must carry 'requests', a non-empty list of 'n' request maps")
    return subs


def pack_results(reply: dict, count: int) -> list:
    """Each sub-request's outcome (its result, or its FractalError as a value) from the reply to a pack
    of `count`. A reply without `replies` (the broker's own error, or a peer that does not know packs)
    is an error for every sub-request: it is raised."""
    replies = reply.get("replies")
    if not isinstance(replies, list):
        result_of(reply)  # raises the error it carries
        raise ProtocolError("the reply to a pack carries no 'replies'")
    if len(replies) != count:
        raise ProtocolError(f"{len(replies)} replies to a pack of {count}")
    outcomes = []
    for sub in replies:
        try:
            outcomes.append(result_of(sub) if isinstance(sub, dict) else result_of({}))
        except FractalError as exc:
            outcomes.append(exc)
    return outcomes


# ---------------------------------------------------------------------------------------------
# Model names: plain file names ending in .onnx, the same rule wherever a name enters.

MAX_NAME_CHARS = 200  # bytes in UTF-8: well under every filesystem's 255-byte name limit
MODEL_SUFFIX = ".onnx"
MODEL_SUFFIX_BYTES = MODEL_SUFFIX.encode()
_CHECKED_NAMES: dict[str, str] = {}  # names that passed -> their file: a predict checks its name in O(1)


def model_file_name(name: Any) -> str:
    """The pool file a model name means: `iris` and `iris.onnx` both mean `iris.onnx`.

    The one name rule of every entry point (seed and v2 routes, the direct client, the CLI, the
    worker). Raises BadInput, quoting the name as sent, for a name that is no plain file name.
    """
    if name.__class__ is str:
        known = _CHECKED_NAMES.get(name)
        if known is not None:
            return known
    file = name + MODEL_SUFFIX if isinstance(name, str) and name and not name.endswith(MODEL_SUFFIX) else name
    if not _plain_file_name(file):
        raise BadInput(f"invalid model name {name!r}: use a plain file name such as iris.onnx or iris "
                       f"(no '/', no '..', not starting with '.')")
    if len(_CHECKED_NAMES) < 4096:
        _CHECKED_NAMES[name] = file
    return file


def check_model_name(name: Any) -> str:
    """`name` itself when it is a full model file name (`iris.onnx`); raises BadInput otherwise."""
    if not (isinstance(name, str) and name.endswith(MODEL_SUFFIX)):
        raise BadInput(f"invalid model name {name!r}: a model file name ends in .onnx")
    return model_file_name(name)


def _plain_file_name(name: Any) -> bool:
    return (isinstance(name, str) and name.endswith(MODEL_SUFFIX) and len(name) > len(MODEL_SUFFIX)
            and len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_CHARS and name.isprintable()
            and "/" not in name and "\\" not in name and not name.startswith(".") and ".." not in name)
