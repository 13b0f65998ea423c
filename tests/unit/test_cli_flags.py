"""One set of command-line conventions for every `advdiff` subcommand: both spellings of each long flag,
help with defaults, choices and short metavars, one-line usage errors, --version, --output_dir, and
`advdiff validate` taking every stage-2 flag. Parsers are captured as their command builds them, so
nothing is run."""

import argparse
import re
from unittest import mock

import pytest
import yaml
from helpers import run_cli

from trainer.cli.main import COMMANDS, main


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__(parser.prog)
        self.parser = parser


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser `advdiff COMMAND` parses its arguments with (stopped before it parses anything)."""

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            main([command])
        except _Captured as c:
            return c.parser
    raise AssertionError(f"advdiff {command}: no argument parser was used")


def long_options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def other_spelling(flag: str) -> str:
    body = flag[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


INVOCATION = re.compile(r"^  (-[^\s,]+(?:, -[^\s,]+)*)(?: (\S+))?")


def invocations(parser) -> dict[str, str | None]:
    """{'--a_b, --a-b': metavar or None} from the help text, as the user reads it."""
    out = {}
    for line in parser.format_help().splitlines():
        m = INVOCATION.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_long_option_takes_both_spellings(command):
    parser = parser_of(command)
    assert type(parser).__module__ == "trainer.cli.flags", (
        f"advdiff {command}: build its parser with trainer.cli.flags.Parser"
    )
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and ("_" in flag or "-" in flag[2:]):
                assert other_spelling(flag) in action.option_strings, f"advdiff {command} {flag}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_has_short_metavars_and_says_what_each_option_does(command):
    parser = parser_of(command)
    shown = invocations(parser)
    options = [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS]
    assert len(shown) == len(options), parser.format_help()
    for action in options:
        assert action.help and action.help.strip(), f"advdiff {command} {action.option_strings[0]}: no help"
    for names, metavar in shown.items():
        if metavar is None or metavar.startswith("{"):  # a switch, or its choices
            continue
        assert len(metavar) <= 10, f"advdiff {command} {names} {metavar}: metavar too long"
        assert "_" not in metavar, f"advdiff {command} {names} {metavar}: a dest, not a metavar"


def test_both_spellings_parse_to_the_same_namespace():
    parser = parser_of("stage2")
    a = parser.parse_args(["c.yaml", "--num_samples", "7", "--generator_loss_mode", "x0_pred", "--dry-run"])
    b = parser.parse_args(["c.yaml", "--num-samples", "7", "--generator-loss-mode", "x0_pred", "--dry_run"])
    assert a == b and a.num_samples == 7 and a.dry_run


def test_help_shows_choices_and_defaults():
    from trainer.config.sections import Stage2Config

    shown = invocations(parser_of("stage2"))
    assert shown["--generator_loss_mode, --generator-loss-mode"] == "{rollout,x0_pred}"
    assert shown["--device"] == "{auto,cpu,cuda}"
    assert shown["--num_samples, --num-samples"] == "N"
    assert shown["--eta"] == "X"
    text = " ".join(parser_of("stage2").format_help().split())
    assert f"stage2.num_samples, default {Stage2Config().num_samples})" in text  # the config's default
    assert "stage2.generator_loss_mode, default rollout)" in text
    assert "cuda when visible) (default auto)" in text
    sample = " ".join(parser_of("sample").format_help().split())
    assert "DDIM steps (default 50)" in sample and "(default 0)" in sample  # --seed 0 is shown too


def test_help_lists_both_spellings_once(capsys):
    with pytest.raises(SystemExit) as e:
        main(["stage2", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--num_samples, --num-samples N\n" in out
    assert "NUM_SAMPLES" not in out and "GENERATOR_LOSS_MODE" not in out


def test_usage_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["stage2", "c.yaml", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["advdiff: error: unrecognized arguments: --bogus (see advdiff stage2 --help)"]


def test_version():
    from importlib import metadata

    from trainer.cli.main import version

    proc = run_cli("-m", "trainer.cli", "--version")
    assert proc.returncode == 0 and proc.stdout == f"advdiff {metadata.version('advdiff')}\n", proc.stderr
    proc = run_cli("-m", "trainer.cli", "-V")
    assert proc.returncode == 0 and proc.stdout == f"advdiff {version()}\n"


def test_version_of_a_source_tree_that_is_not_installed():
    from importlib import metadata

    import tomllib
    from helpers import REPO

    from trainer.cli.main import version

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    with mock.patch.object(metadata, "version", absent):
        got = version()
    assert got == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"experiment": {"name": "e", "save_path": "from_yaml"}}))
    return path


@pytest.mark.parametrize("command", ["stage0", "stage1", "stage2", "validate"])
@pytest.mark.parametrize("flag", ["--output_dir", "--output-dir"])
def test_output_dir_overrides_save_path(command, flag, config, tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    assert main([command, str(config), flag, str(elsewhere), "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["experiment"]["save_path"] == str(elsewhere)
    # a relative DIR is the shell's (the current folder), not the YAML's folder as save_path would be
    monkeypatch.chdir(tmp_path / "..")
    assert main([command, str(config), flag, "rel", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["experiment"]["save_path"] == str(tmp_path.parent / "rel")


def test_without_output_dir_save_path_is_the_yamls(config, capsys):
    assert main(["stage1", str(config), "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["experiment"]["save_path"] == "from_yaml"


def test_validate_takes_every_stage2_flag():
    stage2, validate = long_options(parser_of("stage2")), long_options(parser_of("validate"))
    assert stage2 <= validate, sorted(stage2 - validate)
    assert validate - stage2 == {"--stage", "--demo", "--out"}
    for flag in (
        "--device",
        "--control",
        "--adversarial_weight",
        "--start_iteration",
        "--stop_after_steps",
        "--report_to",
        "--generator_loss_mode",
        "--output_dir",
    ):
        assert flag in validate


def test_validate_parses_a_stage2_command_line(config, capsys):
    argv = [
        str(config),
        "--device",
        "cpu",
        "--control",
        "--adversarial-weight",
        "0.5",
        "--start_iteration",
        "1",
        "--num_samples",
        "9",
        "--report_to",
        "tensorboard",
        "--stop_after_steps",
        "3",
    ]
    args = parser_of("validate").parse_args(argv)
    assert (args.device, args.control, args.adversarial_weight, args.start_iteration) == ("cpu", True, 0.5, 1)
    assert main(["validate", *argv, "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["stage2"]["num_samples"] == 9


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--start_iteration", "-1"], "--start_iteration: expected an integer >= 0, got -1"),
        (["--adversarial_weight", "-2"], "--adversarial_weight: expected a number >= 0, got -2.0"),
        (["--control"], "--adversarial_weight: training.loss has no DiscriminatorLoss term to weight"),
    ],
)
def test_validate_checks_the_stage2_only_flags(argv, line, config, capsys):
    """They act in validate as in stage 2, before the config's files are looked at."""
    assert main(["validate", str(config), *argv]) == 2
    assert capsys.readouterr().err.splitlines() == [f"advdiff: error: {line}"]


