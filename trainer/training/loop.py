"""One small step-loop shared by every stage: interval logging and evaluation, best/latest exports,
and a single-file resume state that restores the run exactly.

All randomness in a step is derived from (seed, stage, step), never from a running RNG, so a run
resumed at step k draws exactly what the uninterrupted run drew. The state is written by the main
process only (under DDP every rank holds identical model and optimizer state), atomically.

Non-finite steps: `StepTrainer.apply_update` skips a step whose loss (on any rank) or gradient norm
is NaN/Inf, on every rank alike, counts it (`nonfinite_skipped`: resume state and history column)
and stops the run with a UserError after `training.max_nonfinite_steps` skipped steps in a row,
leaving the checkpoint files from before them untouched. Tests inject NaN losses through
trainer.core.faults (ADVDIFF_INJECT_NAN).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from trainer.core import faults
from trainer.core.errors import UserError
from trainer.core.log import Logger
from trainer.core.progress import bar
from trainer.core.seeds import derive_seed, generator
from trainer.parallel import engine, preempt
from trainer.parallel.accelerator import tracker_step
from trainer.parallel.collectives import all_reduce_sum, barrier, shard_range
from trainer.files import atomic, read

STATE_FORMAT = "advdiff.state"


def grad_norm(parameters) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients (what clip_grad_norm_ returns), without clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))


def batch_indices(train_idx: np.ndarray, batch: int, step: int, seed: int, stage: str) -> np.ndarray:
    """The global batch of `step`: epoch-wise reshuffled, drop-last, derived from (seed, stage, epoch)."""
    per_epoch = max(1, len(train_idx) // batch)
    epoch, j = divmod(step, per_epoch)
    perm = np.random.default_rng(derive_seed(seed, stage, "epoch", epoch)).permutation(len(train_idx))
    take = perm[j * batch : (j + 1) * batch]
    if len(take) < batch:  # fewer rows than one batch: wrap around
        take = np.resize(perm, batch)
    return train_idx[take]


def draw_local(positions: np.ndarray, n_local: int, step: int, per_epoch: int, *seed_parts) -> np.ndarray:
    """`n_local` of this rank's own `positions` for `step`: walks a per-epoch permutation (seeded from
    seed_parts and the epoch), wrapping around when the shard is shorter than an epoch needs."""
    epoch, j = divmod(step, per_epoch)
    perm = np.random.default_rng(derive_seed(*seed_parts, epoch)).permutation(len(positions))
    if not len(perm):
        return positions[:0]
    return positions[np.resize(np.roll(perm, -j * n_local), n_local)]


def rank_slice(global_batch, rank: int, world: int):
    r = shard_range(len(global_batch), rank, world)
    return global_batch[r.start : r.stop]


def local_weight(n_local: int, n_global: int, world: int) -> float:
    """Factor turning a local mean into this rank's share, so DDP's average is the global mean."""
    return n_local * world / n_global


class StepTrainer:
    """Subclasses implement train_step, evaluate, the state hooks and export.

    stage: the name in log lines, seeds and fault points (stage0, stage1, stage2_d0, stage2_g1, ...);
    metric: the validation metric that picks "best"; state_path / history_path: the resume state and
    the validation CSV; phase_label: how the RESUMED line names the phase ("iteration 1, discriminator
    phase")."""

    history_fields: list[str] | None = None  # CSV column order (default: order of first appearance)

    def __init__(
        self,
        accelerator,
        *,
        stage: str,
        state_path: Path,
        history_path: Path,
        max_steps: int,
        eval_interval: int,
        log_interval: int,
        seed: int,
        fingerprint: dict,
        metric: str = "val_loss",
        max_nonfinite_steps: int = 5,
        phase_label: str | None = None,
    ):
        self.acc = accelerator
        self.stage, self.metric, self.phase_label = stage, metric, phase_label
        self.state_path, self.history_path = Path(state_path), Path(history_path)
        self.max_steps, self.eval_interval, self.log_interval = max_steps, eval_interval, log_interval
        self.seed, self.fingerprint = seed, fingerprint
        self.step = 0
        self.stop_after: int | None = None  # stop (with a resume state) after this many steps in this call
        self._sums: dict = {}
        self._count = 0
        self._last_train: dict = {}
        self.best = {"value": math.inf, "step": -1}
        self.history: list[dict] = []
        # Non-finite steps: the total skipped (resume state, history column), the current run of
        # consecutive skips (length, first step number), whether this step was skipped, a checkpoint
        # postponed until that run ends, and the step of the last resume state on disk.
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_skipped = 0
        self._bad_run, self._bad_first = 0, 0
        self._step_skipped = False
        self._checkpoint_due = False
        self._saved_step: int | None = None
        self.log = Logger(accelerator, self.stage)
        if accelerator.is_main_process:
            atomic.remove_stale_temps(self.state_path.parent)  # temp files of writes a kill interrupted

    # -- hooks ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def model_state(self) -> dict:
        raise NotImplementedError

    def load_model_state(self, state: dict) -> None:
        raise NotImplementedError

    def export(self, tag: str, metrics: dict) -> None:
        """Write the `tag` ("best" or "latest") export. Called on every rank (weights may need a
        gather); only the main process writes."""
        raise NotImplementedError

    def apply_update(self, loss, wrapped, plain, opt, sched, max_grad_norm: float, ema=None) -> bool:
        """Backward, clip (DeepSpeed clips inside its own step), step the optimizer and LR schedule (if
        any), and update the EMA of `plain`'s weights (gathered first under ZeRO-3). Call on every rank.

        Guarded against non-finite values; returns False when the step was skipped:
        - loss: a per-rank NaN/Inf flag is all-reduced before backward, so if any rank's loss is
          non-finite no rank runs backward or the optimizer step (DDP cannot hang on a missing
          gradient all-reduce, and DeepSpeed never sees the step).
        - gradient (not under DeepSpeed, nor with fp16's GradScaler): the total gradient norm after
          backward (clip_grad_norm_'s, or computed when clipping is off) must be finite, else the
          optimizer step is skipped. DeepSpeed owns its (possibly partitioned) gradients and its fp16
          loss scaler skips overflowing steps itself; accelerate's GradScaler does the same for fp16
          without DeepSpeed (an overflow there is routine, lowers the scale and is not counted).
        A skipped step leaves weights, optimizer, LR schedule and EMA exactly as they were (the
        schedule counts applied updates, as accelerate and DeepSpeed do for fp16 overflow skips);
        the step counter still advances, so the data drawn later is that of an uninterrupted run.
        `loss`: a tensor, or micro-batches (gradient accumulation): callables, each returning its loss share.
        """
        micro = [loss] if torch.is_tensor(loss) else list(loss)
        for i, part in enumerate(
            micro
        ):  # gradients add up; DDP all-reduces them on the last micro-batch only
            with engine.grad_sync(self.acc, wrapped, i == len(micro) - 1):
                part = part if torch.is_tensor(part) else part()
                if faults.nan_injected(self.stage, self.step + 1, self.rank):
                    part = part * float("nan")
                bad = self._nonfinite_ranks(part)
                if bad:
                    opt.zero_grad(set_to_none=True)
                    self._skip_step(
                        f"non-finite loss on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"
                    )
                    return False
                self.acc.backward(part)
        deepspeed = engine.is_deepspeed(self.acc)
        norm = None
        if max_grad_norm > 0 and not deepspeed:
            norm = self.acc.clip_grad_norm_(wrapped.parameters(), max_grad_norm)
        if not deepspeed and getattr(self.acc, "scaler", None) is None:
            if norm is None:
                norm = grad_norm(wrapped.parameters())
            # Under DDP the gradients are already averaged (a NaN/Inf anywhere reaches every rank), so
            # the norm agrees across ranks; the flag is all-reduced anyway (one scalar per rank), so
            # the decision can never differ between ranks.
            if self._nonfinite_ranks(norm):
                opt.zero_grad(set_to_none=True)
                self._skip_step(f"non-finite gradient norm ({float(norm):g})")
                return False
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with engine.full_parameters(self.acc, plain):
                ema.step(plain.parameters())
        self._bad_run = 0
        return True

    def _nonfinite_ranks(self, value: torch.Tensor) -> list[int]:
        """The ranks whose `value` holds a NaN or Inf; the same list on every rank (a collective when
        there are several processes)."""
        bad = (~torch.isfinite(value.detach())).any()
        if self.world == 1:
            return [0] if bool(bad) else []
        flags = torch.zeros(self.world, dtype=torch.float32, device=self.acc.device)
        flags[self.rank] = bad.to(flags.device, flags.dtype)
        return torch.nonzero(all_reduce_sum(flags)).flatten().tolist()

    def _skip_step(self, what: str) -> None:
        """Count a skipped step, warn, and stop after max_nonfinite_steps of them in a row (on every
        rank at the same step, since the decision is shared). Nothing is saved on the way out."""
        n = self.step + 1  # the step number the log lines and history rows use
        self._step_skipped = True
        self.nonfinite_skipped += 1
        if self._bad_run == 0:
            self._bad_first = n
        self._bad_run += 1
        self.log(
            f"warning: step {n}/{self.max_steps}: {what}; step skipped, no update "
            f"({self._bad_run} in a row, {self.nonfinite_skipped} in all)"
        )
        if self._bad_run >= self.max_nonfinite_steps:
            kept = (
                f"last good checkpoint: {self.state_path} (step {self._saved_step})"
                if self._saved_step is not None
                else f"no {self.stage} checkpoint was written before them"
            )
            steps = f"steps {self._bad_first}-{n}" if self._bad_first != n else f"step {n}"
            raise UserError(
                f"{self.stage}: {self._bad_run} non-finite step{'s' if self._bad_run > 1 else ''} "
                f"in a row ({steps}); stopped without saving, {kept}"
            )

    def optimizer_state(self, opt):
        """Optimizer state for the single-file state; under DeepSpeed it lives in the engine's checkpoint."""
        return None if engine.is_deepspeed(self.acc) else opt.state_dict()

    def load_optimizer_state(self, opt, state) -> None:
        if state is not None and not engine.is_deepspeed(self.acc):
            opt.load_state_dict(state)

    def finish(self) -> None:
        """After the last step, on every rank (collectives allowed)."""

    def baseline(self) -> dict | None:
        """Metrics of the starting weights, or None. Where given, a fresh run exports them as "best" at
        step 0, so a run whose every step is worse than where it started keeps its start as its best."""
        return None

    # -- machinery -----------------------------------------------------------------------------
    @property
    def rank(self):
        return self.acc.process_index

    @property
    def world(self):
        return self.acc.num_processes

    def step_generator(self, step: int, *tag):
        return generator(self.seed, self.stage, step, *tag)

    def try_resume(self) -> bool:
        if not self.state_path.is_file():
            return False
        try:  # weights only: a state from a folder someone else shared or changed can run no code
            state = self.unwrap_state(read.torch_load(self.state_path, "resume state", mmap=False))
        except Exception as e:
            why = (
                e
                if isinstance(e, UserError)
                else f"{self.state_path}: resume state unreadable ({type(e).__name__})"
            )
            raise UserError(f"{why}; delete it to restart {self.stage}") from None
        if (
            not isinstance(state, dict)
            or state.get("format") != STATE_FORMAT
            or state.get("stage") != self.stage
        ):
            raise UserError(f"{self.state_path}: not a {self.stage} resume state")
        old, mine = state["fingerprint"], atomic.plain(self.fingerprint)  # mine as saved: paths as str, ...
        changed = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
        if changed:
            raise UserError(
                f"{self.state_path}: the config changed since this state was written "
                f"({', '.join(changed)}); use a new experiment.save_path or restore the config"
            )
        self.load_model_state(state["model"])
        if engine.is_deepspeed(self.acc):
            folder = self.engine_state_path
            if not folder.is_dir():
                raise UserError(
                    f"{folder}: DeepSpeed state missing beside {self.state_path}; delete both to restart"
                )
            read.check_torch_files(
                folder, "DeepSpeed state", f"; delete it and {self.state_path.name} to restart"
            )
            engine.load_engine_state(self.acc, folder)
        self.step, self.best, self.history = state["step"], state["best"], state["history"]
        # the saved sums are totals over ranks: rank 0 carries them, the others restart from zero
        sums = state["log_sums"] if self.rank == 0 else {k: 0.0 for k in state["log_sums"]}
        self._sums, self._count, self._last_train = dict(sums), state["log_count"], state["last_train"]
        # states written before non-finite steps were counted have none of these keys
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self._bad_run, self._bad_first = (int(x) for x in state.get("nonfinite_run", (0, 0)))
        self._checkpoint_due = bool(state.get("checkpoint_due", False))
        self._saved_step = self.step
        what = f"{self.phase_label}, " if self.phase_label else ""
        self.log(f"RESUMED {what}from {self.state_path} at step {self.step}/{self.max_steps}")
        return True

    @property
    def engine_state_path(self) -> Path:
        return self.state_path.with_name(self.state_path.stem + ".deepspeed")

    def save_state(self) -> None:
        # Built on every rank: under ZeRO-3 reading the weights is a collective. The partial log
        # window's sums are reduced too, so a resume continues the same averages at any world size.
        keys = sorted(self._sums)
        totals = (
            all_reduce_sum(
                torch.tensor([self._sums[k] for k in keys], dtype=torch.float64, device=self.acc.device)
            ).tolist()
            if keys
            else []
        )
        blob = self.wrap_state(
            {
                "format": STATE_FORMAT,
                "stage": self.stage,
                "step": self.step,
                "best": self.best,
                "history": self.history,
                "fingerprint": self.fingerprint,
                "complete": self.step >= self.max_steps,
                "log_sums": dict(zip(keys, totals)),
                "log_count": self._count,
                "last_train": self._last_train,
                "nonfinite_skipped": self.nonfinite_skipped,
                "nonfinite_run": [self._bad_run, self._bad_first],
                "checkpoint_due": self._checkpoint_due,
                "model": self.model_state(),
            }
        )
        if engine.is_deepspeed(self.acc):
            # optimizer partitions: DeepSpeed's own per-rank checkpoint, written before the state that names it
            engine.save_engine_state(self.acc, self.engine_state_path)
        if self.acc.is_main_process:
            atomic.save_torch(atomic.plain(blob), self.state_path)  # read back with weights_only=True
        barrier()
        self._saved_step = self.step

    def wrap_state(self, state: dict) -> dict:
        """What goes into the state file (a subclass may embed the state in a richer file)."""
        return state

    def unwrap_state(self, blob: dict) -> dict:
        return blob

    def fit(self) -> dict:
        """Train to max_steps (resuming if a state exists); returns the best metric record."""
        if not self.try_resume() and self.best["step"] < 0:
            self._baseline()
        if self.step >= self.max_steps:
            self.log(f"already complete ({self.step} steps); nothing to do")
            self.finish()
            return self.best
        start, t_last = self.step, time.time()
        progress = bar(self.acc, self.max_steps, self.stage, "step", initial=self.step)
        try:
            self._run_steps(start, t_last, progress)
        finally:
            progress.close()
        if self.step >= self.max_steps:
            self.finish()
        return self.best

    def _run_steps(self, start: int, t_last: float, progress) -> None:
        while self.step < self.max_steps:
            faults.step(self.stage, self.step, self.state_path)
            if self.stop_after is not None and self.step - start >= self.stop_after:
                self.save_state()
                self.log(f"stopped at step {self.step} as asked; resume state in {self.state_path}")
                return
            if preempt.should_stop(self.acc.device):
                self.save_state()
                self.log(f"preempted at step {self.step}; resume state in {self.state_path}")
                preempt.stop(self.acc, f"{self.stage} at step {self.step}")
            # Dropout and anything else drawing from the global RNG: seeded per step and rank.
            torch.manual_seed(derive_seed(self.seed, self.stage, "global", self.step, self.rank))
            logs = self.train_step(self.step)
            self.step += 1
            progress.update(1)
            if self._step_skipped:  # a skipped step's losses stay out of the averages (alike on every rank)
                self._step_skipped = False
            else:
                for k, v in logs.items():
                    self._sums[k] = self._sums.get(k, 0.0) + float(v)
                self._count += 1
            if self.step % self.log_interval == 0 or self.step == self.max_steps:
                if self._count:
                    keys = sorted(self._sums)
                    red = all_reduce_sum(
                        torch.tensor(
                            [self._sums[k] for k in keys], dtype=torch.float64, device=self.acc.device
                        )
                    ) / (self._count * self.world)
                    rate = self._count / max(1e-9, time.time() - t_last)
                    self._last_train = dict(zip(keys, red.tolist()))
                    self.log(
                        f"step {self.step}/{self.max_steps} "
                        + " ".join(f"{k}={v:.4g}" for k, v in self._last_train.items())
                        + f" ({rate:.2f} it/s)"
                    )
                else:
                    self._last_train = {}
                    self.log(
                        f"step {self.step}/{self.max_steps}: every step since the last status line was skipped"
                    )
                self._sums, self._count, t_last = {}, 0, time.time()
            if self.step % self.eval_interval == 0 or self.step == self.max_steps:
                self._checkpoint_due = True
            # During a run of skipped steps a checkpoint waits for the next applied step, so the files
            # on disk stay those written before the run began (at the last step it is written anyway:
            # the weights are still those of the last applied update).
            if self._checkpoint_due and (self._bad_run == 0 or self.step == self.max_steps):
                self._checkpoint_due = False
                self._checkpoint()

    def _baseline(self) -> None:
        metrics = self.baseline()
        if metrics is None:
            return
        self.best = {"value": float(metrics[self.metric]), "step": 0}
        self.export("best", {"step": 0, **metrics})
        self.log("start point: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + " (best so far)")

    def _checkpoint(self) -> None:
        metrics = self.evaluate()
        row = {
            "step": self.step,
            **{f"train_{k}": v for k, v in self._last_train.items()},
            **metrics,
            "nonfinite_skipped": self.nonfinite_skipped,
        }
        self.history.append(row)
        value, best = float(metrics[self.metric]), float(self.best["value"])
        # NaN is never better than a number, but the first validation always exports a "best", so a
        # later phase that loads it finds one
        improved = self.best["step"] < 0 or (not math.isnan(value) and (math.isnan(best) or value < best))
        if improved:
            self.best = {"value": value, "step": self.step}
            self.export("best", row)
        self.export("latest", row)
        if self.acc.is_main_process:
            atomic.write_csv(self.history, self.history_path, self.history_fields)
        self.acc.log(
            {f"{self.stage}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
            step=tracker_step(getattr(self, "cfg", None), self.stage, self.step),
        )  # one step for the run
        self.log(
            f"eval at step {self.step}: "
            + " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            + (" (best)" if improved else "")
        )
        self.save_state()
