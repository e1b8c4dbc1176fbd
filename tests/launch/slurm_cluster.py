"""A real Slurm cluster on this machine, for the launch tests: munge, slurmctld and two slurmd "nodes" (n1, n2)
on loopback, in the foreground as children of the test process, with a fresh state directory each time
(Debian's packages; see ../shared/notes/slurm-local-cluster.md).

    with LocalSlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch(["launch/slurm/train.sbatch", "--config", "x.yaml"], nodes=2)
        cluster.wait(job)

Every command run through the cluster carries SLURM_CONF, and so does every process Slurm starts: `stop` finds
leftovers by that and kills them, so nothing outlives the fixture.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
NODES = ("n1", "n2")
CPUS_PER_NODE = 4
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def missing() -> str | None:
    """Why a local cluster cannot start here, or None."""
    lost = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if lost:
        return (f"Slurm is not installed ({', '.join(lost)} not found): "
                "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)")
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root (SlurmdUser=root); run the tests as root"
    return None


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []

    # -- life cycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        os.chmod(r / "munge", 0o700)
        socket_path = r / "munge" / "munge.sock"
        self._daemon(["munged", "-F", "-f", f"--key-file={key}", f"--socket={socket_path}",
                      f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                      f"--seed-file={r / 'munge' / 'munge.seed'}"], "munged")
        _wait_for(socket_path.exists, 10, "munged's socket")
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} State=UNKNOWN"
            for n, port in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=megalign-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=5
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd-%n.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=600
KillWait=5
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        self._daemon(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
        for n in NODES:
            self._daemon(["slurmd", "-D", "-f", str(self.conf), "-N", n], f"slurmd-{n}")
        _wait_for(self._nodes_idle, 30, "both nodes idle in sinfo")

    def _daemon(self, argv: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.daemons.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL))

    def _nodes_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], env=self.env, capture_output=True,
                           text=True)
        return r.returncode == 0 and set(r.stdout.split()) >= set(NODES)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then kill whatever still carries this cluster's SLURM_CONF."""
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        for p in reversed(self.daemons):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.daemons:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def processes(self, **env) -> list[int]:
        """Pids of live processes started under this cluster whose environment also has every `env` item."""
        want = {f"SLURM_CONF={self.conf}".encode(), *(f"{k}={v}".encode() for k, v in env.items())}
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if want <= set((entry / "environ").read_bytes().split(b"\0")):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    # -- jobs --------------------------------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env={**self.env, **kwargs.pop("env", {})}, capture_output=True, text=True,
                              check=check, **kwargs)

    def job_state(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        fields = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_id: str, timeout: float = 180, restarts: int = 0) -> dict:
        """Block until the job is in a terminal state after at least `restarts` requeues; its scontrol fields."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state.get("JobState") in TERMINAL and int(state.get("Restarts", 0)) >= restarts:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state.get('JobState')} after {timeout:.0f} s: {state}")
            time.sleep(0.5)


def _wait_for(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the local Slurm cluster did not start: no {what} after {timeout:.0f} s")
        time.sleep(0.2)
