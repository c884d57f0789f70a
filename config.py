"""The run's settings: TrainConfig, one field per finetune.py flag with its help beside it,
the checks that refuse settings that cannot work, and the command line built from the fields.

    python finetune.py --help          # every flag, its default and its help, from TrainConfig
    python -c "import config; print(config.parse_args(['--epochs', '2']))"

A TrainConfig made in Python is checked as the command line is (`check_config`), before
anything is read or trained. finetune.py uses these; nothing here imports it.
"""

import argparse
import math
import os
from dataclasses import MISSING, dataclass, field, fields

import torch

import data
import ddp
import decisions
import gpt
import tables


def option(default=None, help="", *, flags=None, group=None, **argparse_kw):
    """A TrainConfig field with its flag's help beside it. `help` may use {default}; `flags`
    replaces the flag made from the field's name; `group` lists the flag under a heading;
    booleans become store_true flags (or store_false, given `flags` and action); the rest of
    `argparse_kw` goes to argparse as it is."""
    return field(default=default, metadata={"help": help, "flags": flags, "group": group,
                                            **argparse_kw})


OWN = "your own labelled data (instead of the SMS data)"
LONG = "long runs: checkpoints, resuming, the best epoch, stopping early"
DECIDE = ("decisions: the data check, calibration, a threshold for a target, a baseline "
          "(docs/decisions.md)")

# Own files with more training rows than this leave the training split out of the final pass
# by default: on a 60,000-row file it took 4.6 of a 4.8-minute --max-steps 1 run.
FINAL_TRAIN_ROWS = 10_000


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
    format: str = option(group=OWN, choices=tables.FORMATS,
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
    check_data: bool = option(False, group=DECIDE, help="check the data alone and train "
                              "nothing: duplicates in each split, the same text in two splits, "
                              "the same text under two labels, empty, one-token and cut texts, "
                              "class shares (every run prints a line of it and keeps the whole "
                              "in data-check.json)")
    dedup: bool = option(False, group=DECIDE, help="your own files: drop exact duplicates (the "
                         "same text, whitespace and case aside, with the same label) from each "
                         "file before the split, keeping the first")
    target: str = option(group=DECIDE, metavar="precision=X|recall=X|fpr=X", help="choose the "
                         "decision threshold on the validation split's calibrated "
                         "probabilities that meets this for the positive class, X in (0, 1]; "
                         "evaluate.py and the server decide by it (default: none, the most "
                         "probable class)")
    positive_class: str = option(group=DECIDE, metavar="NAME", help="the class --target is "
                                 "about (default: the second class, the SMS data's spam; "
                                 "needed with more than two classes)")
    baseline: bool = option(True, flags=("--no-baseline",), action="store_false",
                            group=DECIDE, help="skip the baseline (word TF-IDF + logistic "
                            "regression on the same training split) printed beside the "
                            "model's test scores at the end")

    def __post_init__(self):
        check_types(self)  # made in Python: checked as argparse checks the command line


def flag_name(name):
    """The flag of a TrainConfig field, as the command line spells it."""
    f = {f.name: f for f in fields(TrainConfig)}[name]
    return (f.metadata.get("flags") or ["--" + name.replace("_", "-")])[0]


# Fields that name a file or folder: a pathlib.Path is taken as its text.
PATHS = {"data", "train_file", "val_file", "test_file", "weights", "output_dir", "resume"}
# Fields the command line gives as a comma list: a Python list or tuple is taken as one.
LISTS = {"labels": str, "final_splits": str, "class_weights": (int, float)}
KINDS = {int: "a whole number", float: "a number", bool: "True or False", str: "a string"}


def _field_value(f, value):
    """One field's value as the command line would have parsed it (ValueError if it cannot
    be): paths as text, lists as their comma form, --label-names from a dict, types checked."""
    flag = f"{flag_name(f.name)} ({f.name})"
    if isinstance(value, os.PathLike) and f.name in PATHS:
        value = os.fspath(value)
    if f.name in LISTS and isinstance(value, (list, tuple)):
        kind = LISTS[f.name]
        odd = [v for v in value if isinstance(v, bool) or not isinstance(v, kind)
               or isinstance(v, str) and ("," in v or not v.strip())]
        if odd or not value:
            raise ValueError(f"{flag}: {odd[0]!r} is not " + (
                "a name without commas" if kind is str else "a number") if odd else
                f"{flag} is an empty list; give at least one item, or None")
        value = ",".join(map(str, value))
    if f.name == "label_names" and isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if value is None:
        if f.default is None or f.default is MISSING:
            return None
        raise ValueError(f"{flag} is None but needs a value: {KINDS[f.type]}, such as "
                         f"{f.name}={f.default!r} (its default)")
    ok = (isinstance(value, bool) if f.type is bool else
          not isinstance(value, bool) and isinstance(value, (int, float) if f.type is float
                                                     else f.type))
    if not ok:
        plural = " or a list" if f.name in LISTS else ""
        raise ValueError(f"{flag} must be {KINDS[f.type]}{plural}, not "
                         f"{type(value).__name__} {value!r}"
                         + (f"; write {f.name}={value.strip()}" if f.type in (int, float)
                            and isinstance(value, str) and _numeric(value) else ""))
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{flag} is {value!r}, not one of {', '.join(choices)}")
    return float(value) if f.type is float else value


def _numeric(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_types(cfg):
    """Every field of a TrainConfig made in Python checked as argparse checks the command line
    (its type, its choices), and taken as the command line would give it: a pathlib.Path as
    its text, a list (--labels, --class-weights, --final-splits) as its comma form, a dict of
    --label-names as 0=ham,1=spam. ValueError naming the flag where a value cannot be one."""
    for f in fields(cfg):
        setattr(cfg, f.name, _field_value(f, getattr(cfg, f.name)))
    return cfg


def check_device(cfg, device):
    """The settings that need CUDA, checked once the run's device is known."""
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; use --precision bf16 instead")
    if cfg.tf32 and device.type != "cuda":
        raise ValueError(f"--tf32 is a CUDA setting, and this run is on {device.type}; drop "
                         "--tf32, or pass --device cuda")


def check_config(cfg):
    """Refuse settings that cannot work, with a message that says what to do."""
    check_types(cfg)  # (again: a field may have been set after the TrainConfig was made)
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
    if cfg.target is not None:
        decisions.parse_target(cfg.target)  # a malformed target is refused before anything
    elif cfg.positive_class is not None:
        raise ValueError("--positive-class goes with --target (the class the target is "
                         "about); give --target precision=X, recall=X or fpr=X too")
    if cfg.dedup and cfg.train_file is None:
        raise ValueError("--dedup drops duplicates from your own files (--train-file); the "
                         "chapter's SMS split is never changed (--check-data reports its "
                         "duplicates)")


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
