"""Mix Transformer (MiT), the hierarchical encoder of SegFormer (Xie et al. 2021, Sec. 3.1).

Names follow the paper: overlapping patch embeddings, efficient self-attention with sequence
reduction, Mix-FFN. Tokens travel as (B, N, C) inside a stage and leave each stage as a
(B, C, H, W) feature map at 1/4, 1/8, 1/16 and 1/32 of the input.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.checkpoint import checkpoint

from segformer.errors import ConfigError


@dataclass(frozen=True)
class MiTConfig:
    """Shape of one MiT variant; everything else (kernels, ratios) is shared by B0-B5."""

    depths: tuple[int, int, int, int]
    hidden_sizes: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    patch_sizes: tuple[int, int, int, int] = (7, 3, 3, 3)
    strides: tuple[int, int, int, int] = (4, 2, 2, 2)


MIT_VARIANTS: dict[str, MiTConfig] = {
    "b0": MiTConfig(depths=(2, 2, 2, 2), hidden_sizes=(32, 64, 160, 256)),
    "b1": MiTConfig(depths=(2, 2, 2, 2), hidden_sizes=(64, 128, 320, 512)),
    "b2": MiTConfig(depths=(3, 4, 6, 3), hidden_sizes=(64, 128, 320, 512)),
    "b3": MiTConfig(depths=(3, 4, 18, 3), hidden_sizes=(64, 128, 320, 512)),
    "b4": MiTConfig(depths=(3, 8, 27, 3), hidden_sizes=(64, 128, 320, 512)),
    "b5": MiTConfig(depths=(3, 6, 40, 3), hidden_sizes=(64, 128, 320, 512)),
}

# torch.utils.flop_counter counts the CUDA attention kernels but not the CPU one, so FLOP counts of
# CPU runs (Lightning's model summary) would leave attention out: the same formulas for it.
for _op, _formula in (
    (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
    (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop),
):
    if _op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(_op, get_raw=True)(_formula)

# Fused-inference Mix-FFN: hidden activations (batch x tokens x 4C) up to 4 Mi values (16 MiB) in one
# piece, larger ones in bands of rows of about 1 Mi values (4 MiB). Measured (CPU, one thread): bands
# halve stage 1 and 2 on 1024x1024 windows (32 MiB per image, which glibc's malloc maps afresh
# each time) and are slower than one piece at 16 MiB and below (B2 at 512x512).
FFN_WHOLE_ELEMENTS = 1 << 22
FFN_BAND_ELEMENTS = 1 << 20

# LayerNorm eps of the patch-embedding and sequence-reduction norms in every public code base;
# the block and stage-final norms differ by origin (NVlabs 1e-6, transformers 1e-5).
PATCH_NORM_EPS = 1e-5


def _tokens_to_map(x: Tensor, height: int, width: int) -> Tensor:
    """(B, H*W, C) tokens as a (B, C, H, W) map in channels-last memory: a view, not a copy.

    Convolutions (oneDNN) run natively on channels-last maps, so tokens and maps convert for free
    and no transposing copy sits between the attention, the depthwise conv and the next stage.
    """
    return x.view(x.shape[0], height, width, x.shape[2]).permute(0, 3, 1, 2)


def _map_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) map -> (B, H*W, C) tokens; free when the map is channels-last."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def fused_inference(x: Tensor) -> bool:
    """Whether to run oneDNN's fused kernels (bias, GELU and the residual add inside the matmul or
    conv: fewer passes over the tokens): eager float32 CPU inference only. They have no autograd
    formula, autocast does not cover them, and torch.compile fuses by itself."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()  # the ONNX exporter traces: it knows no oneDNN ops
        and not torch.onnx.is_in_onnx_export()
        # Counting modes (FlopCounterMode: Lightning's summary, segformer.benchmark) know no oneDNN ops.
        and _get_current_dispatch_mode() is None
        and _fused_ops_work()
    )


