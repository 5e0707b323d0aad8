"""make bench's precision check says whether `precision: auto` chose the faster step on this machine;
the phase projection scales each phase by its kind's measured ratio."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402
import project_phases  # noqa: E402
import pytest  # noqa: E402


def test_the_precision_check_names_the_faster_step():
    timed = {"fp32": 1.35, "fp32 matmul": 0.0035, "bf16": 1.05, "bf16 matmul": 0.006}
    text = "\n".join(bench.precision_lines(timed, "bf16"))
    assert "| bf16 (chosen) | 1.050 | 6.0 |" in text and "1.29x as fast in bf16" in text
    assert "`auto`'s choice, bf16, is the faster one" in text
    assert "NOT the faster one: set precision: bf16 here" in "\n".join(bench.precision_lines(timed, "fp32"))


def test_the_precision_check_skips_bf16_without_native_kernels():
    text = "\n".join(bench.precision_lines({"fp32": 2.0, "fp32 matmul": 0.03, "bf16": None, "bf16 matmul": None}, "fp32"))
    assert "| fp32 (chosen) | 2.000 | 30.0 |" in text and "| bf16 | not timed (no native bf16) |" in text
    assert "faster" not in text


def test_phases_are_projected_by_the_ratio_of_their_kind():
    here = {"zoo": 100.0, "a: generators": 50.0, "a: scoring": 10.0, "b: generators": 5.0}  # b: stopped mid-way
    there = {"zoo": 180.0, "a: generators": 75.0, "a: scoring": 8.0, "b: generators": 1.0}
    run = {"zoo": 200.0, "c: generators": 40.0, "c: scoring": 20.0, "c: multi-task LoRA": 30.0}
    rows = project_phases.project(run, project_phases.ratios(here, there), {"c: multi-task LoRA": "zoo"})
    assert [(p, r, ref, t) for p, _, r, ref, t in rows] == [
        ("zoo", 1.8, "zoo", 360.0), ("c: generators", 1.5, "a: generators", 60.0),  # a's, not b's partial one
        ("c: scoring", 0.8, "a: scoring", 16.0), ("c: multi-task LoRA", 1.8, "zoo", 54.0)]
    assert "| **total** | **290** | 1.69 | | **490 (0.14 h)** |" in project_phases.table(rows, "x")
    with pytest.raises(ValueError, match="multi-task LoRA"):
        project_phases.project(run, project_phases.ratios(here, there), {})
