"""fit(): load and split the data once, put it on the device, train with early stopping, evaluate the
test split once with the selected weights, and write the run directory.

Model selection only ever looks at the validation split; the test split is touched once, at the end.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import runs
from ..config import Config, write_config
from ..data.augment import build_augment
from ..data.loader import DeviceLoader
from ..data.sources import Dataset, dataset_from_config
from ..data.splits import channel_stats, split_indices
from ..errors import ConfigError, TrainingFailed
from ..models.build import build_model
from ..models.summary import count_params
from .callbacks import EarlyStopping
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import l2_penalty, make_optimizer, make_scheduler

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


def prepare_data(config: Config) -> Splits:
    ds = dataset_from_config(config.data, config.seed)
    train_idx, val_idx = split_indices(ds.y_train, config.data.val_size, config.seed, config.data.stratify)
    x_train = ds.x_train[train_idx]
    channels = ds.image_shape[0]
    if config.data.mean is not None:
        if len(config.data.mean) != channels or len(config.data.std) != channels:
            raise ConfigError(f"data.mean/data.std: {ds.name} has {channels} channel(s), "
                              f"got {len(config.data.mean)} and {len(config.data.std)} values")
        mean, std = list(config.data.mean), list(config.data.std)
    elif config.data.normalize:
        mean, std = channel_stats(x_train)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    return Splits(ds, (x_train, ds.y_train[train_idx]), (ds.x_train[val_idx], ds.y_train[val_idx]),
                  (ds.x_test, ds.y_test), mean, std)


def to_device(arrays: tuple[np.ndarray, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = arrays
    return torch.from_numpy(np.ascontiguousarray(images)).to(device), torch.from_numpy(labels).to(device)


def eval_loader(arrays, splits: Splits, config: Config, device: torch.device) -> DeviceLoader:
    images, labels = to_device(arrays, device)
    return DeviceLoader(images, labels, config.train.eval_batch_size, splits.mean, splits.std,
                        channels_last=config.train.channels_last)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DeviceLoader) -> dict[str, Any]:
    """Mean cross-entropy, accuracy and the predicted classes of one split (eval mode)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.images.device)
    predictions = []
    for images, labels in loader:
        logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        predictions.append(logits.argmax(1))
    model.train(was_training)
    predicted = torch.cat(predictions).cpu() if predictions else torch.empty(0, dtype=torch.long)
    n = max(len(predicted), 1)
    correct = (predicted == loader.labels.cpu()).sum().item()
    return {"loss": loss_sum.item() / n, "acc": correct / n, "predictions": predicted}


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


