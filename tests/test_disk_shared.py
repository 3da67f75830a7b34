"""A disk folder shared by several processes and users: one budget for the folder,
global LRU eviction one process at a time, and reads that need no write permission."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from kvtier.codecs import HEADER_SIZE, ChunkData, ChunkMeta
from kvtier.config import DiskConfig
from kvtier.tiers.disk import folder
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.disk.folder_index import RESCAN_FRACTION
from tests.tier_conformance import make_chunk, new_keys, same

PAYLOAD = 8192
FILE = HEADER_SIZE + PAYLOAD
REPO = Path(__file__).resolve().parent.parent


def disk(path: Path, chunks: int) -> DiskTier:
    return DiskTier(DiskConfig(path=str(path), max_bytes=chunks * FILE))


def chunk(seed: int = 0) -> ChunkData:
    return make_chunk(ChunkMeta("uint8", (PAYLOAD,)), seed)


def folder_bytes(root: Path) -> int:
    total = 0
    for p in root.glob("??/*.kvc"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass  # evicted between glob and stat
    return total


# -- reads need no write permission -----------------------------------------------

@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A tmpfs at ``rw`` and a read-only bind mount of it at ``ro``, made for real.

    Needs root and a working ``mount`` (this sandbox has both); skipped otherwise,
    since chmod proves nothing as root (root bypasses permission bits).
    """
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root")
    mounted: list[Path] = []
    try:
        for argv in (["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(rw)],
                     ["mount", "--bind", str(rw), str(ro)],
                     ["mount", "-o", "remount,bind,ro", str(ro)]):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            if r.returncode:
                pytest.skip(f"cannot make a read-only mount here: {' '.join(argv)}: {r.stderr}")
            if argv[1] != "-o":
                mounted.append(Path(argv[-1]))
        yield rw, ro
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=10)


def test_reads_from_a_read_only_mount_are_hits_without_errors(
        read_only_view: tuple[Path, Path]) -> None:
    """For real: a read-only bind mount (EROFS on utime, unlink, create)."""
    rw, ro = read_only_view
    writer, keys = disk(rw, 8), new_keys(3)
    writer.put_many([(k, chunk(i)) for i, k in enumerate(keys[:2])])
    writer.close()
    for lock in (folder.USERS_LOCK, folder.EVICT_LOCK):
        (rw / lock).unlink()  # as a folder from another tool: no lock files to open
    reader = disk(ro, 8)
    assert reader.contains_many(keys) == [True, True, False]
    got = reader.get_many(keys)
    assert same(got[0], chunk(0)) and same(got[1], chunk(1)) and got[2] is None
    assert (reader.stats.errors, reader.stats.corrupt, reader.stats.hits) == (0, 0, 2)
    assert reader.put_many([(keys[2], chunk(2))]) == [False]  # a write fails, counted
    assert reader.stats.errors == 1 and reader.usage().num_chunks == 2
    reader.close()


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES, errno.EROFS])
def test_a_read_that_cannot_stamp_the_file_is_a_hit_kept_recent_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """Injected: os.utime fails as for another user's file (EPERM/EACCES), which root
    cannot reproduce for real, or a read-only mount (EROFS, real in the test above)."""
    tier, keys = disk(tmp_path, 4), new_keys(5)
    for i, k in enumerate(keys[:4]):
        tier.put_many([(k, chunk(i))])
        os.utime(tier.path_of(k), (1000 + i, 1000 + i))  # file times: keys[0] oldest
    tier.rescan()

    def refuse(*args: object, **kw: object) -> None:
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, "utime", refuse)
    got = tier.get_many(keys[:1])[0]
    monkeypatch.undo()
    assert same(got, chunk(0)) and tier.stats.errors == 0
    assert os.stat(tier.path_of(keys[0])).st_mtime == 1000  # the file does not know
    tier.put_many([(keys[4], chunk(4))])  # full: evicts the least recently used
    assert tier.contains_many(keys) == [True, False, True, True, True]


# -- one folder, one budget ---------------------------------------------------------

WORKER = textwrap.dedent("""
    import os, sys
    from kvtier.codecs import ChunkMeta
    from kvtier.config import DiskConfig
    from kvtier.tiers.disk import DiskTier
    from tests.tier_conformance import make_chunk
    root, max_bytes, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    tier = DiskTier(DiskConfig(path=root, max_bytes=max_bytes))
    print("ready", tier.max_bytes, flush=True)
    sys.stdin.readline()  # go
    keys = [os.urandom(16) for _ in range(n)]
    ok = sum(tier.put_many([(k, make_chunk(ChunkMeta("uint8", (8192,)), seed))])[0]
             for k in keys)
    print("done", ok, tier.stats.evictions, tier.stats.dropped, " ".join(k.hex() for k in keys),
          flush=True)
    sys.stdin.readline()  # hold the folder open until told to go
    tier.close()
""")


