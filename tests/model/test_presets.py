"""Named presets: the 21 public checkpoints, resolution to hub ids (offline failure names the id),
close matches for a mistyped name, the printed table."""

import runpy

import huggingface_hub
import pytest
import torch

import segformer
from segformer import SegFormer, build_segformer
from segformer.errors import CheckpointError
from segformer.model.presets import PRESETS, format_table

# REFERENCE.md, Published results (single / multi-scale mIoU).
ADE = {
    "b0": (37.4, 38.0),
    "b1": (42.2, 43.1),
    "b2": (46.5, 47.5),
    "b3": (49.4, 50.0),
    "b4": (50.3, 51.1),
    "b5": (51.0, 51.8),
}
CITY = {
    "b0": (76.2, 78.1),
    "b1": (78.5, 80.0),
    "b2": (81.0, 82.2),
    "b3": (81.7, 83.3),
    "b4": (82.3, 83.9),
    "b5": (82.4, 84.0),
}


def test_all_21_public_checkpoints_with_their_hub_ids():
    expected = {f"segformer_b{i}_ade20k_512": f"nvidia/segformer-b{i}-finetuned-ade-512-512" for i in range(5)}
    expected["segformer_b5_ade20k_640"] = "nvidia/segformer-b5-finetuned-ade-640-640"
    expected.update(
        {f"segformer_b{i}_cityscapes_1024": f"nvidia/segformer-b{i}-finetuned-cityscapes-1024-1024" for i in range(6)}
    )
    expected["segformer_b0_cityscapes_512x1024"] = "nvidia/segformer-b0-finetuned-cityscapes-512-1024"
    expected["segformer_b0_cityscapes_640x1280"] = "nvidia/segformer-b0-finetuned-cityscapes-640-1280"
    expected["segformer_b0_cityscapes_768"] = "nvidia/segformer-b0-finetuned-cityscapes-768-768"
    expected.update({f"mit_b{i}_imagenet": f"nvidia/mit-b{i}" for i in range(6)})
    assert {name: p.hub_id for name, p in PRESETS.items()} == expected
    assert segformer.list_presets() == list(PRESETS) and len(PRESETS) == 21


def test_presets_carry_dataset_crop_classes_and_published_miou():
    for variant, ade_miou in ADE.items():
        crop = 640 if variant == "b5" else 512
        ade = PRESETS[f"segformer_{variant}_ade20k_{crop}"]
        assert (ade.dataset, ade.crop_size, ade.num_classes, ade.miou, ade.variant) == (
            "ADE20K",
            (crop, crop),
            150,
            ade_miou,
            variant,
        )
        city = PRESETS[f"segformer_{variant}_cityscapes_1024"]
        assert (city.dataset, city.crop_size, city.num_classes, city.miou) == (
            "Cityscapes",
            (1024, 1024),
            19,
            CITY[variant],
        )
        mit = PRESETS[f"mit_{variant}_imagenet"]
        assert (mit.dataset, mit.num_classes, mit.encoder_only) == ("ImageNet-1K", 1000, True)
    assert PRESETS["segformer_b0_cityscapes_512x1024"].crop_size == (512, 1024)
    assert PRESETS["segformer_b0_cityscapes_768"].miou is None  # the paper reports no number for it


def test_table_command_prints_every_preset(capsys):
    runpy.run_module("segformer.presets", run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.strip() == format_table()
    lines = printed.strip().splitlines()
    assert len(lines) == 22 and lines[0].split()[:3] == ["name", "hub", "id"]
    assert "segformer_b2_ade20k_512  " in printed and "46.5 / 47.5" in printed


def _fake_hub(monkeypatch, folders: dict):
    """snapshot_download that serves local folders by repo id, and fails like offline otherwise."""
    calls = []

    def download(repo_id, **kwargs):
        calls.append(repo_id)
        if repo_id in folders:
            return str(folders[repo_id])
        raise huggingface_hub.errors.LocalEntryNotFoundError("Got: ConnectError: Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return calls


@pytest.mark.slow
def test_a_preset_name_loads_its_hub_checkpoint(monkeypatch, tmp_path):
    torch.manual_seed(0)
    SegFormer("b0", num_classes=150).save_pretrained(tmp_path / "ade")
    SegFormer("b0", num_classes=3).save_pretrained(tmp_path / "mit")
    calls = _fake_hub(
        monkeypatch, {"nvidia/segformer-b0-finetuned-ade-512-512": tmp_path / "ade", "nvidia/mit-b0": tmp_path / "mit"}
    )
    model = SegFormer.from_pretrained("segformer_b0_ade20k_512")
    assert calls == ["nvidia/segformer-b0-finetuned-ade-512-512"] and model.num_classes == 150
    # model.pretrained=mit_b0_imagenet (the recipes) goes the same way.
    assert build_segformer("b0", num_classes=7, pretrained="mit_b0_imagenet").num_classes == 7
    assert calls[-1] == "nvidia/mit-b0"


def test_offline_a_preset_fails_like_its_hub_id_naming_it(monkeypatch):
    _fake_hub(monkeypatch, {})
    with pytest.raises(CheckpointError) as by_id:
        SegFormer.from_pretrained("nvidia/segformer-b2-finetuned-ade-512-512")
    with pytest.raises(CheckpointError) as by_name:
        SegFormer.from_pretrained("segformer_b2_ade20k_512")
    message = str(by_name.value)
    assert message.startswith(
        "Preset 'segformer_b2_ade20k_512' is the hub model nvidia/segformer-b2-finetuned-ade-512-512."
    )
    assert message.endswith(str(by_id.value))
    assert "LocalEntryNotFoundError" in message and "huggingface-cli download nvidia/segformer-b2" in message


def test_an_unknown_name_lists_close_matches():
    with pytest.raises(CheckpointError, match=r"Close preset names: segformer_b2_ade20k_512") as error:
        SegFormer.from_pretrained("segformer_b2_ade_512")
    assert "python -m segformer.presets" in str(error.value)
    with pytest.raises(CheckpointError) as far:
        SegFormer.from_pretrained("no_such_thing.ckpt")
    assert "Close preset names" not in str(far.value)


def test_predict_py_takes_a_preset_as_ckpt_path(monkeypatch, tmp_path):
    from segformer.inference.predictor import load_predictor

    torch.manual_seed(0)
    SegFormer("b0", num_classes=150).save_pretrained(tmp_path / "ade")
    calls = _fake_hub(monkeypatch, {"nvidia/segformer-b0-finetuned-ade-512-512": tmp_path / "ade"})
    predictor = load_predictor("segformer_b0_ade20k_512", device="cpu")
    assert calls == ["nvidia/segformer-b0-finetuned-ade-512-512"] and predictor.model.num_classes == 150
    assert predictor.run_dir is None  # a preset is no training run folder
