"""Distribution: the Accelerator, the few places DeepSpeed differs from DDP, collectives (index
sharding, gathers, rank agreement), graceful preemption and the SLURM launcher."""
