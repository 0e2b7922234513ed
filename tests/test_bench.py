"""The benchmark scripts still import what they use (CI runs no benchmark; an import broken by a
refactor went unseen here once)."""
import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py"))
def test_bench_script_imports(script):
    names = runpy.run_path(str(BENCH / script), run_name="bench_import_check")
    assert callable(names["main"])
