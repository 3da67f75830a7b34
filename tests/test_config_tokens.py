"""Tokens: one reader (kvtier.config.secrets) and one environment spelling per secret,
KVTIER_<SECTION>__TOKEN, for the loader and the CLIs; the old spellings still work
for a release, with a warning."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from kvtier.config import ConfigError, cli_token, load_config
from kvtier.config.load import NON_CONFIG_ENV

SECTIONS = ("control", "controller", "transfer")


def token_of(cfg: object, section: str) -> str:
    return getattr(cfg, section).resolve_token()


@pytest.mark.parametrize("section", SECTIONS)
def test_the_new_spelling_is_read_by_the_loader_and_the_cli_without_warning(
        section: str) -> None:
    env = {f"KVTIER_{section.upper()}__TOKEN": "0x1f s3cret"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert token_of(load_config(env=env), section) == "0x1f s3cret"  # verbatim
        assert cli_token(section, None, None, env=env) == "0x1f s3cret"


@pytest.mark.parametrize("section", ["control", "controller"])
def test_old_cli_spellings_still_work_and_warn(section: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    old, new = f"KVTIER_{section.upper()}_TOKEN", f"KVTIER_{section.upper()}__TOKEN"
    with pytest.warns(DeprecationWarning, match=new):
        assert cli_token(section, "", "", env={old: "tok"}) == "tok"
    assert old in caplog.text and new in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling is read first: no warning
        assert cli_token(section, "", "", env={new: "new", old: "old"}) == "new"
    # The loader never read these (they were the CLIs'): still not keys, still unused.
    assert old in NON_CONFIG_ENV and token_of(load_config(env={old: "x"}), section) == ""


def test_the_old_transfer_spelling_still_works_and_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with pytest.warns(DeprecationWarning, match="KVTIER_TRANSFER__TOKEN"):
        cfg = load_config(env={"KVTIER_TRANSFER_TOKEN": " t \n"})
    assert cfg.transfer.resolve_token() == "t" and "KVTIER_TRANSFER__TOKEN" in caplog.text
    new = {"KVTIER_TRANSFER__TOKEN": "new", "KVTIER_TRANSFER_TOKEN": "old"}
    with pytest.warns(DeprecationWarning):
        assert load_config(env=new).transfer.token == "new"
    # As before, it fills in only where no source gave a token or a token file.
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    with pytest.warns(DeprecationWarning):
        cfg = load_config(env={"KVTIER_TRANSFER_TOKEN": "old"},
                          engine={"transfer.token_file": str(f)})
    assert cfg.transfer.token == "" and cfg.transfer.resolve_token() == "from-file"


def test_token_file_and_environment_precedence(tmp_path: Path) -> None:
    """Later source wins, and a section's token and token_file count as one setting."""
    f = tmp_path / "tok"
    f.write_text("  from-file\n")
    yaml_file = tmp_path / "kvtier.yaml"
    yaml_file.write_text(f"transfer:\n  token_file: {f}\ncontroller:\n  token_file: {f}\n")
    env = {"KVTIER_CONFIG": str(yaml_file), "KVTIER_TRANSFER__TOKEN": "from-env"}
    cfg = load_config(env=env)
    assert cfg.transfer.resolve_token() == "from-env" and cfg.transfer.token_file == ""
    assert cfg.controller.resolve_token() == "from-file"  # no later source touched it
    cfg = load_config(env=env, engine={"transfer": {"token_file": str(f)}})
    assert cfg.transfer.resolve_token() == "from-file" and cfg.transfer.token == ""
    with pytest.raises(ConfigError, match="transfer.token_file.*not both") as err:
        load_config(env={}, engine={"transfer.token": "a", "transfer.token_file": str(f)})
    assert err.value.key == "transfer.token_file"
    # The CLIs: the value flag, else the file flag, else the environment.
    env = {"KVTIER_CONTROL__TOKEN": "from-env"}
    assert cli_token("control", None, str(f), env=env) == "from-file"
    assert cli_token("control", "flag", None, env=env) == "flag"
    assert cli_token("control", None, None, env=env) == "from-env"
    with pytest.raises(ConfigError, match="--token or --token-file, not both"):
        cli_token("control", "flag", str(f), env=env)


@pytest.mark.parametrize("section,engine", [
    ("control", {"control.port": 8700}),
    ("controller", {"controller.url": "http://127.0.0.1:8800"}),
    ("transfer", {}),
])
def test_an_unreadable_token_file_names_the_key(tmp_path: Path, section: str,
                                                engine: dict) -> None:
    key = f"{section}.token_file"
    with pytest.raises(ConfigError, match="cannot read .*missing") as err:
        load_config(env={}, engine={**engine, key: str(tmp_path / "missing")})
    assert err.value.key == key
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ConfigError, match="is empty") as err:
        load_config(env={}, engine={**engine, key: str(tmp_path / "empty")})
    assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        cli_token(section, None, str(tmp_path / "missing"), env={})
    assert err.value.key == "--token-file"


def test_the_commands_report_an_unreadable_token_file(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.cli.main import main

    missing = str(tmp_path / "missing")
    # Each fails on the file before it binds or calls anything.
    assert main(["ctl", "--url", "http://127.0.0.1:9", "--token-file", missing, "status"]) == 1
    assert "--token-file: cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--token-file: cannot read"):
        main(["controller", "--token-file", missing])
    with pytest.raises(SystemExit, match="--control-token-file: no longer used"):
        main(["controller", "--control-token-file", missing])
    with pytest.raises(SystemExit, match="--controller-token-file: cannot read"):
        main(["router", "--instance", "http://127.0.0.1:9", "--controller-token-file",
              missing])
