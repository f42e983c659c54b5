"""The network itself: shapes, sizes, the paper's details, and the folded head against the reference."""

import itertools
import math

import pytest
import torch

from segformer import MixTransformer, SegFormer
from segformer.errors import ConfigError
from segformer.model.mit import MIT_VARIANTS

# REFERENCE.md: encoder / head parameters in millions with 150 classes.
PAPER_PARAMS = {
    "b0": (3.319, 0.433),
    "b1": (13.151, 0.564),
    "b2": (24.196, 3.266),
    "b3": (44.072, 3.266),
    "b4": (60.843, 3.266),
    "b5": (81.443, 3.266),
}


def _millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 3)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(variant):
    model = SegFormer(variant, num_classes=150)
    assert (_millions(model.encoder), _millions(model.decode_head)) == PAPER_PARAMS[variant]


@pytest.mark.slow
@pytest.mark.parametrize("height,width", [(64, 64), (513, 377), (33, 95), (29, 30)])
def test_logits_are_a_quarter_of_any_input_size(height, width):
    model = SegFormer("b0", num_classes=5).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, height, width))
    assert logits.shape == (2, 5, math.ceil(height / 4), math.ceil(width / 4))


@pytest.mark.slow
def test_encoder_features_are_reachable_on_their_own():
    encoder = MixTransformer(MIT_VARIANTS["b1"]).eval()
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 128, 96))
    assert [f.shape for f in features] == [
        (1, 64, 32, 24),
        (1, 128, 16, 12),
        (1, 320, 8, 6),
        (1, 512, 4, 3),
    ]


def test_paper_details():
    model = SegFormer("b2", num_classes=19)
    blocks = [block for stage in model.encoder.stages for block in stage.blocks]
    rates = [block.drop_path.drop_prob for block in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert max(steps) - min(steps) < 1e-7  # linear over all blocks of all stages
    assert [stage.blocks[0].attn.sr_ratio for stage in model.encoder.stages] == [8, 4, 2, 1]
    assert [stage.patch_embed.proj.kernel_size for stage in model.encoder.stages] == [(7, 7), (3, 3), (3, 3), (3, 3)]
    assert model.decode_head.bn.num_features == 768
    assert SegFormer("b1").decode_head.bn.num_features == 256
    assert blocks[0].mlp.dwconv.groups == blocks[0].mlp.dwconv.in_channels == 4 * 64
    assert blocks[0].norm1.eps == 1e-6 and model.encoder.stages[0].patch_embed.norm.eps == 1e-5


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 64, 64), (1, 4, 64, 64), (2, 3, 64)])
def test_wrong_input_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        SegFormer("b0", num_classes=3)(torch.randn(*shape))


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 29x29"):
        SegFormer("b0", num_classes=3)(torch.randn(1, 3, 28, 64))


def test_integer_input_is_a_clear_error():
    with pytest.raises(ValueError, match="float"):
        SegFormer("b0", num_classes=3)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_unknown_variant_names_the_choices():
    with pytest.raises(ConfigError, match="b0, b1, b2, b3, b4, b5"):
        SegFormer("b9")


def _randomize_batchnorm(model: SegFormer) -> None:
    bn = model.decode_head.bn
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_folded_head_equals_reference_in_eval(variant):
    torch.manual_seed(0)
    model = SegFormer(variant, num_classes=11).eval()
    _randomize_batchnorm(model)
    x = torch.randn(2, 3, 75, 61)
    with torch.no_grad():
        fast = model(x)
        model.fast_head = False
        reference = model(x)
    assert (fast - reference).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("variant,dropout", [("b0", 0.0), ("b0", 0.3), ("b2", 0.1)])
