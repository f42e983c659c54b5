"""MiTForImageClassification: logits equal to transformers' SegformerForImageClassification both
ways, NVlabs mit_b*.pth with their head, our checkpoints, and the counting loader's refusals."""

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoints import (
    INPUT_SHAPE,
    hf_config,
    nvlabs_eps,
    nvlabs_state_dict,
    on_disk_state,
)
from transformers import SegformerForImageClassification

from segformer import MiTForImageClassification, SegFormer
from segformer.errors import CheckpointError

NUM_LABELS = 13


def hf_classifier(variant: str) -> SegformerForImageClassification:
    torch.manual_seed(0)
    model = SegformerForImageClassification(hf_config(variant, num_labels=NUM_LABELS)).eval()
    with torch.no_grad():  # transformers zeroes the bias; a random one makes the test bite
        model.classifier.bias.normal_()
    return model


def logits(model, x, hf: bool = False):
    with torch.no_grad():
        return model(pixel_values=x).logits if hf else model.eval()(x)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["b0", "b2", pytest.param("b5", marks=pytest.mark.slow)])
def test_transformers_to_ours_parity(variant, tmp_path):
    hf = hf_classifier(variant)
    hf.save_pretrained(tmp_path)
    ours = MiTForImageClassification.from_pretrained(tmp_path)
    assert ours.variant == variant and ours.num_classes == NUM_LABELS and ours.norm_eps == 1e-5
    assert ours.id2label == {i: f"label{i}" for i in range(NUM_LABELS)}
    x = torch.randn(INPUT_SHAPE)
    assert (logits(hf, x, hf=True) - logits(ours, x)).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["b0", "b2", pytest.param("b5", marks=pytest.mark.slow)])
def test_ours_to_transformers_parity(variant, tmp_path):
    torch.manual_seed(1)
    ours = MiTForImageClassification(variant, num_classes=NUM_LABELS, norm_eps=1e-5, id2label={i: f"c{i}" for i in range(NUM_LABELS)})
    with torch.no_grad():
        ours.classifier.bias.normal_()
    ours.save_pretrained(tmp_path)
    hf, info = SegformerForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert hf.config.id2label == {i: f"c{i}" for i in range(NUM_LABELS)}
    x = torch.randn(1, 3, 70, 97)
    assert (logits(hf.eval(), x, hf=True) - logits(ours, x)).abs().max() < 1e-4


@pytest.mark.slow
def test_nvlabs_imagenet_checkpoint_keeps_its_head(tmp_path):
    hf = hf_classifier("b0")
    state = nvlabs_state_dict(on_disk_state(hf, tmp_path / "hf"), backbone_prefix="")
    state["head.weight"] = state.pop("classifier.weight")
    state["head.bias"] = state.pop("classifier.bias")
    torch.save(state, tmp_path / "mit_b0.pth")
    ours = MiTForImageClassification.from_pretrained(tmp_path / "mit_b0.pth")
    assert ours.norm_eps == 1e-6 and ours.num_classes == NUM_LABELS
    nvlabs_eps(hf)
    x = torch.randn(INPUT_SHAPE)
    assert (logits(hf, x, hf=True) - logits(ours, x)).abs().max() < 1e-4


@pytest.mark.slow
def test_our_checkpoint_round_trip_and_segformer_starts_from_it(tmp_path):
    torch.manual_seed(2)
    model = MiTForImageClassification("b0", num_classes=4, id2label=dict(enumerate("abcd")))
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "segformer": model.config}, tmp_path / "last.ckpt")
    loaded = MiTForImageClassification.from_pretrained(tmp_path / "last.ckpt")
    assert loaded.config == model.config
    x = torch.randn(INPUT_SHAPE)
    assert torch.equal(logits(model, x), logits(loaded, x))

    seg = SegFormer.from_pretrained(tmp_path / "last.ckpt", num_classes=7)
    assert seg.num_classes == 7
    for ours, theirs in zip(seg.eval().encoder(x), model.encoder(x)):
        assert torch.equal(ours, theirs)


def test_other_num_classes_gives_a_new_classifier_and_keeps_the_encoder(tmp_path):
    hf_classifier("b0").save_pretrained(tmp_path)
    original = MiTForImageClassification.from_pretrained(tmp_path)
    model = MiTForImageClassification.from_pretrained(tmp_path, num_classes=3)
    assert model.num_classes == 3 and list(model.id2label) == [0, 1, 2]
    assert torch.equal(model.encoder.stages[3].norm.weight, original.encoder.stages[3].norm.weight)


def test_encoder_without_classifier_needs_num_classes(tmp_path):
    hf_classifier("b0").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    encoder_only = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    torch.save(encoder_only, tmp_path / "encoder.pth")
    with pytest.raises(CheckpointError, match="num_classes"):
        MiTForImageClassification.from_pretrained(tmp_path / "encoder.pth")
    assert MiTForImageClassification.from_pretrained(tmp_path / "encoder.pth", num_classes=5).num_classes == 5


def test_a_segmentation_checkpoint_is_not_silently_a_classifier(tmp_path):
    SegFormer("b0", num_classes=3).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(decode_head"):
        MiTForImageClassification.from_pretrained(tmp_path, num_classes=3)


def test_missing_tensor_is_named(tmp_path):
    hf_classifier("b0").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["segformer.encoder.layer_norm.3.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \(segformer.encoder.layer_norm.3.weight\)"):
        MiTForImageClassification.from_pretrained(tmp_path / "broken.pth")
