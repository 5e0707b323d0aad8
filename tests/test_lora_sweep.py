"""The LoRA-settings sweep: trains each setting's zoo of the swept tasks, scores validation text, resumes."""

import pytest
import yaml
from test_openworld import write_config

from icm_lora import lora_sweep, zoo_build
from icm_lora.lora_sweep import LoRASweep, Setting, SweepError, check, resolve, summary
from icm_lora.zoo import LoRASpec, ZooTraining

SETTINGS = [{"name": "small", "lora": {"r": 2}, "training": {"steps": 6}},
            {"name": "wider", "lora": {"r": 4, "lora_alpha": 8}, "training": {"steps": 8, "lr": 0.02}}]


def sweep_config(tmp_path, task_specs, cache_dir, **sweep) -> str:
    path = write_config(tmp_path, task_specs, cache_dir, tmp_path / "zoo")
    cfg = yaml.safe_load(open(path))
    cfg["lora_sweep"] = {"tasks": ["numbers", "code"], "settings": SETTINGS,
                         "output": str(tmp_path / "results" / "sweep")} | sweep
    open(path, "w").write(yaml.safe_dump(cfg))
    return path


def test_sweeps_settings_on_validation_and_reuses_them(tmp_path, task_specs, cache_dir, monkeypatch):
    path = sweep_config(tmp_path, task_specs, cache_dir)
    rows = lora_sweep.main(["--config", path])
    assert [r["setting"] for r in rows] == ["small", "wider"]
    assert rows[1]["dim"] == 2 * rows[0]["dim"]  # rank 4 against rank 2 on the same modules
    assert [r["steps"] for r in rows] == [6, 8] and rows[1]["lr"] == 0.02
    for row in rows:
        assert list(row["tasks"]) == ["numbers", "code"]  # only the swept tasks
        for scores in row["tasks"].values():
            assert scores["own"] != scores["base"] and scores["soup"] not in (scores["own"], scores["base"])
    assert sorted(p.name for p in (tmp_path / "zoo" / "lora_sweep").iterdir()) == ["small", "wider"]
    table = (tmp_path / "results" / "sweep.md").read_text()
    assert "| small | 2 |" in table and "| wider | 4 |" in table and "Hardware:" in table
    assert len((tmp_path / "results" / "sweep.csv").read_text().splitlines()) == 1 + 2 * 2

    def no_training(*args, **kwargs):
        raise AssertionError("a second sweep retrained a LoRA")

    monkeypatch.setattr(zoo_build._TaskTrainer, "run", no_training)
    again = lora_sweep.main(["--config", path])
    assert [r["tasks"] for r in again] == [r["tasks"] for r in rows]


def test_bad_sweeps_exit_with_one_line(tmp_path, task_specs, cache_dir):
    cases = {"lora has no field\\(s\\) \\['rank'\\]": {"settings": [{"name": "x", "lora": {"rank": 2}}]},
             "not in data.tasks: \\['poetry'\\]": {"tasks": ["poetry", "code"]},
             "settings is empty": {"settings": []},
             "exceeds steps": {"settings": [{"name": "x", "training": {"steps": 2}}]}}
    for message, sweep in cases.items():
        path = sweep_config(tmp_path, task_specs, cache_dir, **sweep)
        with pytest.raises(SystemExit, match=f"^icm_lora lora_sweep: .*{message}"):
            lora_sweep.main(["--config", path])


def test_resolve_check_and_summary_on_hand_made_values():
    lora, training = resolve(Setting("s", {"r": 16}, {"steps": 300}), LoRASpec(r=4), ZooTraining(steps=100))
    assert (lora.r, lora.lora_alpha, training.steps, training.lr) == (16, 16, 300, ZooTraining().lr)
    assert check(LoRASweep(settings=[Setting("a")]), ["x", "y"]) == ["x", "y"]  # no tasks: all of them
    with pytest.raises(SweepError, match="at least 2 tasks"):
        check(LoRASweep(tasks=["x"], settings=[Setting("a")]), ["x", "y"])
    with pytest.raises(SweepError, match="unique"):
        check(LoRASweep(settings=[Setting("a b"), Setting("a_b")]), ["x", "y"])
    row = {"tasks": {"x": {"base": 10.0, "own": 8.0, "soup": 9.0, "seconds": 3.0},
                     "y": {"base": 20.0, "own": 19.0, "soup": 18.0, "seconds": 5.0}}}
    s = summary(row)
    assert s["mean_gain"] == pytest.approx((0.2 + 0.05) / 2) and s["worst_gain"] == pytest.approx(0.05)
    assert s["beats_soup"] == 1 and s["seconds"] == 4.0 and s["soup_gain"] == pytest.approx((0.1 + 0.1) / 2)
