"""Non-finite loss/gradient handling: a step with a NaN/Inf loss (on any rank) or gradient norm is
skipped on every rank and counted; too many in a row stop the run with one line, exit 2, leaving the
last good checkpoint untouched. NaNs are forced with ADVDIFF_INJECT_NAN (trainer/core/faults.py)."""

import hashlib

import pandas as pd
import pytest
import torch
from helpers import cli, stage2_config

from trainer.core.errors import UserError
from trainer.core.faults import INJECT_NAN_ENV, nan_injected, parse_nan_injection
from trainer.training.loop import StepTrainer

# 24 samples, batch 8: 2 diffusion steps per epoch, 4 in all, a metrics row every 2; 3 D steps
SMALL = dict(
    stage2={"diffusion_max_steps": 4, "diffusion_eval_interval": 2, "metric_samples": 16, "grid_samples": 0},
    discriminator={"max_steps": 3},
)


def _finite(blob) -> bool:
    return all(
        torch.isfinite(v).all()
        for key in ("state_dict", "raw_state_dict")
        for v in blob[key].values()
        if v.is_floating_point()
    )


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- unit level: the guard in StepTrainer.apply_update ------------------------------------------------
class Toy(StepTrainer):
    """One Linear layer; `kinds[i]` says what step i+1 does: "ok", "loss" (NaN loss) or "grad" (finite loss,
    NaN gradient)."""

    def __init__(self, out, kinds, max_grad_norm=0.0, limit=3):
        from pathlib import Path

        from accelerate import Accelerator

        from trainer.training.ema import EMA

        out = Path(out)
        super().__init__(
            Accelerator(cpu=True),
            stage="toy",
            state_path=out / "state.pt",
            history_path=out / "history.csv",
            max_steps=len(kinds),
            eval_interval=2,
            log_interval=1,
            seed=0,
            fingerprint={},
            max_nonfinite_steps=limit,
        )
        torch.manual_seed(0)
        self.kinds, self.max_grad_norm = kinds, max_grad_norm
        self.model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        self.ema = EMA(self.model.parameters(), decay=0.9)
        self.wrapped, self.opt = self.acc.prepare(self.model, opt)

    def train_step(self, step):
        out = self.wrapped(torch.ones(2, 3)).sum()
        kind = self.kinds[step]
        loss = (
            out * float("nan") if kind == "loss" else torch.sqrt(out * 0) if kind == "grad" else 0.01 * out**2
        )
        self.apply_update(loss, self.wrapped, self.model, self.opt, self.sched, self.max_grad_norm, self.ema)
        return {"loss": float(loss.detach())}

    def evaluate(self):
        return {"val_loss": float(self.model.weight.detach().sum())}

    def model_state(self):
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "ema": self.ema.state_dict(),
        }

    def load_model_state(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.ema.load_state_dict(state["ema"])

    def export(self, tag, metrics):
        pass


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_skipped_steps_change_nothing_but_the_counter(tmp_path, max_grad_norm):
    bad = Toy(tmp_path / "bad", ["ok", "loss", "grad", "ok"], max_grad_norm)
    bad.fit()
    ref = Toy(tmp_path / "ref", ["ok", "ok"], max_grad_norm)  # the same two applied updates, nothing else
    ref.fit()
    for p, q in zip(bad.model.parameters(), ref.model.parameters(), strict=False):
        assert torch.isfinite(p).all() and torch.equal(p, q)
    assert bad.sched.last_epoch == ref.sched.last_epoch == 2  # the LR schedule counts applied updates
    assert bad.ema.num_updates == 2 and all(
        torch.equal(a, b) for a, b in zip(bad.ema.shadow, ref.ema.shadow, strict=False)
    )
    assert bad.nonfinite_skipped == 2 and bad.step == 4
    # the history row due at step 2 waited for the next applied step (4); the skipped steps' NaN losses
    # stay out of the train averages
    assert [(r["step"], r["nonfinite_skipped"]) for r in bad.history] == [(4, 2)]
    assert all(v == v for v in bad.history[0].values())
    assert pd.read_csv(bad.history_path)["nonfinite_skipped"].tolist() == [2]


def test_too_many_in_a_row_stop_without_saving(tmp_path):
    t = Toy(tmp_path, ["ok", "ok", "loss", "grad", "loss", "ok"], limit=3)
    with pytest.raises(UserError) as e:
        t.fit()
    assert str(e.value) == (
        f"toy: 3 non-finite steps in a row (steps 3-5); stopped without saving, "
        f"last good checkpoint: {t.state_path} (step 2)"
    )
    state = torch.load(t.state_path, weights_only=True)
    assert (
        state["step"] == 2 and state["nonfinite_skipped"] == 0
    )  # the checkpoint due at step 4 was not written
    # fewer than the limit in a row: tolerated, and an applied step starts the count again
    t = Toy(tmp_path / "ok", ["loss", "loss", "ok", "grad", "loss", "ok"], limit=3)
    t.fit()
    assert t.nonfinite_skipped == 4
    # no checkpoint at all before the run: said so
    with pytest.raises(
        UserError,
        match=r"^toy: 2 non-finite steps in a row \(steps 1-2\); stopped without "
        r"saving, no toy checkpoint was written before them$",
    ):
        Toy(tmp_path / "first", ["loss", "grad", "ok"], limit=2).fit()


def test_counter_survives_resume_and_old_states_load(tmp_path):
    t = Toy(tmp_path / "a", ["ok", "loss", "ok", "ok"])
    t.stop_after = 2
    t.fit()
    assert torch.load(t.state_path, weights_only=True)["nonfinite_skipped"] == 1
    t = Toy(tmp_path / "a", ["ok", "loss", "ok", "ok"])
    t.fit()
    assert t.nonfinite_skipped == 1 and t.history[-1]["nonfinite_skipped"] == 1
    # a state written before the counter existed
    t = Toy(tmp_path / "b", ["ok"] * 4)
    t.stop_after = 2
    t.fit()
    state = torch.load(t.state_path, weights_only=True)
    for key in ("nonfinite_skipped", "nonfinite_run", "checkpoint_due"):
        del state[key]
    torch.save(state, t.state_path)
    t = Toy(tmp_path / "b", ["ok"] * 4)
    t.fit()
    assert t.step == 4 and t.nonfinite_skipped == 0


def test_injection_spec(monkeypatch, tmp_path):
    spec = parse_nan_injection("stage2_g0:3,5-6,9-:1; stage1:2")
    assert spec == (("stage2_g0", ((3, 3), (5, 6), (9, None)), 1), ("stage1", ((2, 2),), None))
    monkeypatch.setenv(INJECT_NAN_ENV, "stage2_g0:3,5-6,9-:1;stage1:2")
    hits = [n for n in range(1, 12) if nan_injected("stage2_g0", n, 1)]
    assert hits == [3, 5, 6, 9, 10, 11]
    assert not nan_injected("stage2_g0", 3, 0) and not nan_injected("stage2_d0", 3, 1)
    assert nan_injected("stage1", 2, 0) and nan_injected("stage1", 2, 1) and not nan_injected("stage1", 3, 0)
    for bad in ("stage1", "stage1:x", "stage1:0", "stage1:5-2", ":3", "stage1:3:r"):
        with pytest.raises(UserError, match=INJECT_NAN_ENV):
            parse_nan_injection(bad)
    monkeypatch.setenv(INJECT_NAN_ENV, "toy:2")
    t = Toy(tmp_path, ["ok"] * 3)
    t.fit()
    assert t.nonfinite_skipped == 1 and t.sched.last_epoch == 2
    monkeypatch.delenv(INJECT_NAN_ENV)
    assert not nan_injected("toy", 2, 0)


# -- end to end: stage 2 through the CLI's entry point, in this process --------------------------------------
@pytest.mark.slow
def test_stage2_skips_two_nan_steps_and_finishes(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, capfd, monkeypatch
):
    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt, **SMALL)
    monkeypatch.setenv(INJECT_NAN_ENV, "stage2_g0:2,4")
    proc = cli(capfd, "stage2", cfg, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("non-finite loss on rank 0; step skipped") == 2
    out = tmp_path / "out"
    m = pd.read_csv(out / "t2_metrics_iter_0.csv")
    # the row due at step 2 came after the next applied step; the last step was skipped and still saved
    assert m["step"].tolist() == [3, 4] and m["nonfinite_skipped"].tolist() == [1, 2]
    assert m.drop(columns="nonfinite_skipped").notna().all().all()
    latest = torch.load(out / "checkpoints" / "t2_iter_0_checkpoint_latest.pt", weights_only=True)
    assert latest["complete"] and latest["state"]["nonfinite_skipped"] == 2
    assert _finite(latest)
    assert _finite(torch.load(out / "checkpoints" / "t2_iter_0_checkpoint_best.pt", weights_only=True))
    assert (
        pd.read_csv(out / "discriminator_iter_0" / "discriminator_history.csv")["nonfinite_skipped"] == 0
    ).all()


@pytest.mark.slow
def test_stage2_nan_from_a_step_on_stops_and_keeps_the_checkpoint(
    tmp_path, digits_manifest, small_ae, stage1_ckpt, capfd, monkeypatch
):
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2.run import run

    cfg = stage2_config(tmp_path, digits_manifest, small_ae, stage1_ckpt, **SMALL)
    # in-process: diffusion steps 1-2, a checkpoint at 2
    run(load_config(cfg, {"training.max_nonfinite_steps": 2}), build_accelerator("cpu"), None, 2)
    flags = (
        "stage2",
        str(cfg),
        "--device",
        "cpu",
        "--set",
        "training.max_nonfinite_steps=2",
    )
    ckpts = tmp_path / "out" / "checkpoints"
    before = {p.name: _sha(p) for p in ckpts.iterdir()}
    assert set(before) == {"t2_iter_0_checkpoint_latest.pt", "t2_iter_0_checkpoint_best.pt"}
    monkeypatch.setenv(INJECT_NAN_ENV, "stage2_g0:3-")
    proc = cli(capfd, *flags)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("advdiff: error:")]
    latest = ckpts / "t2_iter_0_checkpoint_latest.pt"
    assert errors == [
        f"advdiff: error: stage2_g0: 2 non-finite steps in a row (steps 3-4); stopped without "
        f"saving, last good checkpoint: {latest} (step 2)"
    ], proc.stderr
    assert {p.name: _sha(p) for p in ckpts.iterdir()} == before  # nothing overwritten
    blob = torch.load(latest, weights_only=True)
    assert blob["state"]["step"] == 2 and not blob["complete"] and _finite(blob)
