"""Scan a dataset before a run costs a GPU-day: ``python -m segformer.data.check data=... data.root=...``.

Every sample of each split goes through the same reader training uses, so the checks are the
readers' own (unreadable or truncated files, mask/image size mismatch, mask values outside the
classes; images without masks and empty splits fail when a split is opened). The report lists
each problem with its file, counts the images per split and shows the pixel share of every
class. Exit status 1 when a problem was found, 0 otherwise, 2 for a mistake in the command
(including a root where no split can be opened).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from segformer import cli
from segformer.data.datamodule import SegDataModule
from segformer.data.datasets import IGNORE_INDEX, SegmentationDataset
from segformer.errors import DataError, UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PROBLEMS_FOUND_EXIT = 1


@dataclass
class SplitReport:
    """What scanning one split found."""

    split: str
    images: int = 0
    problems: list[str] = field(default_factory=list)
    # Pixels per class id 0..K-1, then ignored (255) pixels.
    pixels: np.ndarray | None = None


class _Scan(Dataset):
    """Sample i -> (problem message or None, pixel counts per class + ignored)."""

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str | None, np.ndarray | None]:
        try:
            mask = self.dataset[index]["mask"]
        except DataError as error:
            return str(error), None
        counts = np.bincount(mask.ravel(), minlength=256)
        return None, np.append(counts[: self.dataset.num_classes], counts[IGNORE_INDEX])


def _unbatched(item: Any) -> Any:
    return item


def scan_split(datamodule: SegDataModule, split: str, num_workers: int = 0) -> SplitReport:
    """Read every sample of ``split``; a split that cannot be opened is one problem."""
    report = SplitReport(split)
    try:
        dataset = datamodule.dataset(split)
    except UserError as error:
        report.problems.append(str(error))
        return report
    report.images = len(dataset)
    report.pixels = np.zeros(dataset.num_classes + 1, dtype=np.int64)
    loader = DataLoader(_Scan(dataset), batch_size=None, num_workers=num_workers, collate_fn=_unbatched)
    for problem, counts in loader:
        if problem is not None:
            report.problems.append(problem)
        else:
            report.pixels += counts
    return report


def check_dataset(
    datamodule: SegDataModule, splits: Sequence[str] | None = None, num_workers: int = 0
) -> list[SplitReport]:
    """Scan ``splits`` (default: the data module's train, val and test splits, each once)."""
    names = list(dict.fromkeys(splits if splits else datamodule.splits.values()))
    return [scan_split(datamodule, name, num_workers) for name in names]


def print_report(
    reports: Sequence[SplitReport], classes: Sequence[str], console: Console, max_listed: int = 50
) -> None:
    """Summary per split, class pixel shares, then the problems (at most ``max_listed``)."""
    summary = Table(title="Dataset check")
    for column in ("split", "images", "problems"):
        summary.add_column(column, justify="left" if column == "split" else "right")
    for report in reports:
        summary.add_row(report.split, str(report.images), str(len(report.problems)))
    console.print(summary)

    scanned = [r for r in reports if r.pixels is not None and r.pixels.sum() > 0]
    if scanned and classes:
        histogram = Table(title="Class pixels (% of the split)")
        histogram.add_column("id", justify="right")
        histogram.add_column("class")
        for report in scanned:
            histogram.add_column(report.split, justify="right")
        shares = [100.0 * r.pixels / r.pixels.sum() for r in scanned]
        for k, name in enumerate([*classes, "(ignored)"]):
            label = str(k) if k < len(classes) else str(IGNORE_INDEX)
            histogram.add_row(label, name, *(f"{share[k]:.2f}" for share in shares))
        console.print(histogram)
        for report in scanned:
            absent = [classes[k] for k in range(len(classes)) if report.pixels[k] == 0]
            if absent:
                names = ", ".join(absent)
                console.print(f"Note: split {report.split!r} has no pixel of {len(absent)} class(es): {names}")

    problems = [(r.split, p) for r in reports for p in r.problems]
    for split, problem in problems[:max_listed]:
        console.print(f"[bold red]{split}:[/] {problem}", markup=True, highlight=False, soft_wrap=True)
    if len(problems) > max_listed:
        console.print(f"... and {len(problems) - max_listed} more problem(s) (max_listed={max_listed}).")
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s) found.[/]")
    else:
        console.print("[bold green]No problem found.[/]")


def check(cfg: DictConfig) -> int:
    """The command: scan, print the report, and return how many problems were found."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    splits = [cfg.splits] if isinstance(cfg.splits, str) else list(cfg.splits or []) or None
    reports = check_dataset(datamodule, splits, datamodule.num_workers)
    opened = [r for r in reports if r.pixels is not None]
    if not opened:
        # Not one split opens (a wrong root, a wrong dataset type): a mistake in the command.
        raise DataError(reports[0].problems[0])
    classes = datamodule.dataset(opened[0].split).classes
    print_report(reports, classes, Console(), cfg.max_listed)
    found = sum(len(r.problems) for r in reports)
    if found:
        sys.exit(PROBLEMS_FOUND_EXIT)
    return found


if __name__ == "__main__":
    cli.run(check, CONFIG_DIR, "check")
