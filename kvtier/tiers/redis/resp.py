"""Layer 3: a redis-py command packer that sends large values without copying them.

Used by the Redis tier: a chunk's header and its payload (a view of the
memory tier's slot) go out as separate socket writes of one RESP bulk string.
"""

from __future__ import annotations

from typing import Any, Sequence


class Concat:
    """Buffers sent back to back as one RESP bulk string (a value) by :class:`RespPacker`."""

    __slots__ = ("buffers", "nbytes")

    def __init__(self, buffers: Sequence[bytes | memoryview]) -> None:
        self.buffers = [memoryview(b).cast("B") for b in buffers]
        self.nbytes = sum(b.nbytes for b in self.buffers)


class RespPacker:
    """redis-py command packer that never copies large values.

    redis-py's packers join (hiredis) or convert (memoryviews to bytes) values;
    for 3 MiB chunks that copy costs as much as the send. Here a
    :class:`Concat` or memoryview argument becomes its own entries of the output
    list, which the connection hands to ``sendall`` one by one.
    """

    _LARGE = 16 * 1024  # smaller values are cheaper to join than to send apart

    def pack(self, *args: Any) -> list[bytes | memoryview]:
        """RESP array of bulk strings, as a list of buffers to send in order."""
        if isinstance(args[0], (str, bytes)) and " " in str(args[0]):  # "CLIENT SETINFO"
            args = (*args[0].split(), *args[1:])
        out: list[bytes | memoryview] = []
        pending = [b"*%d\r\n" % len(args)]
        for arg in args:
            bufs = arg.buffers if isinstance(arg, Concat) else [_encode(arg)]
            nbytes = arg.nbytes if isinstance(arg, Concat) else len(bufs[0])
            if nbytes < self._LARGE:
                pending.extend((b"$%d\r\n" % nbytes, *(bytes(b) for b in bufs), b"\r\n"))
                continue
            pending.append(b"$%d\r\n" % nbytes)
            out.append(b"".join(pending))
            out.extend(bufs)
            pending = [b"\r\n"]
        out.append(b"".join(pending))
        return out


def _encode(value: Any) -> bytes | memoryview:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return memoryview(value).cast("B")
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"cannot send a {type(value).__name__} to Redis")


def packing_connection(base: type) -> type:
    """A subclass of redis-py connection class ``base`` that packs with :class:`RespPacker`
    (a cluster client passes only known arguments to its nodes' connections)."""
    class PackingConnection(base):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: Any) -> None:
            kwargs["command_packer"] = RespPacker()
            super().__init__(**kwargs)
    return PackingConnection
