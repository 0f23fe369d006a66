"""Checkpoint files that are either whole or reported as broken.

A checkpoint is written to a temporary file beside its name and flushed and fsynced; its SHA-256 (computed
while writing) goes to ``<name>.sha256``, and only then is the file renamed into place, so a checkpoint on
disk always has its digest. Loading checks the digest; a checkpoint without one (written by other code) is
read whole and its archive's CRC-32 of every entry checked instead. A file that fails is reported by name,
never used. Temporary files that a killed writer left behind are removed by :func:`remove_orphans`.
:class:`AtomicCheckpointIO` makes Lightning write and read every checkpoint this way (periodic ones,
SLURM's ``hpc_ckpt_*`` and ``trainer.save_checkpoint``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distillbench import run_folder
from distillbench.errors import ConfigError
from distillbench.utils.io import atomic_write_text, atomic_writer, file_digest, fsync_folder

STEP_FILE = re.compile(r"step_(\d+)\.ckpt$")
LAST = run_folder.LAST_CHECKPOINT


class CorruptCheckpointError(ConfigError):
    """A checkpoint that is truncated or damaged."""


class _HashingWriter:
    """A binary file wrapper that hashes what passes through it, and keeps the OS error of a failed write
    (torch reports it as its own error, without the cause)."""

    def __init__(self, file):
        self.file, self.sha256 = file, hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data) -> int:
        self.sha256.update(data)
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def digest_path(path: str | Path) -> Path:
    return Path(f"{path}.sha256")


def write_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write to a temporary file, write its digest, then rename it into place. A failed write (a full disk:
    the OS error is raised) leaves the files that were there before as they were."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            try:
                torch.save(checkpoint, writer)
            except Exception as err:
                if writer.error is not None and writer.error is not err:
                    raise writer.error from err
                raise
            f.flush()
            os.fsync(f.fileno())
        atomic_write_text(digest_path(path), writer.sha256.hexdigest() + "\n")
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path: str | Path, map_location=None) -> dict:
    """Load a checkpoint after checking its digest (when one is beside it); a broken file raises
    :class:`CorruptCheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    digest = digest_path(path)
    if digest.is_file() and digest.read_text().strip() != file_digest(path):
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: its SHA-256 differs from {digest.name}")
    if not digest.is_file():
        check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated zip, a bad pickle: torch raises several kinds
        raise CorruptCheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {err})"
        ) from err


def check_archive(path: Path) -> None:
    """Read a checkpoint's zip archive whole and check every entry's CRC-32: a checkpoint without its digest
    is verified this way (``torch.load`` alone reads a flipped byte in a tensor without complaint)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise CorruptCheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {err})"
        ) from err
    if bad is not None:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: it has no {digest_path(path).name}, and its entry {bad} fails "
            "its CRC-32 check"
        )


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete what killed writers left in ``folder``: temporary files (``.<name>.<random>.tmp``, ``.link``)
    and digests whose checkpoint is gone. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    orphans = [*folder.glob(".*.tmp"), *folder.glob(".*.link")]
    orphans += [d for d in folder.glob("*.ckpt.sha256") if not d.with_suffix("").is_file()]
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO through :func:`write_checkpoint` and :func:`read_checkpoint`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        write_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path, map_location or (lambda storage, loc: storage))

    def remove_checkpoint(self, path) -> None:
        for p in (Path(path), digest_path(path)):
            p.unlink(missing_ok=True)


def step_checkpoints(folder: str | Path) -> list[Path]:
    """The ``step_<generator step>.ckpt`` files of a folder, newest (highest step) first."""
    found = [p for p in Path(folder).glob("step_*.ckpt") if STEP_FILE.search(p.name)]
    return sorted(found, key=lambda p: int(STEP_FILE.search(p.name).group(1)), reverse=True)


def point_last_at(path: Path) -> None:
    """Make ``last.ckpt`` (and its digest) the same file as ``path``: a hard link swapped in atomically,
    or an atomic copy where the file system has no hard links."""
    for source, target in ((path, path.parent / LAST), (digest_path(path), digest_path(path.parent / LAST))):
        tmp = target.with_name(f".{target.name}.link")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
            os.replace(tmp, target)
        except OSError:
            with atomic_writer(target, binary=True) as copy:
                Path(copy).write_bytes(source.read_bytes())


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The checkpoints a run could continue from, newest first: its step checkpoints, else ``last.ckpt``."""
    return step_checkpoints(folder) or [p for p in [Path(folder) / LAST] if p.is_file()]


def newest_good_checkpoint(folder: str | Path, fallback: bool = False) -> tuple[Path, dict]:
    """The newest step checkpoint of ``folder`` that loads, and its contents.

    A broken newest one raises :class:`CorruptCheckpointError` unless ``fallback``: then it is reported and
    the next older one is tried.
    """
    candidates = checkpoint_files(folder)
    if not candidates:
        raise ConfigError(f"{folder} holds no checkpoints to resume from")
    for path, older in zip(candidates, [*candidates[1:], None], strict=True):
        try:
            return path, read_checkpoint(path, map_location="cpu")
        except CorruptCheckpointError as err:
            if not fallback or older is None:
                hint = (f"; to continue from the previous one ({older.name}) pass checkpoint.fallback=true"
                        if older is not None else "; no older checkpoint is left")  # fmt: skip
                raise CorruptCheckpointError(f"{err}{hint}") from err
            print(f"warning: {err}; checkpoint.fallback=true: trying {older.name}")
