"""A cost model of one base step and one GAD step on an H200, traced from the method files' own --bench steps.

Each GAD file's `train(Args(..., bench=N))` runs on the meta device (no data, no allocation: shapes only) at its
real size and at the paper's per-GPU batch (GAD Table 11: PixArt/TDM 64, SANA/SiD 8, SD2.1/LADD 64), inside
CostMode below, which:
  - counts the FLOPs of every matmul, convolution and fused attention kernel with torch.utils.flop_counter's
    flop_registry, by the compute dtype the op sees: bf16/fp16, TF32 (fp32 with torch.backends.cuda.matmul /
    cudnn.allow_tf32 on), fp32 (TF32 off), and fused attention (flash in bf16, memory-efficient kernel in fp32);
  - counts the bytes read and written by every other (memory-bound) op, priced separately at HBM bandwidth;
  - tracks the bytes of live meta storages (weights, gradients, optimizer states, activations, tangents) and
    their peak within each step: the peak-memory model;
  - answers the few data-dependent reads of a meta tensor (`.item()`, `bool()`: aten._local_scalar_dense) with a
    plausible value (True for bool, 1 for numbers), and copies out of meta (`.cpu()`, used to cache embeddings)
    with zeros. Nothing the step computes is a number: only shapes, dtypes and which ops run.
The files' calls of `common.bench_hook(use_gad)` (called at the start of every bench step) reset the counts per step.

Meta has no autocast and no fused attention, so MetaCuda emulates what CUDA would do:
  - torch.autocast('meta', dtype) casts the inputs of CUDA autocast's lower-precision ops (linear, conv, matmul,
    bmm, SDPA, ...) to `dtype` and those of its fp32 ops (layer_norm, group_norm, softmax, losses, ...) to fp32, at
    the torch-function level (above autograd, so saved tensors and backward GEMMs get the right dtype), with
    autocast's cache of cast trainable weights (cleared when the outermost autocast exits);
  - F.scaled_dot_product_attention runs the memory-efficient kernel's op (shapes and FLOPs of the fused kernels,
    no N x N matrix), unless the math backend is forced (sdpa_kernel(MATH), as the forward-mode JVPs do) or an
    input carries a forward-AD tangent: then the math decomposition (bmm + softmax) runs, as it would on CUDA.

Prices (effective TFLOP/s on one H200; peak x utilisation): see RATES. Elementwise and normalisation ops are not
FLOPs here; their bytes are priced at HBM_TBS (reported separately: "+mem" columns). Peak memory is the live bytes
of meta storages: no allocator rounding or fragmentation, no cuBLAS/cuDNN workspaces, no CUDA context (~0.5 GiB),
and the optimizer runs its per-tensor loop (on CUDA the foreach AdamW holds one more fp32 copy of the parameters).

Usage (from the repository root):
  python bench/gpu_cost.py                            # real-size random models on meta, all files and configs
  python bench/gpu_cost.py --model tiny --batch 2     # the same machinery on the tiny models (tests)
Configs: base = the file with --gad-weight 0; (a) fd: fp32 finite differences, TF32 off (the old default);
(b) exact-bf16: forward-mode JVP in bf16 autocast; (c) exact-fp32: forward-mode JVP in fp32. A config the file's
Args cannot express is reported as n/a.
"""
import argparse
import contextlib
import dataclasses
import gc
import importlib
import inspect
import os
import statistics
import sys
import tempfile
import time
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_flop_count, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

aten = torch.ops.aten

# ==== H200 prices (effective TFLOP/s = dense peak x utilisation) and HBM bandwidth
RATES = {"bf16": 790 * 0.5,  # bf16/fp16 tensor cores: 395
         "tf32": 400 * 0.5,  # TF32 tensor cores: 200
         "fp32": 67 * 0.7,  # fp32 without TF32 (CUDA cores): ~47
         "attn_bf16": 790 * 0.5,  # flash attention in bf16/fp16: 395
         "attn_fp32": 67,  # memory-efficient attention in fp32 (computed as 3xTF32; allow_tf32 does not change it)
         "fp64": 67 * 0.7}  # fp64 tensor cores (not expected in a training step)
HBM_TBS = 4.8 * 0.7  # memory-bound ops: HBM3e 4.8 TB/s x 0.7

