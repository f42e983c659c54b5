"""Checkpoints written before the package was regrouped (segformer.module, segformer.guards, ...)
still load and resume: a Lightning .ckpt pickles plain data only (no import path of ours), and
the state the module kept at the top level (nonfinite_guard, step_seed) is read by the callbacks
that keep it now."""

import io
import pickletools
import zipfile
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from helpers import ROOT, tiny_sample_overrides
from lightning.pytorch.callbacks import ModelCheckpoint

from segformer import SegFormer, cli
from segformer.data.datamodule import SegDataModule
from segformer.training.module import SegFormerModule
from segformer.training.optim import build_adamw

# Every global the pickle of a train.py checkpoint names. A checkpoint of the code before the
# regrouping (commit e0904b6, train.py on the sample scenes) named exactly these four.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "FloatStorage"),
    ("torch", "LongStorage"),
    ("torch._utils", "_rebuild_tensor_v2"),
}


def pickled_globals(path: Path) -> set[tuple[str, str]]:
    """(module, name) of every global a torch.save zip file's pickle refers to."""
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        ops = list(pickletools.genops(io.BytesIO(archive.read(name))))
    found = set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":  # module and name are the two strings pushed before it
            found.add((ops[i - 2][1], ops[i - 1][1]))
    return found


def _fit(tmp_path: Path, max_steps: int, ckpt_path: Path | None = None) -> tuple[SegFormerModule, SegDataModule]:
    cfg = cli.compose(ROOT / "configs", "train", tiny_sample_overrides(tmp_path / "sample", 4, 2), run_dir=tmp_path)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    model = SegFormer("b0", num_classes=datamodule.num_classes)
    model.id2label = dict(enumerate(datamodule.classes))
    module = SegFormerModule(model, optimizer=build_adamw, inference=datamodule.inference)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, datamodule


@pytest.mark.slow
def test_a_checkpoint_in_the_old_layout_loads_and_resumes(tmp_path):
    _fit(tmp_path, max_steps=1)
    new = tmp_path / "checkpoints" / "last.ckpt"
    assert pickled_globals(new) <= ALLOWED_GLOBALS  # no class or module path of ours
    checkpoint = torch.load(new, weights_only=True)

    # What the module wrote itself before its guards became callbacks; values to recognise.
    callbacks = checkpoint["callbacks"]
    del callbacks["NonFiniteLossGuard"], callbacks["SeededSteps"]
    checkpoint["nonfinite_guard"] = {"consecutive": 1, "total": 3}
    checkpoint["step_seed"] = 1234
    checkpoint["SegDataModule"]["train_sampler"]["seed"] = 777
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)

    model = SegFormer.from_pretrained(old)
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items()) and len(weights) > 100

    module, datamodule = _fit(tmp_path / "resumed", max_steps=2, ckpt_path=old)
    assert module.global_step == 2
    assert (module.nonfinite_guard.consecutive, module.nonfinite_guard.total) == (0, 3)  # one finite step since
    assert module.seeded_steps.seed == 1234
    assert datamodule.state_dict()["train_sampler"]["seed"] == 777
