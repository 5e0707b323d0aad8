"""``make bench``: how fast each phase of an experiment runs on this machine, in one run.

    python benchmarks/bench.py [--config experiments/domains.yaml] [--task mathematics] [--out FILE]

1. Where a LoRA training step's time goes (frozen prefix, adapted layers + LM head, the LM head and
   its softmax alone, plain and fused), at 1 thread and at all threads.
2. LoRA zoo: the zoo builder (frozen prefix cached per training block, fused head loss) against a plain PEFT +
   transformers loop of the same LoRA on the same blocks in the same order; tokens/s of each and
   the test perplexity of the two LoRAs.
3. Scoring: tokens/s of scoring several adapters on one text, with and without the frozen prefix reused.
4. CVAE: training samples/s and the time to decode one LoRA, at the config's sizes.
5. Precision check: one full training step and one bare matmul in fp32 and in bf16, beside what
   ``precision: auto`` chose, so a user sees whether the choice is the faster one on their machine
   (bf16 is timed only where the device has native bf16: elsewhere one step takes minutes).

Every figure is tagged with the device (CPU capability and model, or GPU name) and the precision;
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` makes a newer CPU run AVX2 kernels. The
markdown goes to ``--out`` (default ``benchmarks/results/<device>-<precision>.md``) and stdout.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from generator_speed import bench as cvae_speed
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from icm_lora import base, files, hardware
from icm_lora.cli import ICMLoRACLI, Trainer
from icm_lora.data import ZooDataModule
from icm_lora.evaluate import TextScorer, autocast
from icm_lora.head_loss import linear_cross_entropy
from icm_lora.prefix import FrozenPrefix
from icm_lora.system import ICMLoRA
from icm_lora.tasks import split_task
from icm_lora.zoo import ZooTraining
from icm_lora.zoo_build import token_blocks, train_lora

ROOT = Path(__file__).resolve().parents[1]


def plain_peft_loop(model, tokenizer, task, cfg: ZooTraining, precision: str) -> None:
    """The reference: the LoRA trained the way a PEFT + transformers user writes it (same data, same order)."""
    blocks = token_blocks(tokenizer, task.train, cfg.block_size)
    rng = random.Random(f"{cfg.seed}:{task.name}")  # the zoo builder's draws
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    device = next(model.parameters()).device
    model.train()
    for _ in range(cfg.steps):
        batch = torch.stack([blocks[rng.randrange(len(blocks))] for _ in range(cfg.batch_size)]).to(device)
        with autocast(precision, device):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        warmup.step()
    model.eval()


def seconds(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_breakdown(peft_model, cfg: ZooTraining, precision: str, threads: int) -> dict:
    """Seconds of one training step and of its parts on a random batch, at ``threads`` threads."""
    torch.set_num_threads(threads)
    device = next(peft_model.parameters()).device
    vocab = peft_model.config.vocab_size
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.block_size), device=device)
    prefix = FrozenPrefix(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]

    def full() -> None:
        with autocast(precision, device):
            peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def upper(hidden: torch.Tensor) -> None:
        with autocast(precision, device):
            prefix.loss(hidden, ids).backward()

    with autocast(precision, device):
        hidden = prefix.hidden(ids)
    prefix.verify(ids[:1])
    head = peft_model.get_output_embeddings().weight
    x = torch.randn(ids.numel(), head.shape[1], device=device, requires_grad=True)

    def head_and_softmax() -> None:
        with autocast(precision, device):
            F.cross_entropy((x @ head.t()).float(), ids.flatten()).backward()

    def fused_head() -> None:
        with autocast(precision, device):
            linear_cross_entropy(x, head, ids.flatten()).backward()

    out = {"threads": threads, "full step": seconds(full)}
    with autocast(precision, device):
        out["frozen prefix (no grad)"] = seconds(lambda: prefix.hidden(ids))
    out["adapted layers + LM head (fwd + bwd)"] = seconds(lambda: upper(hidden))
    out["LM head + softmax alone (fwd + bwd)"] = seconds(head_and_softmax)
    out["fused LM head loss (fwd + bwd)"] = seconds(fused_head)
    for p in params:
        p.grad = None
    return out


def precision_check(peft_model, cfg: ZooTraining) -> dict:
    """Seconds of one full training step and of a 512x576 @ 576x1536 matmul in fp32 and, where the device
    has native bf16, in bf16 (``None`` where it is not timed)."""
    device = next(peft_model.parameters()).device
    ids = torch.randint(0, peft_model.config.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    a, b = torch.randn(512, 576, device=device), torch.randn(576, 1536, device=device)
    out = {}
    for precision in ("fp32", "bf16"):
        timed = precision == "fp32" or hardware.native_bf16(device)
        out[precision] = seconds(_step(peft_model, ids, precision)) if timed else None
        out[f"{precision} matmul"] = seconds(_matmul(a, b, precision), repeats=10) if timed else None
    for p in peft_model.parameters():
        p.grad = None
    return out


def _step(peft_model, ids: torch.Tensor, precision: str):
    """A full forward + backward of the LoRA model on ``ids`` in ``precision``, as a callable."""
    device = ids.device

    def step() -> None:
        with autocast(precision, device):
            peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return step


def _matmul(a: torch.Tensor, b: torch.Tensor, precision: str):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x, y = a.to(dtype), b.to(dtype)
    return lambda: x @ y


def zoo_speed(peft_model, tokenizer, task, dm: ZooDataModule, precision: str) -> dict:
    """Tokens/s of the zoo builder and of the plain loop, and the test perplexity of each LoRA."""
    cfg, layout = dm.training, dm.layout
    init = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    tokens = cfg.steps * cfg.batch_size * cfg.block_size
    start = time.perf_counter()
    plain_peft_loop(peft_model, tokenizer, task, cfg, precision)
    plain_s = time.perf_counter() - start
    plain = layout.flatten(get_peft_model_state_dict(peft_model))
    set_peft_model_state_dict(peft_model, init)
    start = time.perf_counter()
    ckpts, skipped = train_lora(peft_model, tokenizer, task, cfg, layout, precision, FrozenPrefix(peft_model))
    ours_s = time.perf_counter() - start
    scorer = TextScorer(peft_model, tokenizer, precision=precision, reuse_prefix=False)  # the full forward
    ppl = {}
    for name, flat in (("plain", plain), ("ours", ckpts[-1])):
        set_peft_model_state_dict(peft_model, layout.unflatten(flat))
        ppl[name] = scorer.score(task.test).ppl
    blocks = len(token_blocks(tokenizer, task.train, cfg.block_size))
    return {"tokens": tokens, "blocks": blocks, "draws": cfg.steps * cfg.batch_size, "skipped_layers": skipped,
            "plain_tok_s": tokens / plain_s, "ours_tok_s": tokens / ours_s, "plain_ppl": ppl["plain"],
            "ours_ppl": ppl["ours"], "max_abs_diff": (plain - ckpts[-1]).abs().max().item(),
            "lora_norm": plain.norm().item(), "diff_norm": (plain - ckpts[-1]).norm().item()}


def scoring_speed(peft_model, tokenizer, task, dm: ZooDataModule, precision: str, adapters: int) -> dict:
    """Tokens/s of scoring ``adapters`` adapters on the task's test text, with and without the prefix reused."""
    flats = [torch.randn(dm.layout.dim, generator=torch.Generator().manual_seed(k)) * 0.01 for k in range(adapters)]
    out = {}
    for reuse in (False, True):
        scorer = TextScorer(peft_model, tokenizer, precision=precision, reuse_prefix=reuse)
        tokens = sum(len(b) - 1 for b in scorer.blocks(task.test)[0])  # each block predicts all but its first token
        start = time.perf_counter()
        for flat in flats:
            set_peft_model_state_dict(peft_model, dm.layout.unflatten(flat))
            scorer.score(task.test)
        out["reuse" if reuse else "full"] = adapters * tokens / (time.perf_counter() - start)
    return out


