"""Layer 7: uvicorn's HTTP protocol with a deadline on each request's headers.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and kvtier's
:class:`~kvtier.control.guard.Guard` bounds bodies, but nothing bounds a client that
opens a connection and sends its request line and headers a byte at a time: a
handful of such clients hold every connection slot (``limit_concurrency``) and the
surface answers everyone else 503 ("slow loris"). :func:`header_deadline` makes a
protocol class for ``uvicorn.Config(http=...)`` that closes a connection whose
request headers are not complete ``seconds`` after it opened, or after the first
byte of a following request arrived.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:  # what uvicorn picks by default when installed (vLLM installs it)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
    _HEADERS_DONE = "on_headers_complete"
except ImportError:  # pragma: no cover - without httptools
    _Base = None  # type: ignore[assignment,misc]
from uvicorn.protocols.http.h11_impl import H11Protocol


class _Deadline:
    """The timer shared by both protocol flavours (mixed in before uvicorn's class)."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


if _Base is not None:
    class _HttpTools(_Deadline, _Base):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)


class _H11(_Deadline, H11Protocol):
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        import h11

        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request's headers are still coming
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_deadline(seconds: float) -> type:
    """A uvicorn HTTP protocol class (httptools when installed, else h11) that closes a
    connection whose request headers take longer than ``seconds``."""
    base = _HttpTools if _Base is not None else _H11
    return type(f"HeaderDeadline{base.__name__}", (base,), {"header_timeout_s": seconds})
