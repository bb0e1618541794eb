"""A real Slurm on this machine: munge, slurmctld and slurmd from Debian's packages (slurm-wlm, munge),
started as root by a fixture with every listener on 127.0.0.1 and stopped by pid. Studies and searches
run on it with --executor slurm: dask-jobqueue submits the workers with sbatch, jobs are cancelled
with scancel, and nothing is left in squeue.

Skipped (with the reason) when not root or the packages are absent, except where CIFARLAB_REQUIRE_SLURM=1
(.ci/run sets it): there a missing Slurm fails the tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from cifarlab import runs
from cifarlab.studies.spec import load_study
from helpers import assert_error, cli_command, descendants, free_port, invoke, listening, wait_for

REQUIRE = "CIFARLAB_REQUIRE_SLURM"
DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
COMMANDS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "runuser")
# a lost worker's job is replaced once Dask has given the worker up: 15 s by default, 1 s in these tests
QUICK = {"DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "1s"}

STUDY = """
name: grid
base:
  data: {{root: {root}, train_limit: {limit}, test_limit: 200}}
  model: {{preset: lab-m1}}
  train: {{epochs: {epochs}, log_every: 5}}
  analysis: {{report: false}}
axes:
  optim.name: [adam, sgd]
executor: slurm
slurm: {{interface: lo, cores: 1, memory: 2GB, jobs: {jobs}, time: '00:30:00'}}
"""


def unavailable() -> Optional[str]:
    """Why the Slurm fixture cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "the Slurm tests start munged, slurmctld and slurmd, which needs root"
    missing = [p for p in DAEMONS if not os.access(p, os.X_OK)] + [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return f"Slurm is not installed (apt-get install slurm-wlm munge): no {', '.join(missing)}"
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install 'cifarlab[cluster]')"
    return None


@dataclass
class Slurm:
    """The running daemons: their folder, pids and ports, and the environment every Slurm command and job needs."""

    folder: Path
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True) -> str:
        return subprocess.run(args, env={**os.environ, **self.env}, capture_output=True, text=True, check=check,
                              timeout=60).stdout

    def queue(self) -> list[str]:
        """Ids of the jobs in squeue (pending, running or completing)."""
        return self.run("squeue", "-h", "-o", "%i").split()

    def known_jobs(self) -> set[str]:
        """Ids of every job the controller knows: queued ones and those that ended in the last 300 s."""
        return {word.split("=", 1)[1] for line in self.run("scontrol", "-o", "show", "job").splitlines()
                for word in line.split()[:1] if word.startswith("JobId=")}

    def job_pids(self, job: Optional[str] = None) -> set[int]:
        """Every process of `job` (of all jobs if None), as slurmd tracks them, and those below them."""
        found = set()
        for line in self.run("scontrol", "listpids", *([job] if job else []), check=False).splitlines()[1:]:
            if line.split() and line.split()[0].isdigit():
                found.add(int(line.split()[0]))
        return found.union(*(descendants(p) for p in found))


