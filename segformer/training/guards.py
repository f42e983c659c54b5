"""What keeps a training step from poisoning a days-long run, as Lightning callbacks that the
module brings along (``SegFormerModule.configure_callbacks``), so ``training_step`` stays
forward, loss, log.

``NonFiniteLossGuard``: one NaN or inf loss (a bad batch, an fp16 overflow) would otherwise
reach the optimizer and turn every weight into NaN. Such a step is skipped on every rank, its
BatchNorm statistics are put back, and it is counted; a run of ``max_consecutive`` of them means
training has diverged, and it stops with an error naming the step, while the last checkpoint,
saved before the divergence, stays as it was.

``SeededSteps``: dropout and drop-path of a step draw from a generator seeded by (run seed,
rank, batch number), so a resumed run draws what the interrupted one would have drawn.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer

from segformer.data.sampler import derived_seed, run_seed
from segformer.errors import ConfigError, UserError


class NonFiniteLossError(UserError, RuntimeError):
    """Training diverged: the loss stayed NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Skips optimizer steps whose loss is not finite on any rank; stops after too many in a row.

    A skipped step still runs backward on every rank (Lightning refuses a ``None`` loss under
    DDP, and the ranks must stay in step); its gradients are then dropped, so the optimizer does
    not move the weights at all (zero gradients would, through AdamW's momentum and weight
    decay), and the module's buffers (BatchNorm statistics) get back their values from before
    the step. ``train/nonfinite_steps`` counts the skipped steps.

    Args:
        max_consecutive: how many non-finite steps in a row are tolerated (0 stops at the first).
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if int(max_consecutive) < 0:
            raise ConfigError(f"max_consecutive_nonfinite must be 0 or more, got {max_consecutive}.")
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.total = 0
        self._buffers: list[Tensor] = []
        self._restore: list[Tensor] | None = None  # the buffers to put back before the optimizer step

    def check(self, finite: bool, step: int, last_checkpoint: str | None = None) -> bool:
        """True when the step at optimizer step ``step`` must be skipped (its loss is not finite)."""
        if finite:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        if self.consecutive > self.max_consecutive:
            kept = (
                f"The last checkpoint, {last_checkpoint}, was saved before and is kept."
                if last_checkpoint
                else "No checkpoint was saved yet."
            )
            raise NonFiniteLossError(
                f"Training stopped at step {step}: the loss was NaN or infinite for {self.consecutive} "
                f"steps in a row ({self.total} skipped in all; the limit is max_consecutive_nonfinite="
                f"{self.max_consecutive}). {kept} Usual remedies: a lower optimizer.lr or a longer "
                "scheduler.warmup_iters, gradient clipping (trainer.gradient_clip_val=1.0), and "
                "trainer.precision=bf16-mixed or 32-true instead of 16-mixed; check the data with "
                "python -m segformer.data.check. Resume from the checkpoint with ckpt_path=..."
            )
        return True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # A NaN forward poisons the BatchNorm statistics; autograd needs them until backward is done.
        self._buffers = [buffer.clone() for buffer in pl_module.buffers()]

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        # Every rank skips together (DDP would wait forever for the gradients of a rank that skipped).
        nonfinite = trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        checkpoint = trainer.checkpoint_callback
        last = (checkpoint.last_model_path or None) if checkpoint is not None else None
        if self.check(not nonfinite, trainer.global_step, last) and self._restore is None:
            self._restore = self._buffers  # the first skipped batch of this optimizer step
        pl_module.log("train/nonfinite_steps", float(self.total))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self._restore is None:
            return
        # Parameters without a gradient are left alone by the optimizer.
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(pl_module.buffers(), self._restore):
                buffer.copy_(saved)
        self._restore = None

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if "nonfinite_guard" in checkpoint:  # written before the guard was a callback
            self.load_state_dict(checkpoint["nonfinite_guard"])


class SeededSteps(Callback):
    """Seeds torch's generators from (run seed, rank, batch number) for each training batch and
    gives them back their own state afterwards, so the step's random draws depend on nothing
    a resumed run could not reproduce, and nothing else sees them.

    The run seed is the one ``lightning.seed_everything`` set when training starts (else a fresh
    one), kept in checkpoints.
    """

    def __init__(self) -> None:
        self.seed = run_seed()
        self._fork: contextlib.ExitStack | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.seed = run_seed()  # seed_everything may have run after __init__

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        device = pl_module.device
        self._fork = contextlib.ExitStack()
        self._fork.enter_context(
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)
        )
        torch.manual_seed(derived_seed(self.seed, trainer.global_rank, trainer.fit_loop.epoch_loop.total_batch_idx))

    def _join(self) -> None:
        if self._fork is not None:
            self._fork.close()
            self._fork = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._join()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._join()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if "step_seed" in checkpoint:  # written before the seed was a callback's
            self.seed = int(checkpoint["step_seed"])
