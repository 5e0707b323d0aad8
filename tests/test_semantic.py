"""SG-LoRA: the semantic prior (moment matching, leave-self-out conditions, rejection), its learned-prior
CVAE, and ``predict --description`` through the real CLI and the Python API."""

import shutil
import warnings

import pytest
import torch
from peft import PeftModel
from torch.distributions import Normal, kl_divergence
from transformers import AutoModelForCausalLM

from conftest import TINY
from icm_lora import files, semantic
from icm_lora.cli import main
from icm_lora.generate import generate_adapters, load_generated
from icm_lora.semantic import FarDescription, SemanticSpec
from icm_lora.sg_cvae import SemanticCVAE, kl_gaussians
from icm_lora.system import ICMLoRA


def test_moment_matching_on_a_hand_made_case():
    alpha = torch.tensor([0.75, 0.25])
    means = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    variances = torch.tensor([[0.5, 1.0], [1.0, 2.0]])
    mu, var = semantic.moment_match(alpha, means, variances)
    # mu* = 0.75 * [1, 0] + 0.25 * [3, 4] = [1.5, 1]
    assert mu.tolist() == [1.5, 1.0]
    # var* = (0.75 * [0.5, 1] + 0.25 * [1, 2]) + (0.75 * [0.25, 1] + 0.25 * [2.25, 9])
    #      = [0.625, 1.25] + [0.75, 3] = [1.375, 4.25]
    assert var.tolist() == [1.375, 4.25]


def test_expert_moments_use_the_last_m_checkpoints():
    ckpts = torch.tensor([[100.0], [1.0], [3.0]])  # oldest first
    mean, var = semantic.expert_moments(ckpts, last=2)
    assert mean.item() == 2.0 and var.item() == 1.0  # population variance of [1, 3]
    mean_all, _ = semantic.expert_moments(ckpts, last=0)
    assert mean_all.item() == pytest.approx(104 / 3)
    with pytest.raises(ValueError, match="at least one checkpoint"):
        semantic.expert_moments(torch.empty(0, 3))


def test_expert_weights_are_a_softmax_over_the_top_k():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    idx, alpha, sims = semantic.expert_weights(torch.tensor([1.0, 0.2]), keys, top_k=2, temperature=0.5)
    expected = torch.nn.functional.cosine_similarity(torch.tensor([[1.0, 0.2]]), keys, dim=-1)
    assert idx.tolist() == [0, 2]
    assert torch.allclose(sims, expected[[0, 2]])
    assert torch.allclose(alpha, torch.softmax(expected[[0, 2]] / 0.5, 0))
    idx, _, _ = semantic.expert_weights(keys[0], keys, top_k=5, temperature=1.0, exclude=0)
    assert idx.tolist() == [2, 1]  # itself left out, K capped at what is left


def test_leave_self_out_conditions_never_see_the_task_itself():
    torch.manual_seed(0)
    keys, means, variances = torch.randn(4, 6), torch.randn(4, 5), torch.rand(4, 5)
    spec = SemanticSpec(top_k=2, temperature=0.2)
    conds = semantic.leave_self_out_conditions(keys, means, variances, spec)
    assert conds.shape == (4, 10)
    # task 0's condition, by hand, from the other three
    sims = torch.nn.functional.cosine_similarity(keys[0:1], keys[1:], dim=-1)
    top = sims.topk(2)
    alpha = torch.softmax(top.values / 0.2, 0)
    mu, var = semantic.moment_match(alpha, means[1:][top.indices], variances[1:][top.indices])
    assert torch.allclose(conds[0], torch.cat([mu, var]))
    # changing a task's own parameters leaves its own condition as it was
    means2, variances2 = means.clone(), variances.clone()
    means2[0], variances2[0] = 100.0, 50.0
    again = semantic.leave_self_out_conditions(keys, means2, variances2, spec)
    assert torch.equal(again[0], conds[0]) and not torch.equal(again[1:], conds[1:])


