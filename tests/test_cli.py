import subprocess
import sys

import pytest

from anomaly_discovery.cli import NOT_BUILT, build_parser, main

VERBS = ["generate", "demo", "detect", "discover", "train", "tune", "retrain", "serve", "ui", "evaluate"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([verb, "--help"])
    assert exit_info.value.code == 0
    assert f"adisc {verb}" in capsys.readouterr().out


@pytest.mark.parametrize("verb", sorted(NOT_BUILT))
def test_unbuilt_verb_exits_2_with_one_line_naming_what_is_missing(verb, capsys):
    assert main([verb]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"adisc {verb}: not built yet:")


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "anomaly_discovery.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("adisc ")
