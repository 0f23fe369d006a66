"""EDM's SongUNet (DDPM++) and ``python -m distillbench.convert_edm``, offline on tiny random networks.

The NVlabs names and counts below were read off NVlabs/edm ``training/networks.py`` (SongUNet at the TINY
settings, label_dim 10, augment_dim 9): 149 state_dict entries, 189,667 parameters.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from distillbench import convert_edm
from distillbench.nets.__main__ import PRESETS, parameter_count
from distillbench.nets.songunet import SongUNet
from distillbench.teachers.checkpoint import load_denoiser
from distillbench.teachers.denoiser import EDMDenoiser
from tests.conftest import ROOT

TINY = dict(img_resolution=8, in_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], augment_dim=9, dropout=0.13)  # fmt: skip
NVLABS_SHAPES = {  # name -> shape in NVlabs' SongUNet at TINY settings with 10 classes
    "map_label.weight": (16, 10),
    "map_augment.weight": (16, 9),
    "map_layer0.weight": (64, 16),
    "map_layer1.bias": (64,),
    "enc.8x8_conv.weight": (16, 3, 3, 3),
    "enc.8x8_block0.norm0.weight": (16,),
    "enc.8x8_block0.affine.weight": (16, 64),
    "enc.4x4_down.conv0.weight": (16, 16, 3, 3),
    "enc.4x4_down.conv0.resample_filter": (1, 1, 2, 2),
    "enc.4x4_down.skip.resample_filter": (1, 1, 2, 2),
    "enc.4x4_block0.skip.weight": (32, 16, 1, 1),
    "enc.4x4_block0.qkv.weight": (96, 32, 1, 1),
    "enc.4x4_block0.proj.bias": (32,),
    "dec.4x4_in0.norm2.weight": (32,),
    "dec.4x4_in1.conv1.weight": (32, 32, 3, 3),
    "dec.4x4_block1.norm0.weight": (48,),
    "dec.8x8_up.conv0.resample_filter": (1, 1, 2, 2),
    "dec.8x8_block0.conv0.weight": (16, 48, 3, 3),
    "dec.8x8_aux_norm.weight": (16,),
    "dec.8x8_aux_conv.weight": (3, 16, 3, 3),
}
NVLABS_ABSENT = ("map_augment.bias", "enc.8x8_block0.skip.weight", "dec.4x4_in1.qkv.weight",
                 "enc.8x8_block0.conv0.resample_filter", "dec.4x4_block0.qkv.weight")  # fmt: skip


def test_tiny_songunet_has_nvlabs_names_and_runs_with_and_without_labels():
    net = SongUNet(**TINY, num_classes=10).eval()
    state = net.state_dict()
    assert (len(state), sum(p.numel() for p in net.parameters())) == (149, 189_667)
    assert not [k for k in state if k.startswith("map_noise")]
    assert {k: tuple(state[k].shape) for k in NVLABS_SHAPES} == NVLABS_SHAPES
    assert not set(NVLABS_ABSENT) & set(state)
    assert list(net.enc) == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_block0"]
    assert list(net.dec)[-3:] == ["8x8_block1", "8x8_aux_norm", "8x8_aux_conv"]

    with torch.no_grad():
        for p in net.parameters():  # EDM's near-zero output layers would hide the conditioning
            p.add_(0.1 * torch.randn_like(p))
        x, c_noise, labels = torch.randn(3, 3, 8, 8), torch.randn(3), torch.tensor([0, 7, 3])
        out = net(x, c_noise, labels)
        onehot = torch.nn.functional.one_hot(labels, 10).float()
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert torch.equal(net(x, c_noise, onehot), out)
        assert not torch.allclose(net(x, c_noise, labels.flip(0)), out)
        null = net(x, c_noise, None)
        assert torch.equal(net(x, c_noise, torch.tensor([10, -1, 10])), null)  # the "no label" token, -1
        assert torch.equal(net(x, c_noise, torch.zeros(1, 10)), null)
        assert not torch.allclose(net(x, c_noise, labels, torch.randn(3, 9)), out)
        uncond = SongUNet(**TINY).eval()
        assert uncond.map_label is None and uncond(x, c_noise).shape == x.shape


def test_the_cifar10_preset_has_the_parameter_count_its_comment_gives():
    comment = (PRESETS / "ddpmpp_cifar10.yaml").read_text()
    recorded = int(re.search(r"([\d,]+) parameters", comment).group(1).replace(",", ""))
    assert parameter_count("ddpmpp_cifar10") == recorded == 55_733_891  # EDM: ~56M


STANDIN = '''
    """Stand-in for NVlabs/edm's training/networks.py: what the converter reads, nothing more."""
    import torch

    import dnnlib  # noqa: F401  (the real module cannot import without NVlabs' packages either)
    import torch_utils  # noqa: F401
    from distillbench.nets.songunet import SongUNet


    class EDMPrecond(torch.nn.Module):
        def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                     sigma_max=float("inf"), sigma_data=0.5, model_type="SongUNet", **model_kwargs):
            super().__init__()
            self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels,
                                    label_dim=label_dim, use_fp16=use_fp16, sigma_min=sigma_min,
                                    sigma_max=sigma_max, sigma_data=sigma_data, model_type=model_type,
                                    **model_kwargs)
            self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
            self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
            self.model = SongUNet(img_resolution, img_channels, img_channels, num_classes=label_dim,
                                  **model_kwargs)

        def forward(self, x, sigma, class_labels=None):
            sigma = sigma.reshape(-1, 1, 1, 1)
            if self.label_dim and class_labels is None:
                class_labels = torch.zeros(1, self.label_dim)
            scale = (sigma**2 + self.sigma_data**2).sqrt()
            f = self.model(x / scale, sigma.log().flatten() / 4, class_labels)
            return self.sigma_data**2 / scale**2 * x + sigma * self.sigma_data / scale * f


    class VPPrecond(EDMPrecond):
        pass
