"""DownstreamEval shares its scoring model and the scores of fixed adapters across the generators
trained in one process (a benchmark's folds, a sweep's settings), keyed by content; its seeded
samples do not reseed training."""

import shutil

import torch

from conftest import BUDGET, CONDITION, LORA, TRAINING
from icm_lora import base
from icm_lora.callbacks import DownstreamEval
from icm_lora.data import ZooDataModule


def test_fixed_scores_are_shared_by_content(tiny_zoo, task_specs, cache_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_zoo, tmp_path / "zoo")
    dm = ZooDataModule(str(tmp_path / "zoo"), base.TINY_LLAMA, task_specs, BUDGET, LORA, TRAINING, CONDITION,
                       cache_dir=str(cache_dir))
    dm.setup("fit")
    first, second = DownstreamEval(block_size=32), DownstreamEval(block_size=32)
    for cb in (first, second):
        cb._setup(dm, torch.device("cpu"))
    assert first.scorer is second.scorer  # one scoring copy of the base model
    calls = []
    real = DownstreamEval._score

    def counting(self, flat, text):
        calls.append(text)
        return real(self, flat, text)
    monkeypatch.setattr(DownstreamEval, "_score", counting)
    name, text = dm.task_names[0], dm.tasks[0].val
    own = first._fixed("own", "val", name, lambda: dm.zoo.final(name), text)
    assert second._fixed("own", "val", name, lambda: dm.zoo.final(name), text) is own and len(calls) == 1
    other = dm.zoo.final(dm.task_names[1])  # another adapter under the same label is scored anew
    assert second._fixed("own", "val", name, lambda: other, text).ppl != own.ppl and len(calls) == 2
    second._fixed("own", "val", name, lambda: dm.zoo.final(name), text + " more")  # another text too
    assert len(calls) == 3


class _Seeding(DownstreamEval):
    """An evaluation that seeds and draws, as the real one does for its samples."""

    def _evaluate(self, trainer, pl_module, split, num_samples):
        torch.manual_seed(self.seed)
        self.drawn = torch.rand(3)


def test_evaluation_leaves_the_training_random_stream_alone():
    # The evaluation reseeds so that its samples repeat at every validation. Training must not be reseeded
    # with it: its reparameterisation noise would replay the same draws after every validation.
    trainer = type("Trainer", (), {"sanity_checking": False})()
    module = torch.nn.Linear(1, 1)
    module.device = torch.device("cpu")
    evaluation = _Seeding()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    torch.rand(2)
    evaluation.on_validation_epoch_end(trainer, module)
    evaluation.on_test_epoch_end(trainer, module)
    assert torch.equal(torch.rand(2), expected[2:])
    assert torch.equal(evaluation.drawn, torch.rand(3, generator=torch.Generator().manual_seed(0)))
