"""Lightning's model summary at the start of a run: FLOPs counted, not 0."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from lightning.pytorch.utilities.model_summary import ModelSummary

from segformer.benchmark import count_gflops
from segformer.model import SegFormer
from segformer.model.classifier import MiTForImageClassification
from segformer.training.classification import ClassificationModule
from segformer.training.module import SegFormerModule


@pytest.mark.slow
def test_summary_counts_the_flops_of_a_512_image():
    model = SegFormer("b0", num_classes=3)
    summary = ModelSummary(SegFormerModule(model), max_depth=1)
    # The module's forward as run (folded head, eval mode); flop_counter counts 2 per multiply-add.
    assert summary.total_flops == pytest.approx(2e9 * count_gflops(model, (512, 512), fast_head=True), rel=1e-6)
    assert summary.in_sizes[0] == [1, 3, 512, 512]


def test_classifier_summary_counts_the_flops_of_a_224_image():
    model = MiTForImageClassification("b0", num_classes=5)
    summary = ModelSummary(ClassificationModule(model), max_depth=1)
    assert summary.in_sizes[0] == [1, 3, 224, 224]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    assert summary.total_flops == counter.get_total_flops() > 0.8e9  # MiT-B0 at 224: 0.45 GMACs