@functools.cache
def _fused_ops_work() -> bool:
    """Whether this torch build has the private oneDNN ops and they compute the plain result
    (checked once on a tiny input): builds without them take the plain path instead of failing."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        # A private generator: the probe leaves torch's global random stream untouched.
        generator = torch.Generator().manual_seed(0)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=generator)

        with torch.no_grad():
            x, weight, bias = randn(2, 3, 4), randn(5, 4), randn(5)
            linear = torch.ops.mkldnn._linear_pointwise.binary(x, torch.ones(2, 3, 5), weight, bias, "add")
            maps, kernel = randn(1, 2, 3, 3), randn(2, 1, 3, 3)
            conv = torch.ops.mkldnn._convolution_pointwise(maps, kernel, None, [1, 1], [1, 1], [1, 1], 2, "gelu", [], "none")
        return torch.allclose(linear, F.linear(x, weight, bias) + 1, atol=1e-5) and torch.allclose(
            conv, F.gelu(F.conv2d(maps, kernel, padding=1, groups=2)), atol=1e-5
        )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias (+ residual)`` in one oneDNN kernel (``fused_inference`` only)."""
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


class OverlapPatchEmbed(nn.Module):
    """Strided conv whose kernel overlaps its neighbours, so no positional encoding is needed."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=PATCH_NORM_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        # Channels-last in and out: the tokens are then a plain view of the conv's output.
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return self.norm(_map_to_tokens(x)), x.shape[2], x.shape[3]


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a sequence shrunk R x R times.

    Keys and values share one projection (`kv`) so they cost a single matmul.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim, eps=PATCH_NORM_EPS)

    def forward(self, x: Tensor, height: int, width: int, residual: Tensor | None = None) -> Tensor:
        """``residual`` (fused inference only) is added to the output inside the projection."""
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        fused = residual is not None

        def project(layer: nn.Linear, t: Tensor) -> Tensor:
            return fused_linear(t, layer.weight, layer.bias) if fused else layer(t)

        q = project(self.q, x).view(batch, tokens, self.num_heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            reduced = self.sr(_tokens_to_map(x, height, width))
            x = self.sr_norm(_map_to_tokens(reduced))
        k, v = project(self.kv, x).view(batch, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        if fused:
            return fused_linear(out, self.proj.weight, self.proj.bias, residual)
        return self.proj(out)


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv -> GELU -> Linear; the conv leaks position into the tokens."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, height: int, width: int, residual: Tensor | None = None) -> Tensor:
        """``residual`` (fused inference only) is added to the output inside ``fc2``.

        Fused inference runs large inputs a band of rows at a time (each band's fc1 with one
        more row each side for the 3x3 conv): the hidden activations of a 1024x1024 window at
        stage 1 (65536 tokens x 128, 32 MiB per image) are otherwise allocated afresh, and
        page-faulted, twice per block; with bands they stay in cache. Same values either way.
        """
        if residual is None:
            x = self.act(self.dwconv(_tokens_to_map(self.fc1(x), height, width)))
            return self.fc2(_map_to_tokens(x))
        batch, tokens, _ = x.shape
        hidden = self.fc1.out_features
        if batch * tokens * hidden <= FFN_WHOLE_ELEMENTS:
            return self._fused_rows(x, residual, 0, height, 0, height, width)
        out = torch.empty_like(residual)
        rows = max(1, FFN_BAND_ELEMENTS // (width * hidden))
        for image in range(batch):
            for start in range(0, height, rows):
                stop = min(start + rows, height)
                first, last = max(start - 1, 0), min(stop + 1, height)
                out[image : image + 1, start * width : stop * width] = self._fused_rows(
                    x[image : image + 1], residual[image : image + 1], first, last, start, stop, width
                )
        return out

    def _fused_rows(
        self, x: Tensor, residual: Tensor, first: int, last: int, start: int, stop: int, width: int
    ) -> Tensor:
        """fc1 and conv + GELU over token rows [first, last), fc2 + residual of rows [start, stop)."""
        hidden = fused_linear(x[:, first * width : last * width], self.fc1.weight, self.fc1.bias)
        conv = self.dwconv
        hidden = torch.ops.mkldnn._convolution_pointwise(
            _tokens_to_map(hidden, last - first, width), conv.weight, conv.bias, conv.padding, conv.stride,
            conv.dilation, conv.groups, "gelu", [], self.act.approximate,
        )
        hidden = _map_to_tokens(hidden[:, :, start - first : stop - first])
        return fused_linear(hidden, self.fc2.weight, self.fc2.bias, residual[:, start * width : stop * width])


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch during training."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float, norm_eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        if not self.training and fused_inference(x):  # eval: no drop path, the residual adds fuse
            x = self.attn(self.norm1(x), height, width, residual=x)
            return self.mlp(self.norm2(x), height, width, residual=x)
        x = x + self.drop_path(self.attn(self.norm1(x), height, width))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))


class Stage(nn.Module):
    """Patch embedding, a stack of blocks and a final LayerNorm; returns a (B, C, H, W) map."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        depth: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: int,
        patch_size: int,
        stride: int,
        drop_paths: list[float],
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, patch_size, stride)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, sr_ratio, mlp_ratio, drop_paths[i], norm_eps) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.checkpoint_blocks = False

    def forward(self, x: Tensor) -> Tensor:
        x, height, width = self.patch_embed(x)
        for block in self.blocks:
            if self.checkpoint_blocks and torch.is_grad_enabled():
                # Only the block's input is kept; backward recomputes the rest (drop-path draws
                # replayed from the saved RNG state, so the gradients are the same).
                x = checkpoint(block, x, height, width, use_reentrant=False)
            else:
                x = block(x, height, width)
        return _tokens_to_map(self.norm(x), height, width)


