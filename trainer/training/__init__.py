"""The step loop every trainer runs (logging, evaluation, exports, exact resume, non-finite
guard), with optimizers and LR schedules, the EMA and the losses."""
