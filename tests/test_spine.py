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
    "ddp": set(), "files": {"ddp"}, "data": {"files"}, "datacheck": set(),
    "tables": {"data", "datacheck", "files"},
    "gpt": {"data", "files"}, "config": {"data", "ddp", "decisions", "gpt", "tables"},
    "decisions": {"baseline", "data", "files"}, "baseline": set(),
    "shortcuts": {"gpt", "ddp", "files"}, "longrun": {"config", "files"},
    "finetune": {"config", "data", "datacheck", "ddp", "decisions", "files", "gpt", "longrun",
                 "shortcuts", "tables"},
    "evaluate": {"baseline", "data", "ddp", "decisions", "export", "files", "gpt", "shortcuts",
                 "serve", "tables"},
    "serve": {"data", "ddp", "decisions", "files", "gpt", "shortcuts", "evaluate"},
    "experiments": {"config", "data", "files", "finetune", "gpt"},
    "export": {"data", "decisions", "files", "gpt"},
}
# The most lines a module may grow to before it should be split by concern.
MAX_LINES = 800


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


def test_finetune_py_opens_with_the_chapter_functions_in_the_chapter_order():
    order = ["calc_accuracy_loader", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
             "train_classifier_simple", "plot_values"]
    defs = [n for n in tree("finetune").body if isinstance(n, ast.FunctionDef)]
    assert [n.name for n in defs[:len(order)]] == order  # the first functions of the file
    assert defs[0].lineno <= 60, "the chapter's first function should start near the top"
    assert len((ROOT / "finetune.py").read_text().splitlines()) <= 700


@pytest.mark.parametrize("name", MODULES)
def test_no_module_outgrows_one_concern(name):
    lines = len((ROOT / f"{name}.py").read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name}.py has {lines} lines: split it by concern"


def test_the_chapters_names_lead_to_what_does_their_work():
    """A reader searching for a chapter function the code names otherwise lands on it."""
    sources = {name: (ROOT / f"{name}.py").read_text(encoding="utf-8") for name in SPINE}
    for chapter_name, where in (("create_balanced_dataset", "data"), ("random_split", "data"),
                                ("download_and_unzip_spam_data", "data"),
                                ("load_weights_into_gpt", "gpt"),
                                ("generate_text_simple", "gpt")):
        assert f"`{chapter_name}`" in sources[where], f"{where}.py never names {chapter_name}"


def bound_names(module):
    """(name, line) of every name a module binds outside class bodies: assignments, loop and
    with targets, function parameters, imports under another name, comprehension variables."""
    found = []

    def visit(node, in_class=False):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, in_class=True)
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                args = child.args
                for a in args.posonlyargs + args.args + args.kwonlyargs + \
                        [x for x in (args.vararg, args.kwarg) if x]:
                    found.append((a.arg, child.lineno))
                visit(child, in_class=False)
                continue
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store) and \
                    not in_class:
                found.append((child.id, child.lineno))
            elif isinstance(child, ast.alias) and child.asname:
                found.append((child.asname, node.lineno))
            visit(child, in_class)
    visit(module)
    return found


# gpt.Classifier's one seam is named for what it takes; gpt.py may never import shortcuts.py
SEAMS = {("gpt", "shortcuts")}


@pytest.mark.parametrize("name", MODULES)
def test_no_local_name_hides_a_project_module(name):
    """`files = {...}` in a module that imports files turns the next `files.RunError` into a
    traceback: no name a module binds may be a project module's (it imports it, or may one
    day), but for the seams named above."""
    hiding = [f"{name}.py:{line} binds {bound}" for bound, line in bound_names(tree(name))
              if bound in set(MODULES) - {name} and (name, bound) not in SEAMS]
    assert not hiding, hiding


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


# ----------------------------------------------------------------------- the suite's own workers

@pytest.mark.parametrize("cores, cpu_max, env, workers", [
    (2, None, None, 2), (64, None, None, 8), (64, "200000 100000", None, 2),
    (16, "150000 100000", None, 2), (4, "max 100000", None, 4), (1, None, None, 1),
    (64, None, "3", None)])
def test_auto_workers_follow_the_cores_this_process_may_use(monkeypatch, tmp_path, cores,
                                                            cpu_max, env, workers):
    import conftest
    monkeypatch.setattr(conftest.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    path = tmp_path / "cpu.max"
    if cpu_max:
        path.write_text(cpu_max + "\n")
    monkeypatch.setattr(conftest, "CPU_MAX", path)
    if env:
        monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", env)
    else:
        monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    assert conftest.pytest_xdist_auto_num_workers(None) == workers
