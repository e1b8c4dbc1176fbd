"""Launching megalign jobs on Slurm: cluster profiles, the submit helper, and the batch scripts' bookkeeping
(the scripts themselves are in launch/slurm/)."""
