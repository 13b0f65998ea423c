"""stage2.metric_features: the digit classifier learns, its features give cls_fd ~0 for the same reals and
a large one for noise, the summary's new columns and reference statistics, the Inception option through
a TorchScript file, bootstrap intervals, and one-line errors for bad values and bad manifests."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from trainer.config.load import load_config
from trainer.core.errors import ConfigError, UserError

# pytest-xdist: a module fixture: its tests run on one worker, so the fixture is built once
pytestmark = pytest.mark.xdist_group("test_metric_features")


def _config(folder, manifest, **stage2):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "experiment": {"name": "mf", "save_path": "out"},
                "dataset": {"manifest": str(manifest)},
                "stage2": {"metric_samples": 200, **stage2},
            }
        )
    )
    return load_config(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_manifest):
    """A classifier trained on the digits' training split at a reduced budget: (cfg, path, facts, seconds)."""
    import time

    from trainer.quality.classifier import train_classifier

    folder = tmp_path_factory.mktemp("cls")
    cfg = _config(folder, digits_manifest)
    t0 = time.time()
    facts = train_classifier(cfg, folder / "cls.pt", epochs=5, log=print)
    return cfg, folder / "cls.pt", facts, time.time() - t0


def test_classifier_learns_the_digits_and_describes_itself(trained):
    from models.classifier import load_classifier
    from trainer.data.manifest import load_image, split_indices
    from trainer.quality.classifier import accuracy, read_labels

    cfg, path, facts, seconds = trained
    print(f"classifier: 5 epochs, {seconds:.1f}s, held-out accuracy {facts['val_acc']:.4f}")
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == "advdiff.classifier" and blob["resolution"] == 32 and blob["channels"] == 1
    assert {"config", "state_dict", "val_acc"} <= set(blob)
    model, _ = load_classifier(path)
    # the stored accuracy is the loaded model's, on the held-out split (never trained on)
    rows, labels = read_labels(cfg)
    train, held = split_indices(len(rows), cfg.training.train_split, cfg.training.split_seed)
    assert facts["train_rows"] == len(train) and facts["held_out_rows"] == len(held)
    images = torch.stack([load_image(rows["image_path"][i], 32, 1) for i in held])
    acc = accuracy(model, images, torch.from_numpy(labels[held]))
    assert acc == pytest.approx(blob["val_acc"])
    assert acc > 0.9
    assert model.features(images[:5]).shape == (5, model.config["feature_dim"])


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def _evaluator(cfg, digits_manifest, summary):
    """An Evaluator whose "latents" are 8x8 average-pooled digits (64 dims) and whose decoder upsamples them
    to 16x16 (256 dims; the classifier resizes to its 32): the measurement path of stage 2 without a
    diffusion model."""
    from trainer.data.manifest import load_image, read_manifest
    from trainer.parallel.accelerator import build_accelerator
    from trainer.quality.evaluation import Evaluator

    rows = read_manifest(digits_manifest, "image_path")

    def encode(r):
        return F.avg_pool2d(torch.stack([load_image(p, 32, 1) for p in r["image_path"]]), 4)

    def decode(z):
        return F.interpolate(z, size=(16, 16), mode="bilinear", align_corners=False)

    return (
        Evaluator(
            build_accelerator("cpu"), cfg, summary, rows, encode, decode, None, (1, 8, 8), lambda line: None
        ),
        encode,
        decode,
    )


def _measure(ev, fakes):
    ev._fakes = lambda unet: fakes
    return ev.measure(0, _Identity(), None)


