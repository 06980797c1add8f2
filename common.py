"""Plumbing shared by the method files: CLI, device and precision, seeding, distributed,
checkpoints, logging, model loading (real, tiny, and real-size random), pipeline export, prompt sets.
The metrics are in evaluate.py.

Nothing in here is a loss or a sampler of any method: those live in the method files, next
to the equations they implement. Every helper is small enough to read in one sitting.
"""
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import re
import socket
import time
import typing
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as torch_dist

# ==== CLI: an argparse parser generated from a dataclass. A field's help is its trailing comment:
#     lr: float = 4e-6  # learning rate (Table 11)
# Bools become --flag / --no-flag; Literal types become choices; tuples take several values.

@functools.lru_cache(maxsize=None)  # inspect.getsource parses the whole file: once per class
def _field_comments(cls) -> dict:
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):  # subclasses override their parents' help
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M):
            comments[m.group(1)] = m.group(2).strip()
    return comments

def build_parser(cls):
    import argparse
    hints = typing.get_type_hints(cls)
    helps = _field_comments(cls)
    doc = (cls.__doc__ or "").strip() if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else None
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = helps.get(f.name, " ").replace("%", "%%")  # argparse %-formats help strings
        if f.name.endswith("_every") and "0 = never" not in help_:
            help_ += " (0 = never; the last step always gets one)"
        kw = dict(default=default, help=help_, dest=f.name)
        if tp is bool:
            p.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            p.add_argument(name, type=type(choices[0]), choices=choices, **kw)
        elif typing.get_origin(tp) in (tuple, list):
            p.add_argument(name, type=typing.get_args(tp)[0], nargs="+", **kw)
        else:
            p.add_argument(name, type=tp, **kw)
    return p

def parse(cls, argv=None):
    """Parse sys.argv (or `argv`) into an instance of the dataclass `cls`. The flags given on the command line
    are kept in `args._explicit` (resume tells a flag the user typed from a default: see start_run)."""
    import argparse
    ns = build_parser(cls).parse_args(argv)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()}
    bare = build_parser(cls)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    args = cls(**values)
    args._explicit = set(vars(bare.parse_args(argv)))
    return args

class UsageError(ValueError):
    """Input a run cannot honour (a flag out of range, a clobbered --out, a resume that changes the experiment).
    `main` prints it argparse-style and exits with code 2; in-process callers get the exception."""

def main(cls, train, argv=None):
    """A method file's command line: parse, train, and turn a UsageError into `prog: error: ...`, exit code 2."""
    args = parse(cls, argv)
    try:
        return train(args)
    except UsageError as e:
        build_parser(cls).error(str(e))

# ==== Device, precision, seeding

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but torch.cuda.is_available() is False")
    return torch.device(name)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on CUDA, fp32 on CPU (bf16 autocast on CPU is slower for tiny models)."""
    return DTYPES[("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name]

def autocast(device: torch.device, dtype: torch.dtype):
    """The one place precision is chosen: autocast for half dtypes, nothing for fp32."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

def make_scaler(device: torch.device, dtype: torch.dtype):
    """A GradScaler only for fp16 (bf16 and fp32 need none). Returns None otherwise."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

def seed_everything(seed: int, rank: int = 0) -> None:
    s = seed + rank  # different data per rank, reproducible per run
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)

def set_cpu_threads(n: int = 0) -> None:
    """n > 0: use n threads. n = 0: leave torch's default (all cores) unless CPU_THREADS is set."""
    n = n or int(os.environ.get("CPU_THREADS", 0))
    if n > 0:
        torch.set_num_threads(n)

# ==== Distributed (torchrun). A plain `python file.py` gets world_size 1 and no process group.

def init_distributed(device_name: str = "auto") -> SimpleNamespace:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return SimpleNamespace(rank=rank, world_size=world, local_rank=local_rank, device=device, is_main=rank == 0)

def is_main() -> bool:
    """Rank 0 (or a plain run): the one process that prints and writes files."""
    return int(os.environ.get("RANK", 0)) == 0

def print0(*a, **k) -> None:
    if is_main():
        print(*a, **k, flush=True)

def wrap_ddp(model: torch.nn.Module, dist) -> torch.nn.Module:
    if dist.world_size == 1:
        return model
    ids = [dist.local_rank] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP wrapper (an EMA's AveragedModel is kept whole: its n_averaged belongs to it)."""
    ema = isinstance(model, torch.optim.swa_utils.AveragedModel)
    return model.module if hasattr(model, "module") and not ema else model

# Gradient accumulation (--grad-accum N): an optimiser step sums the gradients of N micro-batches of --batch-size,
# each loss divided by N; clipping and the step run once after them (global batch = batch_size x N x world_size).

@contextlib.contextmanager
def no_sync(model):
    """Skip the gradient all-reduce of this backward: DDP's no_sync(), FSDP2's set_requires_gradient_sync(False)."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield

def micro_batches(n: int, *models):
    """Yields 0..n-1, one per micro-batch. On all but the last the wrapped `models` do not all-reduce (no_sync spans
    the body's forward and backward), so gradients add up locally and the last backward reduces the sum once."""
    for i in range(n):
        with contextlib.ExitStack() as stack:
            for m in models if i < n - 1 else ():
                stack.enter_context(no_sync(m))
            yield i

def backward(loss: torch.Tensor, n: int = 1, scaler=None) -> None:
    """One of n micro-batches: back-propagate loss / n, scaled under fp16 (clip_and_step unscales after the last)."""
    (scaler.scale(loss / n) if scaler is not None else loss / n).backward()

def clip_and_step(opt, params, clip: float, scaler=None) -> torch.Tensor:
    """After the last micro-batch: unscale (fp16), clip the gradient norm, step, update the scaler. Returns the norm."""
    if scaler:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt) if scaler else opt.step()
    if scaler:
        scaler.update()
    return norm

def mean_rows(rows: list) -> dict:
    """Logged scalars averaged over a step's micro-batches (for mean losses: the large-batch value)."""
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in rows[0]}

# ==== Scale (README "Scale"): DDP by default; --fsdp shards with FSDP2, --offload keeps the shards on the CPU.

def wrap(model: torch.nn.Module, dist, fsdp: bool = False, offload: bool = False) -> torch.nn.Module:
    """The one call a method file makes per network (trainable or frozen), after loading and before building its
    optimizer. Default: DDP for a trainable network, the network itself for a frozen one. fsdp: FSDP2 fully_shard of
    each block diffusers names in _no_split_modules (innermost first), then the root; frozen networks too. Its
    MixedPrecisionPolicy keeps the parameters in their own dtype and reduces gradients in fp32: precision is still
    chosen in one place, the autocast of common.autocast, and the fp32 paths (finite differences, --gad-fp32) stay
    fp32 (all-gathering in bf16 would halve the traffic but make them half precision). offload: CPUOffloadPolicy
    (shards, gradients and optimizer states in CPU memory, the optimizer step on the CPU). fully_shard replaces the
    parameters by sharded DTensors, so the optimizer must be built from the returned module's parameters."""
    if not fsdp:
        return wrap_ddp(model, dist) if any(p.requires_grad for p in model.parameters()) else model
    if has_lora(model):  # found after loading: adm's default rank depends on the family
        raise UsageError("argument --lora-rank: not with --fsdp yet (FSDP2 over peft's adapter layers is untested); "
                         "use DDP, or --lora-rank 0 with --fsdp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    if not torch_dist.is_initialized():  # a plain run: a group of one (--fsdp --offload on a single GPU)
        torch_dist.init_process_group("nccl" if dist.device.type == "cuda" else "gloo", store=torch_dist.HashStore(),
                                      rank=0, world_size=1)
    kw = dict(mesh=init_device_mesh(dist.device.type, (dist.world_size,)),
              mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy(pin_memory=dist.device.type == "cuda") if offload else OffloadPolicy())
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for m in reversed(list(model.modules())):  # children before their parents
        if type(m).__name__ in blocks and m is not model:
            fully_shard(m, **kw)
    return fully_shard(model, **kw)

def refuse_jvp_with_grad(args, jvp_with_grad: bool, fix: str) -> None:
    """A forward-mode JVP taken with gradients (GAD's student response) composes with neither --grad-ckpt (checkpoint
    recomputation runs without the tangents: CheckpointError) nor --fsdp (FSDP2's backward hook is an autograd
    Function without a forward-AD rule); tests/test_distributed.py. Refused before loading, `fix` says what works."""
    for flag in ("grad_ckpt", "fsdp"):
        require(not (getattr(args, flag, False) and jvp_with_grad), f"argument --{flag.replace('_', '-')}: {fix}")

def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)

def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state dict: a plain or DDP model's own; an FSDP2 model's shards gathered to rank 0's CPU
    (a collective: every rank calls it; the other ranks get an empty dict)."""
    if not is_sharded(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

def same_on_all_ranks(x: int, sharded: bool) -> int:
    """Rank 0's draw of a per-step random integer that sets how often a network runs (a rollout length) when that
    network is sharded: FSDP2's forwards are collective, so every rank must run it equally often. Otherwise the
    rank's own draw (DDP: each rank draws its own)."""
    if not sharded or not torch_dist.is_initialized():
        return x
    box = [x]
    torch_dist.broadcast_object_list(box, src=0)
    return int(box[0])

