"""Fine-tune GPT-2 to classify text: chapter 6's run, end to end, on its SMS spam data or on
your own labelled files (any number of classes).

    python finetune.py                       # the chapter's run: GPT-2 small, 5 epochs
    python finetune.py --device cuda --precision bf16
    python finetune.py --weights random --data SMSSpamCollection --max-steps 20   # offline
    python finetune.py --train-file reviews.csv --labels neg,neutral,pos

Read it beside the chapter: `calc_accuracy_loader`, `calc_loss_batch`, `calc_loss_loader`,
`evaluate_model`, `train_classifier_simple` and `plot_values` come first, under the chapter's
names and in its order; `run` is the procedure as a short list of steps. It prints what the
chapter prints (the same losses and accuracies, given the same weights), and leaves a run folder
that `python evaluate.py --run DIR` uses (see files.py). Every flag is a TrainConfig field.
`LongRun` attaches at the loop's seams what long runs need (checkpoints, `--resume DIR`,
`--keep-best`, `--early-stopping`; see docs/long-runs.md).
"""

import argparse
import contextlib
import io
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from torch.utils.data import DataLoader

import data
import ddp
import files
import gpt
import shortcuts


# ------------------------------------------------------------------------------ the run's settings

def option(default=None, help="", *, flags=None, group=None, **argparse_kw):
    """A TrainConfig field with its flag's help beside it. `help` may use {default}; `flags`
    replaces the flag made from the field's name; `group` lists the flag under a heading;
    booleans become store_true flags (or store_false, given `flags` and action); the rest of
    `argparse_kw` goes to argparse as it is."""
    return field(default=default, metadata={"help": help, "flags": flags, "group": group,
                                            **argparse_kw})


OWN = "your own labelled data (instead of the SMS data)"
LONG = "long runs: checkpoints, resuming, the best epoch, stopping early"
# Own files with more training rows than this leave the training split out of the final pass
# by default: on a 60,000-row file it took 4.6 of a 4.8-minute --max-steps 1 run.
FINAL_TRAIN_ROWS = 10_000
FORMATS = data.FORMATS  # (inside TrainConfig the field `data` hides the module)


