"""Exceptions kvtier raises for misuse and bad input.

Expected outcomes (a miss, a tier that is down, a corrupt chunk found on read)
are return values, not exceptions: a failing tier is a counted miss, never a
failed request (docs/architecture.md, "Invariants").
"""

from __future__ import annotations


class KvtierError(Exception):
    """Base class of every kvtier-specific exception."""


class ConfigError(KvtierError, ValueError):
    """A configuration key is unknown or its value is impossible.

    The message always names the offending key, e.g. ``memory.max_bytes``.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"kvtier config: {key}: {problem}")
        self.key = key
        self.problem = problem


class CorruptChunk(KvtierError):
    """Bytes read from a tier do not form the chunk that was asked for.

    Raised by the codecs layer; tiers turn it into a miss plus a counted event.
    """


class ForeignChunk(CorruptChunk):
    """Bytes are a well-framed chunk of another kvtier format version.

    Not damage: another release (e.g. during a rolling upgrade) shares the
    folder or server. Tiers serve it as a miss, count it ``foreign`` and leave
    it in place; it is a :class:`CorruptChunk` only so that code which knows
    nothing of versions still never serves it.
    """


class ForgedChunk(CorruptChunk):
    """A well-formed chunk whose keyed MAC is missing or wrong, read with the cluster's
    integrity key (``integrity.key_file``).

    Its checksums may all be right: whoever wrote it could write the tier but did
    not hold the key. Tiers serve it as a miss and count it ``forged``; it is a
    :class:`CorruptChunk` so that code which knows nothing of MACs still never serves it.
    """


class LayoutMismatch(KvtierError, ValueError):
    """Engine KV tensors do not match the layout kvtier was configured for."""


class UnsupportedConfig(KvtierError, ValueError):
    """The engine is configured in a way kvtier cannot serve correctly.

    Raised at start-up, never at request time: serving it could hand back
    KV that is not what the engine would have computed.
    """
