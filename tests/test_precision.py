"""What makes the score methods fast on a GPU, checked on the CPU: bf16 autocast keeps the losses of fp32,
channels_last keeps the outputs, an update inside autocast is seen by the next forward, and the sync-free
guards (masked mean, flat gradient repair, host counters) count and repair as the checked ones do."""

from __future__ import annotations

import pytest
import torch

from distillbench.methods import SIM, SiD
from distillbench.methods.base import repair_flat
from distillbench.nets.songunet import SongUNet
from distillbench.teachers.denoiser import EDMDenoiser, freeze

TINY = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
            dropout=0.0)  # fmt: skip


def songunet_teacher(memory_format=torch.contiguous_format) -> EDMDenoiser:
    torch.manual_seed(0)
    net = SongUNet(**TINY)
    for p in net.parameters():  # EDM starts the last layers near zero; random weights exercise every layer
        torch.nn.init.normal_(p, std=0.1)
    return freeze(EDMDenoiser(net.to(memory_format=memory_format), sample_shape=(3, 8, 8)))


@pytest.mark.parametrize("cls", [SiD, SIM])
def test_bf16_autocast_losses_match_fp32(cls):
    method = cls(songunet_teacher(), batch_size=16, seed=3)

    def losses():
        x_g = method.generate(method.draw("gen"))
        return method.fake_score_loss(None).mean(), method.generator_loss(x_g, None).mean()

    fp32 = losses()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = losses()
    for low, full in zip(bf16, fp32, strict=True):
        assert low.dtype == torch.float32, "the losses are computed in fp32 from the denoisers' fp32 outputs"
        torch.testing.assert_close(low, full, rtol=3e-2, atol=1e-3)


def test_channels_last_gives_the_same_denoiser_outputs():
    x, sigma = torch.randn(4, 3, 8, 8), torch.tensor([0.1, 1.0, 5.0, 40.0])
    dense, nhwc = songunet_teacher(), songunet_teacher(torch.channels_last)
    assert nhwc.net.enc["8x8_conv"].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x, sigma), dense(x, sigma), rtol=1e-5, atol=1e-5)


def test_an_update_inside_autocast_is_seen_by_the_next_forward():
    """Lightning's autocast spans the whole step; autocast's cached weight casts must not outlive an update
    (a second ψ-update of the same step would otherwise run on the old weights)."""
    method = SiD(songunet_teacher(), batch_size=4)
    method.manual_backward = lambda loss: loss.backward()  # no trainer here
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(4, 8)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = layer(x)
        method.step_optimizer(opt, before.float().square().mean(), layer.parameters())
        after = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = layer(x)
    assert not torch.equal(fresh, before), "the update changed the outputs"
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_finite_mean_drops_and_counts_the_nonfinite_samples():
    method = SiD(songunet_teacher(), batch_size=4)
    per_sample = torch.tensor([1.0, float("nan"), 3.0, float("inf")], requires_grad=True)
    loss = method.finite_mean(per_sample)
    loss.backward()
    assert loss.item() == 2.0 and int(method.dropped_samples) == 2
    assert per_sample.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    none_finite = method.finite_mean(torch.full((3,), float("nan")))
    assert none_finite.item() == 0.0 and int(method.dropped_samples) == 5


def test_the_flat_gradient_repair_matches_the_checked_one():
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (2, 5)]
    grads = [torch.randn(s) for s in shapes]
    grads[0] = grads[0].to(memory_format=torch.channels_last)
    grads[0][1, 2, 0, 1], grads[1][3], grads[2][1, 4] = float("nan"), float("inf"), float("-inf")
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    method = SiD(songunet_teacher(), batch_size=4)
    method.repair_gradients(params)  # on the CPU: the norm check, then tensor by tensor
    flat = [g.clone() for g in grads]
    assert int(repair_flat(flat)) == 3 == int(method.nonfinite_grads)
    for repaired, p in zip(flat, params, strict=True):
        torch.testing.assert_close(repaired, p.grad, rtol=0, atol=0)
    assert flat[1][3] == 1e5 and flat[2][1, 4] == -1e5 and flat[0][1, 2, 0, 1] == 0


def test_host_counters_follow_the_buffers():
    method = SiD(songunet_teacher(), batch_size=4)
    method.advance_count("nimg", 64)
    method.advance_count("gen_steps", 1)
    assert method.count("nimg") == 64.0 and method.kimg == 0.064 and float(method.nimg) == 64.0
    assert method.count("gen_steps") == 1 and int(method.gen_steps) == 1
    state = {k: v.clone() for k, v in method.state_dict().items()}
    method.gen_steps.fill_(7)  # changed behind the host value's back
    assert method.count("gen_steps") == 7
    method.load_state_dict(state)
    assert method.count("gen_steps") == 1 and method.kimg == 0.064


def test_the_trainer_lays_out_and_compiles_every_network_and_keeps_the_checkpoint_names(tmp_path):
    from distillbench.callbacks import KimgBudget
    from distillbench.data.noise import NoiseDataModule
    from distillbench.utils.trainer import Trainer, denoisers

    method = SiD(songunet_teacher(), batch_size=4, seed=3)
    names = set(method.state_dict())
    data = NoiseDataModule(sample_shape=(3, 8, 8), batch_size=4)
    trainer = Trainer(accelerator="cpu", max_steps=-1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[KimgBudget(0.004)],
                      compile=True, channels_last=True, compile_backend="eager")  # fmt: skip
    trainer.fit(method, datamodule=data)
    nets = denoisers(method)
    expected = {id(method.generator), id(method.fake), id(method.ema), id(method.teacher)}
    assert {id(n) for n in nets} >= expected
    for net in nets:
        assert net.net._compiled_call_impl is not None, "compiled in place"
        kernels = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert int(method.gen_steps) == 1
    assert set(method.state_dict()) == names, "parameter names (and so checkpoints) are unchanged"
