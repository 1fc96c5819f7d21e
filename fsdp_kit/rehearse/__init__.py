"""``fsdp-kit rehearse``: a cluster job, scaled down, on a local N-node Slurm (also the tests' cluster)."""
