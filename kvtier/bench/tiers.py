"""``kvtier bench tiers``: put/get throughput of the disk and Redis tiers vs their raw medium.

Setup: ``--chunks`` chunks of ``--chunk-mib`` MiB (default 3 MiB = 24 layers x
K/V x 256 tokens x 2 KV heads x head dim 64 x bf16), moved as one batch.
Each tier runs beside its raw medium, in the same run:

- disk: the baseline writes the same bytes to plain files (open, write,
  close, with the tier's fsync setting) and reads them back into a fresh
  buffer. Reads are cold by default: before every read pass, of the baseline
  and of the tier alike, the files are synced and dropped from the page cache
  with ``posix_fadvise(DONTNEED)`` (``--cache warm`` reads from the page cache).
- Redis: the baseline is plain redis-py (hiredis) pipelined SET / GET of the
  same bytes on the same server; the tier adds its header, checksum, an
  EXISTS round trip before writes and verification on reads.

- MAC: the same tier with a cluster integrity key (a second tier object on
  the same folder / prefix): writes sign each chunk with a keyed MAC (AES-256-GMAC),
  reads verify it (instead of the payload checksum). Its ratio is against the
  tier without a key, in the same round.

Medians over ``--repeats`` rounds; in each round every measurement runs once
(raw put, raw get, tier put, tier get, MAC put, MAC get), each after the same
untimed reset. Ratios (tier throughput / raw throughput, MAC / tier) are the
median of the per-round ratios, which cancels most of the drift of a shared
machine's load.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kvtier.testing.redis_proc import RedisNotInstalled, RedisProcess
from kvtier.codecs import HEADER_SIZE, ChunkData, ChunkMac, ChunkMeta
from kvtier.config import DiskConfig, RedisConfig
from kvtier.keys import ChunkKey
from kvtier.tiers.disk import DiskTier

Items = list[tuple[ChunkKey, ChunkData]]


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int,
                      before: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
    """Seconds of each function in each of ``repeats`` rounds (a warm-up round is dropped).

    Every round runs each function once, in ``fns`` order, after its untimed
    ``before`` step. The callers order them raw put, raw get, tier put, tier
    get (then MAC put, MAC get): each put then follows another pass's reads
    and each get its own write pass, so raw and tier inherit the same
    after-effects (on this VM a write pass after a cold read pass ran up to
    3x slower).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name in fns:
            if name in before:
                before[name]()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: ts[1:] for name, ts in times.items()}


def make_items(chunk_bytes: int, n: int) -> Items:
    """``n`` chunks of random bytes with distinct keys."""
    if chunk_bytes == 3 * 2**20:
        meta = ChunkMeta("bfloat16", (24, 2, 256, 2, 64))
    else:
        meta = ChunkMeta("uint8", (chunk_bytes,))
    rng = np.random.default_rng(0)
    return [(ChunkKey(rng.bytes(16)), ChunkData(meta, rng.integers(0, 256, chunk_bytes,
                                                                   dtype=np.uint8)))
            for _ in range(n)]


# -- disk -----------------------------------------------------------------------


