"""Fine-tune GPT-2 to classify SMS messages as spam or not spam: chapter 6's run, end to end.

    python finetune.py                       # the chapter's run: GPT-2 small, 5 epochs
    python finetune.py --device cuda --precision bf16
    python finetune.py --weights random --data SMSSpamCollection --max-steps 20   # offline

It prints what the chapter prints (the same losses and accuracies, given the same weights), and
leaves a run folder that `python evaluate.py --run DIR` uses: the fine-tuned weights with their
settings (run.json, model.safetensors), metrics.json, log.txt and the loss and accuracy plots.
"""

import argparse
import contextlib
import errno
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from torch.utils.data import DataLoader

import data
import ddp
import gpt
import shortcuts
from evaluate import calc_accuracy_loader, select_device

SPLIT_TITLES = {"train": "Training", "validation": "Validation", "test": "Test"}


@dataclass
class TrainConfig:
    data: str = None
    train_file: str = None
    val_file: str = None
    test_file: str = None
    format: str = None
    text_column: str = "text"
    label_column: str = "label"
    labels: str = None
    val_frac: float = None
    test_frac: float = None
    class_weights: str = None
    weights: str = "small"
    device: str = "auto"
    output_dir: str = None
    overwrite: bool = False
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_freq: int = 50
    eval_iter: int = 5
    seed: int = 123
    max_steps: int = None
    trainable_layers: str = "last_block"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    token_position: str = None  # last for the chapter's data, flexible for own files
    average_embeddings: bool = False
    context_length: str = None  # longest for the chapter's data, batch for own files
    group_by_length: bool = False
    no_padding: bool = False
    accumulation_steps: int = 1
    disable_causal_mask: bool = False
    ignore_index: int = -100
    fast: bool = True  # the exact shortcuts (--no-shortcuts turns them off)
    precision: str = "fp32"
    tf32: bool = False  # CUDA's fp32 products in TF32: quicker, not the chapter's numbers
    plain: bool = False
    initial_eval: bool = True
    trunk_cache_gb: float = None  # the trunk cache's cap; None: a quarter of RAM or free GPU
    self_contained: bool = False


# ----------------------------------------------------------------------------- loss, evaluation

def calc_loss_batch(input_batch, target_batch, model, device, ignore_index=-100, weight=None):
    """Cross-entropy of the class logits against the labels, for one batch (`weight`: one
    weight per class, --class-weights; the mean is then weighted)."""
    # Asynchronous only from pinned memory (the loaders pin for CUDA): from pageable memory an
    # asynchronous copy gains nothing on CUDA and has given wrong numbers on MPS.
    input_batch = input_batch.to(device, non_blocking=input_batch.is_pinned())
    target_batch = target_batch.to(device, non_blocking=target_batch.is_pinned())
    logits = model(input_batch)  # (B, num_classes)
    return F.cross_entropy(logits, target_batch, ignore_index=ignore_index, weight=weight)


def calc_loss_loader(data_loader, model, device, num_batches=None, ignore_index=-100,
                     weight=None):
    """Mean loss over the first `num_batches` batches (all by default); NaN for an empty loader."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    # Starting an iteration draws a shuffling loader's order from torch's RNG (as the chapter's).
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        if ddp.world() > 1:
            total_loss += eval_loss_over_ranks(input_batch, target_batch, model, device,
                                               ignore_index, weight)
        else:
            total_loss += calc_loss_batch(input_batch, target_batch, model, device,
                                          ignore_index, weight).item()
    return total_loss / num_batches


def eval_loss_over_ranks(input_batch, target_batch, model, device, ignore_index=-100,
                         weight=None):
    """Under torchrun: the mean loss of a whole batch of which each process holds a share
    (the sums of the example losses and their counts, added up over the processes; with class
    weights, the weighted sums and the weights)."""
    input_batch, target_batch = ddp.share(input_batch), ddp.share(target_batch).to(device)
    loss_sum = 0.0
    if len(target_batch):  # the last batch of an evaluation may leave a process none
        logits = model(input_batch.to(device))
        loss_sum = F.cross_entropy(logits, target_batch, ignore_index=ignore_index,
                                   weight=weight, reduction="sum").item()
    kept = target_batch[target_batch != ignore_index]
    count = len(kept) if weight is None else weight[kept].sum()
    loss_sum, count = ddp.sum_over_ranks(loss_sum, count)
    return loss_sum / count if count else float("nan")


def training_loss_batch(input_batch, target_batch, model, device, ignore_index=-100,
                        weight=None):
    """The loss a training step backpropagates: the batch's mean loss. Under torchrun, this
    process's share of it, scaled so that DDP's average over the processes' gradients is the
    whole batch's: the mean of its share, or with class weights its weighted sum over the whole
    batch's sum of weights (added up over the processes) times their number."""
    input_batch, target_batch = ddp.share(input_batch), ddp.share(target_batch)
    # The trunk cache reads its keys from the host's copy: the step never waits for the device.
    with shortcuts.keys_from(model, input_batch):
        if ddp.world() == 1 or weight is None:
            return calc_loss_batch(input_batch, target_batch, model, device, ignore_index, weight)
        target_batch = target_batch.to(device)
        loss_sum = F.cross_entropy(model(input_batch.to(device)), target_batch, weight=weight,
                                   ignore_index=ignore_index, reduction="sum")
    (weights,) = ddp.sum_over_ranks(weight[target_batch[target_batch != ignore_index]].sum())
    return loss_sum * ddp.world() / weights


def evaluate_model(model, train_loader, val_loader, device, eval_iter, ignore_index=-100,
                   weight=None):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, ignore_index,
                                      weight)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, ignore_index, weight)
    model.train()
    return train_loss, val_loss


# ----------------------------------------------------------------------------- training

class Diverged(Exception):
    """Training reached a non-finite loss or weights; the message says where and what to try."""


