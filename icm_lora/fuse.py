"""``python -m icm_lora fuse``: one PEFT adapter for several tasks.

    python -m icm_lora fuse --config experiments/fusion.yaml --ckpt_path .../best.ckpt \\
        --tasks '[python, licences, kjv]' --fusion.rule mean

``--method icm_fusion`` (the default) fuses the tasks in the trained generator's latent space
(``fusion.py``); tasks are zoo task names or task files (``examples`` and/or ``description``, as for
``predict``). ``--method merge`` merges the tasks' own LoRAs without the generator (``merge.py``:
``merge.method`` task_arithmetic, ties, tsv_m, iso_cts, knots or peft_<type>); tasks are zoo task
names or PEFT adapter folders of the zoo's base model and LoRA structure. ``--method lorahub`` is
task arithmetic of the zoo tasks' own LoRAs with one weight per task fitted gradient-free on their
demonstrations (``lorahub.py``).

The folder ``<output_dir>/<name>/`` is a standard PEFT adapter; ``generation.json`` beside it (and the
safetensors header) records the tasks, the method, the rule and its settings, and the weights. Any
error (a task that is neither a zoo task nor a file, an adapter of another base model or rank, a
checkpoint of another generator) ends in one line and writes nothing.

Python API: ``fuse_adapters(config, ckpt_path, tasks, ...)`` returns the folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from icm_lora import base
from icm_lora.adapter import CONFIG, load_adapter, save_adapter
from icm_lora.base import Unreachable
from icm_lora.cli import ICMLoRACLI, Trainer
from icm_lora.data import PredictInputError, ZooDataModule
from icm_lora.evaluate import LiveAdapter
from icm_lora.flat import FlatLayout
from icm_lora.fusion import DemoLoss, FusionError, FusionSpec, LatentFusion, StackedLoss
from icm_lora.hardware import resolve_precision
from icm_lora.lorahub import LoraHubSpec, lorahub
from icm_lora.merge import (
    MergeError,
    MergeSpec,
    delta_weights,
    factorize,
    merge,
    merged_config,
    peft_merge,
    skeleton,
    stacked,
)
from icm_lora.semantic import FarDescription
from icm_lora.system import ICMLoRA
from icm_lora.tasks import load_task_file, slug
from icm_lora.zoo import LoRASpec, ZooMismatch, lora_layout


@dataclass
class FusionSet:
    """Tasks fused together.

    Args:
        name: the set's name (in file names).
        tasks: zoo task names; ``[all]`` is every zoo task.
        kind: what the set tests (``pair``, ``across`` families, ``within`` one family, ``eight``, ``all``,
            ``long_tail``).
        tail: the long-tail case: this task of the set has its LoRA trained on only ``FusionBench.tail_share``
            of its training text, in a copy of the zoo; every method fuses that LoRA, and ICM-Fusion's
            generator is fit on that zoo. Retention is still measured against the task's LoRA on all its text.
    """

    name: str
    tasks: list[str]
    kind: str = ""
    tail: str | None = None


@dataclass
class FusionBench:
    """The fusion benchmark.

    Args:
        sets: the sets of tasks.
        fusions: ICM-Fusion's rows: label -> grid of ``FusionSpec`` settings (the first is the default);
            a ``scale`` of ``T^p`` means (set size) ** p.
        merges: the baselines' rows: ``MergeSpec.method`` -> grid of its settings (the first: its defaults).
        lorahub: LoraHub's row: grid of ``LoraHubSpec`` settings (the first: its defaults; empty: no row).
        union_steps: training steps per task of the set's union LoRA (0: no union LoRA).
        union_max_steps: cap on the union LoRA's steps.
        tail_share: share of its training text a set's ``tail`` task is trained on (the long-tail case).
        output: path stem of the table and CSV; per-set results go to ``<output>_runs/``.
    """

    sets: list[FusionSet] = field(default_factory=list)
    fusions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    merges: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    lorahub: list[dict[str, Any]] = field(default_factory=list)
    union_steps: int = 64
    union_max_steps: int = 512
    tail_share: float = 0.01
    output: str = "results/fusion"


class FuseCLI(ICMLoRACLI):
    """The project's CLI with the ``fuse`` arguments; it parses and builds, ``run_fuse`` fuses."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="the generator's checkpoint (icm_fusion), e.g. .../checkpoints/best.ckpt")
        parser.add_argument("--tasks", type=list[str], default=[],
                            help="zoo task names, task files, or (merge) PEFT adapter folders")
        parser.add_argument("--method", type=Literal["icm_fusion", "merge", "lorahub"], default="icm_fusion",
                            help="icm_fusion: in the generator's latent space; merge: the tasks' own LoRAs, no "
                                 "generator; lorahub: their weighted sum, weights fitted on the demonstrations")
        parser.add_argument("--name", type=str | None, default=None, help="the folder's name (default: the tasks joined)")
        parser.add_argument("--output_dir", type=str, default="generated_adapters/fused")
        parser.add_class_arguments(FusionSpec, "fusion")
        parser.add_class_arguments(MergeSpec, "merge")
        parser.add_class_arguments(LoraHubSpec, "lorahub")
        parser.add_class_arguments(FusionBench, "fusion_bench")  # read by python -m icm_lora.fusion_bench only


