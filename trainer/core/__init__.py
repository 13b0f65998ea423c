"""Lowest layer, imports nothing else of ours: one-line user errors, derived seeds, status lines and
progress bars, and the named fault points (kill -9 and NaN injection) the crash tests use."""
