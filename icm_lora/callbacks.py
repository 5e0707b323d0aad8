"""Decode -> load -> evaluate -> log, and the writer that turns predictions into PEFT folders."""

from __future__ import annotations

import csv
import io
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
from icm_lora.tasks import slug


class DownstreamEval(Callback):
    """At every validation epoch, and at test, decodes each task's LoRA and scores it on held-out text.

    Validation (runs every ``trainer.check_val_every_n_epoch`` epochs, never in the sanity check):
    perplexity of the mean decode (z = 0) on each task's validation text, its ratio to the task's
    own LoRA (``val/gen_ppl_ratio``, the metric for checkpoint selection), and the reconstruction
    error / cosine similarity to the task's zoo checkpoints. Test: the per-task table of the bare base
    model, the task's own LoRA, the soup, ``num_samples`` generated LoRAs (mean and std), the mean
    decode, and the mean decode with another task's condition (the control), written as markdown
    and CSV beside the TensorBoard logs.

    Args:
        num_samples: generated adapters (z ~ N(0, I)) per task at test.
        block_size: tokens per scored block.
        batch_size: blocks per forward pass.
        precision: ``bf16`` autocast or ``fp32`` for scoring.
        swap_shift: the control decodes task i with the condition of task (i + swap_shift) mod T.
        seed: seed for the test samples.
    """

    def __init__(self, num_samples: int = 3, block_size: int = 256, batch_size: int = 4,
                 precision: str = "bf16", swap_shift: int = 1, seed: int = 0) -> None:
        self.num_samples, self.block_size, self.batch_size = num_samples, block_size, batch_size
        self.precision, self.swap_shift, self.seed = precision, swap_shift, seed
        self.live: LiveAdapter | None = None
        self._cache: dict[tuple[str, str], object] = {}
        self.seconds: dict[str, float] = {}  # wall time spent in downstream evaluation

    def _setup(self, dm, device: torch.device) -> None:
        if self.live is None:
            model, tokenizer = base.load(dm.base_model, dm.cache_dir)
            self.live = LiveAdapter(model.to(device), dm.lora.peft_config(), dm.layout)
            self.scorer = TextScorer(tokenizer, self.block_size, self.batch_size, self.precision)

    def _score(self, flat: Tensor | None, text: str):
        with self.live.use(flat) as model:
            return self.scorer.score(model, text)

    def _cached(self, key: tuple[str, str], flat_fn, text: str):
        """Scores of fixed adapters (base, own LoRA, soup) are computed once per text."""
        if key not in self._cache:
            self._cache[key] = self._score(flat_fn(), text)
        return self._cache[key]

    def _decode(self, pl_module, dm, conditions: Tensor, num_samples: int, mean: bool) -> Tensor:
        """(T, C) -> (T, S, D) un-normalised LoRA vectors."""
        return dm.normalizer.denormalize(pl_module.generate(conditions, num_samples, mean).cpu())

    def _similarity(self, dm, name: str, flat: Tensor) -> tuple[float, float]:
        """MSE (normalised space) to the mean of the task's checkpoints, mean cosine to each of them."""
        ckpts = dm.zoo.checkpoints(name)  # (N, D)
        mse = F.mse_loss(dm.normalizer.normalize(flat), dm.normalizer.normalize(ckpts).mean(0)).item()
        cos = F.cosine_similarity(flat.unsqueeze(0), ckpts, dim=-1).mean().item()
        return mse, cos

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.time()
        self._validate(trainer, pl_module)
        self.seconds["validation"] = self.seconds.get("validation", 0.0) + time.time() - start

    def _validate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        self._setup(dm, pl_module.device)
        gen = self._decode(pl_module, dm, dm.conditions, 1, mean=True)[:, 0]  # (T, D)
        ratios, metrics = [], {}
        for t, (task, name) in enumerate(zip(dm.tasks, dm.task_names)):
            own = self._cached(("own", name), lambda n=name: dm.zoo.final(n), task.val)
            score = self._score(gen[t], task.val)
            mse, cos = self._similarity(dm, name, gen[t])
            ratios.append(score.ppl / own.ppl)
            metrics |= {f"downstream/{name}/val_ppl": score.ppl, f"downstream/{name}/val_bpc": score.bpc,
                        f"downstream/{name}/recon_mse": mse, f"downstream/{name}/cosine": cos}
        metrics["val/gen_ppl_ratio"] = sum(ratios) / len(ratios)
        pl_module.log_dict(metrics)

    @torch.no_grad()
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.time()
        self._test(trainer, pl_module)
        self.seconds["test"] = time.time() - start

    def _test(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        self._setup(dm, pl_module.device)
        torch.manual_seed(self.seed)
        samples = self._decode(pl_module, dm, dm.conditions, self.num_samples, mean=False)  # (T, S, D)
        means = self._decode(pl_module, dm, dm.conditions, 1, mean=True)[:, 0]  # (T, D)
        swapped = means.roll(-self.swap_shift, dims=0)  # row i was decoded with task i + shift's condition
        soup = dm.zoo.soup()
        rows = []
        for t, (task, name) in enumerate(zip(dm.tasks, dm.task_names)):
            base_s = self._cached(("base", name), lambda: None, task.test)
            own = self._cached(("own-test", name), lambda n=name: dm.zoo.final(n), task.test)
            soup_s = self._cached(("soup-test", name), lambda: soup, task.test)
            gens = [self._score(s, task.test) for s in samples[t]]
            mean_s, swap_s = self._score(means[t], task.test), self._score(swapped[t], task.test)
            mse, cos = self._similarity(dm, name, means[t])
            ppls = [g.ppl for g in gens]
            rows.append({
                "task": name, "base_ppl": base_s.ppl, "lora_ppl": own.ppl, "soup_ppl": soup_s.ppl,
                "gen_ppl_mean": statistics.fmean(ppls), "gen_ppl_std": statistics.pstdev(ppls),
                "gen_z0_ppl": mean_s.ppl, "swapped_ppl": swap_s.ppl,
                "gen_vs_lora_pct": 100 * (statistics.fmean(ppls) / own.ppl - 1),
                "base_bpc": base_s.bpc, "lora_bpc": own.bpc, "gen_bpc_mean": statistics.fmean(g.bpc for g in gens),
                "recon_mse": mse, "cosine": cos,
            })
        self._report(trainer, pl_module, rows)

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[dict]) -> None:
        mean_row = {"task": "mean"} | {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "task"}
        # Averages go through Lightning (and its end-of-test summary); per-task values to the logger only.
        pl_module.log_dict({f"test/mean/{k}": v for k, v in mean_row.items() if k != "task"})
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"test/{r['task']}/{k}": v for r in rows for k, v in r.items() if k != "task"},
                                       step=trainer.global_step)
        markdown, table_csv = format_table(rows + [mean_row])
        out = Path(trainer.log_dir or ".")
        files.write_text(out / "downstream_test.md", markdown)
        files.write_text(out / "downstream_test.csv", table_csv)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("downstream/test_table", markdown, trainer.global_step)
        print(f"\nPer-task test table ({out / 'downstream_test.md'}):\n{markdown}")


