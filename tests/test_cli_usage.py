"""Usage errors of the console script (dfkd.cli.main): one line, exit 2, the flag meant."""
import sys

import pytest

from dfkd.cli import main


def run(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["dfkd", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("argv,line", [
    (["select", "--nu", "5"], "dfkd select: error: no such option --nu; did you mean --num-images?"),
    (["distill", "--num", "5"], "dfkd distill: error: no such option --num; see dfkd distill --help"),
    (["select", "--tacher", "t.yaml"], "dfkd select: error: no such option --tacher; did you mean --teacher?"),
    (["select", "--pool", "p"], "dfkd select: error: Missing option '--out'."),
    (["train", "--arch", "resnet8", "--data", "d", "--out", "o", "--batch-size", "x"],
     "dfkd train: error: Invalid value for '--batch-size': "),
    (["selct"], "dfkd: error: No such command 'selct'."),
])
def test_a_usage_error_is_one_line_with_exit_2(monkeypatch, capsys, argv, line):
    code, out, err = run(monkeypatch, capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(line), err


def test_dash_h_is_help(monkeypatch, capsys):
    for argv in (["-h"], ["select", "-h"]):
        code, out, err = run(monkeypatch, capsys, *argv)
        assert code == 0 and "Usage: dfkd" in out and "--help" in out, (argv, err)


@pytest.mark.parametrize("argv,old,new", [
    (["select", "--teacher", "missing.yaml", "--pool", "p", "--out", "o", "--num", "5"], "--num", "--num-images"),
    (["select", "--teacher", "missing.yaml", "--pool", "p", "--out", "o", "--max-noise=0.5"], "--max-noise",
     "--max-score"),
    (["expand", "--pu", "missing.yaml", "--positive", "p", "--unlabeled", "u", "--out", "o", "--num", "5"], "--num",
     "--num-images"),
])
def test_a_renamed_flag_still_works_with_a_one_line_note(monkeypatch, capsys, tmp_path, argv, old, new):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(monkeypatch, capsys, *argv)
    note, error = err.strip().splitlines()
    assert note == f"warning: dfkd {argv[0]} {old} is deprecated and goes in the next release; use {new}"
    assert code == 2 and "missing.yaml" in error and "no such option" not in error  # the flag was taken


def test_help_shows_the_allowed_values_of_choice_flags(monkeypatch, capsys):
    from dfkd.distill import OBJECTIVES
    from dfkd.select import POLICIES, SCORERS
    from dfkd.select.candidates import DEDUP

    monkeypatch.setenv("COLUMNS", "200")
    want = {"select": {"--score": sorted(SCORERS.keys()), "--policy": sorted(POLICIES.keys()), "--dedup": DEDUP,
                       "--device": ["auto", "cpu", "cuda[:N]"]},
            "distill": {"--method": sorted(OBJECTIVES.keys())}, "export": {"--format": ["torchscript", "onnx"]}}
    for command, flags in want.items():
        code, out, _ = run(monkeypatch, capsys, command, "--help")
        assert code == 0
        for flag, values in flags.items():
            (line,) = [l for l in out.splitlines() if f" {flag} " in l]
            shown = line.split(flag, 1)[1].split()[0]
            assert sorted(shown.split("|")) == sorted(values), (command, flag, line)
    code, out, _ = run(monkeypatch, capsys, "list", "--help")
    assert "<archs|scorers|policies|objectives|extractors|all>" in out
    assert "TEXT" not in out and "<str>" not in out


def test_shell_completion_script_and_completions():
    import os
    import subprocess

    def dfkd(*args, **env):
        return subprocess.run([sys.executable, "-m", "dfkd", *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **env})

    script = dfkd("--show-completion", "bash")
    assert script.returncode == 0 and "complete -o default -F _dfkd_completion dfkd" in script.stdout
    assert "_DFKD_COMPLETE=complete_bash" in script.stdout
    # what the script asks dfkd for: the command, a flag, list's values
    for words, cword, want in (("dfkd sel", "1", ["select"]), ("dfkd select --sc", "2", ["--score"]),
                               ("dfkd list s", "2", ["scorers"])):
        got = dfkd(COMP_WORDS=words, COMP_CWORD=cword, _DFKD_COMPLETE="complete_bash")
        assert got.returncode == 0 and got.stdout.split() == want, (words, got.stdout, got.stderr)
