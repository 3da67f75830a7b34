"""Layer 0: kvtier's threads, named in the operating system too.

Every thread kvtier starts carries its name into the kernel (``/proc/<pid>/task/<tid>/comm``,
what ``top -H`` and ``ps -L`` show) as ``kv-<role>``, so the CPU time each one takes from
the engine can be read from outside the process (:func:`thread_cpu`; ``kvtier bench itl``
reports it per round). A Python thread name alone is invisible there: the kernel shows
the engine's name for every thread of the process.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

OS_PREFIX = "kv-"
_COMM_MAX = 15  # the kernel keeps 15 bytes of a thread's name


def os_name(name: str) -> str:
    """The kernel name of kvtier thread ``name`` (``kvtier-fetch_0`` -> ``kv-fetch_0``)."""
    return (OS_PREFIX + name.removeprefix("kvtier-"))[:_COMM_MAX]


def name_this_thread() -> None:
    """Give the calling thread its kernel name (Linux; elsewhere nothing happens)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(os_name(threading.current_thread().name))
    except OSError:
        pass


class NamedThread(threading.Thread):
    """A :class:`threading.Thread` that names itself in the kernel when it starts."""

    def run(self) -> None:
        name_this_thread()
        super().run()


def pool(workers: int, prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose threads name themselves in the kernel (``prefix_N``)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=name_this_thread)


def thread_cpu(pids: Iterable[int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the threads of processes ``pids``,
    summed by kernel thread name; threads not kvtier's are summed under ``engine``.
    Processes or threads that end while being read are skipped."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in pids:
        for stat in _task_files(pid, "stat"):
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            secs = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            key = _role(comm) if comm.startswith(OS_PREFIX) else "engine"
            out[key] = out.get(key, 0.0) + secs
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux ``/proc``; what has ended is left out)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in _task_files(p, "children"):
            todo += [int(c) for c in children.split()]
    return out


def pin_process(pid: int, cpus: set[int]) -> int:
    """Bind every thread of process ``pid`` to ``cpus`` (threads it starts later inherit
    it from theirs). Returns how many threads were bound; one that ends meanwhile is
    skipped."""
    bound = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
            bound += 1
        except OSError:
            continue
    return bound


def process_named(pids: Iterable[int], prefix: str) -> int | None:
    """The first of ``pids`` whose kernel name starts with ``prefix``, or None."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip().startswith(prefix):
                    return pid
        except OSError:
            continue
    return None


def _task_files(pid: int, name: str) -> Iterator[str]:
    """The text of ``/proc/<pid>/task/<tid>/<name>`` for each thread of ``pid``; a
    process or thread that ends meanwhile is skipped."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/{name}") as f:
                yield f.read()
        except OSError:
            continue


def _role(comm: str) -> str:
    """``kv-fetch_0`` -> ``kv-fetch``: the threads of one pool together."""
    head, _, tail = comm.rpartition("_")
    return head if head and tail.isdigit() else comm
