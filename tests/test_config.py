"""config.py: TrainConfig and its checks, from the command line and from Python.
"""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import config
import data
import evaluate
import finetune
import gpt


# ---------------------------------------------------- the Python API checked as the command line

TINY = gpt.GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1)


@pytest.mark.parametrize("kw, said", [
    ({"keep_best": "accuracy"}, "--keep-best (keep_best) is 'accuracy', not one of val_loss, "
                                "val_accuracy"),
    ({"epochs": "2"}, "--epochs (epochs) must be a whole number, not str '2'; write epochs=2"),
    ({"lr": "1e-3"}, "--lr (lr) must be a number"),
    ({"epochs": 2.0}, "--epochs (epochs) must be a whole number"),
    ({"epochs": None}, "--epochs (epochs) is None but needs a value"),
    ({"initial_eval": 0}, "--no-initial-eval (initial_eval) must be True or False"),
    ({"device": "gpu"}, "--device (device) is 'gpu', not one of auto, cpu, cuda, mps"),
    ({"labels": ["a,b", "c"]}, "--labels (labels): 'a,b' is not a name without commas"),
    ({"class_weights": ["1", 2]}, "--class-weights (class_weights): '1' is not a number"),
    ({"labels": []}, "--labels (labels) is an empty list"),
    ({"train_file": 3}, "--train-file (train_file) must be a string"),
])
def test_a_wrong_field_is_refused_where_the_config_is_made(kw, said):
    with pytest.raises(ValueError) as e:
        config.TrainConfig(**kw)
    assert str(e.value).startswith(said) and "\n" not in str(e.value)


def test_paths_and_lists_are_taken_as_the_command_line_gives_them(tmp_path):
    cfg = config.TrainConfig(train_file=tmp_path / "rows.csv", output_dir=tmp_path / "run",
                             labels=["spam", "ham"], class_weights=(1, 2.5),
                             final_splits=["validation", "test"],
                             label_names={0: "ham", 1: "spam"}, lr=1)
    assert cfg.train_file == str(tmp_path / "rows.csv") and cfg.output_dir == str(tmp_path / "run")
    assert (cfg.labels, cfg.class_weights, cfg.final_splits, cfg.label_names) == (
        "spam,ham", "1,2.5", "validation,test", "0=ham,1=spam")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    json.dumps(asdict(cfg))  # run.json and the checkpoint record them as they are
    cli = config.parse_args(["--train-file", str(tmp_path / "rows.csv"), "--labels", "spam,ham",
                             "--output-dir", str(tmp_path / "run"), "--class-weights", "1,2.5",
                             "--final-splits", "validation,test", "--label-names",
                             "0=ham,1=spam", "--lr", "1"])
    assert cli == cfg


def test_a_field_set_later_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    read = []
    monkeypatch.setattr(finetune, "load_data", lambda cfg: read.append(cfg))
    cfg = config.TrainConfig(train_file=str(tmp_path / "missing.csv"),
                             output_dir=str(tmp_path / "run"))
    cfg.keep_best = "accuracy"
    with pytest.raises(ValueError, match="--keep-best .* not one of val_loss, val_accuracy"):
        finetune.run(cfg)
    cfg.keep_best, cfg.epochs = None, "2"
    with pytest.raises(ValueError, match="--epochs .* must be a whole number"):
        finetune.run(cfg)
    assert read == [] and not (tmp_path / "run").exists()


def test_the_command_line_is_unchanged():
    cfg = config.parse_args(["--epochs", "2", "--resume", "--no-initial-eval", "--fast"])
    assert (cfg.epochs, cfg.resume, cfg.initial_eval, cfg.shortcuts) == (2, "", False, True)
    assert config.TrainConfig() == config.parse_args([])


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    model = gpt.add_classification_head(gpt.GPTModel(TINY), 2)
    info = {"class_names": ["ham", "spam"], "max_length": 16, "padding": True, "batch_size": 8,
            "pad_id": data.PAD_ID, "token_position": "last"}
    return evaluate.inference_classifier(model, info), info


