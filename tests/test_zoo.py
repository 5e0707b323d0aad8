import shutil

import pytest
import torch

from conftest import BUDGET, LORA, TRAINING, build_zoo
from icm_lora import files, zoo, zoo_build
from icm_lora.zoo import METADATA, Zoo


def test_zoo_layout_checkpoints_and_metadata(tiny_zoo, task_specs):
    z = Zoo(tiny_zoo)
    assert z.task_names == [s.name for s in task_specs]
    assert z.meta["base_model"] == "random:tiny-llama" and z.meta["peft_config"]["r"] == LORA.r
    for name in z.task_names:
        ckpts = z.checkpoints(name)
        assert ckpts.shape == (TRAINING.num_checkpoints, z.layout.dim)
        assert torch.equal(z.checkpoint(name, 2), ckpts[2])
        assert torch.equal(z.final(name), ckpts[-1])
        assert not torch.equal(ckpts[0], ckpts[-1])  # training moved the adapter
        val = z.meta["tasks"][name]["val"]
        assert val["final_ppl"] > 0 and val["base_ppl"] > 0
    assert not torch.equal(z.final("numbers"), z.final("animals"))
    assert torch.allclose(z.soup(), torch.stack([z.final(n) for n in z.task_names]).mean(0))


def test_interrupted_build_resumes_without_retraining(tmp_path, task_specs, cache_dir, monkeypatch):
    calls = []
    real_train = zoo_build.train_lora

    def flaky(model, tokenizer, task, *args):
        calls.append(task.name)
        if task.name == "animals" and calls.count("animals") == 1:
            raise KeyboardInterrupt  # stopped mid-build, after 'numbers' was written
        return real_train(model, tokenizer, task, *args)

    monkeypatch.setattr(zoo_build, "train_lora", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path, task_specs, cache_dir)
    assert list(files.read_json(tmp_path / "metadata.json")["tasks"]) == ["numbers"]
    assert not list((tmp_path / "tasks").glob(".*"))  # no half-written temp files left behind
    first = Zoo(tmp_path).final("numbers")
    build_zoo(tmp_path, task_specs, cache_dir)
    assert calls == ["numbers", "animals", "animals", "code"]
    assert torch.equal(Zoo(tmp_path).final("numbers"), first)
    build_zoo(tmp_path, task_specs, cache_dir)  # nothing left to do
    assert len(calls) == 4


def test_corrupt_and_truncated_shards_name_the_file(tiny_zoo, tmp_path):
    import shutil

    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, root)
    shard = root / "tasks" / "numbers.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="numbers.safetensors.*(corrupt|truncated)"):
        Zoo(root).checkpoints("numbers")
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="numbers.safetensors.*corrupt or truncated"):
        Zoo(root).checkpoint("numbers", 0)


def test_nan_checkpoints_are_refused(tiny_zoo, tmp_path):
    import shutil

    from safetensors.torch import save_file

    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, root)
    ckpts = Zoo(root).checkpoints("code")
    ckpts[1, 3] = float("nan")
    save_file({"checkpoints": ckpts, "final": ckpts[-1].clone()}, root / "tasks" / "code.safetensors")
    with pytest.raises(ValueError, match="code.safetensors.*NaN"):
        Zoo(root).checkpoints("code")
    with pytest.raises(ValueError, match="code.safetensors.*checkpoint 1.*NaN"):
        Zoo(root).checkpoint("code", 1)
    with pytest.raises(ValueError, match="refusing to write.*NaN"):
        files.save_tensors(tmp_path / "x.safetensors", {"w": ckpts})


def test_zoo_for_another_base_model_or_lora_is_refused(tiny_zoo, tmp_path, task_specs, cache_dir):
    import shutil

    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, root)
    meta = files.read_json(root / "metadata.json")
    meta["base_model"] = "org/another-model"
    files.write_json(root / "metadata.json", meta)
    with pytest.raises(ValueError, match="metadata.json.*base_model='org/another-model'"):
        build_zoo(root, task_specs, cache_dir)


def test_corrupt_metadata_is_named(tmp_path):
    (tmp_path / "metadata.json").write_text("{ not json")
    with pytest.raises(ValueError, match="metadata.json.*not a readable JSON"):
        Zoo(tmp_path)
    with pytest.raises(FileNotFoundError, match="no zoo here"):
        Zoo(tmp_path / "missing")


def test_budget_and_training_validation():
    with pytest.raises(ValueError, match="exceeds steps"):
        type(TRAINING)(steps=4, num_checkpoints=5)
    assert BUDGET.num_demos == 4


def copy_zoo(tiny_zoo, tmp_path):
    import shutil

    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, root)
    return root