class Worker:
    """A process with its own DiskTier on the folder; it writes ``n`` chunks when told."""

    def __init__(self, root: Path, max_bytes: int, n: int, seed: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(max_bytes), str(n), str(seed)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.budget = int(self._line("ready")[1])

    def _line(self, tag: str) -> list[str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line and line[0] == tag, (line, self.proc.stderr.read() if self.proc.poll() else "")
        return line

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def done(self) -> tuple[int, int, list[str]]:
        """(chunks written, evictions, keys written)."""
        line = self._line("done")
        return int(line[1]), int(line[2]), line[4:]

    def close(self) -> str:
        """Let it finish; its stderr (warnings)."""
        if self.proc.poll() is None:
            self.go()
        _, err = self.proc.communicate(timeout=30)
        return err


def test_processes_sharing_a_folder_keep_one_budget(tmp_path: Path) -> None:
    budget, n_procs, per_proc = 40 * FILE, 3, 120
    workers = [Worker(tmp_path, budget, per_proc, seed) for seed in range(n_procs)]
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], folder_bytes(tmp_path))
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for w in workers:
            w.go()
        results = [w.done() for w in workers]
    finally:
        stop.set()
        watcher.join(10)
        for w in workers:
            w.close()
    # Documented slack: each process's writes since its last scan (1/RESCAN_FRACTION of
    # the budget, here under 2 files) plus one write in flight.
    slack = n_procs * (budget // RESCAN_FRACTION + 2 * FILE)
    final = folder_bytes(tmp_path)
    assert all(w.budget == budget for w in workers)
    assert sum(ok for ok, _, _ in results) == n_procs * per_proc  # nothing dropped
    assert final <= budget + slack and peak[0] <= budget + slack, (final, peak[0], budget)
    assert final >= budget - slack  # evicted what was needed, not everything
    assert sum(ev for _, ev, _ in results) >= n_procs * per_proc - (budget + slack) // FILE


def test_a_process_with_a_smaller_budget_follows_the_folders(tmp_path: Path) -> None:
    first = Worker(tmp_path, 40 * FILE, 30, 0)
    first.go()
    ok, _, first_keys = first.done()  # and it stays open
    small = Worker(tmp_path, 10 * FILE, 5, 1)
    small.go()
    ok_small, evictions, small_keys = small.done()
    warning = small.close()
    assert (ok, ok_small, evictions) == (30, 5, 0) and small.budget == 40 * FILE
    assert "using it instead of this process's disk.max_bytes" in warning
    assert (tmp_path / folder.BUDGET_FILE).read_text().strip() == str(40 * FILE)
    names = {p.stem for p in tmp_path.glob("??/*.kvc")}
    assert names == set(first_keys) | set(small_keys)  # nobody's files were deleted
    first.close()


def test_the_budget_file_is_the_folders_and_edits_take_effect(tmp_path: Path) -> None:
    a, b, keys = disk(tmp_path, 8), disk(tmp_path, 100), new_keys(9)
    assert a.max_bytes == b.max_bytes == 8 * FILE  # b joined a folder in use
    a.put_many([(k, chunk(i)) for i, k in enumerate(keys[:8])])
    (tmp_path / folder.BUDGET_FILE).write_text(f"{4 * FILE}\n")  # an operator shrinks it
    b.rescan()  # as b's writes do after 1/RESCAN_FRACTION of the budget, or a minute
    b.put_many([(keys[8], chunk(8))])  # evicts to fit the new budget
    assert b.max_bytes == 4 * FILE and folder_bytes(tmp_path) <= 4 * FILE
    assert b.contains_many(keys[5:]) == [True] * 4  # the most recent stayed
    a.close()
    b.close()
    c = disk(tmp_path, 6)  # alone now: its own budget becomes the folder's
    assert c.max_bytes == 6 * FILE
    assert (tmp_path / folder.BUDGET_FILE).read_text().strip() == str(6 * FILE)


def test_files_written_in_one_clock_tick_keep_their_order(tmp_path: Path) -> None:
    """The kernel stamps files from a coarse clock: chunks written within a few ms got
    equal times, and another process's scan ordered them by directory order (this made
    the budget test above flaky). Writes and reads now stamp from a fine clock."""
    tier, keys = disk(tmp_path, 16), new_keys(12)
    tier.put_many([(k, chunk(i)) for i, k in enumerate(keys)])
    stamps = [os.stat(tier.path_of(k)).st_mtime_ns for k in keys]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    tier.get_many(keys[:1])[0].release()  # a read moves it to the end
    assert os.stat(tier.path_of(keys[0])).st_mtime_ns > stamps[-1]


def test_a_file_another_process_read_since_the_scan_is_not_evicted(tmp_path: Path) -> None:
    a, b, keys = disk(tmp_path, 4), disk(tmp_path, 4), new_keys(5)
    for i, k in enumerate(keys[:4]):
        a.put_many([(k, chunk(i))])
        os.utime(a.path_of(k), (1000 + i, 1000 + i))
    a.rescan()  # a's order: keys[0] least recently used
    assert same(b.get_many(keys[:1])[0], chunk(0))  # b reads it: the file's times say so
    a.put_many([(keys[4], chunk(4))])
    assert a.contains_many(keys) == [True, False, True, True, True]


def test_eviction_waits_for_the_folder_lock_a_bounded_time(tmp_path: Path) -> None:
    tier, keys = disk(tmp_path, 2), new_keys(3)
    tier.put_many([(k, chunk(i)) for i, k in enumerate(keys[:2])])
    held = os.open(tmp_path / folder.EVICT_LOCK, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another process evicting, and stuck
    try:
        t0 = time.monotonic()
        assert tier.put_many([(keys[2], chunk(2))]) == [False]
        assert time.monotonic() - t0 < 1.5 * folder.LOCK_WAIT_S + 0.5
        assert tier.stats.dropped == 1 and folder_bytes(tmp_path) == 2 * FILE
    finally:
        os.close(held)
    assert tier.put_many([(keys[2], chunk(2))]) == [True] and tier.stats.evictions == 1