def _owner(opt, models: dict):
    """The sharded model whose parameters `opt` updates (None for plain and DDP models)."""
    mine = {id(p) for g in opt.param_groups for p in g["params"]}
    return next((m for m in models.values() if is_sharded(m) and any(id(p) in mine for p in m.parameters())), None)

def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()

def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()

# ==== Checkpoints: one dict {models, optimizers, scaler, step, args, rng}, written atomically, read with
# torch.load(weights_only=True) (tensors, numbers, strings and containers only: no pickled code).

_RUN = SimpleNamespace(changes={}, ckpt=None)  # this process's run: args changed on resume, last checkpoint (path, step)

def _rng_state() -> dict:
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))  # weights_only-safe
    return {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state(), **cuda}

def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

def save_checkpoint(path: str, models: dict, optimizers: dict, step: int, args, scaler=None, extra=None,
                    schedulers=None) -> None:
    """Write to `path` via a temp file and an atomic rename: a crash never leaves half a file. Every rank calls it:
    FSDP2 shards are gathered (full_state_dict, optimizer states keyed by parameter name) and rank 0 writes.
    schedulers: lr_schedulers()' dict (their step counts); an EMA (make_ema) rides in `models`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    owners = {k: _owner(o, models) for k, o in optimizers.items()}
    ckpt = {"models": {k: full_state_dict(m) for k, m in models.items()},
            "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()},
            "optimizers": {k: get_optimizer_state_dict(owners[k], o, options=full) if owners[k] else o.state_dict()
                           for k, o in optimizers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
            "args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args, "rng": _rng_state(), "extra": extra}
    if not is_main():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
    _RUN.ckpt = (path, step)

def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """torch.load with weights_only=True; a missing, truncated or foreign file raises UsageError naming it."""
    import pickle
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UsageError(f"no checkpoint at {path}") from None
    except (EOFError, RuntimeError, pickle.UnpicklingError, ValueError, OSError) as e:
        raise UsageError(f"{path} is not a readable checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                         "it may be truncated or from an older version: move it away and resume from another") from None
    if not isinstance(ckpt, dict) or not {"models", "optimizers", "step", "args"} <= set(ckpt):
        raise UsageError(f"{path} is not a checkpoint of these scripts (no models/optimizers/step/args)")
    return ckpt

def resolve_resume(resume: str, out_dir: str) -> str | None:
    """'' -> None; 'latest' -> out_dir/ckpt.pt (must exist); 'auto' -> out_dir/ckpt.pt if it exists; else the path."""
    path = os.path.join(out_dir, "ckpt.pt") if resume in ("latest", "auto") else resume
    if not resume or (resume == "auto" and not os.path.exists(path)):
        return None
    if not os.path.isfile(path):
        hint = "; --resume auto starts fresh when there is none" if resume == "latest" else ""
        raise UsageError(f"--resume {resume}: no checkpoint at {path}{hint}")
    return path

def load_checkpoint(path: str, models: dict, optimizers: dict, scaler=None, restore_rng: bool = True,
                    schedulers=None) -> dict:
    """Load state in place and return the checkpoint dict (its 'step' is the last finished step).
    Optimisers keep the learning rate they were built with: start_run has already reconciled it with the saved one.
    schedulers (lr_schedulers(), built before this call) continue from the saved step, on that learning rate."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True)  # every rank reads the whole file (mmap) and keeps its shard
    ckpt = read_checkpoint(path, mmap=any(is_sharded(m) for m in models.values()))
    for k, m in models.items():
        sd = ckpt["models"][k]
        set_model_state_dict(m, sd, options=full) if is_sharded(m) else unwrap(m).load_state_dict(sd)
    for k, o in optimizers.items():
        lrs = [g.get("initial_lr", g["lr"]) for g in o.param_groups]  # a scheduler's base lr, else the lr
        owner, sd = _owner(o, models), ckpt["optimizers"][k]
        set_optimizer_state_dict(owner, o, sd, options=full) if owner else o.load_state_dict(sd)
        for g, lr in zip(o.param_groups, lrs):  # an explicit --lr on resume applies for real
            g["lr"] = lr
            if "initial_lr" in g:  # and is the base of its lr schedule
                g["initial_lr"] = lr
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    _load_schedulers(schedulers or {}, ckpt.get("schedulers") or {})
    if restore_rng:
        _set_rng_state(ckpt["rng"])
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            # the file holds rank 0's streams: derive one per rank from it (exact resume is single-process only)
            seed_everything(int(torch.randint(2**31, (1,))), torch_dist.get_rank())
    _RUN.ckpt = (path, ckpt["step"])
    return ckpt

# ==== Learning-rate schedules (--lr-schedule, --lr-warmup) and the EMA of the student (--ema-decay), issue 11.
# The ecosystem's mechanisms: diffusers' get_scheduler (a torch LambdaLR) and torch's AveragedModel.

def lr_schedulers(optimizers: dict, args) -> dict:
    """One diffusers scheduler per optimiser, stepped once per training iteration (lr_step). 'constant' is diffusers'
    constant_with_warmup (linear warm-up from 0 over --lr-warmup steps; 0 = a constant lr); 'cosine_with_restarts' warms
    up, then decays on a cosine over the rest of --steps (diffusers' default num_cycles = 1). Build before
    load_checkpoint(schedulers=...), which continues the saved step count on the reconciled lr."""
    from diffusers.optimization import get_scheduler
    name = {"constant": "constant_with_warmup"}.get(args.lr_schedule, args.lr_schedule)
    return {k: get_scheduler(name, optimizer=o, num_warmup_steps=args.lr_warmup, num_training_steps=args.steps)
            for k, o in optimizers.items()}

def _load_schedulers(schedulers: dict, state: dict) -> None:
    """Continue each scheduler from its saved step, on the base lr its optimiser holds now (an explicitly typed --lr on
    resume applies); the optimiser's lr is set to base x lambda(step), exactly what the uninterrupted run computes."""
    for k, s in schedulers.items():
        if k not in state:  # a checkpoint written before schedules existed: start the schedule here
            continue
        base = [g["initial_lr"] for g in s.optimizer.param_groups]
        s.load_state_dict(state[k])
        s.base_lrs = base
        for g, b, f in zip(s.optimizer.param_groups, base, s.lr_lambdas):
            g["lr"] = b * f(s.last_epoch)
        s._last_lr = [g["lr"] for g in s.optimizer.param_groups]

def lr_step(schedulers: dict) -> None:
    for s in schedulers.values():
        s.step()