def start_daemons(folder: Path, slurm: Slurm) -> None:
    munge = folder / "munge"
    munge.mkdir(mode=0o711)  # munged: its socket folder must be searchable by all, its key readable by munge only
    shutil.chown(munge, "munge", "munge")
    key = munge / "munge.key"
    if shutil.which("mungekey") or os.access("/usr/sbin/mungekey", os.X_OK):
        subprocess.run([shutil.which("mungekey") or "/usr/sbin/mungekey", "-c", "-k", str(key)], check=True,
                       capture_output=True)
    else:  # munge < 0.5.14 has no mungekey: any 1 KiB of random bytes is a key
        key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    shutil.chown(key, "munge", "munge")
    socket_path = munge / "munge.socket"
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={socket_path}",
                    f"--key-file={key}", f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
                    f"--seed-file={munge / 'munged.seed'}"], check=True, capture_output=True, text=True)
    slurm.pids["munged"] = int(wait_for(lambda: read_pid(munge / "munged.pid"), "munged's pid file", timeout=30))
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    memory_mb = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.9)
    slurm.ports = {"slurmctld": free_port(), "slurmd": free_port()}
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    (folder / "slurm.conf").write_text(f"""\
ClusterName=cifarlab
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={slurm.ports['slurmctld']}
SlurmdPort={slurm.ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([f"/usr/sbin/{daemon}"], env={**os.environ, **slurm.env}, check=True, capture_output=True)
        slurm.pids[daemon] = int(wait_for(lambda: read_pid(folder / f"{daemon}.pid"), f"{daemon}'s pid file", timeout=30))
    wait_for(lambda: slurm.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip() == "idle", "the node to be idle",
             timeout=60, interval=0.2)


def read_pid(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and Path(f"/proc/{text}").exists() else None


def stop_daemons(slurm: Slurm) -> None:
    """Cancel what is still queued, then stop slurmd, slurmctld and munged by pid (SIGTERM, then SIGKILL)."""
    try:
        if "slurmd" in slurm.pids:
            leftover = slurm.queue()
            if leftover:
                slurm.run("scancel", *leftover, check=False)
                wait_for(lambda: not slurm.queue(), "the cancelled jobs to leave squeue", timeout=120, interval=0.2)
    finally:  # the daemons stop even when the queue would not empty
        stop_pids(slurm)


def stop_pids(slurm: Slurm) -> None:
    """slurmd gets SIGTERM (it stops its jobs' steps), then SIGKILL; slurmctld and munged, whose state dies
    with the test's folder, get SIGKILL at once (each spends 2 s shutting down)."""
    for name in ("slurmd", "slurmctld", "munged"):
        pid = slurm.pids.get(name)
        if pid is None:
            continue
        signals = ((signal.SIGTERM, 30), (signal.SIGKILL, 10)) if name == "slurmd" else ((signal.SIGKILL, 10),)
        for signum, seconds in signals:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                break
            try:
                wait_for(lambda: not Path(f"/proc/{pid}").exists(), f"{name} to stop", timeout=seconds, interval=0.05)
                break
            except AssertionError:
                continue


@pytest.fixture(scope="module")
def slurm():
    """munged, slurmctld and slurmd of this machine's Slurm packages in a folder of their own, on 127.0.0.1."""
    reason = unavailable()
    if reason:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{REQUIRE}=1 and {reason}")
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="cifarlab-slurm-"))
    folder.chmod(0o755)
    cluster = Slurm(folder, {"SLURM_CONF": str(folder / "slurm.conf")})
    try:
        try:
            start_daemons(folder, cluster)
        except (AssertionError, subprocess.CalledProcessError) as e:
            logs = "\n".join(f"--- {p.name}:\n{p.read_text()[-2000:]}" for p in folder.rglob("*.log"))
            raise AssertionError(f"the Slurm daemons did not start ({e}; {getattr(e, 'stderr', '')})\n{logs}") from e
        yield cluster
    finally:
        stop_daemons(cluster)
        shutil.rmtree(folder, ignore_errors=True)


def write_study(folder: Path, root: Path, epochs: int, jobs: int, limit: int = 400) -> Path:
    path = folder / "study.yaml"
    path.write_text(STUDY.format(root=root, epochs=epochs, jobs=jobs, limit=limit))
    return path


def epochs_of(run_dir: Path) -> list[int]:
    metrics = run_dir / runs.METRICS
    return [r["epoch"] for r in runs.read_jsonl(metrics) if r["kind"] == "epoch"] if metrics.is_file() else []


def start(slurm: Slurm, *args) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), env={**os.environ, **slurm.env, **QUICK}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def running(process: subprocess.Popen, predicate):
    """`predicate`, failing at once (with the command's output) when `process` has ended instead."""
    def check():
        if process.poll() is not None:
            raise AssertionError(f"the command ended (exit {process.returncode}):\n{process.stdout.read()[-3000:]}")
        return predicate()
    return check


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{output[-3000:]}") from None
    assert process.returncode == 0, output[-3000:]
    return output


