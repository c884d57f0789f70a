"""The GPU and Mac paths, checked on a CPU (issue 18).

No GPU has run these tests. What a CPU can check:
- the fake-device harness: finetune.py's and evaluate.py's main paths with the device replaced by
  PyTorch's `meta` device (tensors with a shape and no data). As on CUDA, a CPU tensor mixed into
  device maths raises; the harness also refuses the one case `meta` lets through (a CPU tensor
  indexed by device indices, which CUDA refuses), counts every read of a device tensor on the
  host (.item(), .tolist(), .cpu(), .numpy(), bool(), float(), ...) and answers it with a
  placeholder (zeros; True for a truth value, so every check passes), counts asynchronous
  copies from unpinned memory, counts blocking host-to-device copies by phase (a copy from
  pageable memory waits for the device's queue on CUDA; the step's batch, which the loaders pin
  on CUDA, is left out), and records the autocast device and dtype asked and every device named
  in autocast queries. A training step must read nothing back and copy nothing to the device
  blocking (the host never waits for the device inside a step). It runs --resume, --keep-best,
  --early-stopping and --checkpoint-every, and torchrun's class-weighted step with the world
  and rank monkeypatched.
- unit tests with CUDA's and MPS's availability, torch's version and the distributed probes
  monkeypatched: the process group's backends, the MPS gate, fused AdamW's devices, contiguous
  q/k/v on MPS, the trunk cache's cap on CUDA, TF32, the fill batch.

What the harness does not cover: the numbers themselves (meta computes none), the kernels a real
device runs (fused AdamW, autocast and its dtypes, SDPA's backends: `meta` has none of them, so
AdamW runs its loop over tensors there and runs stay in fp32), CUDA streams and pinned copies
(the loaders pin only for CUDA), torchrun's collectives (tests/test_ddp.py runs it on CPU
processes), and the
weights written: they are the placeholders' zeros.

Planted device bugs the harness or a test here catches (issue 27.5): an index copied to the
device with a blocking copy in a step; torch.load of a checkpoint without map_location; the
autocast asked on another device or dtype; the CUDA generators not restored, or restored for
GPUs this machine lacks; torchrun's class-weighted step waiting for the device; --tf32 on a
torch older than 2.9.
"""

import json
import types
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import ddp
import evaluate
import files
import finetune
import gpt
import longrun
import shortcuts

META = torch.device("meta")
TINY = gpt.GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2)
T = torch.Tensor
# Reads of a tensor's values on the host: each waits for the device to finish its queue.
READS = {T.item, T.tolist, T.cpu, T.numpy, T.__bool__, T.__float__, T.__int__, T.__index__,
         T.__format__, T.__array__}
# Where a CUDA tensor takes CPU tensors: index tensors into it, and copies.
MIXING_ALLOWED = {T.__getitem__, T.__setitem__, T.index_put_, T.copy_, T.to}
# Factories that build a tensor from host data: on a device, a copy from pageable memory.
FROM_HOST = {torch.tensor, torch.as_tensor, torch.asarray}