def make_ema(model: torch.nn.Module, decay: float):
    """--ema-decay > 0: torch's AveragedModel with get_ema_multi_avg_fn, ema <- decay ema + (1 - decay) theta after each
    update_parameters(model) (the first call copies theta); parameters and buffers. None when decay is 0. It is an
    nn.Module, so it is saved and resumed in the checkpoint's `models` dict; export its `.module`."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True).requires_grad_(False)

# ==== The run contract, checked at the top of train() before any model loads (README "Runs and resume"):
#  1. every numeric flag in its range (UsageError naming the flag: exit code 2 from the command line);
#  2. the run directory: a fresh run never writes into a non-empty --out unless --overwrite;
#     --resume latest needs a checkpoint, --resume auto resumes one if present;
#  3. resume: flags the user did not type take the checkpoint's values; a typed flag that changes the experiment is
#     refused, a safe one (steps, periods, eval, lr) is applied and logged in metrics.jsonl;
#  4. prompts file and every model id (local dir of the right family, cached or reachable hub id) checked up front.

RANGES = {"steps": ">= 1", "batch_size": ">= 1", "*_every": ">= 0", "lr": "> 0", "lr_warmup": ">= 0", "lr_*": "> 0",
          "*_lr": "> 0", "ema_decay": "[0, 1)", "seed": ">= 0", "seeds": ">= 1", "threads": ">= 0", "bench": ">= 0",
          "*_weight": ">= 0", "weight_decay": ">= 0", "grad_clip": "> 0", "clip": "> 0", "betas": "[0, 1)",
          "eval_seeds": ">= 2", "*_steps": ">= 1",
          "lora_rank": ">= 0", "grad_accum": ">= 1"}
RUN_LOCAL = ("out", "resume", "overwrite", "device", "threads", "bench")  # never compared, never taken from a checkpoint
SAFE_ON_RESUME = ("steps", "*_every", "eval", "eval_*", "export", "feature_model", "dtype", "grad_ckpt", "offload",
                  "lr", "lr_*", "*_lr")  # not batch_size, grad_accum (the global batch); not --fsdp: its optimizer
                                         # states are keyed by name, DDP's by index

def _spec_ok(x, spec) -> bool:
    if isinstance(spec, tuple):  # (predicate, text)
        return bool(spec[0](x))
    if isinstance(x, float) and not math.isfinite(x):  # nan and inf are never a setting
        return False
    if spec == "any":
        return True
    if m := re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", spec):
        b = float(m[2])
        return {">=": x >= b, ">": x > b, "<=": x <= b, "<": x < b}[m[1]]
    m = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])", spec)
    lo, hi = float(m[2]), float(m[3])
    return (x >= lo if m[1] == "[" else x > lo) and (x <= hi if m[4] == "]" else x < hi)

def check_args(args, ranges: dict) -> None:
    """Every int/float field (and tuple of them) of `args` within its range: `ranges` (the file's) first, then
    RANGES by name pattern. A spec is '>= 1', '> 0', '[0, 1)', 'any' or (predicate, text). A numeric field with no
    rule is a programming error (TypeError), so a new flag cannot skip validation."""
    import fnmatch
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        spec = ranges.get(f.name) or next((r for p, r in RANGES.items() if fnmatch.fnmatch(f.name, p)), None)
        if spec is None:
            raise TypeError(f"{type(args).__name__}.{f.name}: numeric flag without a declared range")
        bad = [v for v in values if not _spec_ok(v, spec)]
        if bad:
            text = spec[1] if isinstance(spec, tuple) else f"must be {spec}"
            raise UsageError(f"argument --{f.name.replace('_', '-')}: {text} (got {bad[0] if len(values) == 1 else value})")

def require(ok: bool, message: str) -> None:
    """A cross-flag check (e.g. --anchor-step <= --teacher-steps): UsageError with `message` when not `ok`."""
    if not ok:
        raise UsageError(message)

def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v
    return norm(a) == norm(b)

def _reconcile(args, saved: dict, path: str, safe: tuple) -> None:
    """Resume: untyped flags take the checkpoint's values; typed experiment-changing ones are refused."""
    import fnmatch
    explicit = getattr(args, "_explicit", None)  # None: built in-process, every field counts as given
    matches = lambda name, pats: any(fnmatch.fnmatch(name, p) for p in pats)
    refused = []
    for f in dataclasses.fields(args):
        k = f.name
        if k in RUN_LOCAL or k not in saved or _same(getattr(args, k), saved[k]):
            continue
        if explicit is not None and k not in explicit:
            value = saved[k]
            setattr(args, k, tuple(value) if isinstance(value, list) else value)  # continue the saved experiment
        elif matches(k, SAFE_ON_RESUME + tuple(safe)):
            _RUN.changes[k] = [saved[k], getattr(args, k)]
        else:
            refused.append(f"--{k.replace('_', '-')}: checkpoint {saved[k]!r}, now {getattr(args, k)!r}")
    if refused:
        raise UsageError(f"--resume {path}: these flags would change the experiment the checkpoint belongs to:\n  "
                         + "\n  ".join(refused) + "\nDrop them to continue it, or start a new run in another --out.")

TINY_STEPS = 20  # --model tiny from the command line: --steps and the file's `tiny` flags, unless typed (~1 min, CPU)

def start_run(args, ranges: dict, family: str | None = None, model: str | None = None, model_ids: dict | None = None,
              writes: bool = True, own=(), safe=(), tiny=None) -> str | None:
    """The run contract, before any model loads. Returns the checkpoint to resume from, or None.

    family/model: the diffusers family and --model (default args.model) to check; model_ids: {flag: id} of other
    models (transformers feature models, encoders; '' = none).
    writes=False: the run writes nothing to --out (evaluation, benchmark).
    own: names in --out this file may find from an earlier run and reuse (data shards); safe: more flags that may
    change on resume. tiny: {flag: value} for a `--model tiny` command line that does not type them (with --steps
    TINY_STEPS): a smoke run of about a minute."""
    _RUN.changes, _RUN.ckpt, tiny = {}, None, tiny or {}
    out, resume = args.out, getattr(args, "resume", "")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"argument --out: {out} is a file, not a directory")
    path = resolve_resume(resume, out)
    if path is not None:
        ckpt = read_checkpoint(path, mmap=True)
        _reconcile(args, ckpt["args"], path, safe)
        if writes and args.steps < ckpt["step"]:
            raise UsageError(f"argument --steps: {path} is at step {ckpt['step']}; --steps must be >= that to resume")
        print0(f"resuming {path} at step {ckpt['step']}" + (f"; changed: {_RUN.changes}" if _RUN.changes else ""))
        del ckpt
    if path is None and is_tiny(getattr(args, "model", "") or "") and hasattr(args, "_explicit"):
        smoke = {k: v for k, v in {"steps": min(args.steps, TINY_STEPS), **tiny}.items() if k not in args._explicit}
        for k, v in smoke.items():  # a command-line smoke run; a typed flag keeps its value
            setattr(args, k, v)
        print0("--model tiny smoke run: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in smoke.items()))
    check_args(args, ranges)
    require(not getattr(args, "offload", False) or getattr(args, "fsdp", False), "argument --offload: needs --fsdp")
    require(not (getattr(args, "fsdp", False) and getattr(args, "dtype", "") == "fp16"),
            "argument --fsdp: --dtype fp16 (a GradScaler) is untested with FSDP2 here; use bf16 (the CUDA default)")
    require(not (getattr(args, "fsdp", False) and getattr(args, "ema_decay", 0) > 0),
            "argument --ema-decay: not with --fsdp yet (an EMA copy of a sharded student is untested); use DDP")
    if writes and hasattr(args, "batch_size"):  # --batch-size is per GPU in every file
        world, accum = int(os.environ.get("WORLD_SIZE", 1)), getattr(args, "grad_accum", 1)
        print0(f"batch: {args.batch_size} per GPU x {accum} accumulated x {world} processes = "
               f"{args.batch_size * accum * world} per optimizer step")
    import fnmatch
    held = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else [])
                  if not any(fnmatch.fnmatch(n, p) for p in own))
    resuming_here = path is not None and os.path.dirname(os.path.abspath(path)) == os.path.abspath(out)
    rank0 = is_main()  # other ranks would see rank 0's first files; torchrun stops them
    if writes and rank0 and held and not resuming_here and not getattr(args, "overwrite", False) and resume != "auto":
        names = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        cont = "Continue that run with --resume latest, or pass" if hasattr(args, "resume") else "Pass"
        raise UsageError(f"argument --out: {out} already holds {names}. {cont} --overwrite to replace it, "
                         "or choose another --out")
    if getattr(args, "prompts", ""):
        read_prompts(args.prompts)
    if family is not None or model is not None:
        check_model(model or args.model or FAMILIES[family][2], family)
        if hasattr(args, "prompts"):
            check_prompt_source(args.prompts, [model or args.model or FAMILIES[family][2]])
    for flag, other in (model_ids or {}).items():
        if other:
            check_model(other, flag=flag)
    return path

def due(step: int, every: int, last: bool) -> bool:
    """Period flags: every `every` steps (0 = never), and always at the last step."""
    return last or (every > 0 and step % every == 0)

# ==== Logging: tqdm bar, metrics.jsonl, loss curves, image grids (rank 0 only).