def test_folded_head_equals_reference_in_training(variant, dropout):
    """Same loss and the same gradient for every parameter, BatchNorm in batch-statistics mode,
    channel dropout drawing the same mask (folded into the classifier on the fast path)."""
    torch.manual_seed(0)
    model = SegFormer(variant, num_classes=7, drop_path_rate=0.0, decoder_dropout=dropout).train()
    x = torch.randn(2, 3, 45, 37)
    labels = torch.randint(0, 7, (2, 45, 37))
    labels[:, :5] = 255

    def loss_and_grads(fast: bool):
        model.zero_grad()
        model.fast_head = fast
        torch.manual_seed(1)  # the same dropout draw for both heads
        logits = model(x)
        up = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = torch.nn.functional.cross_entropy(up, labels, ignore_index=255)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fast, grads_fast = loss_and_grads(True)
    model.load_state_dict(state)  # BatchNorm's running stats moved; start the reference from the same state
    loss_ref, grads_ref = loss_and_grads(False)
    assert loss_fast == pytest.approx(loss_ref, abs=1e-5)
    assert grads_fast.keys() == grads_ref.keys()
    for name in grads_ref:
        # Relative to each gradient's size; some (biases before BatchNorm) are zero up to rounding.
        tolerance = 1e-3 * grads_ref[name].abs().max().item() + 1e-7
        assert (grads_fast[name] - grads_ref[name]).abs().max().item() < tolerance, name
    for name in ("running_mean", "running_var"):
        model.load_state_dict(state)
        model.fast_head = True
        model(x)
        fast_stat = getattr(model.decode_head.bn, name).clone()
        model.load_state_dict(state)
        model.fast_head = False
        model(x)
        assert torch.allclose(fast_stat, getattr(model.decode_head.bn, name), atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_classify_is_dropout2d_then_the_classifier(p):
    """The fast head's classifier, dropout folded into per-sample weights: same mask as
    nn.Dropout2d from the same seed, same logits and gradients (input, weight, bias)."""
    head = SegFormer("b0", num_classes=5, decoder_dropout=p).decode_head.train()
    fused = torch.randn(3, 256, 6, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_out = torch.randn(3, 5, 6, 7)

    def run(fast: bool):
        for t in (fused, head.classifier.weight, head.classifier.bias):
            t.grad = None
        torch.manual_seed(3)
        logits = head.classify(fused) if fast else head.classifier(head.dropout(fused))
        logits.backward(grad_out)
        return logits.detach(), fused.grad.clone(), head.classifier.weight.grad.clone(), head.classifier.bias.grad.clone()

    fast, reference = run(True), run(False)
    assert fast[0].is_contiguous()
    for a, b in zip(fast, reference):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    if p == 0.5:  # a mask was drawn: some of each sample's channels are dropped, and the same ones
        dropped = reference[1].abs().sum((2, 3)) == 0
        assert dropped.any() and not dropped.all()
        assert torch.equal(dropped, fast[1].abs().sum((2, 3)) == 0)
    head.eval()
    with torch.no_grad():
        assert torch.allclose(head.classify(fused), head.classifier(fused), atol=1e-5)


def test_reset_classifier_keeps_the_rest():
    model = SegFormer("b0", num_classes=150)
    before = model.decode_head.linear_fuse.weight.clone()
    model.reset_classifier(19, {i: f"c{i}" for i in range(19)})
    assert model.num_classes == 19 and model.id2label[18] == "c18"
    assert torch.equal(before, model.decode_head.linear_fuse.weight)


def test_id2label_must_cover_every_class():
    with pytest.raises(ConfigError, match="id2label"):
        SegFormer("b0", num_classes=3, id2label={0: "a", 1: "b"})


# ----------------------------------------------------------------------------- hidden states


@pytest.mark.slow
def test_hidden_states_equal_transformers_segformer_model(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    mit = MIT_VARIANTS["b0"]
    config = SegformerConfig(depths=list(mit.depths), hidden_sizes=list(mit.hidden_sizes), decoder_hidden_size=256, num_labels=5)
    torch.manual_seed(0)
    hf = SegformerForSemanticSegmentation(config).eval()
    hf.save_pretrained(tmp_path)
    ours = SegFormer.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 97, 70)
    with torch.no_grad():
        expected = hf.segformer(x, output_hidden_states=True).hidden_states
        output = ours(x, output_hidden_states=True)
        plain = ours(x)
        encoder_maps = ours.encoder(x)
    assert len(output.hidden_states) == 4
    for ours_map, hf_map, encoder_map in zip(output.hidden_states, expected, encoder_maps):
        assert ours_map.shape == hf_map.shape and ours_map.is_contiguous() and encoder_map.is_contiguous()
        torch.testing.assert_close(ours_map, hf_map, rtol=0, atol=1e-5)
        assert torch.equal(ours_map, encoder_map)
        ours_map.view(ours_map.shape[0], -1)  # a plain view works (channels-last maps refuse it)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, output.logits)


# ----------------------------------------------------------------------------- any encoder


class PoolEncoder(torch.nn.Module):
    """A foreign encoder: strided convs, declaring its channels like MixTransformer does."""

    hidden_sizes = (8, 16, 24, 32)

    def __init__(self) -> None:
        super().__init__()
        channels = (3, *self.hidden_sizes)
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(a, b, 3, stride=4 if i == 0 else 2, padding=1)
            for i, (a, b) in enumerate(itertools.pairwise(channels))
        )

    def forward(self, x):
        maps = []
        for conv in self.convs:
            x = torch.relu(conv(x))
            maps.append(x)
        return maps


def _train_steps(model: SegFormer, steps: int) -> list[float]:
    from segformer.training.optim import param_groups

    torch.manual_seed(0)
    # Two classes in 16x16 blocks, written into the first channel: learnable in a few steps.
    labels = torch.randint(0, 2, (4, 4, 4)).repeat_interleave(16, 1).repeat_interleave(16, 2)
    x = torch.randn(4, 3, 64, 64)
    x[:, 0] += 3 * (2 * labels - 1)
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-4, weight_decay=0.01), lr=1e-4)
    losses = []
    model.train()
    for _ in range(steps):
        logits = torch.nn.functional.interpolate(model(x), size=(64, 64), mode="bilinear", align_corners=False)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_any_encoder_trains_under_the_decode_head():
    model = SegFormer(encoder=PoolEncoder(), num_classes=2)
    assert model.variant == "custom" and [l.in_features for l in model.decode_head.linear_c] == [8, 16, 24, 32]
    assert model.decode_head.bn.num_features == 256
    losses = _train_steps(model, 8)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]
    output = model.eval()(torch.randn(1, 3, 64, 96), output_hidden_states=True)
    assert output.logits.shape == (1, 2, 16, 24)
    assert [tuple(h.shape[1:]) for h in output.hidden_states] == [(8, 16, 24), (16, 8, 12), (24, 4, 6), (32, 2, 3)]


