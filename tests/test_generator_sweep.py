"""The generator sweep on the tiny model: settings compared on validation folds only, conditions of
other settings kept out of the zoo, generators reused, and retrained when their settings change."""

import csv
import inspect
import random
import shutil

import pytest
import torch
import yaml
from test_openworld import write_config

from conftest import BUDGET, CONDITION, LORA, TRAINING
from icm_lora import files, generator_sweep, openworld
from icm_lora.base import load
from icm_lora.cli import Trainer
from icm_lora.condition import ConditionSpec, task_vectors
from icm_lora.data import CONDITIONS, ZooDataModule
from icm_lora.generator_sweep import GeneratorSetting, GeneratorSweep, GeneratorSweepError, check
from icm_lora.openworld import Fold, forget_other_settings, generator_key

SETTINGS = [{"name": "reference"},
            {"name": "heavier KL, half the zoo", "changes": {"model.kl_weight": 0.5}, "seen_every": 2},
            {"name": "mean pooling", "changes": {"data.condition.pooling": "mean", "data.condition.layer": 1}}]


@pytest.fixture
def zoo(tiny_zoo, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, root)
    return root


def sweep_config(tmp_path, task_specs, cache_dir, zoo, settings=SETTINGS) -> str:
    path = write_config(tmp_path, task_specs, cache_dir, zoo)
    cfg = yaml.safe_load(open(path))
    cfg["generator_sweep"] = {"settings": settings, "output": str(tmp_path / "results" / "sweep")}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def test_compares_settings_on_validation_folds_and_reuses_them(tmp_path, task_specs, cache_dir, zoo, monkeypatch):
    path = sweep_config(tmp_path, task_specs, cache_dir, zoo)
    ZooDataModule(str(zoo), "random:tiny-llama", task_specs, BUDGET, LORA, TRAINING, CONDITION,
                  cache_dir=str(cache_dir)).setup("fit")  # the zoo's conditions, to compare with after the sweep
    conditions = (zoo / CONDITIONS).read_bytes()
    texts = []
    real_score = openworld.Benchmark.score

    def spy(self, fold, seen, name, generators, multitask):
        texts.append(fold.role)
        return real_score(self, fold, seen, name, generators, multitask)
    monkeypatch.setattr(openworld.Benchmark, "score", spy)
    results = generator_sweep.main(["--config", path])
    monkeypatch.undo()
    assert set(texts) == {"validation"}  # test folds are never scored
    assert [r["setting"] for r in results] == ["reference", "heavier KL, half the zoo", "mean pooling"]
    assert all(list(r["tasks"]) == ["animals"] for r in results)  # the validation fold's held-out task
    assert (zoo / CONDITIONS).read_bytes() == conditions  # the other pooling lives in a view of the zoo
    view = zoo / "views" / "mean_pooling"
    assert (view / CONDITIONS).exists() and (view / "tasks" / "code.safetensors").samefile(
        zoo / "tasks" / "code.safetensors")
    runs = tmp_path / "results" / "sweep_runs"
    half = files.read_json(runs / "heavier_KL_half_the_zoo" / "openworld_runs" / "val" / "task_vector" / "done.json")
    assert half["seen"] == ["numbers"] and "animals" not in half["seen"]
    table = (tmp_path / "results" / "sweep.md").read_text()
    assert table.count("(chosen)") == 1 and "model.kl_weight=0.5, 1 in 2 seen tasks" in table
    assert "| soup |" in table and "| mean pooling |" in table
    rows = list(csv.DictReader(open(tmp_path / "results" / "sweep.csv")))
    generated = [r["setting"] for r in rows if r["method"] == "ICM-LoRA (task_vector)"]
    assert generated == [s["name"] for s in SETTINGS] and all(r["fold"] == "val" for r in rows)

    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a finished setting was trained again"))
    again = generator_sweep.main(["--config", path])
    assert [r["tasks"] for r in again] == [r["tasks"] for r in results]


