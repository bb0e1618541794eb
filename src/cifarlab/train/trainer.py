"""fit(): load and split the data once, put it on the device, train with early stopping, evaluate the
test split once with the selected weights, and write the run directory.

Model selection only ever looks at the validation split; the test split is touched once, at the end.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import runs
from ..analysis.features import capture, check_layers
from ..config import Config, TrainConfig, write_config
from ..data.augment import build_augment, mix_batch
from ..data.loader import DeviceLoader
from ..data.sources import Dataset, dataset_from_config
from ..data.splits import channel_stats, split_indices, zca_matrix
from ..errors import ConfigError, Interrupted, TrainingFailed
from ..models.build import build_model
from ..models.summary import count_params
from .callbacks import DivergenceStop, EarlyStopping, TargetStop
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import LRSchedule, kernels, l2_penalty, make_optimizer

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """The data of one run, split, with the normalization learned from the training split."""

    dataset: Dataset
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    mean: list[float]
    std: list[float]
    whiten: Optional[torch.Tensor] = None  # ZCA matrix fitted on the training split


class Reporter:
    """Receives progress from fit(). This one logs; the CLI passes one that draws a progress bar."""

    def start(self, run_dir: Path, epochs: int, steps_per_epoch: int) -> None:
        log.info("run %s: %d epochs of %d steps", run_dir, epochs, steps_per_epoch)

    def step(self, epoch: int, step: int, running: Optional[dict[str, float]]) -> None:
        if running is not None:
            log.info("epoch %d step %d: loss %.4f acc %.2f%%", epoch, step, running["loss"], 100 * running["acc"])

    def epoch_end(self, record: dict[str, Any]) -> None:
        log.info("%s", format_epoch(record))

    def finish(self, summary: dict[str, Any]) -> None:
        log.info("%s: test accuracy %.2f%%", summary["stop_reason"], 100 * (summary.get("test_acc") or 0))


def format_epoch(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record['train_loss']:.4f}", f"acc {100 * record['train_acc']:.2f}%"]
    if "val_loss" in record:
        parts += [f"val_loss {record['val_loss']:.4f}", f"val_acc {100 * record['val_acc']:.2f}%"]
    parts.append(f"{record['time']['img_per_s']:.0f} img/s")
    return "  ".join(parts)


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def prepare_data(config: Config, stored: Optional[dict[str, Any]] = None) -> Splits:
    """Read and split the data; normalization (and ZCA) is fitted on the training split, or taken
    from `stored` (a checkpoint's "normalization") so evaluation uses exactly the training statistics."""
    ds = dataset_from_config(config.data, config.seed)
    train_idx, val_idx = split_indices(ds.y_train, config.data.val_size, config.seed, config.data.stratify)
    x_train = ds.x_train[train_idx]
    channels = ds.image_shape[0]
    if stored is not None:
        return Splits(ds, (x_train, ds.y_train[train_idx]), (ds.x_train[val_idx], ds.y_train[val_idx]),
                      (ds.x_test, ds.y_test), stored["mean"], stored["std"], stored.get("zca"))
    if config.data.mean is not None:
        if len(config.data.mean) != channels or len(config.data.std) != channels:
            raise ConfigError(f"data.mean/data.std: {ds.name} has {channels} channel(s), "
                              f"got {len(config.data.mean)} and {len(config.data.std)} values")
        mean, std = list(config.data.mean), list(config.data.std)
    elif config.data.normalize:
        mean, std = channel_stats(x_train)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    whiten = torch.from_numpy(zca_matrix(x_train, mean, std, config.data.zca_epsilon)) if config.data.zca else None
    return Splits(ds, (x_train, ds.y_train[train_idx]), (ds.x_train[val_idx], ds.y_train[val_idx]),
                  (ds.x_test, ds.y_test), mean, std, whiten)


def to_device(arrays: tuple[np.ndarray, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = arrays
    return torch.from_numpy(np.ascontiguousarray(images)).to(device), torch.from_numpy(labels).to(device)


def eval_loader(arrays, splits: Splits, config: Config, device: torch.device) -> DeviceLoader:
    images, labels = to_device(arrays, device)
    return DeviceLoader(images, labels, config.train.eval_batch_size, splits.mean, splits.std,
                        channels_last=config.train.channels_last, whiten=splits.whiten)


def autocast(device: torch.device, precision: str):
    """bf16 autocast when `precision` asks for it ("auto": on CUDA only; bf16 is slow on CPUs without AMX)."""
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def predict_logits(model: nn.Module, images: torch.Tensor, settings: Optional[TrainConfig] = None) -> torch.Tensor:
    """float32 logits of a normalized batch, with the run's precision and test-time augmentation
    (tta "flip": the mean of the batch's and the mirrored batch's logits)."""
    settings = settings or TrainConfig()
    with autocast(images.device, settings.precision):
        logits = model(images).float()
        if settings.tta == "flip":
            logits = (logits + model(images.flip(3)).float()) / 2
    return logits


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DeviceLoader, settings: Optional[TrainConfig] = None) -> dict[str, Any]:
    """Mean cross-entropy, accuracy and the predicted classes of one split (eval mode), with the
    precision and test-time augmentation of `settings` (default: float32, none)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.images.device)
    outputs = []
    for images, labels in loader:
        logits = predict_logits(model, images, settings)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        outputs.append(logits)
    model.train(was_training)
    logits = torch.cat(outputs).cpu() if outputs else torch.empty(0, 0)
    predicted = logits.argmax(1) if len(logits) else torch.empty(0, dtype=torch.long)
    n = max(len(predicted), 1)
    correct = (predicted == loader.labels.cpu()).sum().item()
    return {"loss": loss_sum.item() / n, "acc": correct / n, "predictions": predicted, "logits": logits}


class _CompiledOrEager:
    """torch.compile with a fallback: if compiling fails on the first call, warn and run eagerly."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.compiled = torch.compile(model)
        self.checked = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.compiled(x)
        try:
            out = self.compiled(x)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.warning("train.compile: torch.compile failed (%s); training eagerly", str(e).splitlines()[0])
            self.compiled = self.model
            out = self.model(x)
        self.checked = True
        return out


class _SignalFlag:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Trainer:
    """One training run: data and model on the device, the loop, the stopping rules, the run directory.
    All that a resumed run needs is in `checkpoint_state()`."""

    def __init__(self, config: Config, reporter: Optional[Reporter] = None):
        self.config = config
        self.reporter = reporter or Reporter()
        self.started = time.perf_counter()
        torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
        self.device = device = select_device(config.train.device)
        self.splits = splits = prepare_data(config)
        self.classes = splits.dataset.classes
        self.input_shape = splits.dataset.image_shape

        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        model = build_model(config.model, self.input_shape, len(self.classes)).to(device)
        self.model = model.to(memory_format=torch.channels_last) if config.train.channels_last else model
        self.forward = _CompiledOrEager(self.model) if config.train.compile else self.model
        self.optimizer = make_optimizer(config.optim, self.model)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        augment = build_augment(config.augment, splits.mean)
        self.train_loader = DeviceLoader(*to_device(splits.train, device), config.train.batch_size, splits.mean,
                                         splits.std, shuffle=True, generator=self.generator, augment=augment,
                                         channels_last=config.train.channels_last, whiten=splits.whiten)
        self.schedule = LRSchedule(config.schedule, config.optim.lr, config.train.epochs, len(self.train_loader))
        self.eval_loaders = {split: eval_loader(getattr(splits, split), splits, config, device)
                             for split in config.train.evaluate}
        self.l2_weights = kernels(self.model, config.optim.l2_layers) if config.optim.l2 else []
        t = config.train
        self.stopper = EarlyStopping(t.early_stopping.monitor, t.early_stopping.patience,
                                     t.early_stopping.min_delta, t.early_stopping.enabled)
        self.rules: dict[str, Any] = {"early_stopping": self.stopper}
        if t.divergence.enabled:
            self.rules["divergence"] = DivergenceStop(t.divergence.warmup, t.divergence.epochs)
        if t.target.metric:
            self.rules["target"] = TargetStop(t.target.metric, t.target.value)
        tsne = config.analysis.tsne
        self.tsne_loader: Optional[DeviceLoader] = None
        if tsne.layers:
            check_layers(self.model, tsne.layers)
            images, labels = getattr(splits, tsne.split)
            pick = np.sort(np.random.default_rng(config.seed).permutation(len(labels))[:tsne.samples])
            self.tsne_loader = eval_loader((images[pick], labels[pick]), splits, config, device)
            last = config.train.epochs
            self.tsne_epochs = set(tsne.epochs or [1, (last + 1) // 2, last])
        # progress; a resumed run overwrites these from last.pt
        self.epoch, self.step, self.train_time, self.images_seen = 0, 0, 0.0, 0
        self.history: list[dict[str, Any]] = []
        self.position: Optional[dict[str, Any]] = None  # set when resuming in the middle of an epoch

    # ---------------------------------------------------------------- run directory

    def base_state(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "classes": self.classes, "input_shape": list(self.input_shape),
                "normalization": {"mean": self.splits.mean, "std": self.splits.std, "zca": self.splits.whiten}}

    def checkpoint_state(self, position: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, schedule, rules, RNG states, progress."""
        return {**self.base_state(), "epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "rules": {name: rule.state_dict() for name, rule in self.rules.items()},
                "generator": self.generator.get_state() if position is None else position["generator"],
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "progress": {"step": self.step, "train_time": self.train_time, "images_seen": self.images_seen,
                             "history": self.history, "metrics_lines": self.metrics_lines},
                "position": position}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        for name, rule in self.rules.items():
            if name in state["rules"]:
                rule.load_state_dict(state["rules"][name])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        progress = state["progress"]
        self.epoch, self.step = state["epoch"], progress["step"]
        self.train_time, self.images_seen = progress["train_time"], progress["images_seen"]
        self.history = list(progress["history"])
        self.metrics_lines = progress["metrics_lines"]
        self.position = state["position"]

    def log_metrics(self, record: dict[str, Any]) -> None:
        runs.append_jsonl(self.run_dir / runs.METRICS, record)
        self.metrics_lines += 1

    def summary_base(self) -> dict[str, Any]:
        trainable, non_trainable = count_params(self.model)
        sizes = {name: len(getattr(self.splits, name)[1]) for name in ("train", "val", "test")}
        return {"run": self.run_dir.name, "dataset": self.splits.dataset.name, "model": self.config.model.preset,
                "sizes": sizes, "params": {"trainable": trainable, "non_trainable": non_trainable},
                "normalization": {"mean": self.splits.mean, "std": self.splits.std}, "classes": self.classes,
                "input_shape": list(self.input_shape), "device": str(self.device), "monitor": self.stopper.monitor}

    def write_summary(self, status: str, stop_reason: str, **fields: Any) -> dict[str, Any]:
        summary = {**self.summary_base(), "status": status, "stop_reason": stop_reason, "epochs_run": self.epoch,
                   **fields}
        runs.write_json(self.run_dir / runs.SUMMARY, summary)
        return summary

    # ---------------------------------------------------------------- training

    def save_features(self, epoch: int) -> None:
        """Features of the t-SNE layers for the chosen examples, float16, one file per layer and epoch."""
        folder = self.run_dir / "features"
        folder.mkdir(exist_ok=True)
        np.save(folder / "labels.npy", self.tsne_loader.labels.cpu().numpy())
        for layer, values in capture(self.model, self.tsne_loader, self.config.analysis.tsne.layers).items():
            np.save(folder / f"{layer}-epoch{epoch:03d}.npy", values)

    def start(self, run_dir: Optional[Path] = None, resuming: bool = False) -> Path:
        """A new run directory (`run_dir` if given), or (resuming) the old one with its metrics cut
        back to the checkpoint."""
        if not resuming:
            self.run_dir = runs.create_run_dir(self.config.train.out_dir, self.config.run_name(), run_dir)
            write_config(self.config, self.run_dir / runs.CONFIG)
            runs.write_json(self.run_dir / runs.ENV, {**runs.environment(str(self.device), self.config.seed),
                                                      "data_origin": self.splits.dataset.origin})
            self.metrics_lines = 0
        else:
            self.run_dir = run_dir
            lines = (run_dir / runs.METRICS).read_text().splitlines(keepends=True)[:self.metrics_lines]
            tmp = run_dir / f".{runs.METRICS}.tmp"
            tmp.write_text("".join(lines))
            os.replace(tmp, run_dir / runs.METRICS)
            write_config(self.config, run_dir / runs.CONFIG)
            (run_dir / runs.SUMMARY).unlink(missing_ok=True)
        return self.run_dir

    def batches(self):
        """(images, labels, targets) of one epoch; targets are soft when mixup / cutmix are on."""
        a = self.config.augment
        for images, labels in self.train_loader:
            if a.mixup or a.cutmix:
                images, targets = mix_batch(images, labels, len(self.classes), self.generator, a.mixup, a.cutmix)
                if self.config.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                yield images, labels, targets
            else:
                yield images, labels, labels

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step at the scheduled LR; (detached loss, detached logits, that LR)."""
        c = self.config
        lr = self.schedule.apply(self.optimizer, self.step)
        with autocast(self.device, c.train.precision):
            logits = self.forward(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=c.train.label_smoothing)
        if self.l2_weights:
            loss = loss + l2_penalty(self.l2_weights, c.optim.l2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.optim.clip_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.clip_norm)
        self.optimizer.step()
        self.step += 1
        return loss.detach(), logits.detach(), lr

    def run_epoch(self, epoch: int, flag: _SignalFlag) -> dict[str, Any]:
        """Train one epoch (from the saved position when resuming mid-epoch) and score it."""
        c = self.config
        epoch_start = time.perf_counter()
        position, self.position = self.position, None
        generator_at_start = position["generator"] if position else self.generator.get_state()
        skip = position["batch"] if position else 0
        partial = position["partial"] if position else {"loss_sum": 0.0, "correct": 0, "seen": 0, "lrs": []}
        loss_sum = torch.tensor(partial["loss_sum"], dtype=torch.float64, device=self.device)
        correct = torch.tensor(partial["correct"], dtype=torch.long, device=self.device)
        seen, lrs = partial["seen"], list(partial["lrs"])
        self.model.train()
        for batch_index, (images, labels, targets) in enumerate(self.batches(), start=1):
            if batch_index <= skip:  # replaying the random draws of batches trained before the interrupt
                if batch_index == skip:
                    torch.set_rng_state(position["torch_rng"])
                continue
            loss, logits, lr = self.train_step(images, targets)
            lrs.append(lr)
            seen += len(labels)
            loss_sum += loss.double() * len(labels)
            hits = logits.argmax(1) == (targets.argmax(1) if targets.dim() == 2 else labels)
            correct += hits.sum()
            running = None
            if batch_index % c.train.log_every == 0:
                running = {"loss": loss_sum.item() / seen, "acc": correct.item() / seen}
                self.log_metrics({"kind": "step", "epoch": epoch, "step": self.step, **running, "lr": lr,
                                  "time": {"elapsed_s": round(time.perf_counter() - self.started, 3)}})
            self.reporter.step(epoch, batch_index, running)
            if flag.signum is not None:
                self.train_time += time.perf_counter() - epoch_start
                self.interrupt(epoch, batch_index, generator_at_start, flag.signum,
                               {"loss_sum": loss_sum.item(), "correct": correct.item(), "seen": seen, "lrs": lrs})
        epoch_time = time.perf_counter() - epoch_start
        self.train_time += epoch_time
        self.images_seen += seen
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "train_loss": loss_sum.item() / seen,
                                  "train_acc": correct.item() / seen, "lr": lrs[-1]}
        if c.schedule.name != "constant" or c.schedule.warmup_epochs:
            record["lr_steps"] = lrs
        if not math.isfinite(record["train_loss"]):
            self.epoch = epoch
            reason = f"diverged: training loss became {record['train_loss']} in epoch {epoch}"
            self.write_summary("diverged", reason)
            raise TrainingFailed(reason)
        for split, loader in self.eval_loaders.items():
            result = evaluate(self.model, loader, c.train)
            record.update({f"{split}_loss": result["loss"], f"{split}_acc": result["acc"]})
        record["time"] = {"elapsed_s": round(time.perf_counter() - self.started, 3), "epoch_s": round(epoch_time, 3),
                          "img_per_s": round(seen / epoch_time, 1)}
        return record

    def interrupt(self, epoch: int, batch: int, generator_at_start: torch.Tensor, signum: int,
                  partial: dict[str, Any]) -> None:
        position = {"epoch": epoch, "batch": batch, "generator": generator_at_start,
                    "torch_rng": torch.get_rng_state(), "partial": partial}
        save_checkpoint(self.checkpoint_state(position), self.run_dir / runs.CHECKPOINTS / "last.pt")
        name = signal.Signals(signum).name
        reason = f"interrupted by {name} in epoch {epoch} after step {batch}"
        self.write_summary("interrupted", reason, resume=f"cifarlab train --resume {self.run_dir}")
        raise Interrupted(f"{reason}; state saved, resume with: cifarlab train --resume {self.run_dir}", signum)

    def train(self) -> Path:
        c = self.config
        checkpoints = self.run_dir / runs.CHECKPOINTS
        first = self.position["epoch"] if self.position else self.epoch + 1
        self.reporter.start(self.run_dir, c.train.epochs, len(self.train_loader))
        stop_reason = f"max epochs: trained all {c.train.epochs} epochs"
        with _SignalFlag() as flag:
            for epoch in range(first, c.train.epochs + 1):
                record = self.run_epoch(epoch, flag)
                self.epoch = epoch
                self.history.append(record)
                self.log_metrics(record)
                self.reporter.epoch_end(record)
                self.schedule.epoch_end(record)
                if self.tsne_loader is not None and epoch in self.tsne_epochs:
                    self.save_features(epoch)
                for rule in self.rules.values():
                    improved = rule.update(epoch, record)
                    if rule is self.stopper and improved:
                        save_checkpoint({**self.base_state(), "epoch": epoch, "model": self.model.state_dict()},
                                        checkpoints / "best.pt")
                save_checkpoint(self.checkpoint_state(), checkpoints / "last.pt")
                reasons = [r for r in (rule.stop_reason() for rule in self.rules.values()) if r]
                if c.train.max_time_s and self.train_time >= c.train.max_time_s:
                    reasons.append(f"time limit: {self.train_time:.0f} s of training >= {c.train.max_time_s:g} s")
                if reasons:
                    stop_reason = "; ".join(reasons)
                    break
        return self.finish(stop_reason)

    def finish(self, stop_reason: str) -> Path:
        """Restore the selected weights, score the test split once, write summary.json."""
        es = self.config.train.early_stopping
        if self.tsne_loader is not None and self.epoch not in self.tsne_epochs:
            self.save_features(self.epoch)  # training stopped early: the last epoch is the "end"
        best_path = self.run_dir / runs.CHECKPOINTS / "best.pt"
        if self.stopper.best_epoch is None:  # the monitored metric was never finite: the last epoch stands in
            save_checkpoint({**self.base_state(), "epoch": self.epoch, "model": self.model.state_dict()}, best_path)
        chosen_epoch = (self.stopper.best_epoch or self.epoch) if es.restore_best else self.epoch
        if chosen_epoch != self.epoch:
            self.model.load_state_dict(load_checkpoint(best_path, str(self.device))["model"])
        test = evaluate(self.model, eval_loader(self.splits.test, self.splits, self.config, self.device),
                        self.config.train)
        self.log_metrics({"kind": "test", "epoch": chosen_epoch, "test_loss": test["loss"], "test_acc": test["acc"]})
        chosen = next(r for r in self.history if r["epoch"] == chosen_epoch)
        summary = self.write_summary(
            "completed", stop_reason, best_epoch=chosen_epoch, best_value=self.stopper.best,
            train_loss=chosen["train_loss"], train_acc=chosen["train_acc"], val_loss=chosen.get("val_loss"),
            val_acc=chosen.get("val_acc"), test_loss=test["loss"], test_acc=test["acc"],
            train_time_s=round(self.train_time, 3), wall_time_s=round(time.perf_counter() - self.started, 3),
            train_img_per_s=round(self.images_seen / self.train_time, 1) if self.train_time else None)
        if self.config.analysis.report:
            from ..analysis.report import build_run_report

            try:
                build_run_report(self.run_dir)
            except Exception as e:  # noqa: BLE001 - a figure must never cost the trained run
                log.warning("report.html was not written: %s (cifarlab report %s retries)", e, self.run_dir)
        self.reporter.finish(summary)
        return self.run_dir


def fit(config: Config, reporter: Optional[Reporter] = None, run_dir: Optional[Path] = None) -> Path:
    """Train as `config` says and return the new run directory (`run_dir` if given). Raises
    TrainingFailed (exit code 1) when the loss becomes NaN or infinite, Interrupted on SIGINT /
    SIGTERM (state saved)."""
    trainer = Trainer(config, reporter)
    trainer.start(run_dir)
    return trainer.train()


def resume(run_dir: Path, overrides: Optional[list[str]] = None, reporter: Optional[Reporter] = None) -> Path:
    """Continue a run from its last.pt exactly where it stopped (end of an epoch, or the step where
    it was interrupted). Overrides such as train.epochs=30 extend it; others change what follows."""
    run_dir = runs.resolve_run(run_dir)
    config = runs.read_run_config(run_dir, overrides)
    trainer = Trainer(config, reporter)
    trainer.load_checkpoint_state(load_checkpoint(run_dir / runs.CHECKPOINTS / "last.pt", str(trainer.device)))
    if trainer.position is None and trainer.epoch >= config.train.epochs:
        raise ConfigError(f"{run_dir}: already trained {trainer.epoch} of train.epochs={config.train.epochs}; "
                          "pass train.epochs=N to train longer")
    trainer.start(run_dir, resuming=True)
    return trainer.train()


@dataclass
class LoadedRun:
    """A finished run read back: its config, data splits (with the run's own normalization) and
    the best.pt model in eval mode."""

    path: Path
    config: Config
    splits: Splits
    model: nn.Module
    checkpoint: dict[str, Any]
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return self.checkpoint["classes"]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}[name]
        if len(arrays[1]) == 0:
            raise ConfigError(f"{self.path}: the {name} split is empty (data.val_size=0?)")
        return arrays

    def normalize(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) images as the model sees them: the run's normalization, on its device."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        loader = DeviceLoader(batch, torch.zeros(len(batch), dtype=torch.long), len(batch), self.splits.mean,
                              self.splits.std, channels_last=self.config.train.channels_last, whiten=self.splits.whiten)
        return loader.normalize(batch)

    def loader(self, name: str) -> DeviceLoader:
        return eval_loader(self.split(name), self.splits, self.config, self.device)


def load_run(run_dir: Path, checkpoint_name: str = "best.pt") -> LoadedRun:
    run_dir = runs.resolve_run(run_dir)
    config = runs.read_run_config(run_dir)
    device = select_device(config.train.device)
    checkpoint = load_checkpoint(run_dir / runs.CHECKPOINTS / checkpoint_name, str(device))
    splits = prepare_data(config, checkpoint["normalization"])
    model = build_model(config.model, tuple(checkpoint["input_shape"]), len(checkpoint["classes"])).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return LoadedRun(run_dir, config, splits, model, checkpoint, device)


def evaluate_run(run_dir: Path, split: str = "test", top_k: int = 5) -> dict[str, Any]:
    """Accuracy, loss, top-k accuracy, per-class accuracy and the confusion matrix of a run's best.pt
    on one split, with the run's own normalization; also written to eval_<split>.json."""
    from ..analysis.metrics import confusion_matrix, per_class_accuracy, top_k_accuracy

    run = load_run(run_dir)
    labels = run.split(split)[1]
    result = evaluate(run.model, run.loader(split), run.config.train)
    predicted = result["predictions"].numpy()
    classes = run.classes
    k = min(top_k, len(classes))
    report = {"run": run.path.name, "split": split, "epoch": run.checkpoint["epoch"], "images": len(labels),
              "loss": result["loss"], "acc": result["acc"], f"top{k}_acc": top_k_accuracy(result["logits"].numpy(),
                                                                                          labels, k),
              "per_class_acc": dict(zip(classes, per_class_accuracy(predicted, labels, len(classes)))),
              "classes": classes, "confusion": confusion_matrix(predicted, labels, len(classes)).tolist()}
    runs.write_json(run.path / f"eval_{split}.json", report)
    return report
