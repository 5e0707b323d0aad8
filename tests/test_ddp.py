"""Lightning DDP on 2 CPU processes (gloo) through the real CLI, against the 1-process run of the same config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import TINY
from icm_lora.zoo import Zoo

TASKS = ("mathematics", "legal", "python")


def test_two_ranks_split_the_work_and_agree_with_one(tiny_run, tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "icm_lora", "fit", "--config", str(TINY), "--data.zoo_dir", str(tmp_path / "zoo"),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.callbacks+=ddp_probe.BatchRecorder"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training 3 of 3 tasks on 2 ranks" in proc.stdout

    # Each rank trained its own meta-batches, as many as the other, and every epoch saw every task.
    rank0, rank1 = (json.loads((tmp_path / f"batches_rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == len(rank1) > 0 and rank0 != rank1
    for epoch in {e for e, _ in rank0}:
        assert {t for e, tasks in rank0 + rank1 if e == epoch for t in tasks} == {0, 1, 2}

    # The zoo the two ranks built (each trained some of the tasks) is the zoo one process built.
    one, two = Zoo(tiny_run / "zoo"), Zoo(tmp_path / "zoo")
    assert sorted(two.task_names) == sorted(TASKS)
    for task in TASKS:
        assert torch.allclose(one.checkpoints(task), two.checkpoints(task), rtol=1e-5, atol=1e-6), task

    # Each task was evaluated once: one test table with one row per task, printed once.
    tables = list(tmp_path.glob("lightning_logs/*/downstream_test.md"))
    assert len(tables) == 1 and proc.stdout.count("Per-task test table") == 1
    for task in (*TASKS, "mean"):
        assert tables[0].read_text().count(f"| {task} |") == 1
    assert "2 ranks" in (tables[0].parent / "phases.md").read_text()


def test_close_process_group_destroys_an_open_gloo_group_and_is_a_no_op_without_one(tmp_path):
    """Lightning leaves a gloo group to interpreter shutdown, which can abort a finished run (exit -6)."""
    import torch.distributed as dist

    from icm_lora.ranks import Ranks, close_process_group

    close_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    assert Ranks.current() == Ranks(0, 1)
    close_process_group()
    assert not dist.is_initialized() and Ranks.current() == Ranks()
