"""Direct Distillation: the time-embedded NAFNet, trajectory shards (digits and a tiny Stable Diffusion
pipeline), their data module, the two training stages, k + 1-step sampling and bad settings."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from distillbench.config import CONFIG_DIR
from distillbench.data.trajectories import ShardStream, TrajectoryDataModule
from distillbench.errors import ConfigError, MissingPackageError
from distillbench.make_trajectories import CLIPPromptEncoder, PromptConditioned, write_trajectories
from distillbench.methods.direct import DirectDistillation, time_input
from distillbench.nets.__main__ import parameter_count, preset_names
from distillbench.nets.nafnet import NAFBlock, NAFNet
from distillbench.samplers import DPMSolverPP2MSampler, fixed_labels, fixed_noise, improved, karras
from distillbench.samplers.partial import first_steps, trajectory
from distillbench.teachers.checkpoint import load_denoiser
from distillbench.teachers.denoiser import Denoiser, edm_coefficients
from distillbench.teachers.diffusers_adapter import DiffusersDenoiser
from tests.helpers import run_folder, run_here

ROOT = Path(__file__).resolve().parents[1]
DIGITS_TEACHER = ROOT / "src/distillbench/assets/teachers/digits"
STEPS, INDICES = 4, [1, 2]  # tiny trajectories: N = 4 steps, pairs at k = 1 and 2
TINY = [f"steps={STEPS}", f"indices={INDICES}", "n=16", "shard_size=6", "batch_size=6", "test_fraction=0.25"]


def params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def tiny_nafnet(**kw) -> NAFNet:
    return NAFNet(**{"in_channels": 1, "width": 8, "enc_blocks": [1], "middle_blocks": 1, "dec_blocks": [1],
                     "time_dim": 16, **kw})  # fmt: skip


def make_trajectories(tmp: Path, *overrides: str) -> dict:
    """Run the trajectories command in-process (the digits teacher, TINY settings) into tmp/shards."""
    overrides = ["teacher=digits", *TINY, f"out_dir={tmp / 'shards'}", f"paths.output_dir={tmp / 'run'}",
                 *overrides]  # fmt: skip
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return write_trajectories(hydra_compose(config_name="make_trajectories", overrides=overrides))


@pytest.fixture(scope="module")
def digits_teacher():
    return load_denoiser(DIGITS_TEACHER)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pairs")
    make_trajectories(tmp)
    return tmp / "shards"


# ---- NAFNet ------------------------------------------------------------------------------------------------
def test_every_block_and_so_the_whole_net_start_as_the_identity():
    block = NAFBlock(8, time_dim=16)
    x, emb = torch.randn(3, 8, 4, 4), torch.randn(3, 16)
    assert torch.equal(block(x, emb), x), "β = γ = 0"
    net = tiny_nafnet()
    assert torch.equal(net(x[:, :1], torch.tensor([0.1, 0.5, 2.0])), x[:, :1]), "zero ending conv"


def test_the_time_embedding_changes_the_output_once_the_blocks_are_non_zero():
    net, x = tiny_nafnet(), torch.randn(2, 1, 4, 4)
    times = torch.tensor([-1.0, -1.0]), torch.tensor([0.5, 0.5])
    assert torch.equal(net(x, times[0]), net(x, times[1])), "identity blocks ignore t"
    for name, p in net.named_parameters():
        if name.endswith(("beta", "gamma")) or name.startswith("ending"):
            torch.nn.init.normal_(p, std=0.5)
    outputs = [net(x, t) for t in times]
    assert not torch.allclose(*outputs, atol=1e-4)
    net.time.out.weight.data.zero_()  # no embedding left: a FiLM of bias only, the same for every t
    net.time.out.bias.data.zero_()
    assert torch.allclose(net(x, times[0]), net(x, times[1]))


def test_the_class_embedding_starts_at_zero_and_separates_labels_once_trained():
    net, x = tiny_nafnet(num_classes=3), torch.randn(4, 1, 4, 4)
    for name, p in net.named_parameters():
        if name.endswith(("beta", "gamma")) or name.startswith("ending"):
            torch.nn.init.normal_(p, std=0.5)
    t, labels = torch.zeros(4), torch.tensor([0, 1, 2, -1])
    assert torch.equal(net(x, t, labels), net(x, t, torch.full((4,), -1))), "a zero embedding adds nothing"
    torch.nn.init.normal_(net.label.weight)
    out = net(x[:1].expand(4, -1, -1, -1), t, labels)  # one input, four labels
    assert all(not torch.allclose(out[i], out[j], atol=1e-4) for i, j in itertools.combinations(range(4), 2))
    assert net.label.weight.shape == (4, 16), "three classes and the unlabelled row (−1)"
    with pytest.raises(ValueError, match="num_classes=3: pass labels"):
        net(x, t)


def test_dropout_acts_in_training_only_and_sampling_leaves_the_modes_as_they_were(digits_teacher):
    method = direct(digits_teacher, k=2, net=tiny_nafnet(dropout=0.5), refiner=tiny_nafnet(dropout=0.5))
    for name, p in method.net.named_parameters():
        if name.endswith(("beta", "gamma")) or name.startswith("ending"):
            torch.nn.init.normal_(p, std=0.5)
    x, t = torch.randn(2, 1, 8, 8), torch.zeros(2)
    assert not torch.equal(method.net(x, t), method.net(x, t)), "training mode: dropout"
    z = fixed_noise(2, (1, 8, 8), seed=0)
    assert torch.equal(method.sample(z), method.sample(z)), "sampling: no dropout"
    assert method.net.training and method.refiner.training


def test_preconditioning_reads_the_state_at_unit_scale_and_keeps_x_k_s_skip(digits_teacher):
    x_k, sigma, labels = 5 * torch.randn(3, 1, 8, 8), torch.tensor([5.0, 1.0, 0.2]), torch.tensor([0, 1, 2])
    seen = []
    net = tiny_nafnet()
    net.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    method = direct(digits_teacher, net=net)
    c_skip, c_out, c_in, _ = (c[:, None, None, None] for c in edm_coefficients(sigma, 0.5))
    x_hat = method.student(net, x_k, sigma, labels)  # an identity net: F(c_in·x) = c_in·x
    torch.testing.assert_close(seen[-1], c_in * x_k)
    torch.testing.assert_close(x_hat, (c_skip + c_out * c_in) * x_k)
    raw = direct(digits_teacher, net=net, preconditioning=False)
    assert torch.equal(raw.student(net, x_k, sigma, labels), x_k), "the paper's raw form: S_θ(x_k)"


def test_the_config_preconditions_and_a_config_from_before_the_key_builds_the_raw_student(digits_teacher):
    cfg = OmegaConf.load(ROOT / "conf/method/direct.yaml")
    assert cfg.preconditioning is True
    old = DirectDistillation(digits_teacher, tiny_nafnet(), None, steps=STEPS, k=2, refine_iterations=0)
    assert old.hparams.preconditioning is False, "a run trained before the key used the raw S_θ(x_k)"


def test_block_parameter_count_is_nafnet_s_plus_the_time_film():
    c, time_dim = 24, 16
    assert (
        sum(p.numel() for p in NAFBlock(c, time_dim).parameters())
        == 7 * c * c + 33 * c + 2 * c * time_dim + 2 * c
    )


@pytest.mark.parametrize(
    ("preset", "count", "shape"),
    [
        ("nafnet_sd_57m", 57_627_972, None),  # the paper: 57.7M
        ("nafnet_sd_13m", 13_509_796, None),  # the paper: 13.5M
        ("nafnet_digits", 469_985, (1, 8, 8)),
        ("nafnet_digits_refine", 96_961, (1, 8, 8)),
        ("nafnet_mnist", 1_733_345, (1, 32, 32)),
        ("nafnet_mnist_refine", 324_993, (1, 32, 32)),
    ],
)
def test_preset_parameter_counts(preset, count, shape):
    assert parameter_count(preset) == count
    cfg = OmegaConf.load(ROOT / "conf/net" / f"{preset}.yaml")
    with torch.device("meta" if shape is None else "cpu"):
        net = hydra.utils.instantiate(cfg)
    assert sum(p.numel() for p in net.parameters()) == count
    if shape is None:
        assert f"{count:,}" in (ROOT / "conf/net" / f"{preset}.yaml").read_text(), "the comment states it"
        assert sum(len(stack) for stack in [*net.encoders, net.middle, *net.decoders]) == 36
        assert net.in_channels == 4 and net.levels == 3
    else:
        x = torch.randn(2, *shape)
        assert net(x, torch.zeros(2), torch.tensor([3, -1])).shape == x.shape


def test_the_parameter_count_command_prints_every_preset_as_the_docs_record_it():
    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distillbench.nets", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    proc, page = command(), (ROOT / "docs" / "methods.md").read_text()
    assert proc.returncode == 0, proc.stderr
    for preset in preset_names():
        count = f"{parameter_count(preset):,}"
        assert re.search(rf"{preset}\s.*\s{count}\s", proc.stdout), preset
        assert f"| {preset} | {count} |" in page, f"docs/methods.md records {preset}"
    bad = command("nafnet_xl")
    assert bad.returncode == 2 and "no preset nafnet_xl" in bad.stderr and "nafnet_sd_57m" in bad.stderr


# ---- trajectories ------------------------------------------------------------------------------------------
def test_the_command_writes_shards_and_manifest_then_skips_them_and_resumes(tmp_path):
    proc = run_here("distillbench.make_trajectories", "teacher=digits", *TINY,
                   f"out_dir={tmp_path / 'shards'}", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)  # fmt: skip
    summary = json.loads((run_folder(proc) / "summary.json").read_text())
    assert (summary["shards_written"], summary["shards_skipped"], summary["pairs"]) == (3, 0, 32)
    out = tmp_path / "shards"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["splits"]["train"]] == [6, 6]
    assert [(s["start"], s["count"]) for s in manifest["splits"]["test"]] == [(12, 4)]
    assert manifest["indices"] == INDICES and manifest["sigmas"] == karras(STEPS).tolist()
    assert manifest["teacher"]["path"] == "<assets>/teachers/digits", "a moved checkout still matches"
    shard = load_file(str(out / "train-00001.safetensors"))
    assert shard["states"].shape == (6, 2, 1, 8, 8) and shard["finals"].shape == (6, 1, 8, 8)
    assert shard["index"].tolist() == list(range(6, 12)) and shard["labels"].shape == (6,)

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    first = load_file(str(out / "train-00000.safetensors"))
    again = make_trajectories(tmp_path)
    assert (again["shards_written"], again["shards_skipped"]) == (0, 3)
    (out / "train-00000.safetensors").unlink()  # interrupted: one shard lost, one half-written
    (out / ".test-00000.safetensors.abc123.tmp").write_bytes(b"partial")
    resumed = make_trajectories(tmp_path)
    assert (resumed["shards_written"], resumed["shards_skipped"]) == (1, 2)
    assert not list(out.glob(".*.tmp")), "stale temporaries are removed"
    assert (out / "train-00001.safetensors").stat().st_mtime_ns == stamps["train-00001.safetensors"]
    rewritten = load_file(str(out / "train-00000.safetensors"))
    assert all(torch.equal(rewritten[key], first[key]) for key in first), "the resumed shard is the same"


def test_stored_pairs_are_the_full_solver_s_states_and_output_on_the_same_noise(shards, digits_teacher):
    manifest = json.loads((shards / "manifest.json").read_text())
    shard = load_file(str(shards / "train-00001.safetensors"))
    assert manifest["noise_seed"] == 1, "held out from the evaluation noise (seed 0) by default"
    z = fixed_noise(6, (1, 8, 8), seed=1, offset=6)
    labels = shard["labels"]
    assert torch.equal(labels, fixed_labels(16, make_digits().label_distribution, 1)[6:12])
    sampler = DPMSolverPP2MSampler(steps=STEPS, schedule=karras)
    full = sampler.sample(digits_teacher, z, labels)
    assert full.nfe == STEPS
    torch.testing.assert_close(shard["finals"], full.x, rtol=0, atol=1e-6)
    for j, k in enumerate(manifest["indices"]):
        x_k = first_steps(digits_teacher, sampler, z, labels, k)
        assert x_k.nfe == k
        torch.testing.assert_close(shard["states"][:, j], x_k.x, rtol=0, atol=1e-6)


def make_digits():
    from distillbench.data.digits import DigitsDataModule

    return DigitsDataModule()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """A Stable-Diffusion-like folder: unet/ (a tiny cross-attention UNet on 4×8×8 latents), scheduler/."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sd")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(path / "unet")  # fmt: skip
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                  beta_end=0.012).save_pretrained(path / "scheduler")  # fmt: skip
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}  # fmt: skip
    (path / "model_index.json").write_text(json.dumps(index))
    return path


