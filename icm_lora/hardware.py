"""What this machine computes fast: native bf16 or not, and a name for it in every timing.

bf16 is only fast where the hardware has kernels for it: CUDA GPUs with bf16 and CPUs with
AVX512-BF16 or AMX. On AVX2-only CPUs (most laptops, many cloud VMs) a bf16 matmul is 30-100x
slower than the same matmul in fp32, so ``precision: auto`` picks fp32 there.

The CPU flags are not enough on their own: on a 2-core Intel Xeon VM with AVX512-BF16 and no AMX, a
bf16 matmul of the zoo's shapes took 1.7x as long as in fp32 (and a LoRA training step 1.6x), while
an AMD EPYC with the same flag ran bf16 2-2.5x faster. So where a CPU has the flags, ``auto`` times
one matmul of a LoRA training step's shape in both precisions, once per process, and takes bf16 only
if it is clearly faster (``speedup``).
"""

from __future__ import annotations

import functools
import os
import platform
import time
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


BF16_MIN_SPEEDUP = 1.1  # bf16 is chosen on a CPU only when its matmul is at least this much faster than fp32's
SPEEDUP_ENV = "ICM_LORA_BF16_SPEEDUP"  # a measured (or pinned) ratio that this process and its children reuse


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 is the faster precision on ``device``: native on CUDA; on a CPU, native and measured faster."""
    device = torch.device(device)
    if not native_bf16(device):
        return False
    return device.type != "cpu" or speedup(torch.get_num_threads()) >= BF16_MIN_SPEEDUP


@functools.cache
def speedup(threads: int) -> float:
    """fp32 time / bf16 time of a LoRA training step's matmul on this CPU, measured once per process.

    The first measurement is written to the environment (``ICM_LORA_BF16_SPEEDUP``), which processes
    started from this one inherit: Lightning's DDP launcher starts each rank as a copy of the
    command, and every rank must choose the same precision, however close the timing is to the
    threshold. Setting the variable before a run pins the ratio (for example under ``torchrun``,
    whose ranks share no parent that measured it).
    """
    pinned = os.environ.get(SPEEDUP_ENV)
    if pinned is not None:
        try:
            return float(pinned)
        except ValueError:
            raise ValueError(f"{SPEEDUP_ENV}={pinned!r} is not a number (the fp32 / bf16 time ratio)") from None
    ratio = measure_speedup(threads)
    os.environ[SPEEDUP_ENV] = repr(ratio)  # every digit: a rounded copy could fall on the other side of 1.1
    return ratio


def measure_speedup(threads: int, tokens: int = 512, width: int = 576, out: int = 1536, repeats: int = 11) -> float:
    """fp32 time / bf16 time of a (tokens, width) @ (width, out) matmul on ``threads`` CPU threads.

    The default shape is a batch of 4 x 128 tokens through a SmolLM2 MLP projection, the bulk of a
    LoRA training step. The two precisions run in turns and the median of the ``repeats`` ratios is
    returned, so a burst of other load on the machine slows both alike (0.13-0.20 s on a 2-core Xeon).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(tokens, width), torch.randn(width, out)
        a16, b16 = a.bfloat16(), b.bfloat16()
        for _ in range(3):  # warm-up: the first calls pick and prepare the kernels
            a @ b, a16 @ b16
        ratios = sorted(_seconds(a, b) / _seconds(a16, b16) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)
    return ratios[len(ratios) // 2]


def _seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def bf16_note(device: torch.device | str) -> str:
    """What ``auto`` based its choice on, for the hardware line: empty unless a CPU's bf16 was timed."""
    device = torch.device(device)
    if device.type != "cpu" or not native_bf16(device):
        return ""
    verdict = "bf16" if fast_bf16(device) else "fp32"
    return f" (bf16 matmul measured {speedup(torch.get_num_threads()):.2f}x as fast as fp32 here, so auto is {verdict})"


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
    """``auto`` -> ``bf16`` where ``device`` runs it natively and faster, else ``fp32``; explicit bf16 without
    native kernels warns."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        _warn_slow_bf16(device)
    return precision


def trainer_precision(precision: str | int | None, accelerator: object) -> str | int | None:
    """Lightning's precision for the Trainer: ``auto`` -> ``bf16-mixed`` or ``32-true`` by the device."""
    device = accelerator_device(accelerator)
    if precision == "auto":
        return "bf16-mixed" if fast_bf16(device) else "32-true"
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