# ==== which file, which batch, which GAD configurations
FILES = {"tdm": ("gad_tdm", "pixart", 64), "sid": ("gad_sid", "sana", 8), "ladd": ("gad_ladd", "sd21", 64)}
CONFIGS = {"a": ("fd fp32 (TF32 off)", dict(gad_jvp="fd", gad_fp32=True)),
           "b": ("exact JVP bf16", dict(gad_jvp="exact", gad_fp32=False)),
           "c": ("exact JVP fp32", dict(gad_jvp="exact", gad_fp32=True))}


def overrides(mod, config: str | None) -> dict | str:
    """The Args fields that select `config` in module `mod`, or why the file cannot express it."""
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    flags = dict(CONFIGS[config][1]) if config else {}
    missing = [k for k in flags if k not in fields]
    return f"{mod.__name__} has no --{missing[0].replace('_', '-')}" if missing else flags


# ==== CUDA behaviour on the meta device: autocast and fused attention

LOWER = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "matmul",
         "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv", "chain_matmul",
         "multi_dot", "prelu", "scaled_dot_product_attention", "einsum"}
FP32 = {"layer_norm", "group_norm", "softmax", "log_softmax", "softmin", "softplus", "mse_loss", "l1_loss",
        "smooth_l1_loss", "huber_loss", "cross_entropy", "nll_loss", "kl_div", "binary_cross_entropy_with_logits",
        "norm", "normalize", "cosine_similarity", "cdist", "cumsum", "cumprod", "prod", "exp", "expm1", "log",
        "log1p", "log2", "log10", "pow", "__pow__", "__rpow__", "rsqrt", "reciprocal", "erfinv", "sum", "acos",
        "asin", "cosh", "sinh", "tan", "__rdiv__", "__rtruediv__"}


class MetaCuda(TorchFunctionMode):
    """torch.autocast('meta') with CUDA autocast's op lists, and fused SDPA, for tensors on the meta device."""

    def __init__(self):
        super().__init__()
        self.stack, self.cache = [(False, torch.float16)], {}

    def push(self, enabled: bool, dtype):
        self.stack.append((enabled, dtype))

    def pop(self):
        self.stack.pop()
        if len(self.stack) == 1:  # torch.autocast clears its weight cache when the outermost region exits
            self.cache.clear()

    def _cast(self, x, dtype, cache: bool):
        if not (torch.is_tensor(x) and x.is_floating_point() and x.device.type == "meta") or x.dtype == dtype:
            return x
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return x
        if cache and x.is_leaf and x.requires_grad and x.dtype == torch.float32:  # autocast's cached weight casts
            key = (id(x), dtype)
            if key not in self.cache:
                self.cache[key] = (x, x.to(dtype))  # keep x alive so the id stays unique
            return self.cache[key][1]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        enabled, dtype = self.stack[-1]
        name = getattr(func, "__name__", "")
        if enabled and name in LOWER:
            args, kwargs = mapped(lambda x: self._cast(x, dtype, True), (args, kwargs))
        elif enabled and name in FP32:
            args, kwargs = mapped(lambda x: self._cast(x, torch.float32, False) if isinstance(x, torch.Tensor)
                                  and x.dtype in (torch.float16, torch.bfloat16) else x, (args, kwargs))
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "meta":
            return fused_sdpa(func, *args, **kwargs)
        return func(*args, **kwargs)


def mapped(fn, x):
    """fn applied to the leaves of nested lists, tuples and dicts (torch's pytree is slow on this hot path)."""
    if isinstance(x, (list, tuple)):
        return type(x)(mapped(fn, y) for y in x) if type(x) in (list, tuple) else x
    if isinstance(x, dict):
        return {k: mapped(fn, y) for k, y in x.items()}
    return fn(x)


