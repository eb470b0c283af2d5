"""A one-node SLURM cluster on this machine, for the tests: Debian's `slurm-wlm` and `munge`,
started as root with a configuration of its own (SLURM_CONF), stopped afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
# CPUs the node offers: more than this machine has, so that a test's sweeps can run side by side
# (their jobs mostly wait; config_overrides lets slurmd take the figure as configured)
CPUS = 4


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    absent = [d for d in DAEMONS if not shutil.which(d) and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return f"no {', '.join(absent)} (Debian's slurm-wlm and munge packages)"
    if os.geteuid() != 0:
        return "the cluster's daemons are started as root"
    return None


def _munge_running() -> bool:
    return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0


def start(root: Path) -> dict[str, str]:
    """Start munged (if not running), slurmctld and slurmd; returns the environment to reach them."""
    if not _munge_running():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    host = socket.gethostname()
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=falcon
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=10
SlurmdParameters=config_overrides
NodeName={host} CPUs={CPUS} RealMemory={memory_mb * 3 // 4} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {"SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=os.environ | env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=os.environ | env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=os.environ | env).stdout.strip()
        if state == "idle":
            return env
        time.sleep(1)
    stop(root)
    raise RuntimeError(f"the one-node SLURM cluster did not come up (sinfo: {state!r}); see {root}/log")


def stop(root: Path) -> None:
    """Cancel every job and let the node finish them (a job step killed after slurmctld is gone
    lingers and talks to the next cluster's), then stop the daemons and wait for them."""
    env = {"SLURM_CONF": str(root / "slurm.conf")}
    subprocess.run(["scancel", "--user=root"], capture_output=True, env=os.environ | env)
    deadline = time.monotonic() + 30
    while squeue(env) and time.monotonic() < deadline:
        time.sleep(0.5)
    for daemon in ("slurmd", "slurmctld"):
        pidfile = root / f"{daemon}.pid"
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)


def squeue(env: dict[str, str]) -> list[tuple[str, str]]:
    """(job id, state) of every job in the queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, env=os.environ | env).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]
