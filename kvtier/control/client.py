"""Layer 7: a small HTTP client of the management API, for ``kvtier ctl``.

Calls go through :class:`kvtier.net.http.HttpClient` (bounded waits and
answers, no redirect followed). The token comes from the caller (``kvtier ctl``
reads it with :func:`kvtier.config.cli_token`); it is sent only in the
``Authorization`` header and never appears in an exception's message.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from kvtier.codecs import encode
from kvtier.codecs.format import ChunkData
from kvtier.keys import ChunkKey
from kvtier.net.http import HttpClient, HttpError, Redirected, StatusError, TooLarge
from kvtier.net.tls import TlsFiles

MAX_ANSWER = 64 * 1024**2
"""The bound on an answer: far above any the API gives (JSON summaries, Prometheus text)."""


class ControlError(Exception):
    """The API answered with an error (``status`` 0: it could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


def encode_chunk(key: ChunkKey, chunk: ChunkData) -> str:
    """A chunk as ``admit`` takes it: header + payload, base64."""
    return base64.b64encode(b"".join(bytes(b) for b in encode(key, chunk))).decode()


class ControlClient:
    """Calls one instance's management API at ``url`` (``http://127.0.0.1:8700``)."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 60.0,
                 max_bytes: int = MAX_ANSWER, tls: TlsFiles | None = None) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self._http = HttpClient(timeout_s, max_bytes, tls)

    def call(self, op: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST ``/v1/<op>`` with a JSON body; the decoded JSON answer."""
        return json.loads(self._request("POST", f"/v1/{op}", body or {}))

    def status(self) -> dict[str, Any]:
        """GET ``/v1/status``."""
        return json.loads(self._request("GET", "/v1/status"))

    def health(self) -> dict[str, Any]:
        """GET ``/health``."""
        return json.loads(self._request("GET", "/health"))

    def metrics(self) -> str:
        """GET ``/metrics``: Prometheus text."""
        return self._request("GET", "/metrics").decode()

    def close(self) -> None:
        """Close the pooled connection (a later call opens a new one)."""
        self._http.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        try:
            return self._http.request(method, self.url + path, token=self._token,
                                      json_body=body).body
        except Redirected as err:
            raise ControlError(err.status, err.reason) from None
        except StatusError as err:
            raw = err.body
            try:
                message = json.loads(raw).get("error") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")[:500]
            raise ControlError(err.status, message) from None
        except TooLarge as err:
            raise ControlError(0, str(err)) from None
        except HttpError as err:
            raise ControlError(0, f"cannot reach {err.url}: {err.reason}") from None