def fit(config: Config, reporter: Optional[Reporter] = None) -> Path:
    """Train as `config` says and return the run directory. Raises TrainingFailed (exit code 1)
    when the loss becomes NaN or infinite; the run directory then says so in summary.json."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    device = select_device(config.train.device)
    splits = prepare_data(config)
    classes = splits.dataset.classes
    input_shape = splits.dataset.image_shape

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    model = build_model(config.model, input_shape, len(classes)).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = _CompiledOrEager(model) if config.train.compile else model
    optimizer = make_optimizer(config.optim, model)
    scheduler = make_scheduler(config.schedule, optimizer, config.train.epochs)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    train_loader = DeviceLoader(*to_device(splits.train, device), config.train.batch_size, splits.mean, splits.std,
                                shuffle=True, generator=generator, augment=build_augment(config.augment),
                                channels_last=config.train.channels_last)
    val_loader = eval_loader(splits.val, splits, config, device) if len(splits.val[1]) else None
    es_config = config.train.early_stopping
    stopper = EarlyStopping(es_config.monitor, es_config.patience, es_config.min_delta, es_config.enabled)

    run_dir = runs.create_run_dir(config.train.out_dir, config.run_name())
    write_config(config, run_dir / runs.CONFIG)
    runs.write_json(run_dir / runs.ENV, {**runs.environment(str(device), config.seed),
                                         "data_origin": splits.dataset.origin})
    metrics_path = run_dir / runs.METRICS
    trainable, non_trainable = count_params(model)
    summary: dict[str, Any] = {
        "run": run_dir.name, "status": "running", "dataset": splits.dataset.name, "model": config.model.preset,
        "sizes": {"train": len(splits.train[1]), "val": len(splits.val[1]), "test": len(splits.test[1])},
        "params": {"trainable": trainable, "non_trainable": non_trainable},
        "normalization": {"mean": splits.mean, "std": splits.std}, "classes": classes,
        "input_shape": list(input_shape), "device": str(device), "monitor": stopper.monitor,
    }
    checkpoint_base = {"config": config.to_dict(), "classes": classes, "input_shape": list(input_shape),
                       "normalization": {"mean": splits.mean, "std": splits.std}}
    reporter.start(run_dir, config.train.epochs, len(train_loader))

    train_time, images_seen, step, epoch = 0.0, 0, 0, 0
    history: dict[int, dict[str, Any]] = {}
    stop_reason = f"max epochs: trained all {config.train.epochs} epochs"
    try:
        for epoch in range(1, config.train.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            for batch_index, (images, labels) in enumerate(train_loader, start=1):
                logits = forward(images)
                loss = F.cross_entropy(logits.float(), labels)
                if config.optim.l2:
                    loss = loss + l2_penalty(model, config.optim.l2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                seen += len(labels)
                loss_sum += loss.detach().double() * len(labels)
                correct += (logits.detach().argmax(1) == labels).sum()
                running = None
                if batch_index % config.train.log_every == 0:
                    running = {"loss": loss_sum.item() / seen, "acc": correct.item() / seen}
                    runs.append_jsonl(metrics_path, {
                        "kind": "step", "epoch": epoch, "step": step, "loss": running["loss"],
                        "acc": running["acc"], "lr": optimizer.param_groups[0]["lr"],
                        "time": {"elapsed_s": round(time.perf_counter() - started, 3)}})
                reporter.step(epoch, batch_index, running)
            epoch_time = time.perf_counter() - epoch_start
            train_time += epoch_time
            images_seen += seen
            record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "train_loss": loss_sum.item() / seen,
                                      "train_acc": correct.item() / seen, "lr": optimizer.param_groups[0]["lr"]}
            if not math.isfinite(record["train_loss"]):
                stop_reason = f"diverged: training loss became {record['train_loss']} in epoch {epoch}"
                raise TrainingFailed(stop_reason)
            if val_loader is not None:
                result = evaluate(model, val_loader)
                record.update(val_loss=result["loss"], val_acc=result["acc"])
            record["time"] = {"elapsed_s": round(time.perf_counter() - started, 3), "epoch_s": round(epoch_time, 3),
                              "img_per_s": round(seen / epoch_time, 1)}
            runs.append_jsonl(metrics_path, record)
            history[epoch] = record
            reporter.epoch_end(record)
            if scheduler is not None:
                scheduler.step()
            state = {**checkpoint_base, "epoch": epoch, "model": model.state_dict()}
            if stopper.update(epoch, record):
                save_checkpoint(state, run_dir / runs.CHECKPOINTS / "best.pt")
            save_checkpoint({**state, "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict() if scheduler else None,
                             "generator": generator.get_state()}, run_dir / runs.CHECKPOINTS / "last.pt")
            if stopper.should_stop:
                stop_reason = stopper.reason()
                break
    except TrainingFailed:
        summary.update(status="diverged", stop_reason=stop_reason, epochs_run=epoch)
        runs.write_json(run_dir / runs.SUMMARY, summary)
        raise
    except KeyboardInterrupt:
        summary.update(status="interrupted", stop_reason=f"interrupted in epoch {epoch}", epochs_run=epoch - 1)
        runs.write_json(run_dir / runs.SUMMARY, summary)
        raise

    best_path = run_dir / runs.CHECKPOINTS / "best.pt"
    if stopper.best_epoch is None:  # the monitored metric was never finite: the last epoch stands in
        save_checkpoint({**checkpoint_base, "epoch": epoch, "model": model.state_dict()}, best_path)
    chosen_epoch = (stopper.best_epoch or epoch) if es_config.restore_best else epoch
    if chosen_epoch != epoch:
        model.load_state_dict(load_checkpoint(best_path, str(device))["model"])
    test = evaluate(model, eval_loader(splits.test, splits, config, device))
    runs.append_jsonl(metrics_path, {"kind": "test", "epoch": chosen_epoch, "test_loss": test["loss"],
                                     "test_acc": test["acc"]})
    chosen = history[chosen_epoch]
    summary.update(
        status="completed", stop_reason=stop_reason, epochs_run=epoch, best_epoch=chosen_epoch,
        best_value=stopper.best, train_loss=chosen["train_loss"], train_acc=chosen["train_acc"],
        val_loss=chosen.get("val_loss"), val_acc=chosen.get("val_acc"), test_loss=test["loss"], test_acc=test["acc"],
        train_time_s=round(train_time, 3), wall_time_s=round(time.perf_counter() - started, 3),
        train_img_per_s=round(images_seen / train_time, 1) if train_time else None)
    runs.write_json(run_dir / runs.SUMMARY, summary)
    reporter.finish(summary)
    return run_dir


def evaluate_run(run_dir: Path, split: str = "test") -> dict[str, Any]:
    """Accuracy, loss and per-class accuracy of a run's best.pt on one split, with the run's own
    normalization; also written to eval_<split>.json in the run directory."""
    from ..analysis.metrics import per_class_accuracy

    run_dir = runs.resolve_run(run_dir)
    config = runs.read_run_config(run_dir)
    device = select_device(config.train.device)
    checkpoint = load_checkpoint(run_dir / runs.CHECKPOINTS / "best.pt", str(device))
    splits = prepare_data(config)
    splits.mean, splits.std = checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"]
    arrays = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    if len(arrays[1]) == 0:
        raise ConfigError(f"{run_dir}: the {split} split is empty (data.val_size=0?)")
    classes = checkpoint["classes"]
    model = build_model(config.model, tuple(checkpoint["input_shape"]), len(classes)).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(checkpoint["model"])
    result = evaluate(model, eval_loader(arrays, splits, config, device))
    per_class = per_class_accuracy(result["predictions"].numpy(), arrays[1], len(classes))
    report = {"run": run_dir.name, "split": split, "epoch": checkpoint["epoch"], "images": len(arrays[1]),
              "loss": result["loss"], "acc": result["acc"],
              "per_class_acc": dict(zip(classes, per_class))}
    runs.write_json(run_dir / f"eval_{split}.json", report)
    return report
