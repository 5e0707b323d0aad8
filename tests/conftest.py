"""Shared fixtures: a tiny random-init Llama and a tiny zoo built from small JSON-lines tasks."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import pytest

from icm_lora import base
from icm_lora.condition import ConditionSpec
from icm_lora.tasks import TaskSpec, TextBudget, split_task
from icm_lora.zoo import LoRASpec, ZooTraining
from icm_lora.zoo_build import build

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny.yaml"

WORDS = {
    "numbers": "one two three four five six seven eight nine ten plus minus times equals".split(),
    "animals": "cat dog horse cow sheep goat bird fish frog mouse lion tiger bear wolf".split(),
    "code": "def return if else for while import class self None True False print len".split(),
}


def write_task_file(folder: Path, name: str, docs: int = 40, seed: int = 0) -> Path:
    """A JSON-lines corpus of ``docs`` short documents drawn from one vocabulary."""
    rng = random.Random(f"{seed}:{name}")
    path = folder / f"{name}.jsonl"
    with path.open("w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS[name], k=rng.randint(20, 60)))}) + "\n")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_base(cache_dir):
    """(model, tokenizer, path) of the tiny Llama; tests that modify the model must load their own."""
    model, tokenizer = base.load(base.TINY_LLAMA, cache_dir)
    return model, tokenizer, base.resolve(base.TINY_LLAMA, cache_dir)


@pytest.fixture(scope="session")
def task_specs(tmp_path_factory) -> list[TaskSpec]:
    folder = tmp_path_factory.mktemp("corpora")
    return [TaskSpec(name=n, description=f"texts about {n}", builder="json", data_files=str(write_task_file(folder, n)))
            for n in WORDS]


BUDGET = TextBudget(train_chars=3000, val_chars=400, test_chars=400, num_demos=4, demo_chars=100)
LORA = LoRASpec(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
LORA_TOP = LoRASpec(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])  # layer 0 frozen
TRAINING = ZooTraining(steps=6, batch_size=2, block_size=32, lr=1.0e-2, warmup_steps=1, num_checkpoints=5,
                       precision="fp32")
CONDITION = ConditionSpec(num_prompts=2, demos_per_prompt=2, max_prompt_tokens=128)


def sources(specs: list[TaskSpec], budget: TextBudget = BUDGET) -> list[dict]:
    return [{"task": asdict(s), "text": asdict(budget)} for s in specs]


def build_zoo(root: Path, specs: list[TaskSpec], cache_dir: Path, training: ZooTraining = TRAINING,
              lora: LoRASpec = LORA, **kwargs) -> None:
    model, tokenizer = base.load(base.TINY_LLAMA, cache_dir)
    tasks = [split_task(s, BUDGET) for s in specs]
    build(root, model, tokenizer, base.TINY_LLAMA, tasks, sources(specs), lora, training, eval_block_size=32, **kwargs)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, task_specs, cache_dir) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    build_zoo(root, task_specs, cache_dir)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The working folder of one ``fit`` of experiments/tiny.yaml through the CLI (zoo in ``zoo/``,
    the run in ``lightning_logs/version_0``)."""
    from icm_lora.cli import main

    work = tmp_path_factory.mktemp("tiny_run")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        main(["fit", "--config", str(TINY), "--data.zoo_dir", str(work / "zoo")])
    finally:
        os.chdir(cwd)
    return work