def test_a_single_text_is_one_text_not_its_characters(tiny_classifier):
    classifier, info = tiny_classifier
    cpu = torch.device("cpu")
    one = evaluate.predict_proba("hello", classifier, info, cpu)
    assert len(one) == 1 and list(one[0]) == ["ham", "spam"]
    two = evaluate.predict_proba(["hello", "free prize"], classifier, info, cpu)
    assert len(two) == 2 and two[0] == pytest.approx(one[0])
    with pytest.raises(ValueError, match="text 2 is int 3, not a string"):
        evaluate.predict_proba(["hello", 3], classifier, info, cpu)


def test_the_python_page_names_the_negated_flags():
    page = " ".join((Path(__file__).resolve().parents[1] / "docs" / "python.md")
                    .read_text(encoding="utf-8").split())
    for flag, name in (("--no-initial-eval", "initial_eval"), ("--no-shortcuts", "shortcuts"),
                       ("--no-checkpoints", "checkpoints")):
        assert f"`{flag}` is `{name}=False`" in page


# ---------------------------------------------------------------------- options and their checks

TINY_options = gpt.GPTConfig(vocab_size=100, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
TINY_GPT2_VOCAB = replace(TINY_options, vocab_size=50257, context_length=128, n_heads=2)
PAD = 99  # the tiny vocabulary's stand-in for <|endoftext|>
CPU = torch.device("cpu")


def tiny_classifier_options(trainable, seed=0):
    """A tiny model set up as the chapter does: head drawn right after seeding torch with 123."""
    torch.manual_seed(seed)
    model = gpt.GPTModel(TINY_options)
    torch.manual_seed(123)
    return gpt.setup_classifier(model, 2, trainable)


def batches(n, length=10, seed=1):
    """`n` examples of `length` random ids (no padding) and labels 0/1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PAD, (n, length), generator=g), torch.randint(0, 2, (n,), generator=g)


def loaders(x, y, batch_size):
    """Train and validation loaders over the same examples, in order (no shuffling)."""
    ds = TensorDataset(x, y)
    return {name: DataLoader(ds, batch_size=batch_size) for name in ("train", "validation")}


def train_cfg(**kw):
    return finetune.TrainConfig(**{"epochs": 1, "eval_freq": 10**6, "eval_iter": 1, **kw})


def train(model, x, y, batch_size, optimizer, **kw):
    return finetune.train_classifier_simple(gpt.Classifier(model, pad_id=PAD),
                                            loaders(x, y, batch_size), optimizer,
                                            train_cfg(**kw), CPU)


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def counting(optimizer):
    """Wrap optimizer.step: the list it returns gets each step's gradients, by name."""
    steps, step, params = [], optimizer.step, optimizer.param_groups[0]["params"]

    def counted_step(*args, **kwargs):
        steps.append([None if p.grad is None else p.grad.clone() for p in params])
        return step(*args, **kwargs)
    optimizer.step = counted_step
    return steps


# ----------------------------------------------------------------------------- LoRA (rows 11, 12)

def test_lora_trains_only_its_own_parameters(capsys):
    model = tiny_classifier_options("lora")
    before = weights(model)
    # finetune.run's optimizer: AdamW over *all* parameters, weight decay included.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = batches(8)
    train(model, x, y, 4, optimizer, max_steps=2)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    lora = {name for name in before if name.endswith((".A", ".B"))}
    assert changed <= lora  # no base weight, embedding, norm or head moved
    assert {name for name in lora if name.endswith(".B")} <= changed
    assert {name for name in lora if name.endswith(".A")} <= changed  # B != 0 after step 1
    assert "out_head.base.weight" in before and "tok_emb.weight" in before


def test_lora_update_is_scaled_by_alpha_as_in_the_book():
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 3)
    lora = gpt.LoRALinear(base, rank=2, alpha=8.0)
    with torch.no_grad():
        lora.B.fill_(0.5)
    x = torch.randn(5, 4)
    assert_close(lora(x), base(x) + 8.0 * (x @ lora.A @ lora.B))
    assert_close(lora.merged()(x), lora(x))


# ----------------------------------------------------------------------------- accumulation (15)

