"""MiT against an independent reference: Hugging Face's SegFormer encoder (``transformers.SegformerModel``).

The official numbers (SegFormer's ``mix_transformer.py`` as shipped with DAFormer) are written out here; the HF model
is built with the same numbers, receives our weights through a key mapping written in this file, and must give the
same four stage maps. A checkpoint in SegFormer's own format is produced from the HF model's weights by the inverse
mapping and must load key for key.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from uda_ray.models.backbones.mit import MIT_VARIANTS, MixTransformer, build_mit

transformers = pytest.importorskip("transformers")

# variant: (embed dims, depths); all: heads 1/2/5/8, sr 8/4/2/1, MLP ratio 4 (mix_transformer.py, mit_b0 … mit_b5)
OFFICIAL = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
# encoder parameters (no ImageNet classifier), the same for the HF encoder; b5 is the 81.4 M of the SegFormer paper
PARAMS = {"mit_b0": 3_319_392, "mit_b1": 13_151_424, "mit_b2": 24_196_288, "mit_b3": 44_072_128,
          "mit_b4": 60_842_688, "mit_b5": 81_443_008}


def hf_config(name: str):
    dims, depths = OFFICIAL[name]
    return transformers.SegformerConfig(hidden_sizes=list(dims), depths=list(depths), num_attention_heads=[1, 2, 5, 8],
                                        sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4], patch_sizes=[7, 3, 3, 3],
                                        strides=[4, 2, 2, 2], hidden_act="gelu", drop_path_rate=0.0,
                                        attn_implementation="eager")


def hf_encoder(name: str) -> nn.Module:
    """HF encoder with SegFormer's LayerNorm eps: HF uses PyTorch's 1e-5 everywhere, SegFormer 1e-6 for the block and
    stage norms (1e-5 for the patch-embedding and spatial-reduction norms)."""
    model = transformers.SegformerModel(hf_config(name)).eval()
    for mod_name, module in model.named_modules():
        block_or_stage_norm = re.search(r"(layernorm_before|layernorm_after|stages\.\d+\.layer_norm)$", mod_name)
        if isinstance(module, nn.LayerNorm) and block_or_stage_norm:
            module.eps = 1e-6
    return model


# SegFormer key → HF key (transformers >= 5: stages.{s}.patch_embeddings / blocks / layer_norm); kv is split below
_RULES = [
    (r"patch_embed(\d)\.proj\.(.+)", "stages.{s}.patch_embeddings.proj.{1}"),
    (r"patch_embed(\d)\.norm\.(.+)", "stages.{s}.patch_embeddings.layer_norm.{1}"),
    (r"block(\d)\.(\d+)\.norm1\.(.+)", "stages.{s}.blocks.{1}.layernorm_before.{2}"),
    (r"block(\d)\.(\d+)\.norm2\.(.+)", "stages.{s}.blocks.{1}.layernorm_after.{2}"),
    (r"block(\d)\.(\d+)\.attn\.q\.(.+)", "stages.{s}.blocks.{1}.attention.q_proj.{2}"),
    (r"block(\d)\.(\d+)\.attn\.proj\.(.+)", "stages.{s}.blocks.{1}.attention.o_proj.{2}"),
    (r"block(\d)\.(\d+)\.attn\.sr\.(.+)", "stages.{s}.blocks.{1}.attention.sequence_reduction.sequence_reduction.{2}"),
    (r"block(\d)\.(\d+)\.attn\.norm\.(.+)", "stages.{s}.blocks.{1}.attention.sequence_reduction.layer_norm.{2}"),
    (r"block(\d)\.(\d+)\.mlp\.(fc1|fc2|dwconv\.dwconv)\.(.+)", "stages.{s}.blocks.{1}.mlp.{2}.{3}"),
    (r"norm(\d)\.(.+)", "stages.{s}.layer_norm.{1}"),
]
_KV = r"block(\d)\.(\d+)\.attn\.kv\.(.+)"


def _renamed(key: str, rules: list[tuple[str, str]], stage_offset: int) -> str:
    """``key`` by the first matching rule; the stage number (the first group) shifted by ``stage_offset``."""
    for pattern, template in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return template.format(*m.groups(), s=int(m.group(1)) + stage_offset)
    raise KeyError(f"no counterpart for key {key!r}")


def segformer_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        m = re.fullmatch(_KV, key)
        if m:  # kv rows: first half keys, second half values
            s, j, what = int(m.group(1)) - 1, m.group(2), m.group(3)
            k, v = tensor.chunk(2, dim=0)
            out[f"stages.{s}.blocks.{j}.attention.k_proj.{what}"] = k
            out[f"stages.{s}.blocks.{j}.attention.v_proj.{what}"] = v
        else:
            out[_renamed(key, _RULES, -1)] = tensor
    return out


def hf_to_segformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        m = re.fullmatch(_K_PROJ, key)
        if m:  # kv = [keys; values] along the rows
            s, j, what = int(m.group(1)), m.group(2), m.group(3)
            value = state[f"stages.{s}.blocks.{j}.attention.v_proj.{what}"]
            out[f"block{s + 1}.{j}.attn.kv.{what}"] = torch.cat([tensor, value], dim=0)
        elif ".attention.v_proj." not in key:
            out[_renamed(key, _INVERSE_RULES, 1)] = tensor
    return out


# HF key → SegFormer key, the inverse of _RULES; k_proj / v_proj are joined into kv above
_INVERSE_RULES = [
    (r"stages\.(\d)\.patch_embeddings\.proj\.(.+)", "patch_embed{s}.proj.{1}"),
    (r"stages\.(\d)\.patch_embeddings\.layer_norm\.(.+)", "patch_embed{s}.norm.{1}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.layernorm_before\.(.+)", "block{s}.{1}.norm1.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.layernorm_after\.(.+)", "block{s}.{1}.norm2.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.q_proj\.(.+)", "block{s}.{1}.attn.q.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.o_proj\.(.+)", "block{s}.{1}.attn.proj.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction\.(.+)",
     "block{s}.{1}.attn.sr.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm\.(.+)", "block{s}.{1}.attn.norm.{2}"),
    (r"stages\.(\d)\.blocks\.(\d+)\.mlp\.(fc1|fc2|dwconv\.dwconv)\.(.+)", "block{s}.{1}.mlp.{2}.{3}"),
    (r"stages\.(\d)\.layer_norm\.(.+)", "norm{s}.{1}"),
]
_K_PROJ = r"stages\.(\d)\.blocks\.(\d+)\.attention\.k_proj\.(.+)"


def perturb_(model: nn.Module) -> None:
    """Random biases and LayerNorm affine parameters (initialised to 0/1), so a wrong mapping of them shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))