class Logger:
    """metrics.jsonl, one JSON row per line. On resume it keeps the rows up to the checkpoint's step and adds one
    row naming the flags changed on resume; a torn last line (a kill mid-write) is dropped with a warning."""
    def __init__(self, out_dir: str, total: int, start: int = 0, enabled: bool = True, desc: str = "train"):
        from tqdm.auto import tqdm
        self.enabled, self.path = enabled, os.path.join(out_dir, "metrics.jsonl")
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            rows = self.read(self.path) if start > 0 else []  # on resume, forget what came after the checkpoint
            if start > 0 and _RUN.changes:
                rows.append({"step": start, "resume_changed": {k: list(v) for k, v in _RUN.changes.items()}})
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= start)
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True)

    @staticmethod
    def read(path: str) -> list:
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i < len(lines) - 1:
                    raise UsageError(f"{path}, line {i + 1}: not a JSON row ({e.msg}); fix or remove that line") from None
                import warnings
                warnings.warn(f"{path}: ignoring a torn last line (a kill mid-write?)", stacklevel=2)
        return rows

    def log(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"}, refresh=False)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()

def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    return __import__("matplotlib.pyplot").pyplot

def plot_curves(jsonl_path: str, png_path: str) -> None:
    """One subplot per logged scalar against step (rank 0 only)."""
    if not is_main():
        return
    plt = pyplot()
    rows = Logger.read(jsonl_path)
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))} - {"step"})
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), lw=1, marker="." if len(pts) < 20 else None)  # a lone point stays visible
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """images: (N, C, H, W) in [-1, 1], C = 1 or 3 (extra channels are dropped). Rows of `nrow`. Rank 0 writes."""
    if not is_main():
        return
    plt = pyplot()
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)[:, :3]
    n, rows = x.shape[0], math.ceil(x.shape[0] / nrow)
    fig, axes = plt.subplots(rows, nrow, figsize=(1.8 * nrow, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = x[i].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

# ==== Prompts

PROMPTS = [
    "a photo of a red fox sitting in fresh snow", "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table, studio lighting", "an astronaut riding a horse on the moon",
    "a cozy cabin in a pine forest at night, warm windows", "a close-up portrait of an old fisherman, film grain",
    "a city street in the rain with neon signs", "a vintage bicycle leaning against a yellow wall",
]

PROMPT_SOURCES = ("the papers' prompt sets: GAD evaluates on 1,000 MS-COCO captions (Table 3), CC12M captions "
                  "(Tables 7-9) and MS-COCO 30k (Table 12); DP-DMD trains on DiffusionDB prompts; ADM trains on JourneyDB "
                  "and evaluates on COCO 2014 captions (Table 1) and PartiPrompts (Table 6). README 'Evaluate' lists them")
PROMPTS_SYNTAX = ("FILE.txt (one prompt per line) | FILE.jsonl, .csv or .parquet with :COLUMN (default 'prompt') | "
                  "hf:OWNER/NAME[/CONFIG][@SPLIT][:COLUMN] (a hub dataset, default split 'train', column 'prompt') | "
                  "builtin (the 8 built-in prompts)")
_TABLE = re.compile(r"(?P<path>.+\.(?P<ext>jsonl|json|csv|parquet))(?::(?P<col>[^/:]+))?")
_HUB = re.compile(r"hf:(?P<id>[\w.-]+/[\w.-]+)(?:/(?P<config>[\w.-]+))?(?:@(?P<split>[\w.-]+))?(?::(?P<col>[\w. -]+))?")

def read_prompts(spec: str = "") -> list:
    """The prompt list `spec` names (PROMPTS_SYNTAX); '' or 'builtin': the built-in list. Bad input: UsageError."""
    if spec in ("", "builtin"):
        return list(PROMPTS)
    stamp = [os.stat(p).st_mtime_ns for p in {spec, spec.rsplit(":", 1)[0]} if os.path.isfile(p)]
    return list(_read_prompts(spec, tuple(stamp)))

@functools.lru_cache(maxsize=8)  # start_run checks the source, train() reads it: one read (a file edited since: reread)
def _read_prompts(spec: str, stamp: tuple) -> tuple:
    bad = lambda why: UsageError(f"argument --prompts: {spec}: {why} (syntax: {PROMPTS_SYNTAX})")
    if (hub := _HUB.fullmatch(spec)) or spec.startswith("hf:"):
        if hub is None:
            raise bad("not a hub dataset spec")
        import datasets
        try:
            table = datasets.load_dataset(hub["id"], hub["config"], split=hub["split"] or "train")
        except Exception as e:  # offline, unknown id, split or config: datasets' own message, shortened
            raise bad(f"datasets.load_dataset failed ({e.__class__.__name__}: {str(e).splitlines()[0][:300]}); "
                      "offline, download it elsewhere (hf download --repo-type dataset ID) and pass a local file") from None
        column, columns = hub["col"] or "prompt", table.column_names
    elif table := _TABLE.fullmatch(spec):
        import pandas
        path, column = table["path"], table["col"] or "prompt"
        read = {"jsonl": lambda p: pandas.read_json(p, lines=True), "json": pandas.read_json, "csv": pandas.read_csv,
                "parquet": pandas.read_parquet}[table["ext"]]
        try:
            table = read(path)
        except (OSError, ValueError) as e:
            raise bad(f"cannot read {path} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
        columns = list(table.columns)
    else:
        try:
            with open(spec, encoding="utf-8") as f:
                prompts = tuple(line.strip() for line in f if line.strip())
        except OSError as e:
            raise UsageError(f"argument --prompts: cannot read {spec} ({e.__class__.__name__}: {e.strerror})") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"argument --prompts: {spec} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        if not prompts:
            raise UsageError(f"argument --prompts: {spec} has no non-empty lines")
        return prompts
    if column not in columns:
        raise bad(f"no column '{column}'; columns: {', '.join(map(str, columns[:20]))}")
    prompts = tuple(str(p).strip() for p in table[column] if isinstance(p, str) and p.strip())
    if not prompts:
        raise bad(f"column '{column}' holds no non-empty text")
    return prompts

def check_prompt_source(prompts: str, models) -> None:
    """A real model (hub id or local directory) never falls back to the 8 built-in prompts silently: '' is refused,
    'builtin' says so explicitly. Built-in models (tiny, random) keep them."""
    real = [m for m in models if m and not is_builtin(m)]
    if not prompts and real:
        raise UsageError(f"argument --prompts: {real[0]} is a real model and no prompt set was given; the 8 built-in "
                         f"prompts are for tiny/random smoke runs. Pass one: {PROMPTS_SYNTAX}; {PROMPT_SOURCES}. "
                         "Pass --prompts builtin to use the 8 built-in prompts anyway")

# ==== Model loading. A family is a diffusers pipeline class plus the name of its denoiser.
# Real: DiffusionPipeline.from_pretrained(hub id or local dir). Tiny: the same pipeline class
# built from small configs (configs/tiny-<family>/) with random weights and offline tokenizers. Random: the same
# class at real size, from the real configs in configs/ (see _random_pipeline).

FAMILIES = {"sd21": ("StableDiffusionPipeline", "unet", "stabilityai/stable-diffusion-2-1-base"),
            "pixart": ("PixArtAlphaPipeline", "transformer", "PixArt-alpha/PixArt-XL-2-512x512"),
            "sana": ("SanaPipeline", "transformer", "Efficient-Large-Model/Sana_600M_512px_diffusers"),
            "sd3": ("StableDiffusion3Pipeline", "transformer", "stabilityai/stable-diffusion-3.5-medium"),
            "sdxl": ("StableDiffusionXLPipeline", "unet", "stabilityai/stable-diffusion-xl-base-1.0")}
_NO_BINNING = {"use_resolution_binning": False, "clean_caption": False}
PIPELINE_KWARGS = {"sd21": {}, "sd3": {}, "sdxl": {}, "pixart": _NO_BINNING, "sana": _NO_BINNING}  # for a stock __call__

def is_tiny(model: str) -> bool:
    return model == "tiny" or model.startswith("tiny-")

def _check_reachable(model_id: str, filename: str = "model_index.json", flag: str = "--model") -> None:
    """Fail within seconds, naming the id, when a hub id is neither cached nor downloadable."""
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(model_id, filename), str):
        return  # cached: from_pretrained will use it
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
            return
        except OSError as e:
            reason = f"the hub is unreachable ({e.__class__.__name__})"
    raise FileNotFoundError(f"Model '{model_id}' is not a local directory, not in the Hugging Face cache, and {reason}.\n"
                            f"Download it on a machine with network (hf download {model_id} --local-dir DIR)"
                            f" and pass {flag} DIR" + (", or pass --model tiny for the random-weight CPU model."
                                                        if flag == "--model" else "."))

def is_builtin(model: str) -> bool:
    """Names built here, not loaded: tiny / tiny-<family> (and random / random-<family>)."""
    return is_tiny(model) or model == "random" or model.startswith("random-")

def check_model(model: str, family: str | None = None, flag: str = "--model") -> None:
    """Before loading: a built-in name of the right family, an existing local directory (a pipeline of `family` by its
    model_index.json class name; otherwise a config.json), or a hub id that is cached or reachable (fails in seconds)."""
    if is_random(model):
        try:
            random_variant(family, model)
        except ValueError as e:
            raise UsageError(f"argument {flag}: {e}") from None
        return
    if is_builtin(model):
        named = model.split("-", 1)[1] if "-" in model else family
        if family and named != family:
            raise UsageError(f"argument {flag}: {model} is the {named} family, but this run trains {family}"
                             + (" (--family)" if named in FAMILIES else ""))
        return
    hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith((".", "~"))
    if not os.path.exists(model):
        if not hub_like:
            raise UsageError(f"argument {flag}: no such directory: {model}")
        try:
            _check_reachable(model, "model_index.json" if family else "config.json", flag)
        except FileNotFoundError as e:
            raise UsageError(f"argument {flag}: {e}") from None
        return
    if not os.path.isdir(model):
        raise UsageError(f"argument {flag}: {model} is a file; pass a directory (a saved pipeline or model)")
    index = os.path.join(model, "model_index.json" if family else "config.json")
    if not os.path.isfile(index):
        raise UsageError(f"argument {flag}: {model} has no {os.path.basename(index)}"
                         + (": not a diffusers pipeline directory" if family else ""))
    if family:
        with open(index) as f:
            cls_name = json.load(f).get("_class_name", "?")
        if cls_name != FAMILIES[family][0]:
            other = [k for k, v in FAMILIES.items() if v[0] == cls_name]
            raise UsageError(f"argument {flag}: {model} holds a {cls_name}" + (f" (the {other[0]} family)" if other else "")
                             + f"; this run needs a {FAMILIES[family][0]} ({family})")

def _check_tokenizers(pipe, model_id: str) -> None:
    """transformers returns a near-empty tokenizer (2-104 tokens) for an unreachable id. Refuse it."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is not None and len(tok) < 200:
            raise RuntimeError(f"{model_id}: {name} has only {len(tok)} tokens; the tokenizer did not load properly")

def load_pipeline(family: str, model: str, dtype: torch.dtype = torch.float32, device=None):
    """The family's diffusers pipeline, all parts in `dtype` and frozen in eval mode.

    `model`: 'tiny' / 'tiny-<family>' (small, random weights, offline), 'random' / 'random-<variant>' (real size,
    random weights, offline: see random_variant), a local directory, or a hub id.
    `device`: where the pipeline ends up; a random model is built there directly, so device='meta' gives the
    real-size architecture without memory (parameter counts, FLOP counting). Default: CPU.
    The method file copies the denoiser for its student and fake score and casts them to fp32.
    """
    import diffusers
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
    cls_name, denoiser, _ = FAMILIES[family]
    if is_tiny(model):
        with _own_rng():  # the same random weights every time; caller's RNG untouched
            pipe = _random_pipeline(family, "tiny-" + family)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    elif is_random(model):
        with _own_rng(), torch.device(device or "cpu"):
            pipe = _random_pipeline(family, random_variant(family, model))
    else:
        check_model(model, family)
        try:
            pipe = getattr(diffusers, cls_name).from_pretrained(model, dtype=dtype)
        except OSError as e:
            raise FileNotFoundError(f"could not load '{model}' as a {cls_name}: {e}\nPass --model /local/dir") from e
    _check_tokenizers(pipe, model)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            if getattr(m, "dtype", dtype) != dtype:  # diffusers 0.42 loads SD3's transformer in fp32 whatever dtype says
                m.to(dtype=dtype)
            m.eval().requires_grad_(False)
    pipe.denoiser_name = denoiser
    return pipe.to(device) if device is not None and not is_random(model) else pipe

def export_pipeline(pipe, student: torch.nn.Module, out_dir: str, scheduler=None, call: dict | None = None) -> str:
    """Save `pipe` with its denoiser replaced by `student` (and optionally a scheduler) so that
    `DiffusionPipeline.from_pretrained(out_dir)` loads the distilled model. `call`: the student's __call__ settings
    (num_inference_steps, guidance_scale, ...), written to call.json for evaluate.py. A LoRA student is merged into a
    stock denoiser, and its adapters are also written to <out_dir>/../lora for `pipe.load_lora_weights` (export_lora).
    Every rank calls it (an FSDP2 student's weights are gathered); rank 0 writes."""
    import copy
    if is_sharded(student):  # the architecture on the meta device, filled with the gathered weights
        weights = full_state_dict(student)
        if not is_main():
            return out_dir
        from torch.distributed.fsdp import FSDPModule
        cls = next(c for c in type(student).__mro__[1:] if not issubclass(c, FSDPModule))
        with torch.device("meta"):
            net = cls.from_config(student.config)
        net.load_state_dict(weights, assign=True)  # non-persistent buffers stay on meta: save_pretrained skips them
    elif not is_main():
        return out_dir
    else:
        net = copy.deepcopy(unwrap(student))
    components = dict(pipe.components)
    if has_lora(net):  # a stock model: W + (alpha/r) B A folded into W, the peft layers removed
        merge_lora(net)
    components[pipe.denoiser_name] = net.to(dtype=pipe.dtype) if net.dtype != pipe.dtype else net
    if scheduler is not None:
        components["scheduler"] = scheduler
    # atomic: written to a temporary directory, then renamed (a kill never leaves half a pipeline/)
    import shutil
    tmp, old = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}", f"{out_dir.rstrip(os.sep)}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    type(pipe)(**components).save_pretrained(tmp, safe_serialization=True)
    if call:
        with open(os.path.join(tmp, "call.json"), "w") as f:
            json.dump(call, f, indent=1)
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    if has_lora(student):
        export_lora(pipe, student, os.path.join(os.path.dirname(os.path.abspath(out_dir)), "lora"))
    return out_dir


# ==== LoRA (peft): adapters added to a diffusers denoiser with its own add_adapter (peft's LoraConfig), base frozen.
# Export: export_pipeline merges them (a stock pipeline); export_lora writes the file pipe.load_lora_weights reads.

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# the attention projections of every block (image stream; SD3's MMDiT also its text stream), as diffusers' LoRA
# training examples choose for UNets and SD3

def is_lora_target(name: str, targets=LORA_TARGETS) -> bool:
    """A module name that ends in one of `targets` (peft's matching of target_modules)."""
    return any(name == t or name.endswith("." + t) for t in targets)

def add_lora(net: torch.nn.Module, rank: int, targets=LORA_TARGETS) -> torch.nn.Module:
    """rank 0: `net` as it is (full fine-tuning). rank > 0: freeze `net` and add one LoRA adapter of that rank to the
    `targets` it has (lora_alpha = rank, so the update is B A; B starts at 0, so `net`'s output is unchanged). Only the
    adapter weights require grad afterwards: build optimisers from trainable(net)."""
    if rank == 0:
        return net
    from peft import LoraConfig
    names = [n for n, _ in net.named_modules()]
    present = [t for t in targets if any(is_lora_target(n, (t,)) for n in names)]
    net.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=present)
    with _own_rng():  # A's random init the same in every run and on every rank, the caller's RNG untouched
        torch.manual_seed(0)
        if hasattr(net, "add_adapter"):
            net.add_adapter(config)
        else:  # PixArt's transformer lacks diffusers' PeftAdapterMixin: peft's own injection, which add_adapter calls
            from peft import inject_adapter_in_model
            inject_adapter_in_model(config, net)
    return net

def trainable(net: torch.nn.Module) -> list:
    """The parameters an optimiser should hold: all of them, or only the LoRA adapters after add_lora."""
    return [p for p in unwrap(net).parameters() if p.requires_grad]

def has_lora(net: torch.nn.Module) -> bool:
    if not any("lora_" in n for n, _ in unwrap(net).named_parameters()):
        return False  # (no peft import for the full fine-tuning runs)
    from peft.tuners.tuners_utils import BaseTunerLayer
    return any(isinstance(m, BaseTunerLayer) for m in unwrap(net).modules())

def merge_lora(net: torch.nn.Module) -> torch.nn.Module:
    """In place: every peft LoRA layer merged into its base layer (W += (alpha/r) B A) and replaced by it."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, m in list(net.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge()
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent), leaf, m.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        net.__dict__.pop(attr, None)
    return net

def export_lora(pipe, student: torch.nn.Module, out_dir: str) -> str:
    """The student's LoRA weights (peft's get_peft_model_state_dict) written by the pipeline class's save_lora_weights,
    so that `pipe.load_lora_weights(out_dir)` on the base pipeline gives the student. Families whose pipeline has no
    LoRA loader (PixArt-alpha) get peft's state dict in the same file name."""
    from peft.utils import get_peft_model_state_dict
    net, cls, name = unwrap(student), type(pipe), pipe.denoiser_name
    if not hasattr(cls, "save_lora_weights"):  # peft's state dict as safetensors; reload: inject_adapter_in_model
        from safetensors.torch import save_file  # with the same LoraConfig, then set_peft_model_state_dict
        os.makedirs(out_dir, exist_ok=True)
        save_file(get_peft_model_state_dict(net), os.path.join(out_dir, "pytorch_lora_weights.safetensors"))
        return out_dir
    kw = {f"{name}_lora_layers": get_peft_model_state_dict(net)}
    if f"{name}_lora_adapter_metadata" in inspect.signature(cls.save_lora_weights).parameters:  # rank and alpha
        kw[f"{name}_lora_adapter_metadata"] = net.peft_config["default"].to_dict()
    cls.save_lora_weights(out_dir, **kw)
    return out_dir


