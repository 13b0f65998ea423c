"""The `advdiff` command and its subcommands: argument parsers, the stage-2 flags, the embedded
demo, validate, compare, the model presets and the config reference."""
