"""make openworld on the tiny model: the protocol runs, resumes, keeps held-out tasks out, and refuses bad folds."""

import os
import shutil
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml

from conftest import BUDGET, CONDITION, LORA, LORA_TOP, TINY, TRAINING, build_zoo
from icm_lora import files, openworld
from icm_lora.cli import Trainer
from icm_lora.data import CONDITIONS, ZooDataModule
from icm_lora.openworld import Benchmark, Fold, OpenWorld, OpenWorldCLI, OpenWorldError, check, snapshot_schedule
from icm_lora.system import ICMLoRA
from icm_lora.zoo import Zoo

FAMILIES = {"words": ["numbers", "animals"], "code": ["code"]}
FOLDS = [{"name": "val", "held_out": ["animals"], "role": "validation"}, {"name": "test", "held_out": ["code"]},
         {"name": "last", "held_out": ["numbers"]}]


def write_config(tmp_path, task_specs, cache_dir, zoo, **openworld_args) -> str:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp_path)
    cfg["data"] |= {"zoo_dir": str(zoo), "cache_dir": str(cache_dir), "tasks": [asdict(s) for s in task_specs],
                    "text": asdict(BUDGET), "lora": asdict(LORA), "training": asdict(TRAINING),
                    "condition": asdict(CONDITION)}
    cfg["openworld"] = {"families": FAMILIES, "folds": FOLDS, "num_samples": 2, "top_k": [1, 2],
                        "temperatures": [0.1, 1.0], "multitask_steps": [2, 4], "output": str(tmp_path / "results" / "ow")}
    cfg["openworld"] |= openworld_args
    path = tmp_path / "openworld.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def zoo(tiny_zoo, tmp_path):
    root = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, root)
    return root


def test_bad_folds_are_refused_with_one_line():
    names = ["numbers", "animals", "code"]
    good = dict(families=FAMILIES, folds=[Fold("f", ["code"])])
    check(OpenWorld(**good), names)
    cases = {"in no family": dict(good, families={"words": ["numbers", "animals"]}),
             "two families": dict(good, families=FAMILIES | {"more": ["code"]}),
             "must name tasks": dict(good, folds=[Fold("f", ["poetry"])]),
             "fewer than 2 seen": dict(good, folds=[Fold("f", ["code", "animals"])]),
             "role must be": dict(good, folds=[Fold("f", ["code"], role="train")]),
             "nothing would be reported": dict(good, folds=[Fold("f", ["code"], role="validation")]),
             "unknown": dict(good, kinds=["pixels"]), "folds is empty": dict(good, folds=[]),
             "common divisor is 1": dict(good, multitask_steps=[1, 100]),
             "is not a test fold": dict(good, folds=[Fold("v", ["animals"], role="validation"), Fold("f", ["code"])],
                                        budget_fold="v")}
    for message, args in cases.items():
        with pytest.raises(OpenWorldError, match=message):
            check(OpenWorld(**args), names)


def test_every_multitask_budget_is_a_checkpoint_of_one_run():
    assert snapshot_schedule([64, 448, 1920]) == (64, 30)
    assert snapshot_schedule([448, 64]) == (64, 7)
    assert snapshot_schedule([64]) == snapshot_schedule([5, 5]) == (1, 1)  # the last step only, as a zoo entry


@pytest.mark.parametrize("lora", [LORA, LORA_TOP], ids=["whole model", "cached frozen layer"])
def test_a_checkpoint_after_n_steps_equals_an_n_step_run(tmp_path, task_specs, cache_dir, lora):
    """What lets the budget fold train the multi-task LoRA once: constant learning rate after warm-up,
    batches drawn in order from the task's own seed, so the run's first n steps are an n-step run."""
    specs = task_specs[:1]
    long = replace(TRAINING, steps=6, num_checkpoints=3, checkpoint_every=2)
    build_zoo(tmp_path / "long", specs, cache_dir, long, lora)
    build_zoo(tmp_path / "short", specs, cache_dir, replace(TRAINING, steps=4, num_checkpoints=1), lora)
    snapshots = Zoo(tmp_path / "long").checkpoints(specs[0].name)  # after 2, 4 and 6 steps
    short = Zoo(tmp_path / "short").final(specs[0].name)
    torch.testing.assert_close(snapshots[1], short, atol=1e-6, rtol=1e-5)
    assert (snapshots[2] - short).norm() > 10 * (snapshots[1] - short).norm() + 1e-6  # it did go on training