# ==== Memory plan, printed on rank 0 before anything big loads (README "Fitting on a GPU"). Weights, gradients and
# AdamW states from the real-size configs' parameter counts (meta device); activations per sample calibrated on
# bench/gpu_cost.py's modelled peaks (notes/GPU_COST.md: (peak - static) / batch at the paper's batch, default GAD).
# Per (file, family): (random variant, teacher bytes/param, trainable copies, activation GiB/sample, --grad-ckpt
# factor on activations: dpdmd's and gad_ladd's are modelled, the others assumed 0.25).
MEMORY = {("gad_tdm", "pixart"): ("pixart", 4, 2, (161 - 29.5) / 64, 0.25),
          ("gad_sid", "sana"): ("sana", 4, 2, (53.2 - 25.9) / 8, 0.25),
          ("gad_ladd", "sd21"): ("sd21", 4, 1, (259 - 18.3) / 64, (82.6 - 18.3) / (259 - 18.3)),
          ("dpdmd", "sd3"): ("sd35m", 2, 2, (284 - 84.1) / 4, (97 - 84.1) / (284 - 84.1)),
          ("adm", "sd3"): ("sd3m", 2, 2, (133.5 - 77.0) / 4, 0.25)}
GIB = 2**30

@functools.lru_cache(maxsize=None)
def _counts(family: str, variant: str, rank: int) -> tuple:
    """(parameters, LoRA adapter parameters at `rank`) of the real-size denoiser, counted on the meta device."""
    net = random_denoiser(family, device="meta", model="random-" + variant)
    lora = sum(rank * (m.in_features + m.out_features) for n, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and is_lora_target(n))
    return sum(p.numel() for p in net.parameters()), lora

def memory_plan(args, file: str, family: str, world_size: int = 1) -> dict:
    """Expected peak GiB per GPU for these flags (read with getattr: --batch-size per GPU, --grad-ckpt, --fsdp,
    --offload, --lora-rank), text encoders off the GPU (cache_prompts). FSDP shards weights, gradients and states over
    the ranks; --offload keeps them on the CPU. LoRA: the student's base stays (fp32, frozen), 16 bytes per adapter
    parameter. --grad-accum changes no peak (one micro-batch at a time)."""
    variant, teacher_bytes, copies, act, ckpt = MEMORY[(file, family)]
    rank = max(getattr(args, "lora_rank", 0), 0)
    P, P_lora = _counts(family, variant, rank)
    trainable = copies * 16 * P if not rank else (copies - 1) * 16 * P + 4 * P + 16 * P_lora  # LoRA: student only
    shard = 0 if getattr(args, "offload", False) else 1 / world_size if getattr(args, "fsdp", False) else 1
    plan = {"weights_and_states": (teacher_bytes * P + trainable) * shard / GIB,
            "activations": act * getattr(args, "batch_size", 1) * (ckpt if getattr(args, "grad_ckpt", False) else 1)}
    plan["peak"] = sum(plan.values())
    return plan