class FakeDevice(TorchFunctionMode):
    """Counts the host's reads of device (meta) tensors by phase and answers each with a
    placeholder; refuses CPU tensors mixed into device maths; counts asynchronous copies from
    unpinned memory."""

    def __init__(self):
        super().__init__()
        self.phase, self.reads, self.unpinned_async, self.device_ops = "set-up", {}, 0, []
        self.blocking, self.batch = {}, set()  # blocking host-to-device copies; the batch's
        self.autocast, self.autocast_queries = [], []  # (device type, dtype) asked; devices

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(t.is_meta for t in tensors)
        to_kwargs = {k: v for k, v in kwargs.items() if k != "copy"}  # (.to's own, not parsed)
        to = torch._C._nn._parse_to(*args[1:], **to_kwargs) if func is T.to else None
        if to is not None and to[2] and args[0].device.type == "cpu" and not args[0].is_pinned():
            self.unpinned_async += 1
        if self._blocking_copy(func, args, kwargs, to):
            self.blocking[self.phase] = self.blocking.get(self.phase, 0) + 1
        reading = on_device and args and isinstance(args[0], torch.Tensor) and args[0].is_meta \
            and (func in READS or to is not None and to[0] is not None and to[0].type == "cpu")
        if reading:
            self.reads[self.phase] = self.reads.get(self.phase, 0) + 1
            return self._placeholder(func, args)
        if on_device:
            self.device_ops.append((self.phase, getattr(func, "__name__", str(func))))
            mixed = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            internal = getattr(func, "__name__", "").startswith("_") and \
                not getattr(func, "__name__", "").startswith("__")  # (module.to's own checks)
            if mixed and not internal and (func not in MIXING_ALLOWED or not args[0].is_meta):
                raise RuntimeError(f"a CPU tensor {tuple(mixed[0].shape)} in device maths "
                                   f"({getattr(func, '__name__', func)}): CUDA refuses it")
        return func(*args, **kwargs)

    def _blocking_copy(self, func, args, kwargs, to):
        """Whether `func` copies host memory to the device, waiting for it: a .to() or copy_()
        of a CPU tensor that is not the step's batch (pinned on CUDA), or a factory given host
        data and the device."""
        if func in FROM_HOST:
            return torch.device(kwargs.get("device") or "cpu").type == "meta"
        if func is T.to:
            src, device, non_blocking = args[0], to[0], to[2]
        elif func is T.copy_ and isinstance(args[1], torch.Tensor):
            src, device, non_blocking = args[1], args[0].device, kwargs.get("non_blocking")
        else:
            return False
        return device is not None and device.type == "meta" and src.device.type == "cpu" \
            and not non_blocking and src.untyped_storage().data_ptr() not in self.batch

    @staticmethod
    def _placeholder(func, args):
        t = args[0]
        zeros = torch.zeros(t.shape, dtype=t.dtype)
        if func is T.__bool__:
            return True
        if func in (T.item, T.__float__, T.__int__, T.__index__):
            return zeros.reshape(-1)[0].item() if func is T.item else func(zeros.reshape(-1)[0])
        if func is T.__format__:
            return format(zeros.item(), args[1])
        if func is T.tolist:
            return zeros.tolist()
        if func in (T.numpy, T.__array__):
            return zeros.numpy()
        return zeros  # .cpu(), .to("cpu")

    def step_reads(self):
        return self.reads.get("step", 0)

    def step_blocking(self):
        return self.blocking.get("step", 0)


def in_phase(mode, phase, fn):
    """`fn`, run with the harness's phase set to `phase` (the phase before restored after)."""
    def wrapped(*args, **kwargs):
        before, mode.phase = mode.phase, phase
        try:
            return fn(*args, **kwargs)
        finally:
            mode.phase = before
    return wrapped


@pytest.fixture
def fake_device(monkeypatch):
    """The harness, entered: every device is `meta`, the model tiny; within
    finetune.train_classifier_simple the phase is "step" except in its evaluations ("eval");
    the number of steps is counted."""
    mode = FakeDevice()
    monkeypatch.setattr(ddp, "select_device", lambda name="auto": META)
    monkeypatch.setattr(gpt, "load_gpt", lambda *a, **k: gpt.GPTModel(TINY))
    # autocast knows no meta device: off there (runs on meta stay in fp32)
    enabled, autocast = torch.is_autocast_enabled, torch.autocast
    get_dtype = torch.get_autocast_dtype

    def is_enabled(*a):
        mode.autocast_queries.append(str(a[0]) if a else "cuda")
        return False if a and str(a[0]) == "meta" else enabled(*a)

    def asked_dtype(device_type):
        mode.autocast_queries.append(str(device_type))
        return get_dtype(device_type)

    def asked(device_type, *a, **k):
        if k.get("enabled", True):
            mode.autocast.append((str(device_type), k.get("dtype", a[0] if a else None)))
        return nullcontext() if str(device_type) == "meta" else autocast(device_type, *a, **k)
    monkeypatch.setattr(torch, "is_autocast_enabled", is_enabled)
    monkeypatch.setattr(torch, "get_autocast_dtype", asked_dtype)
    monkeypatch.setattr(torch, "autocast", asked)
    monkeypatch.setattr(finetune, "plot_history", lambda history, out: [])  # host numbers only
    monkeypatch.setattr(finetune, "train_classifier_simple",
                        in_phase(mode, "step", finetune.train_classifier_simple))
    for name in ("evaluate_model", "calc_accuracy_loader", "check_finite_weights"):
        monkeypatch.setattr(finetune, name, in_phase(mode, "eval", getattr(finetune, name)))
    # an epoch's end (the whole validation split scored, the best weights kept) and a
    # checkpoint read the device, as they must: phases of their own
    monkeypatch.setattr(longrun.LongRun, "epoch_end",
                        in_phase(mode, "epoch-end", longrun.LongRun.epoch_end))
    monkeypatch.setattr(longrun.LongRun, "checkpoint",
                        in_phase(mode, "checkpoint", longrun.LongRun.checkpoint))
    mode.steps = 0
    step = ddp.training_loss_batch

    def counted(*args, **kwargs):
        mode.steps += 1
        # the batch the loader gave: pinned on CUDA, so its copies to the device wait for nothing
        mode.batch = {t.untyped_storage().data_ptr() for t in args[1:3]}
        return step(*args, **kwargs)
    monkeypatch.setattr(ddp, "training_loss_batch", counted)
    with mode:
        yield mode


