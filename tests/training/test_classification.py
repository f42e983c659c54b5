"""Classification training: soft targets, mixup / cutmix, a MiT-B0 learning the sample shapes from
scratch through train.py, and a SegFormer fine-tuned from that classification checkpoint."""

import pytest
import torch
from helpers import ROOT, load_script, tiny_sample_overrides

from segformer import MiTForImageClassification, cli
from segformer.errors import CheckpointError
from segformer.training.classification import (
    ClassificationModule,
    mix_batch,
    soft_targets,
)

CONFIGS = ROOT / "configs"


def test_soft_targets_smooth_as_timm():
    targets = soft_targets(torch.tensor([2, 0]), num_classes=4, smoothing=0.1)
    assert torch.allclose(targets[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    assert torch.allclose(targets.sum(1), torch.ones(2))


def test_mixup_mixes_images_and_targets_with_the_same_ratio():
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, targets = mix_batch(images, labels, 4, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.0)
    lam = float(targets[0, 0])  # sample 0 mixed with sample 3: lam of class 0, 1 - lam of class 3
    assert 0 < lam < 1 and abs(float(targets[0, 3]) - (1 - lam)) < 1e-6
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)


def test_cutmix_target_ratio_is_the_pasted_area():
    torch.manual_seed(3)
    images = torch.zeros(2, 3, 20, 30)
    images[1] = 1.0
    mixed, targets = mix_batch(images, torch.tensor([0, 1]), 2, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0)
    pasted = float(mixed[0, 0].mean())  # share of sample 0 now showing sample 1
    assert 0 < pasted < 1
    assert abs(float(targets[0, 1]) - pasted) < 1e-6 and abs(float(targets[0, 0]) - (1 - pasted)) < 1e-6


def test_no_mixing_when_prob_is_zero():
    images = torch.randn(2, 3, 8, 8)
    mixed, targets = mix_batch(images, torch.tensor([1, 0]), 3, prob=0.0, smoothing=0.0)
    assert torch.equal(mixed, images) and torch.equal(targets, torch.tensor([[0.0, 1, 0], [1, 0, 0]]))


def test_unknown_mixup_key_is_refused():
    with pytest.raises(Exception, match="mixup_alph"):
        ClassificationModule(MiTForImageClassification("b0", 3), mixup={"mixup_alph": 0.8})


@pytest.mark.slow
def test_classifier_learns_the_sample_shapes_and_starts_a_segformer(tmp_path):
    # The bundled recipe as a user runs it (300 steps of 32 from scratch); measured val/top1 0.51.
    overrides = [
        f"data.root={tmp_path / 'shapes'}",
        "data.num_workers=0",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
    ]
    cfg = cli.compose(CONFIGS, "train_cls", overrides, run_dir=tmp_path / "cls")
    top1 = load_script("train").train(cfg)
    assert top1 > 0.4  # chance: 1/6
    best = tmp_path / "cls" / "checkpoints" / "best.ckpt"
    classifier = MiTForImageClassification.from_pretrained(best)
    assert classifier.num_classes == 6 and classifier.id2label[0] == "box"

    seg = [
        *tiny_sample_overrides(tmp_path / "scenes", num_train=4, num_val=2),
        f"model.pretrained={best}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
    ]
    load_script("train").train(cli.compose(CONFIGS, "train", seg, run_dir=tmp_path / "seg"))
    # Two optimizer steps from the classifier's encoder: far closer to it than a fresh encoder is.
    from segformer import SegFormer

    tuned = SegFormer.from_pretrained(tmp_path / "seg" / "checkpoints" / "last.ckpt")
    start = classifier.encoder.stages[0].patch_embed.proj.weight
    moved = (tuned.encoder.stages[0].patch_embed.proj.weight - start).abs().max()
    fresh = (SegFormer("b0", num_classes=7).encoder.stages[0].patch_embed.proj.weight - start).abs().max()
    assert moved < 0.1 * fresh



def _resume_run(tmp_path, name, *extra):
    """6 steps of 4 of the 12 sample images (3 an epoch), mixup and drop path on, a checkpoint
    kept every 2 steps; validation at the end. -> (val/top1, last.ckpt)."""
    overrides = [
        f"data.root={tmp_path / 'shapes'}",
        "data.dataset.per_class_train=2",
        "data.dataset.per_class_val=1",
        "data.num_workers=0",
        "data.crop_size=32",
        "global_batch_size=4",
        "module.mixup={mixup_alpha:0.8,cutmix_alpha:1.0,prob:1.0,switch_prob:0.5}",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "trainer.deterministic=true",
        "scheduler.warmup_iters=2",
        "+callbacks.kept={_target_:lightning.pytorch.callbacks.ModelCheckpoint,every_n_train_steps:2,save_top_k:-1,filename:'step{step}',auto_insert_metric_name:false}",
        f"+callbacks.kept.dirpath={tmp_path / name / 'kept'}",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
        "~logger",
        *extra,
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in both runs
    try:
        top1 = load_script("train").train(cli.compose(CONFIGS, "train_cls", overrides, run_dir=tmp_path / name))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)  # trainer.deterministic=true set it for the process
    return top1, torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_classification_run_resumed_mid_epoch_ends_bitwise_as_an_uninterrupted_one(tmp_path):
    top1, reference = _resume_run(tmp_path, "whole")
    # The state at step 4 (one batch into the second epoch), continued by a new run.
    resumed_top1, resumed = _resume_run(tmp_path, "resumed", f"ckpt_path={tmp_path / 'whole' / 'kept' / 'step4.ckpt'}")
    assert resumed["global_step"] == reference["global_step"] == 6
    assert sorted(p.name for p in (tmp_path / "resumed" / "kept").iterdir()) == ["step6.ckpt"]  # it trained steps 5-6 only
    different = [k for k, v in reference["state_dict"].items() if not torch.equal(resumed["state_dict"][k], v)]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    ours, theirs = (c["optimizer_states"][0]["state"] for c in (resumed, reference))
    assert all(torch.equal(ours[k]["exp_avg_sq"], theirs[k]["exp_avg_sq"]) for k in theirs)
    assert resumed_top1 == top1


def classifier_checkpoint(path):
    torch.manual_seed(4)
    model = MiTForImageClassification("b0", num_classes=6, id2label=dict(enumerate("abcdef"))).eval()
    meta = {**model.config, "preprocessing": {"crop_size": 48, "crop_ratio": 0.875, "mean": [0.0] * 3, "std": [255.0] * 3}}
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}, "segformer": meta}, path)
    return model



