"""The seed system's own configs: its other words for the same things load, one warning each naming advdiff's
spelling, into the config the advdiff spelling gives; what advdiff cannot honour is one line and exit 2."""

import copy
import warnings

import pytest
import yaml
from helpers import run_cli

from trainer.cli.main import main
from trainer.config.load import load_config

# Every section and key SEED_SYSTEM.md lists, in advdiff's words.
ADVDIFF = {
    "experiment": {"name": "diffusion_stage2_discriminator_unet64_d4", "save_path": "out"},
    "diffusion": {"stage1_checkpoint": "stage1/best_checkpoint.pt"},
    "autoencoder": {"checkpoint": "autoencoder/best.pt", "frozen": True},
    "discriminator": {
        "config": {"latent_channels": 16, "base_channels": 64, "num_layers": 4, "use_batch_norm": True}
    },
    "dataset": {
        "manifest": "manifest.csv",
        "outputs": {"latent": "latent_path"},
        "filters": {"is_empty": [False], "is_augmented": [False]},
    },
    "unet": {
        "in_channels": 16,
        "out_channels": 16,
        "base_channels": 64,
        "depth": 4,
        "num_res_blocks": 2,
        "time_dim": 256,
        "norm_groups": 32,
        "dropout": 0.1,
    },
    "scheduler": {"type": "cosine", "num_steps": 500},
    "training": {
        "seed": 42,
        "train_split": 0.8,
        "split_seed": 42,
        "batch_size": 32,
        "num_workers": 4,
        "learning_rate": 5e-5,
        "optimizer": "AdamW",
        "weight_decay": 0.1,
        "use_amp": True,
        "max_grad_norm": 0.5,
        "scheduler": {"type": "cosine"},
        "loss": {
            "type": "CompositeLoss",
            "losses": [
                {"type": "MSELoss", "key": "pred_noise", "target": "noise", "weight": 1.0},
                {"type": "DiscriminatorLoss", "key": "latent", "target": None, "weight": 0.1},
            ],
        },
    },
}


def seed_words(data: dict) -> dict:
    """The same config as the seed system wrote it."""
    d = copy.deepcopy(data)
    d["scheduler"]["type"] = "CosineScheduler"
    d["training"]["scheduler"]["type"] = "CosineScheduler"
    d["unet"].update(cond_channels=0, fusion_mode="none")
    d["training"].update(use_weighted_sampling=False, save_interval=5)
    return d


