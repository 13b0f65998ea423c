"""`advdiff models`: the UNet presets with parameter counts computed from the built model."""

from __future__ import annotations

from trainer.cli.flags import Parser


def models_main(argv=None) -> int:
    p = Parser(
        prog="advdiff models", description="UNet presets, parameter counts computed from the built model."
    )
    p.add_argument("--latent_channels", type=int, default=16, help="channels of the latents the UNet takes")
    p.add_argument("--latent_size", type=int, default=32, help="side of the latents")
    args = p.parse_args(argv)
    from models.unet import PRESETS, build_unet, count_parameters, preset

    print(
        f"{'preset':<16} {'params':>10}  {'channels':<22} blocks attention   (latents "
        f"{args.latent_channels}x{args.latent_size}x{args.latent_size})"
    )
    for name in PRESETS:
        spec = preset(
            name,
            in_channels=args.latent_channels,
            out_channels=args.latent_channels,
            sample_size=args.latent_size,
        )
        n = count_parameters(build_unet(spec))
        print(
            f"{name:<16} {n / 1e6:>9.2f}M  {str(spec.block_out_channels()):<22} {spec.num_res_blocks:>6} "
            f"{'yes' if spec.attention else 'no'}"
        )
    return 0
