"""Fine-tune GPT-2 to classify text: chapter 6's run, end to end, on its SMS spam data or on
your own labelled files (any number of classes).

    python finetune.py                       # the chapter's run: GPT-2 small, 5 epochs
    python finetune.py --device cuda --precision bf16
    python finetune.py --weights random --data SMSSpamCollection --max-steps 20   # offline
    python finetune.py --train-file reviews.csv --labels neg,neutral,pos

Read it beside the chapter: `calc_accuracy_loader`, `calc_loss_batch`, `calc_loss_loader`,
`evaluate_model`, `train_classifier_simple` and `plot_values` come first, under the chapter's
names and in its order; then the run's steps, and `run`, the procedure as a short list of
them. It prints what the chapter prints (the same losses and accuracies, given the same
weights), and leaves a run folder that `python evaluate.py --run DIR` uses (see files.py).
Every flag is a field of config.TrainConfig; long runs (checkpoints, `--resume`, the best
epoch) attach at the loop's seams from longrun.py, the exact shortcuts from shortcuts.py.
"""

import contextlib
import io
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import datacheck
import ddp
import decisions
import files
import gpt
import longrun
import shortcuts
import tables
from config import (FINAL_TRAIN_ROWS, TrainConfig, check_config, check_device, check_types,
                    class_weight_values, data_choices, parse_args)

__all__ = ["TrainConfig", "parse_args", "run", "main", "train_classifier_simple"]


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
                            class_weights=None, long_run=None, host_weights=None):
    """The chapter's training loop: returns the history as a dict.

    Each step: zero grads, loss, backward, step. Every `eval_freq` steps the mean loss over the
    first `eval_iter` batches of train and validation; after each epoch the accuracy over the first
    `eval_iter` batches of each. With `accumulation_steps` K the gradients of K batches are summed
    (each loss divided by K, so they average) before one optimizer step; a last, shorter group
    is stepped too. `class_weights` (a tensor, one per class) weights the loss (`host_weights`:
    the same on the host, for torchrun, where each process adds up a batch's weights itself).
    `long_run` (a LongRun) adds, at the loop's seams, what a long run asks for: the start of a
    resumed run, checkpoints, the best epoch kept and stopping early.
    """
    train_loader, val_loader = loaders["train"], loaders["validation"]
    history = {"train_losses": [], "val_losses": [], "train_accs": [], "val_accs": [],
               "examples_seen": 0, "steps": 0,
               # examples seen at each loss and accuracy point: the plots' x positions
               "loss_examples_seen": [], "acc_examples_seen": [],
               "examples_per_epoch": len(train_loader) * (  # (a batch sampler: length groups)
                   train_loader.batch_size or train_loader.batch_sampler.batch_size)}
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    long_run = long_run or longrun.LongRun(cfg)
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
                                               model, device, cfg.ignore_index, class_weights,
                                               host_weights)
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


# --------------------------------------------------------------------------- the run, step by step

def load_data(cfg):
    """Step 1: the labelled rows, split: the chapter's balanced split of the SMS data, or the
    user's own files (printing what was decided about them)."""
    labelled = tables.load_labelled(cfg)
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
    # A short --context-length (never the chapter's default); own files: any text cut at all
    if train_ds.cut or (cfg.train_file is not None and any(ds.cut for ds in datasets.values())):
        print(data.cut_note(datasets))
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


def build_classifier(model, cfg, device, on_full=None, position=None):
    """Wrap the set-up model with the run's choices, and the exact shortcuts unless they are off
    (shortcuts.for_training: the frozen-trunk cache, the last block at the classified position).
    Returns (classifier, note): the note says why the cache is off, or None. `position`: the
    classified position (default: cfg's, or the chapter's last)."""
    chosen, note = None, None
    position = position or cfg.token_position or "last"
    if shortcuts.enabled(cfg):
        # (extend: nothing past a row's last real token is read at these positions)
        extend = position in ("flexible", "first") and not cfg.average_embeddings
        chosen, note = shortcuts.for_training(model, shortcuts.cache_budget(cfg, device),
                                              on_full, data.PAD_ID, extend)
    classifier = gpt.Classifier(model, position=position, average=cfg.average_embeddings,
                                autocast_dtype=gpt.PRECISIONS[cfg.precision], shortcuts=chosen)
    return classifier, note


