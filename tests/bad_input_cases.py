"""The bad-input catalogue's cases (test_bad_inputs.py runs them): each builder takes a Case
and returns (argv after the config, config path, the one expected error line, whether `advdiff validate`
must say it too)."""

import shutil

import torch
import yaml


class Case:
    def __init__(self, tmp, finished, manifest, ae, ckpt):
        self.tmp, self.finished, self.manifest, self.ae, self.ckpt = tmp, finished, manifest, ae, ckpt
        self.base = yaml.safe_load(finished.read_text())
        self.out = finished.parent / "out"

    def config(self, edit=None, text=None, name="bad.yaml"):
        path = self.tmp / name
        if text is not None:
            path.write_text(text)
            return path
        data = yaml.safe_load(yaml.safe_dump(self.base))
        if edit:
            edit(data)
        path.write_text(yaml.safe_dump(data))
        return path

    def manifest_with(self, rows_edit, name="manifest.csv"):
        import pandas as pd

        df = pd.read_csv(self.manifest)
        df["image_path"] = [str((self.manifest.parent / p).resolve()) for p in df["image_path"]]
        df = rows_edit(df)
        path = self.tmp / name
        df.to_csv(path, index=False)
        return path


def _set(path, value):
    def edit(data):
        node = data
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    return edit


def _small(df):
    return df.iloc[:20].copy()


# Each builder returns (argv after the config, config path, expected line, also_validate).
def c_malformed_yaml(c):
    p = c.config(text="experiment:\n  name: [unclosed\n")
    return (
        [],
        p,
        f"{p}: malformed YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'",
        True,
    )


def c_wrong_type(c):
    p = c.config(_set("stage2.num_samples", "many"))
    return [], p, f'{p}: stage2.num_samples: expected an integer >= 2, got "many"', True


def c_d_betas(c):  # every optimizer's betas are checked by one rule (config/optimizer_fields.py)
    p = c.config(_set("discriminator.training.betas", [0.5, 1.5]))
    return [], p, f"{p}: discriminator.training.betas: expected two numbers in [0, 1), got [0.5, 1.5]", True


def c_unknown_loss(c):
    def edit(d):
        d["training"]["loss"]["losses"][0]["type"] = "L3Loss"

    p = c.config(edit)
    return (
        [],
        p,
        (
            f"{p}: training.loss.losses[0].type: expected one of MSELoss, DiscriminatorLoss, "
            'DistributionMatchingLoss, got "L3Loss"'
        ),
        True,
    )


def c_missing_checkpoint(c):
    p = c.config(_set("diffusion.stage1_checkpoint", str(c.tmp / "nope.pt")))
    return [], p, f"{c.tmp / 'nope.pt'}: checkpoint not found", True


def c_missing_ae(c):
    p = c.config(_set("autoencoder.checkpoint", str(c.tmp / "no_ae")))
    return [], p, f"autoencoder.checkpoint: {c.tmp / 'no_ae'}: autoencoder not found", True


def c_missing_manifest(c):
    p = c.config(_set("dataset.manifest", str(c.tmp / "none.csv")))
    return [], p, f"{c.tmp / 'none.csv'}: manifest not found", True


def c_missing_column(c):
    p = c.config(_set("dataset.image_column", "img"))
    return (
        [],
        p,
        (
            f"{c.manifest}: no column 'img' (dataset.image_column); columns are: "
            f"image_path,label,is_empty,is_augmented".replace(",", ", ")
        ),
        True,
    )


def c_empty_column(c):
    def edit(df):
        df.loc[3, "image_path"] = None
        return df

    m = c.manifest_with(edit)
    p = c.config(_set("dataset.manifest", str(m)))
    return [], p, f"{m}: row 3: empty 'image_path'", True


