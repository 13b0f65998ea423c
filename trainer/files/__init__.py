"""What a run writes and where: atomic writes, the run-folder layout (every output path), CSV
rows, timings and the pictures drawn from the CSVs."""