def load_generator(system: ICMLoRA, ckpt_path: str | Path) -> ICMLoRA:
    """Load a Lightning checkpoint's weights into ``system`` (built from the same config)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FusionError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt["state_dict"]
    except Exception as err:  # torch raises several types for corrupt or truncated files
        raise FusionError(f"{path}: not a readable Lightning checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from err
    try:
        system.load_state_dict(state)
    except RuntimeError as err:
        raise FusionError(f"{path}: a generator of another shape than the config's model and data "
                          f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})") from err
    return system.eval()


def _kind(item: str, dm: ZooDataModule) -> str:
    if item in dm.task_names:
        return "zoo"
    path = Path(item)
    if path.is_dir() and (path / CONFIG).exists():
        return "adapter"
    if path.is_file():
        return "file"
    raise PredictInputError(f"task {item!r} is neither a zoo task ({', '.join(dm.task_names)}), a task file, "
                            "nor a PEFT adapter folder")


def _check_items(items: list[str]) -> None:
    if not items:
        raise FusionError("fuse needs --tasks: zoo task names, task files or adapter folders")
    repeated = sorted({i for i in items if items.count(i) > 1})
    if repeated:
        raise FusionError(f"tasks given more than once: {repeated} (use fusion.weights to weigh a task more)")


def merged_adapters(dm: ZooDataModule, items: list[str]) -> tuple[list[str], list[Tensor]]:
    """Names and (D,) flat LoRAs of zoo tasks and adapter folders, checked against the zoo's structure."""
    names, flats = [], []
    for item in items:
        kind = _kind(item, dm)
        if kind == "file":
            raise FusionError(f"{item}: --method merge merges adapters, and a task file has none "
                              "(give a zoo task name or a PEFT adapter folder, or use --method icm_fusion)")
        if kind == "zoo":
            flats.append(dm.zoo.final(item))
        else:
            try:
                flats.append(load_adapter(item, dm.layout, dm.zoo.meta["base_model_path"]))
            except (ValueError, FileNotFoundError) as err:
                raise FusionError(str(err)) from err
        names.append(Path(item).name if kind == "adapter" else item)
    return names, flats


def merge_flats(dm: ZooDataModule, flats: list[Tensor], spec: MergeSpec, model=None) -> dict[str, Tensor]:
    """(D,) zoo-layout LoRAs, weight 1 each -> the merged per-module ΔW; PEFT's types run on ``model``
    (a PeftModel of the zoo's structure; default: a skeleton with uninitialised base weights)."""
    weights = torch.ones(len(flats))
    if spec.method.startswith("peft_"):
        model = model or skeleton(base.load_config(dm.base_model, dm.cache_dir), dm.lora)
        return peft_merge(model, flats, dm.layout, dm.lora, weights, spec)
    return merge([delta_weights(f, dm.layout, dm.lora) for f in flats], weights, spec)


