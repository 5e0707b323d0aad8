"""Loaded by the DDP test into ``python -m icm_lora fit`` (``--trainer.callbacks+=ddp_probe.BatchRecorder``)."""

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class BatchRecorder(Callback):
    """Writes ``batches_rank<R>.json``: per training step, the epoch and the task ids of the meta-batch."""

    def __init__(self) -> None:
        self.batches: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append([trainer.current_epoch, batch["task"].tolist()])

    def on_train_end(self, trainer, pl_module) -> None:
        Path(f"batches_rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))
