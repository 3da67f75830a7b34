"""The disk tier: the conformance suite, then what only a folder of files can do."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvtier.codecs import HEADER_SIZE, ChunkData, ChunkMac, ChunkMeta
from kvtier.config import DiskConfig
from kvtier.keys import ChunkKey
from kvtier.tiers.disk import files as files_mod
from kvtier.tiers.base import Tier
from kvtier.tiers.disk import DiskTier
from tests.tier_conformance import TierConformance, as_version, make_chunk, new_keys, same

PAYLOAD = 8192
FILE = HEADER_SIZE + PAYLOAD


def disk(path: Path, chunks: int = 1024, mac: ChunkMac | None = None, **kw: object) -> DiskTier:
    return DiskTier(DiskConfig(path=str(path), max_bytes=chunks * FILE, **kw), mac=mac)


def chunk(seed: int = 0) -> ChunkData:
    return make_chunk(ChunkMeta("uint8", (PAYLOAD,)), seed)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


class TestDiskTier(TierConformance):
    payload_max = PAYLOAD

    def make_tier(self, tmp_path: object, *, capacity_chunks: int | None = None) -> Tier:
        return disk(Path(str(tmp_path)) / "chunks", capacity_chunks or 1024)

    def corrupt(self, tier: Tier, key: ChunkKey) -> None:
        assert isinstance(tier, DiskTier)
        flip(tier.path_of(key), HEADER_SIZE + 10)

    def set_version(self, tier: Tier, key: ChunkKey, version: int) -> None:
        assert isinstance(tier, DiskTier)
        path = tier.path_of(key)
        data = path.read_bytes()
        path.write_bytes(as_version(data[:HEADER_SIZE], version) + data[HEADER_SIZE:])

    def break_backend(self, tier: Tier) -> None:
        assert isinstance(tier, DiskTier)
        shutil.rmtree(tier.root)

    def restore_backend(self, tier: Tier) -> None:
        assert isinstance(tier, DiskTier)
        tier.root.mkdir()


class TestSignedDiskTier(TestDiskTier):
    """The suite again with the cluster's integrity key: chunks signed on write, their MAC
    checked on read (a batch's on the helper thread); damage is still ``corrupt``."""

    def make_tier(self, tmp_path: object, *, capacity_chunks: int | None = None) -> Tier:
        return disk(Path(str(tmp_path)) / "chunks", capacity_chunks or 1024,
                    mac=ChunkMac(b"a cluster secret of 32 bytes or more"))


def test_layout_is_one_file_per_chunk_with_header_and_payload(tmp_path: Path) -> None:
    tier, key = disk(tmp_path), new_keys(1)[0]
    tier.put_many([(key, chunk())])
    path = tmp_path / key.hex()[:2] / f"{key.hex()}.kvc"
    assert tier.path_of(key) == path and path.stat().st_size == FILE
    assert path.read_bytes()[HEADER_SIZE:] == bytes(chunk().payload)


def test_restart_rebuilds_the_index_in_lru_order(tmp_path: Path) -> None:
    a, keys = disk(tmp_path, chunks=4), new_keys(5)
    for i, k in enumerate(keys[:4]):
        a.put_many([(k, chunk(i))])
        os.utime(a.path_of(k), (1000 + i, 1000 + i))  # distinct, ordered write times
    a.get_many([keys[0]])  # stamps keys[0]'s atime: most recently used
    a.close()
    b = disk(tmp_path, chunks=4)
    assert b.usage().num_chunks == 4 and b.usage().used_bytes == 4 * FILE
    b.put_many([(keys[4], chunk(4))])  # evicts the least recently used: keys[1]
    assert b.contains_many(keys) == [True, False, True, True, True]
    kept = (0, 2, 3)
    assert all(same(c, chunk(i)) for i, c in zip(kept, b.get_many([keys[i] for i in kept])))


def test_start_over_capacity_evicts_and_removes_stray_temp_files(tmp_path: Path) -> None:
    a, keys = disk(tmp_path), new_keys(3)
    for i, k in enumerate(keys):
        a.put_many([(k, chunk(i))])
        os.utime(a.path_of(k), (1000 + i, 1000 + i))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    shard = a.path_of(keys[0]).parent
    tag = files_mod.HOST_TAG
    stale_dead = shard / f".{keys[0].hex()}.{tag}.{dead}.0.tmp"
    other_host = "0badc0de" if tag != "0badc0de" else "c0ffee00"
    stale_old = shard / f".{keys[0].hex()}.{other_host}.1.0.tmp"
    live = shard / f".{keys[0].hex()}.{tag}.{os.getpid()}.7.tmp"
    for p in (stale_dead, stale_old, live):
        p.write_bytes(b"partial")
    os.utime(stale_old, (1, 1))
    a.close()  # a restart: the folder is b's alone, so b's smaller budget is the folder's
    b = disk(tmp_path, chunks=2)
    assert b.usage().num_chunks == 2 and b.contains_many(keys) == [False, True, True]
    assert not stale_dead.exists() and not stale_old.exists() and live.exists()


def test_clean_up_removes_only_kvtier_temp_files(tmp_path: Path) -> None:
    """Only names exactly as kvtier writes them go; a user's files in the folder stay,
    however old and whatever they look like."""
    a, key = disk(tmp_path), new_keys(1)[0]
    a.put_many([(key, chunk())])
    a.close()
    shard, h = a.path_of(key).parent, key.hex()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = shard / f".{h}.{files_mod.HOST_TAG}.{dead}.0.tmp"
    theirs = [tmp_path / "notes.tmp", tmp_path / ".foo.tmp", shard / "notes.tmp",
              shard / ".foo.tmp", shard / f".{h}.tmp", shard / f".{h}.host.{dead}.0.tmp",
              shard / f".{h.upper()}.{files_mod.HOST_TAG}.{dead}.0.tmp",
              shard / f".{h}.{files_mod.HOST_TAG}.{dead}.0.tmp.bak",
              shard / f"{h.upper()}.kvc", tmp_path / "zz" / ".foo.tmp"]
    (tmp_path / "zz").mkdir()
    for p in [ours, *theirs]:
        p.write_bytes(b"mine")
        os.utime(p, (1, 1))  # decades old: age alone never makes a file ours
    b = disk(tmp_path, chunks=1)
    assert not ours.exists() and all(p.exists() for p in theirs)
    assert sorted(b.iter_keys()) == [key]
    b.delete_many([key])
    b.clear()
    assert all(p.read_bytes() == b"mine" for p in theirs)


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier, key = disk(tmp_path), new_keys(1)[0]

    def half_then_fail(fd: int, buffers: list) -> None:
        os.write(fd, buffers[0])
        raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(files_mod, "writev_all", half_then_fail)
    assert tier.put_many([(key, chunk())]) == [False]
    assert tier.stats.errors == 1 and tier.usage().used_bytes == 0
    chunks = [p for p in tmp_path.rglob("*") if not p.name.startswith(".kvtier-")]
    assert chunks == [tier.path_of(key).parent]  # no chunk, no temp file
    monkeypatch.undo()
    assert tier.put_many([(key, chunk())]) == [True]


def test_write_in_progress_is_never_visible(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    tier, other = disk(tmp_path), disk(tmp_path)
    key = new_keys(1)[0]
    halfway, resume = threading.Event(), threading.Event()
    real = files_mod.writev_all

    def slow(fd: int, buffers: list) -> None:
        os.write(fd, buffers[0])
        halfway.set()
        resume.wait(10)
        real(fd, buffers[1:])
    monkeypatch.setattr(files_mod, "writev_all", slow)
    writer = threading.Thread(target=tier.put_many, args=([(key, chunk())],))
    writer.start()
    assert halfway.wait(10)
    assert other.contains_many([key]) == [False] and other.get_many([key]) == [None]
    assert not tier.path_of(key).exists()
    resume.set()
    writer.join(10)
    assert tier.path_of(key).stat().st_size == FILE
    assert same(other.get_many([key])[0], chunk()) and other.stats.corrupt == 0


def test_two_tiers_on_one_folder_see_each_other(tmp_path: Path) -> None:
    a, b, keys = disk(tmp_path), disk(tmp_path), new_keys(2)
    a.put_many([(keys[0], chunk(0))])
    assert b.contains_many(keys) == [True, False]  # adopted from the folder
    assert same(b.get_many([keys[0]])[0], chunk(0))
    assert b.put_many([(keys[0], chunk(0))]) == [True] and b.stats.puts == 0
    b.put_many([(keys[1], chunk(1))])
    assert a.contains_prefix(keys) == 2 and sorted(a.iter_keys()) == sorted(keys)
    assert b.delete_many(keys[:1]) == 1
    assert a.contains_many(keys[:1]) == [False] and a.get_many(keys[:1]) == [None]
    assert a.stats.errors == a.stats.corrupt == 0 and a.usage().num_chunks == 1


@pytest.mark.parametrize("damage", ["truncate", "header", "other_key", "empty"])
def test_damaged_files_are_deleted_and_counted(tmp_path: Path, damage: str) -> None:
    tier, keys = disk(tmp_path), new_keys(2)
    tier.put_many([(k, chunk(i)) for i, k in enumerate(keys)])
    path = tier.path_of(keys[0])
    if damage == "truncate":
        os.truncate(path, FILE - 1)
    elif damage == "header":
        flip(path, 20)
    elif damage == "other_key":
        os.replace(tier.path_of(keys[1]), path)
    else:
        os.truncate(path, 0)
    assert tier.get_many(keys[:1]) == [None]
    assert tier.stats.corrupt == 1 and tier.stats.errors == 0 and not path.exists()


def test_unreadable_file_is_an_error_not_corruption(tmp_path: Path) -> None:
    tier, key = disk(tmp_path), new_keys(1)[0]
    tier.put_many([(key, chunk())])
    path = tier.path_of(key)
    path.unlink()
    path.mkdir()  # something unreadable where the file was (chmod does not stop root)
    assert tier.get_many([key]) == [None]
    assert tier.stats.errors == 1 and tier.stats.corrupt == 0 and path.is_dir()


def test_batch_larger_than_the_tier_keeps_its_first_chunks(tmp_path: Path) -> None:
    tier, keys = disk(tmp_path, chunks=3), new_keys(5)
    assert tier.put_many([(k, chunk(i)) for i, k in enumerate(keys)]) == [True] * 3 + [False] * 2
    assert tier.stats.dropped == 2 and tier.stats.evictions == 0
    big = make_chunk(ChunkMeta("uint8", (4 * PAYLOAD,)))
    assert tier.put_many([(new_keys(1)[0], big)]) == [False] and tier.stats.dropped == 3


def test_fsync_writes_round_trip(tmp_path: Path) -> None:
    tier, key = disk(tmp_path, fsync=True), new_keys(1)[0]
    assert tier.put_many([(key, chunk())]) == [True]
    assert same(tier.get_many([key])[0], chunk())


def test_released_read_buffers_are_reused_within_the_pool_budget(tmp_path: Path) -> None:
    tier = DiskTier(DiskConfig(path=str(tmp_path), max_bytes=64 * FILE, read_pool_bytes=PAYLOAD))
    keys = new_keys(3)
    tier.put_many([(k, chunk(i)) for i, k in enumerate(keys)])
    a, b = tier.get_many(keys[:2])
    a_buf = a.payload
    a.release()
    b.release()  # the pool holds one payload: b's buffer is dropped
    assert tier.pool.nbytes == PAYLOAD
    c = tier.get_many(keys[2:])[0]
    assert c.payload is a_buf and same(c, chunk(2)) and tier.pool.nbytes == 0
    c.release()
    c.release()  # idempotent: given back once
    assert tier.pool.nbytes == PAYLOAD


def test_a_write_landing_during_a_rescan_stays_counted(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder rescan that lists a shard before a write's rename lands must not lose
    that write (seen under load in CI: a put reported its own fresh chunk absent)."""
    from kvtier.tiers.disk import folder_index

    tier, (key,) = disk(tmp_path), new_keys(1)
    real_scan = folder_index.folder.scan

    def scan_then_write(root: str) -> object:
        listed = real_scan(root)  # the folder as it was: without ``key``
        monkeypatch.setattr(folder_index.folder, "scan", real_scan)
        assert tier.put_many([(key, chunk(1))]) == [True]
        return listed

    monkeypatch.setattr(folder_index.folder, "scan", scan_then_write)
    tier._index.rescan()
    assert tier.usage().num_chunks == 1 and tier.contains_many([key]) == [True]
