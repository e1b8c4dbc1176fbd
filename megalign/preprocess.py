"""Entry point: `python -m megalign.preprocess --input ... --output-prefix PREFIX` (tools/preprocess_data.py's
command line; launch/slurm/preprocess.sbatch runs it, as a job array with `--shard slurm`, after which
tools/merge_data.py --output-prefix PREFIX joins the shards)."""

from megalign.data.cli import preprocess_main

if __name__ == "__main__":
    preprocess_main()
