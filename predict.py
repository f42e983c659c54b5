"""Segment your own images: ``python predict.py ckpt_path=... input=<image, folder or glob> output=<dir>``.

Every image is preprocessed and segmented exactly as evaluation does (configs/predict.yaml says
where the settings come from) and gets three files: labels/<name>.png (class ids),
colour/<name>.png (the class palette) and overlay/<name>.jpg (the palette over the photo).
Unreadable images are reported by name and skipped; the command then exits non-zero.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from segformer import cli
from segformer.errors import DataError
from segformer.inference.classify import classify_images, is_classifier
from segformer.inference.predictor import check_outputs, find_images, load_predictor, predict_images

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def predict(cfg: DictConfig) -> int:
    """Segment the images of ``cfg.input`` into ``cfg.output``; returns how many were written."""
    images = find_images(cfg.input)
    check_outputs(images, Path(cfg.output).expanduser(), cfg.overwrite)
    if is_classifier(cfg.ckpt_path):  # a train_cls.yaml classifier: top-5 classes per image, predictions.csv
        failed = classify_images(cfg.ckpt_path, images, cfg.output, device=cfg.device)
        if failed:
            raise DataError(f"{len(failed)} input(s) could not be read and were skipped: {failed[0][1]}")
        return len(images)
    predictor = load_predictor(cfg.ckpt_path, cfg.get("data"), cfg.scale, cfg.inference, cfg.device)
    print(predictor.describe())
    if predictor.dataset is None and predictor.run_config is None and cfg.scale is None:
        print(
            "Neither data=<dataset> nor the checkpoint's training run gives the test scale: "
            "set scale=[long,short] if it differs."
        )
    if predictor.dataset is None:
        print("Label PNGs hold training ids 0..K-1; give data=<dataset> for the dataset's own ids and palette.")
    failed = predict_images(
        predictor,
        images,
        cfg.output,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        overwrite=cfg.overwrite,
        overlay_alpha=cfg.overlay_alpha,
        progress=cfg.progress,
    )
    written = len(images) - len(failed)
    print(f"Segmented {written} of {len(images)} image(s) into {Path(cfg.output).expanduser()}")
    if failed:
        names = ", ".join(str(path) for path, _ in failed[:10]) + (" ..." if len(failed) > 10 else "")
        raise DataError(f"{len(failed)} input(s) could not be segmented and were skipped: {names}.")
    return written


if __name__ == "__main__":
    cli.run(predict, CONFIG_DIR, "predict")
