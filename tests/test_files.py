"""files.py: the run folder (one run, one folder, under a lock), atomic writes, free space, nothing
a user had lost, never a silent wrong number.
"""

import errno
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from safetensors.torch import load_file, save_file

import data
import evaluate
import files
import finetune
import gpt
import shortcuts
import tables
from conftest import error_line, one_error_line


# --------------------------------------------------------------------------- one run, one folder

ROOT = Path(__file__).resolve().parents[1]


def train(out, tiny_weights, small_raw_path, *extra, capsys=None):
    finetune.main(["--weights", str(tiny_weights), "--data", str(small_raw_path),
                   "--output-dir", str(out), "--device", "cpu", "--epochs", "1",
                   "--max-steps", "2", "--no-initial-eval", *extra])


def error_of(*args, **kw):
    with pytest.raises(SystemExit) as e:
        train(*args, **kw)
    return error_line(e)


@pytest.fixture
def holder(tmp_path):
    """Another process holding a folder (as a finetune.py training there would), until killed."""
    procs = []

    def hold(out):
        code = ("import sys, time, files; from pathlib import Path; "
                "files.hold(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)")
        p = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p
    yield hold
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def test_a_second_run_into_a_held_folder_is_refused_and_writes_nothing(
        tmp_path, tiny_weights, small_raw_path, holder):
    out = tmp_path / "run"
    holder(out)
    message = error_of(out, tiny_weights, small_raw_path)
    assert message.startswith("error: another finetune.py is writing to") and str(out) in message
    assert list(out.iterdir()) == []  # no log.txt, no weights: the holder's folder untouched


def test_a_killed_holder_frees_the_folder(tmp_path, tiny_weights, small_raw_path, holder):
    out = tmp_path / "run"
    p = holder(out)
    p.kill()  # SIGKILL: no clean-up runs, the system drops the lock
    p.wait(timeout=10)
    train(out, tiny_weights, small_raw_path)
    assert (out / "run.json").is_file()


def test_overwrite_is_refused_while_another_run_holds_the_finished_run(
        tmp_path, tiny_weights, small_raw_path, holder):
    out = tmp_path / "run"
    train(out, tiny_weights, small_raw_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder(out)
    message = error_of(out, tiny_weights, small_raw_path, "--overwrite")
    assert "another finetune.py is writing to" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not files.unfinished_path(out).exists()


def test_the_lock_is_dropped_when_a_run_ends_finished_or_failed(tmp_path, tiny_weights,
                                                                small_raw_path):
    out = tmp_path / "run"
    train(out, tiny_weights, small_raw_path)
    lock = files.hold(out)  # nobody holds it any more
    files.release(lock)
    bad = tmp_path / "bad"
    folder = files.RunFolder(bad, replace=False)
    with pytest.raises(files.RunFailed):
        with folder:
            folder.make()
            raise ValueError("failed after the folder was made")
    files.release(files.hold(bad))


def test_a_run_that_finished_meanwhile_is_not_written_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    folder = files.RunFolder(out, replace=False)  # planned while out held no finished run
    (out / "run.json").write_text("{}")  # ... which another process then finished there
    with pytest.raises(ValueError, match="holds a finished run now"):
        with folder:
            folder.make()
    assert (out / "run.json").read_text() == "{}" and not (out / "log.txt").exists()
    files.release(files.hold(out))  # and the refused run let go of the folder


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_weights, small_raw_path):
    root = tmp_path_factory.mktemp("two")
    for name, seed in (("a", "1"), ("b", "2")):
        train(root / name, tiny_weights, small_raw_path, "--seed", seed)
    return root / "a", root / "b"


def test_each_file_of_a_run_carries_its_run_id(two_runs):
    a, b = two_runs
    info = json.loads((a / "run.json").read_text())
    assert len(info["run_id"]) == 32
    assert json.loads((a / "metrics.json").read_text())["run_id"] == info["run_id"]
    assert info["run_id"] != json.loads((b / "run.json").read_text())["run_id"]
    evaluate.load_run(a, torch.device("cpu"))  # its own files: taken


@pytest.mark.parametrize("which", ["weights", "metrics"])
def test_a_folder_mixing_two_runs_files_is_refused(tmp_path, two_runs, which):
    a, b = two_runs
    name = json.loads((a / "run.json").read_text())["weights_file"] if which == "weights" \
        else "metrics.json"
    mixed = tmp_path / "mixed"
    shutil.copytree(a, mixed)
    shutil.copy(b / name, mixed / name)  # the other run's file, same name
    with pytest.raises(files.RunError, match=f"{name} is not this run's .*mixes the files of "
                                             "two runs"):
        evaluate.load_run(mixed, torch.device("cpu"))
    with pytest.raises(SystemExit, match="^error: .*mixes the files of two runs"):
        evaluate.main(["--run", str(mixed), "--text", "hello"])