def diverged(what, step, epoch, cfg):
    """Diverged for `what` (e.g. "the training loss is nan") at a step, with what to try."""
    tips = f"a smaller --lr (now {cfg.lr:g}) or --weight-decay (now {cfg.weight_decay:g})"
    if cfg.precision == "fp16":
        tips += ", or --precision bf16 or fp32 (fp16 overflows where they do not)"
    return Diverged(f"{what} at step {step} (epoch {epoch + 1}): training diverged and was "
                    f"stopped; try {tips}")


def check_finite_weights(model, step, epoch, cfg):
    """Raise Diverged if a trainable weight holds NaN or inf: one device sync, so it is done
    once per epoch, not per step."""
    model = getattr(model, "module", model)  # under torchrun: the Classifier under DDP
    model = getattr(model, "gpt", model)  # the GPTModel under a Classifier: its own names
    bad = gpt.nonfinite({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    if bad:
        raise diverged(f"the weight {bad[0]} holds NaN or infinite values", step, epoch, cfg)


def progress(loader, epoch):
    """A progress bar over an epoch's batches, on stderr and only in a terminal (tqdm)."""
    return data.progress(loader, desc=f"Epoch {epoch + 1}", unit="batch")


def train(model, loaders, optimizer, cfg, device, scaler=None, class_weights=None):
    """The chapter's `train_classifier_simple`: returns the history as a dict.

    Each step: zero grads, loss, backward, step. Every `eval_freq` steps the mean loss over the
    first `eval_iter` batches of train and validation; after each epoch the accuracy over the first
    `eval_iter` batches of each. With `accumulation_steps` K the gradients of K batches are summed
    (each loss divided by K, so they average) before one optimizer step; a last, shorter group
    is stepped too. `class_weights` (a tensor, one per class) weights the loss.
    """
    train_loader, val_loader = loaders["train"], loaders["validation"]
    history = {"train_losses": [], "val_losses": [], "train_accs": [], "val_accs": [],
               "examples_seen": 0, "steps": 0,
               # examples seen at each loss and accuracy point: the plots' x positions
               "loss_examples_seen": [], "acc_examples_seen": [],
               "examples_per_epoch": len(train_loader) * (  # (a batch sampler: length groups)
                   train_loader.batch_size or train_loader.batch_sampler.batch_size)}
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    examples_seen, global_step, k = 0, -1, cfg.accumulation_steps
    for epoch in range(cfg.epochs):
        model.train()
        for batch_idx, (input_batch, target_batch) in enumerate(progress(train_loader, epoch)):
            if batch_idx % k == 0:
                optimizer.zero_grad(set_to_none=True)
            last = cfg.max_steps is not None and global_step + 2 >= cfg.max_steps  # --max-steps
            stepping = (batch_idx + 1) % k == 0 or batch_idx + 1 == len(train_loader) or last
            # Under torchrun each process takes its share of the batch, and DDP averages the
            # gradients over the processes once per optimizer step.
            with ddp.no_sync(model, not stepping):
                loss = training_loss_batch(input_batch, target_batch, model, device,
                                           cfg.ignore_index, class_weights)
                # fp16 gradients underflow without scaling; the scaler is a no-op otherwise.
                scaler.scale(loss / k if k > 1 else loss).backward()
            if stepping:
                scaler.step(optimizer)
                scaler.update()
            examples_seen += input_batch.shape[0]
            global_step += 1

            if global_step % cfg.eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device,
                                                      cfg.eval_iter, cfg.ignore_index,
                                                      class_weights)
                history["train_losses"].append(train_loss)
                history["val_losses"].append(val_loss)
                history["loss_examples_seen"].append(examples_seen)
                print(f"Ep {epoch+1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}", flush=True)
                # The losses are Python numbers already: checking them costs no device sync.
                for name, loss in (("training", train_loss), ("validation", val_loss)):
                    if not math.isfinite(loss) and (name == "training" or len(val_loader)):
                        raise diverged(f"the {name} loss is {loss}", global_step, epoch, cfg)
            if cfg.max_steps is not None and global_step + 1 >= cfg.max_steps:
                break

        check_finite_weights(model, global_step, epoch, cfg)  # argmax of NaN is a number
        train_accuracy = calc_accuracy_loader(train_loader, model, device, cfg.eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, cfg.eval_iter)
        print(f"Training accuracy: {train_accuracy*100:.2f}% | ", end="")
        print(f"Validation accuracy: {val_accuracy*100:.2f}%", flush=True)
        history["train_accs"].append(train_accuracy)
        history["val_accs"].append(val_accuracy)
        history["acc_examples_seen"].append(examples_seen)
        if cfg.max_steps is not None and global_step + 1 >= cfg.max_steps:
            break
    history["examples_seen"], history["steps"] = examples_seen, global_step + 1
    return history


# ----------------------------------------------------------------------------- outputs

def plot_values(epochs_seen, examples_seen, train_values, val_values, label, out_dir,
                span=None):
    """The chapter's plot: values against epochs, with examples seen on a second x axis.

    The points sit at the epochs and examples actually seen when each value was measured, and
    the axes span (epochs, examples) of the whole run (default: up to the last point), so a
    short run (--max-steps) is drawn at its true scale; a run with few points marks each one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs_seen, examples_seen = list(map(float, epochs_seen)), list(map(float, examples_seen))
    marker = "o" if len(epochs_seen) < 5 else None
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, marker=marker, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", marker=marker,
             label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend()
    ax1.set_xlim(0, max(epochs_seen[-1] if span is None else span[0], 1e-9))
    ax2 = ax1.twiny()  # a second x axis on the same y axis: examples seen
    ax2.set_xlim(0, max(examples_seen[-1] if span is None else span[1], 1e-9))
    ax2.set_xlabel("Examples seen")
    fig.tight_layout()
    for ext in ("pdf", "png"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext)
        data.write_atomic(Path(out_dir) / f"{label}-plot.{ext}", buf.getvalue())
    plt.close(fig)


def plot_history(history, out_dir):
    """The loss and accuracy plots, against the epochs and examples seen at each point (the
    chapter spreads them evenly over the epochs asked for, which only fits a whole run).
    Returns the names of the files written."""
    written = []
    per_epoch = history["examples_per_epoch"]
    for label, train_key, val_key, at in (
            ("loss", "train_losses", "val_losses", "loss_examples_seen"),
            ("accuracy", "train_accs", "val_accs", "acc_examples_seen")):
        if not history[train_key]:
            continue
        examples_seen = history[at]
        epochs_seen = [n / per_epoch for n in examples_seen]
        span = (history["examples_seen"] / per_epoch, history["examples_seen"])
        plot_values(epochs_seen, examples_seen, history[train_key], history[val_key], label,
                    out_dir, span)
        written += [f"{label}-plot.pdf", f"{label}-plot.png"]
    return written


class Tee:
    """Writes to the terminal and to the run's log file at once, a whole line at a time, with
    any progress bar cleared meanwhile: a bar never shares a line with the log."""

    def __init__(self, *streams):
        self.streams, self.pending = streams, ""

    def write(self, text):
        self.pending += text
        if "\n" in self.pending:
            lines, _, self.pending = self.pending.rpartition("\n")
            self._emit(lines + "\n")
        return len(text)

    def _emit(self, text):
        with data.bars_paused():
            for s in self.streams:
                s.write(text)

    def flush(self):
        if self.pending:
            text, self.pending = self.pending, ""
            self._emit(text)
        for s in self.streams:
            s.flush()


def weights_to_save(model, base, merge=True):
    """(file name, tensors) that the run folder keeps of the trained model.

    With `base` (the identity of the weights training started from, see gpt.base_identity) only
    what training changed: the trainable tensors and the new class head, in trained.safetensors,
    which evaluate.py lays over the base again. Without one (random weights, --self-contained),
    or where every tensor trained anyway, the whole model in model.safetensors, LoRA folded in
    (which changes `model` in place: call it last; `merge=False` leaves LoRA unfolded, for an
    estimate of the size).
    """
    state = model.state_dict()
    if base is not None:
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        keep = {k: v for k, v in state.items() if k in trained or k.startswith("out_head.")}
        if len(keep) < len(state):
            return "trained.safetensors", keep
    if merge and any(isinstance(m, gpt.LoRALinear) for m in model.modules()):
        gpt.merge_lora(model)  # a plain GPT-2 with a class head
        state = model.state_dict()
    return "model.safetensors", state


def save_model(tensors, path):
    """Tensors as safetensors, written atomically."""
    from safetensors.torch import save
    data.write_atomic(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def dropped_examples(loader):
    """Indices of the examples that the next pass over `loader` leaves out (drop_last).

    Replays the pass's draws on a copy of torch's RNG (a DataLoader over the indices with the
    same batch sampler draws exactly as one over the data does), so the RNG itself is left as
    it was.
    """
    n = len(loader.dataset)
    with torch.random.fork_rng(devices=[]):
        replay = DataLoader(range(n), batch_sampler=loader.batch_sampler)
        seen = {int(i) for batch in replay for i in batch}
    return sorted(set(range(n)) - seen)


# Every file a run writes (run.json lists those of each finished run, too): --overwrite
# replaces a folder only when it holds nothing else.
RUN_FILES = {"run.json", "log.txt", "metrics.json", "model.safetensors", "trained.safetensors",
             "loss-plot.pdf", "loss-plot.png", "accuracy-plot.pdf", "accuracy-plot.png"}


class RunFailed(Exception):
    """A run that stopped after its folder was made; the message says what was kept, where."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was kept, where."""


def unfinished_path(out):
    """Where a run that will replace the finished run in `out` is built until it finishes."""
    return out.with_name(out.name + ".unfinished")


def run_files(out):
    """The names in `out` that finetune.py wrote (`out` holding a finished run)."""
    try:
        listed = set(json.loads((out / "run.json").read_text(encoding="utf-8")).get("files", []))
    except (OSError, ValueError, AttributeError):
        listed = set()
    return RUN_FILES | listed


def plan_output_dir(cfg):
    """(run folder, whether it holds a finished run that --overwrite replaces), checked before
    any work and without touching anything. Raises ValueError or data.DataError."""
    if cfg.output_dir is None:
        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        while out.exists():  # two runs started within the same second
            out = out.with_name(out.name + "-1")
    else:
        out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file, not a folder")
    replace = (out / "run.json").is_file()
    if replace and not cfg.overwrite:
        raise ValueError(f"{out} holds a finished run; pass --overwrite to replace it, or "
                         "choose another --output-dir")
    others = sorted(n for n in os.listdir(out) if n not in run_files(out)
                    and not n.endswith(".part")) if out.is_dir() else []
    if others:  # never overwrite or delete what a user put there (their weights, say)
        names = f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
        if replace:
            raise ValueError(f"--overwrite would replace the run folder {out}, but it also "
                             f"holds {names}, which finetune.py did not write; move them out "
                             "first, or choose another --output-dir")
        raise ValueError(f"--output-dir {out} already holds {names}, which finetune.py did not "
                         "write; choose a new or empty folder")
    if replace:
        if (unfinished_path(out) / "run.json").exists():
            raise ValueError(f"{unfinished_path(out)} holds a finished run that was never moved "
                             f"into {out}; rename or delete it first")
    data.check_writable(out, "--output-dir", "choose another --output-dir, on a disk that can be "
                        "written")
    return out, replace


def check_free_space(out, tensors):
    """Refuse a run whose files will not fit on the disk, before training rather than after."""
    need = sum(t.numel() * t.element_size() for t in tensors.values()) + (2 << 20)  # + plots
    there = data.existing_parent(out)
    free = shutil.disk_usage(there).free
    if free < need:
        raise ValueError(f"--output-dir {out}: the run will write about {need / 1e6:,.0f} MB, but "
                         f"only {free / 1e6:,.0f} MB are free on the disk of {there}; free some "
                         "space or choose another --output-dir")


class RunLog:
    """log.txt: held in memory until the run folder is made, then written there line by line
    (and still kept in memory: a few kB, for a run saved elsewhere when its folder fails)."""

    def __init__(self):
        self.early, self.file = io.StringIO(), None

    def write(self, text):
        self.early.write(text)
        if self.file:
            self.file.write(text)
        return len(text)

    def text(self):
        return self.early.getvalue()

    def flush(self):
        if self.file:
            self.file.flush()


class RunFolder:
    """The run folder, made only when `make()` is called: once every input has passed its checks.

    Used as `with RunFolder(out, replace) as folder:` around the whole run, it decides what a
    failure leaves. Before `make()`, nothing: the error passes through and no folder was made.
    After it, the log (with the error line) is kept and the error raised says what was kept,
    where. A new or unfinished `out` is written in place; a finished run in `out` (--overwrite)
    stays untouched while the new run is built in out.unfinished, which takes its place only
    once it has finished (`swap_in`).
    """

    def __init__(self, out, replace):
        self.out, self.replace, self.log = out, replace, RunLog()
        self.work = unfinished_path(out) if replace else out
        self.made = False

    def make(self):
        work = self.work
        if self.replace and work.exists():
            shutil.rmtree(work)  # an earlier attempt that did not finish
        work.mkdir(parents=True, exist_ok=True)
        self.log.file = open(work / "log.txt", "w", encoding="utf-8", buffering=1)
        self.log.file.write(self.log.text())
        self.made = True
        return work

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if not self.made:
            return False
        try:
            self.log.file.close()
            if e is None and self.replace:
                swap_in(self.work, self.out)
        except OSError as late:
            e = late
        if e is None:
            return False
        error = self.failed(e)
        if error is e:
            return False  # an unexpected error (a bug): logged, and raised as it is
        raise error from e

    def failed(self, e):
        """The error to raise for `e`, its line written to the log as well."""
        out, work = self.out, self.work
        if work == out:
            kept = f"{out / 'log.txt'} keeps the log; the run is unfinished (no run.json)"
        else:
            kept = (f"the finished run in {out} is unchanged; this run's log is in "
                    f"{work / 'log.txt'}")
        if isinstance(e, KeyboardInterrupt):
            error, message = Interrupted, "interrupted"
        elif isinstance(e, OSError):
            error, message = RunFailed, f"could not write {data.describe_os_error(e)}"
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                message += "; free some space, then train again"
        elif isinstance(e, (ValueError, data.DataError, gpt.WeightsError, Diverged, RunFailed)):
            error, message = RunFailed, str(e)
        else:
            error, message = None, f"{type(e).__name__}: {e}"
        line = f"{message}. Kept: {kept}"
        try:
            with open(work / "log.txt", "a", encoding="utf-8") as f:
                f.write(f"{'' if error is Interrupted else 'error: '}{line}\n")
        except OSError:
            pass  # a full disk, say: the line still goes to the terminal
        return error(line) if error else e


class NoFolder:
    """The run folder of a process other than rank 0 under torchrun: nothing written or printed."""

    def __init__(self):
        self.log = open(os.devnull, "w")

    def make(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.log.close()
        return False


def swap_in(work, out):
    """Move the finished run in `work` to `out`, in place of the finished run there.

    Two renames: at every moment `out` holds a finished run, except between them, where a crash
    would leave the old run in out.replaced and the new one in out.unfinished, both whole.
    """
    old = out.with_name(out.name + ".replaced")
    if old.exists():
        shutil.rmtree(old)  # a run replaced earlier, by a swap cut short after its second rename
    os.rename(out, old)
    os.rename(work, out)
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old)


def write_run(folder, tensors, metrics, info, history):
    """The finished run's files in `folder`: weights, metrics, plots, then run.json, whose
    presence marks the run as finished (every file written atomically)."""
    save_model(tensors, folder / info["weights_file"])
    data.write_json(folder / "metrics.json", metrics)
    files = plot_history(history, folder)
    files += [info["weights_file"], "metrics.json", "run.json", "log.txt"]
    data.write_json(folder / "run.json", {**info, "files": sorted(files)})


def rescue(e, tensors, metrics, info, history, log):
    """What to say when the run folder could not take the finished run: the run is written,
    whole, to a new folder in the system's temporary folder (another disk, often) instead."""
    message = f"could not write {data.describe_os_error(e)}"
    try:
        spare = Path(tempfile.mkdtemp(prefix="gpt2-classify-run-"))
        write_run(spare, tensors, metrics, info, history)
        data.write_atomic(spare / "log.txt", log.text().encode("utf-8"))
    except OSError as again:
        return f"{message}, nor in the temporary folder ({data.describe_os_error(again)}); " \
            "free some space, then train again"
    return (f"{message}; the finished run was saved to {spare} instead (evaluate.py --run "
            f"{spare} uses it): move it where you want it")


# ----------------------------------------------------------------------------- set-up and CLI

def check_config(cfg):
    """Refuse settings that cannot work, with a message that says what to do."""
    positive = ("epochs", "batch_size", "eval_freq", "eval_iter", "accumulation_steps",
                "lora_rank")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be 1 or more")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError("--max-steps must be 1 or more")
    big = torch.finfo(torch.float32).max  # the optimizer computes in float32
    if not 0 < cfg.lr < big:
        raise ValueError("--lr must be a positive number")
    if not 0 <= cfg.weight_decay < big:
        raise ValueError("--weight-decay must be a finite number, 0 or more")
    ctx = cfg.context_length
    if ctx is not None and ctx not in ("batch", "longest", "model") and not ctx.isdigit():
        raise ValueError("--context-length must be batch, longest, model or a number of tokens")
    if ctx is not None and ctx.isdigit() and int(ctx) < 1:
        raise ValueError("--context-length must be at least 1 token")
    if cfg.no_padding and cfg.batch_size != 1:
        raise ValueError("--no-padding needs --batch-size 1 (texts of different lengths cannot "
                         "share a batch); use --accumulation-steps K to average over K texts")
    if cfg.trunk_cache_gb is not None and not cfg.trunk_cache_gb >= 0:
        raise ValueError("--trunk-cache-gb must be 0 (no cache) or more")
    if cfg.average_embeddings and cfg.token_position not in (None, "last"):
        raise ValueError("--average-embeddings pools every position; drop --token-position")
    if cfg.batch_size % ddp.world():
        raise ValueError(f"--batch-size {cfg.batch_size} does not split evenly over "
                         f"{ddp.world()} processes; --batch-size is the whole batch of a step, "
                         f"shared among them: pass a multiple of {ddp.world()}")
    if ctx == "batch" and (cfg.average_embeddings or cfg.token_position == "last"):
        raise ValueError("--context-length batch pads each batch only to its own longest text, "
                         "so the last position (or the mean of all) would depend on the batch; "
                         "use --token-position flexible, or --context-length longest")
    class_weight_values(cfg.class_weights)  # refuses a malformed list early


def data_choices(cfg):
    """(token position, context length) of the run: the flags where given, else the data's
    defaults: the chapter's last position and longest-text padding for its SMS data; for own
    files the last real token (flexible), each batch padded only to its own longest text."""
    own = cfg.train_file is not None
    position = cfg.token_position or ("flexible" if own and not cfg.average_embeddings
                                      else "last")
    ctx = cfg.context_length
    if ctx is None:
        ctx = ("batch" if own and position != "last" and not cfg.average_embeddings
               and not cfg.no_padding else "longest")
    if cfg.group_by_length and (ctx != "batch" or cfg.no_padding):
        raise ValueError("--group-by-length groups texts of similar length so that batches "
                         "need less padding; it needs per-batch padding (--context-length "
                         "batch, the default for own files)")
    return position, ctx


def class_weight_values(spec):
    """--class-weights: None, "balanced", or a list of positive numbers (ValueError if not)."""
    if spec is None or spec == "balanced":
        return spec
    try:
        values = [float(x) for x in spec.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--class-weights {spec!r}: give balanced, or one positive number per "
                         "class in the class order, such as 1,4,2")
    return values


def class_weights(spec, train_labels, class_names, device=None):
    """The loss's per-class weights as a tensor on `device` (None for none). `balanced`:
    n / (C * n_c), inverse frequency in the training split, so every class weighs the same in
    total."""
    values = class_weight_values(spec)
    if values is None:
        return None
    counts = [sum(label == i for label in train_labels) for i in range(len(class_names))]
    if values == "balanced":
        values = [len(train_labels) / (len(class_names) * n) for n in counts]
    elif len(values) != len(class_names):
        raise ValueError(f"--class-weights gives {len(values)} weights for "
                         f"{len(class_names)} classes ({', '.join(class_names)}); give one "
                         "per class, in that order")
    return torch.tensor(values, dtype=torch.float32, device=device)


def shortcuts_on(cfg):
    """Whether the run takes the exact shortcuts: by default, unless --no-shortcuts or --plain
    (the chapter's computation step by step)."""
    return cfg.fast and not cfg.plain


def build_classifier(model, cfg, device, on_full=None, position=None):
    """Wrap the set-up model with the run's choices, and the exact shortcuts unless they are off
    (shortcuts.for_training: the frozen-trunk cache, the last block at the classified position).
    Returns (classifier, note): the note says why the cache is off, or None. `position`: the
    classified position (default: cfg's, or the chapter's last)."""
    fast, note = None, None
    if shortcuts_on(cfg):
        max_bytes = None if cfg.trunk_cache_gb is None else int(cfg.trunk_cache_gb * 2**30)
        if max_bytes is None and device.type == "cpu" and ddp.local_world() > 1:
            max_bytes = shortcuts.default_cache_bytes() // ddp.local_world()  # processes share RAM
        fast, note = shortcuts.for_training(model, max_bytes, on_full, data.PAD_ID)
    classifier = gpt.Classifier(model, position=position or cfg.token_position or "last",
                                average=cfg.average_embeddings,
                                autocast_dtype=gpt.PRECISIONS[cfg.precision], shortcuts=fast)
    return classifier, note


# The device types torch's fused AdamW runs on (torch's own list).
FUSED_DEVICES = _get_fused_kernels_supported_devices()


def build_optimizer(model, cfg, device):
    """AdamW over all parameters, as the chapter does (frozen ones get no gradient, so AdamW
    leaves them be). With the shortcuts on, one fused kernel does the whole update, on every
    device torch has it for (CPU, CUDA, MPS, ...): the same formula, rounded differently, and
    on a CPU about 5x quicker than the loop over tensors."""
    fused = shortcuts_on(cfg) and device.type in FUSED_DEVICES or None
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=fused)


