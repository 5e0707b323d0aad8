"""Detection: the synthetic COCO dataset, COCOeval identities, the detector, its training and PEFT LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model

from icm_lora.detection import shapes
from icm_lora.detection.data import CocoImages, category_ids, read_coco
from icm_lora.detection.detector import (
    LORA_TARGETS,
    Detector,
    DetectorConfig,
    decode,
    load_detector,
    save_detector,
    targets,
)
from icm_lora.detection.metrics import coco_map, ground_truth_detections
from icm_lora.detection.system import DetectorLoRA

ALL = [c.name for c in shapes.CATEGORIES]
TINY = DetectorConfig(image_size=32, num_classes=16, dim=16, depth=1, heads=2, stem_channels=8, stride=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    spec = shapes.ShapesSpec(categories=ALL, image_size=64, images={"train": 12, "val": 6, "test": 6}, seed=3)
    return shapes.build(tmp_path_factory.mktemp("shapes") / "all", spec)


def test_shapes_are_deterministic_coco_and_cover_every_category(dataset, tmp_path):
    spec = shapes.ShapesSpec(categories=ALL, image_size=64, images={"train": 12, "val": 6, "test": 6}, seed=3)
    again = shapes.build(tmp_path / "again", spec)
    for split in shapes.SPLITS:
        a = json.loads((dataset / "annotations" / f"instances_{split}.json").read_text())
        b = json.loads((again / "annotations" / f"instances_{split}.json").read_text())
        assert a == b
        assert (dataset / a["images"][0]["file_name"]).read_bytes() == (again / b["images"][0]["file_name"]).read_bytes()
    coco = read_coco(dataset, "train")
    assert len(coco.getCatIds()) == 16 and len(coco.getImgIds()) == 12
    assert category_ids(coco, ["red_circle", "brown_octagon"]) == [1, 15]
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w >= 1 and h >= 1
    with pytest.raises(ValueError, match="not in the dataset"):
        category_ids(coco, ["unicorn"])


def test_shapes_styles_differ_and_tiny_objects_are_tiny():
    def objects(style):
        spec = shapes.ShapesSpec(categories=ALL, style=style, images={"train": 1}, seed=0)
        rng = np.random.default_rng(0)
        return [shapes.render_image(spec, rng) for _ in range(20)]

    tiny = [max(b[2], b[3]) for _, objs in objects("tiny") for _, b, _ in objs]
    plain = [max(b[2], b[3]) for _, objs in objects("plain") for _, b, _ in objs]
    assert max(tiny) <= 8 < np.mean(plain)
    noisy = np.stack([p for p, _ in objects("noisy")]).astype(float)
    smooth = np.stack([p for p, _ in objects("plain")]).astype(float)
    assert np.abs(np.diff(noisy, axis=2)).mean() > 3 * np.abs(np.diff(smooth, axis=2)).mean()
    with pytest.raises(ValueError, match="unknown or no categories"):
        shapes.ShapesSpec(categories=["unicorn"])
    with pytest.raises(ValueError, match="style"):
        shapes.ShapesSpec(categories=ALL, style="foggy")


def test_coco_map_is_one_on_ground_truth_and_shifted_boxes_lose_map75(dataset):
    coco = read_coco(dataset, "test")
    ids = category_ids(coco, None)
    exact = coco_map(coco, ground_truth_detections(coco, ids), ids)
    assert exact == {"map": 1.0, "map50": 1.0, "map75": 1.0}
    # 3 px moves a 10-px box to IoU 0.32 and a 24-px box to 0.62: small ones fail both, mid-sized ones 0.75 only.
    shifted = coco_map(coco, ground_truth_detections(coco, ids, shift=3.0), ids)
    assert shifted["map75"] < shifted["map50"] < 1.0 and shifted["map"] < shifted["map50"]
    assert coco_map(coco, [], ids)["map50"] == 0.0
    swapped = [dict(d, category_id=ids[(ids.index(d["category_id"]) + 1) % len(ids)])
               for d in ground_truth_detections(coco, ids)]
    assert coco_map(coco, swapped, ids)["map50"] < 0.1


def test_coco_images_scale_boxes_and_back(dataset):
    split = CocoImages(dataset, "val", [1, 2, 3], image_size=32)  # half the stored size
    image, boxes, labels, i = split[0]
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
    anns = split.coco.loadAnns(split.coco.getAnnIds(imgIds=split.image_ids[0], catIds=[1, 2, 3]))
    assert torch.allclose(boxes, torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4) / 2)
    assert set(labels.tolist()) <= {0, 1, 2}
    back = split.to_coco(0, {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels})
    assert [d["bbox"] for d in back] == pytest.approx([a["bbox"] for a in anns])


def test_draw_boxes_marks_each_detection(dataset):
    from icm_lora.detection.callbacks import draw_boxes

    split = CocoImages(dataset, "val", [1], image_size=64)
    plain = draw_boxes(split.original(0), [])
    boxed = draw_boxes(split.original(0), [{"bbox": [4, 4, 10, 10], "score": 0.9}])
    assert plain.shape == boxed.shape == (256, 256, 3)
    assert (boxed[16, 16:56] == [255, 255, 0]).all() and not (plain == boxed).all()


def test_decode_of_perfect_targets_gives_back_the_boxes(dataset):
    split = CocoImages(dataset, "test", category_ids(read_coco(dataset, "test"), None), image_size=64)
    config = DetectorConfig(image_size=64)
    batch = [split[i] for i in range(len(split))]
    heat, box, mask = targets([b[1] for b in batch], [b[2] for b in batch], config)
    logits = torch.where(heat.eq(1), 10.0, -10.0)  # a sure peak at each centre cell
    dets = []
    for i, pred in enumerate(decode(logits, box, config)):
        dets += split.to_coco(i, pred)
    scores = coco_map(split.coco, dets, split.category_ids)
    assert scores["map50"] > 0.97 and scores["map75"] > 0.9  # two centres may share a cell


def test_detector_round_trips_and_refuses_a_wrong_file(tmp_path):
    torch.manual_seed(0)
    model = Detector(TINY).eval()
    images = torch.rand(2, 3, 32, 32)
    logits, boxes = model(images)
    assert logits.shape == (2, 16, 8, 8) and boxes.shape == (2, 4, 8, 8)
    save_detector(tmp_path / "det", model)
    again = load_detector(tmp_path / "det")
    assert torch.equal(again(images)[0], logits)
    (tmp_path / "det" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_detector(tmp_path / "det")
    with pytest.raises(FileNotFoundError, match="pretrain it first"):
        load_detector(tmp_path / "nothing")


def test_peft_lora_on_the_detector_saves_and_loads_as_a_standard_folder(tmp_path):
    torch.manual_seed(0)
    save_detector(tmp_path / "base", Detector(TINY))
    model = get_peft_model(load_detector(tmp_path / "base"), DetectorLoRA(r=2).peft_config(str(tmp_path / "base")))
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    adapted = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if hasattr(_, "lora_A")}
    assert adapted == set(LORA_TARGETS)
    images = torch.rand(1, 3, 32, 32)
    expected = model(images)[0]
    model.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    loaded = PeftModel.from_pretrained(load_detector(tmp_path / "base"), tmp_path / "adapter")
    assert torch.allclose(loaded(images)[0], expected, atol=1e-6)
    assert not torch.allclose(load_detector(tmp_path / "base")(images)[0], expected, atol=1e-3)


def test_pretrain_cli_trains_once_then_reuses_the_cached_detector(tmp_path, capsys):
    from icm_lora.detection.pretrain import main

    args = ["--config", "experiments/shapes.yaml", "--base_dir", str(tmp_path / "base"),
            "--pretrain.data.root", str(tmp_path / "data"), "--pretrain.data.image_size", "32",
            "--pretrain.data.shapes.image_size", "32", "--pretrain.data.shapes.images",
            "{train: 16, val: 8, test: 8}", "--pretrain.data.batch_size", "8",
            "--pretrain.model.detector", json.dumps(vars(TINY)), "--pretrain.budget.max_steps", "4",
            "--pretrain.budget.val_every", "2", "--pretrain.budget.precision", "32-true",
            "--pretrain.budget.accelerator", "cpu"]
    out = main(args)
    record = json.loads((out / "pretrain.json").read_text())
    assert set(record["test"]) == {"test/map", "test/map50", "test/map75"} and record["seconds"] > 0
    model = load_detector(out)
    assert model.config == TINY
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == out and "cached" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        main(args)


TINY_YAML = str(Path(__file__).resolve().parent.parent / "experiments" / "tiny_detection.yaml")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``python -m icm_lora.detection fit`` on the tiny config: pretraining, zoo, task vectors, CVAE, table."""
    from icm_lora.detection.cli import main

    run = tmp_path_factory.mktemp("detection_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run)
        cli = main(["fit", "--config", TINY_YAML, "--eval.results_dir", "results"])
    return run, cli


def test_fit_through_the_cli_builds_everything_and_writes_the_table(fitted):
    run, cli = fitted
    meta = json.loads((run / "zoo/zoo/metadata.json").read_text())
    assert meta["domain"] == "detection" and set(meta["tasks"]) == {"checker_circle", "pink_lshape", "noisy"}
    assert all(e["num_checkpoints"] == 4 for e in meta["tasks"].values())
    assert set(meta["conditions"]["tasks"]) == set(meta["tasks"])
    log = run / cli.trainer.log_dir
    table = (log / "detection_test.md").read_text()
    assert table.count("\n") == 2 + 3 + 1 and "other task's condition" in table
    assert "base detector" in (log / "phases.md").read_text()
    assert (log / "checkpoints" / "best.ckpt").exists()
    assert (run / "results/detection.md").read_text().startswith("Detection, per task on test images")
    assert (run / "results/detection.csv").read_text().startswith("task,base_map50,lora_map50")


def test_predict_writes_peft_folders_that_load_on_the_base_detector(fitted, monkeypatch):
    from icm_lora.detection.cli import main

    run, cli = fitted
    monkeypatch.chdir(run)
    Path("new.yaml").write_text("name: new_lshapes\ndataset: zoo/data/mixed\ncategories: [pink_lshape]\n")
    best = str(Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt")
    main(["predict", "--config", TINY_YAML, "--ckpt_path", best, "--data.predict_tasks", "[checker_circle, new.yaml]"])
    images = torch.rand(1, 3, 32, 32)
    base_out = load_detector("zoo/base")(images)[0]
    for task in ("checker_circle", "new_lshapes"):
        folder = Path("generated_adapters") / task / "sample_00"
        model = PeftModel.from_pretrained(load_detector("zoo/base"), folder)
        assert not torch.allclose(model(images)[0], base_out)
    generation = json.loads((Path("generated_adapters/new_lshapes/sample_00/generation.json")).read_text())
    assert generation["demonstrations"]["task"]["categories"] == ["pink_lshape"]
    Path("bad.yaml").write_text("name: broken\ncategories: [pink_lshape]\n")
    with pytest.raises(SystemExit, match="needs name, dataset and categories"):
        main(["predict", "--config", TINY_YAML, "--ckpt_path", best, "--data.predict_tasks", "[bad.yaml]"])
    with pytest.raises(SystemExit, match="neither a zoo task"):
        main(["predict", "--config", TINY_YAML, "--ckpt_path", best, "--data.predict_tasks", "[unicorns]"])


def test_a_changed_task_makes_test_stop_and_fit_retrain_only_it(fitted, monkeypatch):
    from icm_lora.detection.cli import main

    run, cli = fitted
    monkeypatch.chdir(run)
    best = str(Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt")
    before = json.loads(Path("zoo/zoo/metadata.json").read_text())["tasks"]
    changed = ["--data.training.steps", "7"]
    with pytest.raises(SystemExit, match="only `fit` builds"):
        main(["test", "--config", TINY_YAML, "--ckpt_path", best, *changed])
    moved = ["--data.zoo_dir", "zoo/zoo2", "--trainer.max_epochs", "1"]
    main(["fit", "--config", TINY_YAML, *moved])  # a second zoo beside the first: the first is untouched
    assert json.loads(Path("zoo/zoo/metadata.json").read_text())["tasks"] == before
    assert json.loads(Path("zoo/zoo2/metadata.json").read_text())["tasks"]["noisy"]["hash"] == before["noisy"]["hash"]


def test_two_ranks_split_the_detection_zoo_and_its_evaluation_and_agree_with_one(fitted, tmp_path):
    """Lightning DDP on 2 CPU processes (gloo) through the real CLI, against the fixture's 1-process run."""
    import shutil
    import subprocess
    import sys

    from icm_lora.zoo import Zoo

    run, _ = fitted
    shutil.copytree(run / "zoo" / "base", tmp_path / "zoo" / "base")  # the same pretrained base detector
    proc = subprocess.run(
        [sys.executable, "-m", "icm_lora.detection", "fit", "--config", TINY_YAML, "--trainer.accelerator", "cpu",
         "--trainer.devices", "2", "--trainer.strategy", "ddp"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training 3 of 3 tasks on 2 ranks" in proc.stdout and "pretraining" not in proc.stdout
    one, two = Zoo(run / "zoo" / "zoo"), Zoo(tmp_path / "zoo" / "zoo")
    assert sorted(two.task_names) == sorted(one.task_names)
    for task in one.task_names:  # each task trained on one rank, seeded by its name: the same LoRA
        assert torch.allclose(one.checkpoints(task), two.checkpoints(task), rtol=1e-5, atol=1e-6), task
    tables = list(tmp_path.glob("lightning_logs/*/detection_test.md"))
    assert len(tables) == 1 and proc.stdout.count("Per-task detection test table") == 1
    for task in (*one.task_names, "mean"):
        assert tables[0].read_text().count(f"| {task} |") == 1


def test_the_pretraining_key_is_stable_so_cached_base_detectors_and_zoos_stay_valid():
    """The key was computed by the release that built the committed results; a new argument of
    DetectionData or DetectorSystem would change it and retrain every cached base and zoo."""
    from icm_lora.detection import pretrain

    root = Path(TINY_YAML).parent
    p = pretrain.parser()
    keys = {name: pretrain.settings_key(p.parse_object(pretrain.config_sections(str(root / name))))
            for name in ("tiny_detection.yaml", "shapes.yaml")}
    assert keys == {"tiny_detection.yaml": "cbb45b5c75d7c222", "shapes.yaml": "6ff43549e4308dab"}
