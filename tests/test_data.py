import shutil
from collections import Counter
from dataclasses import replace

import pytest
import torch

from conftest import BUDGET, CONDITION, LORA, TRAINING
from icm_lora import base, files, hardware
from icm_lora.data import CONDITIONS, MetaBatchSampler, ZooDataModule


@pytest.fixture
def datamodule(tiny_zoo, task_specs, cache_dir, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, root)
    # The spec order differs from the zoo's build order on purpose.
    dm = ZooDataModule(str(root), base.TINY_LLAMA, list(reversed(task_specs)), BUDGET, LORA, TRAINING, CONDITION,
                       tasks_per_batch=2, checkpoints_per_task=2, val_every=5, cache_dir=str(cache_dir))
    dm.setup("fit")
    return dm


def test_items_pair_each_tasks_weights_with_its_own_condition(datamodule):
    dm = datamodule
    assert dm.task_names == ["code", "animals", "numbers"] and dm.zoo.task_names[0] == "numbers"
    ds = dm.train_dataloader().dataset
    for i, (t, row) in enumerate(ds.items):
        item = ds[i]
        expected = dm.normalizer.normalize(dm.zoo.checkpoint(dm.task_names[t], row))
        assert torch.equal(item["weights"], expected) and torch.equal(item["condition"], dm.conditions[t])
        assert item["task"] == t


def test_shapes_and_splits(datamodule):
    dm = datamodule
    assert dm.lora_dim == dm.zoo.layout.dim and dm.cond_dim == dm.conditions.shape[1] == 64
    assert len(dm.val_items) == 3 and len(dm.train_items) == 3 * (TRAINING.num_checkpoints - 1)
    assert not set(dm.val_items) & set(dm.train_items)
    assert dm.conditions.mean(0).abs().max() < 1e-5  # centred over the zoo's tasks
    assert not torch.allclose(dm.conditions[0], dm.conditions[1])


