"""model.activation_checkpointing: the same loss and gradients, fewer kept activations."""

from __future__ import annotations

import pytest
import torch

from segformer import build_segformer
from segformer.errors import ConfigError
from segformer.model.encoders import ConvEncoder
from segformer.model.segformer import SegFormer


def loss_and_gradients(model, pixels):
    torch.manual_seed(1)  # the same drop-path and dropout draws for both runs
    loss = model(pixels).square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, grads


@pytest.mark.slow
def test_gradients_equal_those_without_checkpointing():
    torch.manual_seed(0)
    model = build_segformer("b0", num_classes=4, drop_path_rate=0.3).train()
    pixels = torch.randn(2, 3, 64, 64)
    loss, grads = loss_and_gradients(model, pixels)
    model.activation_checkpointing = True
    assert model.encoder.activation_checkpointing and all(stage.checkpoint_blocks for stage in model.encoder.stages)
    checkpointed_loss, checkpointed_grads = loss_and_gradients(model, pixels)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    for grad, checkpointed in zip(grads, checkpointed_grads):
        torch.testing.assert_close(checkpointed, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_blocks_are_recomputed_in_backward():
    model = build_segformer("b0", num_classes=4, activation_checkpointing=True).train()
    calls = []
    model.encoder.stages[0].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert len(calls) == 2  # the forward, then its recomputation
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 3  # without gradients nothing is recomputed


def test_a_foreign_encoder_refuses_it():
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        SegFormer(num_classes=3, encoder=ConvEncoder(out_channels=[8, 16, 32, 64]), activation_checkpointing=True)