def test_only_what_a_lora_learns_from_makes_an_entry_stale(tiny_zoo, tmp_path, task_specs):
    from dataclasses import replace

    from conftest import sources
    from icm_lora.tasks import TaskSpec
    from icm_lora.zoo import mismatches

    root = copy_zoo(tiny_zoo, tmp_path)
    current = dict(zip([s.name for s in task_specs], sources(task_specs)))
    assert mismatches(root, current, TRAINING) == {}
    # How it was computed is recorded, not hashed.
    assert mismatches(root, current, replace(TRAINING, precision="bf16", cache_frozen=False)) == {}
    assert Zoo(root).meta["tasks"]["numbers"]["computed"]["precision"] == "fp32"
    # What it learns from: steps, learning rate, the text.
    steps = mismatches(root, current, replace(TRAINING, steps=8, lr=2.0e-2))
    assert set(steps) == set(current) and steps["code"] == "training.lr 0.01 -> 0.02; training.steps 6 -> 8"
    text = dict(zip(current, sources(task_specs, replace(BUDGET, train_chars=2000))))
    assert mismatches(root, text, TRAINING)["animals"] == "text.train_chars 3000 -> 2000"
    where = current | {"code": {"task": current["code"]["task"] | {"where": {"lang": "en"}}, "text": current["code"]["text"]}}
    assert mismatches(root, where, TRAINING) == {"code": "task.where {} -> {'lang': 'en'}"}
    extra = current | {"extra": sources([TaskSpec(name="extra")])[0]}
    assert mismatches(root, extra, TRAINING) == {"extra": "not in the zoo yet"}
    (root / "tasks" / "animals.safetensors").unlink()
    assert mismatches(root, current, TRAINING) == {"animals": "its shard tasks/animals.safetensors is missing"}


def test_entries_of_version_1_zoos_stay_current(tiny_zoo, tmp_path, task_specs):
    from dataclasses import replace

    from conftest import sources
    from icm_lora.tasks import fingerprint
    from icm_lora.zoo import mismatches

    root = copy_zoo(tiny_zoo, tmp_path)
    meta = files.read_json(root / "metadata.json")
    # Version 1 hashed all of its ZooTraining fields, precision included, and recorded no source or settings.
    v1_training = {"steps": 6, "batch_size": 2, "block_size": 32, "lr": 1.0e-2, "warmup_steps": 1,
                   "num_checkpoints": 5, "checkpoint_every": 1, "precision": "bf16", "seed": 0}
    for spec in task_specs:
        entry = meta["tasks"][spec.name]
        entry["hash"] = fingerprint(fingerprint(spec, BUDGET), v1_training)
        for key in ("source", "training", "computed"):
            del entry[key]
    files.write_json(root / "metadata.json", meta)
    current = dict(zip([s.name for s in task_specs], sources(task_specs)))
    assert mismatches(root, current, replace(TRAINING, precision="fp32")) == {}
    assert "older entry" in mismatches(root, current, replace(TRAINING, steps=8))["code"]


def test_a_rebuild_says_what_it_retrains_and_why(tiny_zoo, tmp_path, task_specs, cache_dir, capsys):
    from dataclasses import replace

    root = copy_zoo(tiny_zoo, tmp_path)
    (root / "tasks" / "code.safetensors").unlink()
    capsys.readouterr()
    build_zoo(root, task_specs, cache_dir)
    printed = capsys.readouterr().out
    assert "training 1 of 3 tasks" in printed and "code: its shard tasks/code.safetensors is missing" in printed
    untouched = Zoo(root).checkpoints("numbers")
    build_zoo(root, task_specs, cache_dir, training=replace(TRAINING, precision="bf16"))  # nothing to retrain
    assert "tasks:" not in capsys.readouterr().out and torch.equal(Zoo(root).checkpoints("numbers"), untouched)


def test_check_current_refuses_without_building(tiny_zoo, tmp_path, task_specs):
    from dataclasses import replace

    from conftest import sources
    from icm_lora.zoo import ZooMismatch, check_current

    root = copy_zoo(tiny_zoo, tmp_path)
    current = dict(zip([s.name for s in task_specs], sources(task_specs)))
    check_current(root, "random:tiny-llama", LORA, current, TRAINING)
    with pytest.raises(ZooMismatch, match="numbers: training.steps 6 -> 7.*Only `fit` trains"):
        check_current(root, "random:tiny-llama", LORA, current, replace(TRAINING, steps=7))
    with pytest.raises(ZooMismatch, match="built with lora="):
        check_current(root, "random:tiny-llama", replace(LORA, r=4), current, TRAINING)
    with pytest.raises(FileNotFoundError, match="no zoo here"):
        check_current(tmp_path / "nothing", "random:tiny-llama", LORA, current, TRAINING)


def test_a_copied_zoo_is_written_apart_and_made_again_when_its_source_changes(tiny_zoo, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "copy"
    shutil.copytree(tiny_zoo, src)
    zoo.copy_zoo(src, dst)
    name = Zoo(src).task_names[0]
    shard = Zoo(src).meta["tasks"][name]["file"]
    assert (dst / shard).read_bytes() == (src / shard).read_bytes()
    assert torch.equal(Zoo(dst).final(name), Zoo(src).final(name))
    original = (src / shard).read_bytes()
    files.save_tensors(dst / shard, {"checkpoints": torch.zeros(2, Zoo(src).layout.dim), "final": torch.zeros(Zoo(src).layout.dim)})
    assert (src / shard).read_bytes() == original  # a write into the copy replaces its file, never the source's
    zoo.copy_zoo(src, dst)  # the source is unchanged: the copy (and what was rebuilt in it) is kept
    assert Zoo(dst).final(name).abs().sum() == 0
    files.write_json(src / METADATA, files.read_json(src / METADATA) | {"note": "rebuilt"})
    zoo.copy_zoo(src, dst)  # the source changed: copied again
    assert torch.equal(Zoo(dst).final(name), Zoo(src).final(name))
