"""The launcher's side of the process tree and of a cluster: supervising torchrun and forwarding its
signals (supervise, stdlib only: it runs before torch is imported), Slurm jobs (slurm) and sweeps."""
