"""Devices and processes: where a run computes (`select_device`) and, under torchrun, more
than one process with DistributedDataParallel, as a thin layer over PyTorch.

    torchrun --nproc_per_node 4 finetune.py --device cuda ...

Every process runs finetune.py whole, on the same data in the same seeded order. Each takes its
share of every global batch (`share`), DistributedDataParallel averages the gradients, and the
evaluations add up their sums and counts over the processes (`sum_over_ranks`,
`eval_loss_over_ranks`; `training_loss_batch` scales a class-weighted loss's share), so the run
takes the steps a single process takes. Rank 0 alone prints and writes the run folder.

Without torchrun (no WORLD_SIZE above 1 in the environment) every function here is a no-op:
world 1, rank 0, the whole batch.
"""

import contextlib
import os
import platform
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

# How long a process waits for the others in a collective before giving up. A process that
# fails ends at once and torchrun stops the others; this bounds the wait where torchrun cannot
# see the failure (another machine's process hung).
TIMEOUT = timedelta(minutes=10)


def world():
    """Number of processes: 1 without torchrun."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    """This process's rank: 0 without torchrun."""
    return dist.get_rank() if dist.is_initialized() else 0


def local_world():
    """Number of processes on this machine: 1 without torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.is_initialized() else 1


def is_main():
    """True on the process that prints and writes (rank 0)."""
    return rank() == 0


def select_device(name="auto"):
    """auto: cuda, then mps (only torch >= 2.9: older MPS gave wrong numbers), then cpu. An
    explicit mps on an older torch is refused for the same reason."""
    mps_new = torch_version() >= (2, 9)
    if name == "auto":
        mps_ok = torch.backends.mps.is_available() and mps_new
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available here; use --device cpu (or auto)")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("MPS is not available here; use --device cpu (or auto)")
    elif name == "mps" and not mps_new:
        raise ValueError(f"--device mps needs torch 2.9 or newer (this is {torch.__version__}; "
                         "older MPS gave wrong numbers); upgrade torch (pip install -U torch), "
                         "or use --device cpu")
    return torch.device(name)


def init():
    """Join torchrun's process group, if torchrun started this process.

    The backends are named (`backend`): gloo for the CPU tensors (`sum_over_ranks` adds up
    CPU numbers, whatever the device), and NCCL for the CUDA ones where PyTorch has it and a
    GPU is present. Left to itself, PyTorch >= 2.6 builds only the detected accelerator's
    backend (NCCL alone on a GPU machine), and the first sum of CPU numbers fails. Torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) says where the others are.
    """
    if not launched() or dist.is_initialized():
        return
    dist.init_process_group(backend=backend(), timeout=TIMEOUT)


def launched():
    """Whether torchrun started this process with others (WORLD_SIZE above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend():
    """The process group's backends: "cpu:gloo,cuda:nccl" where CUDA and NCCL are here, else
    "gloo" (CPU processes)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


def leave():
    """End a process that torchrun started, after its run has finished and every file is written
    and closed, at once: its output flushed, without the interpreter's shutdown. A no-op
    without torchrun (WORLD_SIZE unset or 1). finetune.py calls it when run as a script.

    Why: torch's gloo process group lets go of each finished collective's tensors on its own
    worker thread, and a tensor made in Python needs the GIL to be freed. If that happens while
    the interpreter is shutting down, the thread cannot take the GIL, and the process aborts
    ("terminate called without an active exception", SIGABRT). torchrun then reports a run
    that finished and saved everything as failed. Seen in about 1 run in 60 of two CPU
    processes (torch 2.13, 2-core AMD EPYC, 2026-12-05); the core dump showed
    `ProcessGroupGloo::runLoop` freeing an `AsyncAllreduceWork` during `Py_FinalizeEx`. The
    process group is gone by then (`close`), so nothing is left that the shutdown would do
    for the run."""
    if not launched():
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def device_for_rank(device):
    """Under torchrun, a CUDA device is the GPU of this process's LOCAL_RANK (one GPU each)."""
    if not dist.is_initialized() or device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"torchrun runs on CUDA GPUs (NCCL) or on CPU processes (gloo), not "
                         f"on {device.type}; pass --device cuda or --device cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise ValueError(f"this is process {local} on this machine, but it has "
                         f"{torch.cuda.device_count()} GPU(s); give torchrun --nproc_per_node "
                         "no more than the number of GPUs")
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    return device


def share(batch):
    """This process's share of a global batch (consecutive rows); without torchrun, all of it.

    The shares of a batch that does not divide evenly differ by one row; a process may get none
    of a batch smaller than the world (the last one of an evaluation).
    """
    return batch.tensor_split(world())[rank()] if world() > 1 else batch


