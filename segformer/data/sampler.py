"""Samplers: the train sampler that resumes mid-epoch, and the evaluation split across ranks.

Train: Lightning restarts an epoch's data from its first batch when a run resumes. ``ResumableSampler``
instead draws each epoch's order from ``(seed, epoch)`` alone and can start an epoch at any
position, so a resumed run sees exactly the batches the interrupted one had not consumed yet.
It also hands every sample a seed of its own, derived from ``(seed, epoch, index)``, for the
augmentation pipeline: augmentations then depend on neither the worker that loads a sample nor
the state of any global generator, which a resumed run could not reproduce.

Evaluation: Lightning's ``DistributedSampler`` pads the split with repeated images so that every
rank gets as many as the others; they would be counted twice in the dataset-level confusion
matrix. ``EvalSampler`` gives each image to exactly one rank instead. (Lightning's
``UnrepeatedDistributedSampler`` splits the same way but needs the process group when it is
built, which eval.py's loader is not, and asserts where we name the problem.)

Both split the data across ranks themselves, so the Trainer must not substitute its own
sampler: ``use_distributed_sampler: false`` (configs/trainer/default.yaml).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from segformer.errors import DataError


def run_seed() -> int:
    """The run's seed: the one ``lightning.seed_everything`` set, else a fresh random one."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        return int(seed)
    return int(np.random.SeedSequence().generate_state(1, np.uint32)[0])


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (``SeedSequence`` mixes them, so nearby keys
    give unrelated streams)."""
    low, high = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32).tolist()
    return ((high << 32) | low) & (2**63 - 1)


def _world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled train order per epoch, split across ranks, that can resume at any position.

    Yields ``(index, seed)`` pairs: the sample and the seed of its augmentation. The order of
    epoch ``e`` is a permutation drawn from ``(seed, e)``; under DDP it is padded by repetition
    to a multiple of the world size and rank ``r`` takes every ``world``-th entry from ``r``, as
    ``DistributedSampler`` does. The rank and world size are read from ``torch.distributed`` when
    an epoch starts.

    ``state_dict()`` holds the seed, the epoch and ``consumed``: how many of this rank's samples
    of the epoch training has used, which only the training loop knows (loaders read ahead), so
    the data module passes it in. After ``load_state_dict`` the next iteration starts after them;
    ``set_epoch`` to another epoch starts that epoch from its beginning.
    """

    def __init__(self, dataset: Sized, seed: int | None = None, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = run_seed() if seed is None else int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self._start = 0

    @property
    def num_replicas(self) -> int:
        return _world()[1]

    @property
    def rank(self) -> int:
        return _world()[0]

    @property
    def num_samples(self) -> int:
        return -(-len(self.dataset) // self.num_replicas)

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices of ``epoch``, in order."""
        size = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            order = torch.randperm(size, generator=generator).tolist()
        else:
            order = list(range(size))
        world = self.num_replicas
        total = self.num_samples * world
        order += (order * (total // max(size, 1) + 1))[: total - size]
        return order[self.rank : total : world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._start = self._start, 0
        epoch = self.epoch
        return iter([(index, derived_seed(self.seed, epoch, index)) for index in self.indices(epoch)[start:]])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": int(consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._start = int(state["consumed"])


class EvalSampler(Sampler[int]):
    """Image i goes to rank ``i % world_size``, in order, without padding; ranks may differ by one.

    The rank and world size are read from ``torch.distributed`` each time the sampler is used (a
    loader built before the processes start, as eval.py builds it, still splits correctly);
    ``num_replicas`` / ``rank`` fix them instead. Without a process group it yields every image.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.dataset = dataset
        self._num_replicas, self._rank = num_replicas, rank

    @property
    def num_replicas(self) -> int:
        return _world()[1] if self._num_replicas is None else self._num_replicas

    @property
    def rank(self) -> int:
        return _world()[0] if self._rank is None else self._rank

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
