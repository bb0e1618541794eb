"""The run directory contract (see docs/architecture.md): what a run writes and how every other
command reads it back.

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.yaml  env.json  metrics.jsonl  summary.json  checkpoints/{best,last}.pt
      plots/  report.html  features/
"""

from __future__ import annotations

import copy
import fcntl
import io
import json
import os
import pickle
import platform
import subprocess
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .config import Config, load_config
from .data.loader import DeviceLoader
from .data.prepare import Splits, eval_loader, prepare_data, select_device
from .evaluation import Evaluation, evaluate, with_penalty
from .errors import CifarlabError, ConfigError, DataError, RunInUse, WriteError, first_line
from .files import append_line, atomic_write
from .models.build import build_model
from .models.own import OwnModel

CONFIG = "config.yaml"
ENV = "env.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"


def create_run_dir(out_dir: Union[str, Path], name: str, exact: Optional[Path] = None) -> Path:
    """A new, empty run directory: `exact` if given (a study names its runs), else
    out_dir/name-timestamp, with a suffix keeping two runs started in the same second apart."""
    try:
        if exact is not None:
            if exact.exists() and any(exact.iterdir()):
                raise ConfigError(f"{exact}: run directory exists and is not empty")
            (exact / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            return exact
        base = Path(out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, n = base, 1
        while True:
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        (path / CHECKPOINTS).mkdir()
        return path
    except OSError as e:
        where = exact if exact is not None else Path(out_dir)
        raise ConfigError(f"{where}: cannot create the run directory ({e.strerror or e})") from None


class RunLock:
    """One writer per run: an exclusive flock on RUN/.lock, a file that holds the writer's pid. The
    kernel drops the lock when its process ends, even by SIGKILL, so a .lock left behind by a dead
    process is stale and the next writer takes it over."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise WriteError(f"{self.path}: cannot lock the run ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunInUse(f"{self.path.parent}: process {holder} is writing this run "
                               f"(it holds {self.path}); wait for it to end or stop it") from None
            try:  # the last holder may have removed the file between our open and our lock
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir: Path) -> Optional[str]:
    """The pid of the live process writing `run_dir`, or None when nobody is."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return None
    try:
        with RunLock(run_dir):
            return None
    except RunInUse:
        return path.read_text().strip() or "unknown"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: readers never see half a file."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: Path, obj: Any) -> None:
    append_line(path, json.dumps(obj))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a last line without its newline (a writer that died
    mid-line) is not a record yet and is left out."""
    text = Path(path).read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def epoch_records(run_dir: Union[str, Path]) -> list[dict]:
    """A run's per-epoch records from its metrics.jsonl (none for a run that has not started)."""
    path = Path(run_dir) / METRICS
    return [r for r in read_jsonl(path) if r["kind"] == "epoch"] if path.is_file() else []


def resolve_run(path: Union[str, Path]) -> Path:
    run = Path(path)
    if not (run / CONFIG).is_file():
        raise ConfigError(f"{run}: not a run directory (no {CONFIG})")
    return run


def keep_lines(path: Path, count: int) -> None:
    """Cut a JSON-lines file back to its first `count` lines (a resumed run drops what came after
    its checkpoint)."""
    lines = path.read_text().splitlines(keepends=True)[:count] if path.is_file() else []
    atomic_write(path, "".join(lines))


def read_run_config(run: Path, overrides: Optional[list[str]] = None) -> Config:
    """A run's resolved config, with `key.path=value` overrides applied on top."""
    return load_config(Path(run) / CONFIG, overrides)


def read_summary(run: Path) -> dict:
    path = Path(run) / SUMMARY
    if not path.is_file():
        raise ConfigError(f"{run}: no {SUMMARY} (the run did not finish)")
    try:
        summary = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # cut short or not text (UnicodeDecodeError is a ValueError)
        raise DataError(f"{path}: damaged ({type(e).__name__}: {e})") from None
    if not isinstance(summary, dict):
        raise DataError(f"{path}: damaged (holds a {type(summary).__name__}, not an object)")
    return summary


def analysis_done(run_dir: Path, seconds: float, steps: Optional[dict[str, float]] = None) -> None:
    """summary.json's `analysis` (the report and t-SNE after training: running, done, interrupted or
    failed) set to done by `cifarlab report RUN`, saying what it was before, with the seconds of each of
    its `steps`; a run whose analysis was done (or that has no such record) is left as it is."""
    summary = read_summary(run_dir)
    before = summary.get("analysis") or {"status": "done"}
    if before.get("status") != "done":
        was = before.get("reason") or f"left {before.get('status')}"  # "left running": its process was killed
        summary["analysis"] = {"status": "done", "reason": f"finished by cifarlab report; before that: {was}",
                               "seconds": round(seconds, 3), **({"steps": steps} if steps else {})}
        write_json(Path(run_dir) / SUMMARY, summary)


def git_revision() -> Union[str, None]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str, seed: int) -> dict[str, Any]:
    import numpy
    import torch

    from . import __version__

    return {
        "cifarlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "seed": seed,
        "git_revision": git_revision(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Serialize in memory, then write atomically: a crash or a full disk never leaves half a file,
    and a write error is an OSError (torch.save to a file reports it as a RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A checkpoint's dict, loaded with weights_only=True: plain tensors and containers, no code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError,
            TypeError, AttributeError) as e:  # what torch.load raises on a damaged or foreign file
        raise DataError(f"{path}: not a cifarlab checkpoint ({first_line(e) or type(e).__name__})") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a cifarlab checkpoint (holds a {type(state).__name__})")
    return state


def load_weights(model: nn.Module, weights: dict[str, Any], source: Path) -> None:
    """Load a checkpoint's weights into `model`, or say which layer does not fit (a checkpoint of
    another architecture, or a config edited after training)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        detail = (f"the model has {missing[0]} which the checkpoint lacks" if missing
                  else f"the checkpoint has {unexpected[0]} which the model lacks")
        raise DataError(f"{source}: does not fit the model built from the config ({detail}; "
                        f"{len(missing)} missing, {len(unexpected)} unexpected)")
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise DataError(f"{source}: does not fit the model built from the config: {key} is "
                            f"{tuple(weights[key].shape)} in the checkpoint, {tuple(tensor.shape)} in the model")
    model.load_state_dict(weights)


# ---------------------------------------------------------------- reading a run back


SPLITS = ("train", "val", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: use test, val or train")
    return split


def tested_checkpoint(run_dir: Path) -> str:
    """best.pt or last.pt: the checkpoint holding the weights the run tests (summary.json's test_weights
    once it has tested; before that, or with a damaged summary.json, its config's train.test_weights;
    best.pt for a run that predates the key or whose config cannot be read)."""
    try:
        summary = read_summary(run_dir) if (run_dir / SUMMARY).is_file() else {}
    except CifarlabError:  # damaged: the commands that need the summary say so themselves
        summary = {}
    if summary.get("status") == "completed":
        return "last.pt" if summary.get("test_weights") == "last" else "best.pt"
    try:
        return f"{read_run_config(run_dir).train.tested_weights()}.pt"
    except CifarlabError:
        return "best.pt"


class LoadedRun:
    """A run directory read back, each part on first use: summary, config, epoch records, the
    checkpoint (`checkpoint_name`; default: the one holding the tested weights) and its model in eval mode on `device` (default:
    the run's train.device), the data splits with the run's own normalization, and the predictions of
    a split (scored once; `known` holds splits already scored, such as training's final test score).
    Predicting, exporting or drawing filters read no data: the checkpoint holds the normalization.
    Every command that reads a run (eval, predict, viz, report, export, the API's Run) reads it here.
    `model`: your own network passed in Python (an nn.Module or a factory), for a run whose model
    cannot be rebuilt from its config (model.given); by default a `path` object's `given_model`."""

    def __init__(self, path: Union[str, Path], checkpoint_name: Optional[str] = None, device: Optional[str] = None,
                 known: Optional[dict[str, Evaluation]] = None, model: Optional[OwnModel] = None):
        self.path = resolve_run(path)
        checkpoint_name = checkpoint_name or tested_checkpoint(self.path)
        self.given_model = model if model is not None else getattr(path, "given_model", None)
        self.checkpoint_name = checkpoint_name
        self.device_name = device
        self.known = dict(known or {})
        self.found: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"LoadedRun({str(self.path)!r})"

    @cached_property
    def config(self) -> Config:
        return read_run_config(self.path)

    @cached_property
    def summary(self) -> dict[str, Any]:
        return read_summary(self.path)

    @property
    def history(self) -> list[dict[str, Any]]:
        return epoch_records(self.path)

    @cached_property
    def device(self) -> torch.device:
        return select_device(self.device_name or self.config.train.device)

    @cached_property
    def checkpoint(self) -> dict[str, Any]:
        path = self.path / CHECKPOINTS / self.checkpoint_name
        if self.checkpoint_name == "last.pt" and not path.is_file():
            raise DataError(f"{path}: checkpoint not found; the run tests its last epoch's weights "
                            "(train.test_weights), which last.pt holds")
        checkpoint = load_checkpoint(path, str(self.device))
        missing = [k for k in ("model", "normalization", "input_shape", "classes", "epoch") if k not in checkpoint]
        if missing:
            raise DataError(f"{path}: not a cifarlab checkpoint (no {missing[0]!r})")
        return checkpoint

    @cached_property
    def model(self) -> nn.Module:
        """The checkpoint's weights, built and in eval mode, on the run's device."""
        checkpoint = self.checkpoint
        given = self.given_model  # your own model passed in Python: a copy (the checkpoint's weights go into it)
        model = build_model(self.config.model, tuple(checkpoint["input_shape"]), len(checkpoint["classes"]),
                            copy.deepcopy(given) if isinstance(given, nn.Module) else given)
        model = model.to(self.device)
        if self.config.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        load_weights(model, checkpoint["model"], self.path / CHECKPOINTS / self.checkpoint_name)
        return model.eval()

    @property
    def classes(self) -> list[str]:
        return self.checkpoint["classes"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.checkpoint["input_shape"])

    @cached_property
    def splits(self) -> Splits:
        """The run's train / val / test splits, with its own normalization."""
        return prepare_data(self.config, self.checkpoint["normalization"])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        check_split(name)  # before the data is read
        arrays = getattr(self.splits, name)
        if len(arrays[1]) == 0:
            raise ConfigError(f"{self.path}: the {name} split is empty (data.val_size=0?)")
        return arrays

    def normalize(self, images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """uint8 (N, C, H, W) images, or floats in [0, 1], as the model sees them: the run's
        normalization, on its device."""
        batch = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
        batch = batch.to(self.device)
        stored = self.checkpoint["normalization"]
        loader = DeviceLoader(batch, torch.zeros(len(batch), dtype=torch.long), len(batch), stored["mean"],
                              stored["std"], channels_last=self.config.train.channels_last, whiten=stored.get("zca"),
                              samplewise=stored.get("samplewise", "none"))
        return loader.normalize(batch)

    def loader(self, name: str) -> DeviceLoader:
        return eval_loader(self.split(name), self.splits, self.config, self.device)

    def evaluate(self, split: str) -> Evaluation:
        """The checkpoint's score on a split, with the run's precision and test-time augmentation."""
        result = evaluate(self.model, self.loader(split), self.config.train.precision, self.config.train.tta)
        return with_penalty(result, self.model, self.config.optim)

    def predictions(self, split: str) -> dict[str, Any]:
        """{images, labels, predicted, acc, logits} of the checkpoint on a split, scored once."""
        if check_split(split) not in self.found:
            images, labels = self.split(split)
            result = self.known.get(split) or self.evaluate(split)
            self.found[split] = {"images": images, "labels": labels, "predicted": result.predictions.cpu().numpy(),
                                 "acc": result.acc, "loss": result.loss, "logits": result.logits}
        return self.found[split]

    def plot(self, name: str) -> Path:
        """RUN/plots/NAME: where the run's figures go."""
        return self.path / "plots" / name

