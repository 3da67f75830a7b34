"""Layer 3: reading and deleting the Redis tier's split chunks (a head and its parts).

A split chunk is several values, so a reader can see a state no writer meant:
two instances storing one prefix at once can compute slightly different KV
(vLLM on CPU is not batch-invariant), and a reader may catch one's head with
the other's parts. So a reader deletes only what it verified bad twice:

1. read the parts (one round trip after the heads);
2. a chunk that fails (checksum, a part missing) is read again with expiries
   (one more round trip): a head that changed or vanished is a plain miss;
   parts that changed are joined again (a hit if the write has settled);
   parts still on their orphan expiry belong to a write in progress (or of a
   writer that died: they expire), a plain miss;
3. only the same bytes failing again are deleted: a checksum failure counts
   ``corrupt``, a MAC failure (with the cluster's integrity key) ``forged``, a
   head whose parts are gone is deleted uncounted (it would keep answering
   EXISTS, promising hits that fail).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from kvtier.codecs import ChunkData
from kvtier.codecs.format import Header
from kvtier.errors import CorruptChunk, ForgedChunk
from kvtier.keys import ChunkKey
from kvtier.tiers.base import TierStats
from kvtier.tiers.redis.values import ValueLayout, same_write

log = logging.getLogger(__name__)
_PROBE = 8  # parts unlinked per round trip when deleting (their number is not stored)
Failed = tuple[int, Header, bytes, list[Any]]  # index in the batch, header, head, parts read


class SplitChunks:
    """Reads and deletes split chunks under one layout; counts into the tier's ``stats``
    (forged chunks through ``on_forged``, which logs the first)."""

    def __init__(self, layout: ValueLayout, stats: TierStats,
                 on_forged: Callable[[ForgedChunk], None]) -> None:
        self.layout = layout
        self.stats = stats
        self.on_forged = on_forged

    def read(self, client: Any, keys: Sequence[ChunkKey],
             split: list[tuple[int, Header, bytes]], out: list[ChunkData | None]) -> None:
        """Fill ``out[i]`` for each split head ``(i, header, head)``: the parts, copied once
        into one buffer. The writer's part size is the length of its head value, so
        instances with different ``max_value_bytes`` share chunks."""
        pipe = client.pipeline(transaction=False)
        counts = []
        for i, header, head in split:
            counts.append(self.layout.num_parts(header, head))
            for p in range(1, counts[-1] + 1):
                pipe.get(self.layout.part(self.layout.head(keys[i]), p))
        parts = iter(pipe.execute(raise_on_error=False))
        failed: list[Failed] = []
        for (i, header, head), n in zip(split, counts):
            mine = [next(parts) for _ in range(n)]
            out[i] = self._join(keys[i], header, head, mine)
            if out[i] is None:
                failed.append((i, header, head, mine))
        if failed:
            self._recheck(client, keys, failed, out)

    def delete(self, client: Any, heads: list[bytes], known: Sequence[int] = ()) -> int:
        """UNLINK heads and their parts; returns how many heads were present.

        ``known[j]``: how many parts head ``j`` is known to have (all unlinked at once,
        even with gaps); beyond that, parts are probed ``_PROBE`` at a time.
        """
        known = list(known) or [1] * len(heads)
        pipe = client.pipeline(transaction=False)
        for head, n in zip(heads, known):
            pipe.unlink(head)
            for p in range(1, n + 1):
                pipe.unlink(ValueLayout.part(head, p))
        res, pos, n_heads, todo = pipe.execute(), 0, 0, []
        for head, n in zip(heads, known):
            n_heads += int(res[pos])
            if n and res[pos + n]:  # the last known part was there: maybe more follow
                todo.append((head, n + 1))
            pos += 1 + n
        while todo:  # only split chunks get here
            pipe = client.pipeline(transaction=False)
            for head, first in todo:
                for p in range(first, first + _PROBE):
                    pipe.unlink(ValueLayout.part(head, p))
            res = pipe.execute()
            todo = [(h, f + _PROBE) for j, (h, f) in enumerate(todo)
                    if res[(j + 1) * _PROBE - 1]]
        return n_heads

    def _join(self, key: ChunkKey, header: Header, head: bytes, parts: list[Any]
              ) -> ChunkData | None:
        if any(p is None or isinstance(p, Exception) for p in parts):
            return None
        try:
            return self.layout.join(key, header, head, parts)
        except CorruptChunk:
            return None

    def _count(self, key: ChunkKey, header: Header, head: bytes, parts: list[Any]) -> None:
        """Count a chunk about to be deleted as forged or corrupt (joined once more to
        learn which: rare, and only on bytes already read)."""
        try:
            self.layout.join(key, header, head, parts)
        except ForgedChunk as exc:
            self.on_forged(exc)
            return
        except CorruptChunk:
            pass
        log.warning("redis tier: deleting chunk %s: its checksum failed twice on the same "
                    "bytes", key.hex())
        self.stats.add(corrupt=1)

    def _recheck(self, client: Any, keys: Sequence[ChunkKey], failed: list[Failed],
                 out: list[ChunkData | None]) -> None:
        """Step 2 and 3 of the module docstring, for every failed chunk in one round trip."""
        pipe = client.pipeline(transaction=False)
        for i, _, _, parts in failed:
            head = self.layout.head(keys[i])
            for name in [head] + [self.layout.part(head, p) for p in range(1, len(parts) + 1)]:
                pipe.get(name)
                pipe.pttl(name)
        res = iter(pipe.execute(raise_on_error=False))
        doomed: list[tuple[bytes, int]] = []
        for i, header, head, parts in failed:
            head_now, head_ttl = next(res), next(res)
            now = [(next(res), next(res)) for _ in parts]
            values = [v for v, _ in now]
            if head_now != head:
                continue  # rewritten or deleted meanwhile: a plain miss
            if values != parts:  # parts landed or went meanwhile
                out[i] = self._join(keys[i], header, head, values)
                continue
            if any(isinstance(v, Exception) for v in values):
                continue  # not read: nothing verified
            if not all(same_write(head_ttl, ttl) for v, ttl in now if v is not None):
                continue  # parts of a write in progress, or of a writer that died
            if all(v is not None for v in values):
                self._count(keys[i], header, head, values)
            doomed.append((self.layout.head(keys[i]), len(parts)))
        if doomed:
            self.delete(client, [h for h, _ in doomed], [n for _, n in doomed])