def c_corrupt_image(c):
    bad = c.tmp / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)

    def edit(df):
        df = _small(df)
        df.loc[5, "image_path"] = str(bad)
        return df

    m = c.manifest_with(edit)
    p = c.config(_set("dataset.manifest", str(m)))
    return ["--num_samples", "20"], p, f"{bad}: cannot read image (OSError)", True


def c_missing_image(c):
    def edit(df):
        df = _small(df)
        df.loc[7, "image_path"] = str(c.tmp / "gone.png")
        return df

    m = c.manifest_with(edit)
    p = c.config(_set("dataset.manifest", str(m)))
    return ["--num_samples", "20"], p, f"{c.tmp / 'gone.png'}: image not found", True


def c_corrupt_checkpoint(c):
    bad = c.tmp / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    p = c.config(_set("diffusion.stage1_checkpoint", str(bad)))
    return [], p, f"{bad}: unreadable checkpoint (truncated, or not written by torch.save)", True


def c_truncated_checkpoint(c):
    bad = c.tmp / "truncated.pt"
    data = c.ckpt.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    p = c.config(_set("diffusion.stage1_checkpoint", str(bad)))
    return [], p, f"{bad}: unreadable checkpoint (truncated, or not written by torch.save)", True


def c_wrong_format_checkpoint(c):
    bad = c.tmp / "d.pt"
    torch.save({"format": "advdiff.discriminator", "state_dict": {}}, bad)
    p = c.config(_set("diffusion.stage1_checkpoint", str(bad)))
    return (
        [],
        p,
        (
            f"{bad}: not an advdiff diffusion checkpoint (format advdiff.diffusion), a diffusers "
            f"UNet2DModel folder or a diffusers pipeline folder"
        ),
        True,
    )


def c_wrong_latent_shape(c):
    lat = c.tmp / "z.pt"
    torch.save(torch.zeros(3, 8, 8), lat)

    def edit(df):
        df = _small(df)
        df["latent_path"] = None
        df.loc[2, "latent_path"] = str(lat)
        return df

    m = c.manifest_with(edit)
    p = c.config(_set("dataset.manifest", str(m)))
    return ["--num_samples", "20"], p, f"{lat}: latent of shape (3, 8, 8), expected (4, 8, 8)", True


def c_d_channels(c):
    p = c.config(_set("discriminator.config.latent_channels", 3))
    return (
        [],
        p,
        (
            f"{p}: discriminator.config.latent_channels: expected 4 (the stage-1 UNet's latent channels), "
            f"got 3"
        ),
        True,
    )


def c_ae_channels(c):
    from models.autoencoder import build_autoencoder

    ae3 = c.tmp / "ae3"
    build_autoencoder(latent_channels=3).save_pretrained(str(ae3))
    p = c.config(_set("autoencoder.checkpoint", str(ae3)))
    return [], p, "autoencoder.checkpoint: latent channels 3 differ from the stage-1 UNet's 4", True


def c_ae_without_weights(c):
    folder = c.tmp / "ae_empty"
    folder.mkdir()
    shutil.copy(c.ae / "config.json", folder / "config.json")
    p = c.config(_set("autoencoder.checkpoint", str(folder)))
    return (
        [],
        p,
        (f"autoencoder.checkpoint: {folder}: no weights (diffusion_pytorch_model.safetensors or .bin)"),
        True,
    )


def c_d_too_deep(c):
    p = c.config(_set("discriminator.config.num_layers", 4))
    return [], p, f"{p}: discriminator.config.num_layers: expected at most 3 for 8x8 latents, got 4", True


def c_n_zero(c):
    p = c.config()
    return ["--num_samples", "0"], p, f"{p}: stage2.num_samples: expected an integer >= 2, got 0", True


def c_n_too_large(c):
    p = c.config()
    return (
        ["--num_samples", "5000"],
        p,
        (
            "--num_samples 5000 exceeds the 1797 manifest rows left after filters; "
            "lower it, or set stage2.sample_with_replacement: true"
        ),
        True,
    )


