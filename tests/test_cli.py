"""The kvtier command: benchmarks run end to end at toy sizes (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from kvtier.cli.main import build_parser, main
from kvtier.engine.layout import LayoutKind
from kvtier.testing.procs import last_json_line


def test_bench_engine_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "engine", "--json", "--layers", "2", "--tokens", "1024",
                 "--repeats", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    for k in ("store_gbps", "retrieve_gbps", "copy_gbps", "store_ratio", "retrieve_ratio"):
        assert res[k] > 0
    assert res["bitwise_equal"] is True


def test_bench_engine_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["bench", "engine", "--layers", "2", "--tokens", "512", "--repeats", "1",
          "--layout", "flash_attn"])
    out = capsys.readouterr().out
    assert "vs copy" in out and "bitwise equal to stored: True" in out


def test_bench_engine_layouts_are_the_engines() -> None:
    # cli lists them without importing the engine layer (it needs torch): keep them in step.
    engine = build_parser()._subparsers._group_actions[0].choices["bench"]
    layout = next(a for a in engine._subparsers._group_actions[0].choices["engine"]._actions
                  if a.dest == "layout")
    assert set(layout.choices) == {k.value for k in LayoutKind}


def test_unknown_subcommand_is_an_error() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "nothing"])


def test_a_childs_result_is_its_last_json_line() -> None:
    out = 'INFO 12-03 vLLM says hello\n{"first": 1}\n{"result": 2}\nWARNING late log line\n'
    assert last_json_line(out) == {"result": 2}
    assert last_json_line("INFO only logs\n") is None
