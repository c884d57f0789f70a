"""The chapter's experiments table, measured: every row is one finetune.py run.

    python experiments.py --rows 1,2,3,5,10 --weights random --data SMSSpamCollection

Chapter 6 closes with 19 variations of its set-up (which token is classified, which layers
train, model size, padding, LoRA, ...) and the accuracies they reached. ROWS holds that table
once: each row's change as finetune.py flags, beside the chapter's figures. This script runs the
chosen rows one after another, each in its own folder of --output-dir (row-01, row-02, ...), and
after each row rewrites `experiments.md` there: the measured accuracies and training time beside
the chapter's.

Stopped half-way, the same command goes on where it stopped: a row whose folder holds run.json
is finished and kept (--rerun trains it again), an unfinished one starts over. A finished row is
kept only if it ran with the settings asked for now; otherwise the script says so and stops.

Weights: by default each row uses OpenAI's pretrained GPT-2 of the size it names (downloaded
once). `--weights random` trains every row from random weights instead, of the row's size
(random-medium, random-large, random-xl for rows 6-9 and 12); rows 5 and 10 are then the same
run, trained once (the second row's folder links to the first's). `--weights DIR` uses one
Hugging Face folder for every row, so the rows that change the model (6-10 and 12) are refused.
"""

import argparse
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import NamedTuple

import config
import data
import files
import finetune
import gpt


class Row(NamedTuple):
    number: int
    change: str  # the chapter's words
    flags: str  # the finetune.py flags that make the change
    train: float  # the chapter's accuracies (%), GPT-2 small pretrained unless the change says
    val: float
    test: float
    minutes: float  # the chapter's training time on an A100


# The chapter's experiments table.
ROWS = [
    Row(1, "none (last token, last block trainable, padded to 120)", "",
        96.63, 99.33, 95.00, 0.28),
    Row(2, "first token instead of last", "--token-position first",
        78.46, 80.54, 75.00, 0.28),
    Row(3, "only the output layer trainable", "--trainable-layers last_layer",
        78.65, 79.87, 72.00, 0.25),
    Row(4, "last two blocks trainable", "--trainable-layers last_two_blocks",
        98.85, 98.66, 98.33, 0.33),
    Row(5, "all layers trainable", "--trainable-layers all",
        99.62, 96.64, 96.67, 0.69),
    Row(6, "medium (355M)", "--weights medium",
        87.50, 91.28, 84.67, 0.75),
    Row(7, "large (774M)", "--weights large",
        99.52, 98.66, 96.67, 1.50),
    Row(8, "xl (1558M)", "--weights xl",
        99.81, 99.81, 98.33, 2.83),
    Row(9, "xl, all layers", "--weights xl --trainable-layers all",
        100.00, 98.66, 98.67, 8.12),
    Row(10, "random weights, all layers", "--weights random --trainable-layers all",
        100.00, 96.64, 93.67, 0.69),
    Row(11, "LoRA rank 16, alpha 16", "--trainable-layers lora --lora-rank 16 --lora-alpha 16",
        100.00, 97.32, 96.67, 0.75),
    Row(12, "xl, LoRA rank 16, alpha 8",
        "--weights xl --trainable-layers lora --lora-rank 16 --lora-alpha 8",
        100.00, 98.66, 98.33, 5.79),
    Row(13, "padded to the full context (1024)", "--context-length model",
        83.08, 87.92, 78.33, 2.46),
    Row(14, "no padding, batch size 1", "--no-padding --batch-size 1",
        100.00, 98.66, 98.00, 1.75),
    Row(15, "no padding, batch 1, gradient accumulation over 8",
        "--no-padding --batch-size 1 --accumulation-steps 8",
        99.33, 98.66, 98.33, 1.70),
    Row(16, "padded, but classify from the last non-padding token", "--token-position flexible",
        99.42, 98.66, 98.33, 0.30),
    Row(17, "no causal mask", "--disable-causal-mask",
        99.23, 98.66, 95.33, 0.29),
    Row(18, "padding ignored in the loss (ignore_index 50256)", "--ignore-index 50256",
        96.63, 99.33, 95.00, 0.28),
    Row(19, "mean of all token outputs pooled into the classified position",
        "--average-embeddings",
        97.79, 99.33, 96.33, 0.32),
]
NUMBERS = tuple(row.number for row in ROWS)

