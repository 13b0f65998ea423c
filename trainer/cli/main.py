"""`advdiff` console script: one subcommand per job."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": (
        "trainer.cli.demo",
        "run the embedded digits default: data, stages 0, 1 and 2 (4-step distribution matching) "
        "and a 1-step run",
    ),
    "stage0": ("trainer.cli.stages", "train the autoencoder"),
    "stage1": ("trainer.cli.stages", "train the diffusion UNet"),
    "stage2": (
        "trainer.cli.stages",
        "fine-tune the stage-1 model (training.loss: MSE, discriminator, distribution-matching terms)",
    ),
    "validate": ("trainer.cli.validate", "check a stage-2 config, its files and flags before any compute"),
    "sample": (
        "trainer.cli.sample",
        "DDIM samples of a checkpoint to .pt/.png (optionally classifier-free or discriminator-guided)",
    ),
    "evaluate": (
        "trainer.cli.evaluate",
        "the summary's quality row for any checkpoint, optionally with discriminator guidance",
    ),
    "export": ("trainer.cli.export", "a checkpoint or run as a diffusers pipeline folder (safetensors)"),
    "report": (
        "trainer.cli.report",
        "one self-contained HTML page of a run (grids, quality, histories, config)",
    ),
    "compare": ("trainer.cli.compare", "two runs' quality summaries side by side"),
    "models": ("trainer.cli.presets", "list UNet presets with computed parameter counts"),
    "digits": ("trainer.cli.demo", "write the digits dataset and manifest to a folder"),
    "manifest": ("trainer.cli.manifest", "write the manifest CSV of a folder of images (DIR/manifest.csv)"),
    "classifier": ("trainer.cli.classifier", "train the image classifier behind stage2.metric_features"),
    "config-reference": ("trainer.cli.reference", "print the config reference table (Markdown)"),
}


def usage() -> str:
    lines = ["usage: advdiff COMMAND [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "`advdiff COMMAND --help` for each command's arguments; `advdiff --version` (-V) for the version.",
    ]
    return "\n".join(lines)


def version() -> str:
    """The installed distribution's version; from a source tree that is not installed, pyproject.toml's."""
    from importlib import metadata
    from pathlib import Path

    try:
        return metadata.version("advdiff")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def main(argv=None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"advdiff {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"advdiff: error: unknown command '{name}'; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, f"{name.replace('-', '_')}_main", None) or module.main
    return entry(rest)


if __name__ == "__main__":
    sys.exit(main())
