"""Decode -> load -> evaluate -> log, and the writer that turns predictions into PEFT folders."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch import Tensor

from icm_lora import base, files
from icm_lora.adapter import save_adapter
from icm_lora.evaluate import LiveAdapter, TextScorer
from icm_lora.ranks import Ranks
from icm_lora.tasks import fingerprint, slug

# One scoring copy of the base model per base model, LoRA structure, device and scoring settings, and
# the scores of fixed adapters on fixed texts, shared by every DownstreamEval of the process.
_SCORERS: dict[tuple, tuple[LiveAdapter, TextScorer]] = {}
_FIXED: dict[tuple, object] = {}


def content_digest(data: bytes | Tensor) -> str:
    """Content hash of a text's bytes or a flat LoRA's values."""
    if isinstance(data, Tensor):
        data = data.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def own_rng(device: torch.device):
    """A context in which an evaluation may seed and draw (its samples are the same at every validation)
    while training's random stream, on the CPU and ``device``, goes on afterwards as if it had not run."""
    return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])


class TimedEval(Callback):
    """A domain's evaluation: ``_evaluate(trainer, pl_module, split, num_samples)`` runs after every
    validation (never in the sanity check) with ``val_samples`` and after test with ``num_samples``,
    under ``no_grad``; the wall time of each goes to ``seconds`` (the run's phase table reads it)."""

    num_samples: int = 3
    val_samples: int = 0

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.time()
        with own_rng(pl_module.device):
            self._evaluate(trainer, pl_module, "val", self.val_samples)
        self.seconds["validation"] = self.seconds.get("validation", 0.0) + time.time() - start

    @torch.no_grad()
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.time()
        with own_rng(pl_module.device):
            self._evaluate(trainer, pl_module, "test", self.num_samples)
        self.seconds["test"] = time.time() - start

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, num_samples: int) -> None:
        raise NotImplementedError


