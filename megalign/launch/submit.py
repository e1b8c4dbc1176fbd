"""megalign-submit: check a job against the allocation it asks for, write the exact sbatch script into the run
directory, and submit it (or, with --dry-run, print it).

  megalign-submit train --cluster a800-ib --nodes 2 --config FILE.yaml [key=value ...]
  megalign-submit train ... --preprocess "--input long.jsonl --tokenizer tok/ --chat-template llama2 --seq-length 65536"
  megalign-submit preprocess --cluster a800-ib -- --input ... --output-prefix data/x
  megalign-submit preprocess --cluster a800-ib --shards 8 -- --input ... --output-prefix data/x
  megalign-submit eval --cluster a800-ib [--gpus N] -- --model RUN/checkpoints --tasks needle --out RUN/eval
  megalign-submit train ... --eval "--tasks needle,longbench --longbench-dir LongBench/LongBench --all-checkpoints"

The script is launch/slurm/{train,preprocess,merge,eval}.sbatch's body behind a header of #SBATCH lines and exports from
the cluster profile (megalign/launch/profiles.py); `sbatch` of the written file resubmits the same job.
With --preprocess, the preprocessing job is queued first and training waits for it (--dependency=afterok); its
--output-prefix is the config's data.path. With --shards N (--preprocess-shards N), preprocessing is a job array
of N tasks, one shard each (--shard slurm), and a merge job (launch/slurm/merge.sbatch) queued afterok the whole
array joins them into the dataset. With --eval, an evaluation job is queued after training (afterok),
its --model the run's checkpoint directory and its --out RUN_DIR/eval unless given. The job ids are printed, one
line each, last.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megalign.cli import Parser
from megalign.errors import MegalignError, OptionError
from megalign.launch.profiles import ClusterProfile, load_profile

SCRIPTS = Path(__file__).resolve().parents[2] / "launch" / "slurm"
BODY_MARK = "# ---- body"


@dataclass(frozen=True)
class Job:
    kind: str  # train | preprocess | merge | eval
    script: str  # the sbatch script's text
    path: Path  # where it is written
    sbatch_args: list[str]  # options for sbatch itself (the dependency on another job)


def script_body(kind: str) -> str:
    text = (SCRIPTS / f"{kind}.sbatch").read_text(encoding="utf-8")
    if BODY_MARK not in text:
        raise MegalignError(f"{SCRIPTS / f'{kind}.sbatch'} has no '{BODY_MARK}' line: it is not megalign's script")
    return text.split(BODY_MARK + "\n", 1)[1]


def _export(name: str, value: str) -> str:
    """export NAME="value", where the value may use $VARIABLES (expanded on the node) but nothing else."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return f'export {name}="{escaped}"'