def check_memory(args, file: str, family: str, world_size: int = 1, device_gib: float | None = None) -> dict | None:
    """Print the plan on rank 0 and raise UsageError, naming flags that fit, when it passes the device's memory
    (`device_gib`; default: torch.cuda.get_device_properties, no CUDA -> print only). Tiny models: nothing."""
    model = getattr(args, "model", "") or ""
    if is_tiny(model) or (file, family) not in MEMORY:
        return None
    if device_gib is None and torch.cuda.is_available():
        device_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    plan = memory_plan(args, file, family, world_size)
    print0(f"memory plan per GPU ({file}, batch {getattr(args, 'batch_size', 1)}, world {world_size}): "
           + ", ".join(f"{k} {v:.1f} GiB" for k, v in plan.items()) + (f" of {device_gib:.1f}" if device_gib else ""))
    if device_gib is None or plan["peak"] <= 0.97 * device_gib:
        return plan
    fits = [flags for flags, over in _fitting(args, world_size)
            if memory_plan(SimpleNamespace(**{**vars(args), **over}), file, family, world_size)["peak"] <= 0.97 * device_gib]
    raise UsageError(f"the memory plan ({plan['peak']:.0f} GiB per GPU) exceeds this GPU ({device_gib:.0f} GiB): "
                     + (f"add {' or '.join(fits[:3])}" if fits else "no flag combination fits; use more GPUs with --fsdp"))

def _fitting(args, world_size: int) -> list:
    """Candidate flag sets, least change first: gradient checkpointing; the same global batch in smaller micro-batches;
    LoRA; sharding."""
    b, out = getattr(args, "batch_size", 1), []
    out.append(("--grad-ckpt", {"grad_ckpt": True}))
    for m in (d for d in range(b - 1, 0, -1) if b % d == 0):
        out.append((f"--batch-size {m} --grad-accum {b // m}", {"batch_size": m, "grad_accum": b // m}))
    if hasattr(args, "lora_rank") and args.lora_rank == 0:
        out.append(("--lora-rank 64", {"lora_rank": 64}))
    if world_size > 1:
        out.append(("--fsdp", {"fsdp": True}))
    out.append(("--fsdp --offload --grad-ckpt", {"fsdp": True, "offload": True, "grad_ckpt": True}))
    return out


# Tiny tokenizers: byte-level alphabets, no download. Their sizes stay above the 200-token check.

def _bytes_alphabet() -> list:
    chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [c for c in range(256) if c not in chars]
    return [chr(c) for c in chars] + [chr(256 + i) for i in range(len(extra))]

def _tiny_clip_tokenizer():
    from transformers import CLIPTokenizer
    alphabet = _bytes_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"])}
    tok = CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tok.model_max_length = 77
    return tok

def _tiny_t5_tokenizer():
    from transformers import T5Tokenizer
    chars = [chr(c) for c in list(range(33, 127)) + list(range(161, 256))]
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + chars + ["▁" + c for c in chars]
    tok = T5Tokenizer(vocab=[(p, 0.0 if i < 4 else -float(i)) for i, p in enumerate(pieces)], extra_ids=0)
    tok.model_max_length = 512
    return tok

def _tiny_gemma_tokenizer():
    from transformers import GemmaTokenizer
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {c: i for i, c in enumerate(specials + ["▁"] + _bytes_alphabet())}
    tok = GemmaTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 4096  # SANA's instruction prefix alone is ~1000 characters
    return tok


# Tiny and random: each family's pipeline class, its components built from configs shipped as data in
# configs/<set>/ (<component>.json as on the hub; sources in configs/README.md) by diffusers' and transformers' own
# from-config initialisation: configs/tiny-<family>/ are small (CPU, seconds), the other sets the real sizes.
# Tokenizers: the tiny offline ones above (the real ones need a download); for a real-size set with the real
# model_max_length. Their ids (< 520) stay below every real vocabulary (CLIP 49408, T5 32128, Gemma 256000), so
# prompts encode, but into different token sequences than the real tokenizers would give.

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
RANDOM_VARIANTS = {"sd21": ("sd21",), "pixart": ("pixart",), "sana": ("sana",), "sd3": ("sd35m", "sd3m"),
                   "sdxl": ("sdxl",)}  # the first is the family's default (FAMILIES' hub id)
TINY = tuple(FAMILIES)  # every family has a tiny set, configs/tiny-<family>/
TEXT_MAX_LENGTH = {"pixart": 120, "sana": 300, "sd3": 256}  # T5 / Gemma lengths the pipelines use; CLIP keeps 77
_TINY_TOKENIZERS = {"CLIPTokenizer": _tiny_clip_tokenizer, "T5Tokenizer": _tiny_t5_tokenizer,
                    "GemmaTokenizer": _tiny_gemma_tokenizer}

def _own_rng():
    """Seeding inside leaves the caller's CPU and CUDA random streams as they were."""
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())))

def is_random(model: str) -> bool:
    return model == "random" or model.startswith("random-")

def random_variant(family: str, model: str) -> str:
    """The config set (a folder of configs/) that `model` names: 'random' and 'random-<family>' give the family's
    default (sd3: SD3.5-Medium, 'sd35m'); 'random-sd35m' / 'random-sd3m' choose SD3.5-Medium / SD3-Medium."""
    name = model.removeprefix("random").removeprefix("-") or family
    variants = RANDOM_VARIANTS[family]
    if name == family or name in variants:
        return variants[0] if name == family else name
    choices = ", ".join(["random", f"random-{family}"] + [f"random-{v}" for v in variants if v != family])
    raise ValueError(f"--model {model} is not a {family} model; choose one of: {choices}")

def _random_component(variant: str, component: str):
    """One component from configs/<variant>/<component>.json: diffusers classes by '_class_name', transformers
    models by 'architectures', each with its library's default initialisation."""
    import diffusers
    import transformers
    with open(os.path.join(CONFIGS, variant, component + ".json")) as f:
        cfg = json.load(f)
    torch.manual_seed(0)  # each component's weights do not depend on which were built before it
    if "_class_name" in cfg:
        cls = getattr(diffusers, cfg["_class_name"])
        if issubclass(cls, diffusers.SchedulerMixin):
            with torch.device("cpu"):  # tables, not weights: the pipeline's sampler reads them on the CPU
                return cls.from_config(cfg)
        return cls.from_config(cfg)
    cls = getattr(transformers, cfg["architectures"][0])
    return cls(cls.config_class.from_dict(cfg))

def _random_pipeline(family: str, variant: str):
    import diffusers
    cls = getattr(diffusers, FAMILIES[family][0])
    parts = {f[:-5]: _random_component(variant, f[:-5]) for f in sorted(os.listdir(os.path.join(CONFIGS, variant)))
             if f.endswith(".json")}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        kind = getattr(p.annotation, "__name__", str(p.annotation))
        if name.startswith("tokenizer"):
            parts[name] = _TINY_TOKENIZERS[kind]()
            if kind != "CLIPTokenizer" and not is_tiny(variant):
                parts[name].model_max_length = TEXT_MAX_LENGTH[family]
        elif name not in parts and name != "self" and p.default is inspect.Parameter.empty:
            parts[name] = None  # safety checker, feature extractor: not part of the model
    if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:
        parts["requires_safety_checker"] = False  # as in SD 2.1-base's model_index.json
    return cls(**parts)

def random_denoiser(family: str, device="cpu", dtype: torch.dtype = torch.float32, model: str = "random"):
    """Only the denoiser of `load_pipeline(family, model, device=device)` for a random `model`, with the same
    weights, in train mode with gradients on. Small enough for the CPU in fp32: pixart 0.61B, sana 0.59B, sd21
    0.87B parameters (building takes ~35-60 s there: the random initialisation is one RNG stream)."""
    variant = random_variant(family, model)
    with _own_rng(), torch.device(device):
        net = _random_component(variant, FAMILIES[family][1])
    return net if net.dtype == dtype else net.to(dtype=dtype)

# ==== Prompt encoding: the pipeline's own encode_prompt, returned as keyword arguments for the
# denoiser's forward (cond, uncond), so a method file calls `model(x, timestep=t, **cond)`.
# Text encoders off the GPU (T5-XXL alone is 4.7B parameters): cache_prompts encodes each distinct prompt of the
# training set once, keeps the rows on the CPU (pipe.prompt_cache) and moves the encoders to the CPU; encode is then a
# lookup. A prompt set whose embeddings would pass PROMPT_CACHE_GB (PixArt ~1 MB, SD3 ~2.7 MB per prompt in bf16:
# a million prompts would be terabytes) is not cached: its encoders stay on the GPU and encode each batch, as before.

PROMPT_CACHE_GB = 32  # CPU memory the cached embeddings may take per process

