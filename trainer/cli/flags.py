"""The command line's one set of conventions, and the stage-2 flags (shared by `advdiff stage2` and
`advdiff validate`; light: no models are loaded to parse them).

`Parser` is the argument parser of every `advdiff` subcommand: each long flag takes both spellings
(`--num_samples` and `--num-samples`), `--help` shows defaults, choices and short metavars (`N`, `X`,
`PATH`, `{a,b}`), and a usage error is one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from trainer.config.schema import walk_fields
from trainer.config.sections import Config

# flag -> (config path, type, help): the nine documented stage-2 flags, then the batch, step-cap,
# interval, eta and generator-loss-mode extras. Defaults and choices come from the config field.
FLAGS = {
    "num_samples": ("stage2.num_samples", int, "real and fake samples per iteration"),
    "num_iterations": ("stage2.num_iterations", int, "adversarial iterations"),
    "discriminator_epochs": ("discriminator.training.epochs", int, "D epochs per iteration"),
    "diffusion_epochs": ("stage2.diffusion_epochs", int, "diffusion epochs per iteration"),
    "generation_batch_size": ("stage2.generation_batch_size", int, "DDIM batch per process"),
    "generation_steps": ("stage2.generation_steps", int, "DDIM steps"),
    "discriminator_max_steps": ("discriminator.training.max_steps", int, "cap on D steps per iteration"),
    "diffusion_max_steps": ("stage2.diffusion_max_steps", int, "cap on diffusion steps per iteration"),
    "discriminator_batch_size": ("discriminator.training.batch_size", int, "global D batch"),
    "discriminator_eval_interval": (
        "discriminator.training.eval_interval",
        int,
        "D steps between validations",
    ),
    "diffusion_eval_interval": ("stage2.diffusion_eval_interval", int, "diffusion steps between validations"),
    "eta": ("stage2.eta", float, "DDIM eta"),
    "generator_loss_mode": ("stage2.generator_loss_mode", str, "what D scores in the generator loss"),
}

# metavar of an option that names none and has no choices, by its type (str and untyped: a path)
METAVARS = {int: "N", float: "X"}


def spellings(option_strings) -> list[str]:
    """The option strings with each long flag's other spelling added after them (`--a_b` <-> `--a-b`)."""
    out = list(option_strings)
    for s in option_strings:
        if s.startswith("--"):
            for other in ("--" + s[2:].replace("_", "-"), "--" + s[2:].replace("-", "_")):
                if other not in out:
                    out.append(other)
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; `--a_b, --a-b N` once per option; defaults shown unless the help names one."""

    def _get_default_metavar_for_optional(self, action):
        return METAVARS.get(action.type, "PATH")

    def _get_default_metavar_for_positional(self, action):
        return action.dest.upper()

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        args = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {args}"

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        shown = not (d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d))
        if action.option_strings and shown and "default" not in text:
            text += f" (default {d})"
        return text


class _BothSpellings:
    def add_argument(self, *args, **kwargs):
        return super().add_argument(*spellings(args), **kwargs)


class _Group(_BothSpellings, argparse._ArgumentGroup):
    pass


class _ExclusiveGroup(_BothSpellings, argparse._MutuallyExclusiveGroup):
    pass


class Parser(_BothSpellings, argparse.ArgumentParser):
    """argparse.ArgumentParser with the conventions above (in argument groups too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = _Group(self, *args, **kwargs)
        self._action_groups.append(group)
        return group

    def add_mutually_exclusive_group(self, **kwargs):
        group = _ExclusiveGroup(self, **kwargs)
        self._mutually_exclusive_groups.append(group)
        return group

    def error(self, message):
        print(f"advdiff: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _config_fields() -> dict:
    return dict(walk_fields(Config))


def add_stage2_flags(parser) -> None:
    """Every stage-2 flag on `parser` (each overrides its config path; unset flags change nothing)."""
    fields = _config_fields()
    for flag, (path, typ, help_) in FLAGS.items():
        f = fields[path]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default is None else f", default {default}"
        parser.add_argument(
            f"--{flag}",
            type=typ,
            default=None,
            choices=f.metadata.get("choices"),
            help=f"{help_} (overrides {path}{shown})",
        )


def flag_overrides(args) -> dict:
    """The config overrides of the stage-2 flags that were given: {config path: value}."""
    return {
        path: getattr(args, flag) for flag, (path, _, _) in FLAGS.items() if getattr(args, flag) is not None
    }