def run_merge(dm: ZooDataModule, items: list[str], spec: MergeSpec) -> tuple[list[str], dict[str, Tensor], dict]:
    """The data-free merge of the tasks' adapters: names, the merged per-module ΔW, and what was done."""
    names, flats = merged_adapters(dm, items)
    return names, merge_flats(dm, flats, spec), {"method": "merge", "merge": asdict(spec),
                                                  "weights": [1.0] * len(flats)}


def wide_live(dm: ZooDataModule, rank: int, loaded: tuple[Any, Any] | None = None) -> tuple[LiveAdapter, Any]:
    """A base model wrapped in PEFT with the zoo's target modules at rank ``rank`` and scaling 1 (room for
    the exact sum of up to rank / r of the zoo's LoRAs, ``merge.stacked``), and its tokenizer; ``loaded``:
    a bare (model, tokenizer) already loaded, wrapped instead of loading another."""
    wide = LoRASpec(r=rank, lora_alpha=rank, target_modules=list(dm.lora.target_modules),
                    layers_to_transform=dm.lora.layers_to_transform)
    model, tokenizer = loaded or base.load(dm.base_model, dm.cache_dir)
    return LiveAdapter(model.to(dm.device), wide.peft_config(),
                       lora_layout(base.load_config(dm.base_model, dm.cache_dir), wide)), tokenizer


def run_lorahub(dm: ZooDataModule, items: list[str], spec: LoraHubSpec, live: LiveAdapter | None = None,
                tokenizer=None) -> tuple[list[str], dict[str, Tensor], dict]:
    """LoraHub on zoo tasks: names, the per-module ΔW = Σ w_i ΔW_i with weights fitted on the tasks'
    demonstrations, and what was done. ``live`` (scaling 1, rank >= T·r) is built here when not given."""
    outside = [i for i in items if i not in dm.task_names]
    if outside:
        raise FusionError(f"{outside[0]}: --method lorahub fits weights for zoo tasks' own LoRAs on their "
                          "demonstrations; give zoo task names (adapter folders go with --method merge)")
    flats = [dm.zoo.final(n) for n in items]
    demos = [dm.tasks[dm.task_names.index(n)].demos for n in items]
    if live is None:
        live, tokenizer = wide_live(dm, len(items) * dm.lora.r)
    weights, search = lorahub(flats, dm.layout, dm.lora, live, tokenizer, demos, spec)
    deltas = merge([delta_weights(f, dm.layout, dm.lora) for f in flats], weights, MergeSpec())
    return list(items), deltas, {"method": "lorahub", "lorahub": asdict(spec), "weights": weights.tolist(),
                                 "search": search}


