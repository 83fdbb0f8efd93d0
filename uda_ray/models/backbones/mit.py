"""SegFormer's Mix Transformer (MiT-B0 … B5), the encoder of DAFormer, HRDA, MIC and CLUDA (METHODS.md §9).

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers", NeurIPS 2021.
Four stages; stage s (s = 1…4) turns its input into tokens with an overlapping patch embedding (a 7×7 stride-4
convolution for s = 1, 3×3 stride 2 after that, padding k // 2, then LayerNorm), runs ``depths[s]`` blocks

    x ← x + DropPath(W_o · softmax(Q Kᵀ / √d) V)           Q = W_q LN₁(x),  [K, V] = W_kv R(LN₁(x))
    x ← x + DropPath(W_2 · GELU(DWConv₃ₓ₃(W_1 LN₂(x))))   hidden width = mlp_ratio · C_s

with R = LayerNorm ∘ Conv(kernel = stride = sr_s) on the token grid when sr_s > 1 (spatial reduction of keys and
values, sr = 8/4/2/1) and the identity otherwise, then a final LayerNorm; its output, reshaped to (B, C_s, H/r_s,
W/r_s) with r = 4/8/16/32, is the stage's feature map and the next stage's input. The 3×3 depthwise convolution
in the MLP is the only source of position information (no position embedding). Drop-path probabilities rise
linearly from 0 to ``drop_path_rate`` over all blocks of all stages.

Module and parameter names are SegFormer's (``patch_embed1.proj``, ``block3.17.attn.kv``, ``norm4``, …), so its
released ImageNet checkpoints (``mit_b5.pth``) load key for key with ``load_segformer_checkpoint``.

LayerNorm eps as in the official code: 1e-6 for the block norms (norm1, norm2) and the stage norms (norm1…4), but
PyTorch's default 1e-5 for the patch-embedding norms and the spatial-reduction norm (``attn.norm``), which the
official code builds with a plain ``nn.LayerNorm``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uda_ray.models.errors import CheckpointError, listing, read_state_dict, shape_mismatches

BLOCK_NORM_EPS = 1e-6  # official: norm_layer = partial(nn.LayerNorm, eps=1e-6) for block and stage norms
STAGE_REDUCTIONS = (4, 8, 16, 32)
IGNORED_CHECKPOINT_PREFIXES = ("head.",)  # SegFormer's ImageNet classifier

_COMMON = {"num_heads": (1, 2, 5, 8), "sr_ratios": (8, 4, 2, 1), "mlp_ratio": 4}
_WIDE = (64, 128, 320, 512)
MIT_VARIANTS: dict[str, dict[str, Any]] = {
    "mit_b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), **_COMMON},
    "mit_b1": {"embed_dims": _WIDE, "depths": (2, 2, 2, 2), **_COMMON},
    "mit_b2": {"embed_dims": _WIDE, "depths": (3, 4, 6, 3), **_COMMON},
    "mit_b3": {"embed_dims": _WIDE, "depths": (3, 4, 18, 3), **_COMMON},
    "mit_b4": {"embed_dims": _WIDE, "depths": (3, 8, 27, 3), **_COMMON},
    "mit_b5": {"embed_dims": _WIDE, "depths": (3, 6, 40, 3), **_COMMON},
}


class OverlapPatchEmbed(nn.Module):
    """Strided convolution with padding k // 2 (patches overlap), then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as in the official code

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, H', W')
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, H'W', C)
        return self.norm(x), h, w


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a grid reduced ``sr_ratio`` times per side."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"EfficientAttention: dim = {dim} is not divisible by num_heads = {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)  # rows [0, dim) give keys, [dim, 2·dim) values
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5, as in the official code

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).view(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, N, d)
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
            x = self.sr(grid).flatten(2).transpose(1, 2)  # (B, N', C), N' = ⌊H/sr⌋·⌊W/sr⌋
            x = self.norm(x)
        k, v = self.kv(x).view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)  # 2 × (B, heads, N', d)
        # softmax(q kᵀ / √d) v; dropout on the attention is 0 in every MiT variant
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj(out)