def _write_file(path: Path, data: memoryview, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < data.nbytes:
            done += os.write(fd, data[done:])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: Path, buf: np.ndarray) -> None:
    """Read a whole file into ``buf`` with ``preadv`` (one large sequential request)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < buf.nbytes:
            n = os.preadv(fd, [view[done:]], done)
            if n == 0:
                raise OSError(f"{path}: shorter than expected")
            done += n
    finally:
        os.close(fd)


def filesystem_of(path: str) -> str:
    """``"<type> on <device>"`` of the mount holding ``path`` (from /proc/mounts)."""
    real, best = os.path.realpath(path), ("", "unknown", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def drop_page_cache(paths: list[Path]) -> None:
    """Sync, then ask the kernel to forget the files' cached pages."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_disk(items: Items, args: Any) -> dict[str, Any]:
    """Disk tier vs plain files in the same folder tree."""
    total = sum(c.payload.nbytes for _, c in items)
    base = Path(tempfile.mkdtemp(prefix="kvtier-bench-", dir=args.disk_path))
    try:
        disk_cfg = DiskConfig(path=str(base / "tier"), max_bytes=2 * total + 2**20,
                              fsync=args.fsync)
        tier = DiskTier(disk_cfg)
        keyed = DiskTier(disk_cfg, mac=ChunkMac(os.urandom(32)))  # same folder, same files
        (base / "raw").mkdir()
        raw_paths = [base / "raw" / f"{i}.bin" for i in range(len(items))]
        tier_paths = [tier.path_of(k) for k, _ in items]
        keys = [k for k, _ in items]
        views = [memoryview(c.payload).cast("B") for _, c in items]
        # The baseline reads into buffers allocated once (already mapped: no page
        # faults), as the tier does with its read pool once chunks are released.
        raw_bufs = [np.ones(v.nbytes, dtype=np.uint8) for v in views]
        cold = args.cache == "cold"

        def raw_put() -> None:
            for path, view in zip(raw_paths, views):
                _write_file(path, view, args.fsync)

        fns = {"raw_put": raw_put,
               "raw_get": lambda: [_read_file(p, b) for p, b in zip(raw_paths, raw_bufs)],
               **_tier_fns(tier, keyed, items)}
        # Every pass starts from the same state: nothing dirty, none of the bench's
        # files in the page cache (then, for warm reads, the files to read cached).
        # Measured here: a write pass right after another one's data was flushed
        # but still cached ran 3-7x slower.
        # A warm read pass starts right after its files were read into the page cache:
        # nothing is left to settle, and a pause there only lets this VM's cores drop
        # their clock (measured: a 3 MiB MAC 107 us busy, 292 us after 0.2 s idle).
        def quiesce(warm: list[Path] | None = None) -> None:
            os.sync()
            drop_page_cache([p for p in raw_paths + tier_paths if p.exists()])
            if warm is None:
                time.sleep(args.settle_s)
            for p in warm or []:
                _read_file(p, scratch[:p.stat().st_size])
        scratch = np.empty(max(v.nbytes for v in views) + HEADER_SIZE, dtype=np.uint8)
        before = {"raw_put": lambda: ([p.unlink(missing_ok=True) for p in raw_paths], quiesce()),
                  "tier_put": lambda: (tier.delete_many(keys), quiesce()),
                  "mac_put": lambda: (keyed.delete_many(keys), quiesce()),
                  "raw_get": lambda: quiesce(None if cold else raw_paths),
                  "tier_get": lambda: quiesce(None if cold else tier_paths),
                  "mac_get": lambda: quiesce(None if cold else tier_paths)}
        times = interleaved_times(fns, args.repeats, before)
        ok = _bitwise(tier, items) and _bitwise(keyed, items)
        tier.close()
        keyed.close()
        return {**_rates("disk", times, total), "disk_bitwise_equal": ok,
                "disk_tier_stats": tier.stats.as_dict(),
                "disk_mac_tier_stats": keyed.stats.as_dict()}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- redis ----------------------------------------------------------------------


def bench_redis(items: Items, args: Any) -> dict[str, Any]:
    """Redis tier vs plain redis-py pipelines on the same server."""
    try:
        import redis
    except ImportError:
        return {"redis_skipped": "redis-py is not installed: pip install 'kvtier[redis]'"}
    from kvtier.tiers.redis import RedisTier

    server = None
    url = args.redis_url
    if url is None:
        try:
            server = RedisProcess()
            server.start()
        except RedisNotInstalled as exc:
            return {"redis_skipped": str(exc)}
        url = server.url
    try:
        total = sum(c.payload.nbytes for _, c in items)
        cfg = RedisConfig(url=url, key_prefix="kvtier-bench:", timeout_s=5.0)
        tier = RedisTier(cfg)
        keyed = RedisTier(cfg, mac=ChunkMac(os.urandom(32)))  # same prefix, same values
        raw = redis.Redis.from_url(url)
        raw_keys = [b"kvtier-bench-raw:" + k.hex().encode() for k, _ in items]
        raw_values = [bytes(c.payload) for _, c in items]  # what a plain client would hold
        keys = [k for k, _ in items]

        def raw_put() -> None:
            pipe = raw.pipeline(transaction=False)
            for k, v in zip(raw_keys, raw_values):
                pipe.set(k, v)
            pipe.execute()

        def raw_get() -> None:
            pipe = raw.pipeline(transaction=False)
            for k in raw_keys:
                pipe.get(k)
            if any(v is None for v in pipe.execute()):
                raise RuntimeError("redis-py baseline: a GET missed")

        fns = {"raw_put": raw_put, "raw_get": raw_get, **_tier_fns(tier, keyed, items)}
        before = {"raw_put": lambda: raw.unlink(*raw_keys),
                  "tier_put": lambda: tier.delete_many(keys),
                  "mac_put": lambda: keyed.delete_many(keys)}
        times = interleaved_times(fns, args.repeats, before)
        ok = _bitwise(tier, items) and _bitwise(keyed, items)
        info = raw.info("server")
        raw.unlink(*raw_keys)
        tier.clear()
        tier.close()
        keyed.close()
        raw.close()
        return {**_rates("redis", times, total), "redis_bitwise_equal": ok,
                "redis_tier_stats": tier.stats.as_dict(),
                "redis_mac_tier_stats": keyed.stats.as_dict(),
                "redis_server": f"redis {info.get('redis_version')} at {url}"
                                f"{' (temporary)' if server else ''}",
                "redis_client": f"redis-py {redis.__version__}"
                                f"{' + hiredis' if redis.utils.HIREDIS_AVAILABLE else ''}",
                "redis_max_value_bytes": cfg.max_value_bytes}
    finally:
        if server is not None:
            server.close()