@pytest.mark.parametrize("make_optimizer, atol, skip", [
    (lambda params: torch.optim.SGD(params, lr=0.5), 1e-6, ()),
    # Adam's first step is about lr * sign(gradient), which magnifies rounding where a gradient
    # is tiny. The key biases' gradient is 0 in exact arithmetic (a key bias adds the same score
    # to every key a query sees, which softmax ignores), so Adam steps them by rounding noise.
    (lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1), 1e-5,
     ("W_key.bias",)),
], ids=["sgd", "adamw"])
def test_accumulating_k_batches_of_one_equals_one_batch_of_k(make_optimizer, atol, skip, capsys):
    k = 4
    x, y = batches(k)  # equal lengths, so a batch of k needs no padding
    after = []
    for batch_size, accumulation_steps in ((k, 1), (1, k)):
        model = tiny_classifier_options("all")
        start = weights(model)
        optimizer = make_optimizer(model.parameters())
        steps = counting(optimizer)
        train(model, x, y, batch_size, optimizer, accumulation_steps=accumulation_steps)
        assert len(steps) == 1
        after.append(weights(model))
    assert any((after[0][n] - start[n]).abs().max() > 1e-4 for n in start)  # it trained
    for name in after[0]:
        if not name.endswith(skip):
            assert_close(after[1][name], after[0][name], atol=atol, rtol=1e-5)


def test_the_last_short_accumulation_group_is_stepped_too(capsys):
    model = tiny_classifier_options("last_block")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # gradients at fixed weights
    steps = counting(optimizer)
    x, y = batches(5)
    train(model, x, y, 1, optimizer, accumulation_steps=2)
    assert len(steps) == 3  # batches 1+2, 3+4, 5

    # Each step's gradient: the group's losses, each divided by K = 2, summed; the last group
    # (one batch) is divided by 2 as well, as the chapter's code does.
    classifier = gpt.Classifier(model, pad_id=PAD)
    params = optimizer.param_groups[0]["params"]
    trainable = [i for i, p in enumerate(params) if p.requires_grad]

    def grads(indices):
        model.zero_grad(set_to_none=True)
        for i in indices:
            (finetune.calc_loss_batch(x[i:i + 1], y[i:i + 1], classifier, CPU) / 2).backward()
        return [params[j].grad.clone() for j in trainable]

    for step, group in zip(steps, ([0, 1], [2, 3], [4])):
        for got, expected in zip([step[j] for j in trainable], grads(group)):
            assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert all(step[j] is None for step in steps for j in range(len(params))
               if j not in trainable)  # frozen weights get no gradient

    # Each epoch starts a new group: two epochs of 5 batches are 6 steps, not 5.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = counting(optimizer)
    train(model, x, y, 1, optimizer, accumulation_steps=2, epochs=2)
    assert len(steps) == 6


def test_max_steps_inside_an_accumulation_group_still_steps(capsys):
    model = tiny_classifier_options("last_block")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = counting(optimizer)
    x, y = batches(16)
    train(model, x, y, 1, optimizer, accumulation_steps=8, max_steps=5)
    assert len(steps) == 1  # the 5 batches gathered so far are not thrown away
    steps.clear()
    train(model, x, y, 1, optimizer, accumulation_steps=8, max_steps=12)
    assert len(steps) == 2  # one full group of 8, then the 4 batches before the stop


# ----------------------------------------------------------------------------- ignore_index (18)

def test_ignore_index_50256_leaves_the_loss_of_class_labels_unchanged(capsys):
    model = tiny_classifier_options("last_block")
    classifier = gpt.Classifier(model, pad_id=PAD)
    x, y = batches(8)
    assert set(y.tolist()) == {0, 1}
    default = finetune.calc_loss_batch(x, y, classifier, CPU)
    assert torch.equal(finetune.calc_loss_batch(x, y, classifier, CPU, ignore_index=50256),
                       default)
    # ... because no label is 50256: ignoring a label that occurs does change it.
    only_zeros = finetune.calc_loss_batch(x, y, classifier, CPU, ignore_index=1)
    assert_close(only_zeros, finetune.calc_loss_batch(x[y == 0], y[y == 0], classifier, CPU))
    assert abs(only_zeros.item() - default.item()) > 1e-4

    # and so a whole training run is the same, step for step
    histories = []
    for ignore_index in (-100, 50256):
        model = tiny_classifier_options("last_block")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        histories.append((train(model, x, y, 2, optimizer, ignore_index=ignore_index,
                                eval_freq=1), weights(model)))
    assert histories[0][0] == histories[1][0]
    assert all(torch.equal(histories[0][1][n], histories[1][1][n]) for n in histories[0][1])