def sum_over_ranks(*values):
    """The values (numbers or one-element tensors) added up over all processes, as floats."""
    if world() == 1:
        return tuple(float(v) for v in values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)  # gloo carries it
    dist.all_reduce(t)
    return tuple(t.tolist())


def barrier():
    """Wait until every process gets here (a failure of another ends the wait with an error)."""
    sum_over_ranks(0)


def wrap(module, device):
    """DistributedDataParallel over `module` (whose forward the training calls), after freezing.

    Only the trainable parameters are synchronised: DDP is told to ignore the frozen ones and
    every buffer, so nothing else is broadcast (every process built the same weights from the
    same seed) and a frozen-trunk cache's weights stay untouched. Every trainable parameter
    is used in each step, so no search for unused ones.
    """
    if world() == 1:
        return module
    ignored = [n for n, p in module.named_parameters() if not p.requires_grad]
    ignored += [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def no_sync(model, skip):
    """Where `skip`, DDP keeps this backward's gradients local (they add up over the batches of
    a gradient-accumulation group, averaged over the processes at the group's last one)."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def first_to_fail():
    """Called by a process that is ending on an error: True for the first one to do so.

    That one says why; the others end quietly, since their errors (a collective cut off when
    the first one left) only echo it. Counted in torchrun's key-value store.
    """
    if world() == 1:
        return True
    try:
        return dist.distributed_c10d._get_default_store().add("failed processes", 1) == 1
    except Exception:  # the store has gone: torchrun is already ending the run
        return False


# ----------------------------------------------------------------------- the losses over processes

def eval_loss_over_ranks(input_batch, target_batch, model, device, ignore_index=-100,
                         weight=None):
    """Under torchrun: the mean loss of a whole batch of which each process holds a share
    (the sums of the example losses and their counts, added up over the processes; with class
    weights, the weighted sums and the weights)."""
    host_targets = share(target_batch)  # (the kept labels are counted on the host)
    input_batch, target_batch = share(input_batch), host_targets.to(device)
    loss_sum = 0.0
    if len(target_batch):  # the last batch of an evaluation may leave a process none
        logits = model(input_batch.to(device))
        loss_sum = F.cross_entropy(logits, target_batch, ignore_index=ignore_index,
                                   weight=weight, reduction="sum").item()
    kept = host_targets[host_targets != ignore_index]
    count = len(kept) if weight is None else weight[kept.to(weight.device)].sum()
    loss_sum, count = sum_over_ranks(loss_sum, count)
    return loss_sum / count if count else float("nan")


def training_loss_batch(calc_loss_batch, input_batch, target_batch, model, device,
                        ignore_index=-100, weight=None, host_weight=None):
    """The loss a training step backpropagates: the batch's mean loss. Under torchrun, this
    process's share of it, scaled so that DDP's average over the processes' gradients is the
    whole batch's: the mean of its share, or with class weights its weighted sum over the whole
    batch's sum of weights times their number. Every process holds the whole batch on the host,
    so each adds up that sum itself (`host_weight`: the weights on the host, default
    weight.cpu()): no collective, no wait for the device. Without torchrun, or without class
    weights, that is `calc_loss_batch` (finetune's) of its share."""
    whole_targets = target_batch
    input_batch, target_batch = share(input_batch), share(target_batch)
    if world() == 1 or weight is None:
        return calc_loss_batch(input_batch, target_batch, model, device, ignore_index, weight)
    host_weight = weight.cpu() if host_weight is None else host_weight
    weights = host_weight.double()[whole_targets[whole_targets != ignore_index]].sum().item()
    logits = model(input_batch.to(device, non_blocking=input_batch.is_pinned()))
    targets = target_batch.to(device, non_blocking=target_batch.is_pinned())
    loss_sum = F.cross_entropy(logits, targets, weight=weight, ignore_index=ignore_index,
                               reduction="sum")
    return loss_sum * world() / weights


def torch_version():
    """(major, minor) of the torch running."""
    return tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def use_tf32():
    """--tf32: CUDA's fp32 matrix products in TF32. torch 2.9 names it
    matmul.fp32_precision; older ones have no such attribute, only matmul.allow_tf32."""
    if torch_version() >= (2, 9):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True


def synchronize(device):
    """Wait for `device` to finish what it was given (CUDA, MPS); nothing on a CPU. Timings
    (the run's, the benchmarks') call it before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def warm_up(device):
    """Start the device's maths libraries (cuBLAS on CUDA) with one small product, and wait for
    it: what a first product costs is start-up, not training. Nothing on a CPU."""
    if device.type == "cpu":
        return
    x = torch.ones(8, 8, device=device)
    x @ x
    synchronize(device)


def device_name(device):
    """What the device is, for the records: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple {platform.machine()} (MPS)"
    try:  # Linux: platform.processor() says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"