def warm_up(device):
    """Start the device's maths libraries (cuBLAS on CUDA) with one small product, and wait for
    it: what a first product costs is start-up, not training. Nothing on a CPU."""
    if device.type == "cpu":
        return
    x = torch.ones(8, 8, device=device)
    x @ x
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def run(cfg):
    """The whole chapter-6 procedure; returns the run folder. Raises ValueError,
    data.DataError, gpt.WeightsError for bad input (checked before the run folder is touched),
    RunFailed or Interrupted for a run that failed or was stopped later."""
    check_config(cfg)
    position, ctx = data_choices(cfg)
    device = ddp.device_for_rank(select_device(cfg.device))  # under torchrun: LOCAL_RANK's GPU
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; use --precision bf16 instead")
    if cfg.tf32 and device.type != "cuda":
        raise ValueError(f"--tf32 is a CUDA setting, and this run is on {device.type}; drop "
                         "--tf32, or pass --device cuda")
    if cfg.tf32:  # off by default (full fp32), as PyTorch's own default
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    if ddp.is_main():
        out, replace = plan_output_dir(cfg)
        folder = RunFolder(out, replace)
    else:  # under torchrun rank 0 alone prints and writes the run folder
        out, folder = None, NoFolder()
    start = time.time()
    with folder, contextlib.redirect_stdout(Tee(sys.stdout, folder.log) if out else folder.log):
        print(f"Run folder: {out}  (device: {device}, precision: {cfg.precision}"
              f"{f', {ddp.world()} processes' if ddp.world() > 1 else ''})")

        # 1. Data: labelled rows, split (the chapter's balanced split, or the user's files),
        # tokenized; max_length from the training set.
        labelled = data.load_labelled(cfg)
        splits, class_names = labelled.splits, labelled.class_names
        for note in labelled.notes:
            print(note)
        weight = class_weights(cfg.class_weights, [y for y, _ in splits["train"]], class_names,
                               device)  # on the device: every loss, from the first, uses it
        tokenizer = data.get_tokenizer()

        # 2. The model (random weights are drawn right after seeding).
        torch.manual_seed(cfg.seed)  # the initial weights, where they are random
        model = gpt.load_gpt(cfg.weights, plain=cfg.plain)
        # What the run folder needs to find these weights again, if it is not to hold them all.
        base = None if cfg.self_contained else gpt.base_identity(model)
        if cfg.disable_causal_mask:
            gpt.set_causal(model, False)
        context = model.cfg.context_length
        max_length = {"longest": None, "batch": None, "model": context}.get(ctx)
        if ctx.isdigit():
            max_length = int(ctx)
        if cfg.no_padding:
            max_length = context  # texts keep their own lengths, cut to what the model takes
        if max_length is not None and max_length > context:
            raise ValueError(f"--context-length {max_length} is longer than the model's context:"
                             f" the model takes {context} tokens; pass {context} or less, or "
                             "longest")
        pad = False if cfg.no_padding else "batch" if ctx == "batch" else True
        # Cut at the longest training text, at most the model's context.
        train_ds = data.TextDataset(splits["train"], tokenizer, max_length, pad=pad,
                                    limit=context)
        datasets = {"train": train_ds}
        for name in list(splits)[1:]:
            datasets[name] = data.TextDataset(splits[name], tokenizer, train_ds.max_length,
                                              pad=pad)
        names = list(datasets)
        # A --context-length shorter than the texts (never the chapter's default); for own
        # files, any text longer than the longest training text or the model's context.
        if train_ds.cut or (cfg.train_file is not None and any(ds.cut for ds in
                                                               datasets.values())):
            print(cut_note(datasets))

        # 3. Loaders, built right after seeding (the chapter's order; they draw when iterated).
        torch.manual_seed(cfg.seed)
        loaders = data.create_loaders(datasets, batch_size=cfg.batch_size,
                                      pin_memory=device.type == "cuda",
                                      group_by_length=cfg.group_by_length)
        if len(loaders["train"]) == 0:
            raise ValueError(f"the training split has {len(train_ds)} examples, fewer than one "
                             f"batch of {cfg.batch_size}; lower --batch-size or add rows")
        if cfg.train_file is not None:
            print(f"{len(class_names)} classes, rows per split ({' / '.join(names)}): " + "; ".join(
                f"{c} " + " / ".join(str(sum(y == i for y in datasets[n].labels)) for n in names)
                for i, c in enumerate(class_names)))
        shown = ", ".join(f"{len(ds)} {dict(train='training').get(n, n)}"
                          for n, ds in datasets.items())
        padded = (" (each batch padded to its own longest text)" if pad == "batch" else "")
        print(f"{shown} examples{'' if 'test' in datasets else ' (no test split)'}; "
              f"max_length {train_ds.max_length}{padded}; batches "
              + " / ".join(str(len(loaders[n])) for n in names))

        # 4. Classification set-up: freeze, new head (drawn right after seeding), unfreeze.
        torch.manual_seed(cfg.seed)
        gpt.setup_classifier(model, len(class_names), cfg.trainable_layers,
                             cfg.lora_rank, cfg.lora_alpha)
        model.to(device)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"Trainable parameters: {n_train:,} of {n_all:,}")

        # The run folder's weights file must fit on its disk: known now, before any long work.
        if out:
            check_free_space(out, weights_to_save(model, base, merge=False)[1])
        ddp.barrier()  # under torchrun: every process has passed its checks too

        # Every input has passed its checks: only now is the run folder made. From here on a
        # failure keeps the log, the error line in it (a finished run being replaced: as it was).
        work = folder.make()
        if cfg.initial_eval:  # the chapter's look before training; the run reseeds below
            # own cache: training starts cold
            before, _ = build_classifier(model, cfg, device, position=position)
            torch.manual_seed(cfg.seed)
            total = sum(min(n, len(loaders[s])) for n in (10, 5) for s in names)
            with data.progress(total=total, desc="Looking before training", unit="batch") as bar:
                ticking = {s: data.Ticking(loaders[s], bar) for s in names}
                accs = [calc_accuracy_loader(ticking[s], before, device, num_batches=10)
                        for s in names]
                with torch.no_grad():
                    losses = [calc_loss_loader(ticking[s], before, device, 5, cfg.ignore_index,
                                               weight) for s in names]
            del before
            print("Before fine-tuning (accuracy over 10 batches, loss over 5):")
            for s, acc in zip(names, accs):
                print(f"{SPLIT_TITLES[s]} accuracy: {acc*100:.2f}%")
            for s, loss in zip(names, losses):
                print(f"{SPLIT_TITLES[s]} loss: {loss:.3f}")

        # 5. Training: AdamW over all parameters (frozen ones have no gradient, so stay put).
        classifier, note = build_classifier(model, cfg, device, on_full=print,
                                            position=position)
        warm_up(device)  # the device's start-up (CUDA's libraries) outside the timed phase
        start_time = time.time()
        torch.manual_seed(cfg.seed)
        optimizer = build_optimizer(model, cfg, device)
        print(shortcuts.describe(classifier, optimizer, cfg.precision) if shortcuts_on(cfg) else
              f"Shortcuts: off ({'--plain' if cfg.plain else '--no-shortcuts'})")
        if note:
            print(note)
        shortcuts.prefill(classifier, loaders, cfg)  # inside the timed phase: it is the loop's work
        classifier = ddp.wrap(classifier, device)  # under torchrun: DDP over what trains
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        history = train(classifier, loaders, optimizer, cfg, device, scaler, weight)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_minutes = (time.time() - start_time) / 60
        print(f"Training completed in {train_minutes:.2f} minutes.")

        # 6. Accuracy over the whole of each split, through the chapter's loaders: the training
        # loader shuffles and drops its last partial batch, so this pass leaves out a few
        # examples (5 of 1,045); run.json names them so that evaluate.py leaves out the same.
        dropped = dropped_examples(loaders["train"])
        total = sum(len(loaders[s]) for s in names)
        with data.progress(total=total, desc="Accuracy on every split", unit="batch") as bar:
            final = {s: calc_accuracy_loader(data.Ticking(loaders[s], bar), classifier, device)
                     for s in names}
        for s in names:
            print(f"{SPLIT_TITLES[s]} accuracy: {final[s]*100:.2f}%")
        if not ddp.is_main():
            return None  # rank 0 writes the run folder

        # 7. The run folder's files, the weights (what matters most) first.
        weights_file, tensors = weights_to_save(model, base)
        bad = gpt.nonfinite(tensors)
        if bad:
            raise diverged(f"the weight {bad[0]} holds NaN or infinite values",
                           history["steps"] - 1, cfg.epochs - 1, cfg)
        metrics = {
            "history": history, "final_accuracy": final, "train_minutes": train_minutes,
            "total_minutes": (time.time() - start) / 60, "device": str(device),
            "device_name": device_name(device), "processes": ddp.world(),
            "torch": torch.__version__}
        info = {
            "model": asdict(model.cfg), "num_classes": len(class_names),
            "class_names": class_names, "max_length": train_ds.max_length,
            "pad_id": data.PAD_ID, "padding": pad, "context_length": ctx,
            "token_position": position, "average_embeddings": cfg.average_embeddings,
            "splits": {n: len(ds) for n, ds in datasets.items()},
            "precision": cfg.precision, "batch_size": cfg.batch_size,
            "final_train_dropped": dropped, "data": labelled.source, "flags": asdict(cfg),
            "weights_file": weights_file,
            "base": base if weights_file == "trained.safetensors" else None}
        try:
            write_run(work, tensors, metrics, info, history)
        except OSError as e:  # a full disk, say: the trained model is saved elsewhere if it can
            raise RunFailed(rescue(e, tensors, metrics, info, history, folder.log)) from e
        print(f"Saved the fine-tuned model to {out}")
    return out


