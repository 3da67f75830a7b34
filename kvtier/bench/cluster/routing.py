"""``kvtier bench cluster --part routing``: KV-aware routing vs round-robin, same run.

Setup: two real ``vllm serve`` instances with kvtier (memory tier only; vLLM's
own prefix cache off, so every reused prompt token is a kvtier hit), each
registered with one ``kvtier controller`` and publishing its KV events to it,
and two ``kvtier router`` processes in front of both: ``--policy round_robin``
(the baseline) and ``--policy kv`` (the KV-aware rule of
:mod:`kvtier.cluster.choice`). The multi-round-qa workload
(:mod:`kvtier.bench.serve.workloads`: users with a long shared history that
grows every round) is sent through the round-robin router, then the same
workload with other tokens (the next seed: same shapes, nothing cached from
the first run can hit) through the KV-aware router. Both instances first
answer one untimed prompt of the longest length, so neither run pays the
engine's first-call costs. Reported for both: hit rate (prompt tokens vLLM
reports as cached / prompt tokens), TTFT p50/p90, QPS, and where the
requests went.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtier.bench.serve import analysis
from kvtier.bench.serve.client import run_workload, warm_up
from kvtier.bench.serve.servers import EngineSettings, ServeConfig, Servers, start_all
from kvtier.bench.serve.workloads import MultiRoundQA
from kvtier.testing.cluster import KvtierProcess, controller, router
from kvtier.testing.models import build_model, make_document
from kvtier.testing.procs import free_port, wait_until
from kvtier.testing.vllm_cpu import fast_dtype

BLOCK = 128
QUICK = dict(users=6, rounds=5, system_tokens=600, context_tokens=1500, turn_tokens=128,
             answer_tokens=64, max_tokens=16, think_time_s=0.2)
FULL = dict(users=8, rounds=5, system_tokens=1000, context_tokens=2000, turn_tokens=200,
            answer_tokens=100, max_tokens=32, think_time_s=0.5)
POLICIES = ("round_robin", "kv")


def _instance(name: str, eng: EngineSettings, ctl: KvtierProcess, out: Path,
              budget: int) -> Servers:
    events = {"enable_kv_cache_events": True, "publisher": "zmq",
              "endpoint": ctl.events, "topic": name}
    eng = replace(eng, extra_args=("--no-enable-prefix-caching", "--kv-events-config",
                                   json.dumps(events)))
    srv = Servers(ServeConfig("kvtier-memory", sys.executable), eng, out / f"{name}.log")
    control = free_port()
    srv.cfg.kv_transfer = {
        "kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier.connectors.vllm",
        "kv_role": "kv_both", "kv_connector_extra_config": {
            "tiers": ["memory"], "memory.max_bytes": budget, "control.port": control,
            "controller.url": ctl.url, "controller.instance_id": name,
            "controller.instance_url": srv.base_url, "controller.heartbeat_s": 1.0}}
    return srv


def _decisions(rtr: KvtierProcess) -> dict[str, float]:
    """The router's ``kvtier_router_requests_total`` by instance and reason."""
    text = rtr.call("/metrics")[1]
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kvtier_router_requests_total{"):
            labels, value = line[len("kvtier_router_requests_total{"):].split("} ")
            out[labels.replace('"', "")] = float(value)
    return out


def run(args: Any) -> dict[str, Any]:
    """Both policies on the same two instances; the summary dict (see the module doc)."""
    model = str(Path(args.model)) if getattr(args, "model", None) else str(build_model("tiny"))
    sizes = dict(QUICK if args.quick else FULL)
    seed = getattr(args, "seed", 0)
    shape = replace(MultiRoundQA(), **sizes)
    workloads = {p: shape.build(model, seed + i) for i, p in enumerate(POLICIES)}
    workload = workloads["kv"]
    max_len = -(-(workload.max_prompt_tokens + 64) // BLOCK) * BLOCK
    users = len(workload.users)
    eng = EngineSettings(model=model, max_model_len=max_len,
                         num_gpu_blocks=users * (max_len // BLOCK) + 1, kv_budget_bytes=1 << 30,
                         dtype=fast_dtype() if getattr(args, "dtype", "auto") == "auto"
                         else args.dtype)
    out = Path(getattr(args, "out", None) or tempfile.mkdtemp(prefix="kvtier-bench-cluster-"))
    out.mkdir(parents=True, exist_ok=True)
    setup = {"workload": workload.name, "settings": workload.settings,
             "requests": workload.num_requests, "model": model, "instances": 2,
             "max_model_len": max_len, "dtype": eng.dtype, "concurrency": users,
             "kvtier": "memory tier, 1 GiB per instance; vLLM prefix caching off",
             "alpha": 0.5, "seeds": {p: seed + i for i, p in enumerate(POLICIES)}}
    _say(args, f"routing: {workload.num_requests} requests ({users} users x "
               f"{sizes['rounds']} rounds), longest prompt {workload.max_prompt_tokens} tokens, "
               f"2 instances; logs in {out}")
    summary: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    with controller(out / "controller.log", ttl_s=10.0) as ctl:
        servers = [_instance(n, eng, ctl, out, eng.kv_budget_bytes) for n in ("inst-0", "inst-1")]
        errors = start_all(servers)
        if errors:
            raise errors[0]
        try:
            urls = [a for s in servers for a in ("--instance", s.base_url)]
            wait_until(lambda: len(ctl.call("/v1/instances")[1]["instances"]) == 2, 60,
                       "both instances registered")
            for s in servers:
                warm_up(s.base_url, model, make_document(model, workload.max_prompt_tokens,
                                                         seed=7_777_777))
            for policy in POLICIES:
                with router(out / f"router-{policy}.log", ["--controller", ctl.url,
                                                           "--model-path", model, "--policy",
                                                           policy, *urls]) as rtr:
                    _say(args, f"[{policy}] sending {workload.num_requests} requests")
                    results, wall = asyncio.run(run_workload(rtr.url, model, workloads[policy],
                                                             users))
                    summary[policy] = analysis.summarize(workload.name, results)
                    summary[policy].update(wall_s=wall, decisions=_decisions(rtr))
                s = summary[policy]
                _say(args, f"[{policy}] hit rate {s['hit_rate']:.1%}, TTFT p50 "
                           f"{s['ttft_p50_s'] * 1e3:.0f} ms p90 {s['ttft_p90_s'] * 1e3:.0f} ms, "
                           f"QPS {s['qps']:.2f}, errors {s['errors']}")
        finally:
            for s in servers:
                s.__exit__()
    rr, kv = summary["round_robin"], summary["kv"]
    return {"part": "routing", "setup": setup, "summary": summary,
            "router_hit_rate": kv["hit_rate"], "roundrobin_hit_rate": rr["hit_rate"],
            "router_ttft_p50_s": kv["ttft_p50_s"], "roundrobin_ttft_p50_s": rr["ttft_p50_s"],
            "router_ttft_p90_s": kv["ttft_p90_s"], "roundrobin_ttft_p90_s": rr["ttft_p90_s"],
            "router_qps": kv["qps"], "roundrobin_qps": rr["qps"],
            "ttft_p50_speedup": analysis._ratio(rr["ttft_p50_s"], kv["ttft_p50_s"]),
            "total_s": time.perf_counter() - t_start}


def table(res: dict[str, Any]) -> str:
    rows = [f"{'policy':<12} {'hit rate':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'QPS':>6}  "
            "requests per instance (reason)"]
    for policy in POLICIES:
        s = res["summary"][policy]
        where = ", ".join(f"{k}: {v:g}" for k, v in sorted(s["decisions"].items()))
        rows.append(f"{policy:<12} {s['hit_rate']:>9.1%} {s['ttft_p50_s'] * 1e3:>7.0f}ms "
                    f"{s['ttft_p90_s'] * 1e3:>7.0f}ms {s['qps']:>6.2f}  {where}")
    return "\n".join(rows)


def _say(args: Any, msg: str) -> None:
    print(f"[bench cluster] {msg}", file=sys.stderr if args.json else sys.stdout, flush=True)
