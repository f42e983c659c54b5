"""Checkpoints that survive interruptions: atomic writes, finding what to resume, checking it first.

``AtomicCheckpointIO`` writes every checkpoint to a temporary file beside the target, flushes it
to disk and renames it into place, so a kill or a crash while saving leaves the previous
``last.ckpt`` whole. ``resume_path`` turns ``ckpt_path`` (nothing, ``last``, a run folder or a
file) into the checkpoint to resume, and ``check_resumable`` refuses an unreadable checkpoint or
one of another model with a ``CheckpointError`` before training writes anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from segformer.errors import CheckpointError

LAST = "last"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.tmp-<pid>``, fsync, then ``os.replace`` onto ``path``.

    Lightning's own writer buffers the whole checkpoint in memory and renames without syncing,
    so after a machine crash the renamed file can still be empty; here the data is on disk
    before the name points to it, and the folder entry is synced after the rename.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_folder(path.parent)
        # What a process killed while saving here left behind (only one process saves a path).
        for stale in path.parent.glob(f"{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some systems (Windows); the rename still happened
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)

def _checkpoint_number(path: Path) -> int:
    match = re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name)
    return int(match.group(1)) if match else -1


def resume_checkpoint(trainer: Trainer, callbacks: Sequence[Callback]) -> str | None:
    """The newest checkpoint a previous attempt of this run left in its folder, or None.

    Candidates: ``last.ckpt`` of every ModelCheckpoint with ``save_last``, and the
    ``hpc_ckpt_<n>.ckpt`` that Lightning saves in ``default_root_dir`` when SLURM signals the
    end of the job (``#SBATCH --signal=SIGUSR1@90``). A fresh run folder has none of them, so a
    new run starts from scratch.
    """
    candidates = [
        Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        for callback in callbacks
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath
    ]
    hpc = sorted(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"), key=_checkpoint_number)
    candidates += hpc[-1:]
    found = [path for path in candidates if path.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda path: path.stat().st_mtime)
    rank_zero_info(f"Resuming from {newest} (left in this run's folder by an earlier attempt).")
    return str(newest)


def newest_in_run_folder(folder: Path) -> Path | None:
    """The newest resumable checkpoint of a train.py run folder (checkpoints/last.ckpt, or the
    hpc_ckpt_<n>.ckpt Lightning saves when SLURM signals), or None."""
    candidates = [folder / "checkpoints" / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt")]
    found = [path for path in candidates if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def resume_path(ckpt_path: str | None, trainer: Trainer, callbacks: Sequence[Callback], run_dir: str) -> str | None:
    """The checkpoint a run resumes from, or None to start from scratch.

    - None: this run folder's own checkpoints if it has any (a re-run with the same
      ``hydra.run.dir``, a requeued SLURM job), so an earlier attempt is continued, never overwritten;
    - ``last``: the same, and says so when the folder has none (the run then starts);
    - a train.py run folder: its newest checkpoint;
    - a file: that checkpoint.
    """
    if ckpt_path is None or ckpt_path == LAST:
        found = resume_checkpoint(trainer, callbacks)
        if found is None and ckpt_path == LAST:
            rank_zero_warn(
                f"ckpt_path=last: the run folder {run_dir} holds no checkpoint yet, so training starts "
                "from scratch. To continue a run, give its folder: hydra.run.dir=<run folder> "
                "ckpt_path=last, or ckpt_path=<run folder>."
            )
        return found
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        found = newest_in_run_folder(path)
        if found is None:
            raise CheckpointError(
                f"ckpt_path={ckpt_path} is a folder without checkpoints: expected a train.py run folder "
                "holding checkpoints/last.ckpt, or give a .ckpt file."
            )
        rank_zero_info(f"Resuming from {found}.")
        return str(found)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={ckpt_path} does not exist. Give a checkpoint file (<run folder>/checkpoints/"
            "last.ckpt), a run folder, or ckpt_path=last with hydra.run.dir=<run folder>."
        )
    return str(path)


def check_resumable(path: str, module: LightningModule) -> None:
    """Raise ``CheckpointError`` unless ``path`` is a readable training checkpoint of this model."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # any failure to read is the file's fault: truncated, not torch, ...
        reason = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"Cannot read checkpoint {path} ({type(error).__name__}: {reason}). "
            "The file is damaged or not a Lightning checkpoint; resume from another one (the run folder's "
            "checkpoints/ holds last.ckpt and best.ckpt). Nothing was written."
        ) from error
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a train.py checkpoint (no training state in it), so training cannot resume "
            "from it. To start a new run from these weights, give them as model.pretrained=... instead."
        )
    expected = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    saved = {name: tuple(value.shape) for name, value in checkpoint["state_dict"].items()}
    if saved != expected:
        described = checkpoint.get("segformer", {})
        model = (
            f"SegFormer-{described.get('variant')} with {described.get('num_classes')} classes"
            if described
            else "another model"
        )
        missing = sorted(set(expected) - set(saved))
        different = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
        detail = f"{len(missing)} missing, {len(different)} of another shape"
        example = (different or missing or sorted(set(saved) - set(expected)))[:1]
        raise CheckpointError(
            f"Checkpoint {path} holds {model}, not the model of this config "
            f"(SegFormer-{module.model.variant} with {module.model.num_classes} classes): its weights do not "
            f"fit ({detail}, e.g. {example[0] if example else '-'}). Resume with the config it was trained "
            "with (model=..., data=...), or start a new run in a new folder. Nothing was written."
        )
