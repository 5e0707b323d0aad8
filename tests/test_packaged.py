"""The embedded default's real pieces (packaged SmolLM2 GGUF, packaged corpora) on a small budget."""

import json
from pathlib import Path

import yaml

from icm_lora import files
from icm_lora.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_domains_config_end_to_end_on_a_small_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((ROOT / "experiments" / "domains.yaml").read_text())
    tasks = [t for t in config["data"]["tasks"] if t["name"] in ("mathematics", "python")]
    main(["fit", "--config", str(ROOT / "experiments" / "domains.yaml"), "--data.zoo_dir", str(tmp_path / "zoo"),
          "--data.tasks", json.dumps(tasks), "--data.text.train_chars", "20000", "--data.text.val_chars", "1000",
          "--data.text.test_chars", "1000", "--data.training.steps", "8", "--data.training.num_checkpoints", "8",
          "--data.condition.num_prompts", "2", "--data.val_every", "4", "--trainer.max_epochs", "2",
          "--trainer.check_val_every_n_epoch", "1", "--eval.num_samples", "2"])
    meta = files.read_json(tmp_path / "zoo" / "metadata.json")
    assert meta["dim"] == 30_720 and meta["base_model_path"].endswith("smollm2-135m")
    for entry in meta["tasks"].values():  # eight steps of training already lower validation perplexity
        assert entry["val"]["final_ppl"] < entry["val"]["base_ppl"]
    table = (tmp_path / "lightning_logs" / "version_0" / "downstream_test.md").read_text()
    assert "| mathematics |" in table and "| python |" in table