@dataclass
class TrainConfig:
    """Every setting of a run: one field per finetune.py flag (--batch-size sets batch_size),
    its help beside it. run.json records them all."""
    data: str = option(help="the raw SMSSpamCollection file or its zip; no network is used "
                       "(default: download once from UCI into the cache)", metavar="PATH")
    train_file: str = option(group=OWN, metavar="FILE", help="training rows: .csv, .tsv or "
                             ".jsonl with a text and a label column; validation and test are "
                             "cut from it (stratified) unless given")
    val_file: str = option(group=OWN, metavar="FILE", help="validation rows (same format rules)")
    test_file: str = option(group=OWN, metavar="FILE", help="test rows (same format rules)")
    format: str = option(group=OWN, choices=FORMATS,
                         help="the files' format (default: from each file's extension)")
    text_column: str = option("text", group=OWN, metavar="NAME", help="the column (JSON key) "
                              "holding the text, any case (default: {default})")
    label_column: str = option("label", group=OWN, metavar="NAME", help="the column (JSON key) "
                               "holding the label, any case (default: {default})")
    labels: str = option(group=OWN, metavar="A,B,C", help="the classes in this order (default: "
                         "numeric order where every label is an integer, else by name)")
    label_names: str = option(group=OWN, metavar="0=ham,1=spam", help="a name for each label "
                              "(integer labels, say), which run.json, evaluate.py and the page "
                              "show (default: the labels themselves)")
    val_frac: float = option(group=OWN, type=float, metavar="X", help="share of each class "
                             "cut from --train-file for validation (default: 0.1; none with "
                             "--val-file)")
    test_frac: float = option(group=OWN, type=float, metavar="X", help="share of each class "
                              "cut from --train-file for test (default: 0.2; 0 with --val-file)")
    class_weights: str = option(group=OWN, metavar="balanced|W1,W2,...", help="weight the loss "
                                "per class: balanced (inverse frequency in train) or one number "
                                "per class in the class order (default: none)")
    weights: str = option("small", metavar="NAME|DIR|random", help="small, medium, large or xl "
                          "(OpenAI's GPT-2, downloaded once into the cache), a folder with "
                          "config.json and model.safetensors, or random, random-medium, "
                          "random-large, random-xl (random weights of that size) "
                          "(default: {default})")
    device: str = option("auto", choices=("auto", "cpu", "cuda", "mps"), help="auto picks "
                         "cuda, then mps (torch >= 2.9 only), then cpu (default: {default})")
    output_dir: str = option(metavar="DIR", help="the run folder (default: a new "
                             "runs/<timestamp>)")
    overwrite: bool = option(False, help="replace a finished run in --output-dir (once the new "
                             "run has finished; until then the old one stays as it is)")
    self_contained: bool = option(False, help="keep the whole model in the run folder "
                                  "(model.safetensors) instead of only what training changed "
                                  "(trained.safetensors) plus the name and sha256 of the base "
                                  "weights; always so with random weights")
    epochs: int = option(5, help="passes over the training set (default: {default})")
    batch_size: int = option(8, help="examples per batch (default: {default})")
    lr: float = option(5e-5, help="AdamW learning rate (default: {default:g})")
    weight_decay: float = option(0.1, help="AdamW weight decay (default: {default:g})")
    eval_freq: int = option(50, help="print train and validation loss every this many steps "
                            "(default: {default})")
    eval_iter: int = option(5, help="batches used for those losses and for the accuracies "
                            "printed after each epoch (default: {default})")
    seed: int = option(123, help="torch seed, set before each step of the procedure that draws "
                       "random numbers (default: {default})")
    max_steps: int = option(type=int, help="stop after this many training steps: a quick "
                            "smoke run (default: none)")
    trainable_layers: str = option("last_block", choices=gpt.TRAINABLE, help="what is trained: "
                                   "the head only (last_layer), also the last block and final "
                                   "norm (last_block, the chapter's), the last two blocks, all, "
                                   "or LoRA adapters (default: {default})")
    lora_rank: int = option(16, help="LoRA rank (default: {default})")
    lora_alpha: float = option(16.0, help="LoRA alpha: the update is scaled by alpha, as in the "
                               "book (default: {default:g})")
    token_position: str = option(choices=("last", "first", "flexible"), help="the position "
                                 "classified: last (the chapter's), first, or flexible = the "
                                 "last non-padding token of each text (default: last; flexible "
                                 "for own files)")
    average_embeddings: bool = option(False, help="classify the mean of every position's output "
                                      "instead of one position")
    context_length: str = option(metavar="batch|longest|model|N", help="pad each batch to its "
                                 "own longest text (batch), or every text to the longest "
                                 "training text, to the model's context, or to N tokens; texts "
                                 "are cut there, and at the model's context (default: longest, "
                                 "120 tokens; batch for own files)")
    group_by_length: bool = option(False, help="draw training batches of texts of similar "
                                   "length (shuffled groups): less padding with "
                                   "--context-length batch")
    no_padding: bool = option(False, help="keep each text its own length (needs --batch-size 1)")
    accumulation_steps: int = option(1, help="sum the gradients of this many batches per "
                                     "optimizer step (default: {default})")
    disable_causal_mask: bool = option(False, help="let every position attend to every other, "
                                       "later ones included")
    ignore_index: int = option(-100, help="label id the loss ignores (default: {default}, none; "
                               "the chapter's experiment uses 50256)")
    shortcuts: bool = option(True, flags=("--no-shortcuts", "--no-fast"), action="store_false",
                             help="turn the exact shortcuts off, keeping the fused kernels: "
                             "every step computes the whole model, as the chapter does "
                             "(default: on: the frozen blocks' outputs cached, the last block "
                             "run at the classified position only, fused AdamW)")
    trunk_cache_gb: float = option(type=float, metavar="X", help="memory cap of the "
                                   "frozen-trunk cache in GiB; 0 turns the cache off (default: "
                                   "a quarter of the machine's RAM; on CUDA a quarter of the "
                                   "GPU's free memory)")
    precision: str = option("fp32", choices=tuple(gpt.PRECISIONS), help="fp32 (the chapter's), "
                            "bf16 autocast (CPU and GPU) or fp16 autocast with gradient scaling "
                            "(CUDA) (default: {default})")
    tf32: bool = option(False, help="CUDA: fp32 matrix products in TF32 (Ampere GPUs and "
                        "newer): quicker, rounded to 10-bit mantissas, so not the chapter's "
                        "numbers (default: off, full fp32)")
    plain: bool = option(False, help="the chapter's explicit formulas (attention scores, layer "
                         "norm, GELU) instead of fused kernels: the benchmarks' baseline")
    initial_eval: bool = option(True, flags=("--no-initial-eval",), action="store_false",
                                help="skip the accuracies and losses printed before training")
    final_splits: str = option(group=LONG, metavar="all|SPLIT,...", help="the splits whose "
                               "accuracy the final pass scores in full: all, or some of "
                               "train,validation,test (default: all; for own files with over "
                               f"{FINAL_TRAIN_ROWS:,} training rows, validation and test, "
                               "said in the log)")
    checkpoints: bool = option(True, flags=("--no-checkpoints",), action="store_false",
                               group=LONG, help="write no checkpoint (default: the unfinished "
                               "run folder holds one, replaced at each epoch's end and removed "
                               "once the run has finished, for --resume)")
    checkpoint_every: int = option(type=int, metavar="N", group=LONG, help="also checkpoint "
                                   "every N steps within an epoch (default: at epochs' ends "
                                   "only)")
    resume: str = option(metavar="DIR", nargs="?", const="", group=LONG, help="go on with the "
                         "unfinished run in DIR (or --output-dir) from its last checkpoint, "
                         "with its own flags: the same numbers as a run never stopped")
    keep_best: str = option(choices=("val_loss", "val_accuracy"), group=LONG, help="score the "
                            "whole validation split at each epoch's end and keep the best "
                            "epoch's weights as the run's model (default: the last epoch's)")
    early_stopping: int = option(type=int, metavar="N", group=LONG, help="with --keep-best: "
                                 "end training after N epochs without a better score "
                                 "(default: never)")
    deterministic: bool = option(False, group=LONG, help="PyTorch's deterministic algorithms "
                                 "(and on CUDA cuBLAS's fixed workspace), so that a run and its "
                                 "resumed form give the same bits on GPUs too, where kernels may "
                                 "otherwise add in any order; slower (on a CPU nothing changes)")


# --------------------------------------------------- chapter 6: sections 6.6 and 6.7, in its order

def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    """Share of examples whose argmax class is the label, over the first `num_batches` batches
    (the whole loader by default). `model` maps token ids (B, T) to class logits (B, C).
    Under torchrun each process classifies its share of each batch and the counts are added up."""
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        input_batch, target_batch = ddp.share(input_batch), ddp.share(target_batch)
        if len(target_batch) == 0:  # under torchrun: a short last batch left this process none
            continue
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
        with torch.no_grad():
            predicted_labels = torch.argmax(model(input_batch), dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == target_batch).sum().item()
    if ddp.world() > 1:
        correct_predictions, num_examples = ddp.sum_over_ranks(correct_predictions, num_examples)
    return correct_predictions / num_examples if num_examples else float("nan")


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
            total_loss += ddp.eval_loss_over_ranks(input_batch, target_batch, model, device,
                                                   ignore_index, weight)
        else:
            total_loss += calc_loss_batch(input_batch, target_batch, model, device,
                                          ignore_index, weight).item()
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter, ignore_index=-100,
                   weight=None):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, ignore_index,
                                      weight)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, ignore_index, weight)
    model.train()
    return train_loss, val_loss


