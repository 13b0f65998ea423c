"""Every shipped YAML validates; bad values give one-line errors naming the YAML path."""

import dataclasses
import warnings

import pytest
import yaml
from helpers import REPO, cli

from trainer.config.load import load_config
from trainer.config.schema import ConfigWarning, walk_fields
from trainer.config.sections import Config
from trainer.core.errors import ConfigError

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def test_experiments_exist():
    names = {p.name for p in EXPERIMENTS}
    for model in ("unet64_d4", "unet48_d4", "unet32_d3"):
        assert f"stage2_discriminator_{model}.yaml" in names
    assert "digits.yaml" in names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_yaml_validates(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # shipped configs use no unknown keys
        cfg = load_config(path)
    assert cfg.experiment.name
    assert cfg.training.loss.losses


def test_spec_examples_build_their_unet():
    from models.unet import build_unet, count_parameters
    from trainer.diffusion.modelspec import unet_spec_from_config

    cfg = load_config(REPO / "experiments" / "stage2_discriminator_unet64_d4.yaml")
    spec = unet_spec_from_config(cfg, (16, 32, 32))
    n = count_parameters(build_unet(spec))
    assert 10e6 < n < 100e6


def test_every_field_has_a_doc():
    for path, field in walk_fields(Config):
        assert field.metadata.get("doc"), f"{path} has no doc"
        assert field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING, (
            path
        )


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {
                "training": {
                    "loss": {
                        "losses": [
                            {"type": "MSELoss"},
                            {"type": "DiscriminatorLoss", "key": "latent", "weight": "high"},
                        ]
                    }
                }
            },
            'x.yaml: training.loss.losses[1].weight: expected a number >= 0, got "high"',
        ),
        ({"training": {"batch_size": 0}}, "x.yaml: training.batch_size: expected an integer >= 1, got 0"),
        ({"training": {"batch_size": 2.5}}, "x.yaml: training.batch_size: expected an integer >= 1, got 2.5"),
        (
            {"training": {"loss": {"losses": [{"type": "L1Loss"}]}}},
            "x.yaml: training.loss.losses[0].type: expected one of MSELoss, DiscriminatorLoss, "
            'DistributionMatchingLoss, got "L1Loss"',
        ),
        (
            {"scheduler": {"type": "sigmoid"}},
            'x.yaml: scheduler.type: expected one of linear, scaled_linear, cosine, got "sigmoid"',
        ),
        (
            {"training": {"train_split": 1.5}},
            "x.yaml: training.train_split: expected a number > 0 and <= 1, got 1.5",
        ),
        ({"autoencoder": {"frozen": "yes"}}, 'x.yaml: autoencoder.frozen: expected true or false, got "yes"'),
        ({"dataset": "manifest.csv"}, 'x.yaml: dataset: expected a mapping, got "manifest.csv"'),
        (
            {"autoencoder": {"model": {"block_out_channels": [16, 30]}}},
            "x.yaml: autoencoder.model.block_out_channels[1]: "
            "expected a positive multiple of norm_num_groups (8), got 30",
        ),
    ],
)
def test_bad_values_name_the_path(tmp_path, data, message):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == str(path.parent / message)


def test_unknown_key_warns_and_does_not_crash(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"training": {"batch_size": 8, "use_ema_magic": True}, "wandb": {}}))
    with pytest.warns(ConfigWarning) as rec:
        cfg = load_config(path)
    assert cfg.training.batch_size == 8
    texts = [str(w.message) for w in rec]
    assert any("training.use_ema_magic: unknown key, ignored" in t for t in texts)
    assert any("wandb: unknown key, ignored" in t for t in texts)


def test_overrides_win_and_are_validated(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"training": {"batch_size": 8}}))
    assert load_config(path, {"training.batch_size": 32}).training.batch_size == 32
    with pytest.raises(ConfigError, match="training.batch_size: expected an integer >= 1, got -1"):
        load_config(path, {"training.batch_size": -1})


def test_relative_paths_resolve_against_the_yaml(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "x.yaml"
    path.write_text(
        yaml.safe_dump({"dataset": {"manifest": "data/m.csv"}, "experiment": {"save_path": "out"}})
    )
    cfg = load_config(path)
    assert cfg.resolve_path(cfg.dataset.manifest) == tmp_path / "sub" / "data" / "m.csv"
    assert cfg.out_dir == tmp_path / "sub" / "out"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("training: [1, 2\n", "malformed YAML at line 2"),
        ("training:\n  batch_size: many\n", 'training.batch_size: expected an integer >= 1, got "many"'),
        ("- a\n- b\n", "expected a mapping at the top level, got list"),
    ],
)
def test_cli_bad_config_is_one_line_without_traceback(tmp_path, text, expected, capfd):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = cli(capfd, "stage1", path)  # the entry point in this process (a real one: test_bad_inputs.py)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"advdiff: error: {path}: ")
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_missing_config_file(tmp_path, capfd):
    proc = cli(capfd, "stage1", tmp_path / "nope.yaml")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"advdiff: error: {tmp_path / 'nope.yaml'}: config file not found"


def test_dry_run_prints_resolved_config(tmp_path, capfd):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"training": {"batch_size": 8}}))
    proc = cli(capfd, "stage1", path, "--dry-run", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["training"]["batch_size"] == 8 and resolved["training"]["seed"] == 7


def test_config_reference_is_current():
    from trainer.cli.reference import BEGIN, END, config_reference

    text = (REPO / "docs" / "CONFIG.md").read_text()
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert table == config_reference(), "regenerate with `advdiff config-reference`"


def test_readme_commands_match_ci():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 -m pytest -q tests" in readme and "python3 -m pytest -q tests" in ci
    assert 'pip install -c constraints-cpu.txt -e ".[test]"' in readme
    assert 'pip install -q -c constraints-cpu.txt -e ".[test]"' in ci
