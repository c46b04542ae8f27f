"""End to end under a real single-node SLURM that this module starts and tears down.

The fixture writes a localhost slurm.conf into a temporary folder (8 CPUs declared, so two
3-rank tasks fit on a 2-core box; PMI2; linuxproc process tracking, no cgroups), starts a
private munged, slurmctld and slurmd on free ports, and waits for the node to be idle. The
test submits configs/sweeps/small.yaml (6 runs) as one job array of 3-rank srun steps,
requeues one task in the middle of its run (`scontrol requeue`), preempts another with
SIGUSR1 (the run checkpoints, exits 75 and the job script requeues it), waits until every
run is complete, then checks the resumes, the re-submission, the report and the figures.

Skipped, with the reason, only where SLURM is not installed (jobs/install-slurm.sh installs
it) or the test does not run as root (slurmd must be root to start jobs).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fdcr_mpi.sweep import load_sweep, stored_state

pytestmark = [pytest.mark.slow, pytest.mark.mpi]

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "configs" / "sweeps" / "small.yaml"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
NODE = "fdcrnode"
CRED_EXPIRE = 15  # seconds a requeued job waits before it may start again (SLURM's default: 120)
# Job ids start at a random number: MPICH names its shared-memory segment after the PMI job
# (SLURM's job.step), and a segment left in /dev/shm by a killed step of an earlier test
# cluster with the same job id makes MPI_Init of the new step hang.


def find(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin", "/usr/local/bin"):
        if os.access(Path(folder) / name, os.X_OK):
            return str(Path(folder) / name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5,
             diagnose: Callable[[], str] = lambda: "") -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")


SLURM_CONF = """\
ClusterName=fdcrtest
FirstJobId={first_job_id}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/socket,cred_expire={cred_expire}
MpiDefault=pmi2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=20
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} CPUs=8 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """A private one-node SLURM: munged, slurmctld and slurmd under ``root``, on free ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.conf = root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_", "FDCR_SWEEP"))}
        self.env.update(SLURM_CONF=str(self.conf), OMP_NUM_THREADS="1")

    def tool(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([find(args[0]) or args[0], *args[1:]], capture_output=True, text=True,
                                timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}\n{self.logs()}")
        return result

    def _daemon(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.stderr", "wb")  # noqa: SIM115 - the daemon owns it
        proc = subprocess.Popen([find(name), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge = self.root / "munge"
        self._daemon("munged", "-F", "-f", f"--socket={munge}/socket", f"--key-file={key}",
                     f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed")
        wait_for("munged's socket", lambda: (munge / "socket").exists(), 30, diagnose=self.logs)
        self.conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], dir=self.root, node=NODE,
                                               ctld_port=free_port(), d_port=free_port(), cred_expire=CRED_EXPIRE,
                                               first_job_id=random.randrange(10_000, 60_000_000)))
        self._daemon("slurmctld", "-D", "-i", "-f", str(self.conf))
        time.sleep(1)
        self._daemon("slurmd", "-D", "-N", NODE, "-f", str(self.conf))
        wait_for("the node to be idle", self.idle, 90, interval=1, diagnose=self.logs)

    def idle(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args[0]} exited with {proc.returncode}\n{self.logs()}")
        result = self.tool("sinfo", "-h", "-o", "%T", check=False, timeout=20)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)

    def stop(self) -> None:
        queued = self.tool("squeue", "-h", "-o", "%A", check=False, timeout=20).stdout.split()
        for job in set(queued):
            self.tool("scancel", job, check=False, timeout=20)
        if queued:
            time.sleep(3)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def slurm() -> Iterator[Cluster]:
    missing = [name for name in BINARIES if find(name) is None]
    if missing:
        pytest.skip(f"SLURM/MUNGE is not installed (no {', '.join(missing)}); bash jobs/install-slurm.sh "
                    "installs it as root with apt-get")
    if os.geteuid() != 0:
        pytest.skip("the private SLURM cluster needs root (slurmd starts the jobs)")
    root = Path(tempfile.mkdtemp(prefix="fdcr-slurm-", dir="/tmp"))  # short: munge's socket path is limited
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def fdcr(cluster: Cluster, *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "fdcr_mpi", *args], capture_output=True, text=True,
                            timeout=timeout, env=cluster.env, cwd=cwd)
    assert result.returncode == 0, f"fdcr-mpi {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def rounds_done(out: Path) -> int:
    from fdcr_mpi.store import read_rounds

    try:
        return len(read_rounds(out / "run.h5").get("round", []))
    except Exception:  # noqa: BLE001 - a live file may be mid-write: try again later
        return 0


def tasks(cluster: Cluster, job: str) -> dict[int, tuple[str, str]]:
    """Array index -> (SLURM state, job id of the task) for the tasks squeue still knows."""
    out = cluster.tool("squeue", "-h", "-r", "-j", job, "-o", "%K %T %A", check=False, timeout=20).stdout
    rows = (line.split() for line in out.splitlines() if line.strip())
    return {int(i): (state, job_id) for i, state, job_id in rows if i.isdigit()}


def pick_running(cluster: Cluster, job: str, sweep, total: int, exclude: set[int]) -> tuple[int, str] | None:
    """(index, job id) of a task that is running with at least one round done and three to go."""
    for index, (state, job_id) in tasks(cluster, job).items():
        out = sweep.runs[index].out
        if state == "RUNNING" and index not in exclude and stored_state(out)[0] == "running" \
                and 1 <= rounds_done(out) <= total - 3:
            return index, job_id
    return None


def test_a_sweep_array_under_slurm_survives_a_requeue_and_a_preemption(slurm: Cluster, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    submitted = fdcr(slurm, "sweep", "slurm", str(SMALL), "--out-root", str(root), "--ranks", "3",
                     "--throttle", "3", "--time", "00:15:00", "--signal-seconds", "30", "--submit")
    job = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    sweep = load_sweep(SMALL, root)
    total = int(sweep.spec.overrides["rounds"])
    script = (root / "slurm" / "small.sbatch").read_text()
    assert "#SBATCH --array=0-5%3" in script and "srun --mpi=pmi2" in script and "#SBATCH --ntasks=3" in script

    def diagnose() -> str:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((root / "slurm").glob("*.out")))
        return f"squeue: {tasks(slurm, job)}\n{logs}\n{slurm.logs()}"

    # Preempt one task (SIGUSR1 to its ranks, as before a time limit), and requeue another.
    preempted, job_id = wait_for("a task in the middle of its run",
                                 lambda: pick_running(slurm, job, sweep, total, set()), 300, interval=0.2,
                                 diagnose=diagnose)
    slurm.tool("scancel", "--signal=USR1", f"{job_id}.0")  # to the srun step (the array task is refused)
    requeued, job_id = wait_for("a second task in the middle of its run",
                                lambda: pick_running(slurm, job, sweep, total, {preempted}), 300, interval=0.2,
                                diagnose=diagnose)
    slurm.tool("scontrol", "requeue", job_id)

    def finished() -> bool:
        complete = all(stored_state(r.out)[0] == "complete" for r in sweep.runs)
        return complete and not tasks(slurm, job)

    wait_for("every run of the array to complete", finished, 600, interval=2, diagnose=diagnose)

    for index, how in ((requeued, "requeue"), (preempted, "SIGUSR1")):
        log = (root / "slurm" / f"{job}_{index}.out").read_text()
        assert "restart 1" in log, f"task {index} ({how}) was not restarted:\n{log}"
        assert re.search(r"resuming at round [2-9]", log), f"task {index} ({how}) did not resume:\n{log}"
        assert "MPI, 3 ranks" in log
    preempted_log = (root / "slurm" / f"{job}_{preempted}.out").read_text()
    assert f"=== run {preempted} exited 75" in preempted_log  # checkpointed, then requeued by the script
    for run in sweep.runs:
        assert rounds_done(run.out) == total

    again = fdcr(slurm, "sweep", "slurm", str(SMALL), "--out-root", str(root), "--submit")
    assert "nothing to submit" in again.stdout and "submitted" not in again.stdout

    fdcr(slurm, "report", str(root), "--out", str(tmp_path / "report"))
    table = (tmp_path / "report" / "table4.md").read_text()
    assert all(name in table for name in ("| Vanilla |", "| FDCR |", "| Multi-Krum |"))
    assert "6 runs, 2 seeds per cell" in table
    fdcr(slurm, "plot", str(root), "--out", str(tmp_path / "figures"))
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert any(n.startswith("fig3_") for n in figures) and any(n.startswith("fig2_fdcr") for n in figures)
    assert all((tmp_path / "figures" / n).stat().st_size > 20_000 for n in figures)


def test_the_single_run_job_script_runs_and_resumes(slurm: Cluster, tmp_path: Path) -> None:
    env = {"CONFIG": str(REPO / "configs" / "quickstart.yaml"), "OUT": str(tmp_path / "run"),
           "FDCR": str(Path(sys.executable).parent / "fdcr-mpi")}
    slurm.env.update(env)
    try:
        args = ("--ntasks=2", "--cpus-per-task=1", f"--output={tmp_path}/single-%j.out", f"--chdir={REPO}",
                str(REPO / "jobs" / "single.sbatch"), "rounds=2", "train.local_epochs=1", "fisher.max_samples=32")
        job = slurm.tool("sbatch", "--parsable", *args).stdout.strip()
        log = tmp_path / f"single-{job}.out"
        wait_for("the single run to finish", lambda: log.exists() and "=== exited" in log.read_text(), 300,
                 interval=1, diagnose=lambda: (log.read_text() if log.exists() else "no log") + slurm.logs())
        assert "=== exited 0" in log.read_text() and "MPI, 2 ranks" in log.read_text()
        assert stored_state(tmp_path / "run")[0] == "complete"
        job = slurm.tool("sbatch", "--parsable", *args).stdout.strip()  # the same command again: nothing to redo
        log = tmp_path / f"single-{job}.out"
        wait_for("the second submission to finish", lambda: log.exists() and "=== exited" in log.read_text(), 300,
                 interval=1, diagnose=lambda: log.read_text() if log.exists() else "no log")
        assert "already complete" in log.read_text() and "=== exited 0" in log.read_text()
    finally:
        for key in env:
            slurm.env.pop(key, None)
