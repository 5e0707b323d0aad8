"""The real user path for detection: transformers detectors (DETR, RT-DETR) as the base, COCO-format
subsets of a user's dataset, and the paper's setting stopping offline with what is missing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForObjectDetection, DetrConfig, ResNetConfig, RTDetrConfig, RTDetrResNetConfig

from icm_lora.detection import hub, shapes
from icm_lora.detection.bases import load_base
from icm_lora.detection.coco import CocoSplit, CocoSubset, build_subset
from icm_lora.detection.data import CocoImages, category_ids, read_coco
from icm_lora.detection.system import DetectorLoRA

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = str(ROOT / "experiments" / "tiny_detection.yaml")
DOG_YAML = str(ROOT / "experiments" / "coco_dog.yaml")


def tiny_detr(folder: Path, num_labels: int = 16, names: list[str] | None = None) -> Path:
    """A random-init DETR with a tiny ResNet backbone, saved as a transformers folder (no hub)."""
    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
                        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=8, num_labels=num_labels)
    if names:
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
    AutoModelForObjectDetection.from_config(config).save_pretrained(folder)
    return folder


def tiny_rtdetr(folder: Path) -> Path:
    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1], layer_type="basic",
                                  out_features=["stage1", "stage2", "stage3"], out_indices=[1, 2, 3])
    config = RTDetrConfig(backbone_config=backbone, use_pretrained_backbone=False, d_model=16, encoder_hidden_dim=16,
                          encoder_in_channels=[8, 16, 16], feat_strides=[8, 16, 32], encoder_layers=1,
                          decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                          decoder_ffn_dim=32, num_queries=8, num_labels=4, decoder_in_channels=[16, 16, 16],
                          num_feature_levels=3, num_denoising=4)
    AutoModelForObjectDetection.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    spec = shapes.ShapesSpec(categories=["red_circle", "pink_lshape", "blue_square"], image_size=32,
                             images={"train": 12, "val": 10, "test": 6}, seed=4)
    return shapes.build(tmp_path_factory.mktemp("shapes") / "data", spec)


def test_detect_turns_set_predictions_into_pixel_boxes_of_the_task_channels(tmp_path):
    base = load_base(str(tiny_detr(tmp_path / "detr", num_labels=3)), image_size=64)
    assert base.no_object and base.token_dim == 16
    logits = torch.full((1, 2, 4), -9.0)  # 2 queries, 3 labels + "no object"
    logits[0, 0, 1], logits[0, 1, 2] = 9.0, 3.0
    boxes = torch.tensor([[[0.5, 0.5, 0.25, 0.5], [0.125, 0.125, 0.5, 0.5]]])  # cx, cy, w, h in [0, 1]

    def net(pixel_values):
        return SimpleNamespace(logits=logits, pred_boxes=boxes)

    out = base.detect(net, torch.zeros(1, 3, 64, 64), channels=[1, 2], top_k=2)[0]
    assert out["labels"].tolist() == [1, 2]
    assert out["scores"][0] > 0.99 and out["scores"][1] < out["scores"][0]
    assert torch.allclose(out["boxes"][0], torch.tensor([24.0, 16.0, 16.0, 32.0]))
    assert torch.allclose(out["boxes"][1], torch.tensor([0.0, 0.0, 24.0, 24.0]))  # clipped at the image edge
    only = base.detect(net, torch.zeros(1, 3, 64, 64), channels=[2], top_k=5)[0]
    assert set(only["labels"].tolist()) == {2} and len(only["scores"]) == 2  # 2 queries x 1 channel


def test_channels_follow_the_models_label_names_or_the_dataset_order(tmp_path, shapes_root):
    coco = read_coco(shapes_root, "train")
    ids = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    task = [ids["blue_square"], ids["pink_lshape"], ids["red_circle"]]
    labels = ["cat", "blue_square", "dog", "pink_lshape", "red_circle"] + [f"thing{i}" for i in range(11)]
    named = load_base(str(tiny_detr(tmp_path / "named", 16, labels)), 32)
    assert named.channel_map(coco, task) == {ids["blue_square"]: 1, ids["pink_lshape"]: 3, ids["red_circle"]: 4}
    ranks = sorted(ids.values())
    plain = load_base(str(tiny_detr(tmp_path / "plain", 16)), 32)
    assert plain.channel_map(coco, task) == {cid: ranks.index(cid) for cid in task}
    with pytest.raises(ValueError, match="lack categories"):
        named.channel_map(coco, [ids["red_circle"], ids["green_triangle"]])
    with pytest.warns(UserWarning, match="not among the model's labels"):  # a novel category
        assert named.channel_map(coco, [ids["green_triangle"]]) == {ids["green_triangle"]: 2}


def test_rtdetr_base_trains_a_lora_and_gives_task_vectors(tmp_path, shapes_root):
    from icm_lora.detection.condition import DetectionCondition, task_vectors

    base = load_base(str(tiny_rtdetr(tmp_path / "rtdetr")), image_size=32)
    assert not base.no_object  # sigmoid head
    coco = read_coco(shapes_root, "train")
    split = CocoImages(shapes_root, "train", category_ids(coco, ["blue_square"]), 32, base.channel_map)
    vectors = task_vectors(base, split, DetectionCondition(num_prompts=2, images_per_prompt=3), "squares")
    assert vectors.shape == (2, 2 * base.token_dim) and torch.isfinite(vectors).all()
    net = get_peft_model(base.model, DetectorLoRA(r=2, target_modules=["q_proj", "v_proj"]).peft_config())
    images = torch.stack([split[i][0] for i in range(4)])
    boxes, labels = [split.boxes[i] for i in range(4)], [split.labels[i] for i in range(4)]
    net.train()
    out = base.loss(net, images, boxes, labels, split.channels)
    out["loss"].backward()
    grads = [p.grad for n, p in net.named_parameters() if "lora_B" in n]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    net.eval()
    with torch.no_grad():
        dets = base.detect(net, images, split.channels, top_k=5)
    assert len(dets) == 4 and dets[0]["boxes"].shape == (5, 4)
    assert (dets[0]["boxes"][:, 2:] >= 0).all() and (dets[0]["boxes"][:, :2] + dets[0]["boxes"][:, 2:] <= 32.001).all()


def test_a_transformers_detector_goes_through_fit_and_predict_and_its_adapters_load_in_plain_peft(tmp_path,
                                                                                                   monkeypatch):
    from icm_lora.detection.cli import main

    monkeypatch.chdir(tmp_path)
    tiny_detr(Path("detr"), num_labels=16)
    hub_args = ["--base_dir", "detr", "--pretrain", "null", "--data.image_size", "32",
                "--data.lora.target_modules", "[q_proj, v_proj, class_labels_classifier]"]
    with pytest.raises(SystemExit, match="needs data.image_size"):
        main(["fit", "--config", TINY_YAML, *hub_args[:4]])
    cli = main(["fit", "--config", TINY_YAML, *hub_args, "--trainer.max_epochs", "1"])
    meta = json.loads(Path("zoo/zoo/metadata.json").read_text())
    assert meta["base_model"] == "detr" and set(meta["tasks"]) == {"checker_circle", "pink_lshape", "noisy"}
    assert "class_labels_classifier" in json.dumps(meta["layout"]) and "q_proj" in json.dumps(meta["layout"])
    assert (Path(cli.trainer.log_dir) / "detection_test.md").read_text().count("\n") == 6
    best = str(Path(cli.trainer.log_dir) / "checkpoints" / "best.ckpt")
    main(["predict", "--config", TINY_YAML, *hub_args, "--ckpt_path", best, "--data.predict_tasks", "[pink_lshape]"])
    folder = Path("generated_adapters/pink_lshape/sample_00")
    recorded = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).resolve() == Path("detr").resolve()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        plain = AutoModelForObjectDetection.from_pretrained("detr").eval()
        before = plain(pixel_values=images).logits
        tuned = PeftModel.from_pretrained(AutoModelForObjectDetection.from_pretrained("detr"), folder).eval()
        assert not torch.allclose(tuned(pixel_values=images).logits, before)


def test_coco_subset_keeps_the_categories_images_and_splits_a_file_into_folds(tmp_path, shapes_root):
    spec = CocoSubset(root=str(shapes_root), train=CocoSplit("annotations/instances_train.json", "."),
                      val=CocoSplit("annotations/instances_val.json", ".", [0, 2]),
                      test=CocoSplit("annotations/instances_val.json", ".", [1, 2]),
                      categories=["pink_lshape"], max_images={"train": 3})
    out = build_subset(tmp_path / "subset", spec)
    source = read_coco(shapes_root, "val")
    lshape = category_ids(source, ["pink_lshape"])
    holding = {a["image_id"] for a in source.loadAnns(source.getAnnIds(catIds=lshape))}
    every = sorted(source.getImgIds())  # folds split the file's images, the same for every task; then the filter
    val, test = read_coco(out, "val"), read_coco(out, "test")
    assert sorted(val.getImgIds()) == [i for i in every[0::2] if i in holding]
    assert sorted(test.getImgIds()) == [i for i in every[1::2] if i in holding]
    train = read_coco(out, "train")
    assert len(train.getImgIds()) == 3 and all(train.getAnnIds(imgIds=i, catIds=lshape) for i in train.getImgIds())
    assert len(train.getCatIds()) == len(source.getCatIds())  # category ids, and so channels, stay the dataset's
    images = CocoImages(out, "val", lshape, 32)  # absolute image paths load from anywhere
    assert len(images) == len(val.getImgIds()) and images.original(0).size == (32, 32)
    stamp = (out / "subset.json").stat().st_mtime_ns
    build_subset(tmp_path / "subset", spec)
    assert (out / "subset.json").stat().st_mtime_ns == stamp  # the same spec is not rewritten
    with pytest.raises(ValueError, match="no categories"):
        build_subset(tmp_path / "other", CocoSubset(root=str(shapes_root), train=spec.train, val=spec.val,
                                                    test=spec.test, categories=["unicorn"]))
    with pytest.raises(FileNotFoundError, match="missing"):
        build_subset(tmp_path / "gone", CocoSubset(root=str(tmp_path / "nothing")))


def test_the_papers_setting_stops_offline_naming_what_is_missing(tmp_path, monkeypatch):
    from icm_lora.detection.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", DOG_YAML])
    message = str(info.value)
    assert "data/coco" in message and "PekingU/rtdetr_r50vd" in message and "\n" not in message
    assert not Path("zoo").exists()
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)  # data present, model neither cached nor online
    with pytest.raises(SystemExit, match="hf download someone/uncached-detector"):
        main(["fit", "--config", TINY_YAML, "--base_dir", "someone/uncached-detector", "--pretrain", "null",
              "--data.image_size", "32"])
