"""make bench's precision check says whether `precision: auto` chose the faster step on this machine."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402


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