def test_a_bad_config_exits_with_one_line(tmp_path, task_specs, cache_dir, zoo):
    path = write_config(tmp_path, task_specs, cache_dir, zoo, folds=[{"name": "f", "held_out": ["poetry"]}])
    with pytest.raises(SystemExit, match=r"^icm_lora openworld: fold 'f': held_out must name tasks"):
        openworld.main(["--config", path])


def test_a_schedule_that_leaves_the_last_epoch_unvalidated_is_refused_before_training(tmp_path, task_specs,
                                                                                      cache_dir, zoo):
    for epochs, message in ((3, "the checkpoint would come from epoch 2 and the last 1 would be wasted"),
                            (1, "no epoch would be validated")):
        path = write_config(tmp_path, task_specs, cache_dir, zoo)
        cfg = yaml.safe_load(Path(path).read_text())
        cfg["trainer"] |= {"max_epochs": epochs, "check_val_every_n_epoch": 2}
        Path(path).write_text(yaml.safe_dump(cfg))
        with pytest.raises(SystemExit, match=f"^icm_lora openworld: trainer.max_epochs {epochs} .*{message}"):
            openworld.main(["--config", path])
        assert not list((tmp_path / "results").rglob("*.ckpt"))


def test_runs_end_to_end_and_a_second_run_reuses_everything(tmp_path, task_specs, cache_dir, zoo, monkeypatch):
    path = write_config(tmp_path, task_specs, cache_dir, zoo)
    tables = []  # what each write left in the table: a partial one after each test fold but the last
    real_write = Benchmark.write

    def spy(self, *args):
        real_write(self, *args)
        tables.append(self.out.with_suffix(".md").read_text())
    monkeypatch.setattr(Benchmark, "write", spy)
    rows = openworld.main(["--config", path])
    assert [(r["fold"], r["task"]) for r in rows] == [("val", "animals"), ("test", "code"), ("last", "numbers")]
    assert len(tables) == 2 and "**Partial**" in tables[0] and "still to run: last." in tables[0]
    assert "| test | code |" in tables[0] and "| last |" not in tables[0]
    assert "Partial" not in tables[1] and "| last | numbers |" in tables[1]
    monkeypatch.undo()
    trained = {"ICM-LoRA (task_vector)", "ICM-LoRA (description)", "multi-task LoRA (128 tokens)"}
    assert not trained & set(rows[0]["methods"])  # a validation fold trains nothing: top-K's choice reads none
    assert {"base", "oracle", "soup", "top-K mean"} <= set(rows[0]["methods"])
    for row in rows[1:]:
        methods = row["methods"]
        assert methods["base"]["gap"] == 0 and methods["oracle"]["gap"] == pytest.approx(1.0)
        assert {"soup", "nearest (task vector)", "nearest (description)", "top-K mean", "ICM-LoRA (task_vector)",
                "ICM-LoRA (description)", "control: another task's demonstrations",
                "control: random-character description"} <= set(methods)
        assert methods["ICM-LoRA (task_vector)"]["ppl_std"] > 0  # several samples, not one draw
    assert rows[1]["nearest_tv"] in ("numbers", "animals") and rows[1]["other_task"] != "code"
    budgets = [m for m in rows[1]["methods"] if m.startswith("multi-task")]
    assert budgets == ["multi-task LoRA (128 tokens)", "multi-task LoRA (256 tokens)"]  # the budget fold: both
    assert [m for m in rows[2]["methods"] if m.startswith("multi-task")] == ["multi-task LoRA (128 tokens)"]
    multitask = Zoo(zoo / "multitask")  # one run per test fold; the budget fold's keeps a checkpoint per budget
    assert sorted(multitask.task_names) == ["multitask-last-2steps", "multitask-test-4steps"]
    assert multitask.num_checkpoints("multitask-test-4steps") == 2 == 2 * multitask.num_checkpoints("multitask-last-2steps")
    out = tmp_path / "results"
    table = (out / "ow.md").read_text()
    assert "| code | code | 0 |" in table and "chosen on validation folds (1 held-out tasks)" in table
    zoo_part = table.split("## The zoo on test: each task's own LoRA against the base model and the soup of all 3")[1]
    assert "better than the soup on" in zoo_part and all(f"| {t} |" in zoo_part for t in ("numbers", "animals", "code"))
    mean_table, per_task = table.split("## Per held-out task")
    assert "| multi-task LoRA (128 tokens) |" in mean_table and "256 tokens" not in mean_table  # not in every fold
    budgets = per_task.split("## The multi-task LoRA at every budget (fold test, test text)")[1]
    assert "multi-task LoRA (128 tokens) | multi-task LoRA (256 tokens)" in budgets and "| code |" in budgets
    assert (out / "ow.png").read_bytes()[:4] == b"\x89PNG" and (out / "ow.csv").read_text().count("\n") > 20
    assert list((out / "ow_runs" / "test" / "task_vector").glob("events.out.tfevents*"))
    assert (out / "ow_runs" / "test" / "task_vector" / "projector_config.pbtxt").exists()

    spent = files.read_json(out / "ow_runs" / "phases.json")
    assert set(spent) == {"zoo + conditions (all tasks)", "zoo on test (all tasks)", "val: scoring"} | {
        f"{f}: {p}" for f in ("test", "last") for p in ("generators", "multi-task LoRA", "scoring")}
    assert "| seconds, all runs | seconds, this run |" in table

    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a finished fold was trained again"))
    again = openworld.main(["--config", path])
    assert again == rows
    summed = files.read_json(out / "ow_runs" / "phases.json")  # the resumed run adds its time, loses none
    assert summed.keys() == spent.keys() and all(summed[k] >= spent[k] for k in spent)


