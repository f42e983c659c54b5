"""Datasets that read segmentation data from disk and return raw training-id samples.

Every dataset gives item ``i`` as ``{"image": (H, W, 3) uint8 RGB, "mask": (H, W) uint8,
"name": str}`` with masks already in training ids (0..num_classes-1, 255 = ignore), so the
transforms, the loss and the metrics never see a dataset's own label encoding. The layout is
checked when a dataset is built (folders, image/mask pairing) so a wrong root fails at once;
problems of a single file (corrupt, truncated, wrong size, bad values) are reported when the
file is read, naming it.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from segformer.data.labels import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_NUM_LABEL_IDS,
    CITYSCAPES_PALETTE,
    CITYSCAPES_TRAIN_TO_LABEL_ID,
    generated_palette,
)
from segformer.errors import ConfigError, DataError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_INVALID = -1
_LISTED = 5  # how many offending files an error message names before summarising


class RawSample(NamedTuple):
    """A sample as read, before its mask is mapped to training ids."""

    image: np.ndarray
    mask: np.ndarray
    name: str
    image_source: str
    mask_source: str
    label_map: np.ndarray


def identity_label_map(num_classes: int) -> np.ndarray:
    """Label map for masks already in training ids: 0..K-1 kept, 255 ignored, others invalid."""
    table = np.full(256, _INVALID, dtype=np.int16)
    table[:num_classes] = np.arange(num_classes)
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


def reduced_label_map(num_classes: int) -> np.ndarray:
    """Label map for masks where 0 means "other": 0 -> 255, k -> k-1, 255 stays ignored."""
    table = np.full(256, _INVALID, dtype=np.int16)
    table[0] = IGNORE_INDEX
    table[1 : num_classes + 1] = np.arange(num_classes)
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


def _inverse(label_map: np.ndarray, ignore_to: int) -> np.ndarray:
    """Training id -> dataset id table (for saving predictions in the dataset's encoding)."""
    inverse = np.full(256, ignore_to, dtype=np.uint8)
    for dataset_id, train_id in enumerate(label_map.tolist()):
        if 0 <= train_id < IGNORE_INDEX and inverse[train_id] == ignore_to:
            inverse[train_id] = dataset_id
    return inverse


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB, naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(
            f"Cannot read image {path}: {error}. The file is corrupt, truncated or not an image; "
            "re-extract the dataset or remove the file together with its mask."
        ) from error


def read_mask(path: Path) -> np.ndarray:
    """Decode a mask file to (H, W) uint8 class ids (palette images give their indices)."""
    try:
        with Image.open(path) as mask:
            mask.load()
            return pil_mask_to_array(mask, str(path))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(
            f"Cannot read mask {path}: {error}. The file is corrupt, truncated or not an image; "
            "re-extract the dataset or remove the file together with its image."
        ) from error


def pil_mask_to_array(mask: Image.Image, source: str) -> np.ndarray:
    """Class ids of a single-channel mask; colour masks are refused because ids are ambiguous."""
    if mask.mode in ("L", "P"):
        return np.asarray(mask)
    if mask.mode in ("1", "I", "I;16", "I;16B", "I;16L"):
        values = np.asarray(mask)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DataError(
                f"Mask {source} holds values up to {int(values.max())}; masks must store class ids "
                "0-255 (255 = ignore) in a single-channel 8-bit image."
            )
        return values.astype(np.uint8)
    raise DataError(
        f"Mask {source} is a {mask.mode} image; masks must be single-channel images (mode L or P) "
        "whose pixel values are class ids. Convert colour-coded masks to class ids first."
    )


def _expected_layout_error(what: str, problem: str, layout: str) -> DataError:
    return DataError(f"{what}: {problem}. Expected layout:\n{layout}")


def layout_error(what: str, problem: str, layout: str) -> DataError:
    """One line: the dataset root, what is wrong there (naming the path) and the layout expected."""
    return DataError(f"{what}: {problem}; expected {layout}.")


def find_dataset_folder(root: Path, marker: str, children: Sequence[str]) -> Path | None:
    """``root`` if it holds the folder ``marker``, else the first ``root/<child>`` that does."""
    for base in (root, *(root / child for child in children)):
        if (base / marker).is_dir():
            return base
    return None


def _list_by_stem(directory: Path, suffixes: Sequence[str], strip: str = "") -> dict[str, Path]:
    """Files of a folder tree keyed by stem (minus ``strip``); duplicate stems are an error."""
    files: dict[str, Path] = {}
    for path in sorted(directory.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        stem = path.stem
        if strip:
            if not stem.endswith(strip):
                continue
            stem = stem[: -len(strip)]
        if stem in files:
            raise DataError(
                f"Two files in {directory} share the name {stem!r}: {files[stem]} and {path}. "
                "Images and masks are matched by file name, so names must be unique."
            )
        files[stem] = path
    return files


def _named(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:_LISTED])
    more = len(paths) - _LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _pair_by_stem(
    images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path
) -> list[tuple[Path, Path]]:
    """Image/mask pairs; an image without a mask (or the reverse) is named."""
    lonely_images = [images[s] for s in images if s not in masks]
    if lonely_images:
        raise DataError(
            f"{len(lonely_images)} image(s) without a mask: {_named(lonely_images)}. Each image in "
            f"{image_dir} needs a mask with the same file name in {mask_dir}."
        )
    lonely_masks = [masks[s] for s in masks if s not in images]
    if lonely_masks:
        raise DataError(
            f"{len(lonely_masks)} mask(s) without an image: {_named(lonely_masks)}. Each mask in "
            f"{mask_dir} needs an image with the same file name in {image_dir}."
        )
    return [(images[s], masks[s]) for s in sorted(images)]


class SegmentationDataset(Dataset, abc.ABC):
    """Raw (image, training-id mask) samples of one split, with the class names and palette."""

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        split: str,
        classes: Sequence[str],
        palette: Sequence[Sequence[int]] | None,
        prediction_map: np.ndarray,
    ) -> None:
        self.split = split
        self.classes = [str(c) for c in classes]
        self.palette = [[int(v) for v in colour] for colour in palette] if palette else generated_palette(
            len(self.classes)
        )
        if len(self.palette) != len(self.classes):
            raise ConfigError(
                f"{type(self).__name__} has {len(self.classes)} classes but a palette of "
                f"{len(self.palette)} colours; give one [r, g, b] per class."
            )
        self._prediction_map = prediction_map

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, index: int) -> RawSample:
        """Decode sample ``index`` in the dataset's own label encoding."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.read(index)
        image, mask = sample.image, sample.mask
        if image.shape[:2] != mask.shape[:2]:
            raise DataError(
                f"Mask {sample.mask_source} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
                f"{sample.image_source} is {image.shape[0]}x{image.shape[1]}; a mask must have the "
                "size of its image."
            )
        mapped = np.take(sample.label_map, mask)
        if mapped.min(initial=0) < 0:
            bad = np.unique(mask[mapped < 0]).tolist()
            valid = np.flatnonzero(sample.label_map >= 0)
            raise DataError(
                f"Mask {sample.mask_source} holds value(s) {bad[:10]} outside the label range of "
                f"{type(self).__name__} ({len(self.classes)} classes; valid raw values are "
                f"{_ranges(valid)}). Check num_classes and label reduction, or fix the mask."
            )
        return {"image": image, "mask": mapped.astype(np.uint8), "name": sample.name}

    def to_dataset_ids(self, pred: np.ndarray) -> np.ndarray:
        """Map training-id predictions back to the dataset's own ids, e.g. to save them."""
        return np.take(self._prediction_map, np.asarray(pred))


