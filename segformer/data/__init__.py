"""Segmentation data: datasets on disk, the paper's augmentation pipelines, the data module."""

from segformer.data.coco_stuff import COCOStuff
from segformer.data.datamodule import SegDataModule, collate_eval
from segformer.data.datasets import (
    ADE20K,
    IGNORE_INDEX,
    Cityscapes,
    FolderDataset,
    HFDataset,
    SegmentationDataset,
)
from segformer.data.mapillary import MapillaryVistas
from segformer.data.sample import SAMPLE_CLASSES, SAMPLE_PALETTE, SampleScenes, ensure_sample_scenes
from segformer.data.transforms import (
    CatMaxRatioCrop,
    PhotoMetricDistortion,
    RescaleToScale,
    eval_transform,
    train_transform,
)
from segformer.data.voc import PascalVOC

__all__ = [
    "ADE20K",
    "IGNORE_INDEX",
    "SAMPLE_CLASSES",
    "SAMPLE_PALETTE",
    "COCOStuff",
    "CatMaxRatioCrop",
    "Cityscapes",
    "FolderDataset",
    "HFDataset",
    "MapillaryVistas",
    "PascalVOC",
    "PhotoMetricDistortion",
    "RescaleToScale",
    "SampleScenes",
    "SegDataModule",
    "SegmentationDataset",
    "collate_eval",
    "ensure_sample_scenes",
    "eval_transform",
    "train_transform",
]