def hf_stage_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(pixel_values=x, output_hidden_states=True)
    return list(out.hidden_states)


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_variant_table_is_segformers(name):
    dims, depths = OFFICIAL[name]
    assert MIT_VARIANTS[name] == {"embed_dims": dims, "depths": depths, "num_heads": (1, 2, 5, 8),
                                  "sr_ratios": (8, 4, 2, 1), "mlp_ratio": 4}
    assert set(MIT_VARIANTS) == set(OFFICIAL)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_parameter_count_equals_hf_encoder(name):
    with torch.device("meta"):
        ours = build_mit(name)
        ref = transformers.SegformerModel(hf_config(name))
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters()) == PARAMS[name]
    assert ours.feature_channels == list(OFFICIAL[name][0])
    assert ours.feature_reductions == [4, 8, 16, 32]


@pytest.mark.parametrize("name, size", [("mit_b0", (64, 96)), ("mit_b2", (64, 64))])
def test_stage_maps_equal_hf_reference(name, size):
    ours = build_mit(name).eval()
    perturb_(ours)
    ref = hf_encoder(name)
    ref.load_state_dict(segformer_to_hf(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        got, want = ours(x), hf_stage_maps(ref, x)
    assert len(got) == len(want) == 4
    for s, (g, w) in enumerate(zip(got, want)):
        h, wd = size[0] // 2 ** (s + 2), size[1] // 2 ** (s + 2)
        assert g.shape == w.shape == (2, OFFICIAL[name][0][s], h, wd)
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_layernorm_eps_and_structure_follow_official_code():
    model = build_mit("mit_b0")
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert eps["patch_embed1.norm"] == eps["block1.0.attn.norm"] == 1e-5
    assert eps["block1.0.norm1"] == eps["block1.0.norm2"] == eps["norm1"] == eps["norm4"] == 1e-6
    assert not hasattr(model.block4[0].attn, "sr")  # sr ratio 1: no reduction, no norm
    dw = model.block1[0].mlp.dwconv.dwconv
    assert (dw.kernel_size, dw.padding, dw.groups, dw.bias is not None) == ((3, 3), (1, 1), 128, True)
    p1, p2 = model.patch_embed1.proj, model.patch_embed2.proj
    assert (p1.kernel_size, p1.stride, p1.padding) == ((7, 7), (4, 4), (3, 3))
    assert (p2.kernel_size, p2.stride, p2.padding) == ((3, 3), (2, 2), (1, 1))


def test_drop_path_rises_linearly_over_all_blocks():
    model = build_mit("mit_b2", drop_path_rate=0.1)
    blocks = [b for s in range(1, 5) for b in getattr(model, f"block{s}")]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert isinstance(blocks[0].drop_path, nn.Identity)  # rate 0: no module, as in the official code
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 16))


