"""Checkpoint interop: exact parity with transformers both ways, NVlabs files, our .ckpt, bad files.

NVlabs checkpoints cannot be downloaded here, so the tests write them: the weights of a random
transformers model renamed to the NVlabs key names of REFERENCE.md (written out independently of
segformer's own key maps), in both the ImageNet-backbone and the full segmentation layout.
"""

import logging
import re

import pytest
import torch
from transformers import (
    SegformerConfig,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerModel,
)

from segformer import SegFormer
from segformer.errors import CheckpointError
from segformer.model.mit import MIT_VARIANTS
from segformer.model.segformer import DECODER_DIMS
from helpers import malicious_checkpoint

INPUT_SHAPE = (1, 3, 97, 70)  # non-square, neither side a multiple of 32


def hf_config(variant: str, num_labels: int = 19, **kwargs) -> SegformerConfig:
    mit = MIT_VARIANTS[variant]
    return SegformerConfig(
        depths=list(mit.depths),
        hidden_sizes=list(mit.hidden_sizes),
        decoder_hidden_size=DECODER_DIMS[variant],
        num_labels=num_labels,
        id2label={i: f"label{i}" for i in range(num_labels)},
        label2id={f"label{i}": i for i in range(num_labels)},
        **kwargs,
    )


def randomize_batchnorm(bn: torch.nn.BatchNorm2d) -> None:
    """Untrained BatchNorm is the identity; random statistics make a parity test bite."""
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1.0, 0.2)
        bn.bias.normal_()


def hf_segmentation_model(variant: str, num_labels: int = 19) -> SegformerForSemanticSegmentation:
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(hf_config(variant, num_labels)).eval()
    randomize_batchnorm(model.decode_head.batch_norm)
    return model


def on_disk_state(model, directory) -> dict:
    """transformers 5 renames modules in memory; its files keep the public key names."""
    from safetensors.torch import load_file

    model.save_pretrained(directory)
    return load_file(str(directory / "model.safetensors"))


def hf_logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def our_logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# b0 in the inner loop; the larger variants (seconds each) with the slow tests.
@pytest.mark.parametrize(
    "variant", ["b0", *(pytest.param(v, marks=pytest.mark.slow) for v in ("b1", "b2", "b5"))]
)
def test_transformers_to_ours_parity(variant, tmp_path):
    hf = hf_segmentation_model(variant)
    hf.save_pretrained(tmp_path)
    ours = SegFormer.from_pretrained(tmp_path)
    assert ours.variant == variant and ours.num_classes == 19
    assert ours.norm_eps == 1e-5  # transformers computes with 1e-5 whatever its config says
    assert ours.id2label[3] == "label3"
    x = torch.randn(INPUT_SHAPE)
    assert (hf_logits(hf, x) - our_logits(ours, x)).abs().max() < 1e-4


@pytest.mark.parametrize(
    "variant", ["b0", *(pytest.param(v, marks=pytest.mark.slow) for v in ("b1", "b2", "b5"))]
)
def test_ours_to_transformers_parity(variant, tmp_path):
    torch.manual_seed(1)
    ours = SegFormer(variant, num_classes=7, id2label={i: f"c{i}" for i in range(7)}, norm_eps=1e-5)
    randomize_batchnorm(ours.decode_head.bn)
    ours.save_pretrained(tmp_path)
    hf, info = SegformerForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.id2label[6] == "c6"
    x = torch.randn(INPUT_SHAPE)
    assert (hf_logits(hf.eval(), x) - our_logits(ours, x)).abs().max() < 1e-4


@pytest.mark.slow
def test_save_load_round_trip_keeps_eps_and_labels(tmp_path):
    torch.manual_seed(2)
    ours = SegFormer("b0", num_classes=4, id2label={0: "sky", 1: "road", 2: "car", 3: "tree"})
    randomize_batchnorm(ours.decode_head.bn)
    ours.save_pretrained(tmp_path)
    again = SegFormer.from_pretrained(tmp_path)
    assert again.norm_eps == 1e-6 and again.id2label == ours.id2label
    x = torch.randn(INPUT_SHAPE)
    assert torch.equal(our_logits(ours, x), our_logits(again, x))


def encoder_features_close(hf_encoder, ours: SegFormer, x) -> float:
    """Largest difference between a transformers encoder's stage outputs and ours."""
    with torch.no_grad():
        hidden = hf_encoder(x, output_hidden_states=True).hidden_states
        features = ours.eval().encoder(x)
    return max((a - b).abs().max().item() for a, b in zip(hidden, features))


