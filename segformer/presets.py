"""``python -m segformer.presets``: print the named public checkpoints (segformer/model/presets.py)."""

from segformer.model.presets import PRESETS, Preset, format_table, list_presets

__all__ = ["PRESETS", "Preset", "format_table", "list_presets"]

if __name__ == "__main__":
    print(format_table())