def test_expert_dropout_builds_training_conditions_from_a_random_share_of_the_others():
    torch.manual_seed(0)
    keys, means, variances = torch.randn(6, 4), torch.randn(6, 3), torch.rand(6, 3)
    spec = SemanticSpec(top_k=2, temperature=0.2, expert_dropout=0.5)
    gen = torch.Generator().manual_seed(1)
    drop = torch.rand(6, generator=gen) < 0.5  # the draw dropout_condition makes with the same seed
    drop[3] = True
    cond = semantic.dropout_condition(3, keys, means, variances, spec, torch.Generator().manual_seed(1))
    # by hand: the top 2 of the experts kept, never task 3 itself
    kept = (~drop).nonzero().squeeze(1)
    sims = torch.nn.functional.cosine_similarity(keys[3:4], keys[kept], dim=-1)
    top = sims.topk(min(2, len(kept)))
    alpha = torch.softmax(top.values / 0.2, 0)
    mu, var = semantic.moment_match(alpha, means[kept][top.indices], variances[kept][top.indices])
    assert torch.allclose(cond, torch.cat([mu, var]))
    # every draw leaves the task out, and the conditions vary from draw to draw
    means2 = means.clone()
    means2[3] = 100.0
    draws = torch.stack([semantic.dropout_condition(3, keys, means2, variances, spec) for _ in range(50)])
    assert draws[:, :3].abs().max() < 100 and len(torch.unique(draws, dim=0)) > 1
    # nearly everything dropped: the nearest other expert is kept
    spec = SemanticSpec(top_k=2, expert_dropout=0.999999)
    nearest = torch.nn.functional.cosine_similarity(keys[3:4], keys, dim=-1).index_fill(0, torch.tensor([3]), -2).argmax()
    alone = semantic.dropout_condition(3, keys, means, variances, spec)
    assert torch.allclose(alone, torch.cat([means[nearest], variances[nearest]]))
    with pytest.raises(ValueError, match="expert_dropout"):
        SemanticSpec(expert_dropout=1.0)


def test_threshold_is_the_lowest_leave_one_out_similarity_less_the_margin():
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8]])
    # nearest others: 0 -> 1 (0.8), 1 -> 0 (0.8), 2 -> 1 (0.36): the lowest is 0.36
    assert semantic.threshold(keys, margin=0.05) == pytest.approx(0.31)
    noise = torch.tensor([[0.0, 0.0, 1.0]])  # reaches 0.8 against key 2
    assert semantic.threshold(keys, margin=0.05, noise=noise) == pytest.approx(0.85)
    with pytest.raises(ValueError, match="two experts"):
        semantic.threshold(keys[:1], 0.05)


def test_rejection_paths():
    for empty in ("", "   \n\t", None):
        with pytest.raises(FarDescription, match="empty"):
            semantic.check_text(empty)
    assert semantic.check_text("  legal terms ") == "legal terms"
    semantic.check_covered("near", best=0.5, limit=0.4, allow_far=False)  # covered: nothing happens
    with pytest.raises(FarDescription, match="far from every expert.*0.300 < threshold 0.400.*--allow_far"):
        semantic.check_covered("far", best=0.3, limit=0.4, allow_far=False)
    with pytest.warns(UserWarning, match="generating anyway"):
        semantic.check_covered("far", best=0.3, limit=0.4, allow_far=True)
    assert semantic.noise_strings(4) == semantic.noise_strings(4) and len(set(semantic.noise_strings(4))) == 4


def test_learned_prior_kl_matches_the_closed_form():
    torch.manual_seed(0)
    mu_q, mu_p = torch.randn(3, 5), torch.randn(3, 5)
    lv_q, lv_p = torch.randn(3, 5), torch.randn(3, 5)
    expected = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(mu_p, (0.5 * lv_p).exp())).sum(-1).mean()
    assert torch.allclose(kl_gaussians(mu_q, lv_q, mu_p, lv_p), expected, atol=1e-5)
    assert kl_gaussians(mu_q, lv_q, mu_q, lv_q).abs().item() < 1e-6