def train_classifier_simple(model, loaders, optimizer, cfg, device, scaler=None,
                            class_weights=None, long_run=None):
    """The chapter's training loop: returns the history as a dict.

    Each step: zero grads, loss, backward, step. Every `eval_freq` steps the mean loss over the
    first `eval_iter` batches of train and validation; after each epoch the accuracy over the first
    `eval_iter` batches of each. With `accumulation_steps` K the gradients of K batches are summed
    (each loss divided by K, so they average) before one optimizer step; a last, shorter group
    is stepped too. `class_weights` (a tensor, one per class) weights the loss. `long_run` (a
    LongRun) adds, at the loop's seams, what a long run asks for: the start of a resumed run,
    checkpoints, the best epoch kept and stopping early.
    """
    train_loader, val_loader = loaders["train"], loaders["validation"]
    history = {"train_losses": [], "val_losses": [], "train_accs": [], "val_accs": [],
               "examples_seen": 0, "steps": 0,
               # examples seen at each loss and accuracy point: the plots' x positions
               "loss_examples_seen": [], "acc_examples_seen": [],
               "examples_per_epoch": len(train_loader) * (  # (a batch sampler: length groups)
                   train_loader.batch_size or train_loader.batch_sampler.batch_size)}
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    long_run = long_run or LongRun(cfg)
    k = cfg.accumulation_steps
    first_epoch, examples_seen, global_step = long_run.start(history)  # 0, 0, -1 unless resumed
    for epoch in range(first_epoch, cfg.epochs):
        model.train()
        for batch_idx, (input_batch, target_batch) in long_run.batches(
                progress(train_loader, epoch), epoch):
            if batch_idx % k == 0:
                optimizer.zero_grad(set_to_none=True)
            last = cfg.max_steps is not None and global_step + 2 >= cfg.max_steps  # --max-steps
            stepping = (batch_idx + 1) % k == 0 or batch_idx + 1 == len(train_loader) or last
            # Under torchrun each process takes its share of the batch, and DDP averages the
            # gradients over the processes once per optimizer step.
            # The trunk cache reads its keys from the host's copy: the step never waits for
            # the device.
            with ddp.no_sync(model, not stepping), \
                    shortcuts.keys_from(model, ddp.share(input_batch)):
                loss = ddp.training_loss_batch(calc_loss_batch, input_batch, target_batch,
                                               model, device, cfg.ignore_index, class_weights)
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
            ended = cfg.max_steps is not None and global_step + 1 >= cfg.max_steps
            if stepping and not ended:
                long_run.after_step(epoch, batch_idx, examples_seen, global_step, history)
            if ended:
                break

        check_finite_weights(model, global_step, epoch, cfg)  # argmax of NaN is a number
        train_accuracy = calc_accuracy_loader(train_loader, model, device, cfg.eval_iter)
        val_accuracy = calc_accuracy_loader(val_loader, model, device, cfg.eval_iter)
        print(f"Training accuracy: {train_accuracy*100:.2f}% | ", end="")
        print(f"Validation accuracy: {val_accuracy*100:.2f}%", flush=True)
        history["train_accs"].append(train_accuracy)
        history["val_accs"].append(val_accuracy)
        history["acc_examples_seen"].append(examples_seen)
        ended = cfg.max_steps is not None and global_step + 1 >= cfg.max_steps
        if long_run.epoch_end(model, epoch, examples_seen, global_step, history, ended) or ended:
            break
    history["examples_seen"], history["steps"] = examples_seen, global_step + 1
    return history


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
        files.write_atomic(Path(out_dir) / f"{label}-plot.{ext}", buf.getvalue())
    plt.close(fig)


# ----------------------------------------------------------------------- around the chapter's loop

class Diverged(Exception):
    """Training reached a non-finite loss or weights; the message says where and what to try."""


def diverged(what, step, epoch, cfg):
    """Diverged for `what` (e.g. "the training loss is nan") at a step, with what to try."""
    tips = f"a smaller --lr (now {cfg.lr:g}) or --weight-decay (now {cfg.weight_decay:g})"
    weights = class_weight_values(cfg.class_weights)
    if isinstance(weights, list) and max(weights) > 1e6:  # their products overflow the loss
        tips = (f"smaller --class-weights (now {cfg.class_weights}; only their ratios matter, "
                f"so 1,4 weighs as 1e6,4e6 does), or {tips}")
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


# ----------------------------------------------------------- long runs: checkpoints, the best epoch

# What a checkpoint holds changes with this number; --resume refuses a checkpoint of another.
CHECKPOINT_FORMAT = 1
# Flags a resumed run may be given anew: they change when it writes, not what it computes.
ON_RESUME = {"resume", "output_dir", "checkpoints", "checkpoint_every", "final_splits"}
METRICS = {"val_loss": "validation loss", "val_accuracy": "validation accuracy"}


def rng_state():
    """Every random generator a run draws from: torch's (the loaders draw their order from it,
    each time an iteration starts), CUDA's, numpy's and Python's. The loaders and samplers own
    none: they draw from torch's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [v.tolist() if isinstance(v, np.ndarray) else v
                       for v in np.random.get_state()]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_tensors(model):
    """{name: tensor} of what training changes (the trainable parameters, the head's among
    them): all that a checkpoint or the best epoch needs of the weights, the rest being the
    base's."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