def cut_note(datasets):
    """One line saying how many texts of each split a short --context-length cuts, and by how
    much."""
    parts = []
    for name, ds in datasets.items():
        if ds.cut:
            parts.append(f"{len(ds.cut):,} of {len(ds):,} {name} texts (by {min(ds.cut):,} to "
                         f"{max(ds.cut):,} tokens, {sum(ds.cut) / len(ds.cut):.0f} on average)")
        else:
            parts.append(f"none of the {name} texts")
    max_length = next(iter(datasets.values())).max_length
    return (f"note: the context length of {max_length} tokens cuts " + ", ".join(parts) +
            f"; only their first {max_length} tokens are classified")


# What run() raises for bad input or a failed run: one error line each, never a traceback.
ERRORS = (ValueError, data.DataError, gpt.WeightsError, Diverged, RunFailed, OSError)


def device_name(device):
    """What the device is, for the records: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple {platform.machine()} (MPS)"
    try:  # Linux: platform.processor() says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def parse_args(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Fine-tune GPT-2 as a spam classifier, exactly as "
                                "chapter 6 does (sections 6.4-6.8), by default through exact "
                                "shortcuts.")
    a = p.add_argument
    a("--data", metavar="PATH", help="the raw SMSSpamCollection file or its zip; no network is "
      "used (default: download once from UCI into the cache)")
    own = p.add_argument_group("your own labelled data (instead of the SMS data)")
    own.add_argument("--train-file", metavar="FILE", help="training rows: .csv, .tsv or .jsonl "
                     "with a text and a label column; validation and test are cut from it "
                     "(stratified) unless given")
    own.add_argument("--val-file", metavar="FILE", help="validation rows (same format rules)")
    own.add_argument("--test-file", metavar="FILE", help="test rows (same format rules)")
    own.add_argument("--format", choices=data.FORMATS,
                     help="the files' format (default: from each file's extension)")
    own.add_argument("--text-column", default=d.text_column, metavar="NAME",
                     help="the column (JSON key) holding the text, any case (default: text)")
    own.add_argument("--label-column", default=d.label_column, metavar="NAME",
                     help="the column (JSON key) holding the label, any case (default: label)")
    own.add_argument("--labels", metavar="A,B,C", help="the classes in this order (default: "
                     "numeric order where every label is an integer, else by name)")
    own.add_argument("--val-frac", type=float, metavar="X", help="share of each class cut "
                     "from --train-file for validation (default: 0.1; none with --val-file)")
    own.add_argument("--test-frac", type=float, metavar="X", help="share of each class cut "
                     "from --train-file for test (default: 0.2; 0 with --val-file)")
    own.add_argument("--class-weights", metavar="balanced|W1,W2,...",
                     help="weight the loss per class: balanced (inverse frequency in train) or "
                     "one number per class in the class order (default: none)")
    a("--weights", default=d.weights, metavar="NAME|DIR|random",
      help="small, medium, large or xl (OpenAI's GPT-2, downloaded once into the cache), a "
      "folder with config.json and model.safetensors, or random, random-medium, random-large, "
      "random-xl (random weights of that size) (default: small)")
    a("--device", default=d.device, choices=("auto", "cpu", "cuda", "mps"),
      help="auto picks cuda, then mps (torch >= 2.9 only), then cpu (default: auto)")
    a("--output-dir", metavar="DIR", help="the run folder (default: a new runs/<timestamp>)")
    a("--overwrite", action="store_true", help="replace a finished run in --output-dir (once "
      "the new run has finished; until then the old one stays as it is)")
    a("--self-contained", action="store_true", help="keep the whole model in the run folder "
      "(model.safetensors) instead of only what training changed (trained.safetensors) plus the "
      "name and sha256 of the base weights; always so with random weights")
    a("--epochs", type=int, default=d.epochs, help="passes over the training set (default: 5)")
    a("--batch-size", type=int, default=d.batch_size, help="examples per batch (default: 8)")
    a("--lr", type=float, default=d.lr, help="AdamW learning rate (default: 5e-5)")
    a("--weight-decay", type=float, default=d.weight_decay,
      help="AdamW weight decay (default: 0.1)")
    a("--eval-freq", type=int, default=d.eval_freq,
      help="print train and validation loss every this many steps (default: 50)")
    a("--eval-iter", type=int, default=d.eval_iter, help="batches used for those losses and for "
      "the accuracies printed after each epoch (default: 5)")
    a("--seed", type=int, default=d.seed, help="torch seed, set before each step of the "
      "procedure that draws random numbers (default: 123)")
    a("--max-steps", type=int, help="stop after this many training steps: a quick smoke run")
    a("--trainable-layers", default=d.trainable_layers, choices=gpt.TRAINABLE,
      help="what is trained: the head only (last_layer), also the last block and final norm "
      "(last_block, the chapter's), the last two blocks, all, or LoRA adapters (default: "
      "last_block)")
    a("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank (default: 16)")
    a("--lora-alpha", type=float, default=d.lora_alpha,
      help="LoRA alpha: the update is scaled by alpha, as in the book (default: 16)")
    a("--token-position", default=d.token_position, choices=("last", "first", "flexible"),
      help="the position classified: last (the chapter's), first, or flexible = the last "
      "non-padding token of each text (default: last; flexible for own files)")
    a("--average-embeddings", action="store_true",
      help="classify the mean of every position's output instead of one position")
    a("--context-length", default=d.context_length, metavar="batch|longest|model|N",
      help="pad each batch to its own longest text (batch), or every text to the longest "
      "training text, to the model's context, or to N tokens; texts are cut there, and at the "
      "model's context (default: longest, 120 tokens; batch for own files)")
    a("--group-by-length", action="store_true", help="draw training batches of texts of "
      "similar length (shuffled groups): less padding with --context-length batch")
    a("--no-padding", action="store_true",
      help="keep each text its own length (needs --batch-size 1)")
    a("--accumulation-steps", type=int, default=d.accumulation_steps,
      help="sum the gradients of this many batches per optimizer step (default: 1)")
    a("--disable-causal-mask", action="store_true",
      help="let every position attend to every other, later ones included")
    a("--ignore-index", type=int, default=d.ignore_index,
      help="label id the loss ignores (default: -100, none; the chapter's experiment uses 50256)")
    a("--fast", action="store_true", default=True, help="the exact shortcuts, on by default "
      "(kept for older command lines): cache the frozen blocks' outputs, run the last block "
      "at the classified position only, fused AdamW")
    a("--no-shortcuts", "--no-fast", dest="fast", action="store_false",
      help="turn the exact shortcuts off, keeping the fused kernels: every step computes the "
      "whole model, as the chapter does")
    a("--trunk-cache-gb", type=float, metavar="X", help="memory cap of the frozen-trunk cache in "
      "GiB; 0 turns the cache off (default: a quarter of the machine's RAM; on CUDA a quarter "
      "of the GPU's free memory)")
    a("--precision", default=d.precision, choices=tuple(gpt.PRECISIONS),
      help="fp32 (default, the chapter's), bf16 autocast (CPU and GPU) or fp16 autocast with "
      "gradient scaling (CUDA)")
    a("--tf32", action="store_true", help="CUDA: fp32 matrix products in TF32 (Ampere GPUs and "
      "newer): quicker, rounded to 10-bit mantissas, so not the chapter's numbers (default: "
      "off, full fp32)")
    a("--plain", action="store_true", help="the chapter's explicit formulas (attention scores, "
      "layer norm, GELU) instead of fused kernels: the benchmarks' baseline")
    a("--no-initial-eval", dest="initial_eval", action="store_false",
      help="skip the accuracies and losses printed before training")
    args = p.parse_args(argv)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def main(argv=None):
    cfg = parse_args(argv)
    try:
        ddp.init()  # a no-op unless torchrun started this process
        run(cfg)
    except ERRORS as e:
        # Under torchrun the first process to fail says why; torchrun then stops the others.
        sys.exit(f"error: {data.describe_os_error(e) if isinstance(e, OSError) else e}"
                 if ddp.first_to_fail() else 1)
    except Interrupted as e:
        sys.exit(str(e))
    except KeyboardInterrupt:
        sys.exit("interrupted before training began; no run folder was made"
                 if ddp.is_main() else 1)
    except Exception:
        if not ddp.first_to_fail():  # a collective cut off by the process that failed first
            sys.exit(1)
        raise
    ddp.close()


if __name__ == "__main__":
    main()
