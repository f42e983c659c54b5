"""The non-finite loss guard: skipped and counted steps, untouched weights and BatchNorm
statistics, the error after too many in a row (the last checkpoint kept), all DDP ranks skipping
together."""

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import RandomScenes
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from segformer import SegFormer, cli
from segformer.training.guards import NonFiniteLossError, NonFiniteLossGuard
from segformer.training.module import SegFormerModule
from segformer.training.optim import build_adamw


def _module(max_consecutive: int) -> SegFormerModule:
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=3)
    model.id2label = {0: "a", 1: "b", 2: "c"}
    return SegFormerModule(model, optimizer=build_adamw, max_consecutive_nonfinite=max_consecutive)


def _trainer(root: Path, max_steps: int, **kwargs) -> L.Trainer:
    """A CPU trainer whose default checkpoints go under ``root`` (tmp_path), not the working folder."""
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


class Snapshots(L.Callback):
    """The weights and BatchNorm statistics after every training batch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.states.append({k: v.clone() for k, v in module.model.state_dict().items()})


def test_the_guard_counts_and_stops_after_too_many_in_a_row():
    guard = NonFiniteLossGuard(max_consecutive=2)
    assert [guard.check(finite, step) for step, finite in enumerate([True, False, False, True, False])] == [
        False, True, True, False, True,
    ]
    assert (guard.consecutive, guard.total) == (1, 3)
    guard.check(False, 5)
    with pytest.raises(NonFiniteLossError, match=r"step 6: .* 3 steps in a row \(5 skipped in all") as error:
        guard.check(False, 6, last_checkpoint="/runs/a/checkpoints/last.ckpt")
    assert "/runs/a/checkpoints/last.ckpt, was saved before and is kept" in str(error.value)
    assert "optimizer.lr" in str(error.value) and "bf16-mixed" in str(error.value)
    restored = NonFiniteLossGuard(2)
    restored.load_state_dict(guard.state_dict())
    assert (restored.consecutive, restored.total) == (guard.consecutive, guard.total)


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_and_changes_nothing(tmp_path):
    # Sequential batches of one image: images 1 and 2 (batches 1 and 2) are NaN.
    module, snapshots = _module(max_consecutive=2), Snapshots()
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[snapshots])
    trainer.fit(module, DataLoader(RandomScenes(nan=(1, 2)), batch_size=1))
    # Lightning counts a skipped step as a step: 5 batches, 3 optimizer updates.
    assert module.nonfinite_guard.total == 2
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2
    after = snapshots.states
    for skipped in (1, 2):  # weights and BatchNorm statistics as after batch 0
        assert all(torch.equal(after[skipped][k], after[0][k]) for k in after[0])
    assert not all(torch.equal(after[3][k], after[0][k]) for k in after[0])
    assert all(torch.isfinite(v).all() for v in after[-1].values() if v.is_floating_point())


@pytest.mark.slow
def test_too_many_non_finite_steps_stop_training_and_keep_the_last_checkpoint(tmp_path):
    module = _module(max_consecutive=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = _trainer(tmp_path, max_steps=10, callbacks=[checkpoint])
    # Batches 0 and 1 train, 2 is skipped (and checkpointed: the weights of step 1), 3 stops.
    with pytest.raises(NonFiniteLossError, match="Training stopped at step 3: .* 2 steps in a row") as error:
        trainer.fit(module, DataLoader(RandomScenes(size=6, nan=(2, 3, 4)), batch_size=1))
    assert f"{tmp_path / 'last.ckpt'}, was saved before and is kept" in str(error.value)
    assert cli.user_error_message(error.value) == str(error.value)  # entry points print it alone
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert saved["callbacks"]["NonFiniteLossGuard"] == {"consecutive": 1, "total": 1}


@pytest.mark.slow
def test_every_ddp_rank_skips_when_one_rank_has_a_non_finite_loss(tmp_path):
    # Two processes; rank 1 gets the odd images, so only rank 1 sees the NaN image 3.
    module = _module(max_consecutive=2)
    trainer = _trainer(tmp_path, max_steps=3, strategy="ddp_spawn", devices=2)
    trainer.fit(module, DataLoader(RandomScenes(size=8, nan=(3,)), batch_size=1))
    # Rank 0's own loss was finite; it skipped with rank 1 (otherwise DDP would have hung).
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
