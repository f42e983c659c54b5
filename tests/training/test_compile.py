"""compile=true: train.py and eval.py under torch.compile give what eager gives, and compile
what runs (a step that silently ran eagerly would pass a parity test on its own).

Compiling dominates the time (inductor builds C++ kernels): the encoder and the head, each for
the training step (forward and backward) and for the evaluation forward. The training runs skip validation (it
runs under no_grad, eval.py under inference_mode: a third graph)."""

import json

import hydra
import pytest
import torch
import torch._dynamo
import torch._dynamo.eval_frame
import torch._inductor.config
from helpers import ROOT, csv_rows, load_script, tiny_sample_overrides

from segformer import SegFormer, cli
from segformer.model.head import DecodeHead
from segformer.model.mit import MixTransformer
from segformer.training.module import SegFormerModule

CONFIGS = ROOT / "configs"
# EMA at decay 0.5, so that the averaged weights differ from the trained ones.
TRAIN = ("trainer.max_steps=2", "+trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
         "callbacks=[default,ema]", "callbacks.ema.decay=0.5", "callbacks.rich_progress_bar=null")
# compile=true as a user sets it. (Compiled as one graph, the whole network once trained with wrong
# encoder gradients here, unless activation checkpointing was on: SegFormer.compile makes two.)
COMPILED = ("compile=true",)


def _graphs() -> tuple[int, int, int]:
    """Graphs compiled in all, and those of the encoder's and the head's forward (SegFormer.compile
    compiles the two)."""
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list
    return (
        torch._dynamo.utils.counters["stats"]["unique_graphs"],
        len(entries(MixTransformer.forward)),
        len(entries(DecodeHead.forward)),
    )


def _new(before: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(now - then for now, then in zip(_graphs(), before))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two training steps eager and compiled from the same seed (their gradients recorded), then
    eval.py eager and compiled on the compiled run's checkpoint."""
    base = tmp_path_factory.mktemp("compile")
    # One validation scene, so evaluation sees one image size: no dynamic-shape recompile.
    data = tiny_sample_overrides(base / "sample", num_train=4, num_val=1, val_batch_size=1)
    out = {"graphs": {}, "grads": {}}
    # Inductor draws its own random numbers; with the fallback, dropout and drop path draw what
    # eager draws, so the two runs see the same masks.
    with pytest.MonkeyPatch.context() as patch, torch._inductor.config.patch(fallback_random=True):
        grads: list[dict[str, torch.Tensor]] = []
        patch.setattr(
            SegFormerModule, "on_before_optimizer_step",
            lambda module, optimizer: grads.append({k: p.grad.clone() for k, p in module.model.named_parameters()}),
            raising=False,
        )
        torch._dynamo.reset()
        for name, overrides in (("eager", ()), ("compiled", COMPILED)):
            grads.clear()
            before = _graphs()
            cfg = cli.compose(CONFIGS, "train", [*data, *TRAIN, *overrides], run_dir=base / name)
            load_script("train").train(cfg)
            out["graphs"][f"train {name}"] = _new(before)
            out["grads"][name] = list(grads)
        checkpoint = base / "compiled" / "checkpoints" / "last.ckpt"
        for name, compile in (("eager", False), ("compiled", True)):
            before = _graphs()
            cfg = cli.compose(CONFIGS, "eval", [*data, f"ckpt_path={checkpoint}", f"compile={compile}"], run_dir=base / f"eval_{name}")
            load_script("eval").evaluate(cfg)
            out["graphs"][f"eval {name}"] = _new(before)
            out[f"metrics {name}"] = json.loads((base / f"eval_{name}" / "metrics.json").read_text())
        out["eval_cfg"] = cfg
    out["base"] = base
    yield out
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_true_compiles_what_runs_once(runs):
    # One graph each of the encoder and the head for the training step, the same for evaluation,
    # and no other: the whole network compiled (Lightning's model summary runs the module under a
    # FlopCounterMode, which once made dynamo skip it for good), nothing recompiled per step.
    none, one = (0, 0, 0), (2, 1, 1)
    assert runs["graphs"] == {"train eager": none, "train compiled": one, "eval eager": none, "eval compiled": one}


@pytest.mark.slow
def test_compiled_training_has_eager_losses_and_gradients(runs):
    def losses(name):
        rows = csv_rows(runs["base"] / name / "csv" / "metrics.csv")
        return [float(r["train/loss"]) for r in rows if r.get("train/loss")]

    assert len(losses("eager")) == 2
    assert losses("compiled") == pytest.approx(losses("eager"), rel=1e-5)
    eager, compiled = runs["grads"]["eager"], runs["grads"]["compiled"]
    assert len(eager) == len(compiled) == 2
    for step in (0, 1):
        assert compiled[step].keys() == eager[step].keys()
        # Up to rounding, on the scale of the largest gradient: some (the biases before the
        # head's BatchNorm) are 0 but for rounding noise.
        atol = 1e-6 * max(grad.abs().max().item() for grad in eager[step].values())
        for key, grad in eager[step].items():
            torch.testing.assert_close(compiled[step][key], grad, rtol=1e-3, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_compiled_eval_gives_eager_scores(runs):
    eager, compiled = runs["metrics eager"], runs["metrics compiled"]
    # The untrained model's classes are nearly tied at some pixels: rounding may flip a few of
    # the 25k predictions (each moves a score by ~4e-5).
    for key in ("aAcc", "mIoU", "mAcc"):
        assert compiled[key] == pytest.approx(eager[key], abs=1e-3)
    assert compiled["per_class"].keys() == eager["per_class"].keys()


@pytest.mark.slow
def test_compiled_logits_equal_eager_logits(runs):
    cfg = runs["eval_cfg"]
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    ((height, width),) = batch["image_sizes"].tolist()
    image = batch["pixel_values"][:, :, :height, :width]
    model = SegFormer.from_pretrained(cfg.ckpt_path).eval()
    with torch.inference_mode():
        image = image.clone()  # an inference tensor, as eval.py's are (else a new graph)
        eager = model(image)
        model.compile()
        before = _graphs()
        compiled = model(image)
    assert _new(before) == (0, 0, 0)  # eval.py's graphs ran, not new ones
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