COLUMNS = [("task", "task", "{}"), ("base_ppl", "base", "{:.2f}"), ("lora_ppl", "own LoRA", "{:.2f}"),
           ("soup_ppl", "soup", "{:.2f}"), ("gen_ppl_mean", "generated (mean ± std)", "{:.2f}"),
           ("gen_vs_lora_pct", "gen vs own %", "{:+.2f}"), ("gen_z0_ppl", "gen z=0", "{:.2f}"),
           ("swapped_ppl", "other task's condition", "{:.2f}"), ("lora_bpc", "own bpc", "{:.3f}"),
           ("gen_bpc_mean", "gen bpc", "{:.3f}"), ("recon_mse", "recon MSE", "{:.3f}"),
           ("cosine", "cosine", "{:.3f}")]


def format_table(rows: list[dict]) -> tuple[str, str]:
    """Markdown (perplexities; bpc) and CSV (every column) of the per-task rows."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [fmt.format(r[key]) for key, _, fmt in COLUMNS]
        cells[4] += f" ± {r['gen_ppl_std']:.2f}"
        lines.append("| " + " | ".join(cells) + " |")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(lines) + "\n", buf.getvalue()


class AdapterWriter(BasePredictionWriter):
    """Writes each predicted LoRA as ``<output_dir>/<task>/sample_<k>/`` (a PEFT adapter folder).

    Args:
        output_dir: where adapter folders go.
    """

    def __init__(self, output_dir: str = "generated_adapters") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        dm = trainer.datamodule
        for name, samples in zip(prediction["name"], prediction["weights"]):
            for k, sample in enumerate(samples):  # (S, D)
                folder = self.output_dir / slug(name) / f"sample_{k:02d}"
                save_adapter(folder, dm.normalizer.denormalize(sample.cpu()), dm.layout, dm.lora.peft_config(),
                             dm.zoo.meta["base_model_path"], {"task": name, "generator": "icm_lora"})
                print(f"wrote {folder}")