class HashPromptEncoder:
    """A stand-in text encoder: a fixed random (5, 8) embedding per distinct prompt."""

    def __init__(self, path=None):
        self.path = path

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        seeds = [sum(map(ord, p)) for p in prompts]
        return torch.stack([torch.randn(5, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])


def test_a_stable_diffusion_pipeline_writes_latent_shards_from_a_prompts_file(tmp_path, pipeline_dir):
    (tmp_path / "prompts.txt").write_text("a red cube\n\nan astronaut riding a horse\na bowl of soup\n")
    summary = make_trajectories(
        tmp_path, "~data", "teacher=diffusers", f"teacher.path_or_repo={pipeline_dir}",
        "teacher.sigma_data=1.0", "teacher.guidance_scale=3.0", f"prompts.file={tmp_path / 'prompts.txt'}",
        "prompts.encoder._target_=tests.test_direct.HashPromptEncoder", "n=8", "test_fraction=0",
        "schedule=improved",  # the paper's
    )  # fmt: skip
    assert summary["shards_written"] == 2
    manifest = json.loads((tmp_path / "shards/manifest.json").read_text())
    assert manifest["prompts"] == ["a red cube", "an astronaut riding a horse", "a bowl of soup"]
    assert manifest["sample_shape"] == [4, 8, 8] and manifest["num_classes"] == 3
    data = TrajectoryDataModule(tmp_path / "shards")
    pairs = data.shards("train")
    assert pairs["states"].shape == (8, 2, 4, 8, 8) and torch.isfinite(pairs["finals"]).all()
    assert pairs["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1], "trajectory i gets prompt i mod P"
    assert data.name == "trajectories" and data.num_classes == 3
    encoder = HashPromptEncoder()
    teacher = DiffusersDenoiser.from_pretrained(
        pipeline_dir, sigma_data=1.0, guidance_scale=3.0, uncond_hidden_states=encoder([""])
    )
    guided = PromptConditioned(teacher, encoder, manifest["prompts"])
    sampler = DPMSolverPP2MSampler(steps=STEPS, schedule=improved)
    reference = sampler.sample(guided, fixed_noise(8, (4, 8, 8), seed=1), pairs["labels"])
    torch.testing.assert_close(pairs["finals"], reference.x, rtol=0, atol=5e-4)  # batch-size rounding


def test_the_clip_prompt_encoder_names_its_missing_package():
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(MissingPackageError, match="pip install transformers"):
            CLIPPromptEncoder("/nonexistent")
    else:
        pytest.skip("transformers is installed")


# ---- data module -------------------------------------------------------------------------------------------
def test_the_data_module_serves_pairs_and_the_real_data_of_like(shards):
    data = TrajectoryDataModule(shards, like=make_digits(), batch_size=4)
    assert data.name == "digits" and data.num_classes == 10 and data.sample_shape == (1, 8, 8)
    pairs = data.pairs("train")
    assert len(pairs) == 12 * 2 and len(data.pairs("test")) == 4 * 2
    state, sigma, step, final, label = pairs[3]  # trajectory 1, step index k = 2
    stored = data.shards("train")
    assert torch.equal(state, stored["states"][1, 1]) and torch.equal(final, stored["finals"][1])
    assert int(step) == 2 and float(sigma) == pytest.approx(karras(STEPS)[2].item())
    assert int(label) == int(stored["labels"][1])
    assert data.arrays("train")[0].shape == make_digits().arrays("train")[0].shape
    batch = next(iter(data.train_dataloader()))
    assert [tuple(t.shape) for t in batch] == [(4, 1, 8, 8), (4,), (4,), (4, 1, 8, 8), (4,)]


def test_streaming_reads_every_training_pair_once_a_pass_and_splits_shards_over_ranks(shards):
    data = TrajectoryDataModule(shards, streaming=True, seed=3)
    stored = data.pairs("train")
    every = sorted(float(stored[i][0].sum() + 10 * stored[i][1]) for i in range(len(stored)))

    def first(stream, n):
        return [float(state.sum() + 10 * sigma) for state, sigma, *_ in itertools.islice(iter(stream), n)]

    single = ShardStream(data, data.manifest["splits"]["train"], seed=3)
    assert sorted(first(single, len(stored))) == every, "one pass: each pair once"
    assert first(single, len(stored)) != first(ShardStream(data, data.manifest["splits"]["train"], 4), 24)
    shares = [first(ShardStream(data, data.manifest["splits"]["train"], 3, rank, 2), len(stored) // 2)
              for rank in (0, 1)]  # fmt: skip
    assert sorted(shares[0] + shares[1]) == every, "two ranks: disjoint shards that cover the split"
    with pytest.raises(
        ConfigError, match=r"3 process\(es\) × 1 worker\(s\) needs at least 3 training shards"
    ):
        first(ShardStream(data, data.manifest["splits"]["train"], 3, 0, 3), 1)
    batch = next(iter(data.train_dataloader()))
    assert [tuple(t.shape) for t in batch] == [(64, 1, 8, 8), (64,), (64,), (64, 1, 8, 8), (64,)]


def test_data_module_refuses_missing_empty_incomplete_or_misshapen_shards(tmp_path, shards):
    with pytest.raises(ConfigError, match="does not exist"):
        TrajectoryDataModule(tmp_path / "nope")
    with pytest.raises(ConfigError, match="has no manifest.json"):
        TrajectoryDataModule(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in shards.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "test-00000.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"misses 1 of its 3 shards \(test-00000.safetensors\).*resumes"):
        TrajectoryDataModule(copy)
    bad = load_file(str(shards / "test-00000.safetensors"))
    bad["states"] = bad["states"][:, :1].contiguous()
    save_file(bad, str(copy / "test-00000.safetensors"))
    with pytest.raises(ConfigError, match="not the .* of its manifest"):
        TrajectoryDataModule(copy).shards("test")


# ---- the method --------------------------------------------------------------------------------------------
def direct(teacher, **kw) -> DirectDistillation:
    settings = {"net": tiny_nafnet(), "refiner": tiny_nafnet(), "steps": STEPS, "k": 2, "schedule": karras,
                "iterations": 6, "refine_iterations": 2, "lr": 1e-2, "preconditioning": True}  # fmt: skip
    return DirectDistillation(teacher, **(settings | kw))


def fit(method, data) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=-1, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(method, datamodule=data)
    return trainer


def test_each_stage_trains_its_own_net_and_stage_one_switches_l1_to_l2_at_five_sixths(shards, digits_teacher):
    method = direct(digits_teacher, trajectories=shards)
    rows, before = [], {"net": params(method.net), "refiner": params(method.refiner)}

    def record(metrics):
        rows.append((int(metrics["train/stage"]), bool(metrics["train/l1"]), metrics["train/lr"]))
        rows[-1] += (float(metrics["train/loss"]),)

    method.log_train = record
    fit(method, TrajectoryDataModule(shards, batch_size=4))
    assert [(stage, l1) for stage, l1, _, _ in rows] == [(0, True)] * 5 + [(0, False)] + [(1, False)] * 2
    assert rows[0][2] == pytest.approx(1e-2) and rows[-1][2] < 1e-2, "cosine annealing within each stage"
    assert rows[6][2] == pytest.approx(1e-2), "stage two restarts its schedule"
    assert method.done and int(method.gen_steps) == 8 and method.kimg == pytest.approx(0.032)
    assert [(r["stage"], r["steps"], r["gen_step"]) for r in method.finished_stages] == [(0, 3, 6), (1, 3, 8)]
    after = {"net": params(method.net), "refiner": params(method.refiner)}
    assert not torch.equal(before["net"], after["net"]) and not torch.equal(
        before["refiner"], after["refiner"]
    )


def test_compute_is_counted_from_each_stage_s_passes_scaled_by_network_size(shards, digits_teacher):
    from tests.test_budget import SampleCounter

    method = direct(digits_teacher, trajectories=shards)
    counters = [SampleCounter(m) for m in (method.net, method.refiner)]
    fit(method, TrajectoryDataModule(shards, batch_size=4))
    # stage one: 6 steps of 4 pairs train S_θ; stage two: 2 steps run S_θ and train R_φ
    assert [(c.forward, c.backward) for c in counters] == [(24 + 8, 24), (8, 8)]
    assert float(method.tfe) == pytest.approx(sum(c.tfe(digits_teacher) for c in counters))
    assert 0 < float(method.tfe) < 32 * 3, "a NAFNet far smaller than the teacher costs far less than it"


def test_one_stage_two_step_lowers_the_refiner_loss_with_the_student_fixed(shards, digits_teacher):
    method = direct(digits_teacher, iterations=1, lr=1e-3)
    method.stage.fill_(1)
    for p in method.net.parameters():
        torch.nn.init.normal_(p, std=0.05)  # a "trained" student
    x_k, sigma, _, x_final, labels = next(iter(TrajectoryDataModule(shards, batch_size=8).train_dataloader()))
    net_before = params(method.net)
    optimizer = method.configure_optimizers()[1]
    losses = []
    for _ in range(2):
        loss = method.stage_loss(x_k, sigma, x_final, labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[1] < losses[0]
    assert torch.equal(params(method.net), net_before)


def test_sample_takes_k_teacher_steps_then_the_student_nfe_k_plus_one(digits_teacher):
    method = direct(digits_teacher, k=2, net=tiny_nafnet(num_classes=10))
    for net in (method.net, method.refiner):
        for name, p in net.named_parameters():
            if name.endswith(("beta", "gamma")) or name.startswith(("ending", "label")):
                torch.nn.init.normal_(p, std=0.1)
    calls = {"teacher": 0, "net": 0, "refiner": 0}
    modules = {"teacher": digits_teacher, "net": method.net, "refiner": method.refiner}
    hooks = [module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, module in modules.items()]  # fmt: skip
    z, labels = fixed_noise(5, (1, 8, 8), seed=3), torch.arange(5)
    result = method.generate(z, labels)
    for hook in hooks:
        hook.remove()
    assert result.nfe == 3 == method.nfe == method.steps
    assert calls == {"teacher": 2, "net": 1, "refiner": 1}
    sampler = DPMSolverPP2MSampler(steps=STEPS, schedule=karras)
    states, _ = trajectory(digits_teacher, sampler, z, labels, [2])
    sigma_2 = karras(STEPS)[2].item()
    c_skip, c_out, c_in = (
        0.25 / (sigma_2**2 + 0.25),
        sigma_2 * 0.5 / (sigma_2**2 + 0.25) ** 0.5,
        1 / (sigma_2**2 + 0.25) ** 0.5,
    )  # EDM's preconditioning with the teacher's σ_data = 0.5
    t = time_input(torch.full((5,), sigma_2))
    with torch.no_grad():
        student = c_skip * states[:, 0] + c_out * method.net(c_in * states[:, 0], t, labels)
        expected = method.refiner(student, t)
    torch.testing.assert_close(result.x, expected, rtol=0, atol=1e-5)
    unlabelled = method.generate(z, None).x
    assert not torch.allclose(unlabelled, result.x), "no labels: the unlabelled row, after the teacher's"
    assert method.sample(z, labels, steps=2).shape == z.shape, "k = 1 works without retraining"


def test_the_train_command_runs_both_stages_at_k_plus_one_nfe(tmp_path, shards):
    proc = run_here(
        "distillbench.train", "method=direct", "data=trajectories", f"data.root={shards}",
        "+data@data.like=digits", "teacher=digits", "metrics=digits", "sampler@teacher_sampler=dpmpp2m",
        f"teacher_sampler.steps={STEPS}", f"method.steps={STEPS}", "method.k=2", "method.iterations=2",
        "method.refine_iterations=1", "method.batch_size=4", "eval.n=32", "eval.every_kimg=100",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((run_folder(proc) / "summary.json").read_text())
    assert summary["method"] == "DirectDistillation" and summary["gen_steps"] == 3
    assert [(row["stage"], row["nfe"]) for row in summary["stages"]] == [(0, 3), (1, 3)]
    assert summary["student"]["nfe"] == 3 and summary["teacher"]["nfe"] == STEPS
    assert summary["student"]["samples_per_second"] > 0


def test_training_on_the_evaluation_noise_s_trajectories_is_refused_before_any_work(tmp_path, shards):
    proc = run_here(
        "distillbench.train", "method=direct", "data=trajectories", f"data.root={shards}",
        "+data@data.like=digits", "teacher=digits", "metrics=digits", "eval.noise_seed=1",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "made from noise_seed=1, the evaluation's noise (eval.noise_seed=1)" in proc.stderr
    assert "noise_seed=2" in proc.stderr and not (tmp_path / "run" / "config.yaml").exists()


# ---- bad settings ------------------------------------------------------------------------------------------
class WideTeacher(Denoiser):
    """A teacher of 3×16×16 samples that is never called."""

    sample_shape = (3, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 1}, r"method.steps=1 must be an integer >= 2"),
        ({"k": 0}, r"method.k=0 must be an integer >= 1"),
        ({"k": 4}, r"method.k=4 must be an integer in \[1, 3\] \(1 <= k <= method.steps - 1\)"),
        ({"iterations": 0}, r"method.iterations=0 must be an integer >= 1"),
        ({"refiner": None}, r"method.refine_iterations=2 with method.refiner=null"),
        ({"refine_iterations": 0}, r"method.refine_iterations=0 with method.refiner=NAFNet"),
        ({"l1_fraction": 1.5}, r"method.l1_fraction=1.5 must be a number in \[0, 1\]"),
        ({"lr": 0.0}, r"method.lr=0.0 must be a number > 0"),
        ({"grad_clip": -1.0}, r"method.grad_clip=-1.0 must be a number > 0, or null"),
        ({"net": tiny_nafnet(in_channels=3)}, r"method.net.in_channels=3 but the teacher's samples have 1"),
        (
            {"refiner": tiny_nafnet(num_classes=5)},
            r"method.refiner.num_classes=5 but the teacher has 10 classes; set method.refiner.num_classes=10",
        ),
        (
            {"refiner": tiny_nafnet(enc_blocks=[1] * 4, dec_blocks=[1] * 4)},
            r"method.refiner has 4 levels of down-sampling",
        ),
        ({"student": WideTeacher()}, r"not a student=; drop student="),
        ({"trajectories": "/nonexistent/pairs"}, r"data.root=/nonexistent/pairs does not exist"),
        ({"steps": 5, "k": 2, "trajectories": "SHARDS"}, r"was made on the 4-step σ grid .*\(steps=4"),
    ],
)
def test_bad_method_settings_fail_in_init_naming_key_value_and_fix(kwargs, match, digits_teacher, shards):
    kwargs = {k: (shards if v == "SHARDS" else v) for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=match):
        direct(digits_teacher, **kwargs)


def test_trajectories_of_another_shape_are_refused(shards):
    with pytest.raises(
        ConfigError, match=r"holds samples of shape \(1, 8, 8\) but the teacher makes \(3, 16, 16\)"
    ):
        direct(
            WideTeacher(),
            net=tiny_nafnet(in_channels=3),
            refiner=None,
            refine_iterations=0,
            trajectories=shards,
        )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["steps=1"], r"steps=1 must be an integer >= 2"),
        (["indices=[0,2]"], r"indices=\[0, 2\] holds 0, outside \[1, 3\] for steps=4"),
        (["indices=[4]"], r"holds 4, outside \[1, 3\]"),
        (["indices=[2,2]"], r"repeats a step index"),
        (["indices=[]"], r"indices=\[\] is empty"),
        (["n=0"], r"n=0 must be a positive integer"),
        (["test_fraction=1.0"], r"test_fraction=1.0 must lie in \[0, 1\)"),
        (["prompts.file=/nonexistent/prompts.txt"], r"prompts.file=/nonexistent/prompts.txt does not exist"),
    ],
)
def test_bad_trajectory_settings_fail_before_any_work(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_trajectories(tmp_path, *overrides)
    assert not (tmp_path / "shards").exists()


def test_other_settings_into_a_finished_folder_are_refused_and_the_cli_exits_2(tmp_path, shards):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        make_trajectories(tmp_path, f"prompts.file={tmp_path / 'empty.txt'}")
    copy = tmp_path / "shards"
    copy.mkdir()
    (copy / "manifest.json").write_bytes((shards / "manifest.json").read_bytes())
    with pytest.raises(
        ConfigError, match=r"holds trajectories made with other settings \(n, splits differ\)"
    ):
        make_trajectories(tmp_path, "n=20")
    proc = run_here("distillbench.make_trajectories", "teacher=digits", "indices=[0]",
                   f"out_dir={tmp_path / 'x'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "indices=[0] holds 0, outside [1, 19]" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_sampling_at_a_k_the_pairs_do_not_hold_is_allowed_with_a_warning(shards, digits_teacher):
    expected = r"method.k=3 is not among the step indices \[1, 2\].*'indices=\[2,3,4\]'"
    with pytest.warns(UserWarning, match=expected):
        direct(digits_teacher, k=3, trajectories=shards)
