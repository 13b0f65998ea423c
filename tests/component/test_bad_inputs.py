"""The bad-input catalogue: every case must fail before compute with one exact line naming the field or
file, exit code 2, no traceback, and leave every existing output byte-identical. The same line must
come from `advdiff validate` (which shares the checks) where the problem is in the config or files.
"""

import hashlib

import pytest
import yaml
from bad_input_cases import CASES, Case
from helpers import cli, run_cli, stage2_config

# pytest-xdist: a module fixture: its tests run on one worker, so the fixture is built once
pytestmark = pytest.mark.xdist_group("test_bad_inputs")

FAST = ["--device", "cpu"]


def snapshot(*roots):
    """{path: sha1} of every file under the roots."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits_manifest, small_ae, stage1_ckpt):
    """A finished 1-iteration stage-2 run: the outputs every case must leave untouched."""
    root = tmp_path_factory.mktemp("finished")
    cfg = stage2_config(
        root,
        digits_manifest,
        small_ae,
        stage1_ckpt,
        stage2={"num_samples": 16, "diffusion_max_steps": 2, "metric_samples": 8, "grid_samples": 0},
        discriminator={"max_steps": 2},
    )
    from trainer.cli.main import main

    assert main(["stage2", str(cfg), *FAST]) == 0  # in this process: the cases below run their own
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f.__name__[2:] for f in CASES])
def test_bad_input_fails_before_compute_with_one_exact_line(
    case, tmp_path, finished, digits_manifest, small_ae, stage1_ckpt, capsys
):
    from trainer.cli.main import main

    c = Case(tmp_path, finished, digits_manifest, small_ae, stage1_ckpt)
    argv, cfg, expected, also_validate = case(c)
    before = snapshot(c.out, tmp_path)
    code = main(["stage2", str(cfg), *argv, *FAST])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("advdiff: error:")]
    assert code == 2, err
    assert lines == [f"advdiff: error: {expected}"], err
    assert "Traceback" not in err
    assert snapshot(c.out, tmp_path) == before, "an existing output or input was modified"
    if also_validate:
        code = main(["validate", str(cfg), *[a for a in argv if a not in FAST]])
        err = capsys.readouterr().err
        assert code == 2
        assert f"advdiff: error: {expected}" in err.splitlines(), err
        assert snapshot(c.out, tmp_path) == before


def test_catalogue_is_large_enough():
    assert len(CASES) >= 20


@pytest.mark.slow
def test_cli_process_exit_code_and_no_traceback(tmp_path, finished):
    """The same path through a real process: exit 2, the line on stderr, nothing else."""
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(finished.read_text())
    data["discriminator"]["config"]["num_layers"] = 9
    bad.write_text(yaml.safe_dump(data))
    proc = run_cli("-m", "trainer.cli", "stage2", str(bad), *FAST, warm=False)  # a fresh interpreter
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"advdiff: error: {bad}: discriminator.config.num_layers: expected at most 3 for 8x8 latents, got 9"
    )


@pytest.mark.slow
def test_validate_lists_every_problem(tmp_path, finished, capfd):
    data = yaml.safe_load(finished.read_text())
    data["discriminator"]["config"]["latent_channels"] = 2
    data["diffusion"]["stage1_checkpoint"] = str(
        finished.parent / "out" / "checkpoints" / "t2_iter_0_checkpoint_best.pt"
    )
    data["dataset"]["filters"] = {"label": [0]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = cli(capfd, "validate", bad, "--num_samples", "900")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"advdiff validate: 4 problem(s) in {bad}", proc.stderr
    assert any("discriminator.config.latent_channels" in ln for ln in lines)
    assert any(ln.startswith("advdiff: error: --num_samples 900 exceeds the") for ln in lines)
    assert any("this folder's stage-2 run was started with a different config" in ln for ln in lines)
    assert any(
        ln.endswith("latents of shape (16, 4, 8, 8), expected (900, 4, 8, 8); delete it to regenerate")
        for ln in lines
    )


@pytest.mark.slow
def test_validate_passes_on_a_good_config_and_the_embedded_default(tmp_path, finished, capfd):
    proc = cli(capfd, "validate", finished)
    assert proc.returncode == 0, proc.stderr
    assert "is ready for stage 2" in proc.stdout
    proc = cli(capfd, "validate", "--demo", "--out", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr
    assert "the embedded default" in proc.stdout and "is ready for stage 2" in proc.stdout
    assert not (tmp_path / "demo").exists(), "validate must not create anything"
