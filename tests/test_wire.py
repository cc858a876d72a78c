"""The wire format between clients and Far Nodes: tensors as checked raw buffers, metadata as
pydantic-validated JSON, large tensors split into chunks."""

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from farmesh_core.errors import RequestError
from farmesh_core.wire import (
    CHUNK_BYTES,
    MAX_METADATA_BYTES,
    ErrorReply,
    InferenceStep,
    OpenSession,
    SpanCall,
    all_finite,
    chunked_messages,
    decode_meta,
    deserialize_tensor,
    encode_meta,
    raise_if_error,
    receive_chunked,
    serialize_tensor,
)


def tensor_proto(dtype: str = "float32", size=(1, 2, 4), buffer: bytes | None = None, **fields) -> runtime_pb2.Tensor:
    numel = 1
    for dim in size:
        numel *= dim
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 8)
    return runtime_pb2.Tensor(
        buffer=bytes(numel * itemsize) if buffer is None else buffer, size=size, dtype=dtype, **fields
    )


def receive(messages, meta_type=SpanCall, max_bytes=64 * 1024 * 1024, max_tensors=1):
    async def stream():
        for item in messages:
            yield item

    return asyncio.run(receive_chunked(stream(), meta_type, max_bytes, max_tensors))


# ---- tensors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_round_trip_is_exact(dtype):
    """float32, float16 and bfloat16 tensors come back bit for bit, with shape and dtype."""
    tensor = (torch.randn(2, 3, 5) * 100).to(dtype)
    proto = serialize_tensor(tensor)
    assert proto.dtype == str(dtype).removeprefix("torch.")
    assert list(proto.size) == [2, 3, 5]
    assert len(proto.buffer) == tensor.numel() * tensor.element_size()
    back = deserialize_tensor(proto)
    assert back.dtype == dtype and back.shape == tensor.shape
    bits = {4: torch.int32, 2: torch.int16}[tensor.element_size()]
    assert torch.equal(back.view(bits), tensor.view(bits))


def test_non_contiguous_tensor_round_trip():
    """A transposed (non-contiguous) tensor is sent in its logical order."""
    tensor = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).transpose(1, 2)
    assert torch.equal(deserialize_tensor(serialize_tensor(tensor)), tensor)


def test_empty_tensor_round_trip():
    """A tensor with a zero dimension round-trips to an empty tensor of the same shape."""
    back = deserialize_tensor(serialize_tensor(torch.empty(1, 0, 8)))
    assert back.shape == (1, 0, 8)