def test_initialisation_is_the_official_one_and_seeded():
    torch.manual_seed(3)
    a = build_mit("mit_b0").state_dict()
    torch.manual_seed(3)
    b = build_mit("mit_b0").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["norm1.weight"], torch.ones(32)) and not a["block1.0.attn.q.bias"].any()
    assert abs(a["block2.0.mlp.fc1.weight"].std().item() - 0.02) < 0.002
    fan_out = 3 * 3 * 128 // 128  # depthwise conv of stage 1's MLP (128 channels): k·k·C_out / groups
    assert abs(a["block1.0.mlp.dwconv.dwconv.weight"].std().item() - (2 / fan_out) ** 0.5) < 0.05
    assert not a["patch_embed1.proj.bias"].any()


def test_out_indices_select_stages_and_drop_later_ones():
    full = build_mit("mit_b0").eval()
    part = build_mit("mit_b0", out_indices=(1, 2)).eval()
    assert part.feature_channels == [64, 160] and part.feature_reductions == [8, 16]
    assert not hasattr(part, "block4") and not hasattr(part, "norm4")
    part.load_state_dict({k: v for k, v in full.state_dict().items() if k in part.state_dict()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f, p = full(x), part(x)
    assert len(p) == 2 and torch.equal(p[0], f[1]) and torch.equal(p[1], f[2])
    with pytest.raises(ValueError, match="out_indices"):
        build_mit("mit_b0", out_indices=(2, 1))


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="mit_b6.*mit_b0, mit_b1, mit_b2, mit_b3, mit_b4, mit_b5"):
        build_mit("mit_b6")


# ----------------------------------------------------------------------------------------------------- checkpoints
def segformer_checkpoint(tmp_path, name: str = "mit_b0") -> tuple[str, dict[str, torch.Tensor], nn.Module]:
    """A ``mit_*.pth`` in SegFormer's format from the HF reference's random weights: under 'state_dict', + head.*"""
    ref = hf_encoder(name)
    perturb_(ref)
    state = hf_to_segformer(ref.state_dict())
    dims = OFFICIAL[name][0]
    state["head.weight"], state["head.bias"] = torch.randn(1000, dims[-1]), torch.randn(1000)
    path = tmp_path / f"{name}.pth"
    torch.save({"state_dict": state}, path)
    return str(path), state, ref


def test_segformer_checkpoint_loads_key_for_key(tmp_path):
    path, _, ref = segformer_checkpoint(tmp_path)
    model = build_mit("mit_b0", pretrained_path=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for g, w in zip(model(x), hf_stage_maps(ref, x), strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # a plain state dict and a model built up to stage 3 load too (stage-4 keys are checked, then dropped)
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "plain.pth")
    part = build_mit("mit_b0", pretrained_path=str(tmp_path / "plain.pth"), out_indices=(0, 1, 2))
    assert torch.equal(part.norm3.weight, state["norm3.weight"])


@pytest.mark.parametrize("fault, key", [
    ("missing", "block2.1.attn.kv.weight"),
    ("unexpected", "block1.0.attn.k.weight"),
    ("shape", "block3.0.mlp.fc1.weight"),
])
def test_checkpoint_faults_name_the_key_and_file(tmp_path, fault, key):
    path, state, _ = segformer_checkpoint(tmp_path)
    if fault == "missing":
        del state[key]
    elif fault == "unexpected":
        state[key] = torch.zeros(32, 32)
    else:
        state[key] = state[key][:-1]
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=rf"{re.escape(path)}.*{fault}.*{re.escape(key)}"):
        build_mit("mit_b0", pretrained_path=path)


def test_missing_checkpoint_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope" / "mit_b5.pth")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        build_mit("mit_b0", pretrained_path=path)


def test_checkpoint_mapping_covers_every_key():
    ours = MixTransformer(**MIT_VARIANTS["mit_b0"]).state_dict()
    hf = segformer_to_hf(ours)
    assert set(hf) == set(hf_encoder("mit_b0").state_dict())
    back = hf_to_segformer(hf)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_drop_path_draws_and_scales_as_timm():
    """MiT's own stochastic depth (timm is imported only for timm backbones) gives timm's DropPath numbers from the
    same generator state: one Bernoulli draw per sample, kept samples scaled by 1 / (1 − p); identity in eval."""
    from timm.layers import DropPath as TimmDropPath

    from uda_ray.models.backbones.mit import DropPath

    x = torch.randn(16, 5, 8)
    ours, theirs = DropPath(0.3), TimmDropPath(0.3)
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    b = theirs(x)
    assert torch.equal(a, b)
    kept = (a != 0).flatten(1).all(1)
    assert 0 < kept.sum() < 16 and torch.allclose(a[kept], x[kept] / 0.7)
    assert torch.equal(ours.eval()(x), x)