def test_a_weights_file_without_a_run_id_is_not_taken_as_the_runs(tmp_path, two_runs):
    """A weights file that carries no run id (saved by hand, or by another tool) is not this
    run's: only a run.json without a run id (a run older than run ids) is taken as it is."""
    from safetensors.torch import load_file, save_file
    a, _ = two_runs
    bare = tmp_path / "bare"
    shutil.copytree(a, bare)
    name = json.loads((bare / "run.json").read_text())["weights_file"]
    save_file(load_file(bare / name), bare / name)  # the same tensors, no run id
    with pytest.raises(files.RunError, match=rf"{name} is not this run's \(its run id is None"):
        evaluate.load_run(bare, torch.device("cpu"))


def test_a_run_made_before_run_ids_is_still_read(tmp_path, two_runs):
    a, _ = two_runs
    old = tmp_path / "old"
    shutil.copytree(a, old)
    info = json.loads((old / "run.json").read_text())
    del info["run_id"]
    (old / "run.json").write_text(json.dumps(info))
    evaluate.load_run(old, torch.device("cpu"))


def test_two_runs_started_together_leave_one_whole_run(tmp_path, tiny_weights, small_raw_path):
    """Two finetune.py processes given one --output-dir at once: exactly one trains there; the
    other says why in one line; the finished run's files all carry one run id."""
    out = tmp_path / "run"
    cmd = [sys.executable, "finetune.py", "--weights", str(tiny_weights), "--data",
           str(small_raw_path), "--output-dir", str(out), "--device", "cpu", "--epochs", "1",
           "--max-steps", "20", "--no-initial-eval"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    deadline = time.time() + 240
    results = [p.communicate(timeout=max(1, deadline - time.time())) + (p.returncode,)
               for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 1], results
    refused = next(r for r in results if r[2] == 1)[1].strip().splitlines()
    assert len(refused) == 1 and refused[0].startswith("error: ") and (
        "another finetune.py is writing to" in refused[0] or "holds a finished run" in
        refused[0]), refused
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert json.loads((out / "metrics.json").read_text())["run_id"] == run_id
    evaluate.load_run(out, torch.device("cpu"))


# ----------------------------------------------------- what the README promises of a user's file

BOM = "\ufeff"
ROWS = [("spam", "WIN cash, now"), ("ham", "see you\nat 6"), ("ham", 'say "hi"')]
# A .tsv is one row per line, its quotes ordinary characters (docs/own-data.md): no line breaks
TSV_ROWS = [("spam", "WIN cash, now"), ("ham", "see you at 6"), ("ham", 'say "hi"')]


def as_csv(rows, delimiter=",", eol="\n", header=("text", "label")):
    def field(v):
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in f'"\n{delimiter}') else v
    lines = [delimiter.join(header)]
    for label, text in rows:
        cells = {"text": text, "label": label}
        lines.append(delimiter.join(field(cells[h.lower()]) if h.lower() in cells else "x"
                                    for h in header))
    return eol.join(lines) + eol


def as_tsv(rows, header=("text", "label")):
    """A .tsv as spreadsheets export it: tab-separated, nothing quoted."""
    table = [dict(zip(header, header))] + [{"text": t, "label": y} for y, t in rows]
    return "".join("\t".join(r[h] for h in header) + "\n" for r in table)


def as_jsonl(rows, eol="\n"):
    return "".join(json.dumps({"text": t, "label": y}) + eol for y, t in rows)


def read(path, **kw):
    return [(r.label, r.text) for r in tables.read_records(path, **kw)]


@pytest.mark.parametrize("name, first", [("d.csv", "text"), ("d.csv", "label"),
                                         ("d.tsv", "text"), ("d.tsv", "label")])
def test_a_byte_order_mark_before_the_first_column_name(tmp_path, name, first):
    # Excel's "CSV UTF-8" puts U+FEFF before the header: the first column must still be found
    # by its name, whichever column (text or label) comes first.
    header = ("text", "label") if first == "text" else ("label", "text")
    path = tmp_path / name
    tsv = name.endswith("tsv")
    rows = TSV_ROWS if tsv else ROWS
    path.write_bytes((BOM + (as_tsv(rows, header) if tsv else as_csv(rows, header=header))
                      ).encode("utf-8"))
    assert read(path) == rows
    assert [r.row for r in tables.read_records(path)] == [2, 3, 4]


