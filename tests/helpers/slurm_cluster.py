"""A real one-node Slurm cluster for tests: Debian's slurmctld, slurmd and munge.

:func:`start_cluster` installs the packages when absent (``apt-get``, as root), writes a
munge key and a ``slurm.conf`` into a private folder, starts munged, slurmctld and slurmd,
and waits until the node is idle. :meth:`SlurmCluster.stop` stops what it started.
Anything that makes Slurm impossible here raises :class:`SlurmUnavailable` with the reason,
which the tests turn into a visible skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


class SlurmUnavailable(RuntimeError):
    pass


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and apt-get as root is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    update = _run(["apt-get", "update", "-qq"], env=env, timeout=600)
    install = _run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, timeout=900)
    if install.returncode != 0:
        raise SlurmUnavailable(
            f"apt-get install {' '.join(PACKAGES)} failed: {update.stderr[-500:]} {install.stderr[-1500:]}"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict
    processes: list[subprocess.Popen] = field(default_factory=list)
    pidfiles: list[Path] = field(default_factory=list)

    def sbatch(self, args: list[str], cwd: str | Path) -> str:
        proc = _run(["sbatch", "--parsable", *args], env=self.env, cwd=str(cwd), timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        proc = _run(["scontrol", "show", "job", job_id, "-o"], env=self.env, timeout=30)
        for token in proc.stdout.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float) -> str:
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in (
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ):
                return state
            time.sleep(1)
        _run(["scancel", job_id], env=self.env, timeout=30)
        return f"TIMEOUT_WAITING({state})"

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.is_file():
                out.append(f"--- {name}\n" + path.read_text()[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        for pidfile in self.pidfiles:
            if pidfile.is_file():
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def start_cluster(root: Path) -> SlurmCluster:
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster runs its daemons as root (SlurmUser=root)")
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)

    # munge: a private key and socket, so a system munged (if any) is left alone.
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = root / "munge" / "munge.socket"
    munge_pid = root / "munge" / "munged.pid"
    munged = _run(
        [
            "munged", "--force", f"--key-file={key}", f"--socket={socket_path}",
            f"--pid-file={munge_pid}", f"--log-file={root / 'munge' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
        ],
        timeout=30,
    )  # fmt: skip
    if munged.returncode != 0:
        raise SlurmUnavailable(f"munged did not start: {munged.stderr}")

    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=vlptest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmctldParameters=enable_configless
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = SlurmCluster(
        root, conf, env, pidfiles=[munge_pid, root / "slurmctld.pid", root / "slurmd.pid"]
    )
    for daemon in (["slurmctld", "-c"], ["slurmd"]):
        proc = _run([*daemon, "-f", str(conf)], env=env, timeout=60)
        if proc.returncode != 0:
            cluster.stop()
            raise SlurmUnavailable(f"{daemon[0]} did not start: {proc.stderr}\n{cluster.logs()}")
    deadline = time.time() + 60
    while time.time() < deadline:
        info = _run(["sinfo", "-h", "-o", "%T"], env=env, timeout=30)
        if info.stdout.strip() in ("idle", "mixed"):
            return cluster
        time.sleep(1)
    cluster.stop()
    raise SlurmUnavailable(
        f"the Slurm node did not become idle: {info.stdout} {info.stderr}\n{cluster.logs()}"
    )
