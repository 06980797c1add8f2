"""Plumbing shared by the method files: CLI, device and precision, seeding, distributed,
checkpoints, logging, model loading (real, tiny, and real-size random), pipeline export, shared metrics.

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

def print0(*a, **k) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)

def wrap_ddp(model: torch.nn.Module, dist) -> torch.nn.Module:
    if dist.world_size == 1:
        return model
    ids = [dist.local_rank] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model

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

def save_checkpoint(path: str, models: dict, optimizers: dict, step: int, args, scaler=None, extra=None) -> None:
    """Write to `path` via a temp file and an atomic rename: a crash never leaves half a file. Every rank calls it:
    FSDP2 shards are gathered (full_state_dict, optimizer states keyed by parameter name) and rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    owners = {k: _owner(o, models) for k, o in optimizers.items()}
    ckpt = {"models": {k: full_state_dict(m) for k, m in models.items()},
            "optimizers": {k: get_optimizer_state_dict(owners[k], o, options=full) if owners[k] else o.state_dict()
                           for k, o in optimizers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
            "args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args, "rng": _rng_state(), "extra": extra}
    if int(os.environ.get("RANK", 0)) != 0:
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

def load_checkpoint(path: str, models: dict, optimizers: dict, scaler=None, restore_rng: bool = True) -> dict:
    """Load state in place and return the checkpoint dict (its 'step' is the last finished step).
    Optimisers keep the learning rate they were built with: start_run has already reconciled it with the saved one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True)  # every rank reads the whole file (mmap) and keeps its shard
    ckpt = read_checkpoint(path, mmap=any(is_sharded(m) for m in models.values()))
    for k, m in models.items():
        sd = ckpt["models"][k]
        set_model_state_dict(m, sd, options=full) if is_sharded(m) else unwrap(m).load_state_dict(sd)
    for k, o in optimizers.items():
        lrs, owner, sd = [g["lr"] for g in o.param_groups], _owner(o, models), ckpt["optimizers"][k]
        set_optimizer_state_dict(owner, o, sd, options=full) if owner else o.load_state_dict(sd)
        for g, lr in zip(o.param_groups, lrs):  # an explicit --lr on resume applies for real
            g["lr"] = lr
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng:
        _set_rng_state(ckpt["rng"])
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            # the file holds rank 0's streams: derive one per rank from it (exact resume is single-process only)
            seed_everything(int(torch.randint(2**31, (1,))), torch_dist.get_rank())
    _RUN.ckpt = (path, ckpt["step"])
    return ckpt

# ==== The run contract, checked at the top of train() before any model loads (README "Runs and resume"):
#  1. every numeric flag in its range (UsageError naming the flag: exit code 2 from the command line);
#  2. the run directory: a fresh run never writes into a non-empty --out unless --overwrite;
#     --resume latest needs a checkpoint, --resume auto resumes one if present;
#  3. resume: flags the user did not type take the checkpoint's values; a typed flag that changes the experiment is
#     refused, a safe one (steps, periods, eval, lr) is applied and logged in metrics.jsonl;
#  4. prompts file and every model id (local dir of the right family, cached or reachable hub id) checked up front.

RANGES = {"steps": ">= 1", "batch_size": ">= 1", "*_every": ">= 0", "lr": "> 0", "lr_*": "> 0", "*_lr": "> 0",
          "seed": ">= 0", "seeds": ">= 1", "threads": ">= 0", "bench": ">= 0", "*_weight": ">= 0", "weight_decay": ">= 0",
          "grad_clip": "> 0", "clip": "> 0", "betas": "[0, 1)", "eval_seeds": ">= 2", "*_steps": ">= 1"}
RUN_LOCAL = ("out", "resume", "overwrite", "device", "threads", "bench")  # never compared, never taken from a checkpoint
SAFE_ON_RESUME = ("steps", "*_every", "eval", "eval_*", "export", "feature_model", "dtype", "grad_ckpt", "offload",
                  "lr", "lr_*", "*_lr")  # --fsdp is not: its optimizer states are keyed by name, DDP's by index

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

def start_run(args, ranges: dict, family: str | None = None, model: str | None = None, model_ids: dict | None = None,
              writes: bool = True, own=(), safe=()) -> str | None:
    """The run contract, before any model loads. Returns the checkpoint to resume from, or None.

    family/model: the diffusers family and --model (default args.model) to check; model_ids: {flag: id} of other
    models (transformers feature models, encoders; '' = none).
    writes=False: the run writes nothing to --out (evaluation, benchmark).
    own: names in --out this file may find from an earlier run and reuse (data shards); safe: more flags that may
    change on resume."""
    _RUN.changes, _RUN.ckpt = {}, None
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
    check_args(args, ranges)
    require(not getattr(args, "offload", False) or getattr(args, "fsdp", False), "argument --offload: needs --fsdp")
    require(not (getattr(args, "fsdp", False) and getattr(args, "dtype", "") == "fp16"),
            "argument --fsdp: --dtype fp16 (a GradScaler) is untested with FSDP2 here; use bf16 (the CUDA default)")
    if writes and hasattr(args, "batch_size"):  # --batch-size is per GPU in every file
        world, accum = int(os.environ.get("WORLD_SIZE", 1)), getattr(args, "grad_accum", 1)
        print0(f"batch: {args.batch_size} per GPU x {accum} accumulated x {world} processes = "
               f"{args.batch_size * accum * world} per optimizer step")
    import fnmatch
    held = sorted(n for n in (os.listdir(out) if os.path.isdir(out) else [])
                  if not any(fnmatch.fnmatch(n, p) for p in own))
    resuming_here = path is not None and os.path.dirname(os.path.abspath(path)) == os.path.abspath(out)
    rank0 = int(os.environ.get("RANK", 0)) == 0  # other ranks would see rank 0's first files; torchrun stops them
    if writes and rank0 and held and not resuming_here and not getattr(args, "overwrite", False) and resume != "auto":
        names = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        cont = "Continue that run with --resume latest, or pass" if hasattr(args, "resume") else "Pass"
        raise UsageError(f"argument --out: {out} already holds {names}. {cont} --overwrite to replace it, "
                         "or choose another --out")
    if getattr(args, "prompts", ""):
        read_prompts(args.prompts)
    if family is not None or model is not None:
        check_model(model or args.model or FAMILIES[family][2], family)
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
    if int(os.environ.get("RANK", 0)) != 0:
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
    if int(os.environ.get("RANK", 0)) != 0:
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

def read_prompts(path: str = "") -> list:
    """One prompt per line from `path`; the built-in list when `path` is empty."""
    if not path:
        return list(PROMPTS)
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UsageError(f"argument --prompts: cannot read {path} ({e.__class__.__name__}: {e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"argument --prompts: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not prompts:
        raise UsageError(f"argument --prompts: {path} has no non-empty lines")
    return prompts

# ==== Model loading. A family is a diffusers pipeline class plus the name of its denoiser.
# Real: DiffusionPipeline.from_pretrained(hub id or local dir). Tiny: the same pipeline class
# assembled from small configs with random weights and offline tokenizers. Random: the same class at real
# size, from the real configs in configs/ (below the tiny builders).

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
        with torch.random.fork_rng(devices=[]):  # the same random weights every time; caller's RNG untouched
            torch.manual_seed(0)
            pipe = TINY[family]()
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

def export_pipeline(pipe, student: torch.nn.Module, out_dir: str, scheduler=None) -> str:
    """Save `pipe` with its denoiser replaced by `student` (and optionally a scheduler) so that
    `DiffusionPipeline.from_pretrained(out_dir)` loads the distilled model. Every rank calls it (an FSDP2 student's
    weights are gathered); rank 0 writes."""
    import copy
    if is_sharded(student):  # the architecture on the meta device, filled with the gathered weights
        weights = full_state_dict(student)
        if int(os.environ.get("RANK", 0)) != 0:
            return out_dir
        from torch.distributed.fsdp import FSDPModule
        cls = next(c for c in type(student).__mro__[1:] if not issubclass(c, FSDPModule))
        with torch.device("meta"):
            net = cls.from_config(student.config)
        net.load_state_dict(weights, assign=True)  # non-persistent buffers stay on meta: save_pretrained skips them
    elif int(os.environ.get("RANK", 0)) != 0:
        return out_dir
    else:
        net = copy.deepcopy(unwrap(student))
    components = dict(pipe.components)
    components[pipe.denoiser_name] = net.to(dtype=pipe.dtype) if net.dtype != pipe.dtype else net
    if scheduler is not None:
        components["scheduler"] = scheduler
    # atomic: written to a temporary directory, then renamed (a kill never leaves half a pipeline/)
    import shutil
    tmp, old = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}", f"{out_dir.rstrip(os.sep)}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    type(pipe)(**components).save_pretrained(tmp, safe_serialization=True)
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


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

def _clip(tok, hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=2 * hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

def _t5(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id))

def _vae_kl(shift_factor=None):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=128, shift_factor=shift_factor)

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

def _tiny_unet(**extra):
    from diffusers import UNet2DConditionModel
    cfg = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
               norm_num_groups=8)
    return UNet2DConditionModel(**{**cfg, **extra})

def _tiny_sd21():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    tok = _tiny_clip_tokenizer()
    sched = DDIMScheduler.from_config({**SD_BETAS, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                                       "prediction_type": "epsilon"})
    return StableDiffusionPipeline(vae=_vae_kl(), text_encoder=_clip(tok, 32), tokenizer=tok, unet=_tiny_unet(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

def _tiny_pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    tok = _tiny_t5_tokenizer()
    tr = PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                                  caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=24,
                                  attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    sched = DPMSolverMultistepScheduler.from_config({"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                                     "beta_schedule": "linear", "prediction_type": "epsilon"})
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=_t5(tok), vae=_vae_kl(), transformer=tr, scheduler=sched)

def _tiny_sana():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model
    tok = _tiny_gemma_tokenizer()
    te = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0))
    tr = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                                attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                cross_attention_dim=16, caption_channels=32, sample_size=16)
    both = lambda **kw: {f"{side}_{k}": v for k, v in kw.items() for side in ("encoder", "decoder")}
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, upsample_block_type="interpolate",
                        downsample_block_type="conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        **both(block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), block_out_channels=(8, 16, 16),
                               layers_per_block=(1, 1, 1), qkv_multiscales=((), (), (5,))))
    sched = FlowMatchEulerDiscreteScheduler.from_config({"num_train_timesteps": 1000, "shift": 3.0})
    return SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)

def _tiny_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    tok, tok3 = _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                               attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                               caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                               qk_norm="rms_norm", dual_attention_layers=(0,))
    sched = FlowMatchEulerDiscreteScheduler.from_config({"num_train_timesteps": 1000, "shift": 3.0})
    return StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=_vae_kl(shift_factor=0.0),
                                    text_encoder=_clip(tok, 16, True), tokenizer=tok, text_encoder_2=_clip(tok, 16, True),
                                    tokenizer_2=_tiny_clip_tokenizer(), text_encoder_3=_t5(tok3, 32), tokenizer_3=tok3)

def _tiny_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    tok = _tiny_clip_tokenizer()
    te, te2 = _clip(tok, 32), _clip(tok, 32, True)  # cross-attention width 32 + 32, pooled projection 64
    unet = _tiny_unet(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + te2.config.projection_dim)
    sched = EulerDiscreteScheduler.from_config({**SD_BETAS, "steps_offset": 1, "timestep_spacing": "leading",
                                                "prediction_type": "epsilon"})
    return StableDiffusionXLPipeline(vae=_vae_kl(), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=_tiny_clip_tokenizer(), unet=unet, scheduler=sched)

TINY = {"sd21": _tiny_sd21, "pixart": _tiny_pixart, "sana": _tiny_sana, "sd3": _tiny_sd3, "sdxl": _tiny_sdxl}

# Random: each family's real architecture, built from the real configs shipped as data in configs/<variant>/
# (<component>.json as on the hub; sources in configs/README.md) by diffusers' and transformers' own from-config
# initialisation. Tokenizers: the tiny offline ones above (the real ones need a download) with the real
# model_max_length; their ids (< 520) stay below every real vocabulary (CLIP 49408, T5 32128, Gemma 256000),
# so prompts encode, but into different token sequences than the real tokenizers would give.

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
RANDOM_VARIANTS = {"sd21": ("sd21",), "pixart": ("pixart",), "sana": ("sana",), "sd3": ("sd35m", "sd3m"),
                   "sdxl": ("sdxl",)}  # the first is the family's default (FAMILIES' hub id)
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
            if kind != "CLIPTokenizer":
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

def encode(pipe, family: str, prompts: list, device, max_sequence_length: int = 0) -> tuple:
    """(cond, uncond) kwargs for the family's denoiser; uncond is the empty prompt."""
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

# ==== Shared metrics

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

def _power_spectrum(r: torch.Tensor) -> torch.Tensor:
    """Normalised power spectrum per sample: fft2 over (H, W) summed over channels for images,
    rfft over the flattened features otherwise."""
    p = torch.fft.fft2(r).abs().pow(2).sum(1).flatten(1) if r.ndim == 4 else torch.fft.rfft(r.flatten(1)).abs().pow(2)
    return p / p.sum(1, keepdim=True).clamp_min(1e-30)

def geometry_metrics(phi_s, phi_t, z: torch.Tensor, n_dirs: int = 4, seed: int = 0, mode: str = "exact",
                     h: float = 1e-3) -> dict:
    """Geometric alignment of a student map phi_s against a teacher map phi_t at inputs z (GAD Table 1).

    For each input z_i and random direction v ~ N(0, I) (seeded), with r_S = J_S v, r_T = J_T v:
      jvp_cos          mean cos(r_S, r_T)                                  1 = same directions
      jac_norm_ratio   mean ||r_S|| / ||r_T||                              1 = same stretching
      jac_norm_ratio_top10  the same over the 10% of (z, v) with largest ||r_T|| (where shortcuts hide)
      spectral_kl      mean KL(P_T || P_S) of normalised power spectra     0 = same frequency content
      jvp_mse          mean over elements of (r_S - r_T)^2                 0 = identical JVPs
    Exact JVPs by default (forward-mode AD in fp32); mode='fd' uses central differences.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    cos, ratio, kl, mse, norm_t = [], [], [], [], []
    for _ in range(n_dirs):
        v = torch.randn(z.shape, generator=g).to(z.device)
        rs, rt = jvp(phi_s, z, v, mode, h).flatten(1), jvp(phi_t, z, v, mode, h).flatten(1)
        cos.append(torch.nn.functional.cosine_similarity(rs, rt, dim=1))
        norm_t.append(rt.norm(dim=1))
        ratio.append(rs.norm(dim=1) / norm_t[-1].clamp_min(1e-30))
        ps, pt = _power_spectrum(rs.view_as(z)), _power_spectrum(rt.view_as(z))
        kl.append((pt * (pt.clamp_min(1e-30).log() - ps.clamp_min(1e-30).log())).sum(1))
        mse.append((rs - rt).pow(2).mean(1))
    ratio, norm_t = torch.cat(ratio), torch.cat(norm_t)
    top = norm_t >= torch.quantile(norm_t, 0.9)
    return {"jvp_cos": torch.cat(cos).mean().item(), "jac_norm_ratio": ratio.mean().item(),
            "jac_norm_ratio_top10": ratio[top].mean().item(), "spectral_kl": torch.cat(kl).mean().item(),
            "jvp_mse": torch.cat(mse).mean().item()}

def diversity(features: torch.Tensor) -> float:
    """DP-DMD Eq. 9: features (P prompts, N seeds, D) -> mean over prompts of
    1 - mean pairwise cosine similarity between the N L2-normalised features (pairs i != j)."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"diversity needs features of shape (P, N >= 2, D), got {tuple(features.shape)}")
    f = torch.nn.functional.normalize(features.float().flatten(2), dim=-1)
    sim, n = f @ f.transpose(1, 2), f.shape[1]
    mean_offdiag = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))
    return (1 - mean_offdiag).mean().item()

def bench_hook(use_gad: bool) -> None:
    """Called by each GAD file at the start of every --bench step; bench/gpu_cost.py replaces it to count per step."""

def check_finite(step: int, **losses) -> None:
    """Stop the run, naming the step and the term, when a loss is not finite (no silent NaN handling)."""
    for k, v in losses.items():
        if not torch.isfinite(torch.as_tensor(v)).all():
            kept = f"last checkpoint kept: {_RUN.ckpt[0]} at step {_RUN.ckpt[1]}" if _RUN.ckpt else "no checkpoint saved"
            raise FloatingPointError(f"step {step}: loss term '{k}' is {v}; stopping ({kept})")