def _tier_fns(tier: Any, keyed: Any, items: Items) -> dict[str, Callable[[], None]]:
    """The timed passes of a tier without a key, then with one (put, get each)."""
    keys = [k for k, _ in items]
    return {"tier_put": lambda: _check_puts(tier.put_many(items), tier),
            "tier_get": lambda: _release_all(tier.get_many(keys), tier),
            "mac_put": lambda: _check_puts(keyed.put_many(items), keyed),
            "mac_get": lambda: _release_all(keyed.get_many(keys), keyed)}


def _bitwise(tier: Any, items: Items) -> bool:
    """Whether ``tier`` reads back every item bitwise."""
    got = tier.get_many([k for k, _ in items])
    ok = all(c is not None and bytes(c.payload) == bytes(want.payload)
             for c, (_, want) in zip(got, items))
    for c in got:
        if c is not None:
            c.release()
    return ok


def _check_puts(done: list[bool], tier: Any) -> None:
    if not all(done):
        raise RuntimeError(f"{tier.name} tier: a put failed ({tier.stats})")


def _release_all(got: list[ChunkData | None], tier: Any) -> None:
    """Release every chunk of a get pass; a miss means the numbers would be wrong."""
    if any(c is None for c in got):
        raise RuntimeError(f"{tier.name} tier: a get missed ({tier.stats})")
    for c in got:
        c.release()  # type: ignore[union-attr]


def _rates(name: str, times: dict[str, list[float]], total: int) -> dict[str, float]:
    """GB/s from median times; ratios as the median of per-round time ratios, raw/tier
    and tier/MAC (the passes compared run in the same round, close in time)."""
    out = {f"{name}_{kind}_{op}_gbps": total / statistics.median(times[f"{kind}_{op}"]) / 1e9
           for kind in ("raw", "tier", "mac") for op in ("put", "get")}
    for op in ("put", "get"):
        for ratio, (base, kind) in (("ratio", ("raw", "tier")), ("mac_ratio", ("tier", "mac"))):
            pairs = zip(times[f"{base}_{op}"], times[f"{kind}_{op}"])
            out[f"{name}_{op}_{ratio}"] = statistics.median(b / t for b, t in pairs)
    return out


def run(args: Any) -> dict[str, Any]:
    """Run the benchmark; returns the result dict printed by the CLI."""
    chunk_bytes = int(args.chunk_mib * 2**20)
    items = make_items(chunk_bytes, args.chunks)
    res: dict[str, Any] = {"setup": {
        "chunk_bytes": chunk_bytes, "chunks": args.chunks, "batch_bytes": chunk_bytes * args.chunks,
        "chunk_meta": f"{items[0][1].meta.dtype} {items[0][1].meta.shape}",
        "repeats": args.repeats, "disk_path": args.disk_path or tempfile.gettempdir(),
        "disk_fs": filesystem_of(args.disk_path or tempfile.gettempdir()),
        "disk_fsync": args.fsync,
        "disk_reads": ("cold: before each read pass (raw and tier alike) the files are fsynced "
                       "and dropped with posix_fadvise(DONTNEED)") if args.cache == "cold"
                      else "warm: raw and tier read from the page cache (files read once "
                           "untimed before each pass)",
        "disk_state": "before every pass: sync, drop all bench files from the page cache, "
                      f"sleep {args.settle_s} s",
        "disk_writes": f"buffered writes, fsync={args.fsync} for raw and tier alike",
        "reads_into": "raw: buffers allocated once; tier: its read pool (released chunks)"}}
    if not args.no_disk:
        res.update(bench_disk(items, args))
    if not args.no_redis:
        res.update(bench_redis(items, args))
    return res