def test_a_generator_trained_with_other_settings_is_trained_again(tmp_path, task_specs, cache_dir, zoo):
    one = [{"name": "s", "changes": {"model.kl_weight": 0.5}}]
    path = sweep_config(tmp_path, task_specs, cache_dir, zoo, one)
    generator_sweep.main(["--config", path])
    folder = tmp_path / "results" / "sweep_runs" / "s" / "openworld_runs" / "val" / "task_vector"
    first = files.read_json(folder / "done.json")
    path = sweep_config(tmp_path, task_specs, cache_dir, zoo, [{"name": "s", "changes": {"model.kl_weight": 0.1}}])
    generator_sweep.main(["--config", path])
    second = files.read_json(folder / "done.json")
    assert first["key"] != second["key"]
    assert torch.load(second["best"], weights_only=False)["hyper_parameters"]["kl_weight"] == 0.1


def test_mixup_off_and_decoding_settings_keep_the_generator_key_and_mixup_on_changes_it():
    from jsonargparse import Namespace

    def cfg(**model):
        return Namespace(seed_everything=0, trainer=Namespace(max_epochs=2, logger=None), model=Namespace(**model),
                         data=Namespace(zoo_dir="zoo"), eval=Namespace(num_samples=1), checkpoint=None)

    earlier = generator_key(cfg(latent_dim=8))  # a release without the option
    assert generator_key(cfg(latent_dim=8, mixup=0.0)) == earlier
    assert generator_key(cfg(latent_dim=8, mixup=0.4)) != earlier
    assert generator_key(cfg(latent_dim=8, correction_scale=0.5)) == earlier  # read at generation only


def test_expert_dropout_off_keeps_the_generator_key_and_on_changes_it():
    from jsonargparse import Namespace

    def cfg(semantic):
        return Namespace(seed_everything=0, trainer=Namespace(max_epochs=2, logger=None), model=Namespace(latent_dim=8),
                         data=Namespace(zoo_dir="zoo", semantic=semantic), eval=Namespace(num_samples=1), checkpoint=None)

    earlier = generator_key(cfg(Namespace(top_k=8)))  # a release without the option
    assert generator_key(cfg(Namespace(top_k=8, expert_dropout=0.0))) == earlier
    assert generator_key(cfg(Namespace(top_k=8, expert_dropout=0.25))) != earlier
    assert generator_key(cfg(None)) != earlier  # no semantic section at all (a task-vector config) still keys


def test_forget_other_settings_keeps_a_current_folder(tmp_path):
    folder = tmp_path / "gen"
    (folder / "checkpoints").mkdir(parents=True)
    files.write_json(folder / "generator.json", {"key": "a"})
    files.write_json(folder / "done.json", {"best": "x", "key": "a"})
    forget_other_settings(folder, "a")
    assert (folder / "done.json").exists() and (folder / "checkpoints").exists()
    forget_other_settings(folder, "b")
    assert not (folder / "done.json").exists() and not (folder / "checkpoints").exists()
    (folder / "checkpoints").mkdir()
    (folder / "generator.json").unlink()  # trained before settings were recorded: not trusted
    forget_other_settings(folder, "b")
    assert not (folder / "checkpoints").exists()


def test_bad_settings_are_refused():
    folds = [Fold("v", ["a"], "validation"), Fold("t", ["b"])]
    cases = {"is empty": GeneratorSweep(settings=[]),
             "unique": GeneratorSweep(settings=[GeneratorSetting("x"), GeneratorSetting("x")]),
             "cannot change": GeneratorSweep(settings=[GeneratorSetting("x", {"data.zoo_dir": "elsewhere"})]),
             "seen_every": GeneratorSweep(settings=[GeneratorSetting("x", seen_every=0)])}
    for message, spec in cases.items():
        with pytest.raises(GeneratorSweepError, match=message):
            check(spec, folds)
    with pytest.raises(GeneratorSweepError, match="no fold with role 'validation'"):
        check(GeneratorSweep(settings=[GeneratorSetting("x")]), folds[1:])


def test_a_bad_sweep_exits_with_one_line(tmp_path, task_specs, cache_dir, zoo):
    path = sweep_config(tmp_path, task_specs, cache_dir, zoo, [{"name": "x", "changes": {"data.tasks": []}}])
    with pytest.raises(SystemExit, match=r"^icm_lora generator_sweep: generator_sweep setting 'x': cannot change"):
        generator_sweep.main(["--config", path])