class DownstreamEval(TimedEval):
    """Decodes each task's LoRA, swaps it into the base model and scores it on held-out text.

    At every validation (every ``trainer.check_val_every_n_epoch`` epochs, never in the sanity
    check) on each task's validation text, and at test on its test text, one row per task: the bare
    base model, the task's own LoRA, the soup (mean of the tasks' final LoRAs), generated LoRAs
    (mean and std over samples z ~ N(0, I)), the z = 0 decode, the z = 0 decode with another task's
    condition (the control), reconstruction MSE and cosine similarity to the task's zoo checkpoints.
    Tables go to TensorBoard (text and scalars) and to ``downstream_{val,test}.{md,csv}`` beside the
    logs. ``val/gen_ppl_ratio`` (z = 0 decode over own LoRA, averaged over tasks) selects checkpoints.
    Under DDP rank 0's decodes are scored, each rank scores its share of the tasks, the rows are
    gathered, and rank 0 writes the tables: every task is evaluated once.

    Args:
        num_samples: generated adapters per task at test.
        val_samples: generated adapters per task at validation (0: the z = 0 decode stands in).
        block_size: tokens per scored block.
        batch_size: blocks per forward pass.
        precision: ``auto`` (bf16 where the hardware has it natively, else fp32), ``bf16`` or ``fp32`` for scoring.
        swap_shift: the control decodes task i with the condition of task (i + swap_shift) mod T.
        seed: seed for the test samples.
    """

    def __init__(self, num_samples: int = 3, val_samples: int = 0, block_size: int = 256, batch_size: int = 4,
                 precision: str = "auto", swap_shift: int = 1, seed: int = 0) -> None:
        self.num_samples, self.val_samples = num_samples, val_samples
        self.block_size, self.batch_size = block_size, batch_size
        self.precision, self.swap_shift, self.seed = precision, swap_shift, seed
        self.live: LiveAdapter | None = None
        self.seconds: dict[str, float] = {}  # wall time spent in downstream evaluation

    def _setup(self, dm, device: torch.device) -> None:
        if self.live is None:
            self._key = (dm.base_model, str(dm.cache_dir), fingerprint(dm.lora), str(device), self.block_size,
                         self.batch_size, self.precision)
            if self._key not in _SCORERS:
                model, tokenizer = base.load(dm.base_model, dm.cache_dir)
                live = LiveAdapter(model.to(device), dm.lora.peft_config(), dm.layout)
                _SCORERS[self._key] = live, TextScorer(live.model, tokenizer, self.block_size, self.batch_size,
                                                       self.precision)
            self.live, self.scorer = _SCORERS[self._key]

    def _score(self, flat: Tensor | None, text: str):
        with self.live.use(flat):
            return self.scorer.score(text)

    def _fixed(self, kind: str, split: str, name: str, flat_fn, text: str):
        """Scores of fixed adapters (base, own LoRA, soup) are computed once per adapter and text, and
        shared by every generator trained in this process (the folds of a benchmark, a sweep)."""
        flat = flat_fn()
        key = (self._key, kind, name, content_digest(text.encode()), None if flat is None else content_digest(flat))
        if key not in _FIXED:
            _FIXED[key] = self._score(flat, text)
        return _FIXED[key]

    def _decode(self, pl_module, dm, conditions: Tensor, num_samples: int, mean: bool) -> Tensor:
        """(T, C) -> (T, S, D) un-normalised LoRA vectors."""
        return dm.normalizer.denormalize(pl_module.generate(conditions, num_samples, mean).cpu())

    def _similarity(self, dm, name: str, flat: Tensor) -> tuple[float, float]:
        """MSE (normalised space) to the mean of the task's checkpoints, mean cosine to each of them."""
        ckpts = dm.zoo.checkpoints(name)  # (N, D)
        mse = F.mse_loss(dm.normalizer.normalize(flat), dm.normalizer.normalize(ckpts).mean(0)).item()
        cos = F.cosine_similarity(flat.unsqueeze(0), ckpts, dim=-1).mean().item()
        return mse, cos

    def _rows(self, pl_module, dm, split: str, num_samples: int) -> list[dict]:
        """One row per task on its ``split`` text; ``num_samples == 0`` scores only the z = 0 decode."""
        ranks = Ranks.current()
        torch.manual_seed(self.seed)
        means = self._decode(pl_module, dm, dm.conditions, 1, mean=True)[:, 0]  # (T, D)
        samples = self._decode(pl_module, dm, dm.conditions, num_samples, mean=False) if num_samples else None
        means, samples = ranks.broadcast((means, samples))  # BatchNorm statistics may differ across ranks
        swapped = means.roll(-self.swap_shift, dims=0)  # row i was decoded with task i + shift's condition
        soup = dm.zoo.soup(dm.task_names)  # (D,) small reads: Zoo.final reads only the final tensor
        mine = {}
        for t in ranks.share(list(range(len(dm.task_names)))):
            task, name = dm.tasks[t], dm.task_names[t]
            text = task.val if split == "val" else task.test
            base_s = self._fixed("base", split, name, lambda: None, text)
            own = self._fixed("own", split, name, lambda n=name: dm.zoo.final(n), text)
            soup_s = self._fixed("soup", split, name, lambda: soup, text)
            z0, swap = self._score(means[t], text), self._score(swapped[t], text)
            gens = [self._score(s, text) for s in samples[t]] if samples is not None else [z0]
            mse, cos = self._similarity(dm, name, means[t])
            ppls = [g.ppl for g in gens]
            mine[t] = {
                "task": name, "base_ppl": base_s.ppl, "lora_ppl": own.ppl, "soup_ppl": soup_s.ppl,
                "gen_ppl_mean": statistics.fmean(ppls), "gen_ppl_std": statistics.pstdev(ppls),
                "gen_z0_ppl": z0.ppl, "swapped_ppl": swap.ppl,
                "gen_vs_lora_pct": 100 * (statistics.fmean(ppls) / own.ppl - 1), "z0_vs_lora": z0.ppl / own.ppl,
                "base_bpc": base_s.bpc, "lora_bpc": own.bpc, "gen_bpc_mean": statistics.fmean(g.bpc for g in gens),
                "recon_mse": mse, "cosine": cos,
            }
        rows = {t: row for part in ranks.gather(mine) for t, row in part.items()}
        return [rows[t] for t in sorted(rows)]

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str, num_samples: int) -> None:
        dm = trainer.datamodule
        self._setup(dm, pl_module.device)
        rows = self._rows(pl_module, dm, split, num_samples)  # every task's row, on every rank
        mean_row = {"task": "mean"} | {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "task"}
        # Averages go through Lightning (the checkpoint monitor reads val/gen_ppl_ratio); per-task values
        # go to the logger only, so Lightning's end-of-test summary stays short.
        logged = {f"{split}/mean/{k}": v for k, v in mean_row.items() if k != "task"}
        if split == "val":
            logged["val/gen_ppl_ratio"] = mean_row["z0_vs_lora"]
        pl_module.log_dict(logged)  # the same values on every rank
        out = Path(trainer.log_dir or ".")  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"downstream/{r['task']}/{split}_{k}": v for r in rows
                                        for k, v in r.items() if k != "task"}, step=trainer.global_step)
        markdown, table_csv = format_table(rows + [mean_row])
        files.write_text(out / f"downstream_{split}.md", markdown)
        files.write_text(out / f"downstream_{split}.csv", table_csv)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(f"downstream/{split}_table", markdown, trainer.global_step)
        if split == "test":
            print(f"\nPer-task test table ({out / 'downstream_test.md'}):\n{markdown}")


