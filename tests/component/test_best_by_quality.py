"""Choosing the best checkpoint by sample quality (`stage2.best_metric: val_latent_fd`): the start point is
a candidate, so an iteration that only regresses keeps its start, and with `continue_from: best` the
summary never gets worse from one iteration to the next."""

import math

import pandas as pd
import pytest
import torch
from helpers import stage2_config

from trainer.config.load import load_config
from trainer.training.loop import StepTrainer


class Scripted(StepTrainer):
    """A trainer whose validations return scripted values; records its exports."""

    def __init__(self, out, start, values):
        from accelerate import Accelerator

        super().__init__(
            Accelerator(cpu=True),
            stage="scripted",
            state_path=out / "state.pt",
            history_path=out / "history.csv",
            max_steps=len(values),
            eval_interval=1,
            log_interval=1,
            seed=0,
            fingerprint={},
            metric="val",
        )
        self.start, self.values, self.exports = start, values, []

    def train_step(self, step):
        return {}

    def evaluate(self):
        return {"val": self.values[self.step - 1]}

    def baseline(self):
        return None if self.start is None else {"val": self.start}

    def model_state(self):
        return {}

    def load_model_state(self, state):
        pass

    def export(self, tag, metrics):
        self.exports.append((tag, metrics["step"]))


def test_start_point_stays_best_when_every_step_is_worse(tmp_path):
    t = Scripted(tmp_path / "a", start=1.0, values=[2.0, 3.0])
    t.fit()
    assert t.best == {"value": 1.0, "step": 0}
    assert [e for e in t.exports if e[0] == "best"] == [("best", 0)]


def test_a_better_step_replaces_the_start_point(tmp_path):
    t = Scripted(tmp_path / "b", start=1.0, values=[2.0, 0.5])
    t.fit()
    assert t.best == {"value": 0.5, "step": 2}
    assert [e for e in t.exports if e[0] == "best"] == [("best", 0), ("best", 2)]


def test_without_a_baseline_the_first_validation_is_best(tmp_path):
    t = Scripted(tmp_path / "c", start=None, values=[2.0, 3.0])
    t.fit()
    assert t.best == {"value": 2.0, "step": 1}


@pytest.mark.slow
def test_quality_best_never_lets_the_summary_regress(tmp_path, digits_manifest, small_ae, stage1_ckpt):
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2.run import run

    cfg_path = stage2_config(
        tmp_path,
        digits_manifest,
        small_ae,
        stage1_ckpt,
        stage2={
            "num_iterations": 2,
            "diffusion_max_steps": 4,
            "diffusion_eval_interval": 2,
            "metric_samples": 16,
            "grid_samples": 0,
            "best_metric": "val_latent_fd",
            "continue_from": "best",
        },
        discriminator={"max_steps": 3},
    )
    cfg = load_config(cfg_path)
    run(cfg, build_accelerator("cpu"))
    out = tmp_path / "out"
    summary = pd.read_csv(out / "t2_summary.csv")
    fd = summary["latent_fd"].tolist()
    assert len(fd) == 3 and all(math.isfinite(v) for v in fd)
    for k in range(2):
        rows = pd.read_csv(out / f"t2_metrics_iter_{k}.csv")
        assert "val_latent_fd" in rows.columns and rows["val_latent_fd"].notna().all()
        best = torch.load(out / "checkpoints" / f"t2_iter_{k}_checkpoint_best.pt", weights_only=True)
        chosen = best["metrics"]["val_latent_fd"]
        # the best is the minimum over the start point and every validation of the iteration
        assert chosen == pytest.approx(min([fd[k]] + rows["val_latent_fd"].tolist()), rel=1e-4)
        # the summary row of iteration k is that checkpoint, measured the same way
        assert fd[k + 1] == pytest.approx(chosen, rel=1e-4)
        assert fd[k + 1] <= fd[k] * (1 + 1e-4)
