"""The layout a reader of the chapter relies on: the spine (gpt.py, data.py, finetune.py,
evaluate.py) readable in the chapter's order and names, everything else attached at seams, imports
pointing one way, every flag documented."""

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import evaluate
import finetune
import gpt

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "setup")
SPINE = ("gpt", "data", "finetune", "evaluate")
# who may import whom: each module's allowed local imports (imports point one way)
ALLOWED = {
    "ddp": set(), "files": {"ddp"}, "data": {"files"}, "gpt": {"data", "files"},
    "shortcuts": {"gpt", "ddp", "files"},
    "finetune": {"data", "ddp", "files", "gpt", "shortcuts"},
    "evaluate": {"data", "ddp", "files", "gpt", "shortcuts", "finetune", "serve", "export"},
    "serve": {"data", "ddp", "files", "gpt", "shortcuts", "evaluate"},
    "experiments": {"data", "files", "finetune", "gpt"},
    "export": {"data", "files", "gpt"},
}


def tree(name):
    return ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))


def local_imports(node):
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name in MODULES}
        elif isinstance(n, ast.ImportFrom) and n.module in MODULES:
            found.add(n.module)
    return found


@pytest.mark.parametrize("name", MODULES)
def test_imports_point_one_way_and_sit_at_the_top(name):
    module = tree(name)
    inside = [f"{name}.py:{n.lineno}" for f in ast.walk(module)
              if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))
              and local_imports(n)]
    assert not inside, f"a project module imported inside a function: {inside}"
    assert local_imports(module) <= ALLOWED[name], \
        f"{name}.py imports {sorted(local_imports(module) - ALLOWED[name])}"


@pytest.mark.parametrize("name", MODULES)
def test_each_module_says_what_it_holds_with_an_example_command(name):
    doc = ast.get_docstring(tree(name))
    assert doc and re.search(r"python[0-9]? \S+\.py|torchrun", doc), \
        f"{name}.py: its docstring should say what it holds and give one example command"


def test_gpt_py_shows_the_chapter_first_and_no_shortcut():
    source = (ROOT / "gpt.py").read_text(encoding="utf-8")
    lines = source.splitlines()
    first = "\n".join(lines[:300])
    for needed in ("class GPTConfig", "class MultiHeadAttention", "class TransformerBlock",
                   "class GPTModel", "def add_classification_head", "def setup_classifier",
                   "def classify_logits", "[:, -1, :]", "class Classifier"):
        assert needed in first, f"{needed} is not within gpt.py's first 300 lines"
    for shortcut in ("TrunkCache", "FrozenBlock", "block_at", "onednn", "sdpa_kernel"):
        assert shortcut not in source, f"gpt.py holds the shortcut {shortcut}"


def test_finetune_py_holds_the_chapter_functions_together_in_the_chapter_order():
    order = ["calc_accuracy_loader", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
             "train_classifier_simple", "plot_values"]
    defs = [n.name for n in tree("finetune").body if isinstance(n, ast.FunctionDef)]
    start = defs.index(order[0])
    assert defs[start:start + len(order)] == order


def test_files_py_knows_nothing_of_gpt2():
    source = (ROOT / "files.py").read_text(encoding="utf-8").split('"""', 2)[2]
    assert not re.search(r"GPT|gpt\.|torch\.nn|tokeni[sz]", source)


def flag_of(f):
    return (f.metadata.get("flags") or ["--" + f.name.replace("_", "-")])[0]


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for f in fields(finetune.TrainConfig):
        assert flag_of(f) in shown, f"--help lacks {flag_of(f)}"
        if f.default not in (None, False, True):
            help_ = f.metadata["help"].format(default=f.default)
            said = re.search(r"\(default: ([^;,)]*)", help_)
            shown_default = f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
            assert said and said.group(1) in (str(f.default), shown_default), \
                f"{flag_of(f)}: its help does not say its default"
            after = shown[shown.index(flag_of(f)):]
            assert said.group(0) in after, f"{flag_of(f)}: --help does not show its default"


def test_every_flag_is_in_the_docs():
    flags_page = (ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    missing = [flag_of(f) for f in fields(finetune.TrainConfig) if flag_of(f) not in flags_page]
    assert not missing, f"docs/flags.md lacks {missing}"


def test_older_command_lines_keep_working():
    assert finetune.parse_args(["--fast"]).shortcuts
    assert not finetune.parse_args(["--no-fast"]).shortcuts
    assert not finetune.parse_args(["--no-shortcuts"]).shortcuts


def test_the_readme_maps_the_chapter_to_functions_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if re.match(r"\| (6\.\d|the chapter's code)",
                                                             line)]
    assert len(rows) >= 7
    named = 0
    for row in rows:
        for module, names in re.findall(r"`(\w+)\.py`: ((?:`\w+`[^`|;]*)+)", row):
            for name in re.findall(r"`(\w+)`", names):
                assert hasattr(__import__(module), name), f"README names {module}.{name}"
                named += 1
    assert named >= 20


def test_classify_review_is_the_chapters_function():
    model = gpt.GPTModel(gpt.GPTConfig(vocab_size=50257, context_length=16, emb_dim=8,
                                       n_heads=2, n_layers=1))
    torch.manual_seed(0)
    gpt.add_classification_head(model, 2)
    info = {"class_names": ["not spam", "spam"], "max_length": 10, "padding": True,
            "batch_size": 8}
    classifier = evaluate.inference_classifier(model.eval(), info)
    tokenizer = evaluate.data.get_tokenizer()
    text = "You are a winner you have been specially selected"
    label = evaluate.classify_review(text, classifier, tokenizer, torch.device("cpu"), info)
    ids = torch.tensor([evaluate.data.encode(text, tokenizer, 10)])
    with torch.no_grad():
        expected = info["class_names"][int(model(ids)[:, -1, :].argmax())]
    assert label == expected
