"""The command line: end to end through main(argv), and bad input as one sentence, exit 2 or 3."""

from __future__ import annotations

import subprocess
import sys

import pytest

from visiontune.cli import main

from .conftest import make_folder


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_flags(tiny_settings: dict) -> list[str]:
    return ["--model", "test_efficientnet", "--weights", tiny_settings["weights"], "--image-size", "48",
            "--train-size", "48", "--batch-size", "4", "--cache-dir", tiny_settings["cache_dir"],
            "--no-channels-last"]


def test_train_prints_epoch_lines_and_run_folder(tiny_data, tiny_settings, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["train", str(tiny_data), "--epochs", "2", "--out", str(out_dir), *tiny_flags(tiny_settings)], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("epoch 0/2 probe") and "val loss" in lines[0]  # the linear probe, printed first
    assert lines[1].startswith("--bn auto: frozen")  # the BatchNorm policy measured after the probe, in one line
    # --freeze's default comes with the policy: with the statistics kept, test_efficientnet's stem and
    # blocks 0-2, the layers at 1/8 of the input resolution or finer.
    assert lines[2].startswith("--freeze 4: the layers up to blocks.2 (an eighth of the input resolution and finer, "
                               "with BatchNorm statistics kept pretrained)")
    # The weight average's decay, derived from this data's 4 steps an epoch (at least 8 steps: 1 - 1/8).
    assert lines[3].startswith("--ema-epochs 0.25: ") and "EMA decay 0.8750 per step" in lines[3]
    assert lines[4].startswith("--refit-head: ")  # what val and the saved model use, said once
    assert lines[5].startswith("epoch 1/2 full") and "val loss" in lines[5] and "lr" in lines[5]
    assert lines[-1].startswith("best epoch") and str(out_dir) in lines[-1]
    assert (out_dir / "best.safetensors").is_file()


def test_fixed_mode_from_cli(tiny_data, tiny_settings, tmp_path, capsys):
    code, out, err = run_cli(["train", str(tiny_data), "--mode", "fixed", "--epochs", "2", "--out",
                              str(tmp_path / "r"), *tiny_flags(tiny_settings)], capsys)
    assert code == 0, err
    assert '"mode": "fixed"' in (tmp_path / "r" / "model.json").read_text()


def test_models_lists_offline_backbones(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    for n in (0, 1, 2):
        line = next(line for line in out.splitlines() if line.startswith(f"efficientnet_lite{n} "))
        assert " yes " in line


def _bad_inputs(tmp_path):
    one_class = make_folder(tmp_path / "one", {"a": 3}, layout="flat")
    no_images = tmp_path / "noimg"
    (no_images / "a").mkdir(parents=True)
    (no_images / "a" / "readme.txt").write_text("x")
    mismatch = make_folder(tmp_path / "mm", {"a": 2, "b": 2})
    make_folder(tmp_path / "mm_extra", {"c": 1})
    (mismatch / "val" / "c").mkdir()
    (tmp_path / "mm_extra" / "val" / "c" / "c_v0.png").rename(mismatch / "val" / "c" / "x.png")
    good = make_folder(tmp_path / "good", {"a": 3, "b": 3})
    return [  # exit 2: the command line; exit 3: the data
        (["train", str(tmp_path / "nope")], "DATA", 2),
        (["train", str(no_images)], "no images", 3),
        (["train", str(one_class)], "single class", 3),
        (["train", str(mismatch)], "class folders differ", 3),
        (["train", str(good), "--model", "no_such_net"], "--model", 2),
        (["train", str(good), "--epochs", "0"], "--epochs", 2),
        (["train", str(good), "--lr", "-1"], "--lr", 2),
        (["train", str(good), "--batch-size", "0"], "--batch-size", 2),
        (["train", str(good), "--weights", str(tmp_path / "missing.pt")], "--weights", 2),
    ]


def test_bad_input_is_one_sentence_with_its_exit_code(tmp_path, capsys):
    for args, words, expected in _bad_inputs(tmp_path):
        code, out, err = run_cli(args + ["--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")], capsys)
        assert code == expected, (args, err)
        assert "Traceback" not in err
        message = err.strip().splitlines()
        assert len(message) == 1 and words in message[0], (args, err)
        assert not (tmp_path / "o").exists(), "a failed start must leave no run folder"


def test_argparse_choice_errors_exit_2(capsys):
    code, _, err = run_cli(["train", "x", "--mode", "sideways"], capsys)
    assert code == 2 and "--mode" in err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "visiontune", "models"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "efficientnet_lite0" in result.stdout


# The command as the console script runs it: cli.entry, with an atexit hook of the caller's.
ENTRY = ("import atexit, sys; atexit.register(print, 'atexit ran'); sys.argv = ['visiontune', *sys.argv[1:]]; "
         "from visiontune.cli import entry; entry()")


def test_the_command_ends_quickly_but_with_its_exit_code_atexit_handlers_and_all_output(tmp_path):
    listed = subprocess.run([sys.executable, "-c", ENTRY, "models"], capture_output=True, text=True, timeout=120)
    from visiontune.backbones import REGISTRY

    lines = listed.stdout.splitlines()
    assert listed.returncode == 0 and lines[-1] == "atexit ran", listed.stdout + listed.stderr
    assert [line.split()[0] for line in lines[1:1 + len(REGISTRY)]] == list(REGISTRY)
    missing = subprocess.run([sys.executable, "-c", ENTRY, "train", str(tmp_path / "no-such-folder")],
                             capture_output=True, text=True, timeout=120)
    assert (missing.returncode, missing.stdout) == (2, "atexit ran\n")
    assert missing.stderr.startswith("visiontune: error: DATA ") and "Traceback" not in missing.stderr


def test_a_profiler_still_gets_to_write_its_profile(tmp_path):
    profile = tmp_path / "models.prof"
    result = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "visiontune", "models"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and profile.stat().st_size > 0, result.stderr


def test_a_reader_that_goes_away_is_not_a_traceback():
    # `visiontune models | head -1`: the pipe closes before the listing is written.
    process = subprocess.Popen([sys.executable, "-c", ENTRY, "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1 and err == "", err


def test_a_missing_data_path_is_said_before_torch_loads(tmp_path):
    # torch and timm take seconds to import (and do so in every process under torchrun): a typo in
    # the path is said without them.
    missing = tmp_path / "no-such-folder"
    script = ("import sys; from visiontune.cli import main; code = main(['train', sys.argv[1]]); "
              "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script, str(missing)], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
    assert result.stderr.strip() == (f"visiontune: error: DATA {missing}: no such file or folder; pass a folder of "
                                      "class folders, a CSV, or a known dataset name.")


def test_version_flag_prints_the_package_version(capsys):
    import visiontune

    for flag in ("--version", "-V"):
        code, out, _ = run_cli([flag], capsys)
        assert code == 0 and out.strip() == f"visiontune {visiontune.__version__}"


def test_exit_codes_tell_a_bad_flag_from_bad_data(tmp_path, capsys):
    one_class = make_folder(tmp_path / "one", {"ants": 6})
    assert run_cli(["train", str(tmp_path / "one"), "--epochs", "0"], capsys)[0] == 2
    code, _, err = run_cli(["train", str(one_class), "--quiet"], capsys)
    assert code == 3 and "Traceback" not in err


def test_help_lists_every_command_on_one_line(capsys, monkeypatch):
    from visiontune.cli import COMMANDS

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and not line.startswith("     ")]
    assert sorted(listed) == sorted(COMMANDS)  # each once
    section = out.split("positional arguments:")[1].split("options:")[0].strip().splitlines()
    assert len(section) == 1 + len(COMMANDS)  # the {...} line, then one line per command: no wrapped help
