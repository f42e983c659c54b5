"""Mapillary Vistas v1.2 read as MMSegmentation's ``MapillaryDataset_v1`` (66 classes)."""

from __future__ import annotations

from pathlib import Path

from segformer.data.datasets import (
    IGNORE_INDEX,
    _check_split,
    _inverse,
    _list_by_stem,
    _pair_by_stem,
    _PairedFilesDataset,
    find_dataset_folder,
    identity_label_map,
    layout_error,
)
from segformer.data.labels import MAPILLARY_CLASSES, MAPILLARY_PALETTE

MAPILLARY_LAYOUT = (
    "<root>/{training,validation}/images/*.jpg and <root>/{training,validation}/labels/*.png "
    "(v1.2 archive; the v2.0 archive's {training,validation}/v1.2/labels also works), root being "
    "that folder or its parent mapillary/"
)


class MapillaryVistas(_PairedFilesDataset):
    """Mapillary Vistas v1.2: the label PNGs' indices 0..65 are the training ids, 255 is ignored.

    As in MMSegmentation's ``MapillaryDataset_v1``, 65 "Unlabeled" is a class; with
    ``ignore_unlabeled`` it is ignored instead, leaving 65 classes (its ``mapillary_v1_65``
    config, the one its published Mapillary model is trained with).
    """

    SPLITS = {"train": "training", "val": "validation"}
    FOLDER = "mapillary"
    UNLABELED = len(MAPILLARY_CLASSES) - 1

    def __init__(self, root: str | Path, split: str = "train", ignore_unlabeled: bool = False) -> None:
        folder = _check_split("Mapillary Vistas", split, self.SPLITS)
        root = Path(root).expanduser()
        what = f"Mapillary Vistas root {root}"
        base = find_dataset_folder(root, folder, (self.FOLDER,))
        if base is None:
            problem = f"neither {root / folder} nor {root / self.FOLDER / folder} exists"
            raise layout_error(what, problem, MAPILLARY_LAYOUT)
        image_dir = base / folder / "images"
        mask_dir = base / folder / "v1.2" / "labels"
        if not mask_dir.is_dir():
            mask_dir = base / folder / "labels"
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                raise layout_error(what, f"the folder {directory} does not exist", MAPILLARY_LAYOUT)
        pairs = _pair_by_stem(
            _list_by_stem(image_dir, (".jpg", ".jpeg")), _list_by_stem(mask_dir, (".png",)), image_dir, mask_dir
        )
        classes, palette = list(MAPILLARY_CLASSES), list(MAPILLARY_PALETTE)
        label_map = identity_label_map(len(classes))
        if ignore_unlabeled:
            classes, palette = classes[: self.UNLABELED], palette[: self.UNLABELED]
            label_map[self.UNLABELED] = IGNORE_INDEX
        # Predictions go back to label ids; an ignored pixel is written as "Unlabeled".
        super().__init__(split, classes, palette, pairs, label_map, _inverse(label_map, self.UNLABELED), base)
