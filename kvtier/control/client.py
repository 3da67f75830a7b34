"""Layer 7: a small HTTP client of the management API (stdlib only), for ``kvtier ctl``.

The token comes from the caller (``kvtier ctl`` reads it with :func:`kvtier.config.cli_token`);
it is sent only in the ``Authorization`` header and never appears in an exception's message.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from kvtier.codecs import encode
from kvtier.codecs.format import ChunkData
from kvtier.keys import ChunkKey


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

    def __init__(self, url: str, token: str = "", timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s

    def call(self, op: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST ``/v1/<op>`` with a JSON body; the decoded JSON answer."""
        return json.loads(self._request("POST", f"/v1/{op}", json.dumps(body or {}).encode()))

    def status(self) -> dict[str, Any]:
        """GET ``/v1/status``."""
        return json.loads(self._request("GET", "/v1/status"))

    def health(self) -> dict[str, Any]:
        """GET ``/health``."""
        return json.loads(self._request("GET", "/health"))

    def metrics(self) -> str:
        """GET ``/metrics``: Prometheus text."""
        return self._request("GET", "/metrics").decode()

    def _request(self, method: str, path: str, data: bytes | None = None) -> bytes:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = json.loads(raw).get("error") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")[:500]
            raise ControlError(err.code, message) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ControlError(0, f"cannot reach {self.url}: {reason}") from None
