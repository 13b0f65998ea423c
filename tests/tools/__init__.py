"""Scripts the tests run in their own processes (and import): not tests themselves.

launch_probe.py   runs an advdiff module recording the files each process writes and/or the dtypes
                  forward passes compute in
slurm_cluster.py  brings up a real one-node SLURM cluster for tests/e2e/test_slurm.py
"""