def test_cls_fd_is_zero_for_the_same_reals_and_large_for_noise(trained, digits_manifest, tmp_path):
    from trainer.quality.evaluation import SUMMARY_FIELDS

    _, path, _, _ = trained
    cfg = _config(tmp_path, digits_manifest, metric_features=f"classifier:{path}", metric_bootstrap=50)
    ev, _, _ = _evaluator(cfg, digits_manifest, tmp_path / "out" / "mf_summary.csv")
    same = _measure(ev, ev._reals().clone())
    noise = _measure(ev, torch.randn(ev.m, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert ev.m == 200
    for fd in ("latent_fd", "pixel_fd", "cls_fd"):  # zero up to rounding; noise is far
        assert abs(same[fd]) < 1e-6 * noise[fd], (fd, same[fd], noise[fd])
    assert same["cls_precision"] == 1.0 and same["cls_recall"] == 1.0
    assert noise["cls_fd"] > 1.0
    assert noise["cls_recall"] < 0.5
    for row in (same, noise):
        for space in ("latent", "cls"):
            assert row[f"{space}_fd_lo"] <= row[f"{space}_fd"] <= row[f"{space}_fd_hi"]
        assert set(row) <= set(SUMMARY_FIELDS) and not any(k.startswith("inception") for k in row)
    assert noise["cls_fd_hi"] > noise["cls_fd_lo"]


def test_summary_columns_keep_old_csvs_and_references_match_numpy(trained, digits_manifest, tmp_path):
    from trainer.cli.compare import table
    from trainer.files.read import read_csv_rows
    from trainer.quality.feature_spaces import load_space

    _, path, _, _ = trained
    (tmp_path / "cls.pt").write_bytes(path.read_bytes())
    cfg = _config(tmp_path, digits_manifest, metric_features="classifier:cls.pt", metric_bootstrap=0)
    summary = tmp_path / "out" / "mf_summary.csv"
    summary.parent.mkdir(parents=True)
    old = [
        "iteration",
        "latent_fd",
        "precision",
        "recall",
        "pixel_fd",
        "pixel_precision",
        "pixel_recall",
        "d_acc",
        "d_prob_fake",
        "samples",
        "seconds",
    ]  # a summary written before the feature-space columns
    summary.write_text(",".join(old) + "\n0,12.5,0.5,0.5,30.1,0.4,0.4,0.9,0.1,200,3.0\n")
    ev, encode, decode = _evaluator(cfg, digits_manifest, summary)
    row = _measure(ev, torch.randn(ev.m, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    row["iteration"] = 1
    ev.record(row)
    df = pd.read_csv(summary)
    assert df["iteration"].tolist() == [0, 1] and df.loc[0, "latent_fd"] == 12.5
    assert math.isnan(df.loc[0, "cls_fd"]) and df.loc[1, "cls_fd"] == pytest.approx(row["cls_fd"], rel=1e-5)
    assert df["inception_fd"].isna().all() and df["latent_fd_lo"].isna().all()  # not configured: empty
    assert "cls_fd" in table(read_csv_rows(summary), read_csv_rows(summary))
    # the held-out reals' statistics, beside the summary, equal numpy's mean and covariance of the features
    reals = ev._reals()
    feats = {
        "latent": reals.flatten(1),
        "pixel": decode(reals).flatten(1),
        "cls": load_space(cfg, "cpu")(decode(reals)),
    }
    for space, f in feats.items():
        f = f.double().numpy()
        with np.load(summary.parent / f"reference_{space}.npz") as ref:
            assert ref["mu"].shape == (f.shape[1],) and ref["sigma"].shape == (f.shape[1], f.shape[1])
            assert ref["mu"].dtype == np.float64 and int(ref["n"]) == 200
            np.testing.assert_allclose(ref["mu"], f.mean(0), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(ref["sigma"], np.cov(f, rowvar=False), rtol=1e-5, atol=1e-6)
    assert feats["cls"].shape[1] == 64
    # once per run: an unchanged reference is not rewritten
    before = (summary.parent / "reference_cls.npz").stat().st_mtime_ns
    ev2, _, _ = _evaluator(cfg, digits_manifest, summary)
    _measure(ev2, ev2._reals().clone())
    assert (summary.parent / "reference_cls.npz").stat().st_mtime_ns == before


class _TinyInception(torch.nn.Module):
    """Stands in for an Inception pool-feature extractor: 4 pooled conv channels, plus the input's side and
    channels so the test sees what it was given."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1)
        n = x.shape[0]
        return torch.cat(
            [pooled, torch.full((n, 1), float(x.shape[-1])), torch.full((n, 1), float(x.shape[1]))], 1
        )


def test_inception_option_runs_a_local_torchscript_file(digits_manifest, tmp_path):
    from trainer.quality.feature_spaces import TorchScriptInception, load_space

    torch.manual_seed(0)
    tiny = _TinyInception()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(tiny), str(tmp_path / "incep.pt"))
    cfg = _config(tmp_path, digits_manifest, metric_features="inception:incep.pt", metric_samples=40)
    space = load_space(cfg, "cpu")
    assert isinstance(space, TorchScriptInception) and space.name == "inception"
    out = space(torch.rand(3, 1, 32, 32) * 4 - 2)  # grey, out of range: clamped, repeated, resized
    assert out.shape == (3, 6) and (out[:, 4] == 299).all() and (out[:, 5] == 3).all()
    ev, _, _ = _evaluator(cfg, digits_manifest, tmp_path / "out" / "mf_summary.csv")
    row = _measure(ev, torch.randn(ev.m, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    assert row["inception_fd"] > 0 and 0 <= row["inception_precision"] <= 1
    assert "cls_fd" not in row and "inception_fd_lo" not in row
    assert (tmp_path / "out" / "reference_inception.npz").is_file()
    (tmp_path / "junk.pt").write_bytes(b"not torchscript" * 10)
    cfg = _config(tmp_path, digits_manifest, metric_features="inception:junk.pt")
    with pytest.raises(
        UserError, match=r"^stage2.metric_features: .*junk.pt: not a TorchScript file \(torch.jit"
    ):
        load_space(cfg, "cpu")
    # torch.export's format too (torch.jit is deprecated), with a dynamic batch dimension
    program = torch.export.export(
        tiny, (torch.zeros(2, 3, 299, 299),), dynamic_shapes=({0: torch.export.Dim("n")},)
    )
    torch.export.save(program, str(tmp_path / "incep.pt2"))
    exported = load_space(_config(tmp_path, digits_manifest, metric_features="inception:incep.pt2"), "cpu")
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(exported(images), space(images))


@pytest.mark.parametrize("value", ["clasifier:x.pt", "classifier:", "inception", "classifier: ", "pixels"])
def test_bad_metric_features_is_a_config_error(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"stage2": {"metric_features": value}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f'{path}: stage2.metric_features: expected raw, classifier:PATH or inception:PATH, got "{value}"'
    )


def test_metric_features_files_are_checked_before_compute(trained, digits_manifest, tmp_path):
    from trainer.quality.feature_spaces import check_metric_features, parse

    _, path, _, _ = trained
    assert parse("raw") == ("raw", None) and parse(f"classifier:{path}") == ("classifier", str(path))
    check_metric_features(_config(tmp_path, digits_manifest), None)  # raw: nothing to check
    good = _config(tmp_path, digits_manifest, metric_features=f"classifier:{path}")
    check_metric_features(good, {"in_channels": 1})
    with pytest.raises(UserError, match="reads 1-channel images, the AE decodes 3"):
        check_metric_features(good, {"in_channels": 3})
    missing = _config(tmp_path, digits_manifest, metric_features="classifier:sub/none.pt")
    check_metric_features(missing, None, pipeline=True)  # the demo writes it before stage 2
    with pytest.raises(UserError) as e:
        check_metric_features(missing, None)
    assert str(e.value) == f"stage2.metric_features: {tmp_path / 'sub' / 'none.pt'}: file not found"
    torch.save({"format": "advdiff.discriminator"}, tmp_path / "d.pt")
    with pytest.raises(UserError, match=r"d.pt: not an advdiff classifier \(format advdiff.classifier"):
        check_metric_features(_config(tmp_path, digits_manifest, metric_features="classifier:d.pt"), None)


def _cli_error(capsys, argv):
    from trainer.cli.main import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if not ln.startswith("advdiff: warning")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_classifier_command_bad_manifests_are_one_line(tmp_path, digits_manifest, capsys):
    df = pd.read_csv(digits_manifest)
    df["image_path"] = [str(digits_manifest.parent / p) for p in df["image_path"]]
    no_label = tmp_path / "no_label.csv"
    df.drop(columns=["label"]).to_csv(no_label, index=False)
    words = tmp_path / "words.csv"
    df.assign(label=["seven" if i == 4 else v for i, v in enumerate(df["label"])]).to_csv(words, index=False)
    for manifest, expected in [
        (no_label, f"{no_label}: no column 'label'; columns are: image_path, is_empty, is_augmented"),
        (
            words,
            f"{words}: column 'label': expected integer class labels >= 0, got 'seven' (row 4 after "
            f"dataset.filters)",
        ),
    ]:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"dataset": {"manifest": str(manifest)}}))
        assert (
            _cli_error(capsys, ["classifier", str(cfg), "--out", str(tmp_path / "c.pt")])
            == f"advdiff: error: {expected}"
        )
        assert not (tmp_path / "c.pt").exists()
    cfg.write_text(yaml.safe_dump({"stage2": {"metric_features": "classifier"}}))
    assert _cli_error(capsys, ["classifier", str(cfg)]) == (
        f"advdiff: error: {cfg}: stage2.metric_features: "
        "expected raw, classifier:PATH or inception:PATH, got "
        f'"classifier"'
    )


def test_bootstrap_interval_is_seeded_and_shrinks_with_more_samples():
    from trainer.quality.metrics import Moments, bootstrap_fd, fd_from_moments

    g = torch.Generator().manual_seed(0)
    real = torch.randn(4000, 8, generator=g)
    mr = Moments(8).add(real)
    widths = []
    for n in (200, 3200):
        fake = torch.randn(n, 8, generator=g) * 1.2 + 0.3
        lo, hi = bootstrap_fd(mr, fake, 100, seed=5)
        assert (lo, hi) == bootstrap_fd(mr, fake, 100, seed=5)
        assert lo < fd_from_moments(mr, Moments(8).add(fake)) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # the interval narrows about as 1/sqrt(n)
    assert all(math.isnan(v) for v in bootstrap_fd(mr, real[:10], 0, seed=5))


def test_a_run_recorded_before_these_fields_still_resumes(tmp_path, digits_manifest):
    """stage2_run.json of a folder started before metric_features/metric_bootstrap existed: their defaults
    are no change, anything else is."""
    import json

    from trainer.files.layout import RunLayout
    from trainer.stage2.run_record import check_run_fields, run_fields

    cfg = _config(tmp_path, digits_manifest)
    old = {
        k: v
        for k, v in run_fields(cfg, None).items()
        if k not in ("stage2.metric_features", "stage2.metric_bootstrap")
    }
    record = RunLayout.of(cfg).run_record
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"format": "advdiff.stage2-run", "fields": old}))
    check_run_fields(cfg, None)
    changed = _config(tmp_path, digits_manifest, metric_features="classifier:c.pt")
    with pytest.raises(UserError, match=r'stage2.metric_features: null -> "classifier:c.pt"'):
        check_run_fields(changed, None)
