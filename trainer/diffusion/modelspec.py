"""From the config's `unet:` section (and the AE's latent shape) to a concrete UNetSpec."""

from __future__ import annotations

from models.unet import PRESETS, UNetSpec, preset
from trainer.config.schema import error_at
from trainer.config.sections import Config


def unet_spec_from_config(cfg: Config, latent_shape: tuple) -> UNetSpec:
    u = cfg.unet
    where = cfg.source or "<config>"
    channels, side = latent_shape[0], latent_shape[1]
    if u.preset is not None and u.preset not in PRESETS:
        raise error_at(where, "unet.preset", "one of " + ", ".join(PRESETS), u.preset)
    base = PRESETS[u.preset or "tiny"]
    spec = preset(
        u.preset or "tiny",
        in_channels=u.in_channels or channels,
        out_channels=u.out_channels or u.in_channels or channels,
        sample_size=u.sample_size or side,
        base_channels=u.base_channels,
        depth=u.depth,
        num_res_blocks=u.num_res_blocks,
        attention=u.attention,
        time_dim=u.time_dim,
        norm_groups=u.norm_groups,
        dropout=u.dropout,
        num_class_embeds=None if u.num_class_embeds is None else u.num_class_embeds + 1,  # + the null label
        channel_mult=tuple(u.channel_mult)
        if u.channel_mult
        else (base.channel_mult if u.depth in (None, base.depth) else ()),
    )
    if spec.in_channels != channels:
        raise error_at(
            where, "unet.in_channels", f"{channels} (the autoencoder's latent channels)", spec.in_channels
        )
    if spec.out_channels != spec.in_channels:
        raise error_at(
            where, "unet.out_channels", f"{spec.in_channels} (equal to in_channels)", spec.out_channels
        )
    if side % (2 ** (spec.depth - 1)):
        raise error_at(
            where,
            "unet.depth",
            f"a depth whose downsampling 2**(depth-1) divides the latent side {side}",
            spec.depth,
        )
    for ch in spec.block_out_channels():
        if ch % spec.norm_groups:
            raise error_at(
                where, "unet.norm_groups", f"a divisor of every level's channels ({ch})", spec.norm_groups
            )
    return spec
