"""The model zoo: every public SegFormer checkpoint under a short name.

``SegFormer.from_pretrained("segformer_b2_ade20k_512")``, ``ckpt_path=segformer_b2_ade20k_512``
(eval.py, predict.py) and ``model.pretrained=mit_b2_imagenet`` (train.py) all resolve a name here
to its Hugging Face hub id; ``python -m segformer.presets`` prints the table. Published mIoU are
the paper's single-scale / multi-scale numbers (REFERENCE.md, Published results); None where the
paper gives none for that checkpoint.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

ADE20K_MIOU = {
    "b0": (37.4, 38.0),
    "b1": (42.2, 43.1),
    "b2": (46.5, 47.5),
    "b3": (49.4, 50.0),
    "b4": (50.3, 51.1),
    "b5": (51.0, 51.8),
}
CITYSCAPES_MIOU = {
    "b0": (76.2, 78.1),
    "b1": (78.5, 80.0),
    "b2": (81.0, 82.2),
    "b3": (81.7, 83.3),
    "b4": (82.3, 83.9),
    "b5": (82.4, 84.0),
}
VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5")


@dataclass(frozen=True)
class Preset:
    """One public checkpoint: where it lives and what it was trained and scored on."""

    name: str
    hub_id: str
    variant: str
    dataset: str
    crop_size: tuple[int, int]
    num_classes: int
    miou: tuple[float, float] | None = None  # (single-scale, multi-scale), percent

    @property
    def encoder_only(self) -> bool:
        """ImageNet-pretrained encoders: start a training run from them (model.pretrained=...)."""
        return self.dataset == "ImageNet-1K"


def _presets() -> list[Preset]:
    out = []
    for v in VARIANTS:
        crop = 640 if v == "b5" else 512
        out.append(
            Preset(
                f"segformer_{v}_ade20k_{crop}",
                f"nvidia/segformer-{v}-finetuned-ade-{crop}-{crop}",
                v,
                "ADE20K",
                (crop, crop),
                150,
                ADE20K_MIOU[v],
            )
        )
    for v in VARIANTS:
        out.append(
            Preset(
                f"segformer_{v}_cityscapes_1024",
                f"nvidia/segformer-{v}-finetuned-cityscapes-1024-1024",
                v,
                "Cityscapes",
                (1024, 1024),
                19,
                CITYSCAPES_MIOU[v],
            )
        )
    for name, (h, w) in (("512x1024", (512, 1024)), ("640x1280", (640, 1280)), ("768", (768, 768))):
        out.append(
            Preset(
                f"segformer_b0_cityscapes_{name}",
                f"nvidia/segformer-b0-finetuned-cityscapes-{h}-{w}",
                "b0",
                "Cityscapes",
                (h, w),
                19,
            )
        )
    for v in VARIANTS:
        out.append(Preset(f"mit_{v}_imagenet", f"nvidia/mit-{v}", v, "ImageNet-1K", (224, 224), 1000))
    return out


PRESETS: dict[str, Preset] = {p.name: p for p in _presets()}


def list_presets() -> list[str]:
    """The preset names, in table order (ADE20K, Cityscapes, ImageNet encoders)."""
    return list(PRESETS)


def resolve_source(source: str) -> str:
    """The hub id of a preset name; any other source unchanged."""
    preset = PRESETS.get(str(source))
    return preset.hub_id if preset is not None else str(source)


def close_matches(source: str) -> list[str]:
    """Preset names that look like a mistyped ``source`` (difflib), best first."""
    return difflib.get_close_matches(str(source).lower(), list(PRESETS), n=3, cutoff=0.6)


def format_table() -> str:
    """The presets as a plain-text table."""
    rows = [("name", "hub id", "dataset", "crop", "classes", "mIoU ss / ms (%)")]
    for p in PRESETS.values():
        miou = f"{p.miou[0]:.1f} / {p.miou[1]:.1f}" if p.miou else "-"
        rows.append((p.name, p.hub_id, p.dataset, f"{p.crop_size[0]}x{p.crop_size[1]}", str(p.num_classes), miou))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