# Flags in trainer/cli/ whose names are config field names but which set no config field: the command
# takes no config, or the value means something else there. Anything else named like a config field (or
# a table flag) must come from trainer.cli.flags.FLAGS.
NOT_CONFIG_FLAGS = {
    ("sample.py", "seed"): "sample i's noise seed; sample loads a checkpoint, no config",
    ("sample.py", "eta"): "the sampler's eta; no config",
    ("sample.py", "batch_size"): "samples per UNet pass; no config",
    (
        "sample.py",
        "guidance_scale",
    ): "the samples' classifier-free guidance scale; sample loads a checkpoint, no config",
    ("export.py", "eta"): "the exported pipeline's default eta; no config",
    ("evaluate.py", "checkpoint"): "the diffusion checkpoint to measure, not autoencoder.checkpoint",
    ("classifier.py", "epochs"): "the classifier's epochs, not discriminator.training.epochs",
    ("classifier.py", "label_column"): "the classifier's labels; dataset.label_column is its default",
    (
        "demo.py",
        "conditional",
    ): "the embedded default's conditional twin, not discriminator.config.conditional",
    ("manifest.py", "image_column"): "the column the written CSV names; no config",
    ("presets.py", "latent_channels"): "the latents the listed presets are sized for; no config",
}


def config_leaf_names() -> set[str]:
    from trainer.config.schema import walk_fields
    from trainer.config.sections import Config

    paths = [p for p, _ in walk_fields(Config)]
    leaves = [p for p in paths if not any(q.startswith(p + ".") or q.startswith(p + "[") for q in paths)]
    return {p.rsplit(".", 1)[-1].removesuffix("[]") for p in leaves}


