"""What several test files share: the repository root and the entry scripts as modules."""

import csv
import importlib.util
from pathlib import Path
from types import ModuleType

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
