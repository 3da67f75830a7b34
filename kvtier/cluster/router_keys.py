"""Layer 7: the router's API keys (who may call it, as which tenant, in which role) and the
tenant's cache salt.

The key file (``kvtier router --api-key-file FILE``) has one key per line::

    # comments and blank lines are ignored
    9f1c...e2            # a user of the shared (tenant-less) cache
    4b7a...91 tenant-a   # a user of tenant-a
    c0de...77 tenant-a operator
    d00d...42 operator   # an operator of the shared cache

A key is at least 16 characters without whitespace (make one with
``openssl rand -hex 32``); after it come an optional tenant name (letters, digits,
``._-``, at most 64; ``operator`` is not a tenant name) and an optional role marker
``operator``. ``KVTIER_ROUTER__API_KEY`` adds one user key of the shared cache (like
``vllm serve --api-key``). A key appearing twice, a short key or an unknown word is
refused at start-up with an error naming the line (never the key).

Roles: every key may call ``/v1/*``; an **operator** also reads ``/metrics`` and gets
the ``x-kvtier-*`` routing headers (which say how much of the prompt an instance
holds; to anyone else they are an oracle on other users' prompts).

Tenants: a request's ``cache_salt`` is replaced by :func:`tenant_salt` (the tenant and
the caller's salt, hashed with a domain prefix) both in the body forwarded to vLLM
and in the controller's lookup, so vLLM and kvtier key its KV per tenant and no
caller can name another tenant's salt. Requests of the shared cache without a
salt keep none (they share the cache, as vLLM does); an operator without a tenant
passes its salt unchanged (it may look at any cache). What remains: the time to
first token still tells a caller whether *its own tenant's* cache held the prompt;
across tenants there is nothing to find, and a tenant that wants no sharing among its
own users gives each its own tenant name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from kvtier.errors import ConfigError

MIN_KEY_CHARS = 16
OPERATOR = "operator"
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
ENV_KEY = "KVTIER_ROUTER__API_KEY"


@dataclass(frozen=True)
class Caller:
    """Who a matched key speaks for: ``tenant`` ("" = the shared cache), ``operator``."""

    tenant: str = ""
    operator: bool = False
    line: int = 0  # where the key was given (0: the environment); for logs


OPEN = Caller("", True)
"""The caller when the router has no keys (loopback only): sees everything, as before."""


def parse_keys(text: str, source: str) -> dict[str, Caller]:
    """Keys -> callers from a key file's ``text`` (errors name ``source`` and the line)."""
    out: dict[str, Caller] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        key, rest = words[0], words[1:]
        where = f"{source} line {n}"
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError("--api-key-file", f"{where}: a key needs at least "
                              f"{MIN_KEY_CHARS} characters (openssl rand -hex 32)")
        operator = bool(rest) and rest[-1] == OPERATOR
        if operator:
            rest = rest[:-1]
        if len(rest) > 1 or (rest and not _TENANT.fullmatch(rest[0])):
            raise ConfigError("--api-key-file", f"{where}: after the key come an optional "
                              "tenant name ([A-Za-z0-9._-], at most 64) and an optional "
                              f"'{OPERATOR}'")
        if key in out:
            raise ConfigError("--api-key-file", f"{where}: this key is given twice")
        out[key] = Caller(rest[0] if rest else "", operator, n)
    return out


def load_keys(path: str, env_key: str = "") -> dict[str, Caller]:
    """The keys of the file ``path`` (if given) and ``env_key`` (if set)."""
    keys: dict[str, Caller] = {}
    if path:
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise ConfigError("--api-key-file", f"cannot read {p}: {why}") from None
        keys = parse_keys(text, str(p))
        if not keys:
            raise ConfigError("--api-key-file", f"{p} holds no key")
    env_key = env_key.strip()
    if env_key:
        if len(env_key) < MIN_KEY_CHARS or any(c.isspace() for c in env_key):
            raise ConfigError(ENV_KEY, f"a key is at least {MIN_KEY_CHARS} characters "
                              "without whitespace")
        if env_key in keys:
            raise ConfigError(ENV_KEY, "this key is also in --api-key-file")
        keys[env_key] = Caller("", False, 0)
    return keys


def tenant_salt(caller: Caller, salt: str | None) -> str | None:
    """The ``cache_salt`` a request of ``caller`` (that gave ``salt``) is forwarded and
    looked up with; None: the request keeps no salt (the shared cache)."""
    if caller.operator and not caller.tenant:
        return salt
    if not caller.tenant and not salt:
        return None
    digest = hashlib.sha256(f"kvtier-tenant\0{caller.tenant}\0{salt or ''}".encode())
    return f"kvtier-t:{digest.hexdigest()[:40]}"
