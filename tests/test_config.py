"""config.py: TrainConfig made in Python is checked as the command line checks its flags
(issue 27.2), before anything is read or trained; the one classifying function takes a single
text as one text."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import config
import data
import evaluate
import finetune
import gpt

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
