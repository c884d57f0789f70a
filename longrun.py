"""Long runs: checkpoints in the unfinished run folder, `--resume` from the last one exactly,
the best epoch kept (`--keep-best`) and training stopped early (`--early-stopping`).

    python finetune.py --train-file reviews.csv --output-dir runs/reviews --keep-best val_loss
    python finetune.py --resume runs/reviews      # after a kill: goes on from its checkpoint

`LongRun` attaches at the seams of finetune.py's loop (start, batches, after each step, each
epoch's end) and does nothing there unless asked; it is handed its scoring function, so it
imports nothing from finetune.py. `start` gives the run a `Resume` (from --resume) or a `Fresh`
start, whose steps do nothing. See docs/long-runs.md.
"""

import random
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

import files
from config import TrainConfig, flag_name


# What a checkpoint holds changes with this number; --resume refuses a checkpoint of another.
CHECKPOINT_FORMAT = 1
# Flags a resumed run may be given anew: they change when it writes, not what it computes.
ON_RESUME = {"resume", "output_dir", "checkpoints", "checkpoint_every", "final_splits",
             "target", "positive_class", "baseline"}  # (and what is decided after training)

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
        # those of the GPUs there are now: a machine with fewer has no generator for the rest
        for i, cuda in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda, i)


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
    nothing at them. `model` is the GPTModel under training; `score` (a function of the
    classifier) gives the whole validation split's (loss, accuracy, examples); `save` (a
    function of the checkpoint's dict) writes a checkpoint; without it (under torchrun, on
    ranks other than 0) none is written.
    """

    def __init__(self, cfg, model=None, score=None, save=None, resumed=None):
        self.cfg, self.model, self.score_validation, self.save = cfg, model, score, save
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
        stop = self.score(model, epoch) if self.cfg.keep_best and self.score_validation \
            else False
        if self.save and self.cfg.checkpoints:
            done = stop or ended or epoch + 1 == self.cfg.epochs
            self.checkpoint({"epoch": self.cfg.epochs if done else epoch + 1, "batch": 0,
                             "rng": rng_state()}, history, examples_seen, global_step)
        return stop

    def score(self, model, epoch):
        """--keep-best: the whole validation split's loss and accuracy, printed; the weights
        kept where the score is the best yet. Returns True where --early-stopping ends
        training."""
        with torch.random.fork_rng(devices=[]):  # a loader's iteration draws from torch's RNG
            model.eval()
            loss, accuracy, examples = self.score_validation(model)
        metric = self.cfg.keep_best
        score = loss if metric == "val_loss" else accuracy
        best = self.best
        if best is None or (score < best["score"] if metric == "val_loss" else
                            score > best["score"]):
            best = self.best = {"epoch": epoch + 1, "score": score, "tensors": {
                n: t.to("cpu", copy=True) for n, t in trainable_tensors(self.model).items()}}
        mark = "best so far" if best["epoch"] == epoch + 1 else f"best: epoch {best['epoch']}"
        print(f"Whole validation split ({examples} examples): loss {loss:.3f}, "
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


def same_folder(a, b):
    """Whether two paths name one run folder (its .unfinished form, where an --overwrite run
    builds it, counting as the folder)."""
    def run_folder(p):
        p = Path(p).resolve()
        return p.with_name(p.name[:-len(".unfinished")]) if p.name.endswith(".unfinished") \
            else p
    return run_folder(a) == run_folder(b)


def resume_config(cfg, given=None):
    """--resume: (the run's own TrainConfig, (out, replace, work, checkpoint)). `given` names
    the fields the command line set (default: those that differ from the defaults); each must
    equal the run's own (ValueError naming the one that does not), except ON_RESUME's."""
    folder = cfg.resume or cfg.output_dir
    if not folder:
        raise ValueError("--resume needs the run folder: --resume DIR, or --output-dir DIR "
                         "--resume")
    if cfg.resume and cfg.output_dir and not same_folder(cfg.resume, cfg.output_dir):
        raise ValueError(f"--resume {cfg.resume} goes on in that run's own folder, but "
                         f"--output-dir {cfg.output_dir} names another; a resumed run stays "
                         "where it began: drop --output-dir")
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


def gpus_note(ckpt):
    """A note where a run resumes with fewer CUDA generators (GPUs) than it saved (None where
    not): those of the GPUs there are now are restored, the rest dropped."""
    saved = len(ckpt["point"]["rng"].get("cuda", []))
    now = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved <= now:
        return None
    return (f"note: the run saved the random generators of {saved} GPUs and this machine has "
            f"{now}; those of the first {now} are restored, the rest dropped (a run that draws "
            "on the GPU, with dropout say, draws differently from there on)")


class Fresh:
    """A run that starts at its beginning: each of Resume's steps does nothing."""
    checkpoint = log = None
    at_start = True
    train_seconds = 0.0

    def plan_output(self, cfg):
        return files.plan_output_dir(cfg)

    def announce(self, out, cfg):
        pass

    def check_fits(self, model, base, source):
        pass

    def load_model(self, model):
        pass

    def load_training(self, optimizer, scaler):
        pass


class Resume(Fresh):
    """A run going on from the checkpoint in its unfinished folder (--resume): where the run
    folder is, the lines that say so, the checks that the weights and data are the run's, and
    the trained tensors, optimizer and scaler put back."""
    at_start = False

    def __init__(self, out, replace_, work, checkpoint):
        self.out, self.replace, self.work, self.checkpoint = out, replace_, work, checkpoint
        self.path, self.log = work / files.CHECKPOINT, checkpoint["log"]
        self.train_seconds = checkpoint["train_seconds"]

    def plan_output(self, cfg):
        return self.out, self.replace

    def announce(self, out, cfg):
        print(f"Resumed {out} from its checkpoint ({resumed_at(self.checkpoint, cfg)}); the "
              "log goes on from there")
        for note in (threads_note(self.checkpoint), gpus_note(self.checkpoint)):
            if note:
                print(note)

    def check_fits(self, model, base, source):
        check_checkpoint_fits(self.checkpoint, self.path, model, base, source)

    def load_model(self, model):
        load_checkpoint(self.checkpoint, self.path, model)

    def load_training(self, optimizer, scaler):
        optimizer.load_state_dict(self.checkpoint["optimizer"])
        scaler.load_state_dict(self.checkpoint["scaler"])


def start(cfg, given=None):
    """(the run's TrainConfig, a Resume or a Fresh start): with --resume, the run's own recorded
    flags (resume_config) and its checkpoint; otherwise `cfg` as it is."""
    if cfg.resume is None:
        return cfg, Fresh()
    cfg, (out, replace_, work, checkpoint) = resume_config(cfg, given)
    return cfg, Resume(out, replace_, work, checkpoint)