def test_mean_pooling_averages_the_prompt_and_last_pooling_keeps_old_hashes(cache_dir):
    model, tokenizer = load("random:tiny-llama", str(cache_dir))
    demos = ["one two three four", "five six seven", "eight nine ten"]
    spec = ConditionSpec(num_prompts=1, demos_per_prompt=3, layer=1, pooling="mean", precision="fp32")
    pooled = task_vectors(model, tokenizer, demos, spec)  # (1, H)
    rng_order = random.Random(f"{spec.seed}:task").sample(demos, 3)  # the prompt task_vectors draws
    ids = tokenizer("\n\n".join(rng_order), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0]  # (L, H)
    assert torch.allclose(pooled[0], hidden.mean(0), atol=1e-5)
    assert "pooling" not in CONDITION.hashed() and ConditionSpec(pooling="mean").hashed()["pooling"] == "mean"
    with pytest.raises(ValueError, match="pooling must be one of"):
        ConditionSpec(pooling="max")


def test_sg_lora_sweep_section_and_settings_win_over_the_kinds_changes(tmp_path, task_specs, cache_dir, zoo):
    path = write_config(tmp_path, task_specs, cache_dir, zoo, kinds=["semantic"],
                        kind_changes={"semantic": {"model.generator": "sg_lora", "model.kl_weight": 1.0}},
                        multitask_steps=[2])
    cfg = yaml.safe_load(open(path))
    cfg["sg_lora_sweep"] = {"kind": "semantic", "output": str(tmp_path / "results" / "sg"), "settings": [
        {"name": "reference"}, {"name": "lambda 0.01", "changes": {"model.kl_weight": 0.01}},
        {"name": "top 1", "changes": {"data.semantic.top_k": 1}},
        {"name": "half correction", "changes": {"model.correction_scale": 0.5}}]}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    results = generator_sweep.main(["--config", path, "--sweep", "sg_lora_sweep"])
    assert [r["setting"] for r in results] == ["reference", "lambda 0.01", "top 1", "half correction"]
    runs = tmp_path / "results" / "sg_runs"
    assert not (runs / "half_correction").exists()  # it decodes the reference's generators, trains none
    full, half = (generator_sweep.gaps(results[i], "SG-LoRA (description)")["animals"] for i in (0, 3))
    assert full != half
    hparams = {}
    for name in ("reference", "lambda_0.01"):
        done = files.read_json(runs / name / "openworld_runs" / "val" / "semantic" / "done.json")
        hparams[name] = torch.load(done["best"], weights_only=False)["hyper_parameters"]
    assert hparams["reference"]["generator"] == hparams["lambda_0.01"]["generator"] == "sg_lora"
    assert hparams["reference"]["kl_weight"] == 1.0 and hparams["lambda_0.01"]["kl_weight"] == 0.01
    table = (tmp_path / "results" / "sg.md").read_text()
    assert "SG-LoRA (description) closes" in table and "mu* (top-K weighted by description)" in table
    assert "| top 1 |" in table


def test_every_sweep_section_of_openworld_yaml_is_a_valid_sweep_with_distinct_outputs():
    from conftest import ROOT
    from icm_lora.semantic import SemanticSpec
    from icm_lora.system import ICMLoRA

    cfg = yaml.safe_load((ROOT / "experiments" / "openworld.yaml").read_text())
    folds = [Fold(**f) for f in cfg["openworld"]["folds"]]
    known = {"model": ICMLoRA, "data": ZooDataModule, "data.condition": ConditionSpec, "data.semantic": SemanticSpec}
    outputs = set()
    for section in openworld.SWEEPS:
        spec = cfg[section]
        settings = [GeneratorSetting(**s) for s in spec["settings"]]
        assert check(GeneratorSweep(spec["kind"], settings, spec["output"]), folds)  # the validation folds
        outputs.add(spec["output"])
        for s in settings:  # a misspelt key would only fail mid-sweep, hours in
            for key in s.changes:
                owner, name = key.rsplit(".", 1)
                if owner in known:
                    assert name in inspect.signature(known[owner]).parameters, f"{section}/{s.name}: {key}"
    assert len(outputs) == len(openworld.SWEEPS)  # no sweep overwrites another's table
