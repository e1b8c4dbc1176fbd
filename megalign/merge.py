"""Entry point: `python -m megalign.merge --output-prefix PREFIX` (tools/merge_data.py's command line; run by
launch/slurm/merge.sbatch after the job array of a sharded preprocessing run)."""

from megalign.data.cli import merge_main

if __name__ == "__main__":
    merge_main()
