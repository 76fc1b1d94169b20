"""
What every script shares (nanochat keeps the same in its common.py): the torchrun set-up (one process without
torchrun works too), print0 / barrier / all_reduce, FSDP2 wrapping, atomic sharded checkpoints and the metrics log.
"""
import contextlib
import glob
import json
import os
import random
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.autograd import DeviceType
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.profiler import ProfilerActivity, profile


# ----------------------------------------------------------------------------------------------------------
# distributed set-up: torchrun env vars -> process group -> device. One process without torchrun works too.

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; nccl on GPU, gloo on CPU. Multi-node is plain torchrun."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        single_process_env()
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    dev = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun, even on one GPU (vLLM reuses it)
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=torch.device(dev) if use_cuda else None)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def single_process_env():
    """Without torchrun on a GPU, act as a one-rank torchrun (RANK=0, WORLD_SIZE=1, a free local port): FSDP2 and
    the colocated vLLM engine (its external_launcher reads RANK) then find the process group they expect, so
    `python train_grpo.py ... --engine=vllm` works as `torchrun --nproc_per_node=1 train_grpo.py ...` does."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def exit_distributed():
    """End a torchrun worker: destroy the process group, flush, and leave with os._exit(0). Measured on this
    CPU (torch 2.14.1, transformers 5.24): a gloo worker that has loaded a model through from_pretrained aborts
    in C++ teardown after Python has finished ("terminate called without an active exception") in 5 of 50
    runs, 0 of 50 with os._exit (the cause was not found). Everything is written and closed before this."""
    if "RANK" not in os.environ:
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, group=None, op=None):
    """Sum (or op) over ranks; gloo works on CPU tensors only, so move there when needed."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        src = t.cpu() if dist.get_backend(group) == "gloo" else t
        dist.all_reduce(src, op=op or dist.ReduceOp.SUM, group=group)
        if src is not t:
            t.copy_(src)
    return t


# ----------------------------------------------------------------------------------------------------------
# FSDP2: each unit a fully_shard group, the root a module whose forward runs a function on the model

