"""The wire: tensor round trips for every dtype ONNX Runtime takes, and refusal of malformed bodies."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from broker import protocol as p
from broker.errors import BadInput, ModelNotFound, ProtocolError, Timeout

ORT_INPUT_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                    "float16", "float32", "float64"]


@pytest.mark.parametrize("dtype", ORT_INPUT_DTYPES)
def test_tensor_round_trip_keeps_dtype_shape_and_values(dtype):
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    back = p.unpack(p.pack({"t": array}))["t"]
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_string_tensors_round_trip_from_unicode_and_object_arrays():
    for array in (np.array(["ab", "ünï"]), np.array(["ab", "ünï"], dtype=object)):
        back = p.unpack(p.pack(array))
        assert back.tolist() == ["ab", "ünï"]


@pytest.mark.parametrize("array", [np.array(2.5), np.zeros((0, 4), np.float32),
                                   np.arange(12, dtype=np.int32).reshape(3, 4).T])
def test_scalars_empty_and_non_contiguous_tensors(array):
    back = p.unpack(p.pack(array))
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_decoded_tensor_shares_the_received_buffer():
    payload = p.pack(np.arange(1000, dtype=np.float64))
    back = p.unpack(payload)
    assert not back.flags.owndata  # a view over the ext bytes, not a copy


def _ext(payload: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(p.TENSOR_EXT, payload))


@pytest.mark.parametrize("payload", [
    b"",                                                   # nothing
    b"\x03<f4\x01" + (4).to_bytes(8, "little") + b"\0" * 15,  # one byte short
    b"\x03|O8\x01" + (1).to_bytes(8, "little") + b"\0" * 8,   # object dtype: refused
    b"\x03<f4\x01" + (-1).to_bytes(8, "little", signed=True),  # negative dimension
    b"\x03zz9\x00",                                        # not a dtype
    b"\x03<f4\xff",                                        # absurd rank
])
def test_malformed_tensors_raise_protocol_error(payload):
    with pytest.raises(ProtocolError):
        p.unpack(_ext(payload))


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", msgpack.packb(msgpack.ExtType(9, b"x"))])
def test_garbage_bodies_raise_protocol_error(data):
    with pytest.raises(ProtocolError):
        p.unpack(data)


def test_request_body_needs_an_op():
    with pytest.raises(ProtocolError):
        p.unpack_request(p.pack({"id": 1}))
    assert p.unpack_request(p.request_body(7, "models", {}))["op"] == "models"


def test_error_replies_rebuild_the_same_error_class():
    reply = p.unpack_body(p.error_body(3, "node-1", ModelNotFound("model x.onnx not found")))
    assert reply["status"] == 404 and reply["node"] == "node-1"
    with pytest.raises(ModelNotFound, match="x.onnx"):
        p.result_of(reply)


@pytest.mark.parametrize("name", ["iris.onnx", "my-model_v2.onnx", "a.b.onnx"])
def test_plain_onnx_file_names_are_accepted(name):
    assert p.check_model_name(name) == name


@pytest.mark.parametrize("name", ["../iris.onnx", "a/b.onnx", "iris", ".onnx", ".hidden.onnx",
                                  "x..onnx", "a\\b.onnx", "n\x00.onnx", 5, None, "x" * 300 + ".onnx",
                                  "a\ninjected line.onnx", "tab\t.onnx", "é" * 100 + ".onnx"])
def test_other_model_names_are_bad_input(name):
    with pytest.raises(BadInput):
        p.check_model_name(name)


def test_large_tensors_travel_out_of_band_and_come_back_as_views():
    big = np.arange(50_000, dtype=np.float32).reshape(500, 100)  # 200 kB: over the out-of-band minimum
    small = np.arange(4, dtype=np.int64)
    frames = p.request_body(1, "predict", {"inputs": {"big": big, "small": small, "t": big.T}})
    assert len(frames) == 3 and len(frames[0]) < 400  # msgpack header, then two raw tensor frames
    received = [bytes(f) for f in frames]  # what a socket hands the receiver
    body = p.unpack_request(received)
    np.testing.assert_array_equal(body["inputs"]["big"], big)
    np.testing.assert_array_equal(body["inputs"]["t"], big.T)
    np.testing.assert_array_equal(body["inputs"]["small"], small)
    assert not body["inputs"]["big"].flags.owndata  # a view over the received frame


@pytest.mark.parametrize("index", [0, 3, 2**31])
def test_out_of_band_references_to_missing_frames_are_refused(index):
    header = b"\x03<f4\x01" + (4).to_bytes(8, "little") + index.to_bytes(4, "little")
    frames = [msgpack.packb(msgpack.ExtType(p.TENSOR_FRAME_EXT, header)), b"\0" * 16]
    with pytest.raises(ProtocolError):
        p.unpack_body(frames)


@pytest.mark.parametrize("rid", [None, 0, 127, 128, 300, 70_000, 2**40, -1, -200, "", "abc", "x" * 40, "é" * 100,
                                 True, 1.5])
def test_a_replys_status_is_read_without_decoding_it(rid):
    assert p.reply_status(p.ok_body(rid, "node-1", {"values": [1]})[0]) == 200
    assert p.reply_status(p.error_body(rid, "node-1", Timeout("dropped unrun"))[0]) == 504
    assert p.reply_status(p.error_body(rid, "node-1", BadInput("no"))[0]) == 400
    writer = p.PackWriter()  # a pack's reply is 200 whatever its members' outcomes
    writer.add_reply(1, "node-1", Timeout("dropped unrun"))
    assert p.reply_status(writer.reply(rid, "node-1")[0]) == 200


@pytest.mark.parametrize("body", [b"", b"\x84", b"\x84\xa2id", b"\x84\xa2id\xd9", b"\x84\xa2id\xd9\xff", b"200",
                                  b"\x84\xa2id\x01\xa6status", b"\x84\xa2id\x01\xa6status\xcd\x01",
                                  b"\x84\xa2id\x91\x01\xa6status\xcc\xc8",  # an id that is a list
                                  msgpack.packb({"status": 504, "id": 1}), msgpack.packb([1, 504]), b"\xff" * 20])
def test_a_body_whose_status_cannot_be_read_at_its_place_has_none(body):
    assert p.reply_status(body) is None  # e.g. another implementation's worker: the broker times it as before