def job_of(pid: int) -> str:
    """The Slurm job a process runs in (SLURM_JOB_ID, which the job's processes inherit)."""
    variables = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    return variables[b"SLURM_JOB_ID"].decode()


@pytest.mark.slow
def test_a_study_on_slurm_listens_on_127_0_0_1_resumes_a_cancelled_job_s_run_and_a_rerun_submits_nothing(
        slurm, cifar10_head, tmp_path, monkeypatch):
    path = write_study(tmp_path, cifar10_head, epochs=4, jobs=1, limit=600)
    ids = [run.id for run in load_study(path).runs]
    out = tmp_path / "out"
    before = slurm.known_jobs()
    sweep = start(slurm, "sweep", path, "--out", out)
    try:
        def mid_run():  # a run past its first epoch (with a last.pt), not finished
            for run_id in ids:
                holder = runs.lock_holder(out / run_id) if (out / run_id).is_dir() else None
                if holder and 1 <= len(epochs_of(out / run_id)) <= 2 and \
                        (out / run_id / runs.CHECKPOINTS / "last.pt").is_file():
                    return run_id, int(holder)
            return None

        victim, trainer = wait_for(running(sweep, mid_run), "a run to finish an epoch in a Slurm job", timeout=300)
        # while the run trains in a job: the listeners of the daemons, the scheduler (in the sweep) and the worker (a job)
        in_jobs = slurm.job_pids()
        assert trainer in in_jobs  # the training process runs inside a Slurm job
        print(slurm.run("sinfo"), slurm.run("squeue"), sep="\n")
        daemons = listening(set(slurm.pids.values()))
        scheduler = listening({sweep.pid} | descendants(sweep.pid))
        workers = listening(in_jobs)
        print("listeners: daemons", sorted(daemons), "scheduler", sorted(scheduler), "workers", sorted(workers))
        assert {f"127.0.0.1:{port}" for port in slurm.ports.values()} <= daemons
        assert scheduler and len(workers) >= 2  # the scheduler; the worker's nanny, worker and HTTP server
        assert all(a.startswith("127.0.0.1:") for a in daemons | scheduler | workers), (daemons, scheduler, workers)
        slurm.run("scancel", job_of(trainer))
        output = finish(sweep)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert "on Slurm through Dask" in output and output.count(": completed") == 2, output
    for run_id in ids:
        assert runs.read_summary(out / run_id)["status"] == "completed", run_id
        assert epochs_of(out / run_id) == [1, 2, 3, 4], run_id  # no epoch lost or written twice
    starts = [line for line in (out / "logs" / f"{victim}.log").read_text().splitlines() if "-m cifarlab.cli train" in line]
    assert len(starts) == 2 and "--resume" in starts[1], starts  # started, then resumed in another job
    assert list((out / "logs" / "slurm").glob("*.err"))  # the jobs' own output beside the study, not in the cwd
    wait_for(lambda: not slurm.queue(), "the study's jobs to leave squeue", timeout=60, interval=0.2)
    submitted = slurm.known_jobs()
    assert len(submitted - before) >= 2  # the cancelled job was replaced
    for name, value in slurm.env.items():  # the rerun in this process: it submits nothing, so nothing to stop
        monkeypatch.setenv(name, value)
    again = invoke("sweep", path, "--out", out)
    assert again.returncode == 0 and again.stdout.count("skipped (completed before)") == 2, again.stdout + again.stderr
    assert slurm.known_jobs() <= submitted and not slurm.queue()  # nothing was submitted


