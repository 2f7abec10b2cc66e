"""The command line: help everywhere, one-line errors with exit code 2, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autoprune.cli import build_parser, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoprune", *args], capture_output=True,
                          text=True, timeout=300)


def test_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0


@pytest.mark.parametrize("argv,fragment", [
    (["prune", "--method", "nope"], "unknown method 'nope'"),
    (["prune", "--method", "magnitude", "--set", "bogus=1"], "no hyperparameter 'bogus'"),
    (["prune", "--method", "magnitude", "--set", "ramp=7"], "must be in"),
    (["prune", "--method", "magnitude", "--set", "ramp"], "key=value"),
    (["prune", "--method", "magnitude", "--study", "no-such-study"], "unknown study"),
])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, tmp_path):
    rc = main([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_studies_json_lists_the_builtin_studies():
    proc = run_cli("studies", "--json")
    assert proc.returncode == 0
    names = {s["name"] for s in json.loads(proc.stdout)}
    assert {"digits-lenet", "lenet300-mnist", "lenet5-mnist", "fashion-lenet5",
            "resnet20-cifar10", "resnet56-cifar10", "vgg16-cifar10",
            "resnet18-imagenet"} <= names


def test_bad_study_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    rc = main(["prune", "--method", "magnitude", "--study", str(bad), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "not valid YAML" in err
    bad.write_text("model: lenet5\ndataset: mnist\nfoo: 1\n")
    rc = main(["prune", "--method", "magnitude", "--study", str(bad), "--out", str(tmp_path)])
    assert rc == 2 and "unknown key(s) foo" in capsys.readouterr().err


def test_version_prints_the_package_version():
    import autoprune

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"autoprune {autoprune.__version__}"


def test_quiet_hides_progress_and_keeps_the_result(tmp_path, capsys, pretrained):
    """-q: no progress lines on stderr, the result on stdout; without it the progress shows."""
    import torch

    ckpt = tmp_path / "dense.pt"
    torch.save(pretrained, ckpt)
    argv = ["prune", "--method", "magnitude", "--set", "gradual=false", "--set", "epochs=0",
            "--set", "granularity=filter", "--finetune", "epochs=0", "--out", str(tmp_path),
            "--dense-checkpoint", str(ckpt)]
    assert main(["-q", *argv]) == 0
    got = capsys.readouterr()
    assert got.err == "" and "test accuracy" in got.out
    assert main(argv) == 0
    assert "dense baseline: val" in capsys.readouterr().err
    # after the command too, and -v counts
    assert build_parser().parse_args([*argv, "--quiet"]).quiet is True
    assert build_parser().parse_args(["-v", *argv]).verbose == 1
    assert build_parser().parse_args(argv).quiet is False


class _Terminal:
    """A stderr that says it is a terminal, recording what is written."""

    def __init__(self) -> None:
        import io

        self.buf = io.StringIO()

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        return self.buf.write(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(tty, monkeypatch, capsys):
    import logging

    from autoprune.cli import progress_log

    term = _Terminal()
    monkeypatch.setattr("autoprune.cli._verbosity", 0)  # whatever an earlier main() was told
    if tty:
        monkeypatch.setattr(sys, "stderr", term)
    info = progress_log(False)
    info("training the dense baseline of digits-lenet (3 epochs)")
    for e in (1, 2, 3):
        info(f"  dense epoch {e}: loss 0.5000 val 0.9{e}00")
    info("something else")
    info("[1/4 done, 1 running, 0 failed] trial 0 finished; best in budget: -")
    # an open-ended search (a time limit, no trial count): a counter without a total
    info("[7 done, 2 running, 0 failed] trial 6 finished; best in budget: -")
    logging.getLogger("autoprune").setLevel(logging.WARNING)
    out = term.buf.getvalue() if tty else capsys.readouterr().err
    if tty:  # tqdm's bar: counts and a bar, the epoch lines themselves not printed
        assert "dense digits-lenet" in out and "3/3" in out and "1/4" in out
        assert "dense epoch 2:" not in out and "something else" in out
        assert "trials: 7" in out and "[7 done" not in out
    else:  # the lines as they are
        assert "  dense epoch 2: loss 0.5000 val 0.9200" in out.splitlines()
        assert "[1/4 done" in out and "|" not in out
