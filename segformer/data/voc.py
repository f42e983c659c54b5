"""Pascal VOC 2012 segmentation, optionally with the SBD-augmented training set (10,582 images)."""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from segformer.data.datasets import (
    IGNORE_INDEX,
    _check_split,
    _inverse,
    _named,
    _PairedFilesDataset,
    find_dataset_folder,
    identity_label_map,
    layout_error,
)
from segformer.data.labels import VOC_CLASSES, VOC_PALETTE
from segformer.errors import DataError

log = logging.getLogger(__name__)

VOC_LAYOUT = (
    "<root>/VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, "
    "ImageSets/Segmentation/{train,val}.txt} (+ SegmentationClassAug/*.png and "
    "ImageSets/Segmentation/trainaug.txt for the SBD set), root being VOC2012, VOCdevkit or their parent"
)


class PascalVOC(_PairedFilesDataset):
    """Pascal VOC 2012: 21 classes (0 = background), 255 = object boundary, ignored.

    Masks are read as their pixel indices, so the palette PNGs of ``SegmentationClass`` and the
    plain ones of ``SegmentationClassAug`` read alike. ``augmented`` picks the train split:
    the SBD-augmented set (``SegmentationClassAug`` with the list ``trainaug.txt`` or
    ``train_aug.txt``, or MMSegmentation's ``aug.txt`` added to ``train.txt``) when true, VOC's
    own ``train.txt`` when false, and the augmented set whenever it is present when None.
    Validation is always ``val.txt`` on ``SegmentationClass``.
    """

    SPLITS = {"train": "train", "val": "val"}
    FOLDERS = ("VOC2012", "VOCdevkit/VOC2012")
    AUG_LISTS = ("trainaug.txt", "train_aug.txt")
    MMSEG_AUG_LIST = "aug.txt"

    def __init__(self, root: str | Path, split: str = "train", augmented: bool | None = None) -> None:
        list_name = _check_split("Pascal VOC", split, self.SPLITS)
        root = Path(root).expanduser()
        what = f"Pascal VOC root {root}"
        base = find_dataset_folder(root, "JPEGImages", self.FOLDERS)
        if base is None:
            searched = ", ".join(str(b / "JPEGImages") for b in (root, *(root / f for f in self.FOLDERS)))
            raise layout_error(what, f"none of {searched} exists", VOC_LAYOUT)
        lists_dir, aug_dir = base / "ImageSets" / "Segmentation", base / "SegmentationClassAug"
        mask_dirs = [base / "SegmentationClass"]
        lists = [lists_dir / f"{list_name}.txt"]
        self.augmented = False
        if split == "train" and augmented is not False:
            aug_lists = self._augmented_lists(lists_dir)
            if aug_dir.is_dir() and aug_lists:
                mask_dirs, lists, self.augmented = [aug_dir, *mask_dirs], aug_lists, True
            elif augmented:
                missing = aug_dir if not aug_dir.is_dir() else lists_dir / self.AUG_LISTS[0]
                raise layout_error(
                    what, f"data.dataset.augmented=true but {missing} does not exist (set it to false for "
                    "VOC's own 1,464 training images)", VOC_LAYOUT
                )
        for needed in (*mask_dirs, *lists):
            if not needed.exists():
                raise layout_error(what, f"{needed} does not exist", VOC_LAYOUT)
        names = list(dict.fromkeys(name for listed in lists for name in _read_list(listed)))
        listed_in = " + ".join(str(p) for p in lists)
        pairs = _pairs(names, base / "JPEGImages", mask_dirs, listed_in)
        if self.augmented:
            log.info("Pascal VOC train: %d images of the SBD-augmented set (%s)", len(pairs), listed_in)
        label_map = identity_label_map(len(VOC_CLASSES))
        super().__init__(split, VOC_CLASSES, VOC_PALETTE, pairs, label_map, _inverse(label_map, IGNORE_INDEX), base)

    @classmethod
    def _augmented_lists(cls, lists_dir: Path) -> list[Path]:
        for name in cls.AUG_LISTS:
            if (lists_dir / name).is_file():
                return [lists_dir / name]
        mmseg = lists_dir / cls.MMSEG_AUG_LIST
        return [lists_dir / "train.txt", mmseg] if mmseg.is_file() else []


def _read_list(path: Path) -> list[str]:
    """Image ids of a list file: one per line, either ``<id>`` or DeepLab's ``/JPEGImages/<id>.jpg ...``."""
    return [PurePosixPath(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]


def _pairs(names: list[str], image_dir: Path, mask_dirs: list[Path], listed_in: str) -> list[tuple[Path, Path]]:
    """(image, mask) per listed id, the mask from the first of ``mask_dirs`` that has it."""
    missing_images = [image_dir / f"{n}.jpg" for n in names if not (image_dir / f"{n}.jpg").is_file()]
    if missing_images:
        raise DataError(
            f"{listed_in} names {len(missing_images)} image(s) that do not exist: {_named(missing_images)}."
        )
    pairs, missing_masks = [], []
    for name in names:
        mask = next((d / f"{name}.png" for d in mask_dirs if (d / f"{name}.png").is_file()), None)
        if mask is None:
            missing_masks.append(image_dir / f"{name}.jpg")
        else:
            pairs.append((image_dir / f"{name}.jpg", mask))
    if missing_masks:
        raise DataError(
            f"{len(missing_masks)} image(s) listed in {listed_in} without a mask: {_named(missing_masks)} "
            f"(no <id>.png in {' or '.join(map(str, mask_dirs))})."
        )
    return pairs
