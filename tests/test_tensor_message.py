"""TensorMessage: protobuf's bytes for ExpertRequest/ExpertResponse, built and read without copying
tensors; the protobuf classes must read what it writes, and it must read what they write."""

import random

import pytest
import torch
from google.protobuf.message import DecodeError
from hivemind.proto import runtime_pb2

from farmesh_core.tensor_message import LARGE_BYTES, MalformedMessage, TensorMessage, TensorPart
from farmesh_core.wire import (
    SpanCall,
    StreamProtocolError,
    chunked_messages,
    deserialize_tensor,
    encode_meta,
    frame,
    parse_message,
    serialize_tensor,
)


def fields(message) -> list:
    """What a message says, the same way for protobuf objects and TensorMessages."""
    return [
        bytes(message.metadata),
        [(bytes(t.buffer), list(t.size), t.dtype, t.compression, t.chunks, t.requires_grad) for t in message.tensors],
    ]


@pytest.mark.parametrize("message_type", [runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_protobuf_reads_what_tensor_message_writes(message_type, dtype):
    tensor = torch.randn(3, 700, 256).to(dtype)  # 2.1 or 1.05 MiB: several parts
    messages = list(chunked_messages(SpanCall(start=1, end=3), [tensor, torch.randn(1, 2, 8)]))
    assert all(isinstance(m, TensorMessage) for m in messages)
    for message in messages:
        assert fields(message_type.FromString(message.SerializeToString())) == fields(message)
        assert message.framed() == frame(message.SerializeToString())
    parts = [message_type.FromString(m.SerializeToString()).tensors[0] for m in messages]
    assert parts[0].chunks == len(parts) - 1 and list(parts[0].size) == [3, 700, 256]
    joined = runtime_pb2.Tensor(buffer=b"".join(p.buffer for p in parts[:-1]), size=parts[0].size, dtype=parts[0].dtype)
    assert torch.equal(deserialize_tensor(joined), tensor)


def test_tensor_message_reads_what_protobuf_writes_in_place():
    """Every field, sizes packed or not, the request's uid and unknown fields skipped; the buffer is a
    view of the bytes read."""
    data = torch.randn(2, 40, 256).numpy().tobytes()
    tensor = runtime_pb2.Tensor(
        buffer=data, size=[2, 40, 256], dtype="float32", requires_grad=True, compression=2, chunks=1
    )
    request = runtime_pb2.ExpertRequest(uid="layers", tensors=[tensor, serialize_tensor(torch.ones(3))], metadata=b"{}")
    data = request.SerializeToString()
    message = TensorMessage.parse(data)
    assert fields(message) == fields(request)
    assert message.tensors[0].buffer.obj is data

    unpacked = bytes([0x10, 2, 0x10, 40, 0x10, 0])  # size as three varint fields (field 2, wire type 0)
    unknown = bytes([0x38, 5, 0x45, 1, 2, 3, 4, 0x49, *range(8)])  # varint, fixed32, fixed64 fields 7, 8, 9
    part = TensorMessage.parse(b"\x12" + bytes([len(unpacked) + len(unknown)]) + unpacked + unknown).tensors[0]
    assert part.size == [2, 40, 0] and bytes(part.buffer) == b""


def test_negative_part_counts_read_as_protobuf_reads_them():
    """int32 fields travel as 64-bit two's complement: -1 must read as -1, as protobuf reads it."""
    tensor = runtime_pb2.Tensor(buffer=b"x" * LARGE_BYTES, chunks=-1, dtype="float32")
    data = runtime_pb2.ExpertRequest(tensors=[tensor]).SerializeToString()
    assert (
        TensorMessage.parse(data).tensors[0].chunks
        == -1
        == runtime_pb2.ExpertRequest.FromString(data).tensors[0].chunks
    )


def test_parse_message_reads_large_messages_in_place_and_small_ones_through_protobuf():
    small = runtime_pb2.ExpertRequest(tensors=[serialize_tensor(torch.randn(1, 1, 256))]).SerializeToString()
    large = TensorMessage(tensors=[TensorPart(buffer=bytes(LARGE_BYTES), size=[LARGE_BYTES // 4], dtype="float32")])
    assert isinstance(parse_message(small, runtime_pb2.ExpertRequest), runtime_pb2.ExpertRequest)
    parsed = parse_message(large.SerializeToString(), runtime_pb2.ExpertRequest)
    assert isinstance(parsed, TensorMessage) and fields(parsed) == fields(large)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


MALFORMED = {
    "a varint cut short": b"\x12\x80",
    "a varint of 11 bytes": b"\x18" + b"\xff" * 10 + b"\x01",
    "a field longer than the message": b"\x12\x7f\x0a\x01",
    "field number 0": b"\x00\x01",
    "a group (wire type 3)": b"\x13",
    "a fixed64 cut short": b"\x19\x01\x02",
    "tensors as a varint": b"\x10\x05",
    "metadata as a varint": b"\x18\x05",
    "a buffer as a varint": _length_delimited(2, b"\x08\x05"),
    "a dtype that is not UTF-8": _length_delimited(2, _length_delimited(4, b"\xff\xfe")),
    "chunks as a length": _length_delimited(2, _length_delimited(6, b"\x01")),
    "a dimension over uint32": _length_delimited(2, b"\x10\x80\x80\x80\x80\x10"),
    "a tensor cut inside its buffer": b"\x12\x04\x0a\x09abc",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_messages_are_refused(data):
    with pytest.raises(MalformedMessage):
        TensorMessage.parse(data)
    with pytest.raises(StreamProtocolError, match="not a valid protobuf"):
        parse_message(_large(data), runtime_pb2.ExpertRequest)


def _large(data: bytes) -> bytes:
    """``data`` behind a valid metadata field that makes the message large enough for TensorMessage."""
    return TensorMessage(metadata=b"{}" + b" " * LARGE_BYTES).SerializeToString() + data


def test_garbage_of_any_length_is_refused_as_a_protocol_error():
    for garbage in [b"\xff" * 10, b"\xff" * (2 * LARGE_BYTES)]:
        with pytest.raises(StreamProtocolError, match="not a valid protobuf"):
            parse_message(garbage, runtime_pb2.ExpertRequest)


def test_chunked_messages_send_views_of_contiguous_tensors_and_copies_of_others():
    tensor = torch.randn(4, 8, 16)
    (message,) = chunked_messages(None, [tensor])
    tensor.add_(1)  # a view of the tensor: it must be sent before the tensor changes, as chunked_messages says
    assert bytes(message.tensors[0].buffer) == tensor.numpy().tobytes()
    transposed = torch.randn(16, 8).t()
    (message,) = chunked_messages(None, [transposed])
    assert bytes(message.tensors[0].buffer) == transposed.contiguous().numpy().tobytes()
    assert list(message.tensors[0].size) == [8, 16]


def test_metadata_rides_on_the_first_message_only():
    meta = SpanCall(start=0, end=4)
    messages = list(chunked_messages(meta, [torch.randn(1, 1100, 256)]))
    assert [m.metadata for m in messages] == [encode_meta(meta), b""]


def test_mutated_messages_read_as_protobuf_reads_them_or_are_refused():
    """Random byte changes and cuts of a valid request: where protobuf and TensorMessage both read the
    bytes, they read the same fields; TensorMessage never reads what protobuf refuses as malformed,
    but for the request's ``uid`` (unused, not checked for UTF-8)."""
    rng = random.Random(0)
    tensor = runtime_pb2.Tensor(buffer=bytes(range(256)) * 4, size=[1, 4, 64], dtype="float32", chunks=1)
    valid = runtime_pb2.ExpertRequest(uid="u", metadata=b'{"start":0}', tensors=[tensor]).SerializeToString()
    outcomes = {"both read": 0, "both refused": 0}
    for _ in range(3000):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data if rng.random() < 0.8 else data[: rng.randrange(len(data))])
        try:
            ours = TensorMessage.parse(data)
        except MalformedMessage:
            ours = None
        try:
            theirs = runtime_pb2.ExpertRequest.FromString(data)
        except DecodeError as e:
            assert ours is None or "UTF-8" in str(e), data.hex()
            outcomes["both refused"] += ours is None
            continue
        if ours is not None:
            assert fields(ours) == fields(theirs), data.hex()
            outcomes["both read"] += 1
    assert min(outcomes.values()) > 100  # the mutations hit both kinds of outcome
