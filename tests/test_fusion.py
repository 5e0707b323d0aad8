"""ICM-Fusion: the latent rules on hand-made cases, ``fuse`` through the real CLI and the Python API,
its refusals, and the fusion benchmark on the tiny zoo."""

import math
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import ROOT, TINY
from icm_lora import files, fusion_bench
from icm_lora.adapter import GENERATION, WEIGHTS
from icm_lora.cli import main
from icm_lora.fuse import fuse_adapters
from icm_lora.fusion import FusionError, FusionSpec, combine, objective


def run_paths(tiny_run):
    ckpt = tiny_run / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    return ckpt, ["--config", str(TINY), "--data.zoo_dir", str(tiny_run / "zoo"), "--trainer.logger", "false"]


def test_latent_rules_on_a_hand_made_case():
    points = torch.tensor([[1.0, 2.0, 0.0], [3.0, -2.0, 1.0]])
    half = torch.tensor([0.5, 0.5])
    assert combine(points, half, "mean").tolist() == [2.0, 0.0, 0.5]
    # TIES, nothing trimmed: coordinate 1 elects + (2 x 2 - 2 x 2 = 0 -> ties go to +), only task 0 agrees
    assert combine(points, half, "ties", density=1.0).tolist() == [2.0, 2.0, 1.0]
    # PCGrad: a = [1, 0], b = [-1, 1] conflict (a.b = -1): a -> a - (a.b / |b|^2) b = [0.5, 0.5],
    # b -> b - (b.a / |a|^2) a = [0, 1]; the mean is [0.25, 0.75]
    conflicting = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    assert torch.allclose(combine(conflicting, half, "pcgrad"), torch.tensor([0.25, 0.75]))
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(combine(agreeing, half, "pcgrad"), combine(agreeing, half, "mean"))  # no conflict, no change


def test_the_smooth_maximum_tends_to_the_worst_task():
    relative = torch.tensor([-0.3, -0.1])
    weights = torch.tensor([0.5, 0.5])
    assert objective(relative, weights, 0.0).item() == pytest.approx(-0.2)
    assert objective(relative, weights, 1e-3).item() == pytest.approx(-0.1, abs=1e-2)


def test_fusion_settings_are_checked():
    with pytest.raises(FusionError, match="fusion.rule must be one of"):
        FusionSpec(rule="sum")
    with pytest.raises(FusionError, match="2 values for 3 tasks"):
        FusionSpec(weights=[1.0, 2.0]).normalized_weights(3)
    with pytest.raises(FusionError, match="non-negative"):
        FusionSpec(weights=[1.0, -1.0]).normalized_weights(2)
    assert FusionSpec(weights=[1.0, 3.0]).normalized_weights(2).tolist() == [0.25, 0.75]
    with pytest.raises(FusionError, match="fusion.decode must be one of"):
        FusionSpec(decode="twice")
    with pytest.raises(FusionError, match="latent TIES merges them into one"):
        FusionSpec(rule="ties", decode="each")
    with pytest.raises(FusionError, match="fusion.anchor must be one of"):
        FusionSpec(decode="each", anchor="zoo")
    with pytest.raises(FusionError, match="it needs decode each"):
        FusionSpec(anchor="own")
    with pytest.raises(FusionError, match="it needs decode each"):
        FusionSpec(anchor="merged")
    with pytest.raises(FusionError, match="anchor_merge method must be one of"):
        FusionSpec(decode="each", anchor="merged", anchor_merge={"method": "peft_cat"})
    with pytest.raises(FusionError, match="anchor_merge: density"):
        FusionSpec(decode="each", anchor="merged", anchor_merge={"method": "ties", "density": 2.0})
    assert FusionSpec(decode="each", anchor="merged", anchor_merge={"keep": 0.5}).merge_spec().method == "tsv_m"
    with pytest.raises(FusionError, match="holdout_tokens must be 0"):
        FusionSpec(holdout_tokens=1)
    with pytest.raises(FusionError, match="guard must be unset"):
        FusionSpec(guard=-0.1)


def test_the_step_is_chosen_on_the_held_out_objective():
    """descend fits on one objective and returns the step where the other is lowest (start included)."""
    from icm_lora.fusion import descend

    x = torch.zeros(1, requires_grad=True)
    fit = lambda: (x - 2.0).pow(2).sum()  # noqa: E731  minimised at 2
    check = lambda: (x - 0.5).pow(2).sum()  # noqa: E731  held out: best near 0.5
    (best,), info = descend([x], fit, check, steps=40, lr=0.1)
    assert abs(best.item() - 0.5) <= 0.1 and x.item() > 1.5  # the descent went on; the held-out step was kept
    assert info["holdout_objective_best"] <= info["holdout_objective_start"] and 0 < info["best_step"] < 40
    assert info["demo_objective_best"] == pytest.approx((best.item() - 2.0) ** 2)
    x = torch.zeros(1, requires_grad=True)
    (best,), info = descend([x], fit, None, steps=40, lr=0.1)
    assert info["demo_objective_best"] < info["demo_objective_start"] and "holdout_objective_best" not in info
    assert best.item() > 1.5  # without a held-out part, the lowest fitted objective
    x = torch.zeros(1, requires_grad=True)
    (best,), info = descend([x], fit, lambda: (x + 1.0).pow(2).sum(), steps=5, lr=0.1)
    assert best.item() == 0.0 and info["best_step"] == 0  # every step hurts the held-out part: the start is kept