def c_negative_epochs(c):
    p = c.config()
    return (
        ["--discriminator_epochs", "-1"],
        p,
        f"{p}: discriminator.training.epochs: expected an integer >= 1, got -1",
        True,
    )


def c_filters_leave_nothing(c):
    p = c.config(_set("dataset.filters", {"label": [42]}))
    return [], p, f"{c.manifest}: no rows left after dataset.filters", True


def c_filter_unknown_column(c):
    p = c.config(_set("dataset.filters", {"colour": ["red"]}))
    return [], p, f"{c.manifest}: dataset.filters.colour: no such column in the manifest", True


def c_manifest_not_csv(c):
    bad = c.tmp / "binary.csv"
    bad.write_bytes(bytes(range(256)) * 4)
    p = c.config(_set("dataset.manifest", str(bad)))
    return (
        [],
        p,
        f"{bad}: not a readable CSV (Error tokenizing data. C error: Expected 1 fields in line 3, saw 2)",
        True,
    )


def c_output_is_a_file(c):
    f = c.tmp / "a_file"
    f.write_text("precious")
    p = c.config(_set("experiment.save_path", str(f)))
    return [], p, f"experiment.save_path: {f} exists and is not a folder", True


def c_output_under_a_file(c):
    f = c.tmp / "plain_file"
    f.write_text("precious")
    p = c.config(_set("experiment.save_path", str(f / "run")))
    return [], p, f"experiment.save_path: {f / 'run'} cannot be created: {f} is a file", True


def c_bad_precision(c):
    p = c.config()
    return (
        ["--set", "training.mixed_precision=fp8"],
        p,
        f'{p}: training.mixed_precision: expected one of no, fp16, bf16, got "fp8"',
        True,
    )


def c_start_iteration_beyond(c):
    p = c.config(_set("stage2.num_iterations", 4))
    last = c.out / "checkpoints" / "t2_iter_1_checkpoint_latest.pt"
    return (
        ["--start_iteration", "2"],
        p,
        f"--start_iteration 2: {last} is missing; finish iteration 1 first (or drop --start_iteration to "
        f"continue where the last run stopped)",
        False,
    )


def c_changed_model_field(c):
    p = c.config(_set("discriminator.config.base_channels", 16))
    return (
        [],
        p,
        (
            f"{c.out}: this folder's stage-2 run was started with a different config "
            f"(discriminator.config.base_channels: 8 -> 16); use a new experiment.save_path, or restore "
            f"those fields"
        ),
        True,
    )


def c_corrupt_saved_latents(c):
    run = c.tmp / "copy"
    shutil.copytree(c.out, run)
    bad = run / "discriminator_iter_0" / "real_latents.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    (run / "stage2_run.json").unlink()  # a different folder: its recorded save-path-free fields still match
    p = c.config(_set("experiment.save_path", str(run)))
    return (
        [],
        p,
        f"{bad}: unreadable latents (truncated, or not written by torch.save); delete it to regenerate",
        True,
    )


def c_metric_features_form(c):
    p = c.config(_set("stage2.metric_features", "inceptionv3"))
    return (
        [],
        p,
        f'{p}: stage2.metric_features: expected raw, classifier:PATH or inception:PATH, got "inceptionv3"',
        True,
    )


def c_metric_features_missing_file(c):
    p = c.config(_set("stage2.metric_features", "classifier:no_classifier.pt"))
    return [], p, f"stage2.metric_features: {c.tmp / 'no_classifier.pt'}: file not found", True


def c_missing_config(c):
    return [], c.tmp / "absent.yaml", f"{c.tmp / 'absent.yaml'}: config file not found", True


# the sampler's cases (step counts, timestep spacing), in their own file; they use _set above
from bad_input_cases_labels import *  # noqa: E402, F403
from bad_input_cases_sampler import *  # noqa: E402, F403
from bad_input_cases_steps import *  # noqa: E402, F403

CASES = [v for k, v in sorted(globals().items()) if k.startswith("c_")]
