"""The training loop: data and model on the device, the optimizer step, per-epoch evaluation of the
configured splits, the run directory, and the dispatch of callback hooks. Everything optional
(stopping rules, checkpoints, the metrics log, progress, feature capture, the report) is a callback;
`cifarlab.api.default_callbacks` builds the list a config asks for.

Model selection only ever looks at the validation split; the test split is scored once, at the end.

Its collaborators: the strategy (train/strategy.py: one process, or one rank of a data-parallel
run: the loop asks it wherever they differ), checkpointing (train/checkpoint.py: last.pt's state and
the resume rules), compiling (train/compiling.py) and signals (train/signals.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import runs
from ..config import Config
from ..data.augment import build_augment, mix_batch
from ..data.loader import DeviceLoader
from ..data.prepare import eval_loader, prepare_data, select_device, to_device
from ..data.sources import known_shape
from ..errors import CifarlabError, Interrupted, TrainingFailed, first_line
from ..hooks import HOOKS, Callback
from ..evaluation import Evaluation, autocast, autocast_dtype, with_penalty
from ..models.build import build_model, check_layer_names
from ..models.own import OwnModel
from ..models.whitening import fit_whitening
from . import distributed
from .checkpoint import check_resumable, state_keys
from .compiling import CompiledOrEager, compile_pays
from .rundir import RunDirectory
from ..models.penalty import kernels, l2_penalty
from .optim import make_optimizer
from .schedules import LRSchedule
from .signals import SignalFlag, signal_name, stoppable
from .strategy import strategy_for

log = logging.getLogger(__name__)


class Trainer(RunDirectory):
    """One training run. `fit()` runs it from the start, `resume_from(run_dir)` from the run's last.pt.
    Callbacks are called in list order for every hook. With train.devices > 1 this process is one rank
    (it joins the process group here) and only rank 0 keeps the callbacks."""

    def __init__(self, config: Config, callbacks: Sequence[Callback] = (), model: Optional[OwnModel] = None):
        self.config = config
        self.started = time.perf_counter()
        self.strategy = strategy = strategy_for(config.train.devices)
        self.device = device = strategy.setup(config.train.devices, select_device(config.train.device),
                                              config.train.threads)
        self.callbacks = list(callbacks) if strategy.is_main else []  # callbacks write: rank 0's job
        self.callback_keys = state_keys(self.callbacks)
        # a callback may define any subset of the hooks (the Callback base class defines them all)
        self.hooks = {hook: [getattr(cb, hook) for cb in self.callbacks if hasattr(cb, hook)] for hook in HOOKS}
        known = known_shape(config.data)
        if known and (config.analysis.tsne.layers or config.model.module):  # checked before any data is read
            check_layer_names(build_model(config.model, *known, model), config.analysis.tsne.layers)
        self.splits = splits = prepare_data(config)
        self.classes = splits.dataset.classes
        self.input_shape = splits.dataset.image_shape

        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        model = build_model(config.model, self.input_shape, len(self.classes), model).to(device)
        check_layer_names(model, config.analysis.tsne.layers)  # your own data: as soon as it is read
        self.model = model.to(memory_format=torch.channels_last) if config.train.channels_last else model
        self.optimizer = make_optimizer(config.optim, self.model)
        # fp16 gradients underflow without loss scaling; bf16 and float32 need none
        fp16 = autocast_dtype(device, config.train.precision) == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        # the permutation of each epoch: the same draws on every rank; augmentation (and mixup / cutmix)
        # draws: the strategy's (one generator per rank, the permutation's own one in a single process)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.augment_generator = strategy.augment_generator(self.generator, config.seed)
        self.rank_states: list[dict[str, Any]] = []  # every rank's RNG states at the last epoch end (for last.pt)
        augment = build_augment(config.augment, splits.mean, config.seed)
        self.train_loader = DeviceLoader(*to_device(splits.train, device), config.train.batch_size, splits.mean,
                                         splits.std, shuffle=True, generator=self.generator, augment=augment,
                                         channels_last=config.train.channels_last, whiten=splits.whiten,
                                         augment_generator=self.augment_generator, rank=strategy.rank,
                                         world=strategy.world, samplewise=splits.samplewise)
        fit_whitening(self.model, self.train_loader)  # a `whiten` layer's filters, from the training split
        self.schedule = LRSchedule(config.schedule, config.optim.lr, config.train.epochs, len(self.train_loader))
        self.compiling = compile_pays(config.train.compile, device, config.train.epochs * len(self.train_loader))
        trained = strategy.wrap(self.model)  # what the training forward calls: the model, or its DDP wrapper
        self.forward = CompiledOrEager(trained) if self.compiling else trained  # training forward only
        self.eval_loaders = {split: self.eval_part(split) for split in config.train.evaluate}
        self.l2_weights = kernels(self.model, config.optim.l2_layers) if config.optim.l2 else []
        # progress; a resumed run overwrites these from last.pt
        self.epoch, self.step, self.train_time, self.images_seen = 0, 0, 0.0, 0
        self.current_epoch = 0  # the epoch in progress (for step hooks)
        self.history: list[dict[str, Any]] = []
        self.position: Optional[dict[str, Any]] = None  # set when resuming in the middle of an epoch
        self.stop_reasons: list[str] = []
        self.selected_epoch: Optional[int] = None  # the epoch whose weights are tested (a callback may choose)
        self.best_epoch: Optional[int] = None  # the epoch best.pt holds (set by BestCheckpoint)
        self.best_value: Optional[float] = None
        self.test_result: Optional[Evaluation] = None
        self.run_dir: Optional[Path] = None
        self.lock: Optional[runs.RunLock] = None  # held from start() / resume_from() to the end of fit()
        self.resuming = False

    # ---------------------------------------------------------------- for callbacks

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def loader(self, split: str, arrays: Optional[tuple[np.ndarray, np.ndarray]] = None) -> DeviceLoader:
        """An evaluation loader of a split (or of `arrays`) with the run's normalization."""
        return eval_loader(arrays if arrays is not None else getattr(self.splits, split), self.splits, self.config,
                           self.device)

    def eval_part(self, split: str) -> DeviceLoader:
        """The evaluation loader of the part of a split this process scores (all of it in a single process)."""
        return self.loader(split, self.strategy.part(getattr(self.splits, split)))

    def score(self, split: str, loader: DeviceLoader) -> Evaluation:
        """The whole split's score from its `eval_part` loader, with the run's precision and TTA."""
        t = self.config.train
        return with_penalty(self.strategy.score(self.model, loader, len(getattr(self.splits, split)[1]),
                                                len(self.classes), t.precision, t.tta), self.model, self.config.optim)

    def elapsed(self) -> float:
        """Seconds since the Trainer was created (data loading included)."""
        return time.perf_counter() - self.started

    def stop(self, reason: str) -> None:
        """Ask to stop after this epoch; the reasons given in one epoch are joined in the summary."""
        self.stop_reasons.append(reason)

    def dispatch(self, hook: str, *args: Any) -> None:
        for method in self.hooks[hook]:
            method(self, *args)

    # ---------------------------------------------------------------- training

    def batches(self):
        """(images, labels, targets) of one epoch; targets are soft when mixup / cutmix are on."""
        a = self.config.augment
        for images, labels in self.train_loader:
            if a.mixup or a.cutmix:
                images, targets = mix_batch(images, labels, len(self.classes), self.augment_generator, a.mixup,
                                            a.cutmix)
                if self.config.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                yield images, labels, targets
            else:
                yield images, labels, labels

    def train_step(self, images: torch.Tensor, targets: torch.Tensor,
                   global_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step at the scheduled LR on a batch of a global batch of `global_size` images;
        (the batch's summed loss as a detached float64, detached logits, that LR)."""
        c = self.config
        lr = self.schedule.apply(self.optimizer, self.step)
        with autocast(self.device, c.train.precision):
            logits = self.forward(images)
        penalty = l2_penalty(self.l2_weights, c.optim.l2) if self.l2_weights else None
        loss, summed = self.strategy.loss(logits, targets, c.train.label_smoothing, penalty, global_size)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler does nothing unless the run is fp16
        if c.optim.clip_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), c.optim.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return summed, logits.detach(), lr

    def run_epoch(self, epoch: int, flag: SignalFlag) -> dict[str, Any]:
        """Train one epoch (from the saved position when resuming mid-epoch) and score it."""
        c, strategy = self.config, self.strategy
        epoch_start = time.perf_counter()
        self.current_epoch = self.train_loader.epoch = epoch
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
            summed, logits, lr = self.train_step(images, targets, self.train_loader.global_size(batch_index - 1))
            loss_sum += summed
            lrs.append(lr)
            seen += len(labels)
            hits = logits.argmax(1) == (targets.argmax(1) if targets.dim() == 2 else labels)
            correct += hits.sum()
            logs = None
            if batch_index % c.train.log_every == 0:
                total_loss, total_correct, total_seen = strategy.totals(loss_sum, correct, seen)
                logs = {"loss": total_loss / total_seen, "acc": total_correct / total_seen, "lr": lr}
            self.dispatch("on_step_end", batch_index, logs)
            if flag.signum is not None and strategy.stops_mid_epoch:
                self.train_time += time.perf_counter() - epoch_start
                partial = {"loss_sum": loss_sum.item(), "correct": correct.item(), "seen": seen, "lrs": lrs}
                position = {"epoch": epoch, "batch": batch_index, "generator": generator_at_start,
                            "torch_rng": torch.get_rng_state(), "partial": partial}
                self.stop_for_signal(f"in epoch {epoch} after step {batch_index}", flag.signum, position)
        epoch_time = time.perf_counter() - epoch_start
        self.train_time += epoch_time
        loss_total, correct_total, seen = strategy.totals(loss_sum, correct, seen)
        self.images_seen += seen
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "train_loss": loss_total / seen,
                                  "train_acc": correct_total / seen, "lr": lrs[-1]}
        if c.schedule.name != "constant" or c.schedule.warmup_epochs:
            record["lr_steps"] = lrs
        strategy.share_buffers(self.model)
        for split, loader in self.eval_loaders.items():
            result = self.score(split, loader)
            record.update({f"{split}_loss": result.loss, f"{split}_acc": result.acc})
        record["time"] = {"elapsed_s": round(self.elapsed(), 3), "epoch_s": round(epoch_time, 3),
                          "img_per_s": round(seen / epoch_time, 1)}
        return record

    def stop_for_signal(self, where: str, signum: int, position: Optional[dict[str, Any]]) -> None:
        """Save the state (`position`: where in the epoch; None: at its end), say so, raise Interrupted."""
        self.dispatch("on_interrupt", position)
        reason = f"interrupted by {signal_name(signum)} {where}"
        self.write_summary("interrupted", reason)
        raise Interrupted(reason, signum, self.run_dir)

    def fit(self) -> Path:
        """Train until train.epochs or a callback's stop, score the test split once, write summary.json.
        A NaN loss ends with status "diverged" (TrainingFailed), any other error with "failed"; either
        way every callback's on_exception runs before the error is raised again."""
        completed = False
        try:
            with self.strategy.errors():
                run_dir = self._fit()
            completed = True
            return run_dir
        except Interrupted:
            raise
        except BaseException as e:
            if isinstance(e, TrainingFailed):
                self.record_failure("diverged", str(e))
            elif isinstance(e, Exception):
                self.record_failure("failed", str(e) if isinstance(e, CifarlabError) else
                                    f"{type(e).__name__}: {first_line(e)}")
            self.tell_failure(e)
            raise
        finally:
            if self.lock is not None:
                self.lock.release()
            self.strategy.leave(completed)

    def record_failure(self, status: str, reason: str) -> None:
        """summary.json with the failure, if it can still be written (not when the disk is full)."""
        try:
            self.write_summary(status, reason)
        except CifarlabError as e:
            log.warning("%s", e)

    def tell_failure(self, error: BaseException) -> None:
        """Every callback's on_exception; one that fails there is logged, not raised over `error`."""
        for method in self.hooks["on_exception"]:
            try:
                method(self, error)
            except Exception as e:  # noqa: BLE001 - the run's own error is the one to raise
                owner = getattr(method, "__self__", method)
                log.warning("on_exception of %s failed: %s: %s", type(owner).__name__, type(e).__name__, e)

    def _fit(self) -> Path:
        c, strategy = self.config, self.strategy
        first = self.position["epoch"] if self.position else self.epoch + 1
        self.dispatch("on_fit_start")
        stop_reason = f"max epochs: trained all {c.train.epochs} epochs"
        with SignalFlag() as flag:
            for epoch in range(first, c.train.epochs + 1):
                record = self.run_epoch(epoch, flag)
                self.epoch = epoch
                self.history.append(record)
                self.schedule.epoch_end(record)
                self.rank_states = strategy.gather_rng(self.rng_state())  # for last.pt, which rank 0 writes
                self.dispatch("on_epoch_end", record)
                self.stop_reasons, signum = strategy.agree(self.stop_reasons, flag.signum)
                if signum is not None and epoch < c.train.epochs:  # it came after the epoch's last step
                    self.stop_for_signal(f"at the end of epoch {epoch}", signum, None)
                if self.stop_reasons:
                    stop_reason = "; ".join(self.stop_reasons)
                    break
        self.selected_epoch = self.epoch
        self.dispatch("on_train_end")
        strategy.share_weights(self.model)
        self.test_result = self.score("test", self.eval_part("test"))
        chosen = next(r for r in self.history if r["epoch"] == self.selected_epoch)
        summary = self.write_summary(
            "completed", stop_reason, best_epoch=self.best_epoch or self.selected_epoch, best_value=self.best_value,
            tested_epoch=self.selected_epoch, test_weights=self.weights_tested(),
            train_loss=chosen["train_loss"], train_acc=chosen["train_acc"], val_loss=chosen.get("val_loss"),
            val_acc=chosen.get("val_acc"), test_loss=self.test_result.loss, test_acc=self.test_result.acc,
            train_time_s=round(self.train_time, 3), wall_time_s=round(self.elapsed(), 3),
            train_img_per_s=round(self.images_seen / self.train_time, 1) if self.train_time else None,
            analysis={"status": "running"})  # what a run killed (SIGKILL) in its analysis keeps saying
        self.analyse(summary)
        return self.run_dir

    def weights_tested(self) -> str:
        """best | last: the checkpoint holding the tested weights (best.pt only where a BestCheckpoint wrote it)."""
        return "best" if self.config.train.tested_weights() == "best" and self.best_epoch is not None else "last"

    def analyse(self, summary: dict[str, Any]) -> None:
        """The on_fit_end hooks (report, t-SNE), timed, their status in summary.json; the run stays completed:
        a failing hook is logged, a signal stops them at once (Interrupted); `cifarlab report RUN` finishes."""
        started = time.perf_counter()
        status, reason, signum = stoppable(lambda: self.dispatch("on_fit_end", summary))
        if status == "failed":
            log.warning("the analysis after training failed (%s); finish it with: cifarlab report %s", reason, self.run_dir)
        summary.update(analysis={**summary.get("analysis", {}), "status": status, "reason": reason,  # a hook's steps stay
                                 "seconds": round(time.perf_counter() - started, 3)}, wall_time_s=round(self.elapsed(), 3))
        try:
            if self.strategy.is_main:
                runs.write_json(self.run_dir / runs.SUMMARY, summary)
        except CifarlabError as e:  # a full disk: summary.json keeps saying "running" and training's result stands
            log.warning("%s", e)
        if signum is not None:
            raise Interrupted(f"{reason} in the analysis after training (the run itself is completed; its report and "
                              "t-SNE are not)", signum, self.run_dir, f"finish them with: cifarlab report {self.run_dir}")


def fit(config: Config, callbacks: Sequence[Callback] = (), run_dir: Optional[Path] = None,
        model: Optional[OwnModel] = None) -> Path:
    """Train as `config` says (the network: `model` if given) with `callbacks` into a new run directory."""
    trainer = Trainer(config, callbacks, model)
    trainer.start(run_dir)
    return trainer.fit()


def resume(run_dir: Path, config: Config, callbacks: Sequence[Callback] = (), model: Optional[OwnModel] = None) -> Path:
    """Continue a run from its last.pt exactly where it stopped, with `config` (the run's own,
    possibly with overrides such as train.epochs=30)."""
    # a second writer is refused before anything is read; with several ranks rank 0 holds the lock
    main = config.train.devices == 1 or distributed.main_process()
    lock = runs.RunLock(run_dir).acquire() if main else None
    try:
        state = runs.load_checkpoint(run_dir / runs.CHECKPOINTS / "last.pt")
        check_resumable(state.get("config", {}), config, run_dir)  # before the data is read
        trainer = Trainer(config, callbacks, model)
        trainer.resume_from(run_dir, state, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return trainer.fit()