@pytest.fixture(scope="module")
def sms(tmp_path_factory):
    """A tiny SMS Spam Collection: 20 spam and 30 ham texts, so that the balanced split holds
    28 / 4 / 8 examples (3 training batches of 8). Meta's kernels are Python: few steps."""
    ham = "ok see you at home later then call me when you get this".split()
    spam = "free win prize cash claim now call txt urgent award".split()
    lines = [f"spam\t{' '.join(spam[i % 7:i % 7 + 3 + i % 5])} {i}" for i in range(20)]
    lines += [f"ham\t{' '.join(ham[i % 9:i % 9 + 2 + i % 4])} {i}" for i in range(30)]
    path = tmp_path_factory.mktemp("sms") / "SMSSpamCollection"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def own_files(tmp_path, n=10):
    """A training CSV of three classes, with texts of skewed lengths."""
    words = {"sport": "ball goal team match", "tech": "code chip data cloud",
             "food": "bread soup cake salt"}
    lines = ["text,label"]
    for i in range(n):
        for c, w in words.items():
            lines.append(f"{' '.join(w.split()[:1 + i % 4] * (1 + (i % 5 == 4) * 6))} {i},{c}")
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_on_meta(mode, tmp_path, args):
    out = tmp_path / "run"
    finetune.main([*map(str, args), "--output-dir", str(out), "--eval-iter", "1"])
    return out


# ----------------------------------------------------------------------------- training paths

@pytest.mark.parametrize("flags", [
    [], ["--trainable-layers", "last_layer"], ["--trainable-layers", "last_two_blocks"],
    ["--trainable-layers", "all"], ["--trainable-layers", "lora"], ["--class-weights", "balanced"],
    ["--class-weights", "1,3", "--no-initial-eval", "--accumulation-steps", "2"],
], ids=lambda f: " ".join(f) or "default")
def test_chapters_data_trains_on_a_device_without_reading_it_back(fake_device, tmp_path, flags,
                                                                  sms):
    out = train_on_meta(fake_device, tmp_path, ["--data", sms, "--epochs", "1", *flags])
    assert fake_device.steps == 3  # every training batch of the tiny SMS data
    assert ("step", "linear") in fake_device.device_ops  # the maths did run on the device
    assert fake_device.step_reads() == 0, fake_device.reads
    assert fake_device.step_blocking() == 0, fake_device.blocking
    assert fake_device.unpinned_async == 0
    assert (out / "run.json").is_file()


@pytest.mark.parametrize("flags", [
    [], ["--token-position", "first"], ["--group-by-length", "--class-weights", "balanced"],
], ids=lambda f: " ".join(f) or "flexible")
def test_own_files_with_batch_padding_train_on_a_device(fake_device, tmp_path, flags):
    train_on_meta(fake_device, tmp_path,
                  ["--train-file", own_files(tmp_path), "--epochs", "1", *flags])
    assert fake_device.steps > 0
    assert fake_device.step_reads() == 0, fake_device.reads
    assert fake_device.step_blocking() == 0, fake_device.blocking
    assert fake_device.unpinned_async == 0


