"""The batch a run trains with: per device, devices, nodes, accumulation, and the global batch.

Recipes state the paper's global batch (``global_batch_size``: what the optimizer sees per step);
``configure_batch`` splits it over the devices this run has, with gradient accumulation making
up what one device cannot hold (``max_batch_per_device``), so the same recipe runs unchanged on
one CPU, one GPU or 2 nodes x 8 GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import (
    CPUAccelerator,
    CUDAAccelerator,
    MPSAccelerator,
)
from omegaconf import DictConfig, ListConfig, open_dict

from segformer.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch is made: ``num_nodes x devices x per_device x accumulate`` images."""

    per_device: int
    devices: int
    num_nodes: int
    accumulate: int
    # The recipe's global_batch_size, when one is set (the plan may differ: explicit settings win).
    target: int | None = None

    @classmethod
    def of(cls, trainer: Trainer, per_device: int, target: int | None = None) -> BatchPlan:
        """The batch ``trainer`` actually trains with (what the line at the start states)."""
        return cls(per_device, trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches, target)

    @property
    def global_batch(self) -> int:
        return self.per_device * self.devices * self.num_nodes * self.accumulate

    def __str__(self) -> str:
        parts = [_count(self.num_nodes, "node")] if self.num_nodes > 1 else []
        parts += [_count(self.devices, "device"), f"{self.per_device} per device"]
        parts.append(_count(self.accumulate, "accumulation step"))
        line = f"global batch {self.global_batch} = {' x '.join(parts)}"
        if self.target is not None and self.target != self.global_batch:
            line += f" (not the recipe's global_batch_size={self.target})"
        return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def derive(global_batch: int, processes: int, max_per_device: int | None = None) -> tuple[int, int]:
    """``(per_device, accumulate)`` with ``per_device x processes x accumulate == global_batch``
    and as few accumulation steps as ``max_per_device`` allows. When no split is exact (16 on 3
    devices) it is the closest global batch, with the fewest accumulation steps."""
    limit = max_per_device or global_batch
    best: tuple[int, int, int] | None = None
    for accumulate in range(1, global_batch + 1):
        per_device = min(limit, max(1, round(global_batch / (processes * accumulate))))
        error = abs(per_device * processes * accumulate - global_batch)
        if best is None or error < best[0]:
            best = (error, per_device, accumulate)
        if error == 0:
            break
    assert best is not None
    return best[1], best[2]


def plan_batch(
    global_batch: int | None,
    devices: int,
    num_nodes: int = 1,
    per_device: int | None = None,
    accumulate: int | None = None,
    max_per_device: int | None = None,
) -> BatchPlan:
    """The batch plan; ``per_device`` and ``accumulate`` given by the user are kept as they are,
    the ones left None are derived from ``global_batch``."""
    processes = devices * num_nodes
    if per_device is None and global_batch is None:
        raise ConfigError(
            "data.batch_size=null needs global_batch_size=<images per optimizer step> to derive it "
            "from; set one of them."
        )
    if per_device is not None and max_per_device is not None and per_device > max_per_device:
        raise ConfigError(
            f"data.batch_size={per_device} is larger than max_batch_per_device={max_per_device}: "
            "set data.batch_size=null to derive it, or raise max_batch_per_device."
        )
    if per_device is None and accumulate is None:
        per_device, accumulate = derive(global_batch, processes, max_per_device)
    elif per_device is None:
        per_device = min(max_per_device or global_batch, max(1, round(global_batch / (processes * accumulate))))
    return BatchPlan(per_device, devices, num_nodes, accumulate or 1, target=global_batch)


def count_devices(accelerator: Any, devices: Any) -> int:
    """How many devices (one process each) the Trainer will use, parsed as Lightning does:
    ``devices=auto`` is every visible GPU, or one process on a CPU-only machine."""
    name = str(accelerator)
    if name == "auto":
        name = "cuda" if CUDAAccelerator.is_available() else "mps" if MPSAccelerator.is_available() else "cpu"
    elif name == "gpu":
        name = "mps" if MPSAccelerator.is_available() else "cuda"
    kind = {"cpu": CPUAccelerator, "cuda": CUDAAccelerator, "mps": MPSAccelerator}.get(name)
    if kind is None:  # another accelerator (tpu, ...): Lightning checks it; the count must be given
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
            return devices
        raise ConfigError(f"trainer.accelerator={accelerator} needs trainer.devices=<number of devices>.")
    if not kind.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} asks for a GPU, but this machine has none that PyTorch "
            f"can use ({name} is not available): use trainer.accelerator=auto (a GPU when there is one) "
            "or trainer.accelerator=cpu."
        )
    if devices in ("auto", -1, "-1"):
        return kind.auto_device_count()
    return len(kind.get_parallel_devices(kind.parse_devices(devices)))


def configure_batch(cfg: DictConfig) -> BatchPlan:
    """Fill in ``data.batch_size``, ``trainer.accumulate_grad_batches`` and
    ``trainer.sync_batchnorm`` where the config leaves them null, from ``global_batch_size``,
    ``max_batch_per_device`` and the devices of this run."""
    trainer = cfg.trainer
    given_devices = trainer.get("devices", "auto")
    if isinstance(given_devices, ListConfig):  # trainer.devices=[0,1]: GPU indices
        given_devices = list(given_devices)
    devices = count_devices(trainer.get("accelerator", "auto"), given_devices)
    num_nodes = int(trainer.get("num_nodes") or 1)
    values = {
        "global_batch_size": cfg.get("global_batch_size"),
        "max_batch_per_device": cfg.get("max_batch_per_device"),
        "data.batch_size": cfg.data.get("batch_size"),
        "trainer.accumulate_grad_batches": trainer.get("accumulate_grad_batches"),
    }
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r} must be a whole number of images (at least 1) or null.")
    plan = plan_batch(
        values["global_batch_size"],
        devices,
        num_nodes,
        per_device=values["data.batch_size"],
        accumulate=values["trainer.accumulate_grad_batches"],
        max_per_device=values["max_batch_per_device"],
    )
    with open_dict(cfg):
        cfg.data.batch_size = plan.per_device
        trainer.accumulate_grad_batches = plan.accumulate
        if trainer.get("sync_batchnorm") is None:
            # The paper's SyncBN: BatchNorm statistics over the global batch. torch's SyncBatchNorm
            # runs on CUDA only, and with one process there is nothing to synchronise.
            on_cuda = str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and CUDAAccelerator.is_available()
            trainer.sync_batchnorm = on_cuda and devices * num_nodes > 1
    return plan