# TrainConfig fields that say where and how a run happens, not what it computes: left out of the
# settings column and of the check that a finished row matches (--no-initial-eval only skips a
# printout, --self-contained only says how the weights are kept, and the device has its own
# column).
NOT_SETTINGS = {"data", "output_dir", "overwrite", "device", "initial_eval", "self_contained"}


# ----------------------------------------------------------------------------- rows as runs

def parse_rows(text):
    """Row numbers from `1,2,10`, `1-5,10` or `all`, in the order given, without repeats."""
    if text.strip().lower() == "all":
        return list(NUMBERS)
    if not text.strip():
        raise ValueError("--rows is empty; give row numbers such as 1,2,10 or 1-5, or all")
    numbers = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"--rows {text!r} has an empty entry; give row numbers such as "
                             "1,2,10 or 1-5, or all")
        first, _, last = part.partition("-")
        try:
            span = range(int(first), int(last or first) + 1)
        except ValueError:
            raise ValueError(f"--rows: {part!r} is not a row number; give numbers such as "
                             "1,2,10 or 1-5, or all") from None
        if not span:
            raise ValueError(f"--rows: {part} is an empty range; write the lower number first")
        unknown = [n for n in span if n not in NUMBERS]
        if unknown:
            raise ValueError(f"--rows: no row {unknown[0]} in the chapter's table; its rows "
                             f"are 1 to {len(ROWS)}")
        numbers += [n for n in span if n not in numbers]
    return numbers


def row_flags(number, weights="pretrained"):
    """The finetune.py flags of a row, as a list, with the weights chosen for all rows.

    `pretrained`: the row's own (OpenAI's GPT-2 of its size, or random for row 10); `random`:
    random weights of the row's size; a folder: that folder, for the rows that keep GPT-2 small
    pretrained (ValueError for the others).
    """
    flags = shlex.split(ROWS[number - 1].flags)
    own = "small"
    if "--weights" in flags:
        i = flags.index("--weights")
        own = flags[i + 1]
        del flags[i:i + 2]
    if weights == "random":
        own = "random" if own in ("small", "random") else f"random-{own}"
    elif weights != "pretrained":
        if own != "small":
            raise ValueError(f"row {number} needs {own} weights, but --weights {weights} "
                             "gives the same folder to every row")
        own = weights
    return (["--weights", own] if own != "small" else []) + flags


def row_config(number, weights="pretrained", extra=()):
    """The row's finetune.TrainConfig, through finetune.py's own command line."""
    return finetune.parse_args(row_flags(number, weights) + list(extra))


def settings(flags):
    """The TrainConfig fields (a dict, as in run.json) that differ from finetune's defaults."""
    if "fast" in flags:  # run.json of a run made before the flag was named shortcuts
        flags = {"shortcuts": flags["fast"], **flags}
    return {f.name: flags.get(f.name, f.default) for f in fields(finetune.TrainConfig)
            if f.name not in NOT_SETTINGS and flags.get(f.name, f.default) != f.default}


def command_line(flags):
    """Those settings as finetune.py flags, e.g. `--weights random --trainable-layers all`."""
    words = []
    for name, value in settings(flags).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, f"{value:.15g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def twin(number, cfg, out_dir, among=NUMBERS):
    """A row `among` those finished in `out_dir` that ran with `cfg`'s very settings, or None.

    Under --weights random, rows 5 and 10 are the same run: random weights, all layers trained.
    """
    for other in among:
        folder = Path(out_dir) / f"row-{other:02d}"
        if other != number and files.is_finished(folder) and not folder.is_symlink() and \
                settings(files.read_json(folder / "run.json")["flags"]) == settings(asdict(cfg)):
            return other
    return None


# ----------------------------------------------------------------------------- the table

