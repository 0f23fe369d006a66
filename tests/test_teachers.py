"""EDM preconditioning, the analytic mixture teacher, checkpoints and teacher training."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from distillbench.data.digits import DigitsDataModule
from distillbench.errors import ConfigError
from distillbench.nets import MLPBackbone, UNetBackbone
from distillbench.teachers.analytic import AnalyticMixtureDenoiser, GaussianMixture, analytic_teacher
from distillbench.teachers.checkpoint import load_denoiser, save_denoiser
from distillbench.teachers.denoiser import EDMDenoiser, edm_coefficients
from distillbench.teachers.training import TeacherTraining, edm_loss
from distillbench.utils.ema import ema_beta, update_ema


def tiny_unet_spec(num_classes: int = 10) -> dict:
    return {
        "_target_": "distillbench.teachers.denoiser.EDMDenoiser",
        "net": {
            "_target_": "distillbench.nets.UNetBackbone",
            "sample_size": 8,
            "in_channels": 1,
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "num_classes": num_classes,
        },
        "sample_shape": [1, 8, 8],
        "num_classes": num_classes,
    }


@pytest.mark.parametrize("sigma", [0.002, 0.3, 1.0, 80.0])
def test_edm_coefficients_match_the_formulas(sigma):
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor(sigma), sd)
    assert c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2), rel=1e-6)
    assert c_out.item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2), rel=1e-6)
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + sd**2), rel=1e-6)
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4, rel=1e-6, abs=1e-7)


class RecordingNet(torch.nn.Module):
    """F that records its inputs and returns a constant, to check the preconditioning wiring."""

    def forward(self, x, c_noise, labels=None):
        self.seen = (x.clone(), c_noise.clone())
        return torch.ones_like(x)


def test_edm_denoiser_applies_preconditioning():
    net = RecordingNet()
    d = EDMDenoiser(net, sample_shape=(2,), sigma_data=0.5)
    x = torch.randn(3, 2)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = d(x, sigma)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma[:, None], 0.5)
    torch.testing.assert_close(net.seen[0], c_in * x)
    torch.testing.assert_close(net.seen[1], c_noise.flatten())
    torch.testing.assert_close(out, c_skip * x + c_out)
    torch.testing.assert_close(d.score(x, sigma), (out - x) / sigma[:, None] ** 2)


def test_preconditioning_stays_in_fp32_under_bf16_autocast():
    """trainer.precision=bf16-mixed runs the backbone in bf16; c_skip·x + c_out·F stays in fp32."""
    d = EDMDenoiser(MLPBackbone(dim=2, hidden=32), sample_shape=(2,), sigma_data=0.5)
    x = torch.randn(64, 2) * 3
    sigma = torch.full((64,), 0.002)  # c_skip ≈ 1: D(x) ≈ x, to fp32 rather than bf16 (2⁻⁸) accuracy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(x, sigma)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, d(x, sigma), rtol=0, atol=1e-3)  # only c_out·F (c_out ≈ 0.002) is bf16
    assert (x.to(torch.bfloat16).float() - x).abs().max() > 1e-2, "x itself in bf16 would be 10× further off"


def test_analytic_denoiser_matches_monte_carlo_posterior_mean():
    mixture = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], [0.2, 0.4], [0.3, 0.7])
    denoiser = AnalyticMixtureDenoiser(mixture)
    g = torch.Generator().manual_seed(0)
    x0, _ = mixture.sample(400_000, rng=g)
    sigma = 0.7
    xs = x0 + sigma * torch.randn(x0.shape, generator=g)
    query = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.2, -0.3]])
    for q in query:  # E[x0 | x_σ ≈ q] by kernel-weighted Monte Carlo in a small ball
        near = (xs - q).norm(dim=1) < 0.08
        mc = x0[near].double().mean(0)
        exact = denoiser(q[None], sigma)[0].double()
        assert near.sum() > 300
        torch.testing.assert_close(exact, mc, atol=0.04, rtol=0)


def test_analytic_teacher_needs_a_mixture():
    with pytest.raises(ConfigError, match="data=toy2d"):
        analytic_teacher(DigitsDataModule())


def test_checkpoint_round_trip_and_shape_check(tmp_path):
    import hydra

    spec = tiny_unet_spec()
    denoiser = hydra.utils.instantiate(spec)
    save_denoiser(denoiser, spec, tmp_path / "t", info={"data": "digits"})
    loaded = load_denoiser(tmp_path / "t", datamodule=DigitsDataModule())
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5), torch.arange(4)
    torch.testing.assert_close(loaded(x, sigma, labels), denoiser.eval()(x, sigma, labels))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.info["data"] == "digits"

    class Mnist32:
        name, sample_shape, num_classes = "mnist", (1, 32, 32), 10

    with pytest.raises(ConfigError, match=r"\(1, 8, 8\).*\(1, 32, 32\)"):
        load_denoiser(tmp_path / "t", datamodule=Mnist32())


def test_missing_checkpoint_names_what_it_expected(tmp_path):
    with pytest.raises(ConfigError, match="teacher.yaml and model.safetensors"):
        load_denoiser(tmp_path)


def test_ema_beta_follows_edm_rampup():
    assert ema_beta(128, nimg=0, halflife_kimg=20) == pytest.approx(0.0, abs=1e-12)
    late = ema_beta(128, nimg=10_000_000, halflife_kimg=20)
    assert late == pytest.approx(0.5 ** (128 / 20_000))
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.clone()
    update_ema(a, b, 0.5)
    torch.testing.assert_close(a.weight, 0.5 * (before + b.weight))


def test_unet_backbone_unconditional_path_uses_null_token():
    net = UNetBackbone(8, 1, (8, 16), 1, num_classes=10, norm_num_groups=4)
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    null = net(x, c, torch.full((2,), 10))
    torch.testing.assert_close(net(x, c, None), null)
    assert not torch.allclose(net(x, c, torch.tensor([1, 2])), null)


def test_edm_loss_is_per_sample_and_finite():
    d = EDMDenoiser(MLPBackbone(2, 32, 2, 16), sample_shape=(2,))
    loss = edm_loss(d, torch.randn(16, 2), None)
    assert loss.shape == (16,) and torch.isfinite(loss).all()


def test_200_teacher_steps_on_digits_lower_the_loss():
    import hydra
    import lightning as L

    torch.manual_seed(0)
    denoiser = hydra.utils.instantiate(OmegaConf.create(tiny_unet_spec()))
    module = TeacherTraining(denoiser, lr=2e-3)
    dm = DigitsDataModule(batch_size=64)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=200,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(module, datamodule=dm)
    assert len(losses) == 200
    first, last = sum(losses[:40]) / 40, sum(losses[-40:]) / 40
    assert last < 0.8 * first, (first, last)
    assert not torch.equal(module.ema.net.unet.conv_in.weight, module.denoiser.net.unet.conv_in.weight)
