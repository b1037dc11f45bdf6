"""The Makefile reaches every setting: each variable becomes its command's flag, a misspelt one is refused."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from pipeline.cli import COMMANDS, DATA_CHECKED, SWEPT, build_parser
from pipeline.config import DEFAULTS, SETTING_FIELDS
from pipeline.makefile import fragment, variable

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def test_settings_mk_is_generated_from_the_current_settings():
    assert (REPO / "settings.mk").read_text() == fragment()


def other_value(name: str) -> tuple[str, object]:
    """A valid value of setting ``name`` other than its default: as a Make variable, and as parsed."""
    default, meta = getattr(DEFAULTS, name), SETTING_FIELDS[name].metadata
    if isinstance(default, bool):
        return "1", True
    if meta["choices"]:
        choice = next(c for c in meta["choices"] if c != default)
        return choice, choice
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        value = (default + (meta["high"] or 1.0)) / 2 if meta["high"] is not None else default * 2
        return str(value), value
    if isinstance(default, str):
        return f"{default}x", f"{default}x"
    return "some/where", Path("some/where")


def make_dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "--no-print-directory", *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in ("all", "backbones")])
def test_every_setting_of_a_command_reaches_it_from_make(command):
    names = [*COMMANDS[command][1], *(["data"] if command in DATA_CHECKED else []), "debug"]
    values = {name: other_value(name) for name in names}
    extra = ["IMAGES=a.jpg"] if command == "predict" else []
    result = make_dry_run(command, *extra, *(f"{variable(n)}={text}" for n, (text, _) in values.items()))
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip().splitlines()[-1])
    args = build_parser().parse_args(argv[argv.index(command):])
    swept = SWEPT if command == "sweep" else ()  # a sweep's flag takes several values: a list per argument given
    assert {name: getattr(args, name) for name in names} == \
        {name: [[parsed]] if name in swept else parsed for name, (_, parsed) in values.items()}


def test_unset_and_false_switches_pass_nothing():
    result = make_dry_run("features", "FORCE=0", "VERIFY=", "MERGE=no")
    argv = shlex.split(result.stdout.strip().splitlines()[-1])
    assert argv[argv.index("features") + 1:] == []


def test_args_pass_through_as_given():
    result = make_dry_run("train-head", 'ARGS=--lr 0.05 --hidden 32')
    argv = shlex.split(result.stdout.strip().splitlines()[-1])
    args = build_parser().parse_args(argv[argv.index("train-head"):])
    assert (args.lr, args.hidden) == (0.05, 32)


def test_a_misspelt_variable_stops_make_before_anything_runs():
    result = make_dry_run("all", "DATAA=somewhere", "LR=0.1")
    assert result.returncode == 2 and result.stdout == ""
    assert "unknown variable DATAA" in result.stderr and len(result.stderr.strip().splitlines()) == 1
