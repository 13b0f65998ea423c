"""Diffusion UNet presets on diffusers' UNet2DModel.

The preset names the experiment configs use (unet32_d3, unet48_d4, unet64_d4, ...) map to
(base_channels, depth, attention). Parameter counts are always
computed from the built model (`advdiff models`), never typed in.
"""
from __future__ import annotations

from dataclasses import dataclass, replace



@dataclass(frozen=True)
class UNetSpec:
    """Everything needed to build the UNet; plain values, saved inside checkpoints."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 8
    base_channels: int = 32
    depth: int = 2
    channel_mult: tuple = ()
    num_res_blocks: int = 1
    attention: bool = False
    time_dim: int | None = None
    norm_groups: int = 8
    dropout: float = 0.0

    def block_out_channels(self) -> tuple[int, ...]:
        mult = self.channel_mult or tuple(2 ** i for i in range(self.depth))
        if len(mult) != self.depth:
            raise ValueError(f"channel_mult has {len(mult)} entries for depth {self.depth}")
        return tuple(self.base_channels * m for m in mult)


# name -> (base_channels, depth, attention, num_res_blocks, norm_groups)
PRESETS: dict[str, UNetSpec] = {
    "tiny": UNetSpec(base_channels=32, depth=2, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    "micro": UNetSpec(base_channels=16, depth=2, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4),
    "unet32_d3": UNetSpec(base_channels=32, depth=3, num_res_blocks=2, norm_groups=16),
    "unet32_d3_attn": UNetSpec(base_channels=32, depth=3, num_res_blocks=2, norm_groups=16, attention=True),
    "unet48_d3": UNetSpec(base_channels=48, depth=3, num_res_blocks=2, norm_groups=16),
    "unet48_d4": UNetSpec(base_channels=48, depth=4, num_res_blocks=2, norm_groups=16),
    "unet64_d4": UNetSpec(base_channels=64, depth=4, num_res_blocks=2, norm_groups=32),
    "unet64_d4_attn": UNetSpec(base_channels=64, depth=4, num_res_blocks=2, norm_groups=32, attention=True),
    "unet128_d3": UNetSpec(base_channels=128, depth=3, num_res_blocks=2, norm_groups=32),
}


def preset(name: str, **overrides) -> UNetSpec:
    if name not in PRESETS:
        raise KeyError(name)
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def build_unet(spec: UNetSpec):
    boc = spec.block_out_channels()
    for ch in boc:
        if ch % spec.norm_groups:
            raise ValueError(f"norm_groups {spec.norm_groups} does not divide channel count {ch}")
    down = tuple("AttnDownBlock2D" if spec.attention and i == spec.depth - 1 else "DownBlock2D"
                 for i in range(spec.depth))
    up = tuple("AttnUpBlock2D" if spec.attention and i == 0 else "UpBlock2D" for i in range(spec.depth))
    from diffusers import UNet2DModel  # imported here: config checks need the presets, not diffusers

    return UNet2DModel(
        sample_size=spec.sample_size,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        block_out_channels=boc,
        layers_per_block=spec.num_res_blocks,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=spec.norm_groups,
        dropout=spec.dropout,
        time_embedding_dim=spec.time_dim,
        attention_head_dim=min(64, boc[-1]),
    )


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def spec_to_dict(spec: UNetSpec) -> dict:
    d = dict(spec.__dict__)
    d["channel_mult"] = list(spec.channel_mult)
    return d


def spec_from_dict(d: dict) -> UNetSpec:
    d = dict(d)
    d["channel_mult"] = tuple(d.get("channel_mult") or ())
    return UNetSpec(**d)
