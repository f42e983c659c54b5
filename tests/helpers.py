"""What several test files share: the repository root, the entry scripts as modules, tiny data."""

import csv
import importlib.util
import math
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """train.py / eval.py / predict.py as a module, so tests call their functions in-process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_sample_overrides(root: Path, num_train: int, num_val: int, val_batch_size: int = 2) -> list[str]:
    """Config overrides for a few small sample scenes: a training run in seconds."""
    return [
        f"data.root={root}",
        f"data.dataset.num_train={num_train}",
        f"data.dataset.num_val={num_val}",
        "data.batch_size=2",
        f"data.val_batch_size={val_batch_size}",
        "data.num_workers=0",
        "data.crop_size=[64,64]",
        "data.inference.scales=[1.0]",
        "data.inference.flip=false",
    ]


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSVLogger metrics.csv."""
    with open(path) as handle:
        return list(csv.DictReader(handle))


class RandomScenes(Dataset):
    """Random 32x32 images with 3 classes; the images listed in ``nan`` are all NaN."""

    def __init__(self, size: int = 4, nan: tuple[int, ...] = ()) -> None:
        self.size, self.nan = size, nan

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        pixels = torch.randn(3, 32, 32, generator=generator)
        if index in self.nan:
            pixels.fill_(math.nan)
        return {"pixel_values": pixels, "labels": torch.randint(0, 3, (32, 32), generator=generator)}


class CreatesAFile:
    """Unpickling this runs code: it creates ``path``."""

    def __init__(self, path, via_shell: bool) -> None:
        self.path, self.via_shell = path, via_shell

    def __reduce__(self):
        import os
        import pathlib

        if self.via_shell:
            return os.system, (f"touch {self.path}",)
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def malicious_checkpoint(path: Path, marker: Path, via_shell: bool = False) -> Path:
    """A SegFormer state dict plus an object whose unpickling creates ``marker``."""
    from segformer import SegFormer

    state = {"model." + k: v for k, v in SegFormer("b0", num_classes=2).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": CreatesAFile(marker, via_shell)}, path)
    return path
