"""The command line's one set of conventions, and the one table of flags that set config fields (light:
no models are loaded to parse them).

`Parser` is the argument parser of every `advdiff` subcommand: each long flag takes both spellings
(`--num_samples` and `--num-samples`), `--help` shows defaults, choices and short metavars (`N`, `X`,
`PATH`, `{a,b}`), and a usage error is one line and exit 2. `FLAGS` declares every flag that sets a
config field (its field, type and help); a command takes the ones it accepts with `add_flags(parser,
names)` and reads them back with `flag_overrides(args)`; `add_set_flag` declares `--set PATH=VALUE`, the
flag for any other field."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from trainer.config.schema import walk_fields
from trainer.config.sections import Config


@dataclasses.dataclass(frozen=True)
class Flag:
    """A flag that sets a config field. Its default is None (unset: the config decides); choices come
    from the field, and the help names the field and its default."""

    path: str  # the config field, as walk_fields spells it
    type: type
    help: str
    metavar: str | None = None
    to_config: Callable | None = None  # the field's value for the flag's (default: the same)
    # the command applies it to the loaded config itself (not a plain override); `help` says how
    by_command: bool = False


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


# Every flag that sets a config field, declared once: subcommands take theirs from here by name
# (add_flags), and a test refuses one declared anywhere else in trainer/cli/.
FLAGS = {
    "mixed_precision": Flag("training.mixed_precision", str, "accelerate's mixed precision"),
    "seed": Flag("training.seed", int, "seed of every random draw"),
    "output_dir": Flag(
        "experiment.save_path",
        str,
        "output folder; a relative DIR is relative to the current folder",
        metavar="DIR",
        to_config=_absolute,  # a flag's path is the shell's, not the YAML's
    ),
    # the nine documented stage-2 flags, then the batch, step-cap, interval, eta and generator-loss-mode
    # extras
    "num_samples": Flag("stage2.num_samples", int, "real and fake samples per iteration"),
    "num_iterations": Flag("stage2.num_iterations", int, "stage-2 iterations"),
    "discriminator_epochs": Flag("discriminator.training.epochs", int, "D epochs per iteration"),
    "diffusion_epochs": Flag("stage2.diffusion_epochs", int, "diffusion epochs per iteration"),
    "generation_batch_size": Flag("stage2.generation_batch_size", int, "DDIM batch per process"),
    "generation_steps": Flag("stage2.generation_steps", int, "DDIM steps"),
    "discriminator_max_steps": Flag("discriminator.training.max_steps", int, "cap on D steps per iteration"),
    "diffusion_max_steps": Flag("stage2.diffusion_max_steps", int, "cap on diffusion steps per iteration"),
    "discriminator_batch_size": Flag("discriminator.training.batch_size", int, "global D batch"),
    "discriminator_eval_interval": Flag(
        "discriminator.training.eval_interval", int, "D steps between validations"
    ),
    "diffusion_eval_interval": Flag(
        "stage2.diffusion_eval_interval", int, "diffusion steps between validations"
    ),
    "eta": Flag("stage2.eta", float, "DDIM eta"),
    "generator_loss_mode": Flag("stage2.generator_loss_mode", str, "what D scores in the generator loss"),
    "timestep_spacing": Flag(
        "scheduler.timestep_spacing",
        str,
        "DDIM timestep spacing (unset: the checkpoint's own)",
    ),
    "adversarial_weight": Flag(
        "training.loss.losses[].weight",
        float,
        "weight of every DiscriminatorLoss term (overrides training.loss)",
        by_command=True,  # stages.apply_arm: only the DiscriminatorLoss terms' weights
    ),
}

# The flags each kind of command takes, in the order --help lists them.
CONFIG_FLAGS = ("mixed_precision", "seed")  # the stage commands, validate and evaluate (add_config_args)
STAGE2_FLAGS = (
    "num_samples",
    "num_iterations",
    "discriminator_epochs",
    "diffusion_epochs",
    "generation_batch_size",
    "generation_steps",
    "discriminator_max_steps",
    "diffusion_max_steps",
    "discriminator_batch_size",
    "discriminator_eval_interval",
    "diffusion_eval_interval",
    "eta",
    "generator_loss_mode",
    "adversarial_weight",
)

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


def flag_help(name: str) -> str:
    """The help of table flag `name`: what it is, the field it overrides and that field's default."""
    flag = FLAGS[name]
    if flag.by_command:
        return flag.help
    f = _config_fields()[flag.path]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = "" if default is None else f", default {default}"
    return f"{flag.help} (overrides {flag.path}{shown})"


def add_flags(parser, names) -> None:
    """The table's flags `names` on `parser` (or an argument group), both spellings; unset ones change
    nothing."""
    fields = _config_fields()
    for name in names:
        flag = FLAGS[name]
        parser.add_argument(
            *spellings([f"--{name}"]),
            dest=name,
            type=flag.type,
            default=None,
            choices=fields[flag.path].metadata.get("choices"),
            metavar=flag.metavar,
            help=flag_help(name),
        )


def add_set_flag(parser) -> None:
    """--set PATH=VALUE, repeatable: any config field, validated like the YAML (into `args.overrides`, read
    back with trainer.config.load.parse_override); the same flag for every command that takes it."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override any config field, e.g. --set training.batch_size=32 (repeatable)",
    )


def flag_overrides(args) -> dict:
    """{config path: value} of the table's override flags that `args` has and were given."""
    out = {}
    for name, flag in FLAGS.items():
        value = getattr(args, name, None)
        if value is not None and not flag.by_command:
            out[flag.path] = flag.to_config(value) if flag.to_config else value
    return out