def cache_prompts(pipe, family: str, prompts: list, device, max_sequence_length: int = 0, batch: int = 16) -> bool:
    """Encode the distinct `prompts` once where the text encoders are (batches of `batch`), keep the embeddings on the
    CPU and move the encoders from `device` to the CPU. Returns False, changing nothing, when they would exceed
    PROMPT_CACHE_GB (sized on the first batch). Prompts not cached (evaluation sets) are encoded by `encode` on the
    CPU, once each, and cached too."""
    cache = getattr(pipe, "prompt_cache", None)  # kept from an earlier run on the same pipe (in-process tests)
    if cache is None or cache["msl"] != max_sequence_length:
        cache = {"msl": max_sequence_length, "rows": {}, "uncond": None}
    todo = [p for p in dict.fromkeys(prompts) if p not in cache["rows"]]
    for i in range(0, len(todo), batch):
        _fill_cache(pipe, family, todo[i:i + batch], cache, _encoder_device(pipe))
        if i == 0:
            per_prompt = sum(t.nbytes for t in _tensors(cache["rows"][todo[0]]))
            if per_prompt * len(todo) > PROMPT_CACHE_GB * 2**30:
                print0(f"prompt cache: {len(todo)} prompts x {per_prompt / 2**20:.2f} MiB > PROMPT_CACHE_GB = "
                       f"{PROMPT_CACHE_GB}: text encoders stay on {device} and encode every batch")
                return False
    pipe.prompt_cache = cache
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to("cpu")
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return True

def _encoder_device(pipe) -> torch.device:
    return next(pipe.text_encoder.parameters()).device

def _tensors(cond: dict) -> list:
    return [t for v in cond.values() for t in (_tensors(v) if isinstance(v, dict) else [v]) if torch.is_tensor(t)]

def _to(cond: dict, device) -> dict:
    return {k: _to(v, device) if isinstance(v, dict) else (v.to(device) if torch.is_tensor(v) else v) for k, v in cond.items()}

def _fill_cache(pipe, family: str, prompts: list, cache: dict, device) -> None:
    c, u = _encode(pipe, family, prompts, device, cache["msl"])
    for i, p in enumerate(prompts):
        cache["rows"][p] = _to(select(c, slice(i, i + 1)), "cpu")
    if cache["uncond"] is None:  # the empty prompt's row (SDXL: zeros), the same for every prompt
        cache["uncond"] = _to(select(u, slice(0, 1)), "cpu")

def encode(pipe, family: str, prompts: list, device, max_sequence_length: int = 0) -> tuple:
    """(cond, uncond) kwargs for the family's denoiser on `device`; uncond is the empty prompt. From the CPU cache of
    cache_prompts when the pipe has one (a prompt missing from it is encoded where the encoders now are, and added)."""
    cache = getattr(pipe, "prompt_cache", None)
    if cache is None or cache["msl"] != max_sequence_length:
        return _encode(pipe, family, prompts, device, max_sequence_length)
    todo = [p for p in dict.fromkeys(prompts) if p not in cache["rows"]]
    if todo:
        _fill_cache(pipe, family, todo, cache, _encoder_device(pipe))
    cond = cat(*[cache["rows"][p] for p in prompts])
    return _to(cond, device), _to(select(cache["uncond"], torch.zeros(len(prompts), dtype=torch.long)), device)

def _encode(pipe, family: str, prompts: list, device, max_sequence_length: int = 0) -> tuple:
    n = len(prompts)
    with torch.no_grad():
        if family == "sd21":
            c, u = pipe.encode_prompt(prompts, device, 1, True, [""] * n)
            return {"encoder_hidden_states": c}, {"encoder_hidden_states": u}
        if family in ("pixart", "sana"):
            kw = {"max_sequence_length": max_sequence_length or (120 if family == "pixart" else 300)}
            if family == "sana":  # the stock pipeline's instruction prefix for non-empty prompts
                sig = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"]
                kw["complex_human_instruction"] = sig.default
            c, cm, u, um = pipe.encode_prompt(prompts, True, negative_prompt="", device=device, clean_caption=False, **kw)
            extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}} if family == "pixart" else {}
            return ({"encoder_hidden_states": c, "encoder_attention_mask": cm, **extra},
                    {"encoder_hidden_states": u, "encoder_attention_mask": um, **extra})
        if family == "sd3":
            c, u, cp, up = pipe.encode_prompt(prompts, None, None, device=device, negative_prompt=[""] * n,
                                              max_sequence_length=max_sequence_length or 256)
            return ({"encoder_hidden_states": c, "pooled_projections": cp},
                    {"encoder_hidden_states": u, "pooled_projections": up})
        if family == "sdxl":
            c, u, cp, up = pipe.encode_prompt(prompts, device=device, negative_prompt=None)  # stock: zeros (force_zeros...)
            res = pipe.unet.config.sample_size * pipe.vae_scale_factor
            ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=c.dtype).repeat(n, 1)
            return ({"encoder_hidden_states": c, "added_cond_kwargs": {"text_embeds": cp, "time_ids": ids}},
                    {"encoder_hidden_states": u, "added_cond_kwargs": {"text_embeds": up, "time_ids": ids}})
    raise ValueError(family)

def select(cond: dict, idx) -> dict:
    """Index (or repeat, with an index tensor) every tensor in a nested kwargs dict along dim 0."""
    return {k: select(v, idx) if isinstance(v, dict) else (v[idx] if torch.is_tensor(v) else v) for k, v in cond.items()}

def cast(cond: dict, dtype: torch.dtype) -> dict:
    """Cast the floating-point tensors of a nested kwargs dict (embeddings, not masks) to `dtype`."""
    return {k: cast(v, dtype) if isinstance(v, dict) else (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in cond.items()}

def cat(*conds: dict) -> dict:
    """Concatenate kwargs dicts of the same structure along dim 0 (e.g. to batch cond with uncond)."""
    c0 = conds[0]
    join = lambda k, v: cat(*[c[k] for c in conds]) if isinstance(v, dict) else torch.cat([c[k] for c in conds])
    return {k: join(k, v) if isinstance(v, dict) or torch.is_tensor(v) else v for k, v in c0.items()}

def latent_shape(pipe, batch: int, resolution: int = 0) -> tuple:
    """(B, C, h, w) of the denoiser's latents at `resolution` pixels (default: the model's own size)."""
    net = getattr(pipe, pipe.denoiser_name)
    side = resolution // pipe.vae_scale_factor if resolution else net.config.sample_size
    return (batch, net.config.in_channels, side, side)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] with the pipeline's VAE (scaling and shift as the pipeline does)."""
    vae = pipe.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    return vae.decode(z).sample.float()

# ==== Forward-mode JVPs (GAD's losses; the metrics built on them are in evaluate.py)

