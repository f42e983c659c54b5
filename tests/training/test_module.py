"""The LightningModule: loss, validation metrics at label resolution (one process and DDP),
checkpoint contents."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from segformer import SegFormer
from segformer.errors import ConfigError
from segformer.training.module import SegFormerModule
from segformer.training.optim import build_adamw, build_poly_schedule

NUM_CLASSES = 4


class ConstantSegFormer(SegFormer):
    """Predicts, for every pixel of an image, the class written in its first pixel."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        classes = pixel_values[:, 0, 0, 0].long()
        logits = F.one_hot(classes, self.num_classes).float() * 10
        return logits[:, :, None, None].expand(b, self.num_classes, (h + 3) // 4, (w + 3) // 4).contiguous()


def _image(cls: int, height: int, width: int) -> torch.Tensor:
    return torch.full((3, height, width), float(cls))


# Image A (input 32x48, labels 2x3) is predicted as class 1, image B (48x32, labels 3x2) as 2.
LABELS_A = torch.tensor([[0, 1, 1], [1, 255, 0]])
LABELS_B = torch.tensor([[1, 1], [0, 255], [255, 255]])
# Confusion (label x prediction): A adds [0][1] += 2, [1][1] += 3; B adds [1][2] += 2, [0][2] += 1.
# Class 0: labelled 3 times, never predicted -> IoU 0, Acc 0. Class 1: I 3, L 5, P 5 -> IoU 3/7,
# Acc 3/5. Class 2: predicted 3 times, never labelled -> IoU 0 (counts), Acc undefined.
# Class 3: absent everywhere -> left out. aAcc = 3 / 8.
EXPECTED = {"mIoU": (0 + 3 / 7 + 0) / 3, "mAcc": (0 + 3 / 5) / 2, "aAcc": 3 / 8}


def _eval_batch(items):
    """A val/test batch as the data module builds it: padded images and labels, true sizes."""
    images = [image for image, _ in items]
    labels = [label for _, label in items]
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    lh, lw = max(l.shape[0] for l in labels), max(l.shape[1] for l in labels)
    pixel_values = torch.zeros(len(items), 3, height, width)
    padded = torch.full((len(items), lh, lw), 255, dtype=torch.long)
    for i, (image, label) in enumerate(items):
        pixel_values[i, :, : image.shape[1], : image.shape[2]] = image
        padded[i, : label.shape[0], : label.shape[1]] = label
    return {
        "pixel_values": pixel_values,
        "labels": padded,
        "image_sizes": torch.tensor([list(i.shape[1:]) for i in images]),
        "label_sizes": torch.tensor([list(l.shape) for l in labels]),
        "names": [f"img{i}" for i in range(len(items))],
    }


def _module() -> SegFormerModule:
    model = ConstantSegFormer("b0", num_classes=NUM_CLASSES, id2label={0: "a", 1: "b", 2: "c", 3: "d"})
    return SegFormerModule(model, inference={"mode": "whole"})


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, **kwargs,
    )


def test_validation_scores_the_whole_split_at_label_resolution():
    module = _module()
    batch = _eval_batch([(_image(1, 32, 48), LABELS_A), (_image(2, 48, 32), LABELS_B)])
    _trainer().validate(module, dataloaders=DataLoader([batch], batch_size=None))
    for key, value in EXPECTED.items():
        assert module.val_results[key].item() == pytest.approx(value, abs=1e-6), key
    iou, acc = module.val_results["IoU"], module.val_results["Acc"]
    assert iou[:3].tolist() == pytest.approx([0.0, 3 / 7, 0.0]) and torch.isnan(iou[3])
    assert acc[:2].tolist() == pytest.approx([0.0, 3 / 5]) and torch.isnan(acc[2:]).all()


def test_test_split_is_scored_the_same_way_and_separately():
    module = _module()
    batches = [_eval_batch([(_image(1, 32, 48), LABELS_A)]), _eval_batch([(_image(2, 48, 32), LABELS_B)])]
    _trainer().test(module, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    assert module.test_results["mIoU"].item() == pytest.approx(EXPECTED["mIoU"], abs=1e-6)
    assert module.val_results == {}


@pytest.mark.slow
def test_ddp_ranks_sum_one_confusion_matrix():
    # One image per rank: each rank alone would score differently; the logged values are the
    # whole split's.
    module = _module()
    batches = [_eval_batch([(_image(1, 32, 48), LABELS_A)]), _eval_batch([(_image(2, 48, 32), LABELS_B)])]
    trainer = _trainer(devices=2, strategy="ddp_spawn")
    trainer.validate(module, dataloaders=DataLoader(batches, batch_size=None))
    for key, value in EXPECTED.items():
        assert trainer.callback_metrics[f"val/{key}"].item() == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_checkpoint_holds_what_from_pretrained_needs(tmp_path):
    model = SegFormer("b0", num_classes=3, id2label={0: "sky", 1: "road", 2: "car"})
    module = SegFormerModule(model, inference={"mode": "whole"})
    trainer = _trainer(max_steps=1)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["segformer"] == model.config
    assert checkpoint["segformer"]["variant"] == "b0" and checkpoint["segformer"]["num_classes"] == 3
    assert checkpoint["segformer"]["id2label"] == {0: "sky", 1: "road", 2: "car"}
    assert checkpoint["hyper_parameters"]["variant"] == "b0"
    assert set(checkpoint["state_dict"]) == {f"model.{k}" for k in model.state_dict()}
    loaded = SegFormer.from_pretrained(path)
    assert loaded.id2label == model.id2label
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_training_without_max_steps_is_a_config_error():
    model = SegFormer("b0", num_classes=2)
    module = SegFormerModule(model, optimizer=build_adamw, scheduler=build_poly_schedule)
    batch = {"pixel_values": torch.randn(1, 3, 32, 32), "labels": torch.zeros(1, 32, 32, dtype=torch.long)}
    trainer = _trainer(max_steps=-1, max_epochs=-1, limit_val_batches=0)
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