# ----------------------------------------------------------------------------- data flags (13, 14)

@pytest.fixture(scope="module")
def sms_file(tmp_path_factory):
    """A small SMS Spam Collection: 24 ham, 16 spam, of lengths 2 to about 60 tokens."""
    lines = []
    for i in range(40):
        label = "spam" if i % 5 in (1, 3) else "ham"
        words = " ".join(["free", "call", "now", "winner", "home", "later"][j % 6]
                         for j in range((i * 7) % 55 + 1))
        lines.append(f"{label}\tMessage {i}: {words}")
    path = tmp_path_factory.mktemp("sms") / "SMSSpamCollection"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def run_capturing(monkeypatch, tmp_path, sms_file):
    """finetune.run on `sms_file` with a tiny GPT-2 of the real vocabulary size; returns the
    loaders training got, and run.json."""
    monkeypatch.setattr(gpt, "load_gpt", lambda *args, **kwargs: gpt.GPTModel(TINY_GPT2_VOCAB))
    seen, real_train = {}, finetune.train_classifier_simple

    def capturing_train(model, loaders, *args, **kwargs):
        seen["loaders"] = loaders
        return real_train(model, loaders, *args, **kwargs)
    monkeypatch.setattr(finetune, "train_classifier_simple", capturing_train)

    def run(*flags):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        cfg = finetune.parse_args([*flags, "--data", str(sms_file), "--output-dir", str(out),
                                   "--device", "cpu", "--max-steps", "2", "--no-initial-eval"])
        finetune.run(cfg)
        return seen["loaders"], json.loads((out / "run.json").read_text())
    return run


def split_texts(sms_file):
    return {name: [text for _, text in rows]
            for name, rows in data.make_splits(data.load_rows(sms_file)).items()}


def items(loader):
    return [x for x, _ in loader.dataset]


@pytest.mark.parametrize("flag, length", [("16", 16), ("model", 128), ("longest", None)])
def test_context_length_pads_and_truncates_every_split_to_n(run_capturing, sms_file, flag,
                                                            length, capsys):
    loaders, info = run_capturing("--context-length", flag)
    tok, texts = data.get_tokenizer(), split_texts(sms_file)
    longest = max(len(tok.encode(t)) for t in texts["train"])
    assert longest > 16  # some texts are cut at 16 tokens ...
    assert min(len(tok.encode(t)) for t in texts["train"]) < 16  # ... and some padded
    length = length or longest
    assert info["max_length"] == length and info["padding"] is True
    for name in data.SPLITS:
        expected = [data.encode(t, tok, length) for t in texts[name]]
        assert [x.tolist() for x in items(loaders[name])] == expected
        assert all(len(x) == length for x in expected)
        assert all(x.shape == (8 if name == "train" else x.shape[0], length)
                   for x, _ in loaders[name])


def test_no_padding_keeps_every_text_its_own_length(run_capturing, sms_file, capsys):
    loaders, info = run_capturing("--no-padding", "--batch-size", "1")
    tok, texts = data.get_tokenizer(), split_texts(sms_file)
    assert info["padding"] is False and info["batch_size"] == 1
    for name in data.SPLITS:
        assert [x.tolist() for x in items(loaders[name])] == [tok.encode(t) for t in texts[name]]
        shapes = {tuple(x.shape) for x, _ in loaders[name]}
        assert all(s[0] == 1 for s in shapes)
    assert len({len(x) for x in items(loaders["train"])}) > 5  # lengths vary
    assert not any(data.PAD_ID in x.tolist() for x in items(loaders["train"]))


def test_disable_causal_mask_reaches_the_trained_model(run_capturing, capsys):
    _, info = run_capturing("--disable-causal-mask")
    assert info["model"]["causal"] is False
    _, info = run_capturing()
    assert info["model"]["causal"] is True
