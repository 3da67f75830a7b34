"""Layer 4: build the tier hierarchy a configuration asks for."""

from __future__ import annotations

from kvtier.codecs import ChunkMac, Codec
from kvtier.config import CodecName, KvtierConfig, TierName
from kvtier.store.hierarchy import ChunkStore
from kvtier.tiers import Tier, tier_class
from kvtier.tiers.memory import MemoryTier


def build_tiers(cfg: KvtierConfig, chunk_bytes: int | None, shared_only: bool = False
                ) -> list[Tier]:
    """Tiers in configured order. ``shared_only`` leaves out the in-process memory
    tier (a scheduler process has no KV bytes of its own). The tiers whose chunks
    leave the process (disk, Redis, peer) get the cluster's integrity key, if any."""
    tiers: list[Tier] = []
    mac = chunk_mac(cfg)
    for name in cfg.tiers:
        if name is TierName.MEMORY:
            if shared_only:
                continue
            if chunk_bytes is None:
                raise ValueError("the memory tier needs the chunk size in bytes")
            tiers.append(MemoryTier(cfg.memory.max_bytes, chunk_bytes,
                                     map_at_start=cfg.memory.map_at_start))
        elif name is TierName.DISK:
            # A file declaring more than a chunk (plus a codec's worst growth) is refused
            # before its payload is allocated (the scheduler, without chunk_bytes: 1 GiB).
            bound = {} if chunk_bytes is None else {"max_chunk_bytes": chunk_bytes * 9 // 8
                                                    + 65536}
            tiers.append(tier_class("disk")(cfg.disk, mac=mac, **bound))
        elif name is TierName.REDIS:
            tiers.append(tier_class("redis")(cfg.redis, mac=mac))
        elif name is TierName.PEER:
            tiers.append(tier_class("peer")(cfg.peer, token=cfg.transfer.resolve_token(),
                                            own_address=cfg.transfer.address,
                                            max_chunk_bytes=cfg.transfer.max_batch_bytes,
                                            mac=mac, tls=cfg.tls.files()))
    return tiers


def chunk_mac(cfg: KvtierConfig) -> ChunkMac | None:
    """The signer of the cluster's integrity key (``integrity.key_file``); None without one."""
    secret = cfg.integrity.read_key()
    return ChunkMac(secret) if secret is not None else None


def build_store(cfg: KvtierConfig, chunk_bytes: int | None, shared_only: bool = False,
                track_events: bool = False) -> ChunkStore | None:
    """The configured :class:`ChunkStore`, or None if no tier applies."""
    tiers = build_tiers(cfg, chunk_bytes, shared_only)
    if not tiers:
        return None
    sizes = {TierName.DISK: cfg.disk.write_queue, TierName.REDIS: cfg.redis.write_queue,
             TierName.PEER: 1}  # the read-only peer tier gets no writer
    codecs = {TierName.DISK: cfg.disk.codec, TierName.REDIS: cfg.redis.codec,
              TierName.PEER: CodecName.RAW}
    lower = [n for n in cfg.tiers if n is not TierName.MEMORY]
    return ChunkStore(tiers, cfg.write_policy, [sizes[n] for n in lower], track_events,
                      [codec(codecs[n]) for n in lower])


def codec(name: CodecName) -> Codec:
    """The codec a configured name stands for."""
    return Codec[name.name]
