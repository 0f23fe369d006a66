"""DiffusersDenoiser: VP ↔ VE conversion of diffusers ε/v/x₀ models, loading, conditioning, freezing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from distillbench.teachers.diffusers_adapter import DiffusersDenoiser

CONF = Path(__file__).resolve().parents[1] / "conf"
T = 1000


def scheduler(**kw) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", **kw)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny UNets run ~100× slower with 2 intra-op threads on the shared, busy CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    """A standalone tiny UNet2DModel folder with its scheduler_config.json beside it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ddpm")
    UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).save_pretrained(path)
    scheduler().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A pipeline-like folder: model_index.json, unet/ (a tiny UNet2DConditionModel), scheduler/."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pipe")
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(path / "unet")
    scheduler(prediction_type="v_prediction").save_pretrained(path / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def teacher(unet_dir):
    return DiffusersDenoiser.from_pretrained(unet_dir)


def table_sigma(i: int) -> float:
    abar = scheduler().alphas_cumprod.double()[i]
    return float(((1 - abar) / abar).sqrt())


class FakeModel(nn.Module):
    """A parameter-free "model": ε̂ = tanh(z) + t/T, returned as ε, v or x₀ at the adapter's σ(t)."""

    def __init__(self, sigma_of_t, prediction_type: str):
        super().__init__()
        self.sigma_of_t, self.prediction_type = sigma_of_t, prediction_type

    def forward(self, z, t):
        sigma = self.sigma_of_t(t).reshape(-1, *([1] * (z.ndim - 1)))
        alpha = (1 + sigma**2).rsqrt()
        sigma_vp = sigma * alpha
        eps = torch.tanh(z) + t.reshape(-1, *([1] * (z.ndim - 1))) / T
        x0 = (z - sigma_vp * eps) / alpha
        outputs = {"epsilon": eps, "v_prediction": alpha * eps - sigma_vp * x0, "sample": x0}
        return outputs[self.prediction_type]


class GaussianOracle(nn.Module):
    """The exact ε- or v-prediction E[·|z_t] for x₀ ~ N(μ, s²) per element, at a discrete timestep t."""

    def __init__(self, mu: float, s: float, prediction_type: str):
        super().__init__()
        self.mu, self.s, self.prediction_type = mu, s, prediction_type
        self.abar = scheduler().alphas_cumprod.double()

    def forward(self, z, t):
        abar = self.abar[t.round().long()].reshape(-1, 1)
        alpha, sigma_vp = abar.sqrt(), (1 - abar).sqrt()
        z = z.double()
        var_z = alpha**2 * self.s**2 + sigma_vp**2  # z ~ N(α μ, α² s² + σ_vp²)
        eps = sigma_vp * (z - alpha * self.mu) / var_z
        x0 = self.mu + alpha * self.s**2 * (z - alpha * self.mu) / var_z
        return (eps if self.prediction_type == "epsilon" else alpha * eps - sigma_vp * x0).float()


def test_sigma_table_inverts_and_is_monotone(teacher):
    assert (teacher.log_sigmas.diff() > 0).all()
    assert teacher.sigma_min == pytest.approx(table_sigma(0), rel=1e-5)
    assert teacher.sigma_max == pytest.approx(table_sigma(T - 1), rel=1e-5)
    t = torch.cat([torch.arange(T, dtype=torch.float32), torch.rand(200) * (T - 1)])
    assert torch.allclose(teacher.t_of_sigma(teacher.sigma_of_t(t)), t, atol=1e-4, rtol=0)
    assert teacher.sigma_of_t(torch.tensor([10.0, 500.0])).tolist() == pytest.approx(
        [table_sigma(10), table_sigma(500)], rel=1e-5
    )
    assert teacher.t_of_sigma(torch.tensor([1e-4, 1e4])).tolist() == [0.0, T - 1]


def test_eps_prediction_matches_hand_formula(teacher):
    x, i = torch.randn(2, 3, 8, 8), 500
    sigma = table_sigma(i)
    eps = teacher.model(x / (1 + sigma**2) ** 0.5, torch.full((2,), float(i))).sample
    assert torch.allclose(teacher(x, sigma), x - sigma * eps, atol=1e-5)


def test_v_prediction_matches_hand_formula(unet_dir):
    den = DiffusersDenoiser.from_pretrained(unet_dir, prediction_type="v_prediction")
    x, i = torch.randn(2, 3, 8, 8), 300
    sigma = table_sigma(i)
    alpha = (1 + sigma**2) ** -0.5
    v = den.model(alpha * x, torch.full((2,), float(i))).sample
    assert torch.allclose(den(x, sigma), alpha**2 * x - sigma * alpha * v, atol=1e-5)


def test_eps_v_and_sample_adapters_agree(teacher):
    x, sigma = torch.randn(4, 3, 8, 8), torch.tensor([0.05, 0.7, 3.3, 40.0])
    outs = []
    for kind in ("epsilon", "v_prediction", "sample"):
        den = DiffusersDenoiser(nn.Identity(), scheduler().alphas_cumprod, kind, sample_shape=(3, 8, 8))
        den.model = FakeModel(den.sigma_of_t, kind)
        outs.append(den(x, sigma))
    assert torch.allclose(outs[0], outs[1], atol=1e-4) and torch.allclose(outs[0], outs[2], atol=1e-4)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_gaussian_oracle_gives_exact_posterior_mean(kind):
    mu, s = 0.3, 0.6
    den = DiffusersDenoiser(GaussianOracle(mu, s, kind), scheduler().alphas_cumprod, kind, sample_shape=(16,))
    for i in (0, 20, 250, 600, T - 1):
        sigma = table_sigma(i)
        x = mu + (s**2 + sigma**2) ** 0.5 * torch.randn(64, 16)
        exact = mu + s**2 / (s**2 + sigma**2) * (x - mu)
        assert torch.allclose(den(x, sigma), exact, atol=1e-4 * max(1.0, sigma)), i


def test_conditional_pipeline_folder(pipe_dir):
    cond, uncond = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    den = DiffusersDenoiser.from_pretrained(pipe_dir, sigma_data=1.0, encoder_hidden_states=cond)
    assert den.prediction_type == "v_prediction" and den.sample_shape == (4, 8, 8) and den.sigma_data == 1.0
    x = torch.randn(2, 4, 8, 8)
    d_cond = den(x, 2.0)
    assert d_cond.shape == x.shape and torch.isfinite(d_cond).all()
    d_uncond = den(x, 2.0, encoder_hidden_states=uncond.expand(2, -1, -1))
    assert not torch.allclose(d_cond, d_uncond)
    guided = DiffusersDenoiser(
        den.model,
        scheduler().alphas_cumprod,
        "v_prediction",
        encoder_hidden_states=cond,
        uncond_hidden_states=uncond,
        guidance_scale=3.0,
    )
    assert torch.allclose(guided(x, 2.0), d_uncond + 3.0 * (d_cond - d_uncond), atol=1e-4)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        DiffusersDenoiser.from_pretrained(pipe_dir)(x, 2.0)


def test_separate_scheduler_folder_and_bf16(unet_dir, pipe_dir):
    den = DiffusersDenoiser.from_pretrained(unet_dir, scheduler_path=pipe_dir, torch_dtype="bfloat16")
    assert den.prediction_type == "v_prediction" and den.model.dtype == torch.bfloat16
    x = torch.randn(2, 3, 8, 8)
    out = den(x, 1.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_missing_unet_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        DiffusersDenoiser.from_pretrained(tmp_path)


def test_teacher_is_frozen(teacher):
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_hydra_config_instantiates(unet_dir):
    cfg = OmegaConf.load(CONF / "teacher" / "diffusers.yaml")
    assert cfg.path_or_repo == "google/ddpm-cifar10-32"
    den = instantiate(cfg, path_or_repo=str(unet_dir))
    assert isinstance(den, DiffusersDenoiser) and den.sample_shape == (3, 8, 8)