@pytest.mark.slow
def test_imagenet_encoder_gets_a_new_head(tmp_path, caplog):
    torch.manual_seed(3)
    hf = SegformerForImageClassification(hf_config("b1", num_labels=1000)).eval()
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="only an encoder.*num_classes"):
        SegFormer.from_pretrained(tmp_path)
    with caplog.at_level(logging.INFO):
        ours = SegFormer.from_pretrained(tmp_path, num_classes=5)
    assert "decode head is new" in caplog.text
    assert ours.variant == "b1" and ours.num_classes == 5
    x = torch.randn(INPUT_SHAPE)
    assert encoder_features_close(hf.segformer, ours, x) < 1e-4


@pytest.mark.slow
def test_bare_segformer_model_folder(tmp_path):
    torch.manual_seed(4)
    hf = SegformerModel(hf_config("b0")).eval()
    hf.save_pretrained(tmp_path)
    ours = SegFormer.from_pretrained(tmp_path, num_classes=3)
    x = torch.randn(INPUT_SHAPE)
    assert encoder_features_close(hf, ours, x) < 1e-4


# --- NVlabs checkpoints, written from a transformers model with the key names of REFERENCE.md ---

NVLABS_RENAMES = [
    (r"^segformer\.encoder\.patch_embeddings\.(\d)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^segformer\.encoder\.patch_embeddings\.(\d)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^segformer\.encoder\.layer_norm\.(\d)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^segformer\.encoder\.block\.(\d)\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    (r"\.layer_norm_1\.", lambda m: ".norm1."),
    (r"\.layer_norm_2\.", lambda m: ".norm2."),
    (r"\.attention\.self\.query\.", lambda m: ".attn.q."),
    (r"\.attention\.self\.sr\.", lambda m: ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", lambda m: ".attn.norm."),
    (r"\.attention\.output\.dense\.", lambda m: ".attn.proj."),
    (r"\.mlp\.dense1\.", lambda m: ".mlp.fc1."),
    (r"\.mlp\.dense2\.", lambda m: ".mlp.fc2."),
    (r"^decode_head\.linear_c\.(\d)\.proj\.", lambda m: f"decode_head.linear_c{int(m[1]) + 1}.proj."),
    (r"^decode_head\.linear_fuse\.", lambda m: "decode_head.linear_fuse.conv."),
    (r"^decode_head\.batch_norm\.", lambda m: "decode_head.linear_fuse.bn."),
    (r"^decode_head\.classifier\.", lambda m: "decode_head.linear_pred."),
]


def nvlabs_state_dict(hf_state: dict, backbone_prefix: str) -> dict:
    """Rename transformers keys to NVlabs ones; key and value projections merge into `kv`."""
    out = {}
    for key, value in hf_state.items():
        if ".attention.self.key." in key or ".attention.self.value." in key:
            continue
        new = key
        for pattern, repl in NVLABS_RENAMES:
            new = re.sub(pattern, repl, new)
        if not new.startswith("decode_head."):
            new = backbone_prefix + new
        out[new] = value.clone()
        if ".attn.q." in new:
            kv_key = new.replace(".attn.q.", ".attn.kv.")
            k = hf_state[key.replace(".query.", ".key.")]
            v = hf_state[key.replace(".query.", ".value.")]
            out[kv_key] = torch.cat([k, v])  # key rows first, then value
    return out


def nvlabs_eps(hf_model) -> None:
    """Make transformers compute as the NVlabs code does: 1e-6 in block and stage-final norms."""
    for name, module in hf_model.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and re.search(r"(layernorm_before|layernorm_after|stages\.\d\.layer_norm)$", name):
            module.eps = 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["b0", pytest.param("b2", marks=pytest.mark.slow)])
def test_nvlabs_segmentation_checkpoint(variant, tmp_path):
    hf = hf_segmentation_model(variant, num_labels=150)
    state = nvlabs_state_dict(on_disk_state(hf, tmp_path / "hf"), backbone_prefix="backbone.")
    state["decode_head.conv_seg.weight"] = torch.randn(150, DECODER_DIMS[variant], 1, 1)  # unused by mmseg too
    state["decode_head.conv_seg.bias"] = torch.randn(150)
    path = tmp_path / f"segformer.{variant}.512x512.ade.160k.pth"
    torch.save({"meta": {"iter": 160000}, "state_dict": state}, path)

    ours = SegFormer.from_pretrained(path)
    assert ours.variant == variant and ours.num_classes == 150 and ours.norm_eps == 1e-6
    nvlabs_eps(hf)
    x = torch.randn(INPUT_SHAPE)
    assert (hf_logits(hf, x) - our_logits(ours, x)).abs().max() < 1e-4


@pytest.mark.slow
def test_nvlabs_segmentation_checkpoint_matches_the_transformers_loader(tmp_path):
    """The same weights through both loaders, the eps being the only difference (by origin)."""
    hf = hf_segmentation_model("b0")
    state = on_disk_state(hf, tmp_path / "hf")
    torch.save({"state_dict": nvlabs_state_dict(state, "backbone.")}, tmp_path / "nv.pth")
    via_hf = SegFormer.from_pretrained(tmp_path / "hf")
    via_nv = SegFormer.from_pretrained(tmp_path / "nv.pth")
    for stage in via_nv.encoder.stages:
        stage.norm.eps = 1e-5
        for block in stage.blocks:
            block.norm1.eps = block.norm2.eps = 1e-5
    x = torch.randn(INPUT_SHAPE)
    assert torch.equal(our_logits(via_hf, x), our_logits(via_nv, x))


@pytest.mark.slow
def test_nvlabs_imagenet_backbone(tmp_path):
    torch.manual_seed(5)
    hf = SegformerForImageClassification(hf_config("b0", num_labels=1000)).eval()
    state = nvlabs_state_dict(on_disk_state(hf, tmp_path / "hf"), backbone_prefix="")
    state["head.weight"] = state.pop("classifier.weight")
    state["head.bias"] = state.pop("classifier.bias")
    torch.save(state, tmp_path / "mit_b0.pth")
    ours = SegFormer.from_pretrained(tmp_path / "mit_b0.pth", num_classes=150)
    assert ours.norm_eps == 1e-6 and ours.num_classes == 150
    nvlabs_eps(hf)
    x = torch.randn(INPUT_SHAPE)
    assert encoder_features_close(hf.segformer, ours, x) < 1e-4


@pytest.mark.slow
def test_lightning_checkpoint(tmp_path):
    torch.manual_seed(6)
    model = SegFormer("b0", num_classes=6, id2label={i: f"k{i}" for i in range(6)})
    randomize_batchnorm(model.decode_head.bn)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "segformer": model.config, "global_step": 10}, tmp_path / "last.ckpt")
    loaded = SegFormer.from_pretrained(tmp_path / "last.ckpt")
    assert loaded.config == model.config
    x = torch.randn(INPUT_SHAPE)
    assert torch.equal(our_logits(model, x), our_logits(loaded, x))


