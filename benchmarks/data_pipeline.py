"""Train-pipeline throughput at the paper's ADE20K settings (images/s per worker).

Writes synthetic ADE20K-sized scenes (JPEG images around 683x512, PNG masks with 150 classes)
in the ADEChallengeData2016 layout to a temporary folder, then times, in one process, reading a
sample (decode + label reduction) and the train transforms (rescale against [2048, 512] with
ratio 0.5-2.0, cat_max_ratio crop 512x512, flip, photometric distortion, normalize, pad), and
finally whole DataLoaders with several worker counts.

    python benchmarks/data_pipeline.py --images 64 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from PIL import Image

from segformer.benchmark import device_name
from segformer.data import ADE20K, train_transform
from segformer.data.datamodule import TrainSamples

ADE_SIZES = ((512, 683), (512, 768), (384, 512), (683, 512), (512, 512))  # (height, width)


def write_synthetic_ade20k(root: Path, count: int, seed: int = 0) -> None:
    """Smooth colour fields with texture and piecewise class maps: JPEGs of realistic size."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images" / "training", root / "annotations" / "training"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for index in range(count):
        height, width = ADE_SIZES[index % len(ADE_SIZES)]
        coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        labels = rng.integers(0, 151, (height // 64 + 1, width // 64 + 1), dtype=np.uint8)
        mask = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
        Image.fromarray(image).save(images / f"ADE_train_{index:08d}.jpg", quality=90)
        Image.fromarray(mask).save(masks / f"ADE_train_{index:08d}.png")


def time_per_image(function, count: int) -> float:
    start = time.perf_counter()
    for index in range(count):
        function(index)
    return (time.perf_counter() - start) / count


def loader_throughput(samples: TrainSamples, workers: int, batch_size: int, batches: int) -> float:
    loader = torch.utils.data.DataLoader(
        samples, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=False,
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        seen += len(next(iterator)["labels"])
    elapsed = time.perf_counter() - start
    del iterator
    return seen / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="synthetic images to write and time")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=2, help="per-device batch of the paper's ADE20K runs")
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 512])
    parser.add_argument("--scale", type=int, nargs=2, default=[2048, 512])
    args = parser.parse_args()
    L.seed_everything(0, workers=True, verbose=False)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ADEChallengeData2016"
        write_synthetic_ade20k(root, args.images)
        (root / "images" / "validation").mkdir()
        (root / "annotations" / "validation").mkdir()
        dataset = ADE20K(root, "train")
        transform = train_transform(args.crop, args.scale, photometric={})
        samples = TrainSamples(dataset, transform)
        raw = [dataset[i] for i in range(len(dataset))]

        for i in range(min(4, len(dataset))):  # warm caches and lazy imports
            samples[i]
        read = time_per_image(lambda i: dataset[i], len(dataset))
        augment = time_per_image(lambda i: samples.transform(image=raw[i]["image"], mask=raw[i]["mask"]), len(raw))
        total = time_per_image(lambda i: samples[i], len(samples))

        print(f"machine: {device_name(torch.device('cpu'))} per process, {os.cpu_count()} CPU cores, "
              f"torch {torch.__version__}, opencv {cv2.__version__}")
        print(f"settings: {args.images} synthetic ADE20K-sized JPEGs, scale {args.scale}, ratio 0.5-2.0, "
              f"crop {args.crop}, cat_max_ratio 0.75, flip, photometric distortion\n")
        print("| stage (one process) | ms / image | images / s |")
        print("|---|---|---|")
        for name, seconds in (("read (decode + label reduction)", read), ("train transforms", augment),
                              ("read + transforms (= one worker)", total)):
            print(f"| {name} | {seconds * 1000:.1f} | {1 / seconds:.1f} |")
        print("\n| DataLoader workers | batch | images / s |")
        print("|---|---|---|")
        batches = max(len(samples) // args.batch_size - 2, 1)
        for workers in args.workers:
            rate = loader_throughput(samples, workers, args.batch_size, batches)
            print(f"| {workers} | {args.batch_size} | {rate:.1f} |")


if __name__ == "__main__":
    main()