def test_a_byte_order_mark_before_the_first_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes((BOM + as_jsonl(ROWS)).encode("utf-8"))
    assert read(path) == ROWS


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.jsonl"])
def test_crlf_line_ends_leave_no_carriage_return_in_texts_or_labels(tmp_path, name):
    path = tmp_path / name
    rows = [("spam", "WIN cash now"), ("ham", "see you at 6"), ("ham", "ok")]
    text = as_jsonl(rows, "\r\n") if name.endswith("jsonl") else \
        as_csv(rows, "\t" if name.endswith("tsv") else ",", "\r\n")
    path.write_bytes((BOM + text).encode("utf-8"))  # Windows Excel: both at once
    assert read(path) == rows
    # the label column last, too (its value ends right before the \r)
    if not name.endswith("jsonl"):
        path.write_bytes(as_csv(rows, "\t" if name.endswith("tsv") else ",", "\r\n",
                                header=("label", "text")).encode("utf-8"))
        assert read(path) == rows


def test_a_crlf_file_trains_on_its_real_classes(tmp_path):
    rows = [("a", f"alpha {i}") for i in range(10)] + [("b", f"beta {i}") for i in range(10)]
    path = tmp_path / "d.csv"
    path.write_bytes((BOM + as_csv(rows, eol="\r\n", header=("text", "label"))).encode())
    loaded = tables.file_data(path)
    assert loaded.class_names == ["a", "b"]
    got = sorted((loaded.class_names[y], t) for part in loaded.splits.values() for y, t in part)
    assert got == sorted(rows)


def test_the_format_comes_from_the_extension_in_any_case(tmp_path):
    for name, content, rows in (("d.CSV", as_csv(ROWS), ROWS),
                                ("d.Tsv", as_tsv(TSV_ROWS), TSV_ROWS),
                                ("d.JSONL", as_jsonl(ROWS), ROWS)):
        (tmp_path / name).write_text(content, encoding="utf-8")
        assert read(tmp_path / name) == rows, name


def test_columns_anywhere_in_any_case_and_other_columns_ignored(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(as_csv(ROWS, header=("id", "LABEL", "notes", "Text")), encoding="utf-8")
    assert read(path) == ROWS
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"ID": i, "Text": t, "Label": y, "more": [1]}) + "\n"
                            for i, (y, t) in enumerate(ROWS)), encoding="utf-8")
    assert read(path) == ROWS


def test_integer_labels_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x", "label": 1}\n\n{"text": "y", "label": "0"}\n  \n'
                    '{"text": "z", "label": 10}\n', encoding="utf-8")
    records = tables.read_records(path)
    assert [(r.label, r.text, r.row, r.where) for r in records] == [
        ("1", "x", 1, "line"), ("0", "y", 3, "line"), ("10", "z", 5, "line")]
    assert tables.class_order([r.label for r in records]) == ["0", "1", "10"]  # numerically
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\nx, 1\n\ny,01\n", encoding="utf-8")
    records = tables.read_records(csv_path)
    # blank lines skipped; rows numbered as a spreadsheet shows them (the blank one is row 3)
    assert [(r.label, r.text, r.row) for r in records] == [("1", "x", 2), ("01", "y", 4)]
    # "01" is the class 1
    assert [r.label for r in tables.normalise_labels(records, csv_path)] == ["1", "1"]


def test_unlabelled_rows_for_predict_need_no_label_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes((BOM + "Text\r\nhello\r\n\"two\r\nlines\"\r\n").encode("utf-8"))
    records = tables.read_records(path, labelled=False)
    assert [(r.text.splitlines(), r.label, r.row) for r in records] == [
        (["hello"], None, 2), (["two", "lines"], None, 3)]


# ----------------------------------------------------------------------------- hypothesis

@settings(max_examples=80, deadline=None)
@given(counts=st.lists(st.integers(1, 25), min_size=2, max_size=4),
       val=st.one_of(st.sampled_from([0.1, 0.3, 0.45, 0.49]), st.floats(0.01, 0.49)),
       test=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45, 0.49]), seed=st.integers(0, 2**31 - 1))
@example(counts=[10, 10], val=0.45, test=0.45, seed=0)  # rounding up once left train none
def test_the_stratified_split_keeps_every_class_in_every_split_when_it_can(
        counts, val, test, seed):
    rows = [(c, f"class {c} row {i}") for c, n in enumerate(counts) for i in range(n)]
    names = [f"c{c}" for c in range(len(counts))]
    fracs = {name: f for name, f in (("validation", val), ("test", test)) if f > 0}
    can = all(n >= 1 + len(fracs) for n in counts)  # one row for train and for each split
    if not can:
        with pytest.raises(data.DataError, match="too few to put one in each of"):
            tables.stratified_split(rows, fracs, names, seed)
        return
    splits = tables.stratified_split(rows, fracs, names, seed)
    assert list(splits) == ["train", *fracs]
    for name, part in splits.items():
        assert {y for y, _ in part} == set(range(len(counts))), name
    assert sorted(r for part in splits.values() for r in part) == sorted(rows)  # a partition
    assert tables.stratified_split(rows, fracs, names, seed) == splits  # seeded