def test_transformers_5_module_state_dict(tmp_path):
    """A plain torch.save(model.state_dict()) from transformers 5 uses its in-memory names."""
    hf = hf_segmentation_model("b0")
    torch.save(hf.state_dict(), tmp_path / "hf5_state.pt")
    ours = SegFormer.from_pretrained(tmp_path / "hf5_state.pt")
    x = torch.randn(INPUT_SHAPE)
    assert (hf_logits(hf, x) - our_logits(ours, x)).abs().max() < 1e-4


def test_other_num_classes_reinitialises_the_classifier(tmp_path, caplog):
    hf = hf_segmentation_model("b0", num_labels=150)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        ours = SegFormer.from_pretrained(tmp_path, num_classes=19)
    assert "re-initialised for 19 classes" in caplog.text
    assert ours.num_classes == 19 and ours.id2label[18] == "class_18"
    fuse = hf.decode_head.linear_fuse.weight.detach()
    assert torch.equal(ours.decode_head.linear_fuse.weight.detach(), fuse)


def test_hub_id_goes_through_huggingface_hub(tmp_path, monkeypatch):
    hf_segmentation_model("b0").save_pretrained(tmp_path)
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    model = SegFormer.from_pretrained("nvidia/segformer-b0-finetuned-ade-512-512")
    assert asked == ["nvidia/segformer-b0-finetuned-ade-512-512"] and model.variant == "b0"


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="Hugging Face hub.*--local-dir"):
        SegFormer.from_pretrained("nvidia/segformer-b2-finetuned-ade-512-512")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SegFormer.from_pretrained(tmp_path / "nope.pth")


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_truncated_file_is_a_clear_error(kind, tmp_path):
    hf = hf_segmentation_model("b0")
    if kind == "safetensors":
        hf.save_pretrained(tmp_path)
        path = tmp_path / "model.safetensors"
    else:
        path = tmp_path / "model.pth"
        torch.save({"state_dict": nvlabs_state_dict(on_disk_state(hf, tmp_path), "backbone.")}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        SegFormer.from_pretrained(tmp_path if kind == "safetensors" else path)


def test_other_architecture_is_a_clear_error(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(), tmp_path / "net.pth")
    with pytest.raises(CheckpointError, match="not a SegFormer checkpoint"):
        SegFormer.from_pretrained(tmp_path / "net.pth")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="'bert' model, not a SegFormer"):
        SegFormer.from_pretrained(tmp_path / "bert")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    hf = hf_segmentation_model("b0")
    state = nvlabs_state_dict(on_disk_state(hf, tmp_path), "backbone.")
    del state["backbone.block2.1.attn.kv.weight"]
    state["backbone.block2.1.attn.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as error:
        SegFormer.from_pretrained(tmp_path / "broken.pth")
    message = str(error.value)
    assert "1 missing keys (backbone.block2.1.attn.kv.weight)" in message
    assert "1 unexpected keys (backbone.block2.1.attn.extra.weight)" in message
    assert "Nothing was loaded" in message


def test_variant_that_is_not_b0_to_b5_is_named(tmp_path):
    hf = hf_segmentation_model("b0")
    state = {k: v for k, v in on_disk_state(hf, tmp_path).items() if not k.startswith("segformer.encoder.block.2.1.")}
    torch.save(state, tmp_path / "pruned.bin")
    with pytest.raises(CheckpointError, match=r"depths \[2, 2, 1, 2\].*none of the MiT-B0..B5"):
        SegFormer.from_pretrained(tmp_path / "pruned.bin")


def test_wrong_shapes_are_named(tmp_path):
    hf = hf_segmentation_model("b0")
    state = on_disk_state(hf, tmp_path)
    state["decode_head.linear_c.0.proj.weight"] = torch.zeros(256, 33)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match=r"wrong shape.*linear_c\.0\.weight \(256, 33\) vs \(256, 32\)"):
        SegFormer.from_pretrained(tmp_path / "bad.bin")


