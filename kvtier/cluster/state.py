"""Layer 7: the controller's state: registered instances and which chunks each holds.

Two backends with one interface: :class:`MemoryState` (one controller) and
:class:`RedisState` (``--redis-url``: replicas share instances and index).
An instance is live while its last heartbeat is under ``ttl_s`` old; reads
never return an expired one, and :meth:`expire` drops them with their chunks.
Chunk keys are the 16-byte kvtier keys; tiers are kvtier's tier names.

Each record holds ``cred``: the SHA-256 of the instance's credential (never the
credential). :meth:`claim` writes a record only for its owner: a live record is
replaced only by a caller presenting the same credential, and once it expired
the name is anyone's again. Both backends do that check and the write as one
step (a lock; a Redis WATCH transaction), so replicas sharing Redis agree.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any, Iterable, Optional, Sequence

Record = dict[str, Any]
Claim = Optional[str]
"""What :meth:`claim` did: ``"kept"`` (the owner's update), ``"new"`` (a new owner), or
None (refused: a live record with another credential)."""


def digest(credential: str) -> str:
    """What is stored of a credential (a random 256-bit token: a plain hash suffices)."""
    return hashlib.sha256(credential.encode()).hexdigest()


def owns(rec: Record, presented: str | None) -> bool:
    """Whether ``presented`` (a digest) is the record's credential (constant time)."""
    return bool(presented) and hmac.compare_digest(str(rec.get("cred", "")), str(presented))


def _claimed(cur: Record | None, rec: Record, presented: str | None, new: str,
             ttl_s: float, now: float) -> tuple[Claim, Record | None]:
    """The claim's outcome and the record to write (None: nothing)."""
    if cur is not None and now - cur["last_seen"] <= ttl_s:
        if not owns(cur, presented):
            return None, None
        return "kept", {**rec, "cred": cur["cred"], "last_seen": now}
    return "new", {**rec, "cred": new, "last_seen": now}


def _prefix(held: set[bytes], keys: Sequence[bytes]) -> int:
    """How many of ``keys``, from the first, are in ``held``."""
    for i, key in enumerate(keys):
        if key not in held:
            return i
    return len(keys)


_HELD_LUA = """
local prefix, n = ARGV[1], tonumber(ARGV[2])
local first = 3 + n
local nk = #ARGV - first + 1
local out = {}
for i = 1, n do
  local inst = ARGV[2 + i]
  local tiers = redis.call('SMEMBERS', prefix .. 'tiers:' .. inst)
  table.sort(tiers)
  local sets, entry, best = {}, {}, 0
  for j, t in ipairs(tiers) do
    sets[j] = prefix .. 'chunks:' .. inst .. ':' .. t
    local c = 0
    while c < nk and redis.call('SISMEMBER', sets[j], ARGV[first + c]) == 1 do c = c + 1 end
    entry[#entry + 1] = t
    entry[#entry + 1] = c
    if c > best then best = c end
  end
  local any = best
  while any < nk do
    local held = false
    for j = 1, #sets do
      if redis.call('SISMEMBER', sets[j], ARGV[first + any]) == 1 then held = true; break end
    end
    if not held then break end
    any = any + 1
  end
  entry[#entry + 1] = 'any'
  entry[#entry + 1] = any
  out[i] = entry
end
return out
"""
"""Per instance (``ARGV``: the key prefix, the instance count, the instances, the chunk
keys) its tiers and ``any`` with how many of the first keys each holds, worked out on
the server and stopping at each prefix's end."""


class MemoryState:
    """Instances and their chunks in this process."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._instances: dict[str, Record] = {}
        self._chunks: dict[str, dict[str, set[bytes]]] = {}

    # -- instances
    def claim(self, rec: Record, presented: str | None, new: str) -> Claim:
        """Write ``rec`` if its name is free (credential digest ``new``) or ``presented``
        is the live record's credential digest (which it keeps)."""
        with self._lock:
            name = rec["instance"]
            out, write = _claimed(self._instances.get(name), rec, presented, new, self.ttl_s,
                                  time.time())
            if write is not None:
                if out == "new":
                    self._chunks[name] = {}
                self._instances[name] = write
            return out

    def get(self, instance: str) -> Record | None:
        """The live record of ``instance`` (None: unknown or expired)."""
        with self._lock:
            rec = self._instances.get(instance)
            if rec is None or time.time() - rec["last_seen"] > self.ttl_s:
                return None
            return dict(rec)

    def touch(self, instance: str, presented: str | None) -> bool | None:
        """A heartbeat: True, False (unknown or expired), None (another credential)."""
        with self._lock:
            rec = self._instances.get(instance)
            if rec is None or time.time() - rec["last_seen"] > self.ttl_s:
                return False
            if not owns(rec, presented):
                return None
            rec["last_seen"] = time.time()
            return True

    def instances(self) -> list[Record]:
        now = time.time()
        with self._lock:
            return [dict(r) for r in self._instances.values() if now - r["last_seen"] <= self.ttl_s]

    def expire(self) -> list[str]:
        now = time.time()
        with self._lock:
            gone = [i for i, r in self._instances.items() if now - r["last_seen"] > self.ttl_s]
            for i in gone:
                self._instances.pop(i, None)
                self._chunks.pop(i, None)
        return gone

    # -- chunks
    def add(self, instance: str, tier: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            tiers = self._chunks.get(instance)
            if tiers is not None:
                tiers.setdefault(tier, set()).update(keys)

    def remove(self, instance: str, tier: str, keys: Iterable[bytes]) -> None:
        with self._lock:
            held = self._chunks.get(instance, {}).get(tier)
            if held:
                held.difference_update(keys)

    def replace(self, instance: str, tiers: dict[str, list[bytes]]) -> None:
        with self._lock:
            if instance in self._chunks:
                self._chunks[instance] = {t: set(k) for t, k in tiers.items()}

    def clear(self, instance: str) -> None:
        self.replace(instance, {})

    def held_many(self, instances: Sequence[str], keys: Sequence[bytes]
                  ) -> dict[str, dict[str, int]]:
        """Per instance, its tiers and ``any`` (held in some tier) with how many of the
        first ``keys`` each holds without a gap (keys chain: one held after a missing one is
        of no use to a prefix), looking only as far as its prefix goes: a miss costs one
        probe per tier, not one per key."""
        out = {}
        with self._lock:
            for instance in instances:
                tiers = self._chunks.get(instance, {})
                names = sorted(tiers)
                hit = {t: _prefix(tiers[t], keys) for t in names}
                sets = [tiers[t] for t in names]
                i = max(hit.values(), default=0)  # every tier's prefix is held by "any"
                while i < len(keys) and any(keys[i] in s for s in sets):
                    i += 1
                out[instance] = {**hit, "any": i}
        return out

    def counts(self, instance: str) -> dict[str, int]:
        with self._lock:
            return {t: len(k) for t, k in self._chunks.get(instance, {}).items()}

    def close(self) -> None:
        pass


class RedisState:
    """The same state in Redis: a hash of instance records (JSON with the time of the
    last heartbeat) and one set of chunk keys per instance and tier."""

    def __init__(self, url: str, ttl_s: float, prefix: str = "kvtier:cluster:",
                 timeout_s: float = 2.0) -> None:
        import redis

        self.ttl_s = ttl_s
        self.prefix = prefix
        self.r = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s)
        self.r.ping()  # a wrong URL stops start-up here
        self._held: Any = None  # the lookup script, registered on first use

    def _inst(self) -> str:
        return f"{self.prefix}instances"

    def _set(self, instance: str, tier: str) -> str:
        return f"{self.prefix}chunks:{instance}:{tier}"

    def _tiers(self, instance: str) -> str:
        return f"{self.prefix}tiers:{instance}"

    def claim(self, rec: Record, presented: str | None, new: str) -> Claim:
        import redis

        name = rec["instance"]
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(self._inst())
                    raw = pipe.hget(self._inst(), name)
                    out, write = _claimed(json.loads(raw) if raw else None, rec, presented, new,
                                          self.ttl_s, time.time())
                    if write is None:
                        return None
                    pipe.multi()
                    pipe.hset(self._inst(), name, json.dumps(write))
                    pipe.execute()
                except redis.WatchError:  # another write in between: look again
                    continue
            if out == "new":
                self.clear(name)
            return out

    def get(self, instance: str) -> Record | None:
        raw = self.r.hget(self._inst(), instance)
        rec = json.loads(raw) if raw else None
        return rec if rec and time.time() - rec["last_seen"] <= self.ttl_s else None

    def touch(self, instance: str, presented: str | None) -> bool | None:
        import redis

        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(self._inst())
                    raw = pipe.hget(self._inst(), instance)
                    rec = json.loads(raw) if raw else None
                    if rec is None or time.time() - rec["last_seen"] > self.ttl_s:
                        return False
                    if not owns(rec, presented):
                        return None
                    rec["last_seen"] = time.time()
                    pipe.multi()
                    pipe.hset(self._inst(), instance, json.dumps(rec))
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def instances(self) -> list[Record]:
        now = time.time()
        recs = [json.loads(v) for v in self.r.hgetall(self._inst()).values()]
        return [r for r in recs if now - r["last_seen"] <= self.ttl_s]

    def expire(self) -> list[str]:
        now = time.time()
        gone = [r["instance"] for r in map(json.loads, self.r.hgetall(self._inst()).values())
                if now - r["last_seen"] > self.ttl_s]
        for i in gone:
            self.r.hdel(self._inst(), i)
            self.clear(i)
        return gone

    def add(self, instance: str, tier: str, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        if keys:
            pipe = self.r.pipeline(transaction=False)
            pipe.sadd(self._tiers(instance), tier)
            pipe.sadd(self._set(instance, tier), *keys)
            pipe.execute()

    def remove(self, instance: str, tier: str, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        if keys:
            self.r.srem(self._set(instance, tier), *keys)

    def replace(self, instance: str, tiers: dict[str, list[bytes]]) -> None:
        self.clear(instance)
        for tier, keys in tiers.items():
            self.add(instance, tier, keys)

    def clear(self, instance: str) -> None:
        names = [t.decode() for t in self.r.smembers(self._tiers(instance))]
        self.r.delete(self._tiers(instance), *(self._set(instance, t) for t in names))

    def held_many(self, instances: Sequence[str], keys: Sequence[bytes]
                  ) -> dict[str, dict[str, int]]:
        """What :meth:`MemoryState.held_many` answers, in one round trip however many
        instances: a script walks each instance's tiers on the server, as far as its
        prefix goes (sending every key for every instance and tier cost more in redis-py's
        packing than the lookup itself: 2 ms at 64 instances)."""
        if not instances:
            return {}
        if self._held is None:
            self._held = self.r.register_script(_HELD_LUA)
        got = self._held(args=[self.prefix, len(instances), *instances, *keys])
        out = {}
        for instance, flat in zip(instances, got):
            pairs = iter(flat)
            out[instance] = {(t.decode() if isinstance(t, bytes) else t): int(n)
                             for t, n in zip(pairs, pairs)}
        return out

    def counts(self, instance: str) -> dict[str, int]:
        names = sorted(t.decode() for t in self.r.smembers(self._tiers(instance)))
        pipe = self.r.pipeline(transaction=False)
        for t in names:
            pipe.scard(self._set(instance, t))
        return dict(zip(names, pipe.execute()))

    def close(self) -> None:
        self.r.close()
