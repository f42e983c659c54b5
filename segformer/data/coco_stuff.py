"""COCO-Stuff 164k read from the official stuffthingmaps, mapped to its 171 classes on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
from segformer.data.labels import (
    COCO_STUFF_CLASSES,
    COCO_STUFF_NUM_RAW_IDS,
    COCO_STUFF_PALETTE,
    COCO_STUFF_UNUSED_IDS,
)

COCO_STUFF_LAYOUT = (
    "<root>/images/{train2017,val2017}/*.jpg and <root>/annotations/{train2017,val2017}/*.png "
    "(the stuffthingmaps_trainval2017 PNGs, or MMSegmentation's *_labelTrainIds.png), root being "
    "that folder or its parent coco_stuff164k/"
)


def coco_stuff_label_map() -> np.ndarray:
    """Raw stuffthingmap id -> training id: the 171 used ids of 0..181 in order, all else 255."""
    table = np.full(256, IGNORE_INDEX, dtype=np.int16)
    used = [i for i in range(COCO_STUFF_NUM_RAW_IDS) if i not in COCO_STUFF_UNUSED_IDS]
    table[used] = np.arange(len(used))
    return table


class COCOStuff(_PairedFilesDataset):
    """COCO-Stuff 164k; raw ids map to the 171 training ids as MMSegmentation's conversion does.

    A mask ``<name>_labelTrainIds.png`` (already converted) is read as training ids and wins over
    the raw ``<name>.png`` next to it.
    """

    SPLITS = {"train": "train2017", "val": "val2017"}
    FOLDER = "coco_stuff164k"
    TRAIN_IDS_SUFFIX = "_labelTrainIds"

    def __init__(self, root: str | Path, split: str = "train") -> None:
        folder = _check_split("COCO-Stuff", split, self.SPLITS)
        root = Path(root).expanduser()
        what = f"COCO-Stuff root {root}"
        base = find_dataset_folder(root, "annotations", (self.FOLDER,))
        if base is None:
            problem = f"neither {root / 'annotations'} nor {root / self.FOLDER / 'annotations'} exists"
            raise layout_error(what, problem, COCO_STUFF_LAYOUT)
        image_dir, mask_dir = base / "images" / folder, base / "annotations" / folder
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                raise layout_error(what, f"the folder {directory} does not exist", COCO_STUFF_LAYOUT)
        masks = _list_by_stem(mask_dir, (".png",))
        masks = {stem: path for stem, path in masks.items() if not stem.endswith(self.TRAIN_IDS_SUFFIX)}
        masks.update(_list_by_stem(mask_dir, (".png",), strip=self.TRAIN_IDS_SUFFIX))
        pairs = _pair_by_stem(_list_by_stem(image_dir, (".jpg", ".jpeg", ".png")), masks, image_dir, mask_dir)
        self.raw_map = coco_stuff_label_map()
        train_ids_map = identity_label_map(len(COCO_STUFF_CLASSES))
        prediction_map = _inverse(self.raw_map, IGNORE_INDEX)
        super().__init__(split, COCO_STUFF_CLASSES, COCO_STUFF_PALETTE, pairs, train_ids_map, prediction_map, base)

    def label_map_for(self, mask_path: Path) -> np.ndarray:
        return self.label_map if mask_path.stem.endswith(self.TRAIN_IDS_SUFFIX) else self.raw_map