def test_the_timed_phase_starts_after_the_device_is_warm(fake_device, tmp_path, monkeypatch, sms):
    events = []
    clock = types.SimpleNamespace(time=lambda: events.append("clock") or 0.0,
                                  strftime=finetune.time.strftime)
    monkeypatch.setattr(finetune, "time", clock)
    warm, train = ddp.warm_up, finetune.train_classifier_simple
    monkeypatch.setattr(ddp, "warm_up", lambda d: events.append("warm") or warm(d))
    monkeypatch.setattr(finetune, "train_classifier_simple",
                        lambda *a, **k: events.append("train") or train(*a, **k))
    train_on_meta(fake_device, tmp_path, ["--data", sms, "--max-steps", "1",
                                          "--no-initial-eval"])
    before = events[:events.index("train")]
    assert "warm" in before and before.index("warm") < len(before) - 1 - before[::-1].index("clock")
    assert ("set-up", "matmul") in fake_device.device_ops  # the warm-up product, on the device


# ----------------------------------------------------------------------------- evaluation paths

@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """A run trained on the CPU (own files, tiny model), for evaluate.py on the device."""
    tmp = tmp_path_factory.mktemp("cpu-run")
    mp = pytest.MonkeyPatch()
    mp.setattr(gpt, "load_gpt", lambda *a, **k: gpt.GPTModel(TINY))
    mp.setattr(finetune, "plot_history", lambda history, out: [])
    try:
        out = tmp / "run"
        finetune.main(["--train-file", str(own_files(tmp)), "--output-dir", str(out),
                       "--max-steps", "2", "--no-initial-eval", "--device", "cpu"])
    finally:
        mp.undo()
    return out


def test_evaluate_runs_on_a_device(fake_device, cpu_run, tmp_path, capsys):
    evaluate.main(["--run", str(cpu_run), "--all-splits"])
    assert "Test" in capsys.readouterr().out
    evaluate.main(["--run", str(cpu_run), "--text", "ball goal", "--top-k", "2"])
    assert capsys.readouterr().out.strip()
    rows = own_files(tmp_path)
    evaluate.main(["--run", str(cpu_run), "--predict", str(rows), "--output",
                   str(tmp_path / "p.jsonl")])
    predicted = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(predicted) == len(rows.read_text().splitlines()) - 1
    assert fake_device.unpinned_async == 0
    assert ("set-up", "linear") in fake_device.device_ops


def test_serving_classifies_on_a_device(fake_device, cpu_run):
    classifier, info = evaluate.load_run(cpu_run, META)
    assert next(classifier.parameters()).is_meta
    probs = evaluate.predict_proba(["ball goal", "soup"], classifier, info, META)
    assert [list(p) for p in probs] == [info["class_names"]] * 2
    assert fake_device.reads["set-up"] >= 1  # the probabilities are read back, once per batch


def test_the_harness_catches_what_cuda_refuses():
    with FakeDevice() as mode:
        with pytest.raises(RuntimeError):
            torch.zeros(3, device=META) + torch.ones(3)
        with pytest.raises(RuntimeError, match="CUDA refuses"):
            torch.ones(3)[torch.zeros(2, dtype=torch.long, device=META)]
        torch.zeros(3, device=META) + torch.tensor(2.0)  # a 0-dim CPU tensor: CUDA takes it
        assert torch.zeros(2, device=META).sum().item() == 0.0
        assert mode.reads == {"set-up": 1}
        torch.ones(2).to(META, non_blocking=True)
        assert mode.unpinned_async == 1


# ----------------------------------------------------------------------------- the backends

def test_torchrun_names_gloo_for_cpu_tensors_and_nccl_for_cuda(monkeypatch):
    asked = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: asked.update(kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    ddp.init()
    assert asked["backend"] == "cpu:gloo,cuda:nccl"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    ddp.init()
    assert asked["backend"] == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ddp.init()
    assert asked["backend"] == "gloo"


# ----------------------------------------------------------------------------- MPS

def test_an_explicit_mps_needs_torch_2_9(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "__version__", "2.8.1")
    with pytest.raises(ValueError, match=r"--device mps needs torch 2\.9 or newer"):
        ddp.select_device("mps")
    assert ddp.select_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch, "__version__", "2.9.0")
    assert ddp.select_device("mps") == torch.device("mps")
    assert ddp.select_device("auto") == torch.device("mps")


