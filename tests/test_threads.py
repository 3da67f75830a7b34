"""kvtier's threads carry their names into the kernel, so their CPU time is readable from
outside the process (``kvtier bench itl`` reports it per round)."""

from __future__ import annotations

import os
import threading
import time

from kvtier.threads import NamedThread, os_name, pool, thread_cpu


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_named_thread_and_a_pools_threads_are_named_and_their_cpu_counted() -> None:
    before = thread_cpu([os.getpid()])
    spun, release = threading.Event(), threading.Event()

    def spin_then_park() -> None:
        _spin(0.3)
        spun.set()
        release.wait(30)

    t = NamedThread(target=spin_then_park, name="kvtier-spinner")
    t.start()
    seen: list[str] = []
    with pool(2, "kvtier-busy") as p:
        def work() -> None:
            tid = threading.get_native_id()
            with open(f"/proc/self/task/{tid}/comm") as f:
                seen.append(f.read().strip())
            _spin(0.2)
        list(p.map(lambda _: work(), range(2)))
        assert spun.wait(30)
        during = thread_cpu([os.getpid()])  # the pool's threads and the spinner alive
    release.set()
    t.join()
    assert set(seen) <= {"kv-busy_0", "kv-busy_1"} and seen
    assert during.get("kv-busy", 0.0) >= 0.3  # both threads of the pool, summed as one role
    assert during.get("kv-spinner", 0.0) >= 0.25  # its 0.3 s, in 10 ms ticks
    assert during.get("engine", 0.0) >= before.get("engine", 0.0) > 0  # the rest of the
    # process (the test's own thread, alive throughout) under one name


def test_kernel_names_fit_the_kernels_fifteen_bytes() -> None:
    assert os_name("kvtier-fetch_0") == "kv-fetch_0"
    assert os_name("kvtier-control-pins") == "kv-control-pins"
    assert len(os_name("kvtier-transfer-conn")) == 15
    assert thread_cpu([2**22 + 12345]) == {}  # no such process: nothing, no error


def test_process_tree_finds_the_processes_below() -> None:
    import subprocess
    import sys

    from kvtier.threads import process_tree

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in process_tree(os.getpid())
        assert process_tree(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()


def test_bench_itl_runs_vllms_own_client_and_reads_each_servers_threads() -> None:
    """``kvtier bench itl --toy``: vLLM alone and kvtier, real servers, vLLM's own
    ``bench serve``, one round; every request completes, and the CPU time of each server's
    threads is read. kvtier's server (its canary on every hit, so it has a ``kv-canary``
    thread) shows its own named threads; vLLM alone has none. Its numbers are not judged
    here (a toy round's few checks take less than the kernel's 10 ms tick)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "kvtier.cli.main", "bench", "itl", "--toy",
                           "--shape", "tiny", "--configs", "vllm,kvtier-verify-all", "--json"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    kv, alone = res["configs"]["kvtier-verify-all"], res["configs"]["vllm"]
    assert kv["completed"] == alone["completed"] == 8
    assert kv["engine_cpu_s"] > 0 and alone["engine_cpu_s"] > 0
    assert "kv-canary" in kv["rounds"][0]["cpu_s"], kv["rounds"][0]["cpu_s"]
    assert kv["kvtier_threads_cpu_s"] >= 0
    assert not any(k.startswith("kv-") for k in alone["rounds"][0]["cpu_s"])
    # Where the prompt tokens came from, by vLLM's own count (kvtier checks every hit here,
    # so it serves none; vLLM alone has no KV layer at all).
    for r in (kv, alone):
        assert sum(r["prompt_tokens"].values()) >= 8 * 1024, r["prompt_tokens"]
    assert alone["prompt_tokens"]["external_kv_transfer"] == 0


def test_pin_process_binds_every_thread_and_process_named_finds_the_process() -> None:
    """What the benchmarks do to vLLM's engine-core process (bound beside the worker's
    main thread), on a child of this test with two threads."""
    import subprocess
    import sys

    from kvtier.threads import pin_process, process_named

    code = ("import threading, time\n"
            "threading.Thread(target=time.sleep, args=(30,)).start()\n"
            "print('up', flush=True)\ntime.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        cpu = {min(os.sched_getaffinity(0))}
        assert pin_process(child.pid, cpu) == 2
        assert all(os.sched_getaffinity(int(t)) == cpu for t in os.listdir(
            f"/proc/{child.pid}/task"))
        comm = open(f"/proc/{child.pid}/comm").read().strip()
        assert process_named([os.getpid(), child.pid], comm) in (os.getpid(), child.pid)
        assert process_named([child.pid], "no-such-name") is None
        assert pin_process(2**22 + 12345, cpu) == 0  # gone: nothing bound, no error
    finally:
        child.kill()
        child.wait()
