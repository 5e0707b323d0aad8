"""The real entry point: ``python -m icm_lora fit|predict --config experiments/*.yaml``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from conftest import ROOT, TINY
from icm_lora import files, openworld
from icm_lora.cli import main
from icm_lora.detection.cli import main as detection_main

CONFIGS = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_experiment_yaml_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sections = yaml.safe_load(config.read_text())
        if "openworld" in sections:  # the leave-tasks-out benchmark's own entry point
            openworld.main(["--config", str(config), "--print_config"])
        elif "fusion_bench" in sections:  # fuse and the fusion benchmark
            main(["fuse", "--config", str(config), "--print_config"])
        elif "base_dir" in sections:  # the detection domain's CLI
            detection_main(["fit", "--config", str(config), "--print_config"])
        else:
            main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "data:" in printed and "model:" in printed and "eval:" in printed


def test_tiny_fit_then_predict_through_the_cli(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    zoo_dir = tiny_run / "zoo"
    common = ["--config", str(TINY), "--data.zoo_dir", str(zoo_dir)]
    run = tiny_run / "lightning_logs" / "version_0"
    assert (run / "checkpoints" / "best.ckpt").resolve().exists() and (run / "phases.md").exists()
    assert "Precision: LoRA zoo fp32" in (run / "phases.md").read_text()
    assert (run / "config.yaml").exists() and list(run.glob("events.out.tfevents.*"))
    assert "| mean |" in (run / "downstream_val.md").read_text()
    table = (run / "downstream_test.md").read_text()
    for task in ("mathematics", "legal", "python", "mean"):
        assert f"| {task} |" in table
    assert (run / "downstream_test.csv").read_text().startswith("task,base_ppl,lora_ppl")
    meta = files.read_json(zoo_dir / "metadata.json")
    assert set(meta["tasks"]) == {"mathematics", "legal", "python"} and "conditions" in meta

    task_file = tiny_run / "new_task.yaml"
    task_file.write_text("name: new task\nexamples: ['def f(x):\n    return x', 'import os\nprint(os.sep)']\n")
    ckpt = run / "checkpoints" / "best.ckpt"
    out = tiny_run / "adapters"
    main(["predict", *common, "--ckpt_path", str(ckpt), "--num_samples", "2", "--writer.output_dir", str(out),
          "--data.predict_tasks", f"[legal, {task_file}]"])
    folders = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/*/adapter_config.json"))
    assert folders == ["legal/sample_00", "legal/sample_01", "new_task/sample_00", "new_task/sample_01"]

    tested = main(["test", *common, "--ckpt_path", str(ckpt)])  # the test subcommand writes its own table
    assert "| mean |" in (Path(tested.trainer.log_dir) / "downstream_test.md").read_text()

    config = files.read_json(out / "new_task" / "sample_00" / "adapter_config.json")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        bare = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, out / "new_task" / "sample_00")(input_ids=ids).logits
    assert not torch.allclose(bare, tuned)

    shard = zoo_dir / meta["tasks"]["legal"]["file"]
    stamp = shard.stat().st_mtime_ns
    resume = run / "checkpoints" / "resume.ckpt"
    saved = torch.load(resume, weights_only=False)
    assert saved["epoch"] == 1  # the latest epoch (of max_epochs 2)
    cli = main(["fit", *common, "--trainer.max_epochs", "3", "--ckpt_path", str(resume)])  # resumes; reuses the zoo
    assert shard.stat().st_mtime_ns == stamp
    steps = []
    for path in Path(cli.trainer.log_dir).glob("events.out.tfevents.*"):  # fit and test write one each
        events = EventAccumulator(str(path))
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            steps += [e.step for e in events.Scalars("train/loss")]
    assert steps and min(steps) >= saved["global_step"]  # training went on from the saved step, not from 0


def test_an_epoch_without_validation_is_still_resumable(tiny_run, monkeypatch):
    # Validation may run only every few epochs (make openworld validates once, at the end): the resume
    # checkpoint must not wait for it, or an interrupted fit starts again from epoch 0.
    monkeypatch.chdir(tiny_run)
    root = tiny_run / "unvalidated"
    main(["fit", "--config", str(TINY), "--data.zoo_dir", str(tiny_run / "zoo"), "--trainer.max_epochs", "1",
          "--trainer.check_val_every_n_epoch", "2", "--trainer.default_root_dir", str(root)])
    (resume,) = root.glob("lightning_logs/*/checkpoints/resume.ckpt")
    assert torch.load(resume, weights_only=False)["epoch"] == 0


def zoo_stamps(zoo_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(zoo_dir.rglob("*")) if p.is_file()}


def test_predict_only_reads_the_zoo(tiny_run, monkeypatch, capsys):
    monkeypatch.chdir(tiny_run)
    zoo_dir = tiny_run / "zoo"
    before = zoo_stamps(zoo_dir)
    ckpt = tiny_run / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    common = ["--config", str(TINY), "--data.zoo_dir", str(zoo_dir), "--ckpt_path", str(ckpt),
              "--data.predict_tasks", "[python]"]
    # How the zoo was computed is not what it learnt: another precision, device or cache setting reads it as it is.
    out = tiny_run / "adapters_other_machine"
    main(["predict", *common, "--writer.output_dir", str(out), "--data.training.precision", "bf16",
          "--data.training.cache_frozen", "false", "--data.condition.precision", "auto", "--data.build_device", "cpu"])
    assert (out / "python" / "sample_00" / "adapter_model.safetensors").exists()
    assert zoo_stamps(zoo_dir) == before
    # What it learnt from differs: a one-line error that names the difference, and nothing is trained.
    for change, named in ((["--data.text.train_chars", "5000"], "text.train_chars 6000 -> 5000"),
                          (["--data.training.steps", "16"], "training.steps 12 -> 16"),
                          (["--data.lora.r", "4"], "this zoo was built with lora=")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main(["predict", *common, *change])
        message = str(stop.value.code)
        assert message.startswith("icm_lora: ") and named in message and "\n" not in message
        assert "tasks:" not in capsys.readouterr().out  # no "LoRA zoo ...: training N of M tasks:"
    assert zoo_stamps(zoo_dir) == before


def test_hub_config_offline_stops_with_a_clear_message(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "icm_lora", "fit", "--config", str(ROOT / "experiments" / "arxiv.yaml"),
                           "--data.zoo_dir", str(tmp_path / "zoo")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "Qwen/Qwen2.5-0.5B" in proc.stderr and "experiments/domains.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
