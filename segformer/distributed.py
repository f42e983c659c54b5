"""Multi-process evaluation and batch bookkeeping for DDP runs (Lightning on torch.distributed).

Lightning gives evaluation loaders a ``DistributedSampler``, which pads the split with repeated
images so that every rank gets as many as the others: the repeated images would then be counted
twice in the dataset-level confusion matrix. ``EvalSampler`` splits the split instead, each image
on exactly one rank, and is a ``DistributedSampler`` so Lightning leaves it in place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DistributedSampler

from segformer.errors import DataError


class EvalSampler(DistributedSampler):
    """Image i goes to rank ``i % world_size``, in order, without padding; ranks may differ by one.

    The rank and world size are read from ``torch.distributed`` each time the sampler is used (a
    loader built before the processes start, as eval.py builds it, still splits correctly);
    ``num_replicas`` / ``rank`` fix them instead. Without a process group it yields every image.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        # DistributedSampler.__init__ needs a process group now; the split is decided later.
        self.dataset = dataset
        self._num_replicas, self._rank = num_replicas, rank
        self.shuffle, self.drop_last, self.seed, self.epoch = False, False, 0, 0

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _indices(self) -> range:
        size, world = len(self.dataset), self.num_replicas
        if 0 < size < world:
            # A rank without images would wait forever for the others in DDP's first forward.
            raise DataError(
                f"The evaluation split has {size} image(s) but the run has {world} processes: every "
                "process needs at least one image. Use fewer devices or a larger split."
            )
        return range(self.rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def batch_summary(per_device: int, devices: int, num_nodes: int, accumulate: int) -> str:
    """One line naming the per-device and the global batch size (what the learning rate sees)."""
    processes = devices * num_nodes
    global_batch = per_device * processes * accumulate
    parts = [f"{per_device} per device", f"{devices} device(s)"]
    if num_nodes > 1:
        parts.append(f"{num_nodes} nodes")
    if accumulate > 1:
        parts.append(f"{accumulate} accumulated batches")
    return f"Batch size: {' x '.join(parts)} = {global_batch} images per optimizer step"
