"""Stage 1 end to end: in-process resume equivalence, and `accelerate launch` at 1 and 2 processes."""

import pytest
import torch
from helpers import LAUNCH_PROBE, accelerate_launch, tiny_config

from trainer.config.load import load_config


def _train(cfg_path, stop_after=None):
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    cfg = load_config(cfg_path)
    trainer = DiffusionTrainer(cfg, build_accelerator("cpu"))
    trainer.stop_after = stop_after
    trainer.fit()
    return cfg.out_dir / "stage1"


def _weights(path, key="state_dict"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def test_resume_gives_the_same_weights(tmp_path, digits_manifest, small_ae):
    straight = _train(tiny_config(tmp_path / "a", digits_manifest, small_ae))
    cfg_b = tiny_config(tmp_path / "b", digits_manifest, small_ae)
    out_b = _train(cfg_b, stop_after=4)  # stop between evaluations (eval at 6 and 12)
    assert (out_b / "state.pt").is_file() and not (out_b / "checkpoint_latest.pt").exists()
    assert torch.load(out_b / "state.pt", weights_only=True)["step"] == 4
    out_b = _train(cfg_b, stop_after=5)  # resumes at 4, passes the step-6 evaluation, stops at 9
    assert torch.load(out_b / "state.pt", weights_only=True)["step"] == 9
    _train(cfg_b)  # resumes at 9, finishes
    for key in ("state_dict", "raw_state_dict"):
        a, b = _weights(straight / "checkpoint_latest.pt", key), _weights(out_b / "checkpoint_latest.pt", key)
        for name in a:
            assert torch.equal(a[name], b[name]), (key, name)
    assert (straight / "history.csv").read_text() == (out_b / "history.csv").read_text()


def test_resume_refuses_a_changed_config(tmp_path, digits_manifest, small_ae):
    from trainer.core.errors import UserError

    cfg = tiny_config(tmp_path, digits_manifest, small_ae)
    _train(cfg, stop_after=2)
    text = cfg.read_text().replace("learning_rate: 0.002", "learning_rate: 0.001")
    cfg.write_text(text)
    with pytest.raises(UserError, match=r"config changed since this state was written \(learning_rate\)"):
        _train(cfg)


def test_stage1_outputs_and_sample_grid(tmp_path, digits_manifest, small_ae):
    from PIL import Image

    from trainer.diffusion.checkpoints import load_diffusion_checkpoint

    out = _train(tiny_config(tmp_path, digits_manifest, small_ae))
    for name in ("checkpoint_best.pt", "checkpoint_latest.pt", "state.pt", "history.csv", "samples.png"):
        assert (out / name).is_file(), name
    ck = load_diffusion_checkpoint(out / "checkpoint_best.pt")
    assert ck.latent_shape[0] == 4 and ck.scheduler["prediction_type"] == "v_prediction"
    assert ck.scaling.scale > 0
    with Image.open(out / "samples.png") as img:
        assert img.size == (8 * 34 + 2, 8 * 34 + 2)


def _launch(tmp_path, manifest, ae, nproc):
    cfg = tiny_config(tmp_path, manifest, ae)
    audit = tmp_path / "audit"
    audit.mkdir()
    out = tmp_path / "out"
    proc = accelerate_launch(
        nproc,
        LAUNCH_PROBE,
        "trainer.stage1",
        str(cfg),
        "--device",
        "cpu",
        env={"ADVDIFF_AUDIT_DIR": str(audit), "ADVDIFF_AUDIT_WATCH": str(out)},
        warm=False,  # test_accelerate_launch_1_and_2_processes: the real launcher at both sizes
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "stage1" / "checkpoint_best.pt").is_file()
    assert (out / "stage1" / "samples.png").is_file()
    main_writes = (audit / "rank0.txt").read_text().splitlines()
    assert any("checkpoint_best.pt" in w for w in main_writes)
    return proc, audit, out / "stage1"