class MixTransformer(nn.Module):
    """The MiT encoder: four stages, returning their feature maps (strides 4, 8, 16, 32).

    ``forward`` returns contiguous NCHW maps, as transformers' SegformerModel does (``.view`` works
    on them); ``channels_last_maps`` returns the same maps as the stages make them, in
    channels-last memory, which SegFormer's decode head consumes: the copies plus the head on
    contiguous maps made a B0 forward at 512x512 on CPU about 4% slower (benchmarks/encoder_maps.py).
    """

    def __init__(
        self,
        config: MiTConfig,
        in_channels: int = 3,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not 0 <= drop_path_rate < 1:
            raise ConfigError(
                f"drop_path_rate={drop_path_rate} (model.drop_path_rate) is out of range: it is the "
                "probability of dropping the last block's path, in [0, 1) (the paper: 0.1)."
            )
        if not norm_eps > 0:
            raise ConfigError(f"norm_eps={norm_eps} (model.norm_eps) must be > 0 (NVlabs: 1e-6, transformers: 1e-5).")
        self.config = config
        self.norm_eps = norm_eps
        # Drop-path rates rise linearly from 0 over all blocks of all stages.
        rates = torch.linspace(0, drop_path_rate, sum(config.depths), device="cpu").tolist()  # cpu: buildable on meta
        self.stages = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            start = sum(config.depths[:i])
            self.stages.append(
                Stage(
                    in_channels=in_channels if i == 0 else config.hidden_sizes[i - 1],
                    dim=config.hidden_sizes[i],
                    depth=depth,
                    num_heads=config.num_heads[i],
                    sr_ratio=config.sr_ratios[i],
                    mlp_ratio=config.mlp_ratio,
                    patch_size=config.patch_sizes[i],
                    stride=config.strides[i],
                    drop_paths=rates[start : start + depth],
                    norm_eps=norm_eps,
                )
            )
        self.apply(_init_weights)

    @property
    def hidden_sizes(self) -> tuple[int, int, int, int]:
        return self.config.hidden_sizes

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each block's activations in backward instead of keeping them (less memory,
        one more block forward per block in training)."""
        return self.stages[0].checkpoint_blocks

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        for stage in self.stages:
            stage.checkpoint_blocks = bool(enabled)

    def channels_last_maps(self, pixel_values: Tensor) -> list[Tensor]:
        features = []
        x = pixel_values
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, pixel_values: Tensor, channels_last: bool = False) -> list[Tensor]:
        """``channels_last=True``: the maps of ``channels_last_maps`` (what SegFormer's head takes),
        through ``forward`` so that a compiled encoder compiles them."""
        maps = self.channels_last_maps(pixel_values)
        return maps if channels_last else [x.contiguous() for x in maps]


def _init_weights(module: nn.Module) -> None:
    """The NVlabs initialisation: N(0, 0.02) linears, fan-out normal convs.

    NVlabs truncates the linears' normal at +-2, a hundred standard deviations out: a plain
    normal draws the same distribution, without trunc_normal_'s cost (seconds for B5).
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, std=(2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