'''


@pytest.fixture
def edm_standin(tmp_path):
    """NVlabs' module layout (training.networks, torch_utils, dnnlib) importable for the test's duration."""
    root = tmp_path / "edm"
    for package in ("training", "torch_utils", "dnnlib"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "training" / "networks.py").write_text(textwrap.dedent(STANDIN))
    sys.path.insert(0, str(root))
    try:
        from training import networks

        yield root, networks
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] in convert_edm.EDM_PACKAGES]:
            del sys.modules[name]


def converter(pkl, out, *pythonpath) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(ROOT / "src")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "distillbench.convert_edm", f"pkl={pkl}", f"out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_an_edm_pickle_converts_to_a_teacher_with_the_same_weights_and_outputs(edm_standin, tmp_path, capsys):
    root, networks = edm_standin
    kwargs = {k: v for k, v in TINY.items() if k != "in_channels"}
    precond = networks.EDMPrecond(img_channels=3, label_dim=10, model_type="SongUNet", **kwargs).eval()
    with torch.no_grad():
        for p in precond.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pkl = tmp_path / "edm-tiny-cond.pkl"
    pkl.write_bytes(pickle.dumps({"ema": precond, "loss_fn": None}))
    vp = tmp_path / "vp.pkl"
    vp.write_bytes(pickle.dumps({"ema": networks.VPPrecond(img_channels=3, **kwargs)}))

    proc = converter(pkl, tmp_path / "teacher", root)
    assert proc.returncode == 0, proc.stderr
    assert "max |D - D_edm|" in proc.stdout and "teacher=checkpoint" in proc.stdout

    teacher = load_denoiser(tmp_path / "teacher")
    assert isinstance(teacher, EDMDenoiser) and isinstance(teacher.net, SongUNet)
    assert (teacher.sample_shape, teacher.num_classes, teacher.sigma_data) == ((3, 8, 8), 10, 0.5)
    assert (teacher.sigma_min, teacher.sigma_max) == (
        0.002,
        80.0,
    )  # EDM's range clipped to the pickle's [0, ∞)
    assert teacher.info["edm_class"] == "EDMPrecond" and teacher.info["max_abs_difference"] < 1e-5
    ours, theirs = teacher.net.state_dict(), precond.model.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    sigma, labels = torch.tensor([0.05, 1.0, 20.0]), torch.tensor([2, 9, 5])
    x = torch.randn(3, 3, 8, 8) * (0.5 + sigma.reshape(-1, 1, 1, 1))
    with torch.no_grad():
        d = teacher(x, sigma, labels)
        s = sigma.reshape(-1, 1, 1, 1)
        f = precond.model(x / (s**2 + 0.25).sqrt(), sigma.log() / 4, labels)
        by_hand = 0.25 / (s**2 + 0.25) * x + s * 0.5 / (s**2 + 0.25).sqrt() * f
        torch.testing.assert_close(d, by_hand, rtol=1e-5, atol=1e-6)
        onehot = torch.nn.functional.one_hot(labels, 10).float()
        torch.testing.assert_close(d, precond(x, sigma, onehot), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(teacher(x, sigma, None), precond(x, sigma), rtol=1e-5, atol=1e-6)

    assert convert_edm.main([f"pkl={vp}", f"out={tmp_path / 'vp'}"]) == 2
    assert "VPPrecond" in capsys.readouterr().err and not (tmp_path / "vp").exists()

    missing = converter(pkl, tmp_path / "nowhere")
    assert missing.returncode == 2 and not (tmp_path / "nowhere").exists()
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "https://github.com/NVlabs/edm" in missing.stderr and "PYTHONPATH" in missing.stderr


def test_the_converter_explains_bad_arguments(capsys):
    assert convert_edm.main(["pkl=a.pkl"]) == 2
    assert "missing out" in capsys.readouterr().err
    assert convert_edm.main(["pkl=/no/such.pkl", "out=x"]) == 2
    assert "no file /no/such.pkl" in capsys.readouterr().err
    assert convert_edm.main(["pkl=a", "out=b", "weights=c"]) == 2
    assert "unknown argument 'weights=c'" in capsys.readouterr().err