def _ranges(values: np.ndarray) -> str:
    """Compact text for a sorted id list, e.g. '0-150, 255'."""
    parts, start, prev = [], None, None
    for v in values.tolist() + [None]:
        if start is None:
            start = prev = v
        elif v is not None and v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = v
    return ", ".join(parts)


class _PairedFilesDataset(SegmentationDataset):
    """A dataset whose samples are (image file, mask file) pairs."""

    def __init__(
        self,
        split: str,
        classes: Sequence[str],
        palette: Sequence[Sequence[int]] | None,
        pairs: list[tuple[Path, Path]],
        label_map: np.ndarray,
        prediction_map: np.ndarray,
        where: Path,
    ) -> None:
        super().__init__(split, classes, palette, prediction_map)
        if not pairs:
            raise DataError(f"{type(self).__name__} split {split!r} in {where} holds no images.")
        self.pairs = pairs
        self.label_map = label_map

    def __len__(self) -> int:
        return len(self.pairs)

    def label_map_for(self, mask_path: Path) -> np.ndarray:
        return self.label_map

    def read(self, index: int) -> RawSample:
        image_path, mask_path = self.pairs[index]
        return RawSample(
            image=read_image(image_path),
            mask=read_mask(mask_path),
            name=image_path.stem,
            image_source=str(image_path),
            mask_source=str(mask_path),
            label_map=self.label_map_for(mask_path),
        )