def test_a_foreign_encoder_is_checked_and_cannot_be_saved_as_transformers(tmp_path):
    from segformer.errors import CheckpointError

    with pytest.raises(ConfigError, match="out_channels or hidden_sizes"):
        SegFormer(encoder=torch.nn.Conv2d(3, 8, 3), num_classes=2)
    wrong = PoolEncoder()
    wrong.hidden_sizes = (8, 16, 24, 64)  # declares what it does not return
    with pytest.raises(ValueError, match=r"\[8, 16, 24, 64\] channels"):
        SegFormer(encoder=wrong, num_classes=2)(torch.randn(1, 3, 64, 64))
    with pytest.raises(CheckpointError, match="holds only a MiT encoder; this model's encoder is PoolEncoder"):
        SegFormer(encoder=PoolEncoder(), num_classes=2).save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_custom_encoder_config_builds_and_trains(tmp_path):
    from helpers import ROOT
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from segformer import cli
    from segformer.model.encoders import ConvEncoder

    overrides = ["model=custom_encoder_example", "data=sample", f"paths.data_dir={tmp_path}"]
    cfg = cli.compose(ROOT / "configs", "train", overrides, run_dir=tmp_path / "run")
    model = instantiate(cfg.model)
    assert isinstance(model.encoder, ConvEncoder) and model.num_classes == cfg.data.num_classes
    assert model.encoder.out_channels == (32, 64, 128, 256)
    losses = _train_steps(model, 5)
    assert losses[-1] < losses[0]
    cfg = cli.compose(
        ROOT / "configs", "train",
        ["model=custom_encoder_example", "model.pretrained=mit_b0_imagenet"], run_dir=tmp_path / "run",
    )
    with pytest.raises(InstantiationException) as error:  # the CLI prints its cause as one line
        instantiate(cfg.model)
    assert isinstance(error.value.__cause__, ConfigError)
    assert "model.pretrained='mit_b0_imagenet' loads a SegFormer with its MiT encoder" in str(error.value.__cause__)