def test_the_guard_returns_no_step_that_leaves_a_task_worse_than_the_start():
    """With a guard, the step is the best of those where no task's held-out loss rose above its start."""
    from icm_lora.fusion import descend

    def run(guard):
        x = torch.zeros(1, requires_grad=True)
        fit = lambda: torch.stack([(x - 2.0).pow(2).sum(), (x - 2.0).pow(2).sum()])  # noqa: E731  both pull to 2
        # held out: task 0 likes x near 2 and drops a lot; task 1 likes x near 0.3 and rises slowly past it
        check = lambda: torch.stack([(x - 2.0).pow(2).sum(), 0.1 * (x - 0.3).pow(2).sum()])  # noqa: E731
        return descend([x], fit, check, steps=40, lr=0.1, guard=guard)

    (free,), info = run(None)
    assert free.item() > 1.5 and "task_lags_start" not in info  # the mean trades task 1 for task 0
    (kept,), info = run(0.0)
    assert 0 < kept.item() <= 0.6 + 1e-6  # task 1's held-out loss is at most its start's 0.009 up to x = 0.6
    assert info["task_lags_best"][1] <= info["task_lags_start"][1] and info["steps_refused_by_guard"] > 0
    assert info["holdout_objective_best"] < info["holdout_objective_start"]  # still a step that helps the sum
    (loose,), info = run(0.1)
    assert kept.item() < loose.item()  # a looser guard lets more of the trade through


def test_fuse_through_the_cli_writes_a_folder_plain_peft_loads(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    ckpt, common = run_paths(tiny_run)
    out = tiny_run / "fused"
    main(["fuse", *common, "--ckpt_path", str(ckpt), "--tasks", "[legal, python]", "--output_dir", str(out),
          "--fusion.rule", "pcgrad", "--fusion.weights", "[1, 3]"])
    folder = out / "legal+python"
    record = files.read_json(folder / GENERATION)
    assert record["tasks"] == ["legal", "python"] and record["method"] == "icm_fusion"
    assert record["fusion"]["rule"] == "pcgrad" and record["weights"] == [0.25, 0.75]
    config = files.read_json(folder / "adapter_config.json")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        bare = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, folder)(input_ids=ids).logits
    assert not torch.allclose(bare, tuned)