def fold_generator(tmp_path, task_specs, cache_dir, zoo, held_out: str, *args: str) -> tuple[dict, ZooDataModule]:
    cli = OpenWorldCLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False,
                       args=["--config", write_config(tmp_path, task_specs, cache_dir, zoo), *args])
    bench = Benchmark(cli)
    bench.whole.setup("fit")  # builds the conditions of every task
    seen = [n for n in bench.names if n != held_out]
    model, dm = bench.generator(Fold("leak", [held_out]), seen, "task_vector")
    return model.state_dict(), dm


def test_nothing_of_a_held_out_task_reaches_its_folds_generator(tmp_path, task_specs, cache_dir, tiny_zoo):
    runs = []
    for variant in ("real", "tampered"):
        root = tmp_path / variant
        shutil.copytree(tiny_zoo, root / "zoo")
        held_out = task_specs[2]  # "code"
        specs = list(task_specs)
        if variant == "tampered":  # other text, another LoRA, other conditions for the held-out task
            specs[2] = type(held_out)(**{**asdict(held_out), "description": "anything else"})
            ZooDataModule(str(root / "zoo"), "random:tiny-llama", task_specs, BUDGET, LORA, TRAINING, CONDITION,
                          cache_dir=str(cache_dir)).setup("fit")
            shard = root / "zoo" / "tasks" / "code.safetensors"
            tensors = files.load_tensors(shard)
            files.save_tensors(shard, {k: torch.randn_like(v) * 5 for k, v in tensors.items()})
            stored = files.load_tensors(root / "zoo" / CONDITIONS)
            stored = {k: torch.randn_like(v) if k.endswith("/code") else v for k, v in stored.items()}
            files.save_tensors(root / "zoo" / CONDITIONS, stored)
        runs.append(fold_generator(root, specs, cache_dir, root / "zoo", held_out.name))
    (real, real_dm), (tampered, tampered_dm) = runs
    assert real_dm.task_names == tampered_dm.task_names == ["numbers", "animals"]
    assert torch.equal(real_dm.normalizer.mean, tampered_dm.normalizer.mean)
    assert torch.equal(real_dm.conditions, tampered_dm.conditions)
    assert real.keys() == tampered.keys() and all(torch.equal(real[k], tampered[k]) for k in real)