def test_semantic_cvae_starts_at_mu_star_and_learns():
    torch.manual_seed(0)
    d = 40
    model = SemanticCVAE(d, latent_dim=4, channels=(4, 8), kernel_size=3, hidden=32, rank=8)
    c = torch.cat([torch.randn(6, d), torch.rand(6, d)], dim=1)  # [mu*, var*]
    out = model.eval().generate(c, num_samples=3)
    assert out.shape == (6, 3, d)
    assert torch.allclose(out, c[:, None, :d].expand(-1, 3, -1))  # the decoder's correction starts at zero
    target = c[:, :d] + torch.randn(6, d)  # each task's LoRA differs from its neighbours' mixture
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = None
    for _ in range(150):
        recon, kl = model.loss(target, c)
        loss = recon + 1e-3 * kl
        first = first if first is not None else recon.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert recon.item() < 0.3 * first
    model.eval()
    full = model.generate(c, mean=True)[:, 0]  # (6, d)
    half = model.generate(c, mean=True, correction_scale=0.5)[:, 0]
    assert not torch.allclose(full, c[:, :d]) and torch.allclose(half, c[:, :d] + 0.5 * (full - c[:, :d]), atol=1e-5)
    assert torch.equal(model.generate(c, mean=True, correction_scale=0.0)[:, 0], c[:, :d])  # mu* itself
    with pytest.raises(ValueError, match="semantic"):
        ICMLoRA(lora_dim=d, cond_dim=d, generator="sg_lora")
    with pytest.raises(ValueError, match="generator"):
        ICMLoRA(lora_dim=d, cond_dim=d, generator="p_diff")


@pytest.fixture(scope="module")
def sg_run(tiny_run, tmp_path_factory):
    """SG-LoRA fit through the CLI on a copy of the tiny run's zoo (its conditions are reused, not rebuilt)."""
    work = tmp_path_factory.mktemp("sg_run")
    shutil.copytree(tiny_run / "zoo", work / "zoo")
    before = {p.name: p.read_bytes() for p in (work / "zoo").iterdir() if p.is_file()}
    common = ["--config", str(TINY), "--data.zoo_dir", str(work / "zoo"), "--data.condition.kind", "semantic",
              "--data.semantic.top_k", "2", "--model.generator", "sg_lora"]
    cli = main(["fit", *common, "--model.kl_weight", "1.0", "--trainer.default_root_dir", str(work)])
    after = {p.name: p.read_bytes() for p in (work / "zoo").iterdir() if p.is_file()}
    assert after == before  # neither LoRAs nor conditions were rebuilt for the new kind
    ckpt = (work / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt").resolve()
    assert ckpt.exists() and cli.model.hparams.generator == "sg_lora"
    return work, common + ["--ckpt_path", str(ckpt)]


def test_a_trained_generator_decodes_with_the_correction_scale_it_is_loaded_with(sg_run):
    """openworld and predict load one checkpoint at the config's scale: 0 gives mu*, 0.5 half the correction."""
    ckpt = sg_run[1][-1]
    full = ICMLoRA.load_from_checkpoint(ckpt, map_location="cpu")
    d = full.hparams.lora_dim
    c = torch.cat([torch.randn(3, d), torch.rand(3, full.hparams.cond_dim - d)], dim=1)  # [mu*, var*]
    out = full.generate(c, mean=True)[:, 0]
    assert not torch.allclose(out, c[:, :d])  # training learned a correction
    none = ICMLoRA.load_from_checkpoint(ckpt, map_location="cpu", correction_scale=0.0).generate(c, mean=True)
    assert torch.equal(none[:, 0], c[:, :d])
    half = ICMLoRA.load_from_checkpoint(ckpt, map_location="cpu", correction_scale=0.5).generate(c, mean=True)
    assert torch.allclose(half[:, 0], c[:, :d] + 0.5 * (out - c[:, :d]), atol=1e-5)


def test_expert_dropout_redraws_training_conditions_only(sg_run, tmp_path):
    work, common = sg_run
    cli = main(["fit", *common[:-2], "--data.semantic.expert_dropout", "0.5", "--trainer.max_epochs", "1",
                "--trainer.default_root_dir", str(tmp_path)])
    dm = cli.datamodule
    train, val = dm.train_dataloader().dataset, dm.val_dataloader().dataset
    task = train.items[0][0]
    draws = torch.stack([train[0]["condition"] for _ in range(40)])
    assert len(torch.unique(draws, dim=0)) > 1  # redrawn for every item
    i = next(i for i, (t, _) in enumerate(val.items) if t == task)
    assert torch.equal(val[i]["condition"], dm.conditions[task])  # validation keeps the fixed leave-self-out one


def test_predict_description_writes_a_peft_folder_naming_its_experts(sg_run, capsys):
    work, common = sg_run
    out = work / "adapters"
    main(["predict", *common, "--writer.output_dir", str(out), "--num_samples", "2",
          "--description", "Legal contracts for software licences"])
    printed = capsys.readouterr().out
    assert "experts legal (alpha" in printed
    folder = out / "Legal_contracts_for_software_licences" / "sample_00"
    assert (folder.parent / "sample_01" / "adapter_model.safetensors").exists()
    info = files.read_json(folder / "generation.json")
    assert info["generator"] == "sg_lora" and info["experts"][0]["task"] == "legal"
    assert sum(e["alpha"] for e in info["experts"]) == pytest.approx(1.0)
    assert info["best_similarity"] >= info["threshold"]
    config = files.read_json(folder / "adapter_config.json")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        bare = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, folder)(input_ids=ids).logits  # plain PEFT, as it is
    assert not torch.allclose(bare, tuned)


