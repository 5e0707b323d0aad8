"""Time the CVAE: decoding one LoRA (batch 1, z ~ N(0, I)) and training throughput.

    python benchmarks/generator_speed.py --device cpu --dims 30720 92160
    python benchmarks/generator_speed.py --device cuda --dims 30720 460800 1929928
    python benchmarks/generator_speed.py --dims 92160 --channels 4 8 16 32 64 128 128 64 32 16 8 4 --dense_rank 64

The defaults are the paper's CVAE; ``--channels`` and ``--dense_rank`` give another config's
(the last line is ``experiments/openworld.yaml``'s).

Prints a markdown table (median of ``--repeats`` timed runs after warm-up), tagged with the device
and the precision (``--precision auto``: bf16 autocast only where the hardware has native bf16).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icm_lora import hardware
from icm_lora.cvae import CVAE, PAPER_CHANNELS


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(model: CVAE, device: str, batch: int, bf16: bool, warmup: int, repeats: int) -> dict:
    """Decode latency (one LoRA) and training samples/s of ``model`` on ``device``."""
    model = model.to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    c1 = torch.randn(1, model.cond_dim, device=device)
    model.eval()
    with torch.no_grad(), autocast:
        decode = time_call(lambda: model.generate(c1, 1), device, warmup, repeats)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    w, c = torch.randn(batch, model.input_dim, device=device), torch.randn(batch, model.cond_dim, device=device)

    def step() -> None:
        with autocast:
            recon, kl = model.loss(w, c)
        (recon + 0.005 * kl).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train = time_call(step, device, warmup, repeats)
    params = sum(p.numel() for p in model.parameters())
    return {"dim": model.input_dim, "params": params, "decode_ms": 1000 * decode, "train_samples_s": batch / train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[30_720, 92_160])
    parser.add_argument("--cond_dim", type=int, default=576)
    parser.add_argument("--channels", type=int, nargs="+", default=list(PAPER_CHANNELS))
    parser.add_argument("--dense_rank", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=hardware.PRECISIONS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    precision = hardware.resolve_precision(args.precision, args.device)
    print(f"device: {hardware.describe(args.device)}; torch {torch.__version__}; {precision}; "
          f"training batch {args.batch}; channels {args.channels}; dense_rank {args.dense_rank}\n")
    print("| flat LoRA length | CVAE parameters | decode one LoRA (ms) | training (samples/s) |\n|---|---|---|---|")
    for dim in args.dims:
        model = CVAE(dim, args.cond_dim, channels=tuple(args.channels), dense_rank=args.dense_rank)
        r = bench(model, args.device, args.batch, precision == "bf16", args.warmup, args.repeats)
        print(f"| {r['dim']:,} | {r['params'] / 1e6:.1f} M | {r['decode_ms']:.2f} | {r['train_samples_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
