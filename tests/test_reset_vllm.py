"""New weights, then ``reset_prefix_cache(reset_connector=True)``, in real vLLM.

The recipe of README.md ("New weights: reset kvtier"): an instance serves a
prompt (memory and disk), its weights change in place (the same model name, so
the same keys: an RL loop's update, a hot swap), it is reset, and it is asked
the prompt again. The first disk write is held on purpose
(``slow_tier/sitecustomize.py``) until the reset has cleared the folder, so it
is in flight across the reset: before the barrier, it landed after the clear,
and a later instance was served the old model's KV.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vllm_run import (CHUNK, doc, kvtier_cfg, model, req, run,  # noqa: F401
                            run_instance, same_output)

pytestmark = pytest.mark.vllm

SLOW = Path(__file__).parent / "slow_tier"
ROOT = Path(__file__).resolve().parents[1]
NEW_WEIGHTS = ["perturb_weights"]


def test_after_new_weights_and_a_reset_nothing_from_before_is_served(model: str,
                                                                     tmp_path: Path) -> None:
    prompt = doc(model, 31)
    cfg = kvtier_cfg(tmp_path)
    held_write = {"PYTHONPATH": f"{SLOW}{os.pathsep}{ROOT}", "TEST_DISK_HOLD_FIRST_WRITE": "1"}
    swapped = run_instance({"model": model, "kvtier": cfg, "prefix_caching": False,
                            "rounds": [[req(prompt)], [req(prompt)]], "env": held_write,
                            "actions": {"1": NEW_WEIGHTS + ["reset_connector"]}})
    assert swapped["actions"] == {"1": [4, True]}  # 4 layers changed; the reset succeeded
    (before,), (after,) = swapped["rounds"]
    assert before["token_ids"] != after["token_ids"]  # the new weights answer otherwise
    assert after["num_cached_tokens"] == 0  # nothing kvtier held before the swap
    # vLLM alone with the new weights from the start: a cold run, then its own hit.
    cold, own = (r[0] for r in run(model, [[req(prompt)], [req(prompt)]], None,
                                   actions={"0": NEW_WEIGHTS}))
    assert same_output(after, cold)  # a recompute with the new weights, bitwise
    # The folder holds only what was computed after the reset: a new instance with
    # the new weights gets all of it, bitwise equal to vLLM's own hit.
    (hit,), = run(model, [[req(prompt)]], cfg, prefix_caching=False,
                  actions={"0": NEW_WEIGHTS})
    assert hit["num_cached_tokens"] == 4 * CHUNK
    assert same_output(hit, own)


def test_a_reset_just_before_shutdown_leaves_no_old_kv_behind(model: str,
                                                              tmp_path: Path) -> None:
    """The workers hear of a reset only with the next step; an instance reset and then
    shut down without one still leaves only what was written before its reset's clear
    deleted (its scheduler clears the shared tiers again after the workers' last writes)."""
    prompt = doc(model, 32)
    cfg = kvtier_cfg(tmp_path)
    held_write = {"PYTHONPATH": f"{SLOW}{os.pathsep}{ROOT}", "TEST_DISK_HOLD_FIRST_WRITE": "1"}
    first = run_instance({"model": model, "kvtier": cfg, "prefix_caching": False,
                          "rounds": [[req(prompt)]], "env": held_write,
                          "actions": {"1": NEW_WEIGHTS + ["reset_connector"]}})
    assert first["actions"] == {"1": [4, True]}
    (after,), = run(model, [[req(prompt)]], cfg, prefix_caching=False,
                    actions={"0": NEW_WEIGHTS})
    assert after["num_cached_tokens"] == 0  # the old weights' chunks are gone