def test_kwargs_win_over_what_the_checkpoint_says(tmp_path):
    hf = hf_segmentation_model("b0")
    hf.save_pretrained(tmp_path)  # transformers: LayerNorm eps 1e-5, decoder width 256
    ours = SegFormer.from_pretrained(tmp_path, norm_eps=1e-6, decoder_dim=DECODER_DIMS["b0"])
    assert ours.norm_eps == 1e-6 and ours.encoder.stages[0].blocks[0].norm1.eps == 1e-6
    assert SegFormer.from_pretrained(tmp_path).norm_eps == 1e-5
    # The caller's decoder width is the one built, so these weights (256 wide) do not fit it.
    with pytest.raises(CheckpointError, match="wrong shape"):
        SegFormer.from_pretrained(tmp_path, decoder_dim=128)


@pytest.mark.slow
def test_nvlabs_checkpoint_with_mmcv_metadata_loads(tmp_path):
    """mmcv keeps numpy scalars and arrays in `meta`; they are plain data and load."""
    import collections

    import numpy as np

    hf = hf_segmentation_model("b0", num_labels=150)
    state = collections.OrderedDict(nvlabs_state_dict(on_disk_state(hf, tmp_path / "hf"), "backbone."))
    meta = {
        "mmcv_version": "1.3.0", "iter": np.int64(160000), "CLASSES": ("wall", "building"),
        "PALETTE": [[120, 120, 120]], "hook_msgs": {"best_score": np.float64(0.4651)}, "mean": np.zeros(3),
    }
    torch.save({"meta": meta, "state_dict": state}, tmp_path / "segformer.b0.512x512.ade.160k.pth")
    ours = SegFormer.from_pretrained(tmp_path / "segformer.b0.512x512.ade.160k.pth")
    assert ours.num_classes == 150
    x = torch.randn(INPUT_SHAPE)
    nvlabs_eps(hf)
    assert (hf_logits(hf, x) - our_logits(ours, x)).abs().max() < 1e-4


@pytest.mark.parametrize("name, via_shell", [("model.pth", False), ("last.ckpt", True)])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, name, via_shell):
    marker = tmp_path / "created"
    path = malicious_checkpoint(tmp_path / name, marker, via_shell)
    with pytest.raises(CheckpointError) as error:
        SegFormer.from_pretrained(path)
    assert str(path) in str(error.value) and "could run code" in str(error.value)
    assert not marker.exists()
    # The file does what it claims when loaded unsafely: the check above can fail.
    torch.load(path, weights_only=False)
    assert marker.exists()
