"""The numerical guard: a step whose loss is not finite is skipped instead of poisoning the weights.

One NaN or inf loss (a bad batch, an fp16 overflow) would otherwise reach the optimizer and turn
every weight into NaN for the rest of a days-long run. The guard skips such steps and counts
them; a run of ``max_consecutive`` of them means training has diverged, and it stops with an
error naming the step, while the last checkpoint, saved before the divergence, stays as it was.
"""

from __future__ import annotations

from typing import Any

from segformer.errors import ConfigError, UserError


class NonFiniteLossError(UserError, RuntimeError):
    """Training diverged: the loss stayed NaN or infinite."""


class NonFiniteLossGuard:
    """Counts non-finite losses; ``check`` says whether to skip the step or raises when too many.

    Args:
        max_consecutive: how many non-finite steps in a row are tolerated (0 stops at the first).
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if int(max_consecutive) < 0:
            raise ConfigError(f"max_consecutive_nonfinite must be 0 or more, got {max_consecutive}.")
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.total = 0

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

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])
