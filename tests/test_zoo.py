import pytest
import torch

from conftest import BUDGET, LORA, TRAINING, build_zoo
from icm_lora import files, zoo
from icm_lora.zoo import Zoo


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
    real_train = zoo._train

    def flaky(model, tokenizer, task, cfg, layout):
        calls.append(task.name)
        if task.name == "animals" and calls.count("animals") == 1:
            raise KeyboardInterrupt  # stopped mid-build, after 'numbers' was written
        return real_train(model, tokenizer, task, cfg, layout)

    monkeypatch.setattr(zoo, "_train", flaky)
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
