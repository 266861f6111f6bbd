"""A real one-node Slurm for tests: munged, slurmctld and slurmd (Debian's `slurm-wlm`, `munge`)
started as root in a directory of their own, with their own munge socket, ports, state and spool
directories, so they collide with no system Slurm or munge. `SlurmCluster.skip_reason()` says why a
machine cannot run one (not root, binaries missing, host name does not resolve).

Accounting: `sacct` needs slurmdbd and a MySQL/MariaDB server; instead the job's final state is
read from `scontrol show job` and from the jobcomp/filetxt record slurmctld writes when a job ends
(a file that stays). MinJobAge=4: slurmctld keeps a finished job at least 4 s (until its next
purge pass, every 60 s), and `sbatch --wait` polls every 2 s only while MinJobAge < 5 (beyond
that it backs off to 8 s, then 32 s), so a job's end is seen within 2 s, while it is still there.
"""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "scancel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


class SlurmCluster:
    def __init__(self, workdir: Path, cpus: Optional[int] = None):
        self.dir = Path(workdir)
        self.node = socket.gethostname().split(".")[0]   # `hostname -s`: slurmd finds itself by it
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.jobcomp = self.dir / "jobcomp.txt"
        self.procs: Dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    @staticmethod
    def skip_reason() -> Optional[str]:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return "a test Slurm runs its daemons as root (SlurmUser=root); not root here"
        missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
        if missing:
            return (f"Slurm/munge binaries missing: {', '.join(missing)} "
                    "(apt-get install slurm-wlm munge)")
        node = socket.gethostname().split(".")[0]
        try:
            socket.gethostbyname(node)
        except OSError:
            return f"this host's name {node!r} does not resolve; Slurm nodes and MASTER_ADDR use it"
        return None

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        for sub in ("munge", "state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        ctld_port, slurmd_port = _free_port(), _free_port()
        self.conf.write_text(self.slurm_conf(ctld_port, slurmd_port))
        # -D: foreground, so these Popen objects are the daemons and teardown kills exactly them
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self.wait_idle(timeout)
        return self

    def _start_munge(self) -> None:
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.dir / "munge"
        # --force: pytest's 0700 temporary directories fail munged's "socket reachable by every
        # user" check; only root uses this socket.
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("munged did not create its socket in 10 s:\n" + self.logs())
            time.sleep(0.05)

    def slurm_conf(self, ctld_port: int, slurmd_port: int) -> str:
        d = self.dir
        return f"""\
ClusterName=trilemmatest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
MinJobAge=4
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, cmd: List[str]) -> None:
        out = open(self.dir / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        out.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} at start-up:\n" + self.logs())

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            self._check_alive()
            r = self.run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"], check=False)
            state = r.stdout.strip()
            if r.returncode == 0 and state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"node {self.node} not idle after {timeout:.0f} s (sinfo: {state!r}):\n" + self.logs())

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--partition", "test"], check=False, timeout=10)
            # jobs' slurmstepd are not children of slurmd: let them finish before slurmd goes
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                q = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.2)
        for name in reversed(list(self.procs)):               # slurmd, slurmctld, munged
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self.procs.clear()

    # ------------------------------------------------------------------ use
    def run(self, cmd: List[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def job_fields(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, NodeList, ...)."""
        line = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)

    def jobcomp_record(self, job_id: str) -> Dict[str, str]:
        """The jobcomp/filetxt line slurmctld wrote when the job ended ({} if none yet)."""
        if self.jobcomp.exists():
            for line in self.jobcomp.read_text().splitlines():
                fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
                if fields.get("JobId") == job_id:
                    return fields
        return {}

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted((self.dir / "log").glob("*")) + [self.dir / "munge" / "munged.log"]:
            if f.exists():
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)