class DWConv(nn.Module):
    """3×3 depthwise convolution (with bias) on the token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        grid = x.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return self.dwconv(grid).flatten(2).transpose(1, 2)  # (B, N, C)


class MixFFN(nn.Module):
    """fc1 → 3×3 depthwise conv → GELU → fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class DropPath(nn.Module):
    """Stochastic depth per sample: in training, each sample's branch is zeroed with probability ``p`` and the kept
    ones scaled by 1 / (1 − p), one Bernoulli draw per sample (the draws and numbers of timm's ``DropPath``, which
    this saves importing: 0.7 s in every trial process)."""

    def __init__(self, p: float):
        super().__init__()
        self.drop_prob = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Block(nn.Module):
    """Pre-norm transformer block: efficient attention and Mix-FFN, each a drop-path residual."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixTransformer(nn.Module):
    """The MiT encoder: ``forward(x)`` maps a normalised (B, in_chans, H, W) batch to the selected stage maps.

    ``out_indices`` picks the stages whose maps are returned, finest first (empty = all four); stages after the
    last selected one are not built. ``feature_channels`` and ``feature_reductions`` describe the returned maps.
    """

    def __init__(self, embed_dims: tuple[int, ...], depths: tuple[int, ...], num_heads: tuple[int, ...],
                 sr_ratios: tuple[int, ...], mlp_ratio: float = 4, *, in_chans: int = 3, drop_path_rate: float = 0.1,
                 out_indices: tuple[int, ...] = ()):
        super().__init__()
        num_stages = len(STAGE_REDUCTIONS)
        lengths = {len(embed_dims), len(depths), len(num_heads), len(sr_ratios)}
        if lengths != {num_stages}:
            raise ValueError(f"MixTransformer: embed_dims {embed_dims}, depths {depths}, num_heads {num_heads} and "
                             f"sr_ratios {sr_ratios}: expected {num_stages} values each")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"MixTransformer: drop_path_rate = {drop_path_rate}: expected 0 <= drop_path_rate < 1")
        out_indices = tuple(out_indices) if out_indices else tuple(range(num_stages))
        if any(not 0 <= i < num_stages for i in out_indices) or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"MixTransformer: out_indices = {out_indices}: expected distinct stage indices in "
                             f"0…{num_stages - 1}, increasing (finest first)")
        self.arch: dict[str, Any] = {"embed_dims": tuple(embed_dims), "depths": tuple(depths),
                                     "num_heads": tuple(num_heads), "sr_ratios": tuple(sr_ratios),
                                     "mlp_ratio": mlp_ratio, "in_chans": in_chans}
        self.in_chans = in_chans
        self.out_indices = out_indices
        self.num_built_stages = out_indices[-1] + 1
        self.feature_channels: list[int] = [embed_dims[i] for i in out_indices]
        self.feature_reductions: list[int] = [STAGE_REDUCTIONS[i] for i in out_indices]

        # stochastic depth rule over all blocks of all four stages, built or not (so rates do not depend on out_indices)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        first = 0
        for s in range(self.num_built_stages):
            kernel, stride = (7, 4) if s == 0 else (3, 2)
            in_dim = in_chans if s == 0 else embed_dims[s - 1]
            self.add_module(f"patch_embed{s + 1}", OverlapPatchEmbed(in_dim, embed_dims[s], kernel, stride))
            self.add_module(f"block{s + 1}", nn.ModuleList(
                Block(embed_dims[s], num_heads[s], sr_ratios[s], mlp_ratio, rates[first + j]) for j in range(depths[s])
            ))
            self.add_module(f"norm{s + 1}", nn.LayerNorm(embed_dims[s], eps=BLOCK_NORM_EPS))
            first += depths[s]
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"MixTransformer.forward: input of shape {tuple(x.shape)}: expected "
                             f"(B, {self.in_chans}, H, W), normalised")
        outs = []
        for s in range(self.num_built_stages):
            x, h, w = getattr(self, f"patch_embed{s + 1}")(x)  # (B, hw, C_s)
            for block in getattr(self, f"block{s + 1}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{s + 1}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, C_s, h, w)
            if s in self.out_indices:
                outs.append(x)
        return outs


def _init_weights(m: nn.Module) -> None:
    """The official initialisation: Linear trunc-normal(σ = .02), LayerNorm (1, 0), conv normal(σ = √(2/fan_out)).

    fan_out = k_h·k_w·C_out / groups; all biases 0. ``trunc_normal_`` cuts at ±2 (absolute, i.e. ±100σ), as timm's
    copy used by SegFormer does.
    """
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_mit(name: str, *, pretrained_path: str = "", drop_path_rate: float = 0.1,
              out_indices: tuple[int, ...] = ()) -> MixTransformer:
    """MiT variant ``name`` (a key of MIT_VARIANTS), randomly initialised or loaded from a SegFormer checkpoint."""
    if name not in MIT_VARIANTS:
        raise ValueError(f"MiT variant {name!r}: expected one of {', '.join(MIT_VARIANTS)}")
    model = MixTransformer(**MIT_VARIANTS[name], drop_path_rate=drop_path_rate, out_indices=out_indices)
    if pretrained_path:
        load_segformer_checkpoint(model, pretrained_path)
    return model


# ------------------------------------------------------------------------------------------------- checkpoints
def load_segformer_checkpoint(model: MixTransformer, path: str) -> None:
    """Load SegFormer's ImageNet weights (e.g. ``mit_b5.pth``) into ``model``, strictly.

    The file holds a state dict with SegFormer's key names, either plain or under a lone ``state_dict`` (or
    ``model``) key. Keys starting with ``head.`` (SegFormer's ImageNet classifier) are ignored. Every other key must
    belong to the full four-stage architecture of ``model`` with the same shape, and every such key must be present;
    keys of stages that ``model`` does not build (``out_indices`` ending before stage 4) are checked, then dropped.
    Violations raise ValueError naming the file and the keys.
    """
    state = read_state_dict(path, "SegFormer checkpoint")
    with torch.device("meta"):  # the full architecture's key set and shapes, at no memory or init cost
        full = MixTransformer(**model.arch).state_dict()
    own = model.state_dict()
    used = {k: v for k, v in state.items() if not k.startswith(IGNORED_CHECKPOINT_PREFIXES)}
    missing = [repr(k) for k in full if k not in used]
    unexpected = [repr(k) for k in used if k not in full]
    shapes = shape_mismatches(used, full)
    problems = []
    if missing:
        problems.append(f"missing keys ({listing(missing, counted=True)})")
    if unexpected:
        problems.append(f"unexpected keys ({listing(unexpected, counted=True)})")
    if shapes:
        problems.append(f"shape mismatches ({listing(shapes, counted=True)})")
    if problems:
        dims = ", ".join(f"{k}={v}" for k, v in model.arch.items())
        raise CheckpointError(f"SegFormer checkpoint {path!r} does not fit MixTransformer({dims}): "
                              + "; ".join(problems))
    model.load_state_dict({k: v for k, v in used.items() if k in own}, strict=True)
