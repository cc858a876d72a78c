"""hivemind's ``ExpertRequest``/``ExpertResponse`` for large tensors, built and read without copying them.

Through the protobuf classes, a 512 KB tensor was copied seven times on its way into a frame
(``tobytes``, the ``Tensor``, reading its buffer to cut parts, each part, the message, its bytes, the
frame) and five times on its way out of one, each time into fresh memory, which page faults here:
~0.5 ms to build and ~0.4 ms to read, each done twice per node of a forward (the request and the
answer). A :class:`TensorMessage` holds its tensors' bytes as views: :meth:`framed` copies them once,
into the frame; :meth:`parse` reads a frame's bytes in place.

The bytes are protobuf's, so hivemind's P2P stubs and servers, and older FarMesh peers, read and
write them unchanged (a P2P stub calls ``SerializeToString``). Small messages, where the protobuf
classes are quicker, stay with them (``wire.parse_message`` chooses by size). The parser is flat:
the only nested message is ``Tensor``, whose fields are scalars. It raises :class:`MalformedMessage`
where the bytes break protobuf's wire format, and where a known field comes with another wire type
(which protobuf would keep as an unknown field).
"""

from dataclasses import dataclass, field

from hivemind.p2p import P2P

LARGE_BYTES = 64 * 1024  # tensors and messages from this size on travel, and are read, as TensorMessages

# Field numbers of runtime.proto: ExpertRequest {uid 1, tensors 2, metadata 3}, ExpertResponse
# {tensors 2, metadata 3}, Tensor {buffer 1, size 2 (packed uint32), requires_grad 3, dtype 4,
# compression 5, chunks 6}.
_TENSORS, _METADATA = 2, 3
_BUFFER, _SIZE, _REQUIRES_GRAD, _DTYPE, _COMPRESSION, _CHUNKS = 1, 2, 3, 4, 5, 6
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_UINT32_MAX = 2**32 - 1


class MalformedMessage(ValueError):
    """The bytes are not a valid message of the expected type."""


@dataclass
class TensorPart:
    """One ``Tensor`` of a message: its fields, with ``buffer`` a view of the bytes it travels in."""

    buffer: memoryview | bytes = b""
    size: list[int] = field(default_factory=list)
    dtype: str = ""
    compression: int = 0
    chunks: int = 0
    requires_grad: bool = False

    def _header(self) -> bytes:
        """Every field but the buffer, then the buffer's key and length (its bytes follow)."""
        out = bytearray()
        if self.size:
            packed = b"".join(_varint(dim) for dim in self.size)
            out += _key(_SIZE, _LENGTH) + _varint(len(packed)) + packed
        if self.requires_grad:
            out += _key(_REQUIRES_GRAD, _VARINT) + b"\x01"
        if self.dtype:
            dtype = self.dtype.encode()
            out += _key(_DTYPE, _LENGTH) + _varint(len(dtype)) + dtype
        if self.compression:
            out += _key(_COMPRESSION, _VARINT) + _varint(self.compression)
        if self.chunks:
            out += _key(_CHUNKS, _VARINT) + _varint(self.chunks)
        return bytes(out + _key(_BUFFER, _LENGTH) + _varint(len(self.buffer)))


@dataclass
class TensorMessage:
    """An ``ExpertRequest`` or ``ExpertResponse`` (the same fields but the request's unused ``uid``)."""

    tensors: list[TensorPart] = field(default_factory=list)
    metadata: bytes = b""

    def _pieces(self) -> list[memoryview | bytes]:
        pieces: list[memoryview | bytes] = []
        for part in self.tensors:
            header = part._header()
            pieces += [_key(_TENSORS, _LENGTH) + _varint(len(header) + len(part.buffer)) + header, part.buffer]
        if self.metadata:
            pieces.append(_key(_METADATA, _LENGTH) + _varint(len(self.metadata)) + self.metadata)
        return pieces

    def ByteSize(self) -> int:  # noqa: N802 (protobuf's name)
        return sum(len(piece) for piece in self._pieces())

    def SerializeToString(self) -> bytes:  # noqa: N802 (the protobuf classes' name, which hivemind calls)
        return b"".join(self._pieces())

    def framed(self) -> bytes:
        """The message in hivemind's stream framing (see ``wire.frame``), its buffers copied once."""
        pieces = self._pieces()
        length = sum(len(piece) for piece in pieces)  # ByteSize without building the pieces twice
        return b"".join([P2P.MESSAGE_MARKER + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER), *pieces])

    @classmethod
    def parse(cls, data: bytes) -> "TensorMessage":
        """Read ``data`` (protobuf bytes of either message type); each buffer is a view of ``data``."""
        view, message = memoryview(data), cls()
        for number, value in _fields(view, 0, len(view)):
            if number == _TENSORS:
                message.tensors.append(_tensor(view, *_span(number, value)))
            elif number == _METADATA:
                start, end = _span(number, value)
                message.metadata = bytes(view[start:end])
        return message


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(view: memoryview, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while i < end:
        byte = view[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift >= 64:
            raise MalformedMessage("a varint is longer than 10 bytes")
    raise MalformedMessage("the message ends inside a varint")


def _fields(view: memoryview, i: int, end: int):
    """(field number, value) of each field in ``view[i:end]``: an int for varints, a (start, end)
    span for length-delimited fields; fixed-size fields are skipped."""
    while i < end:
        key, i = _read_varint(view, i, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise MalformedMessage("field number 0")
        if wire_type == _VARINT:
            value, i = _read_varint(view, i, end)
            yield number, value
        elif wire_type == _LENGTH:
            length, i = _read_varint(view, i, end)
            if length > end - i:
                raise MalformedMessage("a field is longer than the message")
            yield number, (i, i + length)
            i += length
        elif wire_type in (_FIXED64, _FIXED32):
            i += 8 if wire_type == _FIXED64 else 4
            if i > end:
                raise MalformedMessage("the message ends inside a field")
        else:
            raise MalformedMessage(f"wire type {wire_type} is not used by these messages")


def _span(number: int, value) -> tuple[int, int]:
    if not isinstance(value, tuple):
        raise MalformedMessage(f"field {number} must be length-delimited")
    return value


def _scalar(number: int, value) -> int:
    if isinstance(value, tuple):
        raise MalformedMessage(f"field {number} must be a varint")
    return value


def _int32(value: int) -> int:
    """A varint read as protobuf's int32 (negative numbers travel as 64-bit two's complement)."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value > 0x7FFFFFFF else value


def _tensor(view: memoryview, start: int, end: int) -> TensorPart:
    part = TensorPart()
    for number, value in _fields(view, start, end):
        if number == _BUFFER:
            first, last = _span(number, value)
            part.buffer = view[first:last]
        elif number == _SIZE:
            if isinstance(value, tuple):  # packed, as protobuf writes it
                i, last = value
                while i < last:
                    dim, i = _read_varint(view, i, last)
                    part.size.append(dim)
            else:
                part.size.append(value)
        elif number == _DTYPE:
            first, last = _span(number, value)
            try:
                part.dtype = str(view[first:last], "utf-8")
            except UnicodeDecodeError:
                raise MalformedMessage("the dtype is not UTF-8") from None
        elif number == _REQUIRES_GRAD:
            part.requires_grad = bool(_scalar(number, value))
        elif number == _COMPRESSION:
            part.compression = _int32(_scalar(number, value))
        elif number == _CHUNKS:
            part.chunks = _int32(_scalar(number, value))
    if any(dim > _UINT32_MAX for dim in part.size):
        raise MalformedMessage("a dimension exceeds uint32")
    return part