def test_meta_batches_hold_distinct_tasks_and_equal_shares():
    sampler = MetaBatchSampler([0] * 10 + [1] * 10 + [2] * 10, tasks_per_batch=2, per_task=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        counts = Counter(i // 10 for i in batch)
        assert len(counts) == 2 and set(counts.values()) == {3} and len(set(batch)) == 6
    assert batches != list(sampler)  # a new order every epoch


def test_wrong_task_or_empty_task_list(datamodule, tmp_path, task_specs, cache_dir):
    with pytest.raises(ValueError, match="tasks is empty"):
        ZooDataModule(str(tmp_path), base.TINY_LLAMA, [], cache_dir=str(cache_dir))
    with pytest.raises(ValueError, match="unique"):
        ZooDataModule(str(tmp_path), base.TINY_LLAMA, [task_specs[0], task_specs[0]], cache_dir=str(cache_dir))


def test_description_conditioning(datamodule, task_specs, cache_dir):
    from dataclasses import replace

    dm = ZooDataModule(str(datamodule.zoo_dir), base.TINY_LLAMA, task_specs, BUDGET, LORA, TRAINING,
                       replace(CONDITION, kind="description"), cache_dir=str(cache_dir))
    dm.setup("fit")
    assert dm.cond_dim == 384 and dm.conditions.shape == (3, 384)
    new = dm.condition_for(None, "texts about numbers", "n")
    assert torch.allclose(new, dm.conditions[0], atol=1e-5)  # the same description as task 0, 'numbers'
    assert not torch.allclose(dm.conditions[0], dm.conditions[1])
    with pytest.raises(ValueError, match="needs a 'description'"):
        dm.condition_for(["some text"], None, "x")


def test_finetuned_task_vectors_use_each_tasks_own_lora(datamodule, task_specs, cache_dir):
    from dataclasses import replace

    names = [s.name for s in task_specs]
    from_base = datamodule.raw_conditions(names)
    dm = ZooDataModule(str(datamodule.zoo_dir), base.TINY_LLAMA, task_specs, BUDGET, LORA, TRAINING,
                       replace(CONDITION, model="finetuned"), cache_dir=str(cache_dir))
    dm.setup("fit")  # the condition settings changed, so task vectors are rebuilt
    assert not torch.allclose(dm.raw_conditions(names), from_base)
    with pytest.raises(ValueError, match="'finetuned' needs the task's own LoRA"):
        dm.condition_for(["one two"], None, "new")
    with pytest.raises(ValueError, match="condition model"):
        replace(CONDITION, model="tuned")


def test_dataset_pickles_for_worker_processes(datamodule):
    import pickle

    ds = datamodule.train_dataloader().dataset
    ds[0]  # opens shard handles
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3]["weights"], ds[3]["weights"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="spawn")
    assert next(iter(loader))["weights"].shape == (4, datamodule.lora_dim)


def test_fit_rebuilds_a_deleted_shard(datamodule):
    shard = datamodule.zoo.shard_path("animals")
    shard.unlink()
    datamodule.build()
    assert shard.exists()


def test_ranks_draw_different_meta_batches_and_cover_every_task():
    task_of_item = [t for t in range(5) for _ in range(8)]  # 5 tasks x 8 checkpoints
    samplers = [MetaBatchSampler(task_of_item, tasks_per_batch=2, per_task=2, seed=3, rank=r, world=2) for r in (0, 1)]
    for epoch in range(3):
        for s in samplers:
            s.set_epoch(epoch)
        ours, theirs = (list(s) for s in samplers)
        assert len(ours) == len(theirs) == len(samplers[0]) and ours != theirs
        assert {i // 8 for batch in ours + theirs for i in batch} == set(range(5))
        for batch in ours + theirs:
            assert len({i // 8 for i in batch}) == 2 and len(set(batch)) == 4
    one = MetaBatchSampler(task_of_item, tasks_per_batch=2, per_task=2, seed=3)
    assert len(one) == 2 * len(samplers[0])  # the ranks split one epoch's meta-batches


def test_an_epoch_covers_every_task_even_with_few_checkpoints():
    sampler = MetaBatchSampler(list(range(7)), tasks_per_batch=2, per_task=1, seed=0)  # 7 tasks, one item each
    assert {i for batch in sampler for i in batch} == set(range(7))


def test_datamodules_over_subsets_of_one_zoo_share_its_conditions(datamodule, task_specs, cache_dir, monkeypatch):
    dm, root = datamodule, str(datamodule.zoo_dir)
    names = [s.name for s in task_specs[:2]]
    built = []
    monkeypatch.setattr(ZooDataModule, "_build_conditions", lambda self, m, t, stale: built.append(stale))
    subset = ZooDataModule(root, base.TINY_LLAMA, task_specs[:2], BUDGET, LORA, TRAINING, CONDITION,
                           cache_dir=str(cache_dir))
    assert subset._stale_conditions() == []
    subset.setup("fit")
    assert built == [] and torch.equal(subset.raw_conditions(names), dm.raw_conditions(names))
    # Another text for one task makes that task's condition (and LoRA) stale, and only that one.
    changed = [task_specs[0], type(task_specs[1])(**{**task_specs[1].__dict__, "description": "other words"})]
    other = ZooDataModule(root, base.TINY_LLAMA, changed, BUDGET, LORA, TRAINING, CONDITION, cache_dir=str(cache_dir))
    assert other._stale_conditions() == [task_specs[1].name]


def test_a_partial_rebuild_keeps_the_other_tasks_conditions(datamodule, task_specs, cache_dir):
    dm, root = datamodule, str(datamodule.zoo_dir)
    before = {n: dm.raw_conditions([n]) for n in dm.task_names}
    changed = [task_specs[0], type(task_specs[1])(**{**task_specs[1].__dict__, "description": "other words"})]
    other = ZooDataModule(root, base.TINY_LLAMA, changed, BUDGET, LORA, TRAINING, CONDITION, cache_dir=str(cache_dir))
    other.setup("fit")
    full = ZooDataModule(root, base.TINY_LLAMA, task_specs, BUDGET, LORA, TRAINING, CONDITION, cache_dir=str(cache_dir))
    assert full._stale_conditions() == [task_specs[1].name]  # the zoo now holds the changed task's condition
    for name in (task_specs[0].name, task_specs[2].name):
        assert torch.equal(full.raw_conditions([name]), before[name])


def test_condition_draws_pair_training_checkpoints_with_single_prompts(datamodule, task_specs, cache_dir):
    dm = ZooDataModule(str(datamodule.zoo_dir), base.TINY_LLAMA, task_specs, BUDGET, LORA, TRAINING, CONDITION,
                       val_every=5, condition_draws=1, cache_dir=str(cache_dir))
    dm.setup("fit")
    stored = files.load_tensors(dm.zoo_dir / CONDITIONS)
    train = dm.train_dataloader().dataset
    drawn = {}
    for _ in range(20):
        for i, (t, _row) in enumerate(train.items[:3]):
            prompts = dm.scaler(stored[f"task_vector/{dm.task_names[t]}"])  # (P, C), P = CONDITION.num_prompts
            c = train[i]["condition"]
            assert any(torch.allclose(c, p) for p in prompts)  # one prompt's condition, scaled like the mean
            drawn.setdefault(i, set()).add(tuple(c.tolist()))
    assert all(len(v) == CONDITION.num_prompts for v in drawn.values())  # every prompt drawn over time
    val = dm.val_dataloader().dataset
    assert all(torch.equal(val[i]["condition"], dm.conditions[t]) for i, (t, _) in enumerate(val.items))
    with pytest.raises(ValueError, match="condition_draws"):
        ZooDataModule(str(dm.zoo_dir), base.TINY_LLAMA, task_specs, BUDGET, LORA, TRAINING, CONDITION,
                      condition_draws=-1, cache_dir=str(cache_dir))


def test_the_reported_precision_is_the_one_the_zoo_was_built_in(datamodule, task_specs, cache_dir, monkeypatch):
    # The tiny zoo's LoRAs were trained in fp32; its conditions in what `auto` chose on this machine.
    recorded = files.read_json(datamodule.zoo_dir / "metadata.json")["conditions"]["computed"]
    assert set(recorded) == {s.name for s in task_specs}
    built_in = recorded[task_specs[0].name]["precision"]
    other = {"fp32": "bf16", "bf16": "fp32"}[built_in]
    # On a machine where `auto` would choose the other precision, the report still names what was built.
    monkeypatch.setattr(hardware, "resolve_precision", lambda p, device: other if p == "auto" else p)
    auto = replace(TRAINING, precision="auto")
    dm = ZooDataModule(str(datamodule.zoo_dir), base.TINY_LLAMA, task_specs, BUDGET, LORA, auto, CONDITION,
                       cache_dir=str(cache_dir))
    assert dm.precisions() == {"LoRA zoo": "fp32", "task vectors": built_in}
    # What is still to be built is reported as it will be built: here, one task whose text changed.
    changed = [task_specs[0], replace(task_specs[1], description="other words"), task_specs[2]]
    dm = ZooDataModule(str(datamodule.zoo_dir), base.TINY_LLAMA, changed, BUDGET, LORA, auto, CONDITION,
                       cache_dir=str(cache_dir))
    assert dm.precisions()["task vectors"] == f"{built_in} (2 tasks), {other} (1 task)"