def test_fusing_one_task_is_generating_it(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    ckpt, common = run_paths(tiny_run)
    main(["predict", *common, "--ckpt_path", str(ckpt), "--num_samples", "0", "--data.predict_tasks", "[legal]",
          "--writer.output_dir", str(tiny_run / "one_predicted")])
    fused = fuse_adapters(TINY, ["legal"], ckpt, output_dir=tiny_run / "one_fused",
                          overrides=["--data.zoo_dir", str(tiny_run / "zoo")])
    generated = files.load_tensors(tiny_run / "one_predicted" / "legal" / "sample_00" / WEIGHTS)
    assert set(files.load_tensors(fused / WEIGHTS)) == set(generated)
    for name, tensor in files.load_tensors(fused / WEIGHTS).items():
        assert torch.allclose(tensor, generated[name], atol=1e-6), name


def delta(state: dict, scale: float) -> dict:
    """Per module, scale·B·A of a PEFT state dict."""
    return {k.removesuffix(".lora_A.weight"): scale * state[k.replace("lora_A", "lora_B")] @ state[k]
            for k in state if k.endswith("lora_A.weight")}


def test_decoding_each_task_sums_the_generated_updates(tiny_run, monkeypatch):
    """decode each: one task at weight 1 is generating it; two tasks give the weighted sum of their
    generated updates, as one adapter of twice the rank that plain PEFT loads."""
    monkeypatch.chdir(tiny_run)
    ckpt, _ = run_paths(tiny_run)
    zoo = ["--data.zoo_dir", str(tiny_run / "zoo")]
    made = {}
    for names in (["legal"], ["python"], ["legal", "python"]):
        folder = fuse_adapters(TINY, names, ckpt, output_dir=tiny_run / "each", name="+".join(names),
                               overrides=[*zoo, "--fusion.decode", "each",
                                          "--fusion.weights", "[1, 3]" if len(names) == 2 else "[1]"])
        made[tuple(names)] = (files.read_json(folder / GENERATION), files.load_tensors(folder / WEIGHTS), folder)
    generated = {}
    for name in ("legal", "python"):
        main(["predict", "--config", str(TINY), *zoo, "--trainer.logger", "false", "--ckpt_path", str(ckpt),
              "--num_samples", "0", "--data.predict_tasks", f"[{name}]", "--writer.output_dir", str(tiny_run / "each_predicted")])
        generated[name] = delta(files.load_tensors(tiny_run / "each_predicted" / name / "sample_00" / WEIGHTS), 4 / 2)
    for name in ("legal", "python"):  # one task: its generated update, written with scaling 1
        got = delta(made[(name,)][1], 1.0)
        assert all(torch.allclose(got[m], generated[name][m], atol=1e-5) for m in got)
    record, tensors, folder = made[("legal", "python")]
    assert record["decode"] == "each" and record["weights"] == [0.25, 0.75] and record["rank"] == 4  # 2 tasks x r = 2
    got = delta(tensors, 1.0)
    for m in got:
        assert torch.allclose(got[m], 0.25 * generated["legal"][m] + 0.75 * generated["python"][m], atol=1e-5)
    config = files.read_json(folder / "adapter_config.json")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
    with torch.no_grad():
        PeftModel.from_pretrained(base, folder)(input_ids=torch.tensor([[10, 20, 30]]))
    # anchored at the own LoRAs, the unadjusted fusion is task arithmetic of the own LoRAs, whatever the latent
    from icm_lora.zoo import Zoo

    zoo_lora = Zoo(tiny_run / "zoo")
    own = {n: delta(zoo_lora.layout.unflatten(zoo_lora.final(n)), 4 / 2) for n in ("legal", "python")}
    for latent in ("prior", "posterior"):
        anchored = fuse_adapters(TINY, ["legal", "python"], ckpt, output_dir=tiny_run / "each", name=f"own-{latent}",
                                 overrides=[*zoo, "--fusion.decode", "each", "--fusion.anchor", "own",
                                            "--fusion.latent", latent, "--fusion.weights", "[1, 3]"])
        got = delta(files.load_tensors(anchored / WEIGHTS), 1.0)
        for m in got:
            assert torch.allclose(got[m], 0.25 * own["legal"][m] + 0.75 * own["python"][m], atol=1e-5)
    # anchored at a merge, the unadjusted fusion is that merge of the own LoRAs
    merged = fuse_adapters(TINY, ["legal", "python"], method="merge", output_dir=tiny_run / "each", name="tsv",
                           overrides=[*zoo, "--merge.method", "tsv_m", "--merge.scale", "0.7"])
    want = delta(files.load_tensors(merged / WEIGHTS), 1.0)
    anchored = fuse_adapters(TINY, ["legal", "python"], ckpt, output_dir=tiny_run / "each", name="merged",
                             overrides=[*zoo, "--fusion.decode", "each", "--fusion.anchor", "merged",
                                        "--fusion.anchor_merge", "{method: tsv_m, scale: 0.7}"])
    record = files.read_json(anchored / GENERATION)
    assert record["anchor"] == "merged" and record["fusion"]["anchor_merge"] == {"method": "tsv_m", "scale": 0.7}
    got = delta(files.load_tensors(anchored / WEIGHTS), 1.0)
    assert all(torch.allclose(got[m], want[m], atol=1e-5) for m in want)


def test_merging_one_zoo_task_gives_back_its_own_lora(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    _, common = run_paths(tiny_run)
    folder = fuse_adapters(TINY, ["python"], method="merge", output_dir=tiny_run / "merged", name="one",
                           overrides=["--data.zoo_dir", str(tiny_run / "zoo"), "--merge.method", "tsv_m"])
    record = files.read_json(folder / GENERATION)
    assert record["method"] == "merge" and record["merge"]["method"] == "tsv_m"
    from icm_lora.zoo import Zoo

    zoo = Zoo(tiny_run / "zoo")
    own = zoo.layout.unflatten(zoo.final("python"))
    merged = files.load_tensors(folder / WEIGHTS)
    scale_own, scale_merged = 4 / 2, 1.0  # lora_alpha / r of the zoo; the merged folder's lora_alpha == r
    assert files.read_json(folder / "adapter_config.json")["lora_alpha"] == record["rank"]
    for key in own:
        if key.endswith("lora_A.weight"):
            m = key.removesuffix(".lora_A.weight")
            expected = scale_own * own[m + ".lora_B.weight"] @ own[key]
            got = scale_merged * merged[m + ".lora_B.weight"] @ merged[key]
            assert torch.allclose(got, expected, atol=1e-5)


def test_fuse_refuses_bad_input_in_one_line_and_writes_nothing(tiny_run, monkeypatch, tmp_path):
    monkeypatch.chdir(tiny_run)
    ckpt, common = run_paths(tiny_run)
    out = tmp_path / "refused"
    corrupt = tmp_path / "broken.ckpt"
    corrupt.write_bytes(ckpt.resolve().read_bytes()[:1000])
    other_rank = tmp_path / "other_rank"  # a merged folder of rank 6: not the zoo's rank-2 structure
    fuse_adapters(TINY, ["legal", "python", "mathematics"], method="merge", output_dir=tmp_path, name="other_rank",
                  overrides=["--data.zoo_dir", str(tiny_run / "zoo")])
    task_file = tmp_path / "new.yaml"
    task_file.write_text("name: new\nexamples: ['def f(x):\n    return x', 'import os']\n")
    cases = [
        (["--ckpt_path", str(ckpt), "--tasks", "[legal, astrology]"], "'astrology' is neither a zoo task"),
        (["--ckpt_path", str(ckpt), "--tasks", "[]"], "fuse needs --tasks"),
        (["--ckpt_path", str(ckpt), "--tasks", "[legal, legal]"], "more than once"),
        (["--ckpt_path", str(corrupt), "--tasks", "[legal, python]"], "not a readable Lightning checkpoint"),
        (["--tasks", "[legal, python]"], "needs --ckpt_path"),
        (["--ckpt_path", str(ckpt), "--tasks", f"[legal, {task_file}]", "--fusion.latent", "posterior"],
         "zoo tasks only"),
        (["--ckpt_path", str(ckpt), "--tasks", f"[legal, {task_file}]", "--fusion.decode", "each",
          "--fusion.anchor", "own"], "zoo tasks only"),
        (["--method", "merge", "--tasks", f"[legal, {other_rank}]"], "the zoo's layout expects"),
        (["--method", "merge", "--tasks", f"[legal, {task_file}]"], "a task file has none"),
        (["--ckpt_path", str(ckpt), "--tasks", f"[legal, {other_rank}]"], "adapter folders go with --method merge"),
        (["--ckpt_path", str(ckpt), "--tasks", "[legal, python]", "--model.latent_dim", "8"], "another shape"),
    ]
    for extra, named in cases:
        with pytest.raises(SystemExit) as stop:
            main(["fuse", *common, "--output_dir", str(out), *extra])
        message = str(stop.value.code)
        assert message.startswith("icm_lora fuse: ") and named in message and "\n" not in message, message
    assert not out.exists()


def test_optimize_fits_the_fused_point_on_the_demonstrations(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    ckpt, common = run_paths(tiny_run)
    folder = fuse_adapters(TINY, ["legal", "python"], ckpt, output_dir=tiny_run / "optimised",
                           overrides=["--data.zoo_dir", str(tiny_run / "zoo"), "--fusion.rule", "optimize",
                                      "--fusion.steps", "8", "--fusion.lr", "0.5", "--fusion.precision", "fp32"])
    record = files.read_json(folder / GENERATION)
    assert record["demo_objective_best"] < record["demo_objective_start"]  # the steps found a better point
    each = fuse_adapters(TINY, ["legal", "python"], ckpt, output_dir=tiny_run / "optimised", name="each",
                         overrides=["--data.zoo_dir", str(tiny_run / "zoo"), "--fusion.rule", "optimize",
                                    "--fusion.decode", "each", "--fusion.steps", "8", "--fusion.lr", "0.5",
                                    "--fusion.precision", "fp32"])
    record = files.read_json(each / GENERATION)
    assert record["demo_objective_best"] < record["demo_objective_start"]  # gradients reach every task's point
    assert record["rank"] == 4 and len(record["weights"]) == 2 and record["weights"] != [0.5, 0.5]  # weights fitted too
    anchored = fuse_adapters(TINY, ["legal", "python"], ckpt, output_dir=tiny_run / "optimised", name="anchored",
                             overrides=["--data.zoo_dir", str(tiny_run / "zoo"), "--fusion.rule", "optimize",
                                        "--fusion.decode", "each", "--fusion.anchor", "own", "--fusion.steps", "8",
                                        "--fusion.lr", "0.5", "--fusion.precision", "fp32"])
    record = files.read_json(anchored / GENERATION)
    assert record["anchor"] == "own" and record["demo_objective_best"] < record["demo_objective_start"]
    # steered from TSV-M, the step chosen on held-out demonstrations (never fitted on)
    steered = fuse_adapters(TINY, ["legal", "python"], ckpt, output_dir=tiny_run / "optimised", name="steered",
                            overrides=["--data.zoo_dir", str(tiny_run / "zoo"), "--fusion.rule", "optimize",
                                       "--fusion.decode", "each", "--fusion.anchor", "merged", "--fusion.steps", "8",
                                       "--fusion.lr", "0.5", "--fusion.precision", "fp32", "--fusion.demo_tokens", "24",
                                       "--fusion.holdout_tokens", "24", "--fusion.guard", "0"])
    record = files.read_json(steered / GENERATION)
    assert record["anchor"] == "merged" and record["holdout_objective_best"] <= record["holdout_objective_start"]
    assert all(b <= s for b, s in zip(record["task_lags_best"], record["task_lags_start"], strict=True))
    assert 0 <= record["best_step"] <= 8 and record["fusion"]["holdout_tokens"] == 24
    with pytest.raises(FusionError, match="fewer than 10002 tokens"):  # the held-out part must exist
        fuse_adapters(TINY, ["legal", "python"], ckpt, output_dir=tiny_run / "optimised", name="none_held_out",
                      overrides=["--data.zoo_dir", str(tiny_run / "zoo"), "--fusion.rule", "optimize",
                                 "--fusion.steps", "2", "--fusion.demo_tokens", "10000", "--fusion.holdout_tokens", "8"])


def test_demo_loss_swaps_the_lora_in_exactly(tiny_base):
    from icm_lora.evaluate import LiveAdapter
    from icm_lora.fusion import DemoLoss
    from icm_lora.zoo import LoRASpec, lora_layout

    model, tokenizer, _ = tiny_base
    spec = LoRASpec(r=2, lora_alpha=4, layers_to_transform=[1])
    layout = lora_layout(model.config, spec)
    import copy

    live = LiveAdapter(copy.deepcopy(model), spec.peft_config(), layout)
    demos = [["alpha beta gamma delta " * 8], ["one two three four " * 8]]
    loss = DemoLoss(live.model, tokenizer, layout, demos, tokens=48, block_size=16, precision="fp32")
    assert torch.allclose(loss(torch.zeros(layout.dim)), torch.ones(2))  # a zero LoRA is the base model
    flat = torch.randn(layout.dim, generator=torch.Generator().manual_seed(0)) * 0.5
    flat.requires_grad_(True)
    relative = loss(flat)
    live.load(flat.detach())  # the same LoRA loaded the plain way, scored with the full forward
    ids = tokenizer("\n\n".join(demos[0]), add_special_tokens=False)["input_ids"][:48]
    blocks = [torch.tensor(ids[s : s + 16])[None] for s in range(0, 48, 16)]
    with torch.no_grad():
        nll = sum(live.model(input_ids=b, labels=b).loss * (b.shape[1] - 1) for b in blocks) / sum(
            b.shape[1] - 1 for b in blocks)
    assert relative[0].item() * loss.base[0].item() == pytest.approx(nll.item(), rel=1e-4)
    relative.sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0  # gradients reach the LoRA's values
    assert torch.isfinite(flat.grad).all()

    # With the tasks' own LoRAs, the loss is the share of the own LoRA's gain missed: 0 at the own LoRA.
    own = [flat.detach(), None]
    judged = DemoLoss(live.model, tokenizer, layout, demos, tokens=48, block_size=16, precision="fp32", own=own)
    lag = judged(flat.detach())
    if judged.judged[0]:  # this random LoRA beats the base model on task 0's demonstrations
        assert lag[0].item() == pytest.approx(0.0, abs=1e-5)
    else:  # it does not: task 0 is judged relative to the base model, as a task without an own LoRA
        assert lag[0].item() == pytest.approx(relative[0].item(), rel=1e-5)
    assert torch.allclose(judged(torch.zeros(layout.dim)), torch.ones(2))  # the base model misses all of it


def test_fusion_bench_on_the_tiny_zoo(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    trained, common = run_paths(tiny_run)
    out = tiny_run / "results" / "fusion"
    ckpt = out.parent / "generator.ckpt"  # a copy, so it can be replaced below without touching the shared run
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained, ckpt)
    args = [*common, "--ckpt_path", str(ckpt), "--fusion_bench.output", str(out),
            "--fusion_bench.sets", "[{name: pair, kind: pair, tasks: [legal, python]}, {name: all, kind: all, tasks: [all]}]",
            "--fusion_bench.fusions", '{"ICM-Fusion (mean)": [{rule: mean}, {rule: mean, scale: "T^0.5"}], '
            '"ICM-Fusion (optimise)": [{rule: optimize, steps: 2, precision: fp32}]}',
            "--fusion_bench.merges", "{task_arithmetic: [{scale: 1.0}, {scale: 0.5}], peft_cat: [{}], iso_cts: [{}]}",
            "--fusion_bench.lorahub", "[{budget: 3, precision: fp32}, {budget: 3, loss: lag, precision: fp32}]",
            "--fusion_bench.union_steps", "2"]
    rows = fusion_bench.main(args)
    methods = {r["method"] for r in rows}
    assert {"ICM-Fusion (mean)", "ICM-Fusion (optimise)", "task_arithmetic", "peft_cat", "iso_cts", "base model",
            "LoraHub (weights fitted on demonstrations)",
            "own LoRA per task (ceiling)", "union LoRA (trained on the set's text)"} <= methods
    by = {(r["set"], r["method"], r["chosen"]): r for r in rows}
    for s in ("pair", "all"):
        ta, cat = by[(s, "task_arithmetic", "defaults")], by[(s, "peft_cat", "defaults")]
        assert ta["mean_retention"] == pytest.approx(cat["mean_retention"], abs=1e-3)  # PEFT's cat is task arithmetic
        assert by[(s, "own LoRA per task (ceiling)", "-")]["mean_retention"] == 1.0
        tuned = by[(s, "task_arithmetic", "tuned")]
        assert tuned["val_pooled_retention"] >= ta["val_pooled_retention"]  # chosen on validation, never on test
    assert by[("all", "iso_cts", "defaults")]["size"] == 3
    table = out.with_suffix(".md").read_text()
    assert "## Mean retention by set size" in table and "| ICM-Fusion (mean) |" in table
    assert out.with_suffix(".csv").read_text().startswith("set,kind,size,method")
    stamp = (out.parent / "fusion_runs" / "pair.json").stat().st_mtime_ns
    again = fusion_bench.main(args)  # resumes: finished sets are read back, not recomputed
    assert (out.parent / "fusion_runs" / "pair.json").stat().st_mtime_ns == stamp
    assert [r["mean_retention"] for r in again] == [r["mean_retention"] for r in rows]
    assert all(math.isfinite(r["mean_retention"]) for r in rows)
    def unexpected(*args, **kwargs):
        raise AssertionError("a method whose grid is unchanged was scored again")

    added = [a if not a.startswith('{"ICM-Fusion') else a[:-1] + ', "ICM-Fusion (each)": [{rule: mean, decode: each}]}'
             for a in args]
    with monkeypatch.context() as m:  # a method added to the config is the only one scored
        m.setattr(fusion_bench.Bench, "merged", unexpected)
        m.setattr(fusion_bench.Bench, "lorahubbed", unexpected)
        m.setattr(fusion_bench.Bench, "union", unexpected)
        grown = fusion_bench.main(added)
    kept = [r for r in grown if r["method"] != "ICM-Fusion (each)"]
    assert [r["mean_retention"] for r in kept] == [r["mean_retention"] for r in rows]
    assert sum(r["method"] == "ICM-Fusion (each)" for r in grown) == 4  # defaults and tuned, in both sets
    saved = torch.load(ckpt, weights_only=False)
    saved["note"] = "another generator at the same path"  # e.g. a fresh clone's, trained where the last one was
    torch.save(saved, ckpt)
    fusion_bench.main(args)
    assert (out.parent / "fusion_runs" / "pair.json").stat().st_mtime_ns != stamp  # scored again, not read back


def test_saved_sets_of_the_older_format_keep_their_methods_rows():
    old = {"key": {"tasks": ["a", "b"], "fusions": {"F": [{"rule": "mean"}]}, "merges": {"ta": [{}]},
                   "lorahub": [{"budget": 3}], "checkpoint": "c", "union_steps": 2, "union_max_steps": 8},
           "rows": [{"method": "F", "family": "ICM-Fusion"}, {"method": "ta", "family": "merge"},
                    {"method": fusion_bench.LORAHUB, "family": "merge"}, {"method": "base model", "family": "reference"}]}
    new = fusion_bench.upgrade(old)
    assert new["key"] == {"tasks": ["a", "b"], "checkpoint": "c"}
    assert new["methods"]["F"] == {"grid": [{"rule": "mean"}], "rows": [old["rows"][0]]}
    assert new["methods"][fusion_bench.LORAHUB]["grid"] == [{"budget": 3}]
    assert new["references"] == [old["rows"][3]] and new["union"] == {"union_steps": 2, "union_max_steps": 8}
    assert fusion_bench.upgrade(new) == new
    between = {"key": {"tasks": ["a", "b"], "union_steps": 2, "union_max_steps": 8}, "methods": {}, "references": []}
    assert fusion_bench.upgrade(between) == {"key": {"tasks": ["a", "b"]}, "methods": {}, "references": [],
                                             "union": {"union_steps": 2, "union_max_steps": 8}}


@pytest.mark.parametrize("fusion, source", [("fusion.yaml", "openworld.yaml"), ("fusion_domains.yaml", "domains.yaml")])
def test_fusion_yamls_share_their_experiments_zoo(fusion, source):
    fu = yaml.safe_load((ROOT / "experiments" / fusion).read_text())
    ow = yaml.safe_load((ROOT / "experiments" / source).read_text())
    for key in ("zoo_dir", "base_model", "tasks", "text", "lora", "training", "condition", "normalization"):
        assert fu["data"][key] == ow["data"][key], key  # the same zoo entries and conditions, never a rebuild
    if fusion == "fusion_domains.yaml":
        assert (fu["model"], fu["trainer"]) == (ow["model"], ow["trainer"])  # domains.yaml's generator
    names = {t["name"] for t in fu["data"]["tasks"]}
    for s in fu["fusion_bench"]["sets"]:
        assert s["tasks"] == ["all"] or set(s["tasks"]) <= names, s["name"]
    grids = [*fu["fusion_bench"]["fusions"].values(), *fu["fusion_bench"]["merges"].values(), fu["fusion_bench"]["lorahub"]]
    sizes = {len(grid) for grid in grids}
    assert sizes == {3}  # every method gets the same validation budget


# ---- LoraHub ---------------------------------------------------------------------------------------
def test_lorahub_search_finds_a_bounded_optimum_within_its_budget():
    import numpy as np

    from icm_lora.lorahub import LoraHubSpec, fit_weights

    calls = []

    def loss(w):
        calls.append(w.copy())
        return float(((w - np.array([0.7, -0.3, 3.0])) ** 2).sum())

    w, info = fit_weights(loss, 3, LoraHubSpec(budget=80, l1=0.0))
    assert len(calls) == info["evaluations"] <= 80 and np.abs(np.stack(calls)).max() <= 1.5
    assert torch.allclose(w, torch.tensor([0.7, -0.3, 1.5]), atol=0.02)  # the third weight at its bound
    assert info["objective"] < info["objective_at_init"] and calls[0].tolist() == [0.0, 0.0, 0.0]
    shrunk, _ = fit_weights(loss, 3, LoraHubSpec(budget=80, l1=20.0))  # a large l1 keeps weights near 0
    assert shrunk.abs().sum() < w.abs().sum()
    with pytest.raises(FusionError, match="lorahub.loss"):
        LoraHubSpec(loss="ce")


def test_lorahub_stacked_lora_is_exactly_the_weighted_sum_of_the_updates():
    from icm_lora.flat import FlatLayout
    from icm_lora.merge import MergeError, delta_weights, scaling, stacked
    from icm_lora.zoo import LoRASpec

    lora = LoRASpec(r=2, lora_alpha=6)
    torch.manual_seed(0)

    def adapter(r):
        return {"m.lora_A.weight": torch.randn(r, 5), "m.lora_B.weight": torch.randn(4, r),
                "n.lora_A.weight": torch.randn(r, 3), "n.lora_B.weight": torch.randn(6, r)}

    layout, wide = FlatLayout.from_state_dict(adapter(2)), FlatLayout.from_state_dict(adapter(7))
    flats = [layout.flatten(adapter(2)) for _ in range(3)]
    w = torch.tensor([0.5, -1.25, 2.0])
    got = delta_weights(stacked(flats, layout, lora, w, wide), wide, LoRASpec(r=7, lora_alpha=7))  # scaling 1
    for m in ("m", "n"):
        want = sum(wi * d[m] for wi, d in zip(w.double(), (delta_weights(f, layout, lora) for f in flats)))
        assert torch.allclose(got[m], want, atol=1e-5)
    assert scaling(lora) == 3.0
    with pytest.raises(MergeError, match="rank >= 6"):  # three rank-2 LoRAs need rank 6
        stacked(flats, layout, lora, w, FlatLayout.from_state_dict(adapter(5)))
    anchor = adapter(1)  # a fixed LoRA of scaling 1 put first: its update is added
    got = delta_weights(stacked(flats, layout, lora, w, wide, anchor), wide, LoRASpec(r=7, lora_alpha=7))
    for m in ("m", "n"):
        want = sum(wi * d[m] for wi, d in zip(w.double(), (delta_weights(f, layout, lora) for f in flats)))
        assert torch.allclose(got[m], want + anchor[m + ".lora_B.weight"].double() @ anchor[m + ".lora_A.weight"].double(),
                              atol=1e-5)
    with pytest.raises(MergeError, match="rank >= 8"):
        stacked(flats, layout, lora, w, wide, adapter(2))


def test_lorahub_through_the_cli_writes_the_weighted_sum_plain_peft_loads(tiny_run, monkeypatch):
    from icm_lora.zoo import Zoo

    monkeypatch.chdir(tiny_run)
    _, common = run_paths(tiny_run)
    out = tiny_run / "fused"
    main(["fuse", *common, "--method", "lorahub", "--tasks", "[legal, python]", "--output_dir", str(out),
          "--name", "hub", "--lorahub.budget", "6", "--lorahub.precision", "fp32"])
    folder = out / "hub"
    record = files.read_json(folder / GENERATION)
    assert record["method"] == "lorahub" and record["tasks"] == ["legal", "python"]
    assert len(record["weights"]) == 2 and 1 <= record["search"]["evaluations"] <= 6
    assert record["search"]["objective"] <= record["search"]["objective_at_init"] and any(record["weights"])
    # The folder is Σ w_i ΔW_i of the tasks' own LoRAs, with the recorded weights, and plain PEFT loads it.
    zoo = Zoo(tiny_run / "zoo")
    owns = [zoo.layout.unflatten(zoo.final(t)) for t in ("legal", "python")]
    merged = files.load_tensors(folder / WEIGHTS)
    assert files.read_json(folder / "adapter_config.json")["lora_alpha"] == record["rank"]
    for key in merged:
        if key.endswith("lora_A.weight"):
            m = key.removesuffix(".lora_A.weight")
            expected = sum(w * 2.0 * own[m + ".lora_B.weight"] @ own[key] for w, own in zip(record["weights"], owns))
            assert torch.allclose(merged[m + ".lora_B.weight"] @ merged[key], expected, atol=1e-5)
    config = files.read_json(folder / "adapter_config.json")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), folder)
    bad = tiny_run / "fused_bad"
    with pytest.raises(SystemExit, match="give zoo task names"):
        main(["fuse", *common, "--method", "lorahub", "--tasks", f"[legal, {folder}]", "--output_dir", str(bad)])
    assert not bad.exists()


def test_a_bench_of_merges_only_needs_no_generator(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    _, common = run_paths(tiny_run)
    out = tiny_run / "results" / "hub_only"
    rows = fusion_bench.main([*common, "--fusion_bench.output", str(out),
                              "--fusion_bench.sets", "[{name: pair, kind: pair, tasks: [legal, python]}]",
                              "--fusion_bench.fusions", "{}", "--fusion_bench.merges", "{}",
                              "--fusion_bench.lorahub", "[{budget: 2, precision: fp32}]", "--fusion_bench.union_steps", "0"])
    assert [r["method"] for r in rows if r["chosen"] == "tuned"] == ["LoraHub (weights fitted on demonstrations)"]
    assert not (out.parent / "hub_only_runs" / "generator").exists()  # nothing was fit
    assert "generator none" in out.with_suffix(".md").read_text()


def test_the_long_tail_case_trains_the_tail_on_little_text_in_a_copy_of_the_zoo(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    _, common = run_paths(tiny_run)
    zoo = tiny_run / "zoo"
    before = {p: p.stat().st_mtime_ns for p in zoo.rglob("*") if p.is_file()}
    out = tiny_run / "results" / "tail"
    args = [*common, "--fusion_bench.output", str(out),
            "--fusion_bench.sets", "[{name: tail, kind: long_tail, tasks: [legal, python], tail: python}]",
            "--fusion_bench.fusions", '{"ICM-Fusion (mean)": [{rule: mean}]}',
            "--fusion_bench.merges", "{task_arithmetic: [{scale: 1.0}]}", "--fusion_bench.lorahub", "[]",
            "--fusion_bench.union_steps", "0", "--fusion_bench.tail_share", "0.2"]
    rows = fusion_bench.main(args)
    copy = out.parent / "tail_runs" / "tail-python-1200chars" / "zoo"
    meta = files.read_json(copy / "metadata.json")
    assert meta["tasks"]["python"]["source"]["task"]["train_chars"] == 1200  # retrained on 1% ... here 20%
    assert "train_chars" not in meta["tasks"]["legal"]["source"]["task"]  # copied as it was
    assert (copy / meta["tasks"]["legal"]["file"]).read_bytes() == (zoo / meta["tasks"]["legal"]["file"]).read_bytes()
    assert (copy / meta["tasks"]["python"]["file"]).read_bytes() != (zoo / meta["tasks"]["python"]["file"]).read_bytes()
    assert {p: p.stat().st_mtime_ns for p in zoo.rglob("*") if p.is_file()} == before  # the shared zoo untouched
    assert (out.parent / "tail_runs" / "tail-python-1200chars" / "fusion_runs" / "generator" / "fit" / "done.json").exists()
    assert not (out.parent / "tail_runs" / "generator").exists()  # no set needed the shared zoo's generator
    by = {(r["method"], r["chosen"]): r for r in rows}
    assert by[("own LoRA per task (ceiling)", "-")]["per_task"] == {"legal": 1.0, "python": 1.0}
    as_fused = by[("own LoRA per task, as fused (the tail's on little text)", "-")]["per_task"]
    assert as_fused["legal"] == pytest.approx(1.0, abs=1e-6) and as_fused["python"] != pytest.approx(1.0, abs=1e-6)
    assert all(r["tail"] == "python" for r in rows)
    table = out.with_suffix(".md").read_text()
    assert "## Long-tail case: tail" in table and "| python (tail) | others, mean |" in table
    assert "long-tail case `python`: generator " in table and "## Mean retention by set size" not in table
    stamp = (out.parent / "tail_runs" / "tail.json").stat().st_mtime_ns
    fusion_bench.main(args)  # resumes: the copy and its generator are reused, the set read back
    assert (out.parent / "tail_runs" / "tail.json").stat().st_mtime_ns == stamp