def build_optimizer(model, cfg, device):
    """AdamW over all parameters, as the chapter does (frozen ones get no gradient, so AdamW
    leaves them be); one fused kernel where the shortcuts take it (shortcuts.fused_adamw)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=shortcuts.fused_adamw(cfg, device))


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
    trained = list(longrun.trainable_tensors(model).values())
    copies = 2 * (3 + bool(cfg.keep_best))
    return {**weights_to_save(model, base, merge=False)[1],
            **{f"checkpoint.{i}": t for i, t in enumerate(trained * copies)}}


def validation_scorer(val_loader, cfg, device, weight):
    """--keep-best's score: a function of the classifier giving the whole validation split's
    (loss, accuracy, examples), through the chapter's functions (longrun.LongRun calls it)."""
    def score(classifier):
        with torch.no_grad():
            loss = calc_loss_loader(val_loader, classifier, device, None, cfg.ignore_index,
                                    weight)
        return loss, calc_accuracy_loader(val_loader, classifier, device), \
            len(val_loader.dataset)
    return score


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
        missing = [] if spec == "all" else [n for n in spec.split(",") if n not in have]
        if missing:
            raise ValueError(f"--final-splits {spec} names {' and '.join(missing)}, which this "
                             f"run does not have (its splits: {', '.join(have)}); name only "
                             "those, or pass all")
        names = have if spec == "all" else [n for n in have if n in spec.split(",")]
        why = "--final-splits"
        if names == have:
            return have, None
    return names, f"The final pass scores {' and '.join(names)} only ({why})"


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