def precision_lines(check: dict, chosen: str) -> list[str]:
    """Markdown: the step and the matmul in each precision, and whether ``auto``'s choice is the faster step."""
    def cell(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
        return "not timed (no native bf16)" if v is None else f"{v * scale:.{digits}f}"

    lines = ["## Precision check: what `precision: auto` chose, against the other", "",
             "| precision | full training step (s) | 512x576 @ 576x1536 matmul (ms) |", "|---|---|---|"]
    lines += [f"| {p}{' (chosen)' if p == chosen else ''} | {cell(check[p])} | {cell(check[f'{p} matmul'], 1e3, 1)} |"
              for p in ("fp32", "bf16")]
    if check["bf16"] is not None:
        faster = "bf16" if check["bf16"] < check["fp32"] else "fp32"
        verdict = "the faster one" if faster == chosen else f"NOT the faster one: set precision: {faster} here"
        lines += ["", f"The full step runs {check['fp32'] / check['bf16']:.2f}x as fast in bf16 as in fp32 (the bare "
                  f"matmul {check['fp32 matmul'] / check['bf16 matmul']:.2f}x): `auto`'s choice, {chosen}, is {verdict}."]
    return lines + [""]


def report(tag: str, dm: ZooDataModule, task_name: str, breakdown: list[dict], zoo: dict, scoring: dict,
           cvae: dict, cvae_precision: str, batch: int, check: dict, precision: str) -> str:
    cfg = dm.training
    lines = [f"# Benchmark: {tag}", "", f"torch {torch.__version__}; config: the embedded default's "
             f"LoRA (r={dm.lora.r} on {', '.join(dm.lora.target_modules)} of layers {dm.lora.layers_to_transform}, "
             f"{dm.layout.dim:,} values) on task `{task_name}`; batch {cfg.batch_size} x {cfg.block_size} tokens.", "",
             "## Where a LoRA training step's time goes (seconds, median of 3)", "",
             "| threads | full step | frozen prefix (no grad) | adapted layers + fused LM head loss (fwd + bwd) | "
             "LM head + softmax alone (fwd + bwd) | fused LM head loss alone (fwd + bwd) |", "|---|---|---|---|---|---|"]
    for b in breakdown:
        lines.append(f"| {b['threads']} | {b['full step']:.3f} | {b['frozen prefix (no grad)']:.3f} | "
                     f"{b['adapted layers + LM head (fwd + bwd)']:.3f} | {b['LM head + softmax alone (fwd + bwd)']:.3f} | "
                     f"{b['fused LM head loss (fwd + bwd)']:.3f} |")
    gain = zoo["ours_tok_s"] / zoo["plain_tok_s"]
    lines += ["", f"## LoRA zoo: {cfg.steps} steps, {zoo['draws']} block draws from {zoo['blocks']} blocks", "",
              "| training loop | tokens/s | test ppl of the LoRA |", "|---|---|---|",
              f"| plain PEFT + transformers loop | {zoo['plain_tok_s']:.0f} | {zoo['plain_ppl']:.3f} |",
              f"| zoo builder (frozen prefix of {zoo['skipped_layers']} layers cached per block, fused LM head loss) | "
              f"{zoo['ours_tok_s']:.0f} | {zoo['ours_ppl']:.3f} |", "",
              f"Speed-up {gain:.2f}x; test perplexity {100 * (zoo['ours_ppl'] / zoo['plain_ppl'] - 1):+.3f}% against "
              f"the plain loop; the two LoRAs differ by {zoo['diff_norm']:.2e} in L2 norm (max |diff| "
              f"{zoo['max_abs_diff']:.2e}; the LoRA's norm is {zoo['lora_norm']:.2f}).", "",
              "## Scoring (perplexity of an adapter on the task's test text)", "",
              "| path | tokens/s |", "|---|---|",
              f"| full forward per adapter | {scoring['full']:.0f} |",
              f"| frozen prefix computed once per text, reused by every adapter | {scoring['reuse']:.0f} |", "",
              f"## CVAE ({cvae['params'] / 1e6:.1f} M parameters, flat LoRA length {cvae['dim']:,}, {cvae_precision})", "",
              f"| training (samples/s, batch {batch}) | decode one LoRA (ms) |", "|---|---|",
              f"| {cvae['train_samples_s']:.1f} | {cvae['decode_ms']:.1f} |", ""]
    return "\n".join(lines + precision_lines(check, precision))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments" / "domains.yaml"))
    parser.add_argument("--task", default=None, help="task of the config to train on (default: its first)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--adapters", type=int, default=6, help="adapters scored on one text")
    parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/<device>-<precision>.md)")
    args = parser.parse_args()

    cli = ICMLoRACLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False,
                     args=["--config", args.config, "--trainer.logger", "false"])
    dm, system = cli.datamodule, cli.model
    device = torch.device(args.device)
    precision = hardware.resolve_precision(dm.training.precision, device)
    threads = torch.get_num_threads()
    tag = f"{hardware.describe(device)}, {precision}"
    specs = {s.name: s for s in dm.task_specs}
    if args.task and args.task not in specs:
        raise SystemExit(f"bench: no task {args.task!r} in {args.config} (tasks: {', '.join(specs)})")
    task = split_task(specs[args.task] if args.task else dm.task_specs[0], dm.text)
    model, tokenizer = base.load(dm.base_model, dm.cache_dir)
    torch.manual_seed(dm.lora.init_seed)
    peft_model = get_peft_model(model.to(device), dm.lora.peft_config())

    print(f"{tag}: step breakdown", flush=True)
    breakdown = [step_breakdown(peft_model, dm.training, precision, n) for n in sorted({1, threads})]
    torch.set_num_threads(threads)
    print(f"{tag}: zoo builder against a plain PEFT loop ({dm.training.steps} steps each)", flush=True)
    zoo = zoo_speed(peft_model, tokenizer, task, dm, precision)
    print(f"{tag}: scoring", flush=True)
    scoring = scoring_speed(peft_model, tokenizer, task, dm, precision, args.adapters)
    print(f"{tag}: CVAE", flush=True)
    cvae_precision = str(cli.trainer.precision)  # the config's trainer.precision, `auto` resolved
    batch = dm.tasks_per_batch * dm.checkpoints_per_task
    cvae = cvae_speed(system.cvae, str(device), batch, cvae_precision.startswith("bf16"), warmup=3, repeats=10)

    print(f"{tag}: precision check", flush=True)
    check = precision_check(peft_model, dm.training)

    text = report(tag, dm, task.name, breakdown, zoo, scoring, cvae, cvae_precision, batch, check, precision)
    kind = hardware.cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name(device)
    name = re.sub(r"[^a-z0-9]+", "-", f"{device.type}-{kind}-{precision}".lower()).strip("-")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{name}.md"
    files.write_text(out, text)
    print(f"\n{text}\nwritten to {out}")


if __name__ == "__main__":
    main()