def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(out_dir, numbers, failed=None, running=None):
    """experiments.md: the chosen rows, and any others finished in `out_dir`, measured."""
    out_dir, failed = Path(out_dir), failed or {}
    shown = sorted(set(numbers) |
                   {n for n in NUMBERS if files.is_finished(out_dir / f"row-{n:02d}")})
    lines, random_rows, links = [], [], []
    for n in shown:
        row, folder = ROWS[n - 1], out_dir / f"row-{n:02d}"
        chapter = f"{row.train:.2f} / {row.val:.2f} / {row.test:.2f}"
        if files.is_finished(folder):
            info = files.read_json(folder / "run.json")
            metrics = files.read_json(folder / "metrics.json")
            acc = metrics["final_accuracy"]
            measured = [f"{acc[s] * 100:.2f}" for s in data.SPLITS]
            measured += [f"{metrics['train_minutes']:.2f}",
                         f"{metrics['device']} ({metrics['device_name']})"]
            flags = info["flags"]
            if folder.is_symlink():
                links.append(f"row {n} is row {int(folder.readlink().name[4:])}'s")
            if str(flags["weights"]).startswith("random") and n != 10:
                random_rows.append(n)
            shown_flags = f"`{command_line(flags)}`" if settings(flags) else "(defaults)"
        else:
            status = f"failed: {failed[n]}" if n in failed else \
                "running" if n == running else "not run yet"
            measured, shown_flags = [status, "", "", "", ""], ""
        lines.append("| " + " | ".join(cell(c) for c in [
            n, row.change, shown_flags, *measured, chapter, f"{row.minutes:.2f}"]) + " |")

    head = [
        "# The chapter's experiments, measured",
        "",
        "Chapter 6's experiments table beside our runs of the same changes. Each row "
        "is one `python finetune.py` run with the settings shown (its folder: `row-NN/`).",
        "Accuracy (%) is over the whole of each split after training; time is the training "
        "loop alone, in minutes. The chapter's figures: OpenAI's pretrained GPT-2 small unless "
        "the change says otherwise, 5 epochs, on an A100.",
    ]
    if random_rows:
        which = (f"rows {', '.join(map(str, random_rows))} were" if len(random_rows) > 1
                 else f"row {random_rows[0]} was")
        head += ["", f"**Random weights:** {which} trained from randomly initialised weights "
                 "(`--weights random`; medium, large and xl rows from random weights of their "
                 "size), not from OpenAI's pretrained ones, so they do not compare like with like "
                 "with the chapter's figures (the chapter's own random-weights run is row 10)."]
    if links:
        head += ["", f"**Shared runs:** {'; '.join(links)} run (the same settings, so its folder "
                 "links to that one)."]
    head += [
        "",
        "| # | change from the default | settings (finetune.py flags) | train | val | test "
        "| time (min) | device | chapter: train / val / test | chapter: time (A100, min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n"


def write_table(out_dir, numbers, failed=None, running=None):
    path = Path(out_dir) / "experiments.md"
    files.write_atomic(path, table(out_dir, numbers, failed, running).encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run rows of the chapter's experiments table "
                                "with finetune.py, one after another, and write "
                                "experiments.md with the measured figures beside the chapter's.")
    p.add_argument("--rows", required=True, metavar="LIST",
                   help="the rows to run, e.g. 1,2,10 or 1-5,16, or all (all 19)")
    p.add_argument("--weights", default="pretrained", metavar="pretrained|random|DIR",
                   help="pretrained: OpenAI's GPT-2 of each row's size (downloaded once); "
                   "random: random weights of each row's size, for every row; DIR: one Hugging "
                   "Face folder (config.json, model.safetensors) for every row, which rules out "
                   "rows 6-10 and 12 (default: pretrained)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="where to train; auto picks cuda, then mps, then cpu (default: auto)")
    p.add_argument("--data", metavar="PATH", help="the raw SMSSpamCollection file or its zip "
                   "(default: download it once into the cache)")
    p.add_argument("--output-dir", default="experiments", metavar="DIR",
                   help="holds one run folder per row (row-01, ...) and experiments.md "
                   "(default: experiments)")
    p.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)  # older command lines
    p.add_argument("--no-shortcuts", action="store_true",
                   help="finetune.py's --no-shortcuts: every step computes the whole model")
    p.add_argument("--precision", choices=tuple(gpt.PRECISIONS),
                   help="fp32 (finetune's default), bf16 or fp16 (CUDA) autocast")
    p.add_argument("--epochs", type=int, help="passes over the training set for every row "
                   "(default: finetune's, 5, as in the chapter)")
    p.add_argument("--max-steps", type=int,
                   help="stop every row after this many training steps: a quick smoke run")
    p.add_argument("--self-contained", action="store_true",
                   help="finetune.py's --self-contained: each row folder keeps its whole model, "
                   "not only what training changed")
    p.add_argument("--rerun", action="store_true",
                   help="train the chosen rows again even where finished, replacing them")
    return p.parse_args(argv)


def plan(args):
    """{row number: TrainConfig} for the chosen rows. Raises ValueError for bad input."""
    numbers = parse_rows(args.rows)
    if args.weights not in ("pretrained", "random") and not Path(args.weights).is_dir():
        raise ValueError(f"--weights {args.weights}: not pretrained, random, nor a folder with "
                         "config.json and model.safetensors")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(f"--output-dir {args.output_dir} is a file, not a folder")
    refused = [n for n in numbers if "--weights" in ROWS[n - 1].flags]
    if args.weights not in ("pretrained", "random") and refused:
        raise ValueError(f"rows {', '.join(map(str, refused))} change the model's size or "
                         f"weights, but --weights {args.weights} gives the same folder to every "
                         "row; leave them out, or use --weights pretrained or random")
    extra = ["--device", args.device, "--no-initial-eval"]
    for name in ("data", "precision", "epochs", "max_steps"):
        if getattr(args, name) is not None:
            extra += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    extra += ["--no-shortcuts"] * args.no_shortcuts + ["--overwrite"] * args.rerun
    extra += ["--self-contained"] * args.self_contained
    configs = {}
    for n in numbers:
        folder = Path(args.output_dir) / f"row-{n:02d}"
        cfg = row_config(n, args.weights, extra + ["--output-dir", str(folder)])
        config.check_config(cfg)
        if files.is_finished(folder) and not args.rerun:
            done = settings(files.read_json(folder / "run.json")["flags"])
            if done != settings(asdict(cfg)):
                raise ValueError(f"row {n} in {folder} finished with other settings "
                                 f"({command_line(done) or 'the defaults'}) than asked now "
                                 f"({command_line(asdict(cfg)) or 'the defaults'}); pass --rerun "
                                 "to train it again, or choose another --output-dir")
        configs[n] = cfg
    return configs


def main(argv=None):
    args = parse_args(argv)
    try:
        configs = plan(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    out_dir, numbers, failed, ran = Path(args.output_dir), list(configs), {}, []
    try:
        for i, (n, cfg) in enumerate(configs.items(), 1):
            folder = Path(cfg.output_dir)
            if files.is_finished(folder) and not args.rerun:
                print(f"Row {n}: finished in {folder}, kept", flush=True)
                continue
            if folder.is_symlink():  # a link to a twin (below): this row now trains itself
                folder.unlink()
            other = twin(n, cfg, out_dir, among=ran if args.rerun else NUMBERS)
            if other is not None and not folder.exists():
                try:
                    folder.symlink_to(f"row-{other:02d}", target_is_directory=True)
                    print(f"Row {n}: the same settings as row {other}, which finished: "
                          f"{folder} links to it", flush=True)
                    write_table(out_dir, numbers, failed)
                    continue
                except OSError:  # no symlinks here (some Windows set-ups): train it again
                    pass
            write_table(out_dir, numbers, failed, running=n)
            print(f"\n=== Row {n} ({i} of {len(numbers)}): {ROWS[n - 1].change}\n"
                  f"    python finetune.py {command_line(asdict(cfg))}", flush=True)
            try:
                finetune.run(cfg)
                ran.append(n)
            except finetune.ERRORS as e:
                failed[n] = str(e)  # noted in the table; the other rows still run
                print(f"error: row {n}: {e}", file=sys.stderr, flush=True)
            write_table(out_dir, numbers, failed)
    except KeyboardInterrupt:
        write_table(out_dir, numbers, failed)
        sys.exit("interrupted; finished rows are kept: run the same command again to go on")
    path = write_table(out_dir, numbers, failed)
    print(f"\nWrote {path}")
    if failed:
        sys.exit(f"error: {len(failed)} of {len(numbers)} rows failed: " +
                 "; ".join(f"row {n}: {msg}" for n, msg in failed.items()))


if __name__ == "__main__":
    main()
