"""``precision: auto`` picks bf16 only where the hardware has native bf16 (detection mocked)."""

import pytest
import torch

from icm_lora import hardware


def cpu(monkeypatch, capability: str, avx512_bf16: bool = False, amx: bool = False) -> None:
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