def _header(profile: ClusterProfile, sbatch: dict[str, str | None], extra: list[str], exports: dict[str, str],
            note: str) -> list[str]:
    lines = ["#!/bin/bash", f"# {note}"]
    lines += [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={v}" for k, v in sbatch.items()]
    lines += [f"#SBATCH {option}" for option in [*profile.sbatch, *extra]]
    lines += [_export(k, v) for k, v in exports.items()]
    return lines


def _common_sbatch(profile: ClusterProfile, args) -> dict[str, str | None]:
    options = {"partition": args.partition or profile.partition, "account": args.account or profile.account,
               "qos": args.qos or profile.qos}
    return {k: v for k, v in options.items() if v}


def _python(profile: ClusterProfile) -> str:
    if profile.python:
        return profile.python
    return "python3" if profile.container.image else sys.executable


def _job_exports(profile: ClusterProfile) -> dict[str, str]:
    exports = {"MEGALIGN_PYTHON": _python(profile)}
    if profile.container.image:
        exports["MEGALIGN_CONTAINER_IMAGE"] = profile.container.image
        if profile.container.mounts:
            exports["MEGALIGN_CONTAINER_MOUNTS"] = ",".join(profile.container.mounts)
    return exports


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def train_job(profile: ClusterProfile, args, cfg, after_preprocess: "PreprocessPlan | None" = None) -> Job:
    """Validate the training run (`cfg`: the config with the profile's and the user's overrides) for nodes x
    ranks-per-node and write its script (in memory)."""
    from megalign.config import validate, validate_writable

    ranks_per_node = _ranks_per_node(profile, args)
    world = args.nodes * ranks_per_node
    if after_preprocess is None:
        validate(cfg, world)
    else:  # the data does not exist yet: everything else now, and the data against what will be written
        validate(cfg, world, with_data=False)
        _check_prefix_matches(cfg, after_preprocess)
        validate_writable("run.output_dir", cfg.run.output_dir)
    run_dir = Path(cfg.run.output_dir).resolve()
    cpus = max(1, profile.cpus_per_node // ranks_per_node)
    sbatch = {"job-name": args.job_name or f"megalign-{run_dir.name}", "nodes": str(args.nodes),
              "ntasks-per-node": str(ranks_per_node), "cpus-per-task": str(cpus)}
    if profile.gpus_per_node:
        sbatch["gpus-per-node"] = str(ranks_per_node)
    sbatch.update({"time": args.time or profile.time, **_common_sbatch(profile, args),
                   "signal": f"USR1@{args.signal_lead if args.signal_lead is not None else profile.signal_lead_s}",
                   "requeue": None, "open-mode": "append", "output": str(run_dir / "logs" / "slurm-%j.out"),
                   "chdir": str(Path.cwd())})
    if profile.exclusive:
        sbatch["exclusive"] = None
    exports = {**_job_exports(profile), "MEGALIGN_RUN_DIR": str(run_dir),
               "MEGALIGN_MAX_RESTARTS": str(args.max_restarts if args.max_restarts is not None
                                            else profile.max_restarts),
               "MEGALIGN_MAX_STALLED": str(profile.max_stalled), **profile.env}
    config = str(Path(args.config).resolve()) if args.config else None
    train_args = (["--config", config] if config else []) + [*profile.overrides, *args.overrides]
    note = (f"written by megalign-submit for cluster {profile.name}: {args.nodes} nodes x {ranks_per_node} ranks "
            f"(tp {cfg.parallel.tp}, pp {cfg.parallel.pp}, cp {cfg.parallel.cp}, "
            f"dp {world // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)}); `sbatch` this file to resubmit")
    lines = _header(profile, sbatch, args.sbatch, exports, note)
    lines.append("set -- " + " ".join(shlex.quote(a) for a in train_args))
    path = run_dir / "slurm" / f"train-{_stamp()}.sbatch"
    return Job("train", "\n".join(lines) + "\n" + script_body("train"), path, [])


def _ranks_per_node(profile: ClusterProfile, args) -> int:
    if profile.gpus_per_node:
        if args.tasks_per_node is not None:
            raise OptionError("tasks_per_node", f"is for CPU-only clusters; {profile.name} has GPUs: use "
                                                "--gpus-per-node (one rank per GPU)")
        gpus = args.gpus_per_node or profile.gpus_per_node
        if gpus > profile.gpus_per_node:
            raise OptionError("gpus_per_node", f"{gpus} is more than the {profile.gpus_per_node} GPUs a node of "
                                               f"{profile.name} has")
        return gpus
    if args.gpus_per_node:
        raise OptionError("gpus_per_node", f"{profile.name} is a CPU-only cluster profile (gpus_per_node: 0); give "
                                           "--tasks-per-node (processes per node)")
    return args.tasks_per_node or 1


@dataclass(frozen=True)
class PreprocessPlan:
    argv: list[str]  # what each preprocessing task runs (with --shard slurm when sharded)
    output_prefix: str
    seq_length: int
    shards: int | None = None  # a job array of this many shards, then a merge job
    overwrite: bool = False


def plan_preprocess(argv: list[str], default_prefix: str | None = None, shards: int | None = None) -> PreprocessPlan:
    """Parse and check preprocess_data.py's arguments now (inputs, tokenizer path, options), not in the queue.
    With `shards`, every shard's options (and that none of their parts, nor the dataset, exists unless
    --overwrite)."""
    import dataclasses

    from megalign.data.cli import preprocess_options, preprocess_parser
    from megalign.data.preprocess import check_dataset_free

    argv = list(argv)
    if default_prefix is not None and "--output-prefix" not in argv:
        argv += ["--output-prefix", default_prefix]
    if shards is not None and any(a == "--shard" or a.startswith("--shard=") for a in argv):
        raise MegalignError("--preprocess: --shard is set per array task from --shards N (--shard slurm); leave it "
                            "out of the preprocessing arguments")
    parser = preprocess_parser()
    opts = preprocess_options(parser.parse_args(argv))
    opts = dataclasses.replace(opts, workers=1)  # the job's CPUs decide --workers, not this machine's
    try:
        for shard in [None] if shards is None else [(i, shards) for i in range(shards)]:
            dataclasses.replace(opts, shard=shard).validate()
        if shards is not None:  # the merge writes the dataset
            check_dataset_free(opts.output_prefix, opts.overwrite)
    except OptionError as e:
        raise MegalignError("--preprocess: " + e.render(parser.flag)) from None
    if not Path(opts.tokenizer).exists():
        raise MegalignError(f"--preprocess: --tokenizer {opts.tokenizer}: no such file or directory")
    if shards is not None:
        argv += ["--shard", "slurm"]
    return PreprocessPlan(argv, opts.output_prefix, opts.seq_length, shards, opts.overwrite)


def _check_prefix_matches(cfg, plan: PreprocessPlan) -> None:
    if not isinstance(cfg.data.path, str):
        raise MegalignError("--preprocess makes one dataset; config key data.path is a list: preprocess each and "
                            "submit training with --after JOBID")
    if Path(cfg.data.path).resolve() != Path(plan.output_prefix).resolve():
        raise MegalignError(f"--preprocess writes --output-prefix {plan.output_prefix} but config key data.path is "
                            f"{cfg.data.path}: training would not read it; make them the same")
    if plan.seq_length > cfg.model.max_position_embeddings:
        raise MegalignError(f"--preprocess --seq-length {plan.seq_length} is longer than config key "
                            f"model.max_position_embeddings={cfg.model.max_position_embeddings}: training would "
                            f"refuse the packs; use --seq-length <= {cfg.model.max_position_embeddings}")


def preprocess_jobs(profile: ClusterProfile, args, plan: PreprocessPlan, log_dir: Path) -> list[Job]:
    """The preprocessing job; sharded, the job array and the merge job after it."""
    name = Path(plan.output_prefix).name
    time_limit = getattr(args, "preprocess_time", None) or args.time or profile.time
    sbatch = {"job-name": f"megalign-prep-{name}", "nodes": "1", "ntasks": "1",
              "cpus-per-task": str(args.cpus or profile.cpus_per_node)}
    if plan.shards is not None:
        sbatch["array"] = f"0-{plan.shards - 1}"
    sbatch.update({"time": time_limit, **_common_sbatch(profile, args), "open-mode": "append",
                   # %A_%a: one log per array task
                   "output": str(log_dir / ("preprocess-%A_%a.out" if plan.shards else "preprocess-%j.out")),
                   "chdir": str(Path.cwd())})
    note = f"written by megalign-submit for cluster {profile.name}; `sbatch` this file to rerun"
    lines = _header(profile, sbatch, [], _job_exports(profile), note)
    lines.append("set -- " + " ".join(shlex.quote(a) for a in plan.argv))
    stamp = _stamp()
    jobs = [Job("preprocess", "\n".join(lines) + "\n" + script_body("preprocess"),
                log_dir.parent / "slurm" / f"preprocess-{stamp}.sbatch", [])]
    if plan.shards is None:
        return jobs
    merge = {"job-name": f"megalign-merge-{name}", "nodes": "1", "ntasks": "1", "cpus-per-task": "2",
             "time": time_limit, **_common_sbatch(profile, args), "open-mode": "append",
             "output": str(log_dir / "merge-%j.out"), "chdir": str(Path.cwd())}
    lines = _header(profile, merge, [], _job_exports(profile), note)
    merge_args = ["--output-prefix", plan.output_prefix] + (["--overwrite"] if plan.overwrite else [])
    lines.append("set -- " + " ".join(shlex.quote(a) for a in merge_args))
    jobs.append(Job("merge", "\n".join(lines) + "\n" + script_body("merge"),
                    log_dir.parent / "slurm" / f"merge-{stamp}.sbatch", []))
    return jobs


@dataclass(frozen=True)
class EvalPlan:
    argv: list[str]
    out: Path
    gpus: int  # GPUs the evaluation uses: vLLM's --tensor-parallel, else 1


def plan_eval(argv: list[str], checkpoints: Path | None = None, default_out: Path | None = None) -> EvalPlan:
    """Parse and check megalign.eval's arguments now, not in the queue. With `checkpoints` (queued after training)
    --model defaults to the run's checkpoint directory, which need not exist yet."""
    from megalign.eval.__main__ import check_required, parser
    from megalign.eval.tasks import TASK_NAMES

    argv = list(argv)
    if checkpoints is not None and "--model" not in argv:
        argv += ["--model", str(checkpoints)]
    if default_out is not None and "--out" not in argv:
        argv += ["--out", str(default_out)]
    p = parser()
    args = p.parse_args(argv)
    if args.compare:
        raise MegalignError("--eval/eval: --compare needs no job; run python -m megalign.eval --compare here")
    check_required(p, args)
    unknown = [t for t in args.tasks.split(",") if t.strip() and t.strip() not in TASK_NAMES]
    if unknown:
        raise MegalignError(f"eval: --tasks {','.join(unknown)}: unknown; valid: {', '.join(TASK_NAMES)}")
    if checkpoints is None and args.backend != "openai" and not Path(args.model).exists():
        raise MegalignError(f"eval: --model {args.model}: no such directory")
    for option in ("longbench_dir", "longbench_v2_dir", "longbench_v2_data", "longalign_dir", "tokenizer"):
        value = getattr(args, option)
        if value and not Path(value).exists():
            raise MegalignError(f"eval: --{option.replace('_', '-')} {value}: no such file or directory")
    return EvalPlan(argv, Path(args.out).resolve(), args.tensor_parallel if args.backend == "vllm" else 1)


def eval_job(profile: ClusterProfile, args, plan: EvalPlan, cpus: int | None) -> Job:
    sbatch = {"job-name": f"megalign-eval-{plan.out.parent.name}-{plan.out.name}", "nodes": "1", "ntasks": "1"}
    if profile.gpus_per_node:
        gpus = args.gpus or plan.gpus
        if gpus > profile.gpus_per_node:
            raise OptionError("gpus", f"{gpus} is more than the {profile.gpus_per_node} GPUs a node of "
                                      f"{profile.name} has")
        sbatch["gpus-per-node"] = str(gpus)
        sbatch["cpus-per-task"] = str(cpus or max(1, profile.cpus_per_node * gpus // profile.gpus_per_node))
    else:
        sbatch["cpus-per-task"] = str(cpus or profile.cpus_per_node)
    sbatch.update({"time": getattr(args, "eval_time", None) or args.time or profile.time,
                   **_common_sbatch(profile, args),
                   "signal": f"B:USR1@{profile.signal_lead_s}", "requeue": None, "open-mode": "append",
                   "output": str(plan.out / "logs" / "eval-%j.out"), "chdir": str(Path.cwd())})
    exports = {**_job_exports(profile), "MEGALIGN_MAX_RESTARTS": str(profile.max_restarts), **profile.env}
    lines = _header(profile, sbatch, [], exports,
                    f"written by megalign-submit for cluster {profile.name}; `sbatch` this file to rerun")
    lines.append("set -- " + " ".join(shlex.quote(a) for a in plan.argv))
    return Job("eval", "\n".join(lines) + "\n" + script_body("eval"), plan.out / "slurm" / f"eval-{_stamp()}.sbatch",
               [])


def submit(jobs: list[Job], dry_run: bool, after: str | None = None) -> list[str]:
    """Write and sbatch each job in order, each after the one before it (afterok); their ids."""
    ids = []
    previous = after
    for job in jobs:
        dependency = [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"] if previous else []
        if dry_run:
            print(f"# {job.kind}: would write {job.path} and run: sbatch {' '.join(dependency)} {job.path}")
            print(job.script)
            previous = f"<{job.kind} job id>"
            continue
        job.path.parent.mkdir(parents=True, exist_ok=True)
        for line in job.script.splitlines():  # Slurm does not make the directory of --output itself
            if line.startswith("#SBATCH --output="):
                Path(line.split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        job.path.write_text(job.script, encoding="utf-8")
        try:
            done = subprocess.run(["sbatch", "--parsable", *dependency, str(job.path)], capture_output=True,
                                  text=True)
        except FileNotFoundError:
            raise MegalignError("sbatch is not on PATH: run megalign-submit on a Slurm login node "
                                f"(the script is written: {job.path})") from None
        if done.returncode != 0:
            raise MegalignError(f"sbatch refused {job.path}: {(done.stderr.strip() or done.stdout.strip())}",
                                retryable=True)
        job_id = done.stdout.strip().split(";")[0]
        print(f"submitted {job.kind} job {job_id}: {job.path}", file=sys.stderr)
        ids.append(job_id)
        previous = job_id
    return ids


def run_train(args) -> list[str]:
    from megalign.config import load_config

    profile = load_profile(args.cluster)
    cfg = load_config(args.config, [*profile.overrides, *args.overrides])
    jobs = []
    if args.preprocess is not None:
        prefix = cfg.data.path if isinstance(cfg.data.path, str) else None
        plan = plan_preprocess(shlex.split(args.preprocess), default_prefix=prefix, shards=args.preprocess_shards)
        train = train_job(profile, args, cfg, after_preprocess=plan)
        jobs += preprocess_jobs(profile, args, plan, train.path.parent.parent / "logs")
        jobs.append(train)
    else:
        if args.preprocess_shards is not None:
            raise OptionError("preprocess_shards", "shards the --preprocess job: give {preprocess} too",
                              mentions=("preprocess",))
        jobs.append(train_job(profile, args, cfg))
    if args.eval is not None:
        from megalign.config import checkpoint_dir

        run_dir = Path(cfg.run.output_dir).resolve()
        plan = plan_eval(shlex.split(args.eval), checkpoints=Path(checkpoint_dir(cfg)).resolve(),
                         default_out=run_dir / "eval")
        jobs.append(eval_job(profile, args, plan, cpus=None))
    return submit(jobs, args.dry_run, after=args.after)


def run_eval(args) -> list[str]:
    profile = load_profile(args.cluster)
    if args.eval_args and args.eval_args[0] == "--":
        args.eval_args = args.eval_args[1:]
    return submit([eval_job(profile, args, plan_eval(args.eval_args), cpus=args.cpus)], args.dry_run,
                  after=args.after)


def run_preprocess(args) -> list[str]:
    profile = load_profile(args.cluster)
    if args.preprocess_args and args.preprocess_args[0] == "--":
        args.preprocess_args = args.preprocess_args[1:]
    plan = plan_preprocess(args.preprocess_args, shards=args.shards)
    log_dir = Path(plan.output_prefix).resolve().parent / "logs"
    return submit(preprocess_jobs(profile, args, plan, log_dir), args.dry_run, after=args.after)


def _add_common(p) -> None:
    p.add_argument("--cluster", required=True, help="a profile name (launch/clusters/NAME.yaml, $MEGALIGN_CLUSTERS) "
                                                    "or a .yaml file")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the profile's)")
    p.add_argument("--partition", help="default: the profile's")
    p.add_argument("--account", help="default: the profile's")
    p.add_argument("--qos", help="default: the profile's")
    p.add_argument("--after", metavar="JOBID", help="start after this job has succeeded (--dependency=afterok)")
    p.add_argument("--dry-run", action="store_true", help="check and print the script(s); submit nothing")
    p.add_argument("--cpus", type=at_least(1), help="CPUs of the preprocessing job (default: the profile's "
                                                     "cpus_per_node)")


def at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in its message
    return parse


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="megalign-submit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="submit a training run (optionally after its preprocessing)")
    _add_common(t)
    t.add_argument("--nodes", type=at_least(1), required=True)
    t.add_argument("--gpus-per-node", type=at_least(1), help="ranks per node on a GPU cluster (default: all its GPUs)")
    t.add_argument("--tasks-per-node", type=at_least(1), help="ranks per node on a CPU-only cluster (default 1)")
    t.add_argument("--job-name")
    t.add_argument("--signal-lead", type=at_least(0), metavar="SECONDS",
                   help="SIGUSR1 this long before the time limit, to save (default: the profile's signal_lead_s)")
    t.add_argument("--max-restarts", type=at_least(0), help="requeues at most (default: the profile's max_restarts)")
    t.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="one more sbatch option for the training job, e.g. --sbatch=--constraint=a800 (repeatable)")
    t.add_argument("--preprocess", metavar="ARGS",
                   help="preprocess_data.py's arguments (one quoted string): queued first, training after it; "
                        "--output-prefix defaults to data.path")
    t.add_argument("--preprocess-time", help="time limit of the preprocessing job (default: --time)")
    t.add_argument("--preprocess-shards", type=at_least(1), metavar="N",
                   help="preprocess as a job array of N shards, then a merge job; training waits for the merge")
    t.add_argument("--eval", metavar="ARGS",
                   help="python -m megalign.eval's arguments (one quoted string): queued after training; --model "
                        "defaults to the run's checkpoint directory, --out to RUN_DIR/eval")
    t.add_argument("--eval-time", help="time limit of the evaluation job (default: --time)")
    t.add_argument("--gpus", type=at_least(1), help="GPUs of the evaluation job (default: vLLM's --tensor-parallel, "
                                                    "else 1)")
    t.add_argument("--config", help="the run's YAML config")
    t.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    p = sub.add_parser("preprocess", help="submit preprocessing: megalign-submit preprocess [options] -- ARGS")
    _add_common(p)
    p.add_argument("--shards", type=at_least(1), metavar="N",
                   help="a job array of N tasks, one shard of the corpus each (--shard slurm), then a merge job "
                        "(tools/merge_data.py) that writes the dataset: the same bytes as one job")
    p.add_argument("preprocess_args", nargs="...", help="preprocess_data.py's arguments, after --")
    e = sub.add_parser("eval", help="submit an evaluation: megalign-submit eval [options] -- ARGS")
    _add_common(e)
    e.add_argument("--gpus", type=at_least(1), help="GPUs (default: vLLM's --tensor-parallel, else 1)")
    e.add_argument("eval_args", nargs="...", help="python -m megalign.eval's arguments, after --")
    args = parser.parse_args(argv)
    commands = {"train": run_train, "preprocess": run_preprocess, "eval": run_eval}
    ids = parser.call(commands[args.command], args)
    if ids:
        print("\n".join(ids))


if __name__ == "__main__":
    main()