def run_icm_fusion(dm: ZooDataModule, system: ICMLoRA, items: list[str], spec: FusionSpec,
                   live: LiveAdapter | None = None, tokenizer=None, wide: LiveAdapter | None = None
                   ) -> tuple[list[str], Tensor | dict[str, Tensor], dict]:
    """Latent fusion: names, the fused adapter, and what was done. The adapter is a (D,) LoRA in the
    zoo's layout (``decode: once``) or the per-module ΔW of the decoded LoRAs' weighted sum (``decode:
    each``). ``optimize`` runs on ``live`` (a LiveAdapter of the zoo's structure, with its ``tokenizer``;
    ``decode: each``: on ``wide``, of scaling 1 and rank >= T·r) when given, else on a base model loaded
    here."""
    names, conditions, own, demos, model = [], [], [], [], None
    for item in items:
        kind = _kind(item, dm)
        if kind == "adapter":
            raise FusionError(f"{item}: --method icm_fusion needs each task's condition (a zoo task name or a task "
                              "file with examples or a description); adapter folders go with --method merge")
        if kind == "zoo":
            t = dm.task_names.index(item)
            names.append(item)
            conditions.append(dm.conditions[t])
            own.append(dm.zoo.final(item))
            demos.append(dm.tasks[t].demos)
            continue
        task = load_task_file(item)
        if model is None and (dm.condition.kind == "task_vector" or spec.rule == "optimize"):
            model, tokenizer = base.load(dm.base_model, dm.cache_dir)
        names.append(task["name"])
        conditions.append(dm.condition_for(task.get("examples"), task.get("description"), task["name"], model, tokenizer))
        own.append(None)
        demos.append(list(task.get("examples") or []))
    if spec.latent == "posterior" and any(o is None for o in own):
        raise FusionError("fusion.latent posterior encodes each task's own LoRA, so zoo tasks only")
    if spec.anchor != "decoded" and any(o is None for o in own):
        raise FusionError(f"fusion.anchor {spec.anchor} moves the tasks' own LoRAs, so zoo tasks only")
    fusion = LatentFusion(system.cvae, dm.normalizer)
    points = fusion.points(torch.stack(conditions), None if spec.latent == "prior" else torch.stack(own), spec.latent)
    anchor = merge_flats(dm, own, spec.merge_spec()) if spec.anchor == "merged" else None  # per-module ΔW
    anchor_state, anchor_rank = factorize(anchor) if anchor is not None else (None, 0)
    loss = check = None
    if spec.rule == "optimize" and spec.steps:
        empty = [n for n, d in zip(names, demos) if not d]
        if empty:
            raise FusionError(f"fusion.rule optimize fits the fused point on each task's demonstrations; "
                              f"{empty} have none (a task file needs 'examples')")
        parts = [(0, spec.demo_tokens)] + ([(spec.demo_tokens, spec.holdout_tokens)] if spec.holdout_tokens else [])
        if spec.decode == "each":
            if wide is None:
                rank = anchor_rank + len(names) * dm.lora.r * (2 if anchor is not None else 1)
                wide, tokenizer = wide_live(dm, rank, (model, tokenizer) if model is not None else None)
            one = torch.ones(1)
            wide_own = [stacked([o], dm.layout, dm.lora, one, wide.layout) if o is not None else None for o in own]
            losses = [StackedLoss(DemoLoss(wide.model, tokenizer, wide.layout, demos, tokens, spec.block_size,
                                           resolve_precision(spec.precision, wide.device), own=wide_own, start=skip),
                                  dm.layout, dm.lora, wide.layout, anchor_state) for skip, tokens in parts]
        else:
            if live is None:
                if model is None:
                    model, tokenizer = base.load(dm.base_model, dm.cache_dir)
                live = LiveAdapter(model.to(system.device), dm.lora.peft_config(), dm.layout)
            losses = [DemoLoss(live.model, tokenizer, dm.layout, demos, tokens, spec.block_size,
                               resolve_precision(spec.precision, live.device), own=own, start=skip)
                      for skip, tokens in parts]
        loss, check = losses[0], (losses[1] if len(losses) > 1 else None)
    torch.manual_seed(spec.seed)
    record = {"method": "icm_fusion", "fusion": asdict(spec)}
    if spec.decode == "each":
        flats, weights, info = fusion.fuse_each(points, spec, loss, torch.stack(own) if spec.anchor == "own" else None,
                                                check)
        deltas = merge([delta_weights(f.detach().float().cpu(), dm.layout, dm.lora) for f in flats],
                       weights.detach(), MergeSpec())
        if anchor is not None:
            deltas = {m: d + anchor[m] for m, d in deltas.items()}
        return names, deltas, record | info
    flat, info = fusion.fuse(points, spec, loss, check)
    return names, flat.detach().float().cpu(), record | info