def wrap_fsdp(model: torch.nn.Module, units, d: Dist, bf16: bool, ignored: set = None):
    """FSDP2: fully_shard each unit (a module, or a list of modules sharded as one group), then the root.
    A unit's weights are gathered when its forward runs, so anything called directly (not through the root's
    forward) must be a unit. Parameters stay fp32 (the optimizer's master copy); with bf16 the forward and
    backward compute in bf16 and gradients are reduced in fp32. `ignored` parameters stay whole on every rank."""
    if d.world_size == 1 and not bf16:
        return model
    if not dist.is_initialized():  # one GPU without torchrun: FSDP2 still needs a (size-1) process group
        dist.init_process_group("gloo" if d.device == "cpu" else "nccl", rank=0, world_size=1,
                                init_method=f"file:///tmp/longrl-pg-{os.getpid()}")
    mesh = init_device_mesh("cuda" if d.device.startswith("cuda") else "cpu", (d.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    return model


class Root(torch.nn.Module):
    """The FSDP2 root. A unit's weights are gathered only while its forward runs, and our code calls the model's
    parts directly (the vision tower once per prompt, the decoder, lm_head on chosen rows only), so the root's
    forward simply runs a function on the model: `policy(fn, *args)` == `fn(model, *args)` with every weight
    that no decoder layer or vision block owns (embeddings, norms, merger, lm_head) gathered meanwhile."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def finite(model, what: str):
    """`model`, after checking that every weight is finite: non-finite weights are never pushed or saved."""
    if not params_finite(model):
        raise RuntimeError(f"non-finite weights in the policy: not {what}")
    return model


def params_finite(model) -> bool:
    """Every weight finite, on every rank (checked before a push into vLLM and before a checkpoint)."""
    bad = torch.zeros(1)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local.detach()).all()):
            bad += 1
    return all_reduce(bad, op=dist.ReduceOp.MAX if dist.is_initialized() else None).item() == 0


# ----------------------------------------------------------------------------------------------------------
# checkpoints: torch.distributed.checkpoint (sharded, reshardable), written to DIR/step_N.tmp then renamed, so
# a stopped run never leaves a half-written checkpoint that --resume would pick up.

@contextlib.contextmanager
def profiled(on: bool, path: str, show: bool, top: int = 25):
    """torch.profiler around a block when `on` (CPU and, on a GPU, CUDA activity): the `top` ops by device time
    (CPU time on a CPU) printed when `show`, and a Chrome / Perfetto trace written to `path`."""
    if not on:
        yield
        return
    gpu = torch.cuda.is_available()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        yield
        if gpu:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if show:
        print(prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=top),
              flush=True)
        if gpu:  # the kernels' and copies' time on the GPU's timeline (range annotations left out: they span gaps)
            busy = busy_seconds([(e.time_range.start, e.time_range.end) for e in prof.events()
                                 if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)])
            print(f"GPU busy {busy:.2f} s of the profiled {wall:.2f} s ({100 * busy / wall:.0f}%); the rest it waited "
                  f"for the host (Python, kernel launches, synchronisations)", flush=True)
    prof.export_chrome_trace(path)


def busy_seconds(intervals: list) -> float:
    """Length of the union of (start, end) intervals given in microseconds, in seconds: how long the GPU ran at
    least one kernel or copy (overlapping streams counted once)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:             # the part of [start, end) past everything counted so far
            busy += end - max(start, reach)
            reach = end
    return busy / 1e6


@contextlib.contextmanager
def dcp_quietly():
    """One process without torchrun (the CPU demo): DCP warns at every checkpoint save and load that it assumes
    exactly that; the message carries nothing, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_checkpoint(out_dir: str, step: int, model, optimizer, state: dict, keep_last: int = 2):
    """Model + optimizer (sharded), each rank's RNG states, and `state` (data position, step, metrics...)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final, tmp = os.path.join(out_dir, f"step_{step:08d}"), os.path.join(out_dir, f"step_{step:08d}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with dcp_quietly():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "step": step}, f)
    barrier()
    if rank == 0:
        os.replace(tmp, final)  # atomic on one filesystem
        for old in sorted(glob.glob(os.path.join(out_dir, "step_????????")))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(out_dir: str):
    done = sorted(glob.glob(os.path.join(out_dir, "step_????????")))  # *.tmp folders are never matched
    return done[-1] if done else None


def refuse_old_run(out_dir: str):
    """A run started without --resume in a folder that holds another run's checkpoints or metrics.jsonl would
    append its rows to the old log and fail at its first save (the old step_* folder is in the way): stop now."""
    if latest_checkpoint(out_dir) or os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        raise ValueError(f"{out_dir} already holds a run (step_* checkpoints or metrics.jsonl): resume it with "
                         "--resume=True, or choose another --out_dir, or delete the folder")


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG; return the saved `state` dict."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    with dcp_quietly():
        dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):  # absent when resuming on more ranks than were saved: RNG then starts fresh
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def load_model_weights(path: str, model) -> str:
    """The weights alone of a checkpoint (a step_* folder, or a run folder: its newest) into `model`, e.g. an SFT
    run's into a fresh GRPO policy (train_grpo.py --init_from): fp32 master weights as trained, no optimizer state,
    no RNG. Every weight of `model` must be in the checkpoint. Returns the step folder read."""
    step_dir = path if os.path.exists(os.path.join(path, ".metadata")) else latest_checkpoint(path)
    if step_dir is None:
        raise ValueError(f"{path}: neither a checkpoint folder (with .metadata) nor a run folder with a complete "
                         "step_* checkpoint")
    sd = {"model": get_model_state_dict(model)}
    with dcp_quietly():
        dcp.load(sd, checkpoint_id=step_dir)
    set_model_state_dict(model, sd["model"])
    return step_dir


# ----------------------------------------------------------------------------------------------------------
# the metrics log: metrics.jsonl (+ tensorboard, + Weights & Biases), GPU memory, the learning curve

def keep_metrics_until(out_dir: str, step: int):
    """Drop the rows of out_dir/metrics.jsonl past `step`, the step the run (re)starts from: a run stopped after
    logging step j but before checkpointing it (its last checkpoint k < j) left rows k+1..j, which the resumed run
    logs again. A row cut short by the stop is past k too (a step is logged before it is saved). Rank 0 only."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the row being written when the run stopped
                continue
            if row["step"] <= step:
                kept.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsLog:
    """One json line per step in out_dir/metrics.jsonl, written by rank 0 (and to tensorboard / W&B if asked),
    continuing at start_step (a resumed run: rows logged past it before the stop are dropped, keep_metrics_until)."""

    def __init__(self, out_dir: str, is_main: bool, tensorboard: bool = False, wandb_project: str = "",
                 config: dict = None, start_step: int = 0):
        if is_main:
            keep_metrics_until(out_dir, start_step)
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if is_main else None
        self.tb = self.wandb = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # late: tensorboard is optional
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        if is_main and wandb_project:
            import wandb  # late: wandb is optional
            wandb.init(project=wandb_project, config=config)
            self.wandb = wandb

    def write(self, metrics: dict, step: int):
        if self.file is None:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        for k, v in metrics.items() if self.tb else ():
            self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self):
        if self.file:
            self.file.close()


def gpu_used_gib() -> float:
    """Memory in use on this GPU by every allocator (torch's and vLLM's), in GiB."""
    if not torch.cuda.is_available():
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def plot_curve(curve: list, path: str):
    try:  # late: matplotlib is optional
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0("matplotlib not installed: no learning-curve PNG")
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([c["step"] for c in curve], [c["accuracy"] for c in curve], marker="o", label="held-out accuracy")
    ax.axhline(0.25, color="grey", linestyle="--", label="chance (4 options)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("accuracy (greedy)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print0(f"learning curve: {path}")