def fused_sdpa(func, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What CUDA runs for SDPA: a fused kernel (flash for half precision without a mask, memory-efficient otherwise;
    the same FLOPs, no N x N matrix), or the math decomposition when only MATH is enabled or a tangent is present."""
    fwAD = torch.autograd.forward_ad
    fused_ok = torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
    if not fused_ok or enable_gqa or any(fwAD.unpack_dual(t).tangent is not None for t in (q, k, v)):
        return func(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    bias = None
    if attn_mask is not None:  # a boolean mask becomes an additive bias; only its shape matters here
        bias = attn_mask if attn_mask.is_floating_point() else torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.to(q.dtype).expand(*q.shape[:-2], q.shape[-2], k.shape[-2])
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return aten._scaled_dot_product_efficient_attention(q, k, v, bias, need_lse, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def meta_autocast_patch(emu: MetaCuda):
    """Route torch.autocast('meta', ...), torch.is_autocast_enabled('meta') and torch.get_autocast_dtype('meta') to
    the emulator; every other device type keeps the real ones."""
    real = torch.autocast

    class autocast:  # noqa: N801 (stands in for torch.autocast)
        def __new__(cls, device_type, dtype=None, enabled=True, cache_enabled=None):
            if device_type != "meta":
                return real(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
            return super().__new__(cls)

        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            self.state = (enabled, dtype or torch.float16)  # CUDA autocast's default dtype is fp16

        def __enter__(self):
            emu.push(*self.state)

        def __exit__(self, *exc):
            emu.pop()

    real_enabled, real_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    torch.autocast = autocast
    torch.is_autocast_enabled = lambda *a: emu.stack[-1][0] if a and str(a[0]) == "meta" else real_enabled(*a)
    torch.get_autocast_dtype = lambda d: emu.stack[-1][1] if str(d) == "meta" else real_dtype(d)
    try:
        yield
    finally:
        torch.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype = real, real_enabled, real_dtype


# ==== counting FLOPs, bytes and live memory

CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: False,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: True}  # not in flop_registry: by hand
TF32_DEFAULTS = (False, True)  # torch's defaults for torch.backends.cuda.matmul / cudnn.allow_tf32
LAYOUTS = {}  # meta output layouts by (op, input layouts, arguments), shared by every CostMode in the process
SCALAR = {torch.bool: True}  # a plausible answer to .item() / bool() on meta: True, 1 or 1.0


class CostMode(TorchDispatchMode):
    """FLOPs by compute class, bytes of memory-bound ops, and live/peak bytes of `device` storages, per step."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device, self.storages, self.tracked, self.live_bytes, self.peak = device, {}, {}, 0, 0
        self.flops, self.bytes, self.scalar_reads = Counter(), 0, Counter()
        self.steps, self.current, self.scanned = [], None, False
        self.cacheable, self.layouts, self.n_ops, self.t0, self.verbose = {}, LAYOUTS, 0, time.perf_counter(), False

    # --- live memory: every tensor an op returns holds its storage; a storage is freed when the last of its tensors
    # is (weakref.finalize; a tensor kept only by autograd keeps its Python object too: PyObject preservation)
    def _add(self, t: torch.Tensor):
        if t.device.type != self.device or t.is_sparse or id(t) in self.tracked:
            return
        s = t.untyped_storage()
        key = s._cdata
        if key not in self.storages:
            self.storages[key] = [s.nbytes(), 0]
            self.live_bytes += s.nbytes()
            self.peak = max(self.peak, self.live_bytes)
        self.storages[key][1] += 1
        fin = weakref.finalize(t, self._release, id(t), key)
        fin.atexit = False
        self.tracked[id(t)] = fin

    def _release(self, tid: int, key: int):
        del self.tracked[tid]
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.storages[key]

    def scan(self):
        """Register device tensors that exist outside any op we saw (e.g. made before the mode was entered)."""
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)  # isinstance() touches deprecated module attributes
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == self.device:
                self._add(obj)

    # --- per-step records (the method file's bench_hook calls begin())
    def begin(self, use_gad: bool):
        self.end()
        if self.verbose:
            print(f"  step {len(self.steps)} ({'GAD' if use_gad else 'base'}) at {time.perf_counter() - self.t0:.0f} s,"
                  f" {self.n_ops} ops so far, {len(self.layouts)} cached layouts", file=sys.stderr, flush=True)
        if not self.scanned:
            self.scan()
            self.scanned = True
        self.peak, self.flops, self.bytes = self.live_bytes, Counter(), 0
        self.current = {"gad": use_gad, "start_bytes": self.live_bytes}

    def end(self):
        if self.current is not None:
            self.current.update(flops=dict(self.flops), bytes=self.bytes, peak=max(self.peak, self.live_bytes))
            self.steps.append(self.current)
            self.current = None

    # --- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, self.n_ops = kwargs or {}, self.n_ops + 1
        ins = leaves((args, kwargs))
        first = next((a for a in ins if isinstance(a, torch.Tensor)), None)
        on_meta = first is not None and first.device.type == "meta"
        if func is aten._local_scalar_dense.default and on_meta:
            self.scalar_reads[str(first.dtype)] += 1
            return SCALAR.get(first.dtype, 1.0 if first.is_floating_point() else 1)
        if func is aten._to_copy.default and on_meta and kwargs.get("device") not in (None, torch.device("meta")):
            return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype, device=kwargs["device"])
        out = self._run(func, args, kwargs, ins) if on_meta else func(*args, **kwargs)
        outs = [out] if isinstance(out, torch.Tensor) else leaves(out)
        self._count(func, args, kwargs, out, first, ins, outs)
        for t in outs:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    # --- speed: meta kernels are often Python decompositions (~0.1-5 ms per op). A functional op's meta output
    # depends only on its inputs' shapes, strides and dtypes and its other arguments, so repeats (the same block
    # in every layer) are answered from a cache of output layouts. Views, in-place and out= ops always run.
    def _run(self, func, args, kwargs, ins):
        if func not in self.cacheable:
            self.cacheable[func] = all(r.alias_info is None for r in func._schema.returns)
        if not self.cacheable[func]:
            return func(*args, **kwargs)
        key = (func, *[(x.shape, x.stride(), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else
                       (type(x), x if isinstance(x, (int, float, bool, str, type(None))) else str(x))
                       for x in ins])
        layout = self.layouts.get(key)
        if layout is None:
            out = func(*args, **kwargs)
            outs = [out] if isinstance(out, torch.Tensor) else out
            if isinstance(outs, (tuple, list)) and all(isinstance(t, torch.Tensor) and t.device.type == "meta"
                                                        for t in outs):
                self.layouts[key] = (isinstance(out, torch.Tensor), [(t.shape, t.stride(), t.dtype) for t in outs])
            return out
        single, outs = layout
        outs = [torch.empty_strided(sh, st, dtype=dt, device="meta") for sh, st, dt in outs]
        return outs[0] if single else tuple(outs)

    def _count(self, func, args, kwargs, out, first, ins, outs):
        packet = func._overloadpacket
        if packet is aten.convolution_backward and args[9] != 1:  # grouped: the registry's weight-gradient count
            grad_out, x, w, mask = args[0], args[1], args[2], args[10]  # ignores groups (SANA's depthwise convs:
            n = conv_flop_count(x.shape, w.shape, grad_out.shape, args[7]) * (mask[0] + mask[1])  # 16x a forward)
        elif packet in flop_registry:
            n = flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet in CPU_SDPA:
            q, k, v = args[1:4] if CPU_SDPA[packet] else args[:3]
            n = sdpa_backward_flop_count(args[0].shape, q.shape, k.shape, v.shape) if CPU_SDPA[packet] else \
                sdpa_flop_count(q.shape, k.shape, v.shape)
        else:
            if not func.is_view and first is not None:
                self.bytes += sum(t.numel() * t.element_size() for t in ins + outs if isinstance(t, torch.Tensor))
            return
        self.flops[compute_class(packet, first.dtype)] += n


def leaves(x, acc=None) -> list:
    """The leaves of nested lists, tuples and dicts (torch's pytree is too slow for every dispatched op)."""
    acc = [] if acc is None else acc
    if isinstance(x, (list, tuple)):
        for y in x:
            leaves(y, acc)
    elif isinstance(x, dict):
        for y in x.values():
            leaves(y, acc)
    else:
        acc.append(x)
    return acc


def compute_class(packet, dtype) -> str:
    name = str(packet)
    if "attention" in name:
        return "attn_fp32" if dtype == torch.float32 else "attn_bf16"
    if dtype in (torch.float16, torch.bfloat16):
        return "bf16"
    if dtype == torch.float64:
        return "fp64"
    tf32 = torch.backends.cudnn.allow_tf32 if "conv" in name else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "fp32"


def seconds(rec: dict, with_memory_bound: bool) -> float:
    t = sum(n / (RATES[c] * 1e12) for c, n in rec["flops"].items())
    return t + (rec["bytes"] / (HBM_TBS * 1e12) if with_memory_bound else 0.0)


# ==== driving a method file's own --bench step


def run_file(key: str, model: str, config: str | None, batch: int, pairs: int, device: str = "meta",
             verbose: bool = False) -> dict:
    """Trace `pairs` interleaved base/GAD steps (after the file's warm-up) of the file's --bench; return mean records
    of the base and GAD steps after warm-up. config None = the file's Args as given (plus bf16 autocast)."""
    mod_name, _, _ = FILES[key]
    mod = importlib.import_module(mod_name)
    fields, over = {f.name for f in dataclasses.fields(mod.Args)}, overrides(mod, config)
    if isinstance(over, str):
        return {"na": over}
    kw = dict(model=model, device=device, dtype="bf16", batch_size=batch, bench=pairs, threads=1, **over)
    if "out" in fields:  # a fresh directory: the files refuse to write over an earlier run
        kw["out"] = tempfile.mkdtemp(prefix=f"gpu_cost_{key}_")
    emu, mode = MetaCuda(), CostMode(device)
    mode.verbose = verbose
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = TF32_DEFAULTS  # a fresh process
    old_hook, old_load = common.bench_hook, common.load_pipeline
    common.bench_hook = mode.begin
    if "device" in inspect.signature(old_load).parameters:  # build the real-size models on meta, not on the CPU
        common.load_pipeline = lambda *a, device=device, **k: old_load(*a, device=device, **k)
    try:
        with meta_autocast_patch(emu), emu, mode, torch.random.fork_rng(devices=[]):
            mod.train(mod.Args(**kw))
        mode.end()
    finally:
        common.bench_hook, common.load_pipeline = old_hook, old_load
    recs = mode.steps[4:]  # the files time 2 warm-up steps of each kind first
    if not recs:
        raise RuntimeError(f"{mod_name}: no bench steps recorded (is bench_hook called?)")
    out = {}
    for gad in (False, True):
        rs = [r for r in recs if r["gad"] == gad]
        classes = sorted({c for r in rs for c in r["flops"]})
        out["gad" if gad else "base"] = {
            "flops": {c: statistics.mean(r["flops"].get(c, 0) for r in rs) for c in classes},
            "bytes": statistics.mean(r["bytes"] for r in rs), "peak": max(r["peak"] for r in rs),
            "start_bytes": min(r["start_bytes"] for r in rs), "n": len(rs)}
    out["scalar_reads"] = dict(mode.scalar_reads)
    return out


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random", help="random (real size) or tiny")
    p.add_argument("--files", nargs="+", default=list(FILES), choices=list(FILES))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch", type=int, default=0, help="per-GPU batch (0 = the paper's, GAD Table 11)")
    p.add_argument("--pairs", type=int, default=0, help="base/GAD pairs after warm-up (0 = 1; gad_sid: 4, its k is random)")
    p.add_argument("--out", default="", help="also write the markdown table to this directory")
    p.add_argument("--verbose", action="store_true", help="progress per traced step on stderr")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["Rates (effective TFLOP/s, one H200): " + ", ".join(f"{k} {v:.0f}" for k, v in RATES.items())
             + f"; memory-bound ops {HBM_TBS:.2f} TB/s. Model: {a.model} on meta, autocast bf16.", "",
             "| file | batch | GAD config | base TFLOP | GAD TFLOP | base ms | GAD ms | GAD/base | GAD/base +mem |"
             " peak GiB base / GAD |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for key in a.files:
        batch = a.batch or FILES[key][2]
        pairs = a.pairs or (4 if key == "sid" else 1)
        for cfg in a.configs:
            r = run_file(key, a.model, cfg, batch, pairs, verbose=a.verbose)
            name = CONFIGS[cfg][0]
            if "na" in r:
                lines.append(f"| {FILES[key][0]} | {batch} | ({cfg}) {name} | n/a: {r['na']} | | | | | | |")
                continue
            b, g = r["base"], r["gad"]
            tf = lambda rec: "/".join(f"{rec['flops'].get(c, 0) / 1e12:.1f}" for c in
                                      ("bf16", "tf32", "fp32", "attn_bf16", "attn_fp32"))
            row = dict(file=FILES[key][0], batch=batch, config=cfg, base_ms=1e3 * seconds(b, False),
                       gad_ms=1e3 * seconds(g, False), ratio=seconds(g, False) / seconds(b, False),
                       ratio_mem=seconds(g, True) / seconds(b, True), peak_base_gib=b["peak"] / 2**30,
                       peak_gad_gib=g["peak"] / 2**30, static_gib=b["start_bytes"] / 2**30, base=b, gad=g)
            rows.append(row)
            lines.append(f"| {row['file']} | {batch} | ({cfg}) {name} | {tf(b)} | {tf(g)} | {row['base_ms']:.0f} | "
                         f"{row['gad_ms']:.0f} | **{row['ratio']:.2f}** | {row['ratio_mem']:.2f} | "
                         f"{row['peak_base_gib']:.1f} / {row['peak_gad_gib']:.1f} |")
            print(lines[-1], flush=True)
    lines += ["", "TFLOP columns: bf16 / tf32 / fp32 GEMMs and convolutions / fused attention bf16 / fp32 per step. "
              "ms: GEMM, convolution and attention time at the rates above; +mem adds the memory-bound ops' bytes at "
              "HBM speed. Peak: live bytes of meta storages (weights, gradients, AdamW states, activations)."]
    text = "\n".join(lines)
    print("\n" + text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu_cost.md"), "w") as f:
            f.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
