"""The `sdeflow` entry point: the static subcommand table, --version, the top-level help."""

from __future__ import annotations

import importlib

import pytest

import sdeflow as sf
from sdeflow.cli import COMMANDS, build_parser, main


def test_every_command_module_has_configure_and_run():
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.configure) and callable(mod.run), name
        assert module == f"sdeflow.cli.{name}" and help_


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"sdeflow {sf.__version__}"
    text = build_parser().format_help()
    assert all(name in text for name in COMMANDS) and "--version" in text


def test_missing_or_unknown_command_is_a_usage_error(capsys):
    for argv in ([], ["nope"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "Traceback" not in capsys.readouterr().err