def test_model_pretrained_takes_a_classification_run_folder(tmp_path):
    from segformer.model.classifier import build_classifier
    from segformer.model.segformer import build_segformer

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    trained = classifier_checkpoint(run / "checkpoints" / "last.ckpt")
    segformer = build_segformer("b0", num_classes=7, pretrained=str(run))
    same = build_classifier("b0", num_classes=6, pretrained=str(run))
    other = build_classifier("b0", num_classes=3, pretrained=str(run))  # fine-tuned on another label set
    encoder = trained.encoder.state_dict()
    for model in (segformer, same, other):
        assert all(torch.equal(v, encoder[k]) for k, v in model.encoder.state_dict().items())
    assert torch.equal(same.classifier.weight, trained.classifier.weight) and same.id2label == trained.id2label
    assert other.num_classes == 3 and segformer.num_classes == 7

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="run folder"):
        build_segformer("b0", num_classes=7, pretrained=str(tmp_path / "empty"))


@pytest.mark.slow
def test_predict_writes_the_top5_and_export_writes_a_transformers_classifier(tmp_path, capsys):
    import csv

    import numpy as np
    from PIL import Image
    from transformers import SegformerForImageClassification

    from segformer.data.classification import eval_transform

    model = classifier_checkpoint(tmp_path / "cls.ckpt")
    (tmp_path / "in").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in" / "x.png")
    overrides = [f"ckpt_path={tmp_path / 'cls.ckpt'}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"]
    load_script("predict").predict(cli.compose(CONFIGS, "predict", overrides, run_dir=tmp_path / "run"))
    with torch.no_grad():
        probs = model(eval_transform(48, 0.875, [0.0] * 3, [255.0] * 3)(image=image)["image"][None]).softmax(-1)[0]
    order = probs.argsort(descending=True)[:5].tolist()
    with open(tmp_path / "out" / "predictions.csv") as handle:
        row = next(csv.DictReader(handle))
    assert [row[f"label_{i + 1}"] for i in range(5)] == ["abcdef"[i] for i in order]
    assert abs(float(row["prob_1"]) - float(probs[order[0]])) < 1e-5
    assert f"x.png: {'abcdef'[order[0]]}" in capsys.readouterr().out

    from segformer.export import export

    export(cli.compose(CONFIGS, "export", [f"ckpt_path={tmp_path / 'cls.ckpt'}", "format=hf", f"output={tmp_path / 'hf'}"], run_dir=tmp_path / "e"))
    hf = SegformerForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label[5] == "f"
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        # transformers computes with LayerNorm eps 1e-5, this model with 1e-6: close, not equal.
        assert (hf(pixel_values=x).logits - model(x)).abs().max() < 1e-3


@pytest.mark.slow
def test_eval_scores_a_classifier_top1_top5(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from segformer.data.classification import eval_transform

    model = classifier_checkpoint(tmp_path / "cls.ckpt")
    rng = np.random.default_rng(1)
    images, labels = [], []
    for label, name in enumerate("abcdef"):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / "data" / "val" / name / "0.png")
        images.append(image)
        labels.append(label)
    transform = eval_transform(48, 0.875, [0.0] * 3, [255.0] * 3)
    with torch.no_grad():
        logits = model(torch.stack([transform(image=i)["image"] for i in images]))
    target = torch.tensor(labels)
    top1 = float((logits.argmax(1) == target).float().mean())
    top5 = float((logits.topk(5, dim=1).indices == target[:, None]).any(1).float().mean())
    overrides = [
        f"ckpt_path={tmp_path / 'cls.ckpt'}", "data=cls_folder", f"data.root={tmp_path / 'data'}", "data.num_classes=6",
        "data.crop_size=48", "data.mean=[0,0,0]", "data.std=[255,255,255]", "data.num_workers=0", "data.val_batch_size=4",
    ]
    score = load_script("eval").evaluate(cli.compose(CONFIGS, "eval", overrides, run_dir=tmp_path / "eval"))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert abs(score - top1) < 1e-6 and abs(saved["top5"] - top5) < 1e-6


def test_imagenet_recipe_composes_with_the_pvt_numbers(tmp_path):
    cfg = cli.compose(CONFIGS, "train_cls", ["data=cls_imagenet", "model=cls_b2"], run_dir=tmp_path / "run")
    assert cfg.global_batch_size == 1024 and cfg.optimizer.lr == 1e-3 and cfg.optimizer.weight_decay == 0.05
    assert cfg.trainer.max_steps == 300 * 1251 and cfg.scheduler.warmup_iters == 5 * 1251 and cfg.scheduler.min_lr == 1e-5
    assert cfg.model.variant == "b2" and cfg.data.num_classes == 1000 and cfg.module.mixup.cutmix_alpha == 1.0
    assert cfg.data.crop_size == 224 and cfg.data.crop_ratio == 0.875 and cfg.module.label_smoothing == 0.1
