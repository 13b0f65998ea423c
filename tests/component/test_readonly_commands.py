"""The commands that only read a run folder (evaluate, sample, report --out, export, compare) work on a
finished stage-2 run whatever its recorded config, and leave the folder as it was: same files, same
bytes, same modification times. evaluate takes other result-defining fields (--generation_steps,
--seed) than the run recorded in stage2_run.json: a read-only command is never refused over them.

`advdiff report RUN` writes RUN/report.html by default: writing that page is its job (stage 2 itself
refreshes it), so here it writes to --out outside the run."""

import json

import pytest
import yaml
from helpers import stage2_config

# pytest-xdist: a module fixture: its tests run on one worker, so the fixture is built once
pytestmark = pytest.mark.xdist_group("test_readonly_commands")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_manifest, small_ae, stage1_ckpt):
    """A finished one-iteration stage-2 run whose config.yaml lives in the run folder (as the demo's)."""
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import run

    root = tmp_path_factory.mktemp("readonly")
    path = stage2_config(
        root,
        digits_manifest,
        small_ae,
        stage1_ckpt,
        stage2={"num_samples": 16, "diffusion_epochs": 1, "metric_samples": 16},
        discriminator={"epochs": 1},
    )
    data = yaml.safe_load(path.read_text())
    folder = root / "run"
    data["experiment"]["save_path"] = str(folder)
    folder.mkdir()
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    run(load_config(config), build_accelerator("cpu"))
    assert json.loads((folder / "stage2_run.json").read_text())["fields"]["training.seed"] == 42
    return folder, config


def snapshot(folder) -> dict:
    """Every entry under `folder`: a file's bytes and modification time, a folder's presence."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "folder"
    return out


def test_read_only_commands_leave_a_finished_run_as_it_was(finished_run, tmp_path, capsys):
    from trainer.cli.main import main

    folder, config = finished_run
    (checkpoint,) = sorted((folder / "checkpoints").glob("*_iter_0_checkpoint_best.pt"))
    before = snapshot(folder)
    assert "stage2_run.json" in before and "report.html" in before and len(before) > 20

    def ok(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert rc == 0, f"advdiff {argv[0]}: exit {rc}: {err}"
        return out

    seed_flags = ["--seed", 11]  # the run recorded training.seed 42 and stage2.generation_steps 3
    row = json.loads(
        ok(
            "evaluate",
            config,
            "--device",
            "cpu",
            "--generation_steps",
            2,
            *seed_flags,
            "--json",
            tmp_path / "r.json",
        )
    )
    assert row["generation_steps"] == 2 and row["latent_fd"] > 0
    ok("evaluate", config, "--device", "cpu", "--checkpoint", checkpoint, "--generation-steps", 1)
    ok(
        "sample",
        checkpoint,
        "--out",
        tmp_path / "s",
        "--num",
        2,
        "--steps",
        2,
        *seed_flags,
        "--device",
        "cpu",
    )
    ok("report", folder, "--out", tmp_path / "report.html", "--compare", folder)
    ok("export", folder, tmp_path / "pipeline", "--steps", 2)
    ok("compare", folder, folder)
    assert (tmp_path / "s.pt").is_file() and (tmp_path / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "report.html").stat().st_size > 0
    after = snapshot(folder)
    assert sorted(after) == sorted(before), "files added or removed in the run folder"
    changed = [rel for rel in before if after[rel] != before[rel]]
    assert changed == [], f"read-only commands changed {changed}"


def test_a_read_only_setup_refuses_to_write(finished_run):
    """stage2.setup(read_only=True) measures but never records a row, a grid, a report or a pipeline."""
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import refresh_report, setup, write_comparison

    _, config = finished_run
    s = setup(load_config(config, {"training.seed": 5}), build_accelerator("cpu"), read_only=True)
    evaluator = s.evaluator()
    for write in (lambda: refresh_report(s), lambda: write_comparison(s, 2), lambda: evaluator.record({})):
        with pytest.raises(RuntimeError, match="read-only"):
            write()


def test_a_training_start_still_refuses_another_config(finished_run, capsys):
    """What read-only commands skip still guards a run: stage 2 on the folder with another seed."""
    from trainer.cli.main import main

    folder, config = finished_run
    before = snapshot(folder)
    assert main(["stage2", str(config), "--device", "cpu", "--seed", "11"]) == 2
    assert "this folder's stage-2 run was started with a different config" in capsys.readouterr().err
    assert snapshot(folder) == before