class _CheapTangents(torch.overrides.TorchFunctionMode):
    """Forward-mode AD rules for the ops where PyTorch's own rules waste work, memory or go wrong. Active inside
    jvp_pair(); only ops whose inputs carry a tangent are rerouted, every other op keeps PyTorch's rule.
    - linear / conv2d: PyTorch's rule fills the frozen weight's missing tangent with zeros and multiplies it, one full
      GEMM too many (a JVP cost 3 GEMMs instead of 2). Here the tangent is one GEMM: W t_x.
    - scaled_dot_product_attention: the fused kernels have no forward-AD rule, and the math kernel materialises the
      N x N scores (at 4,096 tokens that is most of a GPU's memory and time). See _attention_jvp().
    - layer_norm / group_norm, when gradients are on: plain ops in fp32. PyTorch's layer_norm JVP is silently wrong
      under reverse mode (its mean/rstd carry no gradient, so back-propagating through the tangent drops
      d(mean)/dtheta). Without gradients PyTorch's own (fused) rule is kept."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        F, fwAD = torch.nn.functional, torch.autograd.forward_ad
        if func is F.scaled_dot_product_attention and not kwargs.get("dropout_p") and not kwargs.get("is_causal"):
            if any(fwAD.unpack_dual(a).tangent is not None for a in args[:3]):
                return _attention_jvp(*args, **kwargs)
        if func in (F.linear, F.conv2d, F.layer_norm, F.group_norm) and args:
            p, t = fwAD.unpack_dual(args[0])
            weights = list(args[1:]) + [kwargs.get("weight"), kwargs.get("bias")]
            if t is not None and all(fwAD.unpack_dual(w).tangent is None for w in weights if torch.is_tensor(w)):
                if func in (F.linear, F.conv2d):
                    out = func(p, *args[1:], **kwargs)
                    rest, kw = list(args[2:]), dict(kwargs)  # the tangent has no bias: W t_x
                    if rest:
                        rest[0] = None
                    else:
                        kw["bias"] = None
                    return fwAD.make_dual(out, func(t, args[1], *rest, **kw).to(out.dtype))
                if torch.is_grad_enabled():
                    return _plain_norm(func, args[0], *args[1:], **kwargs)
        return func(*args, **kwargs)


def _plain_norm(func, x, shape_or_groups, weight=None, bias=None, eps=1e-5):
    """layer_norm / group_norm from plain ops in fp32 (their autograd and forward-AD rules compose correctly).
    Returns fp32 under autocast (as autocast's own norms do), else the input's dtype."""
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if func is torch.nn.functional.layer_norm:
        dims = tuple(range(-len(shape_or_groups), 0))
        mu, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        y = (x - mu) * torch.rsqrt(var + eps)
        shape = (1,) * (x.ndim - len(shape_or_groups)) + tuple(shape_or_groups)
    else:
        g = x.view(x.shape[0], shape_or_groups, -1)
        mu, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
        y = ((g - mu) * torch.rsqrt(var + eps)).view_as(x)
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    y = y * weight.to(y.dtype).view(shape) if weight is not None else y
    return (y + bias.to(y.dtype).view(shape) if bias is not None else y).to(out_dtype)


ATTN_FD_EPS = {torch.float32: 3e-3, torch.float64: 1e-5}  # relative move of (q, k) in _attention_jvp's central
# difference: truncation ~eps^2, rounding ~(machine eps)/eps, about 1e-5 relative in fp32


def _attention_jvp(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """O = softmax(q k^T scale) v and its tangent from fused kernels only (no N x N matrix, in memory or traffic):
      t_O = SDPA(q, k, t_v)                                  exact, in the caller's precision (P t_v);
          + [SDPA32(q + e t_q, k + e t_k, v) - SDPA32(q - e t_q, k - e t_k, v)] / 2e     the (q, k) part, in fp32,
    e = ATTN_FD_EPS |(q, k)| / |(t_q, t_k)|. The (q, k) part has no fused exact form (it needs sum_j P_ij dS_ij v_j),
    so it is a central difference, but of one attention call in fp32 (float64 stays float64): never in half
    precision. Both parts are differentiable (reverse over forward)."""
    fwAD, sdpa = torch.autograd.forward_ad, torch.nn.functional.scaled_dot_product_attention
    (q, tq), (k, tk), (v, tv) = (fwAD.unpack_dual(a) for a in (q, k, v))
    kw = {"attn_mask": attn_mask, "scale": scale, **({"enable_gqa": True} if enable_gqa else {})}
    out = sdpa(q, k, v, **kw)
    tan = sdpa(q, k, tv, **kw) if tv is not None else torch.zeros_like(out)
    if tq is not None or tk is not None:
        tq = torch.zeros_like(q) if tq is None else tq
        tk = torch.zeros_like(k) if tk is None else tk
        with torch.autocast(q.device.type, enabled=False):
            dt = torch.promote_types(q.dtype, torch.float32)
            q32, k32, v32, tq32, tk32 = (a.to(dt) for a in (q, k, v, tq, tk))
            kw32 = {**kw, "attn_mask": attn_mask.to(dt) if attn_mask is not None and attn_mask.is_floating_point()
                    else attn_mask}
            rms = lambda a, b: (a.detach().pow(2).mean() + b.detach().pow(2).mean()).sqrt()
            e = ATTN_FD_EPS[dt] * rms(q32, k32) / rms(tq32, tk32).clamp_min(1e-30)
            d = (sdpa(q32 + e * tq32, k32 + e * tk32, v32, **kw32) - sdpa(q32 - e * tq32, k32 - e * tk32, v32, **kw32))
            d = d / (2 * e)
        tan = tan + d.to(tan.dtype)
    return fwAD.make_dual(out, tan)


def jvp_pair(f, x: torch.Tensor, v: torch.Tensor):
    """(f(x), J_f(x) v) in one forward with forward-mode AD, in whatever precision the caller runs f (e.g. bf16
    autocast: a tangent is computed in its own right, so unlike a finite difference it does not drown in rounding).
    Costs about 2x the GEMMs of f (see _CheapTangents), and per attention one more call in the caller's precision and
    two fp32 calls of the fused kernels (_attention_jvp; no N x N scores are materialised). With grad enabled, both
    outputs are differentiable w.r.t. f's parameters (reverse over forward), and d/dtheta of a loss on J v is
    correct: tests/test_common.py checks it against a float64 numerical derivative."""
    fwAD = torch.autograd.forward_ad
    with fwAD.dual_level(), _CheapTangents():
        out = fwAD.unpack_dual(f(fwAD.make_dual(x, v.to(x.dtype))))
    return out.primal, out.tangent


def jvp(f, z: torch.Tensor, v: torch.Tensor, mode: str = "exact", h: float = 1e-3) -> torch.Tensor:
    """J_f(z) v in fp32. 'exact': forward-mode AD (jvp_pair); 'fd': the central difference
    (f(z + h v) - f(z - h v)) / 2h for maps that forward AD cannot run."""
    z, v = z.float(), v.float()
    if mode == "fd":
        return (f(z + h * v).float() - f(z - h * v).float()) / (2 * h)
    return jvp_pair(lambda x: f(x).float(), z, v)[1]

def bench_hook(use_gad: bool) -> None:
    """Called by each GAD file at the start of every --bench step; bench/gpu_cost.py replaces it to count per step."""

class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """--bench on CPU, a stand-in for the allocator peak: inside `with`, .peak = the most bytes of storages saved for
    backward at once (weights of `modules` excluded; clear() between phases). Storages are keyed by address, since
    storage().data_ptr() raises for some views saved under forward-mode AD."""
    def __init__(self, *modules):
        self.addr = lambda t: t.data_ptr() - t.storage_offset() * t.element_size()
        self.params, self.saved, self.peak = {self.addr(p) for m in modules for p in m.parameters()}, {}, 0
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t):
        if self.addr(t) not in self.params:
            self.saved[self.addr(t)] = t.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(self.saved.values()))
        return t

# Teacher data in resumable shards (gad_ladd's pairs, adm's ADP pairs): shard s is made by the method file's
# make(s), from its own generator seeded by s, so it is the same whichever rank makes it, and whenever.

def shard_path(d: str, s: int) -> str:
    return os.path.join(d, f"shard_{s:05d}.pt")

def make_shards(d: str, n_shards: int, make, dist, desc: str) -> None:
    """Write the shards of `d` that are missing (a restart resumes), split across ranks, each atomically (a crash never
    leaves half a shard). Every rank calls it; it returns when all are written."""
    from tqdm.auto import tqdm
    os.makedirs(d, exist_ok=True)
    missing = [s for s in range(n_shards) if not os.path.exists(shard_path(d, s))]
    bar = tqdm(total=n_shards, initial=n_shards - len(missing), desc=desc, disable=not dist.is_main)
    for s in missing[dist.rank::dist.world_size]:
        torch.save(make(s), shard_path(d, s) + ".tmp")
        os.replace(shard_path(d, s) + ".tmp", shard_path(d, s))
        bar.update(dist.world_size)
    bar.close()
    barrier()

def load_shards(d: str, n_shards: int, hint: str = "", mmap: bool = False) -> list:
    """The shards of `d` (memory-mapped with mmap=True); a missing one is a FileNotFoundError naming how many."""
    missing = [s for s in range(n_shards) if not os.path.exists(shard_path(d, s))]
    if missing:
        raise FileNotFoundError(f"{d}: {len(missing)} of {n_shards} shards missing{hint}")
    return [torch.load(shard_path(d, s), map_location="cpu", mmap=mmap) for s in range(n_shards)]

def data_meta(d: str, meta: dict, write: bool = False) -> None:
    """A data cache's meta.json: written if absent (write=True), else its entries for `meta`'s keys must equal `meta`:
    data made with other settings are refused (ValueError naming the keys), never mixed in."""
    path = os.path.join(d, "meta.json")
    if write and not os.path.exists(path):
        with open(path, "w") as f:
            return json.dump(meta, f)
    with open(path) as f:
        old = json.load(f)
    bad = sorted(k for k, v in meta.items() if old.get(k) != v)
    if bad:
        raise ValueError(f"{d} holds data made with other settings ({bad}); pass another --data-dir or remake it")

def interleaved_bench(step_fn, pairs: int, device) -> dict:
    """--bench: `pairs` base and GAD steps, interleaved on the same models (step_fn(i, use_gad)), after 2 warm-up
    steps of each; medians of step time and, on CUDA, of per-step peak memory."""
    times, mems = {False: [], True: []}, {False: [], True: []}
    for i in range(2 * (pairs + 2)):
        use_gad = i % 2 == 1
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        bench_hook(use_gad)
        step_fn(i, use_gad)
        if device.type == "cuda":
            torch.cuda.synchronize()
            mems[use_gad].append(torch.cuda.max_memory_allocated())
        times[use_gad].append(time.perf_counter() - t0)
    med = lambda xs: sorted(xs[2:])[len(xs[2:]) // 2]  # noqa: E731
    out = {"step_time_base": med(times[False]), "step_time_gad": med(times[True])}
    out["time_ratio"] = out["step_time_gad"] / out["step_time_base"]
    if mems[True]:
        out.update(mem_base_gb=med(mems[False]) / 2**30, mem_gad_gb=med(mems[True]) / 2**30)
        out["mem_ratio"] = med(mems[True]) / med(mems[False])
    print0(" ".join(f"{k}={v:.4g}" for k, v in out.items()))
    return out

def check_finite(step: int, **losses) -> None:
    """Stop the run, naming the step and the term, when a loss is not finite (no silent NaN handling)."""
    for k, v in losses.items():
        if not torch.isfinite(torch.as_tensor(v)).all():
            kept = f"last checkpoint kept: {_RUN.ckpt[0]} at step {_RUN.ckpt[1]}" if _RUN.ckpt else "no checkpoint saved"
            raise FloatingPointError(f"step {step}: loss term '{k}' is {v}; stopping ({kept})")