def write_fused(dm: ZooDataModule, folder: Path, names: list[str], result: Tensor | dict[str, Tensor],
                record: dict) -> Path:
    """Write the fused adapter: the zoo's layout (a latent fusion), or a merged ΔW as a LoRA of the rank it needs."""
    record = {"tasks": names, "base_model": dm.base_model} | record
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}
    base_path = dm.zoo.meta["base_model_path"]
    if isinstance(result, Tensor):
        return save_adapter(folder, result, dm.layout, dm.lora.peft_config(), base_path, header, record)
    state, rank = factorize(result)
    layout = FlatLayout.from_state_dict(state)
    record["rank"] = rank
    return save_adapter(folder, layout.flatten(state), layout, merged_config(dm.lora, rank), base_path,
                        header | {"rank": str(rank)}, record)


def run_fuse(cli: FuseCLI) -> Path:
    """Fuse what the parsed ``cli`` asks for and write the folder."""
    cfg = cli.config
    items = list(cfg.tasks)
    _check_items(items)
    dm: ZooDataModule = cli.datamodule
    dm.setup("predict")  # reads the zoo and conditions; never builds
    if cfg.method == "merge":
        names, result, record = run_merge(dm, items, cli.config_init["merge"])
    elif cfg.method == "lorahub":
        names, result, record = run_lorahub(dm, items, cli.config_init["lorahub"])
    else:
        if not cfg.ckpt_path:
            raise FusionError("--method icm_fusion needs --ckpt_path (the generator's checkpoint)")
        if cli.model.hparams.generator != "icm_lora":
            raise FusionError("latent fusion needs ICM-LoRA's generator (model.generator: icm_lora)")
        system = load_generator(cli.model, cfg.ckpt_path)
        names, result, record = run_icm_fusion(dm, system, items, cli.config_init["fusion"])
        record["generator_checkpoint"] = str(cfg.ckpt_path)
    name = cfg.name or "+".join(slug(n) for n in names)
    folder = write_fused(dm, Path(cfg.output_dir) / name[:120], names, result, record)
    how = {"icm_fusion": lambda: f", rule {record['fusion']['rule']}", "merge": lambda: f", {record['merge']['method']}",
           "lorahub": lambda: f", {record['search']['evaluations']} evaluations"}[record["method"]]()
    print(f"fused {', '.join(names)} ({record['method']}{how}, "
          f"weights {', '.join(f'{w:.3f}' for w in record['weights'])}) -> {folder}")
    return folder


def fuse_adapters(config: str | Path, tasks: list[str], ckpt_path: str | Path | None = None,
                  method: str = "icm_fusion", output_dir: str | Path = "generated_adapters/fused",
                  name: str | None = None, overrides: list[str] | None = None) -> Path:
    """Python API of ``python -m icm_lora fuse``: the written folder (load it with
    ``icm_lora.generate.load_generated``). ``overrides`` are more arguments, e.g.
    ``["--fusion.rule", "optimize"]``; errors are raised, not printed."""
    args = ["--config", str(config), "--tasks", f"[{', '.join(tasks)}]", "--method", method,
            "--output_dir", str(output_dir), "--trainer.logger", "false", *(overrides or [])]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    if name is not None:
        args += ["--name", name]
    cli = FuseCLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False, args=args, save_config_callback=None)
    return run_fuse(cli)


def main(args: list[str] | None = None) -> Path:
    """``python -m icm_lora fuse ...``: errors end in one line."""
    try:
        cli = FuseCLI(ICMLoRA, ZooDataModule, trainer_class=Trainer, run=False, args=args, save_config_callback=None,
                      parser_kwargs={"prog": "python -m icm_lora fuse"})
        return run_fuse(cli)
    except (Unreachable, ZooMismatch, FarDescription, PredictInputError, FusionError, MergeError) as err:
        raise SystemExit(f"icm_lora fuse: {err}") from None
    except FileNotFoundError as err:  # a zoo or conditions file that is not there
        raise SystemExit(f"icm_lora fuse: {err}") from None