COLUMNS = [("task", "task", "{}"), ("base_ppl", "base", "{:.2f}"), ("lora_ppl", "own LoRA", "{:.2f}"),
           ("soup_ppl", "soup", "{:.2f}"), ("gen_ppl_mean", "generated (mean ± std)", "{:.2f}"),
           ("gen_vs_lora_pct", "gen vs own %", "{:+.2f}"), ("gen_z0_ppl", "gen z=0", "{:.2f}"),
           ("swapped_ppl", "other task's condition", "{:.2f}"), ("lora_bpc", "own bpc", "{:.3f}"),
           ("gen_bpc_mean", "gen bpc", "{:.3f}"), ("recon_mse", "recon MSE", "{:.3f}"),
           ("cosine", "cosine", "{:.3f}")]


def format_table(rows: list[dict]) -> tuple[str, str]:
    """Markdown (perplexities; bpc) and CSV (every column) of the per-task rows."""
    return format_rows(rows, COLUMNS, "gen_ppl")


def format_rows(rows: list[dict], columns: list[tuple[str, str, str]], spread: str) -> tuple[str, str]:
    """Markdown of ``columns`` (key, title, format) and CSV of every key; the ``{spread}_mean`` column
    shows ``± {spread}_std`` beside it."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            cells.append(fmt.format(r[key]) + (f" ± {fmt.format(r[f'{spread}_std'])}" if key == f"{spread}_mean" else ""))
        lines.append("| " + " | ".join(cells) + " |")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(lines) + "\n", buf.getvalue()


def write_adapters(dm, generator: str, predicted: dict[str, Tensor], output_dir: Path) -> dict[str, list[Path]]:
    """Write each task's (S, D) normalised samples as ``<output_dir>/<task>/sample_<k>/`` PEFT folders.

    What the condition was made from (for a description: the experts drawn on, with SG-LoRA's alpha,
    and the best similarity against the rejection threshold) goes into each folder's
    ``generation.json`` and, as strings, into the safetensors header; it is printed once per task.
    """
    written: dict[str, list[Path]] = {}
    for name, samples in predicted.items():
        info = dm.predict_info.get(name, {})
        generation = {"task": name, "generator": generator, "base_model": dm.base_model, **info}
        header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in generation.items()}
        if info.get("experts"):
            weight = next(k for k in info["experts"][0] if k != "task")
            drawn = ", ".join(f"{e['task']} ({weight} {e[weight]:.3f})" for e in info["experts"])
            print(f"{name}: experts {drawn}; best similarity {info['best_similarity']:.3f} "
                  f"(threshold {info['threshold']:.3f})")
        for k, sample in enumerate(samples):  # (S, D)
            folder = output_dir / slug(name) / f"sample_{k:02d}"
            save_adapter(folder, dm.normalizer.denormalize(sample.cpu()), dm.layout, dm.lora.peft_config(),
                         dm.zoo.meta["base_model_path"], header, generation | {"sample": k})
            written.setdefault(name, []).append(folder)
            print(f"wrote {folder}")
    return written


class AdapterWriter(BasePredictionWriter):
    """Writes each predicted LoRA as ``<output_dir>/<task>/sample_<k>/`` (a PEFT adapter folder, see
    ``write_adapters``); the folders written by the last ``predict`` are in ``written``.

    Args:
        output_dir: where adapter folders go.
    """

    def __init__(self, output_dir: str = "generated_adapters") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.written: dict[str, list[Path]] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        """Rank 0 writes every task predicted on any rank, once."""
        mine = list(zip(prediction["name"], prediction["weights"].cpu()))
        predicted = dict(pair for part in Ranks.current().gather(mine) for pair in part)  # one folder per task name
        if trainer.is_global_zero:
            generator = pl_module.hparams.get("generator", "icm_lora")
            self.written |= write_adapters(trainer.datamodule, generator, predicted, self.output_dir)
