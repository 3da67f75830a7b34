"""Layer 0: the one place secrets are read: bearer tokens (for the configuration and the
CLIs) and the cluster's integrity key (:func:`read_key_file`, only ever from a file).

Each secret has one environment spelling, the loader's ``KVTIER_<SECTION>__TOKEN``
(``KVTIER_CONTROL__TOKEN``, ``KVTIER_CONTROLLER__TOKEN``, ``KVTIER_TRANSFER__TOKEN``),
so the variable an operator exports for ``kvtier ctl`` / ``kvtier controller`` is the
one vLLM's kvtier reads too. The single-underscore spellings of earlier releases are
still honoured where they were (with a warning naming the new spelling) for one release.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Mapping

from kvtier.errors import ConfigError

log = logging.getLogger("kvtier.config")

TOKEN_SECTIONS = ("control", "controller", "transfer")
MIN_KEY_BYTES = 32
"""Shortest integrity secret accepted (after stripping surrounding whitespace): 256 bits."""
# Old spelling -> section; remove after the next release. Only the loader reads
# KVTIER_TRANSFER_TOKEN and only the CLIs read the other two, as before.
DEPRECATED_TOKEN_ENV = {"KVTIER_CONTROL_TOKEN": "control",
                        "KVTIER_CONTROLLER_TOKEN": "controller",
                        "KVTIER_TRANSFER_TOKEN": "transfer"}


def token_env(section: str) -> str:
    """The environment variable holding ``section``'s token: ``KVTIER_<SECTION>__TOKEN``."""
    return f"KVTIER_{section.upper()}__TOKEN"


def deprecated_token_env(section: str) -> str:
    """The spelling of earlier releases (``KVTIER_<SECTION>_TOKEN``), still read for now."""
    return f"KVTIER_{section.upper()}_TOKEN"


def warn_deprecated(old: str, new: str) -> None:
    """Say (log line and DeprecationWarning) that ``old`` was read and ``new`` replaces it."""
    msg = f"{old} is deprecated and will be ignored in the next release: use {new}"
    log.warning(msg)
    warnings.warn(msg, DeprecationWarning, stacklevel=3)


def deprecated_env_token(section: str, env: Mapping[str, str]) -> str:
    """``$KVTIER_<SECTION>_TOKEN`` (warning that it is deprecated when set); "" if unset."""
    old = deprecated_token_env(section)
    value = env.get(old, "")
    if value:
        warn_deprecated(old, token_env(section))
    return value


def env_token(section: str, env: Mapping[str, str] | None = None) -> str:
    """``$KVTIER_<SECTION>__TOKEN`` taken verbatim, else the deprecated spelling; "" if none."""
    env = os.environ if env is None else env
    return env.get(token_env(section)) or deprecated_env_token(section, env)


def read_token_file(key: str, path: str) -> str:
    """The token in the file ``path`` (surrounding whitespace ignored); a file that
    cannot be read or holds nothing is a ConfigError naming ``key``, never the token."""
    p = Path(path).expanduser()
    try:
        text = p.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(key, f"cannot read {p}: {why}") from None
    if not text:
        raise ConfigError(key, f"{p} is empty")
    return text


def read_key_file(key: str, path: str, min_bytes: int = MIN_KEY_BYTES) -> bytes:
    """The secret in the file ``path`` (any bytes, surrounding whitespace stripped); a
    file that cannot be read or holds fewer than ``min_bytes`` is a ConfigError naming
    ``key``, never the secret."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes().strip()
    except OSError as e:
        raise ConfigError(key, f"cannot read {p}: {e.strerror}") from None
    if len(data) < min_bytes:
        raise ConfigError(key, f"{p} holds {len(data)} bytes (surrounding whitespace "
                          f"stripped), a key needs at least {min_bytes}: make one with "
                          f"`openssl rand -hex 32 > {p}`")
    return data


def read_token(section: str, token: str, token_file: str) -> str:
    """A configured section's token: ``token`` or the file ``token_file``; "" if neither.
    Errors name ``<section>.token_file``."""
    return _pick(token, token_file, "token", f"{section}.token_file")


def cli_token(section: str, token: str | None, token_file: str | None,
              flags: tuple[str, str] = ("--token", "--token-file"),
              env: Mapping[str, str] | None = None) -> str:
    """A command's token: its ``flags`` (value, file), else ``$KVTIER_<SECTION>__TOKEN``
    (or the deprecated spelling); "" if none. Errors name the file flag."""
    return _pick(token or "", token_file or "", flags[0], flags[1]) or env_token(section, env)


def _pick(token: str, token_file: str, token_name: str, file_key: str) -> str:
    if token and token_file:
        raise ConfigError(file_key, f"give {token_name} or {file_key.rsplit('.', 1)[-1]}, "
                          "not both")
    return read_token_file(file_key, token_file) if token_file else token