def test_serialize_refuses_other_dtypes():
    """Only float32, float16 and bfloat16 may be sent; the error lists them."""
    with pytest.raises(TypeError, match="cannot send torch.int64; allowed: float32, float16, bfloat16"):
        serialize_tensor(torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", ["int64", "float64", "uint8", "", "float99"])
def test_deserialize_refuses_other_dtypes(dtype):
    """A dtype outside the allowed set is refused by name."""
    with pytest.raises(RequestError, match=f"tensor dtype '{dtype}' is not allowed"):
        deserialize_tensor(tensor_proto(dtype))


@pytest.mark.parametrize("size", [(), (1, 1, 1, 1, 2)])
def test_deserialize_refuses_rank_0_and_rank_5(size):
    """Rank 1 to 4 only."""
    with pytest.raises(RequestError, match=f"tensor of rank {len(size)} is not allowed"):
        deserialize_tensor(tensor_proto(size=size))


@pytest.mark.parametrize("nbytes", [0, 31, 33, 64])
def test_deserialize_refuses_buffer_not_matching_shape(nbytes):
    """The buffer must hold exactly shape x itemsize bytes (here [1, 2, 4] float32: 32 bytes)."""
    with pytest.raises(RequestError, match=f"tensor buffer has {nbytes} bytes, shape \\[1, 2, 4\\] needs 32"):
        deserialize_tensor(tensor_proto(buffer=bytes(nbytes)))


def test_deserialize_refuses_oversize_before_allocating():
    """A declared shape over ``max_numel`` is refused from the header alone (the buffer is empty here)."""
    with pytest.raises(RequestError, match=r"shape \[1, 100000, 4096\] exceeds the limit of 1000 elements"):
        deserialize_tensor(tensor_proto(size=(1, 100_000, 4096), buffer=b""), max_numel=1000)


def test_deserialize_accepts_exactly_max_numel():
    """``max_numel`` itself is allowed."""
    assert deserialize_tensor(tensor_proto(size=(10, 100)), max_numel=1000).numel() == 1000


def test_deserialize_refuses_compressed_tensors():
    """Compressed payloads (which hivemind would decode) are not accepted from the network."""
    proto = tensor_proto(compression=runtime_pb2.CompressionType.FLOAT16)
    with pytest.raises(RequestError, match="compressed tensors are not accepted"):
        deserialize_tensor(proto)


# ---- metadata ------------------------------------------------------------------------------------
def test_metadata_round_trip():
    """Messages survive encode/decode unchanged."""
    step = InferenceStep(position=3, open=OpenSession(session_id="s", start=0, end=4, max_length=16, batch_size=2))
    assert decode_meta(encode_meta(step), InferenceStep) == step


@pytest.mark.parametrize(
    "raw, field",
    [
        (b'{"position": -1}', "position"),
        (b'{"position": "three"}', "position"),
        (b"{}", "position"),
        (b'{"position": 0, "open": {"start": 0, "end": 4, "max_length": 8, "batch_size": 1}}', "open.session_id"),
        (
            b'{"position": 0, "open": {"session_id": "s", "start": 0, "end": 4, "max_length": 0, "batch_size": 1}}',
            "open.max_length",
        ),  # fmt: skip
        (b'{"position": 0, "surprise": 1}', "surprise"),
    ],
)
def test_decode_meta_errors_name_the_field(raw, field):
    """A schema violation names the offending field (nested fields with dots)."""
    with pytest.raises(RequestError, match=rf"invalid InferenceStep: .*\b{field}: "):
        decode_meta(raw, InferenceStep)


@pytest.mark.parametrize("raw", [b"", b"\x00\xff", b"{not json", b"[1, 2]", b"null"])
def test_decode_meta_refuses_what_is_not_a_json_object(raw):
    """Garbage bytes are a clear RequestError, never an exception from the parser."""
    with pytest.raises(RequestError, match="invalid InferenceStep"):
        decode_meta(raw, InferenceStep)


def test_decode_meta_refuses_oversize_metadata_before_parsing():
    """Metadata over MAX_METADATA_BYTES is refused by its size."""
    raw = b'{"position": 0, "pad": "' + b"x" * MAX_METADATA_BYTES + b'"}'
    with pytest.raises(RequestError, match=f"metadata of {len(raw)} bytes exceeds the limit of {MAX_METADATA_BYTES}"):
        decode_meta(raw, InferenceStep)


def test_error_reply_becomes_request_error():
    """A response with metadata is a refusal: the client raises RequestError with the node's reason."""
    response = runtime_pb2.ExpertResponse(metadata=encode_meta(ErrorReply(error="layers 9:10 are not served")))
    with pytest.raises(RequestError, match="node QmPeer refused the request: layers 9:10 are not served"):
        raise_if_error(response, "QmPeer")
    raise_if_error(runtime_pb2.ExpertResponse(tensors=[serialize_tensor(torch.zeros(1))]), "QmPeer")


# ---- chunked streams -----------------------------------------------------------------------------
def test_chunked_round_trip_of_a_3mb_tensor():
    """A 3 MiB tensor travels as 3 messages of at most CHUNK_BYTES; metadata rides on the first only."""
    tensor = torch.randn(1, 3072, 256)
    meta = SpanCall(start=0, end=4)
    messages = list(chunked_messages(meta, [tensor]))
    assert len(messages) == 3
    assert all(len(m.tensors) == 1 and len(m.tensors[0].buffer) <= CHUNK_BYTES for m in messages)
    assert messages[0].metadata and not messages[1].metadata and not messages[2].metadata
    assert messages[0].tensors[0].chunks == 3
    got_meta, (proto,) = receive(messages)
    assert got_meta == meta
    assert torch.equal(deserialize_tensor(proto), tensor)


def test_chunked_round_trip_of_several_tensors():
    """Several tensors, each in its own parts, come back in order."""
    tensors = [torch.randn(1, 2048, 256), torch.randn(2, 3, 256)]
    meta, protos = receive(chunked_messages(SpanCall(start=1, end=2), tensors), max_tensors=2)
    assert [deserialize_tensor(p).shape for p in protos] == [t.shape for t in tensors]
    assert all(torch.equal(deserialize_tensor(p), t) for p, t in zip(protos, tensors, strict=True))


def test_receive_chunked_refuses_over_max_bytes():
    """Reassembly stops with an error once the stream carries more than ``max_bytes``."""
    messages = chunked_messages(SpanCall(start=0, end=4), [torch.randn(1, 3072, 256)])
    with pytest.raises(RequestError, match=f"request exceeds the limit of {2 * CHUNK_BYTES} bytes"):
        receive(messages, max_bytes=2 * CHUNK_BYTES)


def test_receive_chunked_refuses_too_many_tensors():
    """A stream with more tensors than expected is refused, not silently truncated."""
    messages = chunked_messages(SpanCall(start=0, end=4), [torch.randn(1, 2, 8), torch.randn(1, 2, 8)])
    with pytest.raises(RequestError, match="too many tensors"):
        receive(messages, max_tensors=1)


def test_receive_chunked_refuses_a_stream_that_ends_early():
    """Missing parts, or no tensor at all, are an error."""
    messages = list(chunked_messages(SpanCall(start=0, end=4), [torch.randn(1, 3072, 256)]))
    with pytest.raises(RequestError, match="the stream ended early"):
        receive(messages[:2])
    with pytest.raises(RequestError, match="the stream ended early"):
        receive([])


def test_receive_chunked_refuses_a_part_without_a_count():
    """The first part of each tensor must say how many parts it has."""
    message = runtime_pb2.ExpertRequest(metadata=encode_meta(SpanCall(start=0, end=4)), tensors=[tensor_proto()])
    with pytest.raises(RequestError, match="must say how many parts it has"):
        receive([message])


def test_receive_chunked_turns_an_error_reply_into_request_error():
    """Without a metadata type (a client reading responses), metadata means the node refused."""
    refusal = runtime_pb2.ExpertResponse(metadata=encode_meta(ErrorReply(error="bad shape")))
    with pytest.raises(RequestError, match="bad shape"):
        receive([refusal], meta_type=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_agrees_with_torch(dtype):
    info = torch.finfo(dtype)
    edges = torch.tensor([0.0, -0.0, info.max, -info.max, info.tiny, info.tiny / 4, info.eps], dtype=dtype)
    assert all_finite(deserialize_tensor(serialize_tensor(edges)))
    for bad in (float("inf"), float("-inf"), float("nan")):
        for index in (0, 5, 1023):
            values = torch.randn(1024, dtype=dtype) * 100
            values[index] = bad
            assert torch.isfinite(values).all().item() is False
            assert not all_finite(deserialize_tensor(serialize_tensor(values.view(4, 16, 16))))
            assert not all_finite(values.view(4, 16, 16).transpose(0, 2))  # any strides
    assert all_finite(deserialize_tensor(serialize_tensor(torch.randn(2, 3, 8, dtype=dtype))))
    assert all_finite(torch.full((4, 128, 4096), info.max, dtype=dtype))  # (a sum past the dtype's range)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_deserialize_copy_owns_the_same_values(dtype):
    tensor = torch.randn(2, 3, 4).to(dtype)
    proto = serialize_tensor(tensor)
    copied = deserialize_tensor(proto, copy=True)
    assert copied.dtype == dtype and torch.equal(copied, tensor) and copied.is_contiguous()
    copied.zero_()  # writable, and the message keeps its bytes
    assert torch.equal(deserialize_tensor(proto), tensor)