class LongRun:
    """What a long run adds around the chapter's loop, each part off unless asked for.

    - checkpoints (`cfg.checkpoints`, `cfg.checkpoint_every`): at each epoch's end (and every N
      steps) the unfinished run folder `work` gets `files.CHECKPOINT`, written whole or not at
      all: what training changed, the optimizer's and the scaler's state, every random
      generator's, the history and the log so far; `resumed` (a checkpoint read back) makes
      the loop go on from there, drawing exactly what the run never stopped would have drawn;
    - the best epoch (`cfg.keep_best`): the whole validation split scored at each epoch's end
      (its draws on a fork of the RNG, so the run's own draws are the same with it as without),
      the best epoch's weights kept, and (`cfg.early_stopping`) the training ended after N
      epochs without a better score.

    The loop calls `start`, `batches`, `after_step` and `epoch_end`; `LongRun(cfg)` alone does
    nothing at them. `model` is the GPTModel under training; `save` (a function of the
    checkpoint's dict) writes a checkpoint; without it (under torchrun, on ranks other than
    0) none is written.
    """

    def __init__(self, cfg, model=None, loaders=None, device=None, class_weights=None,
                 save=None, resumed=None):
        self.cfg, self.model, self.loaders, self.device = cfg, model, loaders, device
        self.class_weights, self.save = class_weights, save
        self.resumed = resumed
        self.best = resumed["best"] if resumed else None  # {"epoch", "score", "tensors"}
        self.epoch_rng = None  # torch's RNG as the current epoch's loader began to draw

    def start(self, history):
        """(first epoch, examples seen, last step) where the loop starts, with the history and
        the generators as they were there."""
        if self.resumed is None:
            return 0, 0, -1
        history.update(self.resumed["history"])
        point = self.resumed["point"]
        set_rng_state(point["rng"])  # (an epoch begun anew draws its order in `batches`)
        return point["epoch"], history["examples_seen"], history["steps"] - 1

    def batches(self, loader, epoch):
        """enumerate(loader) for this epoch; in the epoch a checkpoint cut, the batches after
        the ones done (the order drawn again from the epoch's start, then the RNG as it was at
        the cut)."""
        point = self.resumed["point"] if self.resumed else None
        if point is None or point["epoch"] != epoch or not point["batch"]:
            self.epoch_rng = torch.get_rng_state()
            yield from enumerate(loader)
            return
        self.resumed = None  # (only the epoch it cut)
        torch.set_rng_state(point["epoch_rng"])
        self.epoch_rng = point["epoch_rng"]
        batches = enumerate(loader)
        for _ in range(point["batch"]):  # the loader draws this epoch's order at the first
            next(batches)
        set_rng_state(point["rng"])
        yield from batches

    def after_step(self, epoch, batch_idx, examples_seen, global_step, history):
        """After an optimizer step: a checkpoint every --checkpoint-every steps."""
        every = self.cfg.checkpoint_every
        if self.save and self.cfg.checkpoints and every and (global_step + 1) % every == 0:
            self.checkpoint({"epoch": epoch, "batch": batch_idx + 1,
                             "epoch_rng": self.epoch_rng, "rng": rng_state()},
                            history, examples_seen, global_step)

    def epoch_end(self, model, epoch, examples_seen, global_step, history, ended):
        """After an epoch's accuracies: the best epoch, early stopping and the checkpoint.
        Returns True where training stops early."""
        stop = self.score(model, epoch) if self.cfg.keep_best and self.loaders else False
        if self.save and self.cfg.checkpoints:
            done = stop or ended or epoch + 1 == self.cfg.epochs
            self.checkpoint({"epoch": self.cfg.epochs if done else epoch + 1, "batch": 0,
                             "rng": rng_state()}, history, examples_seen, global_step)
        return stop

    def score(self, model, epoch):
        """--keep-best: the whole validation split's loss and accuracy, printed; the weights
        kept where the score is the best yet. Returns True where --early-stopping ends
        training."""
        val = self.loaders["validation"]
        with torch.random.fork_rng(devices=[]):  # a loader's iteration draws from torch's RNG
            model.eval()
            with torch.no_grad():
                loss = calc_loss_loader(val, model, self.device, None, self.cfg.ignore_index,
                                        self.class_weights)
            accuracy = calc_accuracy_loader(val, model, self.device)
        metric = self.cfg.keep_best
        score = loss if metric == "val_loss" else accuracy
        best = self.best
        if best is None or (score < best["score"] if metric == "val_loss" else
                            score > best["score"]):
            best = self.best = {"epoch": epoch + 1, "score": score, "tensors": {
                n: t.to("cpu", copy=True) for n, t in trainable_tensors(self.model).items()}}
        mark = "best so far" if best["epoch"] == epoch + 1 else f"best: epoch {best['epoch']}"
        print(f"Whole validation split ({len(val.dataset)} examples): loss {loss:.3f}, "
              f"accuracy {accuracy*100:.2f}% ({mark})", flush=True)
        waited, patience = epoch + 1 - best["epoch"], self.cfg.early_stopping
        if patience and waited >= patience and epoch + 1 < self.cfg.epochs:
            print(f"Early stopping: no better {METRICS[metric]} in the {waited} epochs since "
                  f"epoch {best['epoch']}; training ends after epoch {epoch + 1} of "
                  f"{self.cfg.epochs}", flush=True)
            return True
        return False

    def checkpoint(self, point, history, examples_seen, global_step):
        history = {**history, "examples_seen": examples_seen, "steps": global_step + 1}
        self.save({"point": point, "history": history, "best": self.best,
                   "trained": trainable_tensors(self.model)})

    def keep_best(self):
        """--keep-best: the best epoch's weights put back into the model, said in the log;
        returns what run.json records of it (None without --keep-best)."""
        if not self.cfg.keep_best:
            return None
        best = self.best
        with torch.no_grad():
            for n, t in trainable_tensors(self.model).items():
                t.copy_(best["tensors"][n])
        metric = METRICS[self.cfg.keep_best]
        shown = f"{best['score']:.3f}" if self.cfg.keep_best == "val_loss" else \
            f"{best['score']*100:.2f}%"
        print(f"Kept the weights of epoch {best['epoch']}, the best {metric} ({shown}); the "
              "accuracies below are theirs")
        return {"metric": self.cfg.keep_best, "epoch": best["epoch"], "score": best["score"]}