def _check_split(dataset: str, split: str, splits: Mapping[str, str]) -> str:
    if split not in splits:
        raise ConfigError(f"{dataset} has no split {split!r}; choose one of {sorted(splits)}.")
    return splits[split]


ADE20K_LAYOUT = """\
  <root>/ADEChallengeData2016/     (root may also be this folder itself)
    images/training/*.jpg          images/validation/*.jpg
    annotations/training/*.png     annotations/validation/*.png   (0 = other, 1..150 = classes)"""


class ADE20K(_PairedFilesDataset):
    """ADE20K (``ADEChallengeData2016``): 0 = "other" is ignored and class k becomes k-1.

    ``classes``/``palette`` replace the 150 official ones for data in the same layout and
    encoding (the bundled sample scenes use this).
    """

    SPLITS = {"train": "training", "val": "validation"}
    FOLDER = "ADEChallengeData2016"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        classes: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
    ) -> None:
        folder = _check_split("ADE20K", split, self.SPLITS)
        base = self.locate(Path(root).expanduser())
        image_dir, mask_dir = base / "images" / folder, base / "annotations" / folder
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                raise _expected_layout_error(
                    f"ADE20K root {root}", f"the folder {directory} does not exist", ADE20K_LAYOUT
                )
        pairs = _pair_by_stem(
            _list_by_stem(image_dir, IMAGE_SUFFIXES), _list_by_stem(mask_dir, (".png",)), image_dir, mask_dir
        )
        classes = list(classes) if classes is not None else list(ADE20K_CLASSES)
        if palette is None and len(classes) == len(ADE20K_CLASSES):
            palette = ADE20K_PALETTE
        label_map = reduced_label_map(len(classes))
        super().__init__(split, classes, palette, pairs, label_map, _inverse(label_map, 0), base)

    @classmethod
    def locate(cls, root: Path) -> Path:
        """The ADEChallengeData2016 folder: ``root`` itself or its child of that name."""
        if not root.exists():
            raise _expected_layout_error(f"ADE20K root {root}", "the path does not exist", ADE20K_LAYOUT)
        found = find_dataset_folder(root, "images", (cls.FOLDER,))
        if found is not None:
            return found
        raise _expected_layout_error(
            f"ADE20K root {root}",
            f"neither {root / 'images'} nor {root / cls.FOLDER / 'images'} exists",
            ADE20K_LAYOUT,
        )


CITYSCAPES_LAYOUT = """\
  <root>/leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
  <root>/gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png
      (or <name>_gtFine_labelTrainIds.png, used when present)"""


class Cityscapes(_PairedFilesDataset):
    """Cityscapes fine annotations; labelIds map to the 19 trainIds on the fly (others -> 255)."""

    SPLITS = {"train": "train", "val": "val", "test": "test"}
    IMAGE_SUFFIX = "_leftImg8bit"
    LABEL_IDS_SUFFIX = "_gtFine_labelIds"
    TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds"

    def __init__(self, root: str | Path, split: str = "train") -> None:
        folder = _check_split("Cityscapes", split, self.SPLITS)
        root = Path(root).expanduser()
        if not root.exists():
            raise _expected_layout_error(f"Cityscapes root {root}", "the path does not exist", CITYSCAPES_LAYOUT)
        image_dir, mask_dir = root / "leftImg8bit" / folder, root / "gtFine" / folder
        for directory in (image_dir, mask_dir):
            if not directory.is_dir():
                raise _expected_layout_error(
                    f"Cityscapes root {root}", f"the folder {directory} does not exist", CITYSCAPES_LAYOUT
                )
        masks = _list_by_stem(mask_dir, (".png",), strip=self.LABEL_IDS_SUFFIX)
        masks.update(_list_by_stem(mask_dir, (".png",), strip=self.TRAIN_IDS_SUFFIX))
        images = _list_by_stem(image_dir, (".png",), strip=self.IMAGE_SUFFIX)
        pairs = _pair_by_stem(images, masks, image_dir, mask_dir)

        self.label_ids_map = np.full(256, _INVALID, dtype=np.int16)
        self.label_ids_map[:CITYSCAPES_NUM_LABEL_IDS] = IGNORE_INDEX
        self.label_ids_map[IGNORE_INDEX] = IGNORE_INDEX
        for train_id, label_id in enumerate(CITYSCAPES_TRAIN_TO_LABEL_ID):
            self.label_ids_map[label_id] = train_id
        train_ids_map = identity_label_map(len(CITYSCAPES_CLASSES))
        prediction_map = _inverse(self.label_ids_map, 0)
        super().__init__(
            split, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, pairs, train_ids_map, prediction_map, root
        )

    def label_map_for(self, mask_path: Path) -> np.ndarray:
        return self.label_ids_map if mask_path.stem.endswith(self.LABEL_IDS_SUFFIX) else self.label_map


