import pytest
import torch
from torch.distributions import Normal, kl_divergence

from icm_lora.cvae import CVAE, kl_standard_normal
from icm_lora.system import ICMLoRA, kl_beta, mixup


def test_kl_matches_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    ours = kl_standard_normal(mu, logvar)
    q, p = Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(ours, kl_divergence(q, p).sum(-1).mean(), atol=1e-5)
    assert kl_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4)) == 0


@pytest.mark.parametrize("dim", [100, 512, 1000])
def test_shapes_and_padding(dim):
    model = CVAE(dim, cond_dim=6, latent_dim=8, channels=(4, 8, 8), kernel_size=3)
    w, c = torch.randn(4, dim), torch.randn(4, 6)
    mu, logvar = model.encode(w, c)
    assert mu.shape == logvar.shape == (4, 8)
    assert model.decode(mu, c).shape == (4, dim)
    recon, kl = model.loss(w, c)
    assert recon.ndim == kl.ndim == 0 and torch.isfinite(recon + kl)
    assert model.generate(c, num_samples=3).shape == (4, 3, dim)


def test_paper_architecture_has_twelve_blocks():
    model = CVAE(30_720, cond_dim=576)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv1d)]
    assert len(convs) == 12 and model.padded_dim == 32_768 and model.feature_shape == (8, 8)


def test_mean_decode_is_deterministic_and_condition_matters():
    torch.manual_seed(0)
    model = CVAE(64, cond_dim=3, latent_dim=4, channels=(4, 4), kernel_size=3).eval()
    c = torch.randn(2, 3)
    a, b = model.generate(c, 2, mean=True), model.generate(c, 2, mean=True)
    assert torch.equal(a, b) and torch.equal(a[:, 0], a[:, 1])
    assert not torch.allclose(a[0], a[1])  # different conditions decode differently
    s = model.generate(c, 2)
    assert not torch.allclose(s[:, 0], s[:, 1])  # samples differ


def test_the_generator_learns_a_condition_to_weights_map():
    torch.manual_seed(0)
    targets, conds = torch.randn(3, 128), torch.eye(3)
    model = CVAE(128, cond_dim=3, latent_dim=4, channels=(8, 8), kernel_size=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(600):
        recon, kl = model.loss(targets, conds)
        (recon + 1e-3 * kl).backward()
        opt.step()
        opt.zero_grad()
    out = model.eval().generate(conds, 1, mean=True)[:, 0]
    assert torch.nn.functional.mse_loss(out, targets) < 0.1 * targets.var()


def test_kl_schedules():
    assert kl_beta(0, 0.5, "constant", 10, 10) == 0.5
    assert kl_beta(0, 0.5, "linear", 10, 10) == 0 and kl_beta(5, 0.5, "linear", 10, 10) == 0.25
    assert kl_beta(50, 0.5, "linear", 10, 10) == 0.5
    assert kl_beta(12, 1.0, "cyclical", 0, 10) == pytest.approx(0.4)
    assert kl_beta(18, 1.0, "cyclical", 0, 10) == 1.0 and kl_beta(20, 1.0, "cyclical", 0, 10) == 0
    with pytest.raises(ValueError):
        kl_beta(0, 1.0, "sigmoid", 1, 1)


def _fit(model: CVAE, targets: torch.Tensor, conds: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        recon, kl = model.loss(targets, conds)
        (recon + 1e-3 * kl).backward()
        opt.step()
        opt.zero_grad()
    out = model.eval().generate(conds, 1, mean=True)[:, 0]
    return torch.nn.functional.mse_loss(out, targets).item()


def test_the_dense_head_writes_what_shared_conv_kernels_cannot():
    torch.manual_seed(0)
    targets, conds = torch.randn(4, 2048), torch.eye(4)  # every stretch of every task different
    arch = dict(cond_dim=4, latent_dim=4, channels=(4, 4, 4, 4), kernel_size=3)
    conv_only = _fit(CVAE(2048, **arch), targets, conds, 300)
    torch.manual_seed(0)
    with_head = _fit(CVAE(2048, **arch, dense_rank=8), targets, conds, 300)
    assert conv_only > 0.9 * targets.var() and with_head < 0.25 * conv_only
    with pytest.raises(ValueError, match="dense_rank"):
        CVAE(64, cond_dim=2, dense_rank=-1)


def test_mixup_blends_each_row_with_another_by_one_lambda_for_weights_and_condition():
    torch.manual_seed(0)
    b = 16
    weights, condition = torch.eye(b), 3 * torch.eye(b) + 1  # row i: one-hot at i, so its blend can be read off
    w, c = mixup(weights, condition, alpha=0.4)
    for i in range(b):
        lam = w[i, i].item()
        assert 0 <= lam <= 1
        j = i if lam == 1 else int((w[i] - lam * weights[i]).argmax())
        assert torch.allclose(w[i], lam * weights[i] + (1 - lam) * weights[j], atol=1e-6)
        assert torch.allclose(c[i], lam * condition[i] + (1 - lam) * condition[j], atol=1e-6)
    assert not torch.allclose(w, weights)  # something was mixed
    with pytest.raises(ValueError, match="mixup"):
        ICMLoRA(lora_dim=8, cond_dim=2, mixup=-0.1)


def _fit_two_tasks(alpha: float) -> tuple[CVAE, torch.Tensor]:
    torch.manual_seed(0)
    targets, conds = torch.randn(2, 256), torch.eye(2)  # (task, D), (task, C)
    model = CVAE(256, cond_dim=2, latent_dim=4, channels=(4, 4), kernel_size=3, dense_rank=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(600):
        w, c = targets.repeat(8, 1), conds.repeat(8, 1)  # (16, D), (16, C)
        if alpha:
            w, c = mixup(w, c, alpha)
        recon, kl = model.loss(w, c)
        (recon + 1e-2 * kl).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), targets


def test_mixup_teaches_the_generator_that_between_conditions_decode_to_blends():
    model, targets = _fit_two_tasks(alpha=1.0)
    for t in (0.0, 0.25, 0.5, 1.0):
        out = model.generate(torch.tensor([[t, 1 - t]]), 1, mean=True)[0, 0]
        blend = t * targets[0] + (1 - t) * targets[1]
        assert torch.nn.functional.mse_loss(out, blend) < 0.05 * targets.var()