def load(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(path)
    return path, cfg, [str(w.message) for w in caught]


def test_seed_words_load_into_the_advdiff_config(tmp_path):
    _, ours, quiet = load(tmp_path, ADVDIFF, "advdiff.yaml")
    path, theirs, said = load(tmp_path, seed_words(ADVDIFF), "seed.yaml")
    assert quiet == []
    assert theirs.to_dict() == ours.to_dict()
    assert sorted(said) == sorted(
        [
            f"{path}: scheduler.type: CosineScheduler read as cosine (write scheduler.type: cosine)",
            f"{path}: training.scheduler.type: CosineScheduler read as cosine "
            "(write training.scheduler.type: cosine)",
            f"{path}: unet.cond_channels: 0 is what advdiff always does; key ignored",
            f"{path}: unet.fusion_mode: none is what advdiff always does; key ignored",
            f"{path}: training.use_weighted_sampling: false is what advdiff always does; key ignored",
            f"{path}: training.save_interval: ignored; checkpoints are written at every validation: "
            f"training.eval_interval (stage 0: autoencoder.training.eval_interval; stage 2: "
            f"stage2.diffusion_eval_interval), in steps",
        ]
    )


def test_linear_scheduler_is_linear(tmp_path):
    d = copy.deepcopy(ADVDIFF)
    d["scheduler"]["type"] = "LinearScheduler"
    path, cfg, said = load(tmp_path, d)
    assert cfg.scheduler.type == "linear"
    assert said == [f"{path}: scheduler.type: LinearScheduler read as linear (write scheduler.type: linear)"]


def test_seed_words_through_overrides_and_the_cli(tmp_path, capsys):
    """--set takes the seed's words too, and each warning is one `advdiff: warning:` line."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(ADVDIFF))
    assert (
        main(
            [
                "stage1",
                str(path),
                "--set",
                "scheduler.type=LinearScheduler",
                "--set",
                "unet.fusion_mode=none",
                "--dry-run",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["scheduler"]["type"] == "linear"
    assert err.splitlines() == [
        f"advdiff: warning: {path}: scheduler.type: LinearScheduler read as linear "
        "(write scheduler.type: linear)",
        f"advdiff: warning: {path}: unet.fusion_mode: none is what advdiff always does; key ignored",
    ]


def test_unknown_keys_still_warn_naming_the_key(tmp_path):
    d = seed_words(ADVDIFF)
    d["training"]["early_stopping_patience"] = 10
    d["unet"]["cond_dropout"] = 0.1
    path, cfg, said = load(tmp_path, d)
    assert f"{path}: training.early_stopping_patience: unknown key, ignored" in said
    assert f"{path}: unet.cond_dropout: unknown key, ignored" in said


def test_the_seed_readmes_example_loads_without_a_warning(tmp_path):
    """STAGE2_README.md's "Required config fields", as written there."""
    text = """
experiment:
  name: "diffusion_stage2_discriminator_unet64_d4"
  save_path: "/path/to/output"
diffusion:
  stage1_checkpoint: /path/to/stage1/best_checkpoint.pt  # Required
autoencoder:
  checkpoint: /path/to/autoencoder/best.pt  # Required for encoding real images
  frozen: true
discriminator:
  config:
    latent_channels: 16
    base_channels: 64
    num_layers: 4
dataset:
  manifest: "/path/to/manifest.csv"  # Required
  outputs:
    latent: "latent_path"
training:
  loss:
    type: CompositeLoss
    losses:
      - type: MSELoss
        key: "pred_noise"
        target: "noise"
        weight: 1.0
      - type: DiscriminatorLoss
        key: "latent"
        weight: 0.1  # Adjust as needed
        target: null
"""
    _, cfg, said = load(tmp_path, yaml.safe_load(text))
    assert said == []
    assert [t.type for t in cfg.training.loss.losses] == ["MSELoss", "DiscriminatorLoss"]


REFUSED = [
    (
        "unet",
        "cond_channels",
        4,
        "expected 0 (feature-map conditioning is not supported; class labels: unet.num_class_embeds), got 4",
    ),
    (
        "unet",
        "fusion_mode",
        "concat",
        "expected none (feature-map conditioning is not supported; class labels: unet.num_class_embeds), "
        "got concat",
    ),
    (
        "training",
        "use_weighted_sampling",
        True,
        "expected false (weighted sampling is not supported; rows are drawn uniformly), got true",
    ),
]


@pytest.mark.parametrize("section, key, value, expected", REFUSED, ids=[r[1] for r in REFUSED])
@pytest.mark.parametrize("command", [["validate"], ["stage2", "--dry-run"]])
def test_what_cannot_be_honoured_is_one_line_and_exit_2(
    section, key, value, expected, command, tmp_path, capsys
):
    d = seed_words(ADVDIFF)
    d[section][key] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main([command[0], str(path), *command[1:]]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"advdiff: error: {path}: {section}.{key}: {expected}"]
    assert out == ""


def test_refusal_in_a_real_process_has_no_traceback(tmp_path):
    d = seed_words(ADVDIFF)
    d["unet"]["cond_channels"] = 8
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    proc = run_cli("-m", "trainer.cli", "validate", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"advdiff: error: {path}: unet.cond_channels: expected 0 (feature-map conditioning is not supported; "
        "class labels: unet.num_class_embeds), got 8"
    )
