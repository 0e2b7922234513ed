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
    (["select", "--num", "5"], "dfkd select: error: no such option --num; did you mean --num-images?"),
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