TINY = gpt.GPTConfig(vocab_size=100, context_length=48, emb_dim=32, n_heads=2, n_layers=2)
PAD = 99


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    model = gpt.GPTModel(TINY).eval()
    gpt.setup_classifier(model, 3, "last_block")
    with torch.no_grad():  # a head and biases that are not near zero: differences show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.lists(st.integers(0, PAD - 1), min_size=1, max_size=20),
                      min_size=1, max_size=4),
       extra=st.integers(0, 20), shortcut=st.sampled_from(["none", "tail", "prepared"]))
def test_padding_never_changes_a_flexible_position_logit(tiny_classifier, texts, extra,
                                                         shortcut):
    model = tiny_classifier
    kw = {"none": {}, "tail": {"tail": True}, "prepared": {"prepared": True, "tail": True}}

    def logits(ids):
        with torch.no_grad():
            return shortcuts.classify_logits(model, torch.tensor(ids), position="flexible",
                                             pad_id=PAD, **kw[shortcut])
    alone = torch.cat([logits([t]) for t in texts])  # each text by itself, unpadded
    width = max(map(len, texts)) + extra  # a batch of them, right-padded to any width
    batch = logits([t + [PAD] * (width - len(t)) for t in texts])
    torch.testing.assert_close(batch, alone, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------- never a silent wrong number, nothing lost

@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """A small file in the SMS Spam Collection's format: 60 messages, a third of them spam."""
    words = ["free", "call", "now", "winner", "home", "later", "see", "you", "prize", "txt"]
    lines = [f"{'spam' if i % 3 == 0 else 'ham'}\tMessage {i}: " +
             " ".join(words[(i * j) % 10] for j in range(i % 17 + 2)) for i in range(60)]
    path = tmp_path_factory.mktemp("sms") / "SMSSpamCollection"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def quick(tiny_weights, data_path, out, *extra):
    """finetune.py's arguments for a one-step run of the tiny model into `out`."""
    return ["--weights", str(tiny_weights), "--data", data_path, "--output-dir", str(out),
            "--max-steps", "1", "--no-initial-eval", *map(str, extra)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_weights, data_path):
    out = tmp_path_factory.mktemp("runs") / "run"
    finetune.main(quick(tiny_weights, data_path, out))
    assert (out / "run.json").is_file()
    return out


def garble(path):
    """Overwrite every tensor byte of a safetensors file with 0xff (NaN in float32), keeping
    its header intact: the file still opens and every shape is right."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n:] = b"\xff" * (len(raw) - 8 - n)
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- silent wrong numbers

def test_weights_with_garbage_bytes_are_refused_naming_tensor_and_file(tiny_weights, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_weights / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes((tiny_weights / "model.safetensors").read_bytes())
    garble(folder / "model.safetensors")
    with pytest.raises(gpt.WeightsError) as e:
        gpt.load_gpt(folder)
    message = str(e.value)
    assert str(folder / "model.safetensors") in message and "NaN or infinite" in message
    assert "h.0." in message or "wte" in message or "wpe" in message  # a tensor's name
    assert one_error_line(finetune, ["--weights", str(folder), "--data", "x", "--max-steps", "1",
                                     "--output-dir", str(tmp_path / "run")])


def test_one_infinite_value_is_enough(tiny_weights, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_weights / "config.json").read_bytes())
    tensors = load_file(tiny_weights / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.bias"][3] = float("inf")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(gpt.WeightsError, match=r"tensor transformer\.h\.1\.mlp\.c_fc\.bias "):
        gpt.load_gpt(folder)


def test_evaluate_refuses_a_run_whose_weights_hold_nan(finished_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in finished_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    weights = next(run.glob("*.safetensors"))
    garble(weights)
    message = one_error_line(evaluate, ["--run", str(run), "--text", "hello"])
    assert str(weights) in message and "NaN or infinite" in message and "tensor " in message


@pytest.mark.parametrize("flag, value", [("--weight-decay", "inf"), ("--weight-decay", "nan"),
                                         ("--lr", "1e39")])
def test_non_finite_settings_are_refused_before_any_work(flag, value, tmp_path):
    message = one_error_line(finetune, ["--weights", "random", "--data", "/nowhere", flag, value,
                                        "--output-dir", str(tmp_path / "run")])
    assert flag in message
    assert not (tmp_path / "run").exists()


def test_a_diverging_loss_stops_the_run_at_once(tiny_weights, data_path, tmp_path, capsys):
    out = tmp_path / "run"
    message = one_error_line(finetune, quick(tiny_weights, data_path, out, "--lr", "1e20",
                                             "--eval-freq", "1", "--max-steps", "50"))
    assert "loss is nan at step 0" in message and "--lr" in message
    printed = capsys.readouterr().out
    assert "Step 000001" not in printed  # stopped at the first check, not 49 steps later
    assert not (out / "run.json").exists()  # unfinished
    assert not list(out.glob("*.safetensors"))  # nothing that looks like a trained model


def test_non_finite_weights_are_caught_between_printed_losses(tiny_weights, data_path, tmp_path,
                                                              monkeypatch):
    # A weight turns NaN at the second step, after step 0's printed losses were fine and with no
    # other loss printed (--eval-freq beyond the run): the check after the epoch catches it.
    real = finetune.build_optimizer

    def poisoning(model, cfg, device):
        optimizer = real(model, cfg, device)
        step, calls = optimizer.step, []

        def poisoned_step(*args, **kw):
            calls.append(1)
            result = step(*args, **kw)
            if len(calls) == 2:
                with torch.no_grad():
                    model.trf_blocks[-1].ff.layers[0].bias[0] = float("nan")
            return result
        optimizer.step = poisoned_step
        return optimizer
    monkeypatch.setattr(finetune, "build_optimizer", poisoning)
    out = tmp_path / "run"
    message = one_error_line(finetune, quick(tiny_weights, data_path, out, "--eval-freq", "1000",
                                             "--max-steps", "3"))
    assert "the weight trf_blocks.1." in message and "holds NaN or infinite values" in message
    assert "step 2" in message and "--lr" in message
    assert not (out / "run.json").exists()


# -------------------------------------------------------------- folders that cannot be written

@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only as a read-only filesystem would (chmod does not stop root):
    creating, opening for writing, renaming or removing anything under them raises EROFS.
    Returns a function that adds a folder."""
    import builtins
    import os
    roots = []

    def hit(*paths):
        for p in paths:
            if isinstance(p, int) or p is None:
                continue
            p = os.path.abspath(os.fsdecode(p))
            if any(p == r or p.startswith(r + os.sep) for r in roots):
                raise OSError(errno.EROFS, "Read-only file system", p)

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kw):
        if any(c in mode for c in "wax+"):
            hit(file)
        return real_open(file, mode, *args, **kw)

    def guarded_os_open(path, flags, *args, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            hit(path)
        return real_os_open(path, flags, *args, **kw)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("mkdir", "rename", "replace", "remove", "unlink", "rmdir"):
        real = getattr(os, name)

        def guarded(*args, real=real, **kw):
            hit(*args[:2])
            return real(*args, **kw)
        monkeypatch.setattr(os, name, guarded)

    def add(folder):
        folder.mkdir(parents=True, exist_ok=True)
        roots.append(os.path.abspath(folder))
        return folder
    return add


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test: the checks must come before the network."""
    import urllib.request

    def refuse(*args, **kw):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_output_dir_under_a_file(tiny_weights, data_path, tmp_path):
    (tmp_path / "afile.txt").write_text("mine")
    out = tmp_path / "afile.txt" / "sub"
    message = one_error_line(finetune, quick(tiny_weights, data_path, out))
    assert str(out) in message and "afile.txt is a file, not a folder" in message
    assert "--output-dir" in message
    assert (tmp_path / "afile.txt").read_text() == "mine"


@pytest.mark.parametrize("out", ["/proc/gpt2-runs/run", "/sys/gpt2-run"])
def test_output_dir_in_proc_or_sys(tiny_weights, data_path, out, capsys):
    message = one_error_line(finetune, quick(tiny_weights, data_path, out))
    assert out in message and "choose another --output-dir" in message
    assert capsys.readouterr().out == ""  # refused before any work, not even the data read


@pytest.mark.parametrize("sub", ["", "sub", "sub/deeper"])
def test_output_dir_on_a_read_only_filesystem(tiny_weights, data_path, tmp_path, read_only, sub):
    ro = read_only(tmp_path / "ro")
    out = ro / sub if sub else ro
    message = one_error_line(finetune, quick(tiny_weights, data_path, out))
    assert str(out) in message and "read-only" in message and "--output-dir" in message
    assert list(ro.iterdir()) == []


def test_a_read_only_cache_is_found_before_downloading(tiny_weights, tmp_path, read_only,
                                                       no_network, monkeypatch):
    cache = read_only(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    # the data download is due: finetune.py and evaluate.py
    message = one_error_line(finetune, ["--weights", str(tiny_weights), "--max-steps", "1",
                                        "--output-dir", str(tmp_path / "run")])
    assert str(cache / "gpt2-classify") in message and "read-only" in message
    assert "XDG_CACHE_HOME" in message
    assert not (tmp_path / "run").exists()


def test_a_read_only_cache_for_the_weights(data_path, tmp_path, read_only, no_network,
                                           monkeypatch):
    cache = read_only(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    message = one_error_line(finetune, ["--data", data_path, "--max-steps", "1",
                                        "--output-dir", str(tmp_path / "run")])
    assert str(cache / "gpt2-classify" / "weights") in message and "read-only" in message
    assert "XDG_CACHE_HOME" in message and "--weights DIR" in message
    assert not (tmp_path / "run").exists()


@pytest.fixture
def run_on_the_download(finished_run, tmp_path):
    """A copy of the finished run, as if trained on the published data's download, now gone
    from the cache: evaluate.py --all-splits downloads it again."""
    run = tmp_path / "run-on-download"
    run.mkdir()
    for f in finished_run.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    info = json.loads((run / "run.json").read_text())
    info["data"] = {"path": str(tmp_path / "gone" / "SMSSpamCollection"),
                    "sha256": data.SMS_SHA256}
    (run / "run.json").write_text(json.dumps(info))
    return run


def test_evaluate_with_a_cache_in_proc(run_on_the_download, monkeypatch, no_network):
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-cache-here")
    message = one_error_line(evaluate, ["--run", str(run_on_the_download), "--all-splits"])
    assert "/proc/no-cache-here/gpt2-classify" in message and "XDG_CACHE_HOME" in message


def test_evaluate_with_a_read_only_cache(run_on_the_download, tmp_path, read_only, no_network,
                                         monkeypatch):
    cache = read_only(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    message = one_error_line(evaluate, ["--run", str(run_on_the_download), "--all-splits"])
    assert str(cache) in message and "read-only" in message and "XDG_CACHE_HOME" in message


# ----------------------------------------------------------------------------- nothing lost

def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def finished_copy(finished_run, tmp_path):
    """A finished run of our own, to be (or not be) replaced."""
    out = tmp_path / "run"
    out.mkdir()
    for f in finished_run.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture
def full_disk(monkeypatch):
    """Writes of file contents under the folders given fail as on a full disk (ENOSPC), as the
    disk filling up during training would make them; returns a function that adds a folder."""
    import os
    real_fdopen, full = os.fdopen, []

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, *args, **kw):
        f = real_fdopen(fd, *args, **kw)
        path = os.readlink(f"/proc/self/fd/{fd}")
        return FullDisk(f) if any(path.startswith(str(d) + os.sep) for d in full) else f
    monkeypatch.setattr(os, "fdopen", fdopen)
    return full.append


def test_a_full_disk_at_the_end_saves_the_run_elsewhere(tiny_weights, data_path, tmp_path,
                                                        full_disk, monkeypatch, capsys):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spare-disk"))
    (tmp_path / "spare-disk").mkdir()
    out = tmp_path / "run"
    full_disk(out)
    message = one_error_line(finetune, quick(tiny_weights, data_path, out))
    assert f"could not write {out / 'trained.safetensors'}: the disk is full" in message
    (spare,) = (tmp_path / "spare-disk").glob("gpt2-classify-run-*")
    assert f"the finished run was saved to {spare} instead" in message
    assert f"Kept: {out / 'log.txt'}" in message
    log = (out / "log.txt").read_text()
    assert "Training completed in" in log and log.splitlines()[-1] == message
    assert not (out / "run.json").exists() and not list(out.glob("*.part"))
    assert "Traceback" not in capsys.readouterr().err
    # the spare folder is a finished run like any other
    metrics = json.loads((spare / "metrics.json").read_text())
    assert final_accuracies(spare) == metrics["final_accuracy"]
    assert "Training completed in" in (spare / "log.txt").read_text()


def test_a_full_disk_everywhere_says_so(tiny_weights, data_path, tmp_path, full_disk,
                                        monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spare-disk"))
    (tmp_path / "spare-disk").mkdir()
    out = tmp_path / "run"
    full_disk(out)
    full_disk(tmp_path / "spare-disk")
    message = one_error_line(finetune, quick(tiny_weights, data_path, out))
    assert "nor in the temporary folder" in message and "free some space" in message
    assert f"Kept: {out / 'log.txt'} keeps the log" in message


def test_too_little_space_is_known_before_training(tiny_weights, data_path, tmp_path,
                                                   monkeypatch, capsys):
    import collections
    import shutil
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "run"
    message = one_error_line(finetune, quick(tiny_weights, data_path, out))
    assert "--output-dir" in message and "MB are free" in message
    assert "Ep 1" not in capsys.readouterr().out  # no training
    assert not out.exists()


def test_overwrite_with_bad_input_keeps_the_finished_run(finished_copy, tiny_weights, data_path,
                                                         tmp_path):
    before = snapshot(finished_copy)
    args = quick(tiny_weights, data_path, finished_copy, "--overwrite")
    for bad in (["--data", str(tmp_path / "typo")], ["--context-length", "500"],
                ["--weights", str(tmp_path / "nothing")]):
        one_error_line(finetune, args + bad)  # the later flag wins
        assert snapshot(finished_copy) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_that_fails_in_training_keeps_the_finished_run(finished_copy, tiny_weights,
                                                                 data_path, tmp_path):
    before = snapshot(finished_copy)
    message = one_error_line(finetune, quick(tiny_weights, data_path, finished_copy, "--overwrite",
                                             "--lr", "1e20"))
    assert snapshot(finished_copy) == before
    log = tmp_path / "run.unfinished" / "log.txt"
    assert f"the finished run in {finished_copy} is unchanged" in message and str(log) in message
    assert log.read_text().splitlines()[-1] == message
    assert not (tmp_path / "run.unfinished" / "run.json").exists()


def test_overwrite_replaces_a_finished_run_once_the_new_one_finished(finished_copy, tiny_weights,
                                                                     data_path, tmp_path):
    finetune.main(quick(tiny_weights, data_path, finished_copy, "--overwrite", "--seed", "7"))
    assert json.loads((finished_copy / "run.json").read_text())["flags"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .unfinished, .replaced
    assert "Saved the fine-tuned model" in (finished_copy / "log.txt").read_text()


def test_overwrite_never_deletes_files_it_did_not_write(finished_copy, tiny_weights, data_path):
    (finished_copy / "notes.txt").write_text("my notes")
    before = snapshot(finished_copy)
    message = one_error_line(finetune, quick(
        tiny_weights, data_path, finished_copy, "--overwrite"))
    assert "notes.txt" in message and "move them out" in message
    assert snapshot(finished_copy) == before


@pytest.mark.parametrize("bad", [["--data", "/no/such/file"], ["--weights", "/no/such/folder"],
                                 ["--context-length", "500"], ["--weights", "small"]])
def test_a_run_that_fails_before_training_leaves_no_folder(bad, tiny_weights, data_path,
                                                           tmp_path, monkeypatch, closed_url):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gpt, "HF_URL", closed_url + "/{repo}/{file}")  # a failed download
    real = files.download_file
    monkeypatch.setattr(files, "download_file", lambda urls, dest, **kw: real(
        urls, dest, **{**kw, "retries": 1, "timeout": 2}))
    args = ["--weights", str(tiny_weights), "--data", data_path, "--max-steps", "1"] + bad
    one_error_line(finetune, args)
    assert not (tmp_path / "runs").exists()  # the default runs/<timestamp>


def test_a_run_that_fails_later_keeps_its_log_with_the_error_line(tiny_weights, data_path,
                                                                  tmp_path):
    out = tmp_path / "run"
    message = one_error_line(finetune, quick(tiny_weights, data_path, out, "--lr", "1e20"))
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].startswith("Run folder: ") and log[-1] == message
    assert f"Kept: {out / 'log.txt'} keeps the log; the run is unfinished" in message
    assert sorted(p.name for p in out.iterdir()) == ["log.txt"]


def test_an_interrupted_run_says_what_it_kept(tiny_weights, data_path, tmp_path, monkeypatch):
    def interrupted(*args, **kw):
        print("Ep 1 (Step 000000): Train loss 0.700, Val loss 0.700")
        raise KeyboardInterrupt
    monkeypatch.setattr(finetune, "train_classifier_simple", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        finetune.main(quick(tiny_weights, data_path, out))
    assert str(e.value).startswith("interrupted. Kept: ") and str(out / "log.txt") in str(e.value)
    log = (out / "log.txt").read_text().splitlines()
    assert log[-2].startswith("Ep 1") and log[-1] == str(e.value)
    assert not (out / "run.json").exists()


def test_a_swap_cut_short_is_named_by_evaluate(finished_run, tmp_path):
    (tmp_path / "run.unfinished").mkdir()
    for f in finished_run.iterdir():
        (tmp_path / "run.unfinished" / f.name).write_bytes(f.read_bytes())
    message = one_error_line(evaluate, ["--run", str(tmp_path / "run"), "--text", "hi"])
    assert f"rename it to {tmp_path / 'run'}" in message


# ------------------------------------------------------------ disk use: what a run folder keeps

def final_accuracies(run):
    classifier, info = evaluate.load_run(run, torch.device("cpu"))
    results = evaluate.evaluate_splits(classifier, info, torch.device("cpu"),
                                       info["flags"]["data"])
    return {name: r["accuracy"] for name, r in results.items()}


def copy_weights(tiny_weights, folder):
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_weights / name).read_bytes())
    return folder


def test_a_run_keeps_only_what_training_changed(finished_run, tiny_weights):
    info = json.loads((finished_run / "run.json").read_text())
    assert info["weights_file"] == "trained.safetensors"
    assert not (finished_run / "model.safetensors").exists()
    assert info["base"] == {"weights": str(tiny_weights.resolve()),
                            "sha256": files.file_sha256(tiny_weights / "model.safetensors")}
    kept = load_file(finished_run / "trained.safetensors")
    # last_block: the last block, the final norm and the new head, nothing frozen
    assert all(k.startswith(("trf_blocks.1.", "final_norm.", "out_head.")) for k in kept)
    assert {"out_head.weight", "out_head.bias", "final_norm.scale"} <= kept.keys()
    size = (finished_run / "trained.safetensors").stat().st_size
    assert size < (tiny_weights / "model.safetensors").stat().st_size / 20
    assert sorted(info["files"]) == sorted(p.name for p in finished_run.iterdir())


def test_evaluate_reassembles_the_model_with_the_same_numbers(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert final_accuracies(finished_run) == metrics["final_accuracy"]


@pytest.mark.parametrize("flags", [["--self-contained"], ["--trainable-layers", "lora"],
                                   ["--trainable-layers", "lora", "--self-contained"]])
def test_both_forms_give_the_same_classifier(flags, tiny_weights, data_path, tmp_path):
    out = tmp_path / "run"
    finetune.main(quick(tiny_weights, data_path, out, *flags))
    info = json.loads((out / "run.json").read_text())
    if "--self-contained" in flags:
        assert info["weights_file"] == "model.safetensors" and info["base"] is None
        assert not (out / "trained.safetensors").exists()
    else:  # LoRA: the adapters and the head, not the merged layers
        assert info["weights_file"] == "trained.safetensors" and info["base"]
        kept = load_file(out / "trained.safetensors")
        assert kept and all(k.endswith((".A", ".B")) or k.startswith("out_head.") for k in kept)
    metrics = json.loads((out / "metrics.json").read_text())
    assert final_accuracies(out) == metrics["final_accuracy"]


def test_random_weights_are_always_self_contained(data_path, tmp_path, monkeypatch):
    tiny = gpt.GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2)
    monkeypatch.setitem(gpt.PRESETS, "small", (tiny, "openai-community/gpt2"))
    out = tmp_path / "run"
    finetune.main(["--weights", "random", "--data", data_path, "--output-dir", str(out),
                   "--max-steps", "1", "--no-initial-eval"])
    info = json.loads((out / "run.json").read_text())
    assert info["weights_file"] == "model.safetensors" and info["base"] is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert final_accuracies(out) == metrics["final_accuracy"]


def test_a_missing_or_changed_base_is_refused(tiny_weights, data_path, tmp_path):
    base = copy_weights(tiny_weights, tmp_path / "base")
    out = tmp_path / "run"
    finetune.main(quick(base, data_path, out))
    tensors = load_file(base / "model.safetensors")
    tensors["transformer.h.0.ln_1.weight"] += 0.01  # other weights, same shapes
    save_file(tensors, base / "model.safetensors")
    message = one_error_line(evaluate, ["--run", str(out), "--text", "hello"])
    assert str(base / "model.safetensors") in message and "sha256" in message
    assert "--self-contained" in message
    for f in base.iterdir():
        f.unlink()
    base.rmdir()
    message = one_error_line(evaluate, ["--run", str(out), "--text", "hello"])
    assert str(base / "model.safetensors") in message and "gone" in message
    assert "--self-contained" in message


def test_a_preset_base_is_downloaded_again_and_checked(tiny_weights, data_path, tmp_path,
                                                       monkeypatch, http_server):
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    preset = copy_weights(tiny_weights, cache / "gpt2-classify" / "weights" / "gpt2")
    out = tmp_path / "run"
    finetune.main(quick("small", data_path, out))
    info = json.loads((out / "run.json").read_text())
    assert info["base"]["weights"] == "small"
    expected = final_accuracies(out)
    for name in ("config.json", "model.safetensors"):  # the cache is cleared; the hub has them
        http_server.serve(f"/openai-community/gpt2/{name}", (preset / name).read_bytes())
        (preset / name).unlink()
    monkeypatch.setattr(gpt, "HF_URL", http_server.base + "/{repo}/{file}")
    assert final_accuracies(out) == expected
    assert (preset / "model.safetensors").is_file()


def test_a_folder_of_other_files_is_never_written_into(tiny_weights, data_path, tmp_path):
    # --output-dir given the weights folder by mistake: its model.safetensors must survive
    folder = copy_weights(tiny_weights, tmp_path / "gpt2")
    before = snapshot(folder)
    message = one_error_line(finetune, quick(folder, data_path, folder, "--self-contained"))
    assert "config.json" in message and "choose a new or empty folder" in message
    assert snapshot(folder) == before


def test_an_unfinished_run_is_replaced_in_place(tiny_weights, data_path, tmp_path):
    out = tmp_path / "run"
    one_error_line(finetune, quick(tiny_weights, data_path, out, "--lr", "1e20"))  # unfinished
    finetune.main(quick(tiny_weights, data_path, out))
    assert (out / "run.json").is_file() and "error:" not in (out / "log.txt").read_text()
