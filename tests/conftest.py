import ast
import functools
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import pytest

from helpers import free_port

REPO = Path(__file__).resolve().parent.parent
CIFAR10_HEAD = Path(os.environ.get("CIFARLAB_CIFAR10_HEAD", REPO.parent / "shared" / "data" / "cifar10-head"))
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- two workers (`make test`: pytest -n auto)


def pytest_configure(config):
    """Under pytest-xdist every process a worker runs trains on one thread (cifarlab's default threads
    follow OMP_NUM_THREADS, as torch's do): two workers never put four compute threads on two cores."""
    config.addinivalue_line("markers", "slow: over about 7.5 s; scheduled first so no worker waits at the end")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable: the rest keep their order), so the last test a worker runs is a short one."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@functools.cache
def work_units(path: str) -> tuple[Optional[str], frozenset[str]]:
    """How the tests of a file are handed out, read from its source (pytest-xdist's controller sees node ids,
    not fixtures): (the unit of every test in the file, or None; the tests that take trained_run). A file
    whose fixtures or tests take trained_run and that has a module-scoped fixture goes with trained_run's
    readers; another file with a module-scoped fixture is a unit of its own."""
    tree = ast.parse((REPO / path).read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    readers = frozenset(f.name for f in functions if "trained_run" in [a.arg for a in f.args.args])
    module_scoped = any(isinstance(k, ast.keyword) and k.arg == "scope" and getattr(k.value, "value", None) == "module"
                        for k in ast.walk(tree))
    whole = ("trained_run" if readers else path) if module_scoped else None
    return whole, readers


def pytest_xdist_make_scheduler(config, log):
    """Tests are handed out one at a time, except those that share an expensive fixture, which go to one
    worker together so it is built once (work_units): a Slurm cluster, trained runs. Bigger units go first."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtures(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path, _, name = nodeid.partition("::")
            whole, readers = work_units(path)
            return whole or ("trained_run" if name.partition("[")[0] in readers else nodeid)

    return SharedFixtures(config, log)


@pytest.fixture(scope="session")
def cifar10_head() -> Path:
    if not (CIFAR10_HEAD / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 head not found at {CIFAR10_HEAD} (set CIFARLAB_CIFAR10_HEAD)")
    return CIFAR10_HEAD


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    if not any(FASHION_MNIST.glob("train-images-idx3-ubyte*")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return FASHION_MNIST


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets an empty dataset cache, so nothing depends on what this machine downloaded."""
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def environment_kept():
    """What a test's code puts in os.environ, and torch's thread count, go with the test. Dask's LocalCluster
    sets OMP_NUM_THREADS=1 (and MKL_, OPENBLAS_NUM_THREADS, MALLOC_TRIM_THRESHOLD_) in this process for its
    workers: left there, every process a later test starts (training, a notebook kernel) would run torch on
    one thread; a run with train.threads=1 trained here would leave the tests after it on one thread."""
    import torch

    def variables() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own

    saved, threads = variables(), torch.get_num_threads()
    yield
    now = variables()
    if now != saved:
        for key in now.keys() - saved.keys():
            del os.environ[key]
        os.environ.update(saved)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- runs shared by the tests that read them
# Each is trained once per session, on real data, with an empty dataset cache of its own. A test that
# writes into a run (eval_*.json, plots/, export/, a resume) works on its own copy: copy_run.


def train_once(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    from cifarlab.api import fit
    from cifarlab.config import load_config

    out = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFARLAB_DATA", str(out / "cache"))
        return fit(load_config(overrides=[*overrides, f"train.out_dir={out / 'runs'}"]), progress=False).path


def copy_run(run: Path, folder: Path) -> Path:
    """A copy of `run` in `folder` (same name), for a test that writes into it."""
    target = Path(folder) / Path(run).name
    shutil.copytree(run, target)
    return target


@pytest.fixture(scope="session")
def trained_run(cifar10_head, tmp_path_factory) -> Path:
    """cnn3-avg trained 4 epochs in bfloat16 on the whole CIFAR-10 head (4653 train, 517 validation, 1017
    test images), with the features of flatten and fc1 of 300 test images captured at the beginning, middle and
    last epoch (0: before the first step, 2, 4) and embedded, and its report.html."""
    return train_once(tmp_path_factory, "trained", [
        f"data.root={cifar10_head}", "train.epochs=4", "model.preset=cnn3-avg", "train.precision=bf16",
        "analysis.tsne.layers=[flatten,fc1]", "analysis.tsne.samples=300", "analysis.tsne.split=test"])


# cnn3 on a few real images: quick epochs, for the tests that damage, resume or stop a run
SMALL_RUN = ["data.train_limit=300", "data.test_limit=100", "model.preset=cnn3", "train.log_every=2",
             "analysis.report=false"]


@pytest.fixture(scope="session")
def small_run(cifar10_head, tmp_path_factory) -> Path:
    """cnn3 (Adam, lr 0.001, batch 64, no test-time augmentation) trained 2 epochs on 300 real
    CIFAR-10 images (270 train, 30 validation) and tested on 100."""
    return train_once(tmp_path_factory, "small", [f"data.root={cifar10_head}", "train.epochs=2", *SMALL_RUN])


@pytest.fixture(scope="session")
def zca_run(cifar10_head, tmp_path_factory) -> Path:
    """cnn3 trained 1 epoch on 300 real CIFAR-10 images whitened with ZCA (data.zca_epsilon=0.1), flip
    test-time augmentation, 64 test images."""
    return train_once(tmp_path_factory, "zca", [
        f"data.root={cifar10_head}", "data.train_limit=300", "data.test_limit=64", "model.preset=cnn3",
        "train.epochs=1", "data.zca=true", "data.zca_epsilon=0.1", "train.tta=flip", "analysis.report=false"])


# ---------------------------------------------------------------- servers the tests start (on 127.0.0.1)


@pytest.fixture
def postgres():
    """A PostgreSQL server from Debian's package, listening on 127.0.0.1 only, stopped afterwards."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = Path(found[-1]).parent
    as_root = os.geteuid() == 0
    user = "postgres" if as_root else pwd.getpwuid(os.geteuid()).pw_name
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    home = Path(tempfile.mkdtemp(prefix="cifarlab-pg-"))
    data = home / "data"
    if as_root:
        os.chmod(home, 0o755)
        shutil.chown(home, "postgres")
    port = free_port()
    run = lambda *args: subprocess.run(prefix + [str(bin_dir / args[0]), *args[1:]], check=True,  # noqa: E731
                                       capture_output=True, text=True)
    try:
        run("initdb", "-D", str(data), "-U", user, "--auth=trust", "--no-sync")
        run("pg_ctl", "-D", str(data), "-w", "-t", "60", "-l", str(home / "log"), "start", "-o",
            f"-h 127.0.0.1 -p {port} -k {home} -F")
        yield f"postgresql://{user}@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)