def test_an_explicit_mps_on_an_old_torch_is_one_error_line(monkeypatch, sms, tmp_path):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch, "__version__", "2.5.0")
    with pytest.raises(SystemExit) as e:
        finetune.main(["--device", "mps", "--weights", "random", "--data", str(sms),
                       "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    assert str(e.value).startswith("error: --device mps needs torch 2.9") and \
        "\n" not in str(e.value)


def test_fused_adamw_on_every_device_torch_lists():
    model = gpt.GPTModel(gpt.GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2,
                                       n_layers=1))
    cfg = finetune.TrainConfig()
    for device in ("cpu", "cuda", "mps"):
        assert finetune.build_optimizer(model, cfg, torch.device(device)).defaults["fused"]
    assert not finetune.build_optimizer(model, cfg, META).defaults["fused"]
    cfg.shortcuts = False
    assert not finetune.build_optimizer(model, cfg, torch.device("mps")).defaults["fused"]


def test_queries_keys_and_values_are_contiguous_on_mps(monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(all(t.is_contiguous() for t in (q, k, v)))
        return sdpa(q, k, v, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = gpt.GPTModel(gpt.GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2,
                                       n_layers=1)).eval()
    block = shortcuts.FrozenBlock(model.trf_blocks[0], torch.float32, "cpu", onednn=False)
    x = torch.randn(2, 5, 8)
    assert "mps" in gpt.CONTIGUOUS_HEADS
    with torch.no_grad():
        model.trf_blocks[0](x), block(x)
        assert seen == [False, False]  # a CPU takes the transposed views as they are
        monkeypatch.setattr(gpt, "CONTIGUOUS_HEADS", {"cpu"})  # as MPS is treated
        model.trf_blocks[0](x), block(x)
    assert seen[2:] == [True, True]


def test_batches_move_asynchronously_only_from_pinned_memory():
    calls = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is T.to:
                calls.append(kwargs.get("non_blocking"))
            return func(*args, **kwargs)
    model = gpt.Classifier(gpt.add_classification_head(gpt.GPTModel(TINY), 2))
    ids, labels = torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1])
    with Spy():
        finetune.calc_loss_batch(ids, labels, model, torch.device("cpu"))
    assert calls[:2] == [False, False]


# ----------------------------------------------------------------------------- smaller

