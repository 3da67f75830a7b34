"""The save rule of the vLLM connector's scheduler side, on the stand-ins of
tests/test_vllm_plan.py: every step's saves wait a step (until the step's outcome is
known), are dropped where a load under them failed or vLLM took the request's blocks
back, and keep a finished or aborted request's blocks until they ran.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.connectors.vllm.scheduler import KvtierWorkerMeta, SchedulerPlanner
from tests.test_vllm_plan import CS, done, planner, request, step, stored

def test_a_steps_saves_run_in_the_next_step_once_its_outcome_is_known() -> None:
    p = planner()
    p.num_new_matched_tokens(request("a", 1100), 0)
    # Not in the prefill step itself (the longest step: the others' inter-token gap).
    assert not p.build(step(new=[("a", list(range(9)), 0, 1100)])).saves
    done(p)
    (save,) = p.build(step(cached=[("a", [], 1100, 1)])).saves
    assert save.start_chunk == 0 and len(save.keys[0]) == 4 and not save.release
    done(p)
    assert p.finish("a") is False  # nothing left to save: vLLM frees its blocks at once


def loaded_step(p: SchedulerPlanner, others: list[tuple[str, list[int], int, int]] = ()
                ) -> Any:
    """A step in which request "l" loads 2 chunks that "s" stored before, plus ``others``."""
    p.num_new_matched_tokens(request("s", 600), 0)
    p.build(step(new=[("s", [90, 91, 92, 93, 94], 0, 600)]))
    stored(p, "s", 2)
    hit = request("l", 600)
    assert p.num_new_matched_tokens(hit, 0) == 2 * CS
    p.accept_load(hit, 2 * CS)
    return p.build(step(new=[("l", [80, 81, 82, 83, 84], 0, 600 - 2 * CS), *others]))


def test_a_step_with_a_load_holds_its_saves_until_it_is_known_good() -> None:
    p = planner()
    p.num_new_matched_tokens(request("a", 1100), 0)
    meta = loaded_step(p, [("a", list(range(9)), 0, 1100)])
    assert meta.loads and "a" not in [s.req_id for s in meta.saves]  # outcome not known yet
    done(p)
    meta = p.build(step(cached=[("a", [], 1100, 1)]))
    (save,) = meta.saves
    assert save.start_chunk == 0 and len(save.keys[0]) == 4

def test_a_failed_load_drops_the_steps_saves_and_saves_again_after_recompute() -> None:
    p = planner()
    first = request("a", 1100)
    p.num_new_matched_tokens(first, 0)
    p.build(step(new=[("a", list(range(9)), 0, 1100)]))
    done(p)
    p.build(step(cached=[("a", [], 1100, 1)]))
    stored(p, "a", 4)
    # b shares a's first 1100 tokens and goes on: 4 chunks hit, 8 more to compute.
    b = request("b", 3000)
    assert p.num_new_matched_tokens(b, 0) == 4 * CS
    p.accept_load(b, 4 * CS)
    meta = p.build(step(new=[("b", list(range(20, 44)), 0, 3000 - 4 * CS)]))
    (load,) = meta.loads
    assert (load.start_token, load.end_token) == (0, 4 * CS)
    # Chunk 1 could not be read: chunks computed in this step sit on garbage KV.
    bad_key = load.keys[0][1]
    done(p, KvtierWorkerMeta(failed=[("b", CS, bad_key)]), invalid={22, 23, 24, 25, 26, 27})
    assert p.index.contains_many([bad_key]) == [False]
    # vLLM recomputes from token 256, one chunk in this step: only that chunk is saved
    # (the step's saves of chunks 4-10, computed on the missing chunk 1, are gone).
    assert not p.build(step(cached=[("b", [], CS, CS)])).saves
    done(p)
    (save,) = p.build(step(cached=[("b", [], 2 * CS, 3000 - 2 * CS)])).saves
    assert save.start_chunk == 1 and len(save.keys[0]) == 2
    done(p)
    (save,) = p.build(step(cached=[("b", [], 3000, 1)])).saves
    assert save.start_chunk == 2 and len(save.keys[0]) == 12  # 11 + the partial tail


def test_a_request_sharing_a_failed_block_does_not_save_that_step() -> None:
    p = planner()
    p.num_new_matched_tokens(request("c", 1100), 0)
    loaded_step(p, [("c", [5, 6, 7, 8, 9, 10, 11, 12, 13], 0, 1100)])
    done(p, invalid={6})  # the load went into a block c shares, and failed
    # vLLM recomputes c from token 128; this step gets to token 256: chunk 0 only.
    p.build(step(cached=[("c", [], CS // 2, CS // 2)]))
    done(p)
    (save,) = p.build(step()).saves
    assert save.start_chunk == 0 and len(save.keys[0]) == 1


def test_a_request_finishing_with_a_held_save_keeps_its_blocks_until_saved() -> None:
    p = planner()
    p.num_new_matched_tokens(request("d", 600), 0)
    loaded_step(p, [("d", [1, 2, 3, 4, 5], 0, 600)])
    assert p.finish("d") is True  # vLLM keeps d's blocks (delay free)
    done(p)
    saves = p.build(step()).saves
    assert [(s.req_id, s.release) for s in saves] == [("d", True)]


def test_a_finished_request_whose_save_was_dropped_is_released_without_saving() -> None:
    p = planner()
    p.num_new_matched_tokens(request("e", 600), 0)
    loaded_step(p, [("e", [1, 2, 3, 4, 5], 0, 600)])
    assert p.finish("e")
    done(p, invalid={1})
    meta = p.build(step())
    assert not meta.saves and meta.releases == ["e"]


def test_a_preempted_requests_held_save_is_dropped() -> None:
    p = planner()
    p.num_new_matched_tokens(request("f", 600), 0)
    loaded_step(p, [("f", [1, 2, 3, 4, 5], 0, 600)])
    meta = p.build(step(preempted={"f"}))
    done(p)
    assert [s.req_id for s in meta.saves] == [] and p._reqs["f"].saved_chunks == 0
    assert "f" not in [s.req_id for s in p.build(step()).saves]


@pytest.mark.parametrize("with_load", [False, True])
def test_a_request_preempted_after_its_step_went_well_saves_nothing_from_freed_blocks(
        with_load: bool) -> None:
    """vLLM's order: the step's report (the save released), then the next schedule,
    which preempts the request and may give its blocks to another request before the
    save would run (after that step's forward): the save must not go out."""
    p = planner()
    p.num_new_matched_tokens(request("f", 600), 0)
    if with_load:
        loaded_step(p, [("f", [1, 2, 3, 4, 5], 0, 600)])
    else:
        p.build(step(new=[("f", [1, 2, 3, 4, 5], 0, 600)]))
    done(p)  # f's save is released for the next step
    meta = p.build(step(preempted={"f"}))
    # Not saved, and to be saved again once vLLM has recomputed it on its new blocks.
    assert "f" not in [s.req_id for s in meta.saves] and p._reqs["f"].saved_chunks == 0


def test_a_request_aborted_before_its_released_save_ran_keeps_its_blocks() -> None:
    """An abort between steps (the client went away) finishes a request whose save is
    released for the next step but not run: vLLM must keep its blocks until it is."""
    p = planner()
    p.num_new_matched_tokens(request("d", 600), 0)
    p.build(step(new=[("d", [1, 2, 3, 4, 5], 0, 600)]))
    done(p)
    assert p.finish("d") is True
    assert [(s.req_id, s.release) for s in p.build(step()).saves] == [("d", True)]


def test_a_prompt_saved_over_several_steps_gives_every_chunk_its_tokens_and_parent() -> None:
    """KV events name each stored chunk's tokens and parent; a long prompt's saves are
    planned step by step (chunked prefill), each step registering only its new chunks."""
    p = planner()
    p.num_new_matched_tokens(request("a", 1100), 0)
    prompt, keys = p._reqs["a"].prompt, p._reqs["a"].keys[0]
    p.build(step(new=[("a", list(range(9)), 0, 300)]))  # chunk 0 computed
    done(p)
    p.build(step(cached=[("a", [], 300, 500)]))  # chunks 1 and 2
    done(p)
    p.build(step(cached=[("a", [], 800, 300)]))  # chunk 3
    done(p, KvtierWorkerMeta(tiers={"memory": (keys[:4], [])}))
    stored = [e for e in p.events.take() if type(e).__name__ == "BlockStored"]
    assert [e.block_hashes for e in stored] == [[bytes(k)] for k in keys[:4]]
    assert [e.parent_block_hash for e in stored] == [None] + [bytes(k) for k in keys[:3]]
    assert [e.token_ids for e in stored] == [prompt[i * CS:(i + 1) * CS] for i in range(4)]
