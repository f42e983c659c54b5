"""The evaluation report: report.md holds the run's details and scores and links to pictures
that exist; eval.py writes it with prediction panels of the first test images."""

import json
import re
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from helpers import ROOT, load_script, tiny_sample_overrides
from PIL import Image

from segformer import SegFormer, cli
from segformer.inference.metrics import scores_from_confusion_matrix
from segformer.inference.report import describe_inference, per_class_table, write_report

NAMES = ["sky", "road", "car"]
WHOLE = {"mode": "whole", "scales": [1.0], "flip": False}


def _links(report):
    return [unquote(target) for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)]


def test_mode_in_words():
    whole = {"mode": "whole", "crop_size": [512, 512], "stride": [341, 341], "scales": [1.0], "flip": False}
    assert describe_inference(whole) == "whole image"
    slide = {**whole, "mode": "slide", "crop_size": [1024, 1024], "stride": [768, 768]}
    assert describe_inference(slide) == "sliding window 1024x1024, stride 768x768"
    ms_flip = {**whole, "scales": [0.5, 0.75, 1.0, 1.25], "flip": True}
    assert describe_inference(ms_flip) == "whole image, multi-scale 0.5/0.75/1/1.25 + flip"


def test_per_class_table_in_percent_with_a_dash_for_absent_classes():
    results = scores_from_confusion_matrix(torch.tensor([[3, 1, 0], [0, 0, 0], [0, 2, 2]]))
    rows = per_class_table(results, NAMES).splitlines()
    # sky IoU 3/(4+3-3), road IoU 0/(0+3-0) (predicted, never labelled: no Acc), car 2/(4+2-2)
    assert rows[2:] == ["| sky | 75.00 | 75.00 |", "| road | 0.00 | - |", "| car | 50.00 | 50.00 |"]


@pytest.mark.slow
def test_report_has_details_scores_tables_and_existing_pictures(tmp_path):
    results = scores_from_confusion_matrix(torch.tensor([[3, 1, 0], [0, 0, 0], [0, 2, 2]]))
    image = np.full((30, 40, 3), 120, dtype=np.uint8)
    labels = np.zeros((30, 40), dtype=np.uint8)
    labels[:, 20:] = 2
    sample = {"name": "scene 1", "image": image, "labels": labels, "pred": np.full((30, 40), 2, dtype=np.uint8)}
    path = write_report(
        tmp_path,
        results,
        NAMES,
        None,
        checkpoint="runs/x/best.ckpt",
        dataset="Tiny at `/data`, split `val` (1 images, 3 classes)",
        inference=WHOLE,
        samples=[sample],
    )
    report = path.read_text()
    assert path == tmp_path / "report.md"
    assert "| checkpoint | `runs/x/best.ckpt` |" in report and "| mode | whole image |" in report
    assert "split `val`" in report
    aacc, miou, macc = (100 * float(results[k]) for k in ("aAcc", "mIoU", "mAcc"))
    assert f"| {aacc:.2f} | {miou:.2f} | {macc:.2f} |" in report
    assert per_class_table(results, NAMES) in report
    links = _links(report)
    assert links == ["per_class_iou.png", "confusion_matrix.png", "examples/scene 1.png"]
    for link in links:
        assert Image.open(tmp_path / link).size[0] > 300

    without_samples = write_report(
        tmp_path / "bare", results, NAMES, None, checkpoint="c", dataset="d", inference=WHOLE
    ).read_text()
    assert "## Predictions" not in without_samples and not (tmp_path / "bare" / "examples").exists()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    SegFormer("b0", num_classes=7).save_pretrained(base / "model")
    overrides = [
        *tiny_sample_overrides(base / "sample", num_train=1, num_val=3),
        f"ckpt_path={base / 'model'}",
        "report.num_images=2",
    ]
    cfg = cli.compose(ROOT / "configs", "eval", overrides, run_dir=base / "eval")
    load_script("eval").evaluate(cfg)
    return base / "eval"


@pytest.mark.slow
def test_eval_writes_a_report_matching_its_metrics(evaluated):
    report = (evaluated / "report.md").read_text()
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert f"| {100 * metrics['aAcc']:.2f} | {100 * metrics['mIoU']:.2f} | {100 * metrics['mAcc']:.2f} |" in report
    assert "SampleScenes at" in report and "(3 images, 7 classes)" in report
    assert "| mode | sliding window" not in report and "| mode | whole image |" in report
    links = _links(report)
    examples = [link for link in links if link.startswith("examples/")]
    assert len(examples) == 2 and {"per_class_iou.png", "confusion_matrix.png"} <= set(links)
    assert all((evaluated / link).is_file() for link in links)