def test_the_cache_cap_on_cuda_is_a_quarter_of_the_free_memory(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (40 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 2 * gib)
    assert shortcuts.default_cache_bytes(torch.device("cuda")) == 11 * gib  # (40 + 4) / 4
    assert "on CUDA a quarter of the GPU's free memory" in finetune_help()


def finetune_help():
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    return " ".join(buf.getvalue().split())


def test_the_fill_batch_is_larger_on_a_gpu():
    assert shortcuts.fill_batch(torch.device("cpu")) == shortcuts.FILL_BATCH == 16
    assert shortcuts.fill_batch(torch.device("cuda")) == 64
    assert shortcuts.fill_batch(torch.device("mps")) == 64


def test_tf32_is_off_unless_asked_and_only_on_cuda(monkeypatch, sms, tmp_path):
    assert not finetune.TrainConfig().tf32 and not finetune.parse_args([]).tf32
    assert "TF32" in finetune_help()
    with pytest.raises(SystemExit) as e:
        finetune.main(["--tf32", "--device", "cpu", "--data", str(sms),
                       "--output-dir", str(tmp_path / "run")])
    assert str(e.value).startswith("error: --tf32 is a CUDA setting")
    assert not (tmp_path / "run").exists()
    before = torch.backends.cuda.matmul.fp32_precision
    monkeypatch.setattr(ddp, "select_device", lambda name="auto": torch.device("cuda"))
    monkeypatch.setattr(files, "plan_output_dir", lambda cfg: (_ for _ in ()).throw(
        ValueError("stop here")))
    try:
        with pytest.raises(SystemExit):
            finetune.main(["--tf32", "--device", "cuda"])
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def test_the_run_records_tf32(fake_device, tmp_path, sms):
    out = train_on_meta(fake_device, tmp_path, ["--data", sms, "--max-steps", "1",
                                                "--no-initial-eval"])
    assert json.loads((out / "run.json").read_text())["flags"]["tf32"] is False


# ----------------------------------------------------------------------------- issue 27.5

@pytest.mark.parametrize("kind", ["sms", "own"])
def test_a_short_run_copies_nothing_to_the_device_blocking_in_a_step(fake_device, tmp_path,
                                                                     sms, kind):
    """A run shorter than an epoch fills no cache ahead: its steps miss the cache, and a miss
    must not copy an index to the device (a stream sync per step on CUDA)."""
    data_args = ["--data", sms] if kind == "sms" else ["--train-file", own_files(tmp_path)]
    train_on_meta(fake_device, tmp_path, [*data_args, "--max-steps", "1", "--no-initial-eval"])
    assert fake_device.steps == 1
    assert fake_device.step_blocking() == 0, fake_device.blocking
    assert fake_device.step_reads() == 0, fake_device.reads


def test_the_harness_counts_blocking_copies_to_the_device():
    with FakeDevice() as mode:
        torch.tensor([1, 2]).to(META)
        torch.tensor([1, 2], device=META)
        torch.zeros(2, device=META).copy_(torch.ones(2))
        assert mode.blocking == {"set-up": 3}
        mode.batch = {(batch := torch.ones(2)).untyped_storage().data_ptr()}
        batch.to(META)  # the loader's batch: pinned on CUDA
        assert mode.blocking == {"set-up": 3}


@pytest.mark.parametrize("rows", [[0], [3], [0, 1, 2, 3], [1, 2], [0, 2, 3], [0, 3], [1, 3]])
def test_picking_the_missed_rows_needs_no_index_from_the_host(rows):
    t = torch.arange(4 * 3).reshape(4, 3)
    with FakeDevice() as mode:
        picked = shortcuts.pick_rows(t.to(META), rows)
        assert mode.blocking == {"set-up": 1}  # t's own copy, nothing else
    assert picked.shape == (len(rows), 3)
    assert torch.equal(shortcuts.pick_rows(t, rows), t[rows])


@pytest.mark.parametrize("flags", [
    ["--keep-best", "val_loss", "--early-stopping", "1", "--epochs", "3"],
    ["--keep-best", "val_accuracy", "--epochs", "2"],
    ["--checkpoint-every", "1", "--epochs", "1"],
], ids=" ".join)
def test_long_runs_train_on_a_device(fake_device, tmp_path, sms, flags):
    out = train_on_meta(fake_device, tmp_path, ["--data", sms, "--no-initial-eval", *flags])
    assert fake_device.steps >= 3
    assert fake_device.step_reads() == 0, fake_device.reads
    assert fake_device.step_blocking() == 0, fake_device.blocking
    assert fake_device.unpinned_async == 0
    assert (out / "run.json").is_file()


def test_resume_on_a_device_loads_the_checkpoint_onto_the_cpu(fake_device, tmp_path, sms,
                                                              monkeypatch):
    """A run stopped after its first checkpoint, resumed on the device. torch.load without
    map_location would put a GPU checkpoint's tensors on the GPU they were saved from (cuda:0
    under torchrun's every rank), or fail on a machine without it."""
    write, written = files.write_atomic, []

    def stop_after_checkpoint(path, data, sync=False):
        write(path, data, sync)
        if path.name == files.CHECKPOINT:
            written.append(path)
            raise KeyboardInterrupt
    monkeypatch.setattr(files, "write_atomic", stop_after_checkpoint)
    with pytest.raises(SystemExit):
        train_on_meta(fake_device, tmp_path, ["--data", sms, "--no-initial-eval", "--epochs",
                                              "2", "--checkpoint-every", "1"])
    assert written and (tmp_path / "run" / files.CHECKPOINT).is_file()
    monkeypatch.setattr(files, "write_atomic", write)
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or load(*a, **k))
    fake_device.steps, fake_device.reads, fake_device.blocking = 0, {}, {}
    finetune.main(["--resume", str(tmp_path / "run")])
    assert loads and all(k.get("map_location") == "cpu" for k in loads)
    assert fake_device.steps == 5  # 6 steps in all, the first before the checkpoint
    assert fake_device.step_reads() == 0, fake_device.reads
    assert fake_device.step_blocking() == 0, fake_device.blocking
    assert (tmp_path / "run" / "run.json").is_file()


def test_autocast_is_asked_on_the_runs_device_in_its_precision(fake_device, tmp_path, sms):
    train_on_meta(fake_device, tmp_path, ["--data", sms, "--max-steps", "2", "--precision",
                                          "bf16", "--no-initial-eval"])
    assert fake_device.autocast and set(fake_device.autocast) == {("meta", torch.bfloat16)}
    assert set(fake_device.autocast_queries) <= {"meta"}, fake_device.autocast_queries


def test_fp32_asks_no_autocast(fake_device, tmp_path, sms):
    train_on_meta(fake_device, tmp_path, ["--data", sms, "--max-steps", "1", "--no-initial-eval"])
    assert fake_device.autocast == []
    assert set(fake_device.autocast_queries) <= {"meta"}, fake_device.autocast_queries