def test_without_validation_a_folds_generator_is_its_last_epoch(tmp_path, task_specs, cache_dir, tiny_zoo):
    """validate_generators false skips the seen-task scoring; the generator is the state after max_epochs,
    the one a validated fit keeps when it validates the last epoch only."""
    runs = {}
    for validate in (True, False):
        root = tmp_path / str(validate)
        shutil.copytree(tiny_zoo, root / "zoo")
        runs[validate] = fold_generator(root, task_specs, cache_dir, root / "zoo", "code", "--trainer.max_epochs", "2",
                                        "--trainer.check_val_every_n_epoch", "2",
                                        f"--openworld.validate_generators={str(validate).lower()}")[0]
        folder = root / "results" / "ow_runs" / "leak" / "task_vector"
        assert (folder / "downstream_val.csv").exists() == validate
        best = files.read_json(folder / "done.json")["best"]
        assert Path(best).exists() and best.endswith("final.ckpt") == (not validate)  # the last state, renamed
    validated, last = runs[True], runs[False]
    assert validated.keys() == last.keys() and all(torch.equal(validated[k], last[k]) for k in validated)
    keys = [files.read_json(tmp_path / str(v) / "results" / "ow_runs" / "leak" / "task_vector" / "generator.json")
            for v in (True, False)]
    assert keys[0] != keys[1]  # a generator chosen on validation is not reused for one that is not, nor back


def test_a_task_without_examples_or_description_is_an_error(zoo, task_specs, cache_dir):
    dm = ZooDataModule(str(zoo), "random:tiny-llama", task_specs, BUDGET, LORA, TRAINING,
                       type(CONDITION)(**{**asdict(CONDITION), "kind": "description"}), cache_dir=str(cache_dir))
    dm.setup("fit")
    with pytest.raises(ValueError, match="needs a 'description'"):
        dm.condition_for(None, "", "empty")
    demos = ZooDataModule(str(zoo), "random:tiny-llama", task_specs, BUDGET, LORA, TRAINING, CONDITION,
                          cache_dir=str(cache_dir))
    demos.setup("fit")
    with pytest.raises(ValueError, match="needs 'examples'"):
        demos.condition_for([], None, "no examples")


def test_a_killed_run_keeps_its_phase_times(tmp_path, task_specs, cache_dir, zoo, monkeypatch):
    def killed(self, fold):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives before this ends
        pytest.fail("SIGTERM did not stop the run")

    monkeypatch.setattr(Benchmark, "run_fold", killed)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        openworld.main(["--config", write_config(tmp_path, task_specs, cache_dir, zoo)])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back
    spent = files.read_json(tmp_path / "results" / "ow_runs" / "phases.json")
    assert {"zoo + conditions (all tasks)", "zoo on test (all tasks)"} <= set(spent)


def test_sg_lora_joins_the_benchmark(tmp_path, task_specs, cache_dir, zoo):
    changes = {"semantic": {"model.generator": "sg_lora", "model.kl_weight": 1.0, "data.semantic.top_k": 2}}
    path = write_config(tmp_path, task_specs, cache_dir, zoo, kinds=["semantic"], kind_changes=changes,
                        multitask_steps=[2])
    rows = openworld.main(["--config", path])
    assert rows[0]["role"] == "validation" and "SG-LoRA (description)" not in rows[0]["methods"]
    for row in rows[1:]:
        methods = row["methods"]
        assert {"SG-LoRA (description)", "SG-LoRA (description) z=0", "mu* (top-K weighted by description)",
                "AdapterSoup (top-K by description)", "control: SG-LoRA, other task's description",
                "control: SG-LoRA, random-character description"} <= set(methods)
        assert "ICM-LoRA (task_vector)" not in methods
        assert methods["SG-LoRA (description)"]["ppl_std"] > 0  # samples z ~ p(z | c), not one draw
        assert set(row["refused"]) == {"own", "other task's", "random-character"}
    done = files.read_json(tmp_path / "results" / "ow_runs" / "test" / "semantic" / "done.json")
    assert torch.load(done["best"], weights_only=False)["hyper_parameters"]["generator"] == "sg_lora"
    table = (tmp_path / "results" / "ow.md").read_text()
    assert "| SG-LoRA (description) |" in table and "would refuse as far from every seen expert" in table
    with pytest.raises(SystemExit, match="kind_changes"):
        openworld.main(["--config", write_config(tmp_path, task_specs, cache_dir, zoo, kind_changes=changes)])