def flags_declared_by_hand(folder) -> list[tuple[str, str]]:
    """(file, flag name) of every literal long flag in an add_argument call under `folder` that is named
    like a config field leaf or a table flag."""
    import ast
    from pathlib import Path

    from trainer.cli.flags import FLAGS

    names = config_leaf_names() | set(FLAGS)
    found = []
    for path in sorted(Path(folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"):
                continue
            for a in node.args:
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--"):
                    name = a.value[2:].replace("-", "_")
                    if name in names:
                        found.append((path.name, name))
    return found


def test_config_flags_are_declared_once_in_the_table():
    from helpers import REPO

    found = flags_declared_by_hand(REPO / "trainer" / "cli")
    assert [f for f in found if f not in NOT_CONFIG_FLAGS] == []
    assert sorted(set(found)) == sorted(NOT_CONFIG_FLAGS), "a NOT_CONFIG_FLAGS entry is stale"


def test_hand_declared_config_flag_check_can_fail(tmp_path):
    (tmp_path / "probe.py").write_text(
        'p.add_argument("--generation-steps", type=int)\n'
        'g.add_argument("--learning_rate", type=float)\n'
        'p.add_argument("--out")\n'
    )
    assert flags_declared_by_hand(tmp_path) == [
        ("probe.py", "generation_steps"),
        ("probe.py", "learning_rate"),
    ]


def test_every_table_flag_sets_a_config_field_and_the_commands_take_it_from_the_table():
    from trainer.cli.flags import FLAGS, flag_help
    from trainer.config.schema import walk_fields
    from trainer.config.sections import Config

    fields = dict(walk_fields(Config))
    for name, flag in FLAGS.items():
        assert flag.path in fields, f"--{name}: {flag.path} is not a config field"
    for command, (module, _) in COMMANDS.items():
        for action in parser_of(command)._actions:
            d = action.dest
            if d in FLAGS and (module.rsplit(".", 1)[-1] + ".py", d) not in NOT_CONFIG_FLAGS:
                assert action.help == flag_help(d), f"advdiff {command} --{d}"
                assert set(action.option_strings) == {f"--{d}", other_spelling(f"--{d}")}


@pytest.mark.parametrize("command", ["stage2", "validate", "evaluate", "classifier"])
def test_table_flags_override_their_fields(command, config, capsys):
    from trainer.cli.flags import FLAGS

    taken = {a.dest for a in parser_of(command)._actions if a.dest in FLAGS and not FLAGS[a.dest].by_command}
    values = {
        "mixed_precision": "bf16",
        "generator_loss_mode": "x0_pred",
        "eta": 0.5,
        "output_dir": "/tmp/x",
        "timestep_spacing": "trailing",
    }
    argv = [str(config), "--dry-run"]
    for name in sorted(taken):
        argv += [f"--{name.replace('_', '-')}", str(values.get(name, 7))]
    assert main([command, *argv]) == 0, capsys.readouterr().err
    cfg = yaml.safe_load(capsys.readouterr().out)
    for name in taken:
        node = cfg
        for part in FLAGS[name].path.split("."):
            node = node[part]
        assert node == values.get(name, 7), f"advdiff {command} --{name}"