def fake_gpus(monkeypatch, count):
    """CUDA with `count` GPUs, as far as the random generators go: {device: state} restored."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": restored.__setitem__(device, state))

    def set_all(states):  # as torch: one generator per state given, IndexError past the GPUs
        if len(states) > count:
            raise IndexError("tuple index out of range")
        restored.update(enumerate(states))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    return restored


@pytest.mark.parametrize("count", [1, 2, 4])
def test_a_resume_restores_the_cuda_generators_there_are(monkeypatch, count):
    state = longrun.rng_state()
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    restored = fake_gpus(monkeypatch, count)
    longrun.set_rng_state({**state, "cuda": saved})
    assert sorted(restored) == list(range(min(count, 2)))
    assert all(torch.equal(restored[i], saved[i]) for i in restored)
    note = longrun.gpus_note({"point": {"rng": {"cuda": saved}}})
    assert (note is None) == (count >= 2)
    if note:
        assert note.startswith("note: the run saved the random generators of 2 GPUs and this "
                               "machine has 1; those of the first 1 are restored")


def test_torchrun_weighs_a_class_weighted_step_without_waiting(monkeypatch):
    """Under torchrun each process's share is scaled by the whole batch's weight sum: added up
    on the host from the batch every process holds, with no collective and no device read."""
    torch.manual_seed(0)
    model = gpt.Classifier(gpt.add_classification_head(gpt.GPTModel(TINY), 3))
    ids, labels = torch.randint(0, 50000, (6, 5)), torch.tensor([0, 2, 1, 2, 2, 0])
    weight = torch.tensor([1.0, 3.0, 0.5])
    monkeypatch.setattr(ddp, "sum_over_ranks", lambda *v: pytest.fail("a collective in a step"))
    monkeypatch.setattr(ddp, "world", lambda: 2)
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(ddp, "rank", lambda r=r: r)
        shares.append(ddp.training_loss_batch(finetune.calc_loss_batch, ids, labels, model,
                                              "cpu", -100, weight, weight))
    whole = torch.nn.functional.cross_entropy(model(ids), labels, weight=weight)
    assert torch.allclose(sum(shares) / 2, whole)  # what DDP's average of the gradients sees


def test_torchrun_class_weighted_training_reads_nothing_back_in_a_step(fake_device, tmp_path,
                                                                       sms, monkeypatch):
    """finetune.py's path with world 2 (rank 0) monkeypatched: DDP and the collectives of the
    evaluations stand in; a step must not wait for the device."""
    monkeypatch.setattr(ddp, "world", lambda: 2)
    monkeypatch.setattr(ddp, "rank", lambda: 0)
    monkeypatch.setattr(ddp, "wrap", lambda module, device: module)
    collectives = []

    def sum_over_ranks(*values):  # the other process holding as much (placeholders: 1)
        collectives.append(fake_device.phase)
        return tuple(2 * float(v) or 1.0 for v in values)
    monkeypatch.setattr(ddp, "sum_over_ranks", sum_over_ranks)
    train_on_meta(fake_device, tmp_path, ["--data", sms, "--epochs", "1", "--class-weights",
                                          "1,3", "--no-initial-eval"])
    assert fake_device.steps == 3
    assert "step" not in collectives
    assert fake_device.step_reads() == 0, fake_device.reads
    assert fake_device.step_blocking() == 0, fake_device.blocking


@pytest.mark.parametrize("version, attribute", [("2.5.1", "allow_tf32"),
                                                ("2.9.0", "fp32_precision")])
def test_tf32_on_a_torch_before_and_after_2_9(monkeypatch, version, attribute):
    class Matmul:  # as torch's cuBLAS module: an attribute it lacks cannot be set
        __slots__ = ("allow_tf32",) if attribute == "allow_tf32" else ("fp32_precision",)
    matmul = Matmul()
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(ddp, "select_device", lambda name="auto": torch.device("cuda"))
    monkeypatch.setattr(files, "plan_output_dir", lambda cfg: (_ for _ in ()).throw(
        ValueError("stop here")))
    with pytest.raises(SystemExit, match="stop here"):
        finetune.main(["--tf32", "--device", "cuda"])
    assert getattr(matmul, attribute) in (True, "tf32")