@pytest.mark.parametrize("description", ["", "   ", "qZx9!kP@3vL#m2wQ&8rT", "東京の天気と日本の料理について"],
                         ids=["empty", "blank", "random", "japanese"])
def test_uncovered_descriptions_are_refused_in_one_line(sg_run, description):
    work, common = sg_run
    out = work / "refused"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *common, "--writer.output_dir", str(out), "--description", description])
    message = str(exit_info.value.code)
    assert message.startswith("icm_lora: ") and "\n" not in message and "no adapter written" in message
    assert not out.exists()


def test_allow_far_generates_with_a_warning(sg_run):
    work, common = sg_run
    out = work / "far"
    with pytest.warns(UserWarning, match="generating anyway"):
        main(["predict", *common, "--writer.output_dir", str(out), "--description", "qZx9!kP@3vL#m2wQ&8rT",
              "--allow_far", "true"])
    info = files.read_json(next(out.glob("*/sample_00/generation.json")))
    assert info["best_similarity"] < info["threshold"]


def test_python_api_returns_folders_and_peft_models(sg_run):
    work, common = sg_run
    ckpt = common[common.index("--ckpt_path") + 1]
    overrides = [a for a in common[2:] if a != ckpt and a != "--ckpt_path"]
    folders = generate_adapters(TINY, ckpt, description="Python programs and modules", tasks=["mathematics"],
                                output_dir=work / "api", num_samples=2, overrides=overrides)
    assert sorted(folders) == ["Python_programs_and_modules", "mathematics"]
    assert [f.name for f in folders["mathematics"]] == ["sample_00", "sample_01"]
    model = load_generated(folders["Python_programs_and_modules"][0])
    assert isinstance(model, PeftModel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FarDescription):
            generate_adapters(TINY, ckpt, description="qZx9!kP@3vL#m2wQ&8rT", output_dir=work / "api_far",
                              overrides=overrides)
    assert not (work / "api_far").exists()


def test_a_task_vector_generator_asks_for_examples(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    ckpt = tiny_run / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt"
    with pytest.raises(SystemExit, match="^icm_lora: task .*needs 'examples'"):
        main(["predict", "--config", str(TINY), "--data.zoo_dir", str(tiny_run / "zoo"), "--ckpt_path", str(ckpt),
              "--description", "Legal contracts", "--writer.output_dir", str(tiny_run / "desc")])


def test_sg_lora_yaml_shares_the_openworld_zoo_and_settings():
    import yaml

    from conftest import ROOT

    sg = yaml.safe_load((ROOT / "experiments" / "sg_lora.yaml").read_text())
    ow = yaml.safe_load((ROOT / "experiments" / "openworld.yaml").read_text())
    for key in ("zoo_dir", "base_model", "tasks", "text", "lora", "training", "semantic", "normalization"):
        assert sg["data"][key] == ow["data"][key], key  # the same zoo entries, never a rebuild
    assert {k: v for k, v in sg["data"]["condition"].items() if k != "kind"} == \
        {k: v for k, v in ow["data"]["condition"].items() if k != "kind"}
    assert sg["data"]["condition"]["kind"] == "semantic"
    for key, value in ow["openworld"]["kind_changes"]["semantic"].items():
        assert sg["model"][key.split(".", 1)[1]] == value, key  # the settings scored in the benchmark