FOLDER_LAYOUT = """\
  <root>/images/<split>/<name>.{jpg,png,...}
  <root>/masks/<split>/<name>.png      (single-channel class ids, 255 = ignore)"""


class FolderDataset(_PairedFilesDataset):
    """Custom data: ``images/<split>/`` and ``masks/<split>/`` matched by file name.

    Masks hold training ids 0..num_classes-1 (255 = ignore); with ``reduce_labels`` they hold
    0 = unlabelled and 1..num_classes as in ADE20K.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        num_classes: int | None = None,
        classes: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        reduce_labels: bool = False,
        image_dir: str = "images",
        mask_dir: str = "masks",
    ) -> None:
        classes = _class_names(type(self).__name__, num_classes, classes)
        root = Path(root).expanduser()
        if not root.exists():
            raise _expected_layout_error(f"Folder dataset root {root}", "the path does not exist", FOLDER_LAYOUT)
        images_at, masks_at = root / image_dir / split, root / mask_dir / split
        for directory in (images_at, masks_at):
            if not directory.is_dir():
                raise _expected_layout_error(
                    f"Folder dataset root {root}", f"the folder {directory} does not exist", FOLDER_LAYOUT
                )
        pairs = _pair_by_stem(
            _list_by_stem(images_at, IMAGE_SUFFIXES), _list_by_stem(masks_at, IMAGE_SUFFIXES), images_at, masks_at
        )
        label_map = _label_map(len(classes), reduce_labels)
        prediction_map = _inverse(label_map, 0 if reduce_labels else IGNORE_INDEX)
        super().__init__(split, classes, palette, pairs, label_map, prediction_map, root)


def _label_map(num_classes: int, reduce_labels: bool) -> np.ndarray:
    limit = IGNORE_INDEX - 1 if reduce_labels else IGNORE_INDEX
    if not 1 <= num_classes <= limit:
        raise ConfigError(f"num_classes={num_classes} is out of range; it must be 1..{limit}.")
    return reduced_label_map(num_classes) if reduce_labels else identity_label_map(num_classes)


def _class_names(dataset: str, num_classes: int | None, classes: Sequence[str] | None) -> list[str]:
    if classes is None:
        if num_classes is None:
            raise ConfigError(f"{dataset} needs num_classes (or a list of class names).")
        return [f"class_{k}" for k in range(num_classes)]
    if num_classes is not None and len(classes) != num_classes:
        raise ConfigError(f"{dataset}: num_classes={num_classes} but {len(classes)} class names were given.")
    return list(classes)


HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


class HFDataset(SegmentationDataset):
    """Any Hugging Face ``datasets`` source with an image column and a mask column.

    ``source`` is a hub name (needs network), a folder written by ``save_to_disk``, a folder of
    parquet files (splits inferred from file names such as ``train-*.parquet``) or one parquet
    file (its rows form the ``train`` split). ``split_names`` maps train/val/test to the
    source's own split names when they differ from train/validation/test.
    """

    def __init__(
        self,
        source: str | Path,
        split: str = "train",
        num_classes: int | None = None,
        image_column: str = "image",
        mask_column: str = "annotation",
        id2label: Mapping[int | str, str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        reduce_labels: bool = False,
        split_names: Mapping[str, str] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        classes = _hf_classes(num_classes, id2label)
        self.source = str(source)
        self.data = _load_hf_split(self.source, split, split_names, cache_dir)
        missing = [c for c in (image_column, mask_column) if c not in self.data.column_names]
        if missing:
            raise ConfigError(
                f"Hugging Face dataset {self.source} (split {split!r}) has no column(s) {missing}; its "
                f"columns are {self.data.column_names}. Set image_column / mask_column."
            )
        self.image_column, self.mask_column = image_column, mask_column
        self.label_map = _label_map(len(classes), reduce_labels)
        prediction_map = _inverse(self.label_map, 0 if reduce_labels else IGNORE_INDEX)
        super().__init__(split, classes, palette, prediction_map)

    def __len__(self) -> int:
        return len(self.data)

    def read(self, index: int) -> RawSample:
        where = f"{self.source} [{self.split} row {index}]"
        try:
            row = self.data[index]
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"Cannot decode {where}: {error}. The stored image or mask is corrupt.") from error
        image, mask = row[self.image_column], row[self.mask_column]
        return RawSample(
            image=_hf_image(image, f"{where} column {self.image_column!r}"),
            mask=_hf_mask(mask, f"{where} column {self.mask_column!r}"),
            name=f"{self.split}_{index:06d}",
            image_source=f"{where} column {self.image_column!r}",
            mask_source=f"{where} column {self.mask_column!r}",
            label_map=self.label_map,
        )


def _hf_classes(num_classes: int | None, id2label: Mapping[int | str, str] | None) -> list[str]:
    if id2label is None:
        return _class_names("HFDataset", num_classes, None)
    labels = {int(k): str(v) for k, v in id2label.items()}
    count = num_classes if num_classes is not None else len(labels)
    if sorted(labels) != list(range(count)):
        raise ConfigError(
            f"HFDataset id2label must have exactly the ids 0..{count - 1} (num_classes={count}); "
            f"got ids {sorted(labels)[:10]}{'...' if len(labels) > 10 else ''}."
        )
    return [labels[k] for k in range(count)]


def _hf_image(value: Any, where: str) -> np.ndarray:
    if isinstance(value, Image.Image):
        return np.asarray(value if value.mode == "RGB" else value.convert("RGB"))
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
        return array
    raise DataError(f"{where} is not an RGB image (got {type(value).__name__} {getattr(array, 'shape', '')}).")


def _hf_mask(value: Any, where: str) -> np.ndarray:
    if isinstance(value, Image.Image):
        return pil_mask_to_array(value, where)
    array = np.asarray(value)
    if array.ndim == 2 and np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    raise DataError(
        f"{where} is not a single-channel mask of class ids 0-255 "
        f"(got {type(value).__name__} {getattr(array, 'shape', '')})."
    )


def _load_hf_split(source: str, split: str, split_names: Mapping[str, str] | None, cache_dir: str | None):
    """One split of a Hugging Face dataset from disk or the hub, as a ``datasets.Dataset``."""
    import datasets

    if split_names is not None:
        if split not in split_names:
            raise ConfigError(f"HFDataset split_names {dict(split_names)} has no entry for split {split!r}.")
        candidates: tuple[str, ...] = (split_names[split],)
    else:
        candidates = HF_SPLIT_NAMES.get(split, (split,))

    path = Path(source).expanduser()
    if path.exists():
        try:
            if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
                loaded = datasets.load_from_disk(str(path))
            elif path.is_file() and path.suffix == ".parquet":
                loaded = datasets.load_dataset("parquet", data_files={"train": str(path)}, cache_dir=cache_dir)
            else:
                loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
        except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
            raise DataError(
                f"Cannot load a Hugging Face dataset from {path}: {error}. Give a folder written by "
                "Dataset(Dict).save_to_disk, a folder of parquet files named by split "
                "(train-*.parquet, validation-*.parquet) or one .parquet file."
            ) from error
    elif source.startswith(("/", "./", "../", "~")) or source.endswith(".parquet"):
        raise DataError(f"Hugging Face dataset path {source} does not exist.")
    else:
        try:
            loaded = datasets.load_dataset(source, cache_dir=cache_dir)
        except Exception as error:  # any failure to reach or read the hub is for the user to fix
            raise DataError(
                f"Could not load {source!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
                "Without network access, download it elsewhere and save it with "
                "datasets.load_dataset(...).save_to_disk(DIR), or export parquet files, then set "
                "data.root to that local path."
            ) from error

    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    for name in candidates:
        if name in loaded:
            return loaded[name]
    raise DataError(
        f"Hugging Face dataset {source} has no split for {split!r} (looked for {list(candidates)}); "
        f"its splits are {list(loaded)}. Map them with split_names, e.g. {{{split}: <name>}}."
    )