def save_run(work, out, folder, model, base, cfg, history, final, run_info, timing, record):
    """Step 7: the run folder's files, the weights (what matters most) first; run.json last."""
    weights_file, tensors = weights_to_save(model, base)
    bad = gpt.nonfinite(tensors)
    if bad:
        raise diverged(f"the weight {bad[0]} holds NaN or infinite values",
                       history["steps"] - 1, cfg.epochs - 1, cfg)
    metrics = {"history": history, "final_accuracy": final, **timing, "processes": ddp.world(),
               "torch": torch.__version__, "run_id": folder.run_id, **decisions.measured(record)}
    info = {"model": asdict(model.cfg), **run_info, **decisions.decided(record),
            "flags": asdict(cfg), "weights_file": weights_file,
            "base": base if weights_file == "trained.safetensors" else None,
            "run_id": folder.run_id}

    def plots(folder):
        return plot_history(history, folder) + decisions.write_files(record, folder)
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
    check_types(cfg)  # a field set after the TrainConfig was made: checked before all else
    cfg, resume = longrun.start(cfg, given)  # a Fresh start unless --resume
    check_config(cfg)
    position, ctx = data_choices(cfg)
    if cfg.check_data:  # the data check's whole report alone: nothing trained, no run folder
        labelled = load_data(cfg)
        datasets = make_datasets(cfg, labelled.splits, gpt.context_of(cfg.weights), ctx)[0]
        print(datacheck.full_report(labelled, datasets))
        return None
    device = ddp.device_for_rank(ddp.select_device(cfg.device))  # torchrun: LOCAL_RANK's GPU
    check_device(cfg, device)
    if cfg.tf32:  # off by default (full fp32), as PyTorch's own default
        ddp.use_tf32()
    if not ddp.is_main():  # under torchrun rank 0 alone prints and writes the run folder
        out, folder = None, files.NoFolder()
    else:
        out, replace_ = resume.plan_output(cfg)
        folder = files.RunFolder(out, replace_, errors=ERRORS, resumed_log=resume.log)
    start = time.time()
    log = files.Tee(sys.stdout, folder.log) if out else folder.log
    with folder, contextlib.redirect_stdout(log), deterministic(cfg.deterministic):
        resume.announce(out, cfg)
        print(f"Run folder: {out}  (device: {device}, precision: {cfg.precision}"
              f"{f', {ddp.world()} processes' if ddp.world() > 1 else ''}"
              f"{', deterministic algorithms' if cfg.deterministic else ''})")
        labelled = load_data(cfg)  # 1
        splits, class_names = labelled.splits, labelled.class_names
        positive = decisions.check_target(cfg, labelled, warn=print)  # --target: can it be?
        host_weight = class_weights(cfg.class_weights, [y for y, _ in splits["train"]],
                                    class_names)
        # on the device: every loss, from the first, uses it
        weight = None if host_weight is None else host_weight.to(device)
        torch.manual_seed(cfg.seed)  # 2: the initial weights, where they are random
        model, base = load_model(cfg)
        resume.check_fits(model, base, labelled.source)
        datasets, pad = make_datasets(cfg, splits, model.cfg.context_length, ctx)  # 3
        final_names, said = final_splits(cfg, datasets)  # (refused now, not after training)
        torch.manual_seed(cfg.seed)  # 4: the loaders (the chapter's order; they draw later)
        loaders = make_loaders(cfg, datasets, class_names, device)
        report = datacheck.check_run(labelled, datasets, say=print)  # 4b: it only warns
        torch.manual_seed(cfg.seed)  # 5: freeze, new head (drawn here), unfreeze
        gpt.setup_classifier(model, len(class_names), cfg.trainable_layers,
                             cfg.lora_rank, cfg.lora_alpha)
        model.to(device)
        resume.load_model(model)
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
        if cfg.initial_eval and resume.at_start:  # own classifier and cache: starts cold
            before, _ = build_classifier(model, cfg, device, position=position)
            torch.manual_seed(cfg.seed)  # the look draws the training loader's order; reseeded
            look_before_training(before, loaders, cfg, device, weight)
            del before

        # Training: AdamW over all parameters (frozen ones have no gradient, so stay put).
        classifier, note = build_classifier(model, cfg, device, on_full=print, position=position)
        ddp.warm_up(device)  # the device's start-up (CUDA's libraries) outside the timed phase
        start_time = time.time() - resume.train_seconds
        torch.manual_seed(cfg.seed)
        optimizer = build_optimizer(model, cfg, device)
        print(shortcuts.describe(classifier, optimizer, cfg.precision)
              if shortcuts.enabled(cfg) else
              f"Shortcuts: off ({'--plain' if cfg.plain else '--no-shortcuts'})")
        if note:
            print(note)
        shortcuts.prefill(classifier, loaders, cfg)  # inside the timed phase: the loop's work
        classifier = ddp.wrap(classifier, device)  # under torchrun: DDP over what trains
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        resume.load_training(optimizer, scaler)

        def save(state):  # a checkpoint: what LongRun gives, with what resuming checks
            state = {"format": longrun.CHECKPOINT_FORMAT, **state, "flags": asdict(cfg),
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
        score = validation_scorer(loaders["validation"], cfg, device, weight)
        long_run = longrun.LongRun(cfg, model, score, save if out else None, resume.checkpoint)
        history = train_classifier_simple(classifier, loaders, optimizer, cfg, device, scaler,
                                          weight, long_run, host_weight)
        ddp.synchronize(device)
        train_minutes = (time.time() - start_time) / 60
        print(f"Training completed in {train_minutes:.2f} minutes.")
        best = long_run.keep_best()

        # 6. The training loader drops its last partial batch (5 of 1,045): run.json names them
        dropped = data.dropped_examples(loaders["train"])
        if said:
            print(said)
        final = final_accuracies(classifier, {n: loaders[n] for n in final_names}, device)
        if not ddp.is_main():  # rank 0 alone decides and writes; then all leave together
            ddp.barrier()
            return None
        record = decisions.after_training(classifier, datasets, device, cfg, labelled,  # 6b
                                          positive, final_names, dropped, report)
        run_info = {
            "num_classes": len(class_names), "class_names": class_names,
            "max_length": datasets["train"].max_length, "pad_id": data.PAD_ID, "padding": pad,
            "context_length": ctx, "token_position": position,
            "average_embeddings": cfg.average_embeddings,
            "splits": {n: len(ds) for n, ds in datasets.items()}, "precision": cfg.precision,
            "batch_size": cfg.batch_size, "final_train_dropped": dropped,
            "data": labelled.source, **({"best_epoch": best} if best else {})}
        timing = {"train_minutes": train_minutes, "total_minutes": (time.time() - start) / 60,
                  "device": str(device), "device_name": ddp.device_name(device)}
        save_run(work, out, folder, model, base, cfg, history, final, run_info, timing,
                 record)  # 7: the decisions' record (step 6b) goes to run.json and metrics.json
        ddp.barrier()
    return out


# --------------------------------------------------------------------------------------------- CLI

# What run() raises for bad input or a failed run: one error line each, never a traceback.
ERRORS = (ValueError, data.DataError, gpt.WeightsError, Diverged, files.RunFailed, OSError)


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
    ddp.leave()  # under torchrun: a finished run ends here (see ddp.leave)
