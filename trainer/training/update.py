"""The update a training step ends with (StepTrainer.apply_update): backward, clipping, the optimizer and LR
schedule steps and the EMA, guarded against non-finite values.

Non-finite steps: `apply_update` skips a step whose loss (on any rank) or gradient norm is NaN/Inf, on
every rank alike, counts it (`nonfinite_skipped`: resume state and history column) and stops the run with
a UserError after `training.max_nonfinite_steps` skipped steps in a row, leaving the checkpoint files from
before them untouched. Tests inject NaN losses through trainer.core.faults (ADVDIFF_INJECT_NAN).
"""

from __future__ import annotations

import torch

from trainer.core import faults
from trainer.core.errors import UserError
from trainer.parallel import engine
from trainer.parallel.collectives import all_reduce_sum


def grad_norm(parameters) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients (what clip_grad_norm_ returns), without clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))


class GuardedUpdate:
    """Mixed into StepTrainer, which holds the counters (its resume state saves them): nonfinite_skipped,
    max_nonfinite_steps, _bad_run / _bad_first (the current run of skips), _step_skipped, _saved_step."""

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
            with engine.grad_sync(self.accelerator, wrapped, i == len(micro) - 1):
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
                self.accelerator.backward(part)
        deepspeed = engine.is_deepspeed(self.accelerator)
        norm = None
        if max_grad_norm > 0 and not deepspeed:
            norm = self.accelerator.clip_grad_norm_(wrapped.parameters(), max_grad_norm)
        if not deepspeed and getattr(self.accelerator, "scaler", None) is None:
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
            with engine.full_parameters(self.accelerator, plain):
                ema.step(plain.parameters())
        self._bad_run = 0
        return True

    def _nonfinite_ranks(self, value: torch.Tensor) -> list[int]:
        """The ranks whose `value` holds a NaN or Inf; the same list on every rank (a collective when
        there are several processes)."""
        bad = (~torch.isfinite(value.detach())).any()
        if self.world == 1:
            return [0] if bool(bad) else []
        flags = torch.zeros(self.world, dtype=torch.float32, device=self.accelerator.device)
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
