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
    num_class_embeds: int | None = (
        None  # class-conditional: C + 1 embeddings (trainer/diffusion/conditioning.py)
    )

    def block_out_channels(self) -> tuple[int, ...]:
        mult = self.channel_mult or tuple(2**i for i in range(self.depth))
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
    """A preset-shaped UNet2DModel (fresh weights)."""
    return unet_from_config(unet_config(spec))


def unet_config(spec: UNetSpec) -> dict:
    """The diffusers UNet2DModel config a preset spec stands for (what checkpoints store)."""
    boc = spec.block_out_channels()
    for ch in boc:
        if ch % spec.norm_groups:
            raise ValueError(f"norm_groups {spec.norm_groups} does not divide channel count {ch}")
    down = tuple(
        "AttnDownBlock2D" if spec.attention and i == spec.depth - 1 else "DownBlock2D"
        for i in range(spec.depth)
    )
    up = tuple("AttnUpBlock2D" if spec.attention and i == 0 else "UpBlock2D" for i in range(spec.depth))
    return full_unet_config(
        dict(
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
            num_class_embeds=spec.num_class_embeds,
        )
    )


UNET_CLASS = "UNet2DModel"


def full_unet_config(config: dict) -> dict:
    """Any UNet2DModel config (partial or full, from a preset or a diffusers folder) -> the full config with
    every default filled in, as JSON-style plain values (lists, not tuples) and without diffusers' private
    bookkeeping (its version, where it was loaded from). Raises ValueError for another model class."""
    from diffusers import UNet2DModel  # imported here: config checks need the presets, not diffusers

    cls = config.get("_class_name", UNET_CLASS)
    if cls != UNET_CLASS:
        raise ValueError(f"a {cls}, not a {UNET_CLASS} (other models and conditioning are not supported)")
    if config.get("class_embed_type") is not None:
        raise ValueError(
            f"class_embed_type {config['class_embed_type']!r}: only class labels through num_class_embeds "
            "(class_embed_type null) are supported"
        )
    import inspect

    params = inspect.signature(UNet2DModel.__init__).parameters
    defaults = {
        k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty
    }
    given = {k: v for k, v in config.items() if k in params}
    return _plain({"_class_name": UNET_CLASS, **dict(sorted({**defaults, **given}.items()))})


def unet_from_config(config: dict):
    """A fresh UNet2DModel from a stored config."""
    from diffusers import UNet2DModel

    return UNet2DModel.from_config({k: v for k, v in config.items() if k != "_class_name"})


def unet_sample_shape(config: dict) -> tuple[int, int, int]:
    """(channels, height, width) of the latents a UNet2DModel config takes."""
    size = config.get("sample_size")
    if size is None:
        raise ValueError("the UNet config has no sample_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config["in_channels"]), int(h), int(w)


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


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