SEARCH = """
name: search
base:
  data: {{root: {root}, train_limit: 600, test_limit: 200}}
  model: {{preset: lab-m1}}
  optim: {{name: adam}}
  train: {{epochs: 3, log_every: 5}}
  analysis: {{report: false}}
search:
  optim.lr: {{float: [3.0e-4, 3.0e-3], log: true}}
  train.batch_size: {{choice: [32, 64]}}
tune: {{sampler: random, heartbeat: 3}}
slurm: {{interface: lo, cores: 1, memory: 2GB, time: '00:30:00'}}
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # retried_trial_number
def test_a_search_on_two_slurm_jobs_retries_the_trial_of_a_killed_worker(slurm, postgres, cifar10_head, tmp_path):
    optuna = pytest.importorskip("optuna")
    path = tmp_path / "search.yaml"
    path.write_text(SEARCH.format(root=cifar10_head))
    out = tmp_path / "out"
    before = slurm.known_jobs()
    search = start(slurm, "tune", path, "--executor", "slurm", "--workers", "2", "--trials", "4", "--storage", postgres,
                   "--out", out)
    try:
        def mid_trial():  # a trial past its first epoch: its run folder is locked by the worker process training it
            for folder in sorted(out.glob("trial-*")):
                holder = runs.lock_holder(folder)
                if holder and epochs_of(folder):
                    return folder, int(holder)
            return None

        folder, worker = wait_for(running(search, mid_trial), "a trial to train in a Slurm job", timeout=300)
        assert worker in slurm.job_pids()
        assert "--worker-index" in Path(f"/proc/{worker}/cmdline").read_bytes().decode()
        print(slurm.run("squeue"))
        os.kill(worker, signal.SIGKILL)  # no chance to tell anything: its trial stays RUNNING until its heartbeat stops
        output = finish(search)
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
            search.wait()
    trials = optuna.load_study(study_name="search", storage=postgres).trials
    killed = trials[int(folder.name.split("-")[1])]
    retry = optuna.storages.RetryFailedTrialCallback.retried_trial_number
    retries = {retry(t): t for t in trials if retry(t) is not None}
    assert killed.state == optuna.trial.TrialState.FAIL
    assert retries[killed.number].state == optuna.trial.TrialState.COMPLETE
    assert retries[killed.number].params == killed.params  # tried again with the same settings
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4, [t.state for t in trials]
    # the killed worker's replacement drew new settings (a worker restarted with its first seed would repeat them)
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4, [t.params for t in complete]
    assert all(t.state == optuna.trial.TrialState.COMPLETE or t.number in retries for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {1, 2}  # both Slurm jobs' workers trained trials
    assert "4 complete, 1 fail" in output, output[-2000:]  # the table and best.yaml from the complete ones
    assert len(slurm.known_jobs() - before) >= 2
    wait_for(lambda: not slurm.queue(), "the search's jobs to leave squeue", timeout=60, interval=0.2)


def test_a_slurm_controller_that_does_not_answer_is_one_line(cifar10_head, tmp_path, monkeypatch):
    if shutil.which("scontrol") is None:
        pytest.skip("Slurm's commands are not installed (apt-get install slurm-wlm)")
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    conf = tmp_path / "slurm.conf"  # a controller on a port nothing listens on
    conf.write_text(f"ClusterName=none\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={free_port()}\n"
                    f"NodeName={host} NodeAddr=127.0.0.1 CPUs=1 State=UNKNOWN\nPartitionName=debug Nodes=ALL Default=YES\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))  # read by scontrol, which cifarlab asks (in this process)
    monkeypatch.setenv("CIFARLAB_CONNECT_TIMEOUT", "3")
    study = write_study(tmp_path, cifar10_head, epochs=1, jobs=1)
    search = tmp_path / "search.yaml"
    search.write_text(SEARCH.format(root=cifar10_head))
    # the controller is asked before the storage: a PostgreSQL URL where nothing listens is never reached
    postgres = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    for args in (["sweep", study], ["tune", search, "--executor", "slurm", "--storage", postgres]):
        out = tmp_path / "out"
        assert_error(invoke(*args, "--out", out), 2, "executor slurm: the Slurm controller")
        assert not out.exists()
