"""``precision: auto`` picks bf16 only where the hardware has native bf16 and runs it faster (detection and
the CPU's bf16 timing mocked)."""

import os
import subprocess
import sys

import pytest
import torch

from icm_lora import hardware


def cpu(monkeypatch, capability: str, avx512_bf16: bool = False, amx: bool = False, speedup: float = 2.0) -> None:
    """A CPU of ``capability`` whose bf16 matmul, where it has the flags, runs ``speedup`` times as fast as fp32."""
    cpu_flags(monkeypatch, capability, avx512_bf16, amx)
    monkeypatch.setattr(hardware, "speedup", lambda threads: speedup)


def cpu_flags(monkeypatch, capability: str, avx512_bf16: bool = False, amx: bool = False) -> None:
    """A CPU of ``capability`` with or without the bf16 flags (its bf16 speed is left to ``hardware.speedup``)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def cuda(monkeypatch, available: bool, bf16: bool = False) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize(("capability", "avx512_bf16", "amx", "name", "expected"), [
    ("AVX2", False, False, "AVX2", "fp32"),
    ("AVX512", False, False, "AVX512", "fp32"),
    ("AVX512", True, False, "AVX512-BF16", "bf16"),
    ("AVX512", True, True, "AMX", "bf16"),
    ("DEFAULT", False, False, "DEFAULT", "fp32"),
])
def test_auto_on_cpus(monkeypatch, capability, avx512_bf16, amx, name, expected):
    cpu(monkeypatch, capability, avx512_bf16, amx)
    assert hardware.cpu_capability() == name
    assert hardware.resolve_precision("auto", "cpu") == expected
    assert hardware.trainer_precision("auto", "cpu") == ("bf16-mixed" if expected == "bf16" else "32-true")
    assert hardware.resolve_precision("fp32", "cpu") == "fp32"


@pytest.mark.parametrize("amx", [False, True])
def test_auto_keeps_fp32_where_native_bf16_is_measured_slower(monkeypatch, amx):
    # A 2-core Xeon VM with AVX512-BF16 ran a bf16 matmul at 0.52x the speed of fp32: the flag alone misleads.
    cpu(monkeypatch, "AVX512", avx512_bf16=True, amx=amx, speedup=0.52)
    assert hardware.native_bf16("cpu")
    assert hardware.resolve_precision("auto", "cpu") == "fp32"
    assert hardware.trainer_precision("auto", "cpu") == "32-true"
    assert "0.52x as fast as fp32 here, so auto is fp32" in hardware.bf16_note("cpu")
    assert hardware.resolve_precision("bf16", "cpu") == "bf16"  # explicit: native kernels, so no warning
    cpu(monkeypatch, "AVX512", avx512_bf16=True, amx=amx, speedup=hardware.BF16_MIN_SPEEDUP)
    assert hardware.resolve_precision("auto", "cpu") == "bf16"
    assert "so auto is bf16" in hardware.bf16_note("cpu")


def test_cpus_without_the_flags_are_not_timed(monkeypatch):
    cpu(monkeypatch, "AVX2", avx512_bf16=True, amx=True)
    monkeypatch.setattr(hardware, "speedup", lambda threads: pytest.fail("timed bf16 on a CPU without native bf16"))
    assert hardware.resolve_precision("auto", "cpu") == "fp32"
    assert hardware.bf16_note("cpu") == ""


def test_the_bf16_timing_is_a_real_ratio():
    ratio = hardware.measure_speedup(1, tokens=16, width=32, out=64, repeats=3)
    assert 0 < ratio < float("inf")


@pytest.fixture
def fresh_speedup(monkeypatch):
    """No ratio measured or pinned yet in this process; whatever the test sets is undone after it."""
    monkeypatch.setenv(hardware.SPEEDUP_ENV, "")  # recorded, so teardown restores the variable's prior state
    monkeypatch.delenv(hardware.SPEEDUP_ENV)
    hardware.speedup.cache_clear()
    yield
    hardware.speedup.cache_clear()


def test_the_measured_ratio_is_handed_to_child_processes(monkeypatch, fresh_speedup):
    # Lightning's DDP launcher starts each rank as a new process running the same command: a rank that
    # timed bf16 itself could choose another precision than rank 0 on a CPU near the threshold.
    # Just under the threshold, so that a rounded hand-over would flip the child to bf16.
    ratio = hardware.BF16_MIN_SPEEDUP - 1e-4
    measured = []
    monkeypatch.setattr(hardware, "measure_speedup", lambda threads: measured.append(threads) or ratio)
    assert hardware.speedup(2) == ratio and hardware.speedup(2) == ratio and measured == [2]
    assert float(os.environ[hardware.SPEEDUP_ENV]) == ratio
    child = subprocess.run([sys.executable, "-c", "from icm_lora import hardware; print(repr(hardware.speedup(1)))"],
                           capture_output=True, text=True, check=True)
    assert float(child.stdout) == ratio < hardware.BF16_MIN_SPEEDUP


def test_a_pinned_ratio_is_not_measured(monkeypatch, fresh_speedup):
    monkeypatch.setenv(hardware.SPEEDUP_ENV, "0.5")
    monkeypatch.setattr(hardware, "measure_speedup", lambda threads: pytest.fail("measured a pinned ratio"))
    cpu_flags(monkeypatch, "AVX512", avx512_bf16=True)
    assert hardware.speedup(2) == 0.5
    assert hardware.resolve_precision("auto", "cpu") == "fp32"


def test_a_pinned_ratio_that_is_not_a_number_is_named(monkeypatch, fresh_speedup):
    monkeypatch.setenv(hardware.SPEEDUP_ENV, "fast")
    with pytest.raises(ValueError, match="ICM_LORA_BF16_SPEEDUP='fast' is not a number"):
        hardware.speedup(2)


def test_an_avx2_cap_hides_the_bf16_units(monkeypatch):
    # ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU: torch reports AVX2, so auto must not pick bf16.
    cpu(monkeypatch, "AVX2", avx512_bf16=True, amx=True)
    assert hardware.resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize(("bf16", "expected", "lightning"), [(True, "bf16", "bf16-mixed"), (False, "fp32", "32-true")])
def test_auto_on_cuda(monkeypatch, bf16, expected, lightning):
    cuda(monkeypatch, available=True, bf16=bf16)
    cpu(monkeypatch, "AVX2")
    assert hardware.resolve_precision("auto", "cuda") == expected
    for accelerator in ("auto", "gpu", "cuda"):
        assert hardware.trainer_precision("auto", accelerator) == lightning
    assert hardware.trainer_precision("auto", "cpu") == "32-true"  # the CPU of a GPU machine is asked on its own


def test_auto_accelerator_without_cuda_is_the_cpu(monkeypatch):
    cuda(monkeypatch, available=False)
    cpu(monkeypatch, "AVX512", avx512_bf16=True)
    assert hardware.accelerator_device("auto") == torch.device("cpu")
    assert hardware.trainer_precision("auto", "auto") == "bf16-mixed"


def test_explicit_bf16_without_native_support_runs_with_a_warning(monkeypatch):
    cpu(monkeypatch, "AVX2")
    with pytest.warns(UserWarning, match="no native bf16 kernels.*slower than fp32"):
        assert hardware.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.warns(UserWarning, match="no native bf16"):
        assert hardware.trainer_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert hardware.trainer_precision("32-true", "cpu") == "32-true"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        hardware.resolve_precision("fp16", "cpu")


def test_the_trainer_resolves_auto(monkeypatch):
    from icm_lora.cli import Trainer

    cpu(monkeypatch, "AVX2")
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    assert trainer.precision == "32-true"
    cpu(monkeypatch, "AVX512", avx512_bf16=True)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    assert trainer.precision == "bf16-mixed"


def test_describe_names_the_cpu_class(monkeypatch):
    cpu(monkeypatch, "AVX2")
    assert hardware.describe("cpu").startswith("CPU AVX2 (")
