import subprocess
import sys

import pytest

from anomaly_discovery.cli import build_parser, main

VERBS = ["generate", "demo", "detect", "discover", "train", "tune", "retrain", "serve", "ui", "evaluate"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser(verb).parse_args([verb, "--help"])
    assert exit_info.value.code == 0
    assert f"adisc {verb}" in capsys.readouterr().out


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "anomaly_discovery.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("adisc ")


def test_generate_writes_a_dataset_the_mvtec_reader_loads(tmp_path):
    from collections import Counter

    from anomaly_discovery.data import read_dataset

    assert main(["generate", "--out", str(tmp_path / "g"), "--n", "60", "--seed", "3", "--quiet"]) == 0
    samples = read_dataset(tmp_path / "g", "mvtec").samples
    assert len(samples) == 60
    labels = Counter(s.label for s in samples)
    assert labels["good"] > 0 and len(labels) == 7
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in samples if not s.is_normal)


def test_generate_refuses_a_non_empty_folder_with_a_clear_error(tmp_path, capsys):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    assert main(["generate", "--out", str(tmp_path / "g"), "--n", "30", "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err


def test_detect_with_a_corrupt_weights_file_exits_1_naming_the_file(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "g"), "--n", "30", "--quiet"]) == 0
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"not a checkpoint")
    code = main(["detect", "--data", str(tmp_path / "g"), "--format", "mvtec", "--out", str(tmp_path / "o"),
                 "--backbone", "torchvision:resnet18", "--weights", str(weights), "--quiet"])
    assert code == 1
    assert "backbone.pth" in capsys.readouterr().err