def read_checkpoint(path):
    """A checkpoint written by LongRun, read back (tensors memory-mapped, not copied);
    ValueError, saying what to do, where it is damaged or of another version."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # cut short, overwritten, not a checkpoint: torch raises many kinds
        raise ValueError(f"the checkpoint {path} is damaged ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); nothing can "
                         "be resumed from it: start the run again") from e
    version = ckpt.get("format") if isinstance(ckpt, dict) else None
    if version != CHECKPOINT_FORMAT:
        raise ValueError(f"the checkpoint {path} was written by another version of "
                         f"finetune.py (checkpoint format {version}; this one reads "
                         f"{CHECKPOINT_FORMAT}); finish the run with that version, or start "
                         "it again")
    return ckpt


def flag_name(name):
    """The flag of a TrainConfig field, as the command line spells it."""
    f = {f.name: f for f in fields(TrainConfig)}[name]
    return (f.metadata.get("flags") or ["--" + name.replace("_", "-")])[0]


def resume_config(cfg, given=None):
    """--resume: (the run's own TrainConfig, (out, replace, work, checkpoint)). `given` names
    the fields the command line set (default: those that differ from the defaults); each must
    equal the run's own (ValueError naming the one that does not), except ON_RESUME's."""
    folder = cfg.resume or cfg.output_dir
    if not folder:
        raise ValueError("--resume needs the run folder: --resume DIR, or --output-dir DIR "
                         "--resume")
    out, replace_, work = files.plan_resume(folder)
    path = work / files.CHECKPOINT
    ckpt = read_checkpoint(path)
    try:
        recorded = TrainConfig(**ckpt["flags"])
    except (TypeError, KeyError) as e:
        raise ValueError(f"the checkpoint {path} was written by another version of "
                         f"finetune.py ({e}); finish the run with that version, or start it "
                         "again") from e
    default = TrainConfig()
    if given is None:
        given = {f.name for f in fields(cfg)
                 if getattr(cfg, f.name) != getattr(default, f.name)}
    for name in sorted(set(given) - ON_RESUME):
        now, then = getattr(cfg, name), getattr(recorded, name)
        if now != then:
            flag = flag_name(name)
            said = flag if isinstance(now, bool) else f"{flag} {now}"
            was = (f"ran without {flag}" if isinstance(now, bool) else
                   f"ran with {flag} {then}" if then is not None else f"ran without {flag}")
            raise ValueError(f"--resume goes on with the run's own flags, but {said} would "
                             f"change it: it {was} ({path}); drop {flag}")
    keep = {n: getattr(cfg, n) for n in ON_RESUME - {"resume", "output_dir"} if n in given}
    cfg = replace(recorded, **keep, resume=str(folder), output_dir=str(out))
    return cfg, (out, replace_, work, ckpt)


def check_checkpoint_fits(ckpt, path, model, base, source):
    """Refuse (ValueError) a checkpoint made from other base weights or other data than the
    run's are now: it would go on as a silently different run."""
    if ckpt["model"] != asdict(model.cfg) or ckpt["base"] != base:
        def named(b):
            return "random weights" if b is None else \
                f"{b['weights']} (sha256 {b['sha256'][:12]}...)"
        raise ValueError(f"the checkpoint {path} was trained from other base weights than "
                         f"--weights gives now: {named(ckpt['base'])} then, {named(base)} now;"
                         " put those weights back, or start the run again")
    if ckpt["data"] != source:
        raise ValueError(f"the checkpoint {path} was trained on other data than the run's "
                         "files hold now (their sha256 differs); put the files back as they "
                         "were, or start the run again")


def load_checkpoint(ckpt, path, model):
    """What training changed, from the checkpoint into the set-up model (ValueError where the
    checkpoint's tensors do not fit it)."""
    own, saved = trainable_tensors(model), ckpt["trained"]
    wrong = sorted(n for n in own.keys() & saved.keys() if own[n].shape != saved[n].shape)
    if own.keys() != saved.keys() or wrong:
        odd = sorted(own.keys() ^ saved.keys()) + wrong
        raise ValueError(f"the checkpoint {path} does not fit the model ({', '.join(odd[:3])}"
                         "); start the run again")
    with torch.no_grad():
        for n, t in own.items():
            t.copy_(saved[n])


def progress(loader, epoch):
    """A progress bar over an epoch's batches, on stderr and only in a terminal (tqdm)."""
    return files.progress(loader, desc=f"Epoch {epoch + 1}", unit="batch")


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


def checkpoint_estimate(model, base, cfg):
    """Tensors as large as what the run folder holds at most while checkpoints are written: the
    weights file, and two checkpoints (the old one stays until the new one is whole) each of
    the trained tensors, AdamW's two moments of each and, with --keep-best, the best epoch's."""
    trained = list(trainable_tensors(model).values())
    copies = 2 * (3 + bool(cfg.keep_best))
    return {**weights_to_save(model, base, merge=False)[1],
            **{f"checkpoint.{i}": t for i, t in enumerate(trained * copies)}}


def resumed_at(ckpt, cfg):
    """Where a checkpoint cut the run, in words."""
    point, steps = ckpt["point"], ckpt["history"]["steps"]
    if point["batch"]:
        return f"step {steps}, within epoch {point['epoch'] + 1} of {cfg.epochs}"
    done = len(ckpt["history"]["train_accs"])
    return f"epoch {done} of {cfg.epochs} done, step {steps}"


def threads_note(ckpt):
    """A note where a run resumes with another number of CPU threads than it ran with (None
    where the same): no kernel promises the same bits across thread counts."""
    then, now = ckpt.get("threads"), torch.get_num_threads()
    if then is None or then == now:
        return None
    return (f"note: the run ran on {then} CPU threads and resumes on {now}: its numbers are the "
            f"same up to float rounding, not bit for bit (OMP_NUM_THREADS={then} gives those)")


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
    for name in ("checkpoint_every", "early_stopping"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be 1 or more")
    if cfg.early_stopping and not cfg.keep_best:
        raise ValueError("--early-stopping needs --keep-best val_loss or val_accuracy: the "
                         "score it watches, and the epoch whose weights the run keeps")
    if cfg.final_splits is not None and cfg.final_splits != "all" and not set(
            cfg.final_splits.split(",")) <= set(data.SPLIT_TITLES):
        raise ValueError(f"--final-splits {cfg.final_splits}: give all, or some of "
                         "train,validation,test separated by commas (such as validation,test)")
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
    return cfg.shortcuts and not cfg.plain


def build_classifier(model, cfg, device, on_full=None, position=None):
    """Wrap the set-up model with the run's choices, and the exact shortcuts unless they are off
    (shortcuts.for_training: the frozen-trunk cache, the last block at the classified position).
    Returns (classifier, note): the note says why the cache is off, or None. `position`: the
    classified position (default: cfg's, or the chapter's last)."""
    fast, note = None, None
    position = position or cfg.token_position or "last"
    if shortcuts_on(cfg):
        max_bytes = None if cfg.trunk_cache_gb is None else int(cfg.trunk_cache_gb * 2**30)
        if max_bytes is None and device.type == "cpu" and ddp.local_world() > 1:
            max_bytes = shortcuts.default_cache_bytes() // ddp.local_world()  # processes share RAM
        # nothing past a row's last real token is read at these positions
        extend = position in ("flexible", "first") and not cfg.average_embeddings
        fast, note = shortcuts.for_training(model, max_bytes, on_full, data.PAD_ID, extend)
    classifier = gpt.Classifier(model, position=position, average=cfg.average_embeddings,
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


@contextlib.contextmanager
def deterministic(on):
    """--deterministic, within this block: PyTorch's deterministic algorithms (a warning names
    any operation that has none), and cuBLAS's fixed workspace, which CUDA needs for the same
    bits from run to run (read when cuBLAS starts: before the run's first product). The
    settings are put back as they were afterwards."""
    if not on:
        yield
        return
    was = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


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


# --------------------------------------------------------------------------- the run, step by step

def load_data(cfg):
    """Step 1: the labelled rows, split: the chapter's balanced split of the SMS data, or the
    user's own files (printing what was decided about them)."""
    labelled = data.load_labelled(cfg)
    for note in labelled.notes:
        print(note)
    return labelled


def load_model(cfg):
    """Step 2: GPT-2 with its pretrained (or random) weights, and what the run folder needs to
    find those weights again, if it is not to hold them all (None: it holds them)."""
    model = gpt.load_gpt(cfg.weights, plain=cfg.plain)
    base = None if cfg.self_contained else gpt.base_identity(model)
    if cfg.disable_causal_mask:
        gpt.set_causal(model, False)
    return model, base


def make_datasets(cfg, splits, context, ctx):
    """Step 3: each split tokenized, cut and padded: max_length from the training set (the
    longest training text, at most the model's `context`) unless --context-length says
    otherwise. Returns (datasets, padding)."""
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
    tokenizer = data.get_tokenizer()
    train_ds = data.TextDataset(splits["train"], tokenizer, max_length, pad=pad, limit=context)
    datasets = {"train": train_ds}
    for name in list(splits)[1:]:
        datasets[name] = data.TextDataset(splits[name], tokenizer, train_ds.max_length, pad=pad)
    # A --context-length shorter than the texts (never the chapter's default); for own
    # files, any text longer than the longest training text or the model's context.
    if train_ds.cut or (cfg.train_file is not None and any(ds.cut for ds in datasets.values())):
        print(cut_note(datasets))
    return datasets, pad


def make_loaders(cfg, datasets, class_names, device):
    """Step 4: the data loaders (they draw from torch's RNG when iterated), and the lines
    saying what they hold."""
    loaders = data.create_loaders(datasets, batch_size=cfg.batch_size,
                                  pin_memory=device.type == "cuda",
                                  group_by_length=cfg.group_by_length)
    names, train_ds = list(datasets), datasets["train"]
    if len(loaders["train"]) == 0:
        raise ValueError(f"the training split has {len(train_ds)} examples, fewer than one "
                         f"batch of {cfg.batch_size}; lower --batch-size or add rows")
    if cfg.train_file is not None:
        print(f"{len(class_names)} classes, rows per split ({' / '.join(names)}): " + "; ".join(
            f"{c} " + " / ".join(str(sum(y == i for y in datasets[n].labels)) for n in names)
            for i, c in enumerate(class_names)))
    shown = ", ".join(f"{len(ds)} {dict(train='training').get(n, n)}"
                      for n, ds in datasets.items())
    padded = " (each batch padded to its own longest text)" if train_ds.pad == "batch" else ""
    print(f"{shown} examples{'' if 'test' in datasets else ' (no test split)'}; "
          f"max_length {train_ds.max_length}{padded}; batches "
          + " / ".join(str(len(loaders[n])) for n in names))
    return loaders


def look_before_training(classifier, loaders, cfg, device, weight):
    """The chapter's look before training: accuracy over 10 batches and loss over 5 of each
    split, printed. The caller seeds torch first (the training loader draws its order)."""
    names = list(loaders)
    total = sum(min(n, len(loaders[s])) for n in (10, 5) for s in names)
    with files.progress(total=total, desc="Looking before training", unit="batch") as bar:
        ticking = {s: files.Ticking(loaders[s], bar) for s in names}
        accs = [calc_accuracy_loader(ticking[s], classifier, device, num_batches=10)
                for s in names]
        with torch.no_grad():
            losses = [calc_loss_loader(ticking[s], classifier, device, 5, cfg.ignore_index,
                                       weight) for s in names]
    print("Before fine-tuning (accuracy over 10 batches, loss over 5):")
    for s, acc in zip(names, accs):
        print(f"{data.SPLIT_TITLES[s]} accuracy: {acc*100:.2f}%")
    for s, loss in zip(names, losses):
        print(f"{data.SPLIT_TITLES[s]} loss: {loss:.3f}")


def final_splits(cfg, datasets):
    """The splits the final pass scores (--final-splits), and the log's line saying which
    where it is not all of them (None where it is: the chapter's log)."""
    spec, have = cfg.final_splits, list(datasets)
    if spec is None:
        big = cfg.train_file is not None and len(datasets["train"]) > FINAL_TRAIN_ROWS
        if not big:
            return have, None
        names = have[1:]
        why = (f"the training split's {len(datasets['train']):,} rows are over "
               f"{FINAL_TRAIN_ROWS:,}; --final-splits all scores it too")
    else:
        names = have if spec == "all" else [n for n in have if n in spec.split(",")]
        why = "--final-splits"
        if names == have:
            return have, None
    shown = " and ".join(names) or "none"
    return names, f"The final pass scores {shown} only ({why})"


def final_accuracies(classifier, loaders, device):
    """Step 6: accuracy over the whole of each split, through the chapter's loaders, printed."""
    names = list(loaders)
    total = sum(len(loaders[s]) for s in names)
    with files.progress(total=total, desc="Accuracy on every split", unit="batch") as bar:
        final = {s: calc_accuracy_loader(files.Ticking(loaders[s], bar), classifier, device)
                 for s in names}
    for s in names:
        print(f"{data.SPLIT_TITLES[s]} accuracy: {final[s]*100:.2f}%")
    return final


def save_run(work, out, folder, model, base, cfg, history, final, run_info, timing):
    """Step 7: the run folder's files, the weights (what matters most) first; run.json last."""
    weights_file, tensors = weights_to_save(model, base)
    bad = gpt.nonfinite(tensors)
    if bad:
        raise diverged(f"the weight {bad[0]} holds NaN or infinite values",
                       history["steps"] - 1, cfg.epochs - 1, cfg)
    metrics = {"history": history, "final_accuracy": final, **timing,
               "processes": ddp.world(), "torch": torch.__version__, "run_id": folder.run_id}
    info = {"model": asdict(model.cfg), **run_info, "flags": asdict(cfg),
            "weights_file": weights_file,
            "base": base if weights_file == "trained.safetensors" else None,
            "run_id": folder.run_id}

    def plots(folder):
        return plot_history(history, folder)
    try:
        files.write_run(work, tensors, metrics, info, plots)
    except OSError as e:  # a full disk, say: the trained model is saved elsewhere if it can
        raise files.RunFailed(files.rescue(e, tensors, metrics, info, plots, folder.log)) from e
    files.drop_checkpoint(work)  # after run.json: until then, a resume can still use it
    print(f"Saved the fine-tuned model to {out}")


def run(cfg, given=None):
    """The whole chapter-6 procedure, in its order; returns the run folder. Raises ValueError,
    data.DataError, gpt.WeightsError for bad input (checked before the run folder is touched),
    files.RunFailed or files.Interrupted for a run that failed or was stopped later. With
    `cfg.resume` set, goes on with that unfinished run from its checkpoint, with its own flags
    (`given`: the fields the command line set, which must not change them; see
    resume_config)."""
    resumed = None
    if cfg.resume is not None:
        cfg, (out, replace_, work, resumed) = resume_config(cfg, given)
    check_config(cfg)
    position, ctx = data_choices(cfg)
    device = ddp.device_for_rank(ddp.select_device(cfg.device))  # torchrun: LOCAL_RANK's GPU
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; use --precision bf16 instead")
    if cfg.tf32 and device.type != "cuda":
        raise ValueError(f"--tf32 is a CUDA setting, and this run is on {device.type}; drop "
                         "--tf32, or pass --device cuda")
    if cfg.tf32:  # off by default (full fp32), as PyTorch's own default
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    if not ddp.is_main():  # under torchrun rank 0 alone prints and writes the run folder
        out, folder = None, files.NoFolder()
    elif resumed:
        folder = files.RunFolder(out, replace_, errors=ERRORS, resumed_log=resumed["log"])
    else:
        out, replace_ = files.plan_output_dir(cfg)
        folder = files.RunFolder(out, replace_, errors=ERRORS)
    start = time.time()
    log = files.Tee(sys.stdout, folder.log) if out else folder.log
    with folder, contextlib.redirect_stdout(log), deterministic(cfg.deterministic):
        if resumed:
            print(f"Resumed {out} from its checkpoint ({resumed_at(resumed, cfg)}); the log "
                  "goes on from there")
            if note := threads_note(resumed):
                print(note)
        print(f"Run folder: {out}  (device: {device}, precision: {cfg.precision}"
              f"{f', {ddp.world()} processes' if ddp.world() > 1 else ''}"
              f"{', deterministic algorithms' if cfg.deterministic else ''})")
        labelled = load_data(cfg)  # 1
        splits, class_names = labelled.splits, labelled.class_names
        weight = class_weights(cfg.class_weights, [y for y, _ in splits["train"]], class_names,
                               device)  # on the device: every loss, from the first, uses it
        torch.manual_seed(cfg.seed)  # 2: the initial weights, where they are random
        model, base = load_model(cfg)
        if resumed:
            check_checkpoint_fits(resumed, work / files.CHECKPOINT, model, base,
                                  labelled.source)
        datasets, pad = make_datasets(cfg, splits, model.cfg.context_length, ctx)  # 3
        torch.manual_seed(cfg.seed)  # 4: the loaders (the chapter's order; they draw later)
        loaders = make_loaders(cfg, datasets, class_names, device)
        torch.manual_seed(cfg.seed)  # 5: freeze, new head (drawn here), unfreeze
        gpt.setup_classifier(model, len(class_names), cfg.trainable_layers,
                             cfg.lora_rank, cfg.lora_alpha)
        model.to(device)
        if resumed:
            load_checkpoint(resumed, work / files.CHECKPOINT, model)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"Trainable parameters: {n_train:,} of {n_all:,}")
        if cfg.keep_best and len(loaders["validation"]) == 0:
            raise ValueError("--keep-best scores the validation split, but this run has none; "
                             "give --val-file or a --val-frac above 0")
        if out:  # the weights file must fit on the run folder's disk: known now, before training
            if cfg.checkpoints:  # and with it the checkpoint: twice, while one replaces another
                files.check_free_space(out, checkpoint_estimate(model, base, cfg))
            files.check_free_space(out, weights_to_save(model, base, merge=False)[1])
        ddp.barrier()  # under torchrun: every process has passed its checks too

        # Every input has passed its checks: only now is the run folder made. From here on a
        # failure keeps the log, the error line in it (a finished run being replaced: as it was).
        work = folder.make()
        if cfg.initial_eval and not resumed:  # own classifier and cache: training starts cold
            before, _ = build_classifier(model, cfg, device, position=position)
            torch.manual_seed(cfg.seed)  # the look draws the training loader's order; reseeded
            look_before_training(before, loaders, cfg, device, weight)
            del before

        # Training: AdamW over all parameters (frozen ones have no gradient, so stay put).
        classifier, note = build_classifier(model, cfg, device, on_full=print, position=position)
        warm_up(device)  # the device's start-up (CUDA's libraries) outside the timed phase
        start_time = time.time() - (resumed["train_seconds"] if resumed else 0)
        torch.manual_seed(cfg.seed)
        optimizer = build_optimizer(model, cfg, device)
        print(shortcuts.describe(classifier, optimizer, cfg.precision) if shortcuts_on(cfg) else
              f"Shortcuts: off ({'--plain' if cfg.plain else '--no-shortcuts'})")
        if note:
            print(note)
        shortcuts.prefill(classifier, loaders, cfg)  # inside the timed phase: the loop's work
        classifier = ddp.wrap(classifier, device)  # under torchrun: DDP over what trains
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        if resumed:
            optimizer.load_state_dict(resumed["optimizer"])
            scaler.load_state_dict(resumed["scaler"])

        def save(state):  # a checkpoint: what LongRun gives, with what resuming checks
            state = {"format": CHECKPOINT_FORMAT, **state, "flags": asdict(cfg),
                     "model": asdict(model.cfg), "base": base, "data": labelled.source,
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "log": folder.log.text(), "train_seconds": time.time() - start_time,
                     "threads": torch.get_num_threads()}
            try:
                files.write_atomic(work / files.CHECKPOINT, lambda f: torch.save(state, f),
                                   sync=True)
            except OSError as e:  # a full disk, say: training goes on; the last one is kept
                print(f"warning: could not write the checkpoint: {files.describe_os_error(e)};"
                      " training goes on (the previous checkpoint, if any, is kept)")
        long_run = LongRun(cfg, model, loaders, device, weight, save if out else None, resumed)
        history = train_classifier_simple(classifier, loaders, optimizer, cfg, device, scaler,
                                          weight, long_run)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_minutes = (time.time() - start_time) / 60
        print(f"Training completed in {train_minutes:.2f} minutes.")
        best = long_run.keep_best()

        # 6. The training loader shuffles and drops its last partial batch, so this pass leaves
        # out a few examples (5 of 1,045); run.json names them so evaluate.py leaves out the same.
        dropped = dropped_examples(loaders["train"])
        names, said = final_splits(cfg, datasets)
        if said:
            print(said)
        final = final_accuracies(classifier, {n: loaders[n] for n in names}, device)
        if not ddp.is_main():
            return None  # rank 0 writes the run folder
        run_info = {
            "num_classes": len(class_names), "class_names": class_names,
            "max_length": datasets["train"].max_length, "pad_id": data.PAD_ID, "padding": pad,
            "context_length": ctx, "token_position": position,
            "average_embeddings": cfg.average_embeddings,
            "splits": {n: len(ds) for n, ds in datasets.items()}, "precision": cfg.precision,
            "batch_size": cfg.batch_size, "final_train_dropped": dropped,
            "data": labelled.source, **({"best_epoch": best} if best else {})}
        timing = {"train_minutes": train_minutes, "total_minutes": (time.time() - start) / 60,
                  "device": str(device), "device_name": device_name(device)}
        save_run(work, out, folder, model, base, cfg, history, final, run_info, timing)  # 7
    return out


# --------------------------------------------------------------------------------------------- CLI

# What run() raises for bad input or a failed run: one error line each, never a traceback.
ERRORS = (ValueError, data.DataError, gpt.WeightsError, Diverged, files.RunFailed, OSError)


def parse_args(argv=None, defaults=True):
    """TrainConfig from the command line: one flag per field, its help and default from the
    field (see `option`). `defaults=False`: a dict of only the flags the command line gives."""
    p = argparse.ArgumentParser(description="Fine-tune GPT-2 to classify text: chapter 6's run "
                                "(sections 6.4-6.8) on its SMS spam data, or on your own "
                                "labelled files; by default through exact shortcuts.")
    groups = {}
    for f in fields(TrainConfig):
        kw = dict(f.metadata)
        help_, flags, group = kw.pop("help"), kw.pop("flags"), kw.pop("group")
        target = p if group is None else groups.setdefault(group, p.add_argument_group(group))
        if f.type is bool:
            kw.setdefault("action", "store_true")
        elif "choices" not in kw and f.type is not str:
            kw.setdefault("type", f.type)
        target.add_argument(*(flags or ["--" + f.name.replace("_", "-")]), dest=f.name,
                            default=f.default if defaults else argparse.SUPPRESS,
                            help=help_.format(default=f.default), **kw)
    # older command lines: --fast was the shortcuts' flag when they were off by default
    p.add_argument("--fast", dest="shortcuts", action="store_true", help=argparse.SUPPRESS,
                   **({} if defaults else {"default": argparse.SUPPRESS}))
    return TrainConfig(**vars(p.parse_args(argv))) if defaults else vars(p.parse_args(argv))


def main(argv=None):
    cfg = parse_args(argv)
    try:
        ddp.init()  # a no-op unless torchrun started this process
        run(cfg, set(parse_args(argv, defaults=False)))
    except ERRORS as e:
        # Under torchrun the first process to fail says why; torchrun then stops the others.
        sys.exit(f"error: {files.describe_os_error(e) if isinstance(e, OSError) else e}"
                 if ddp.first_to_fail() else 1)
    except files.Interrupted as e:
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
