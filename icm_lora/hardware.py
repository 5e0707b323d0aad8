"""What this machine computes fast: native bf16 or not, and a name for it in every timing.

bf16 is only fast where the hardware has kernels for it: CUDA GPUs with bf16 and CPUs with
AVX512-BF16 or AMX. On AVX2-only CPUs (most laptops, many cloud VMs) a bf16 matmul is 30-100x
slower than the same matmul in fp32, so ``precision: auto`` picks fp32 there.
"""

from __future__ import annotations

import platform
import warnings

import torch

PRECISIONS = ("auto", "bf16", "fp32")
NATIVE_BF16_CPUS = ("AVX512-BF16", "AMX")


def cpu_capability() -> str:
    """The CPU kernels torch dispatches to: ``AVX2``, ``AVX512``, ``AVX512-BF16``, ``AMX`` or torch's own name.

    Follows ``ATEN_CPU_CAPABILITY`` (``ATEN_CPU_CAPABILITY=avx2`` makes a newer CPU behave as an AVX2 one).
    """
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ...
    if capability != "AVX512":
        return capability
    if _torch_cpu_flag("_is_amx_tile_supported"):
        return "AMX"
    if _torch_cpu_flag("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    return capability


def _torch_cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private in torch; absent in some builds
    return bool(check()) if check is not None else False


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` has native bf16 kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_capability() in NATIVE_BF16_CPUS
    return False


def describe(device: torch.device | str) -> str:
    """A tag for timings: the GPU's name, or the CPU's capability, model and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"CPU {cpu_capability()} ({cpu_model()}, {torch.get_num_threads()} threads)"
    return device.type


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` where ``device`` has native bf16, else ``fp32``; explicit bf16 elsewhere warns."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        _warn_slow_bf16(device)
    return precision


def trainer_precision(precision: str | int | None, accelerator: object) -> str | int | None:
    """Lightning's precision for the Trainer: ``auto`` -> ``bf16-mixed`` or ``32-true`` by the device."""
    device = accelerator_device(accelerator)
    if precision == "auto":
        return "bf16-mixed" if native_bf16(device) else "32-true"
    if str(precision).startswith("bf16") and not native_bf16(device):
        _warn_slow_bf16(device)
    return precision


def accelerator_device(accelerator: object) -> torch.device:
    """The device type a Trainer ``accelerator`` argument lands on (``auto`` picks CUDA when present)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if name in ("auto", "gpu", "cuda") or "cuda" in name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("mps" if "mps" in name else "cpu")


def _warn_slow_bf16(device: torch.device | str) -> None:
    warnings.warn(f"precision bf16 on {describe(device)}, which has no native bf16 kernels: expect it to run "
                  "many times slower than fp32 (precision: auto picks fp32 here)", stacklevel=3)
