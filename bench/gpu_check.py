"""One prepared GPU check (one H200, under 8 minutes): measures what bench/gpu_cost.py models.

On the real-size random models (common.load_pipeline(family, 'random'), built directly on the GPU) it prints:
  1. for each GAD file, its own --bench (interleaved base / GAD steps on the same models, medians after warm-up) at
     the paper's per-GPU batch (GAD Table 11: TDM 64, SiD 8, LADD 64), or the largest power-of-two fraction of it
     that fits (said so): base and GAD step time, GAD/base, peak memory (torch.cuda.max_memory_allocated);
  2. for each GAD file, the cosine and relative error of its response estimate Delta = f(x + h v) - f(x)
     (finite difference, or h J v by forward-mode AD, in the file's precision) against a float64 exact JVP
     (forward-mode AD of the same network copied to fp64) on the same inputs;
  3. whether one training step of dpdmd.py and of adm.py fits at its default batch, and its peak memory;
  and next to every measured peak, the memory plan each file prints before loading (common.memory_plan). The plan's
  refusal (common.check_memory) is switched off here, so that the GPU, not the plan, says what fits.
Results go to stdout and to <out>/gpu_check.md as markdown tables.

  python bench/gpu_check.py                               # on the GPU: ~5-7 minutes
  python bench/gpu_check.py --device cpu --small          # tiny models, batch 2, CPU: the test (tests/test_bench_gpu.py)
--configs picks which GAD configurations the bench times (default: each file's own defaults); the response check
always covers every configuration the file can express: (a) fd fp32 TF32 off, (b) exact JVP bf16, (c) exact JVP fp32.
"""
import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib
import inspect
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu_cost import CONFIGS, FILES, TF32_DEFAULTS, overrides  # noqa: E402

import common  # noqa: E402

fwAD = torch.autograd.forward_ad
OOM = (torch.cuda.OutOfMemoryError,)
SAMPLES = {False: 4, True: 2}  # inputs for the response check (--small: 2)
FAMILY = {"gad_tdm": "pixart", "gad_sid": "sana", "gad_ladd": "sd21", "dpdmd": "sd3", "adm": "sd3"}  # memory_plan's


def plan_gib(mod_name: str, args) -> float:
    """The peak per GPU common.memory_plan expects for these flags (one process)."""
    return common.memory_plan(args, mod_name, FAMILY[mod_name])["peak"]


def no_refusal(*args, **kwargs):  # common.check_memory without its refusal: the measurement decides
    return None


@contextlib.contextmanager
def patched(obj, **attrs):
    """Temporarily replace attributes of a module (side tasks the checks do not need: checkpoints, exports, grids)."""
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def loader_on(device):
    """common.load_pipeline that builds a random model directly on `device` (where load_pipeline can)."""
    real = common.load_pipeline
    if "device" not in real.__code__.co_varnames:
        return real
    return lambda *a, **k: real(*a, **{"device": device, **k})


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def default_config(mod_name: str) -> str | None:
    """Which of CONFIGS the file's own Args defaults are (None: none of them)."""
    defaults = {f.name: f.default for f in dataclasses.fields(importlib.import_module(mod_name).Args)}
    for cfg, (_, flags) in CONFIGS.items():
        if all(defaults.get(k) == v for k, v in flags.items()):
            return cfg
    return "a" if defaults.get("gad_jvp") == "fd" else None  # a finite difference is fp32 whatever --gad-fp32 says


# ==== 1. each GAD file's own --bench


def bench_file(key: str, a, config: str | None) -> dict:
    """Run the file's --bench at the paper's batch, halving it on out-of-memory. Returns times, ratio, peaks."""
    mod_name, _, paper_batch = FILES[key]
    mod = importlib.import_module(mod_name)
    fields, over = {f.name for f in dataclasses.fields(mod.Args)}, overrides(mod, config)
    if isinstance(over, str):
        return {"na": over}
    batch, oom = a.batch or paper_batch, []
    while batch >= 1:
        kw = dict(model=a.model, device=a.device, batch_size=batch, bench=a.pairs, **over)
        kw.update({"out": tempfile.mkdtemp(prefix=f"bench_{key}_", dir=a.out)} if "out" in fields else {})
        kw.update({"threads": 1} if a.device == "cpu" else {})
        free()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = TF32_DEFAULTS  # as in a new process
        try:
            with patched(common, load_pipeline=loader_on(a.device), check_memory=no_refusal):
                r = mod.train(mod.Args(**kw))
        except OOM:
            oom.append(batch)
            batch //= 2
            continue
        base = r.get("step_time_base", r.get("time_base_s"))
        gad = r.get("step_time_gad", r.get("time_gad_s"))
        mem = (r["mem_base_gb"], r["mem_gad_gb"]) if "mem_base_gb" in r else \
            (r["mem_base_mb"] / 1024, r["mem_gad_mb"] / 1024) if "mem_base_mb" in r and a.device == "cuda" else None
        return dict(batch=batch, paper_batch=paper_batch, oom=oom, base_s=base, gad_s=gad, ratio=gad / base, mem=mem,
                    plan=plan_gib(mod_name, mod.Args(**kw)))
    return {"na": "out of memory even at batch 1"}


# ==== 2. response estimate against a float64 exact JVP


@contextlib.contextmanager
def precision(device, config: str):
    """The precision a config runs its response in: fp32 with TF32 off, or bf16 autocast with torch's TF32 defaults."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    fp32 = CONFIGS[config][1]["gad_fp32"] or CONFIGS[config][1]["gad_jvp"] == "fd"
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (False, False) if fp32 else TF32_DEFAULTS
    try:
        with torch.autocast(device.type, enabled=False) if fp32 else common.autocast(device, torch.bfloat16):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def jvp64(f, x, v):
    """J_f(x) v in float64 by forward-mode AD (math attention kernel: the fused ones have no forward-AD rule)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH), torch.autocast(x.device.type, enabled=False):
        return fwAD.unpack_dual(f(fwAD.make_dual(x.double(), v.double()))).tangent.double()


def response_inputs(key: str, a, device):
    """(pipe, network, cond, est, ref, h) for one file: est(net, cond, x, v, h, mode, ac) is the file's own response
    function (ac: the autocast context a bf16 JVP runs in, for files that take it as an argument; the others run in
    the caller's context), ref(net64, cond64, x) the map whose JVP is the reference. Cond: the file's encoder on the
    first prompts."""
    _, family, _ = FILES[key]
    with patched(common, load_pipeline=loader_on(device)):
        pipe = common.load_pipeline(family, a.model, torch.float32)
    pipe.to(device)
    n = SAMPLES[a.small]
    prompts = common.PROMPTS[:n]
    cond = common.cast(common.encode(pipe, family, prompts, device)[0], torch.float32)
    net = getattr(pipe, pipe.denoiser_name)
    if key == "tdm":
        import gad_tdm as M

        abar = pipe.scheduler.alphas_cumprod.to(device, torch.float32)
        tau = torch.full((n,), 500, device=device)

        def f(net, c):  # the fake score's x0 map as step_fn's f_F: n copies of the batch in one forward
            return lambda y, n=1: M.predict(net, y, tau.repeat(n), common.cat(*[c] * n), abar)[1]

        est = lambda net, c, x, v, h, mode, ac: M.responses(f(net, c), x, v, h, mode)[1]  # noqa: E731
        return pipe, net, cond, est, lambda net, c, y: f(net, c)(y), M.Args().gad_h
    if key == "sid":
        import gad_sid as M

        sigma = torch.full((n,), 0.5, device=device)
        takes_ac = "ac" in inspect.signature(M.gad_delta).parameters  # the precision of its JVP forwards
        est = lambda n, c, x, v, h, mode, ac: M.gad_delta(n, x, sigma, v, h, mode, c,  # noqa: E731
                                                          **({"ac": ac} if takes_ac else {}))
        return pipe, net, cond, est, lambda n, c, y: M.x0_pred(n, y, sigma, c), M.Args().gad_h
    import gad_ladd as M

    ab, pt = pipe.scheduler.alphas_cumprod.to(device), pipe.scheduler.config.prediction_type
    takes_mode = "mode" in inspect.signature(M.student_pair).parameters  # fd only before --gad-jvp
    est = lambda n, c, x, v, h, mode, ac: M.student_pair(n, x, v, h, c, ab, pt,  # noqa: E731
                                                         *((mode, ac) if takes_mode else ()))[1]
    return pipe, net, cond, est, lambda n, c, y: M.student_x0(n, y, c, ab, pt), M.Args().h


@torch.no_grad()
def reference(net, cond, ref_map, x, v, h):
    """h J v of the network's map in float64 (a float64 copy of the network, freed on return)."""
    net64, cond64 = copy.deepcopy(net).double(), common.cast(cond, torch.float64)
    return h * jvp64(lambda y: ref_map(net64, cond64, y), x, v)


def response_check(key: str, a) -> list:
    """Rows (config, cosine, relative error) of the file's response estimates against the float64 exact JVP."""
    device = torch.device(a.device)
    mod = importlib.import_module(FILES[key][0])
    pipe, net, cond, est, ref_map, h = response_inputs(key, a, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(common.latent_shape(pipe, SAMPLES[a.small]), generator=g).to(device)
    v = torch.randn(x.shape, generator=g).to(device)
    ref = reference(net, cond, ref_map, x, v, h)
    free()
    rows = []
    for cfg, (name, flags) in CONFIGS.items():
        if isinstance(overrides(mod, cfg), str):
            rows.append((cfg, name, None, None))
            continue
        bf16 = not flags["gad_fp32"] and flags["gad_jvp"] == "exact"
        with torch.no_grad(), precision(device, cfg):
            d = est(net, cond, x, v, h, flags["gad_jvp"], common.autocast(device, torch.bfloat16) if bf16 else None)
        d = d.double()
        cos = torch.nn.functional.cosine_similarity(d.flatten(1), ref.flatten(1), dim=1).mean().item()
        rel = ((d - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).mean().item()
        rows.append((cfg, name, cos, rel))
    del pipe, net
    free()
    return rows


# ==== 3. does one step of dpdmd.py / adm.py fit at its default batch?


def fit_check(name: str, a) -> dict:
    mod = importlib.import_module(name)
    kw = dict(model=a.small_models[name] if a.small else "random", device=a.device, steps=2 if name == "dpdmd" else 1,
              out=tempfile.mkdtemp(prefix=f"fit_{name}_", dir=a.out), fake_updates_per_student=1, sample_every=0, eval=False,
              export=False, threads=1 if a.device == "cpu" else 0)  # dpdmd: one fake and one student update
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    args = mod.Args(**{k: v for k, v in kw.items() if k in fields})
    if a.small:
        args = dataclasses.replace(args, batch_size=min(args.batch_size, 2))
    side = dict(save_checkpoint=lambda *x, **k: None, export_pipeline=lambda *x, **k: None,
                load_pipeline=loader_on(a.device), check_memory=no_refusal)
    free()
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fits = "yes"
    try:
        with patched(common, **side), patched(mod, **({"sample_grid": lambda *x, **k: None} if name == "adm" else {})):
            mod.train(args)
    except OOM:
        fits = "no (out of memory)"
    peak = gib(torch.cuda.max_memory_allocated()) if a.device == "cuda" else None
    return dict(batch=args.batch_size, fits=fits, peak=peak, seconds=time.perf_counter() - t0, plan=plan_gib(name, args))


# ==== the command


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny models, batch 2 (CPU test of this script)")
    p.add_argument("--files", nargs="+", default=list(FILES), choices=list(FILES))
    p.add_argument("--configs", nargs="+", default=["default"], choices=["default", *CONFIGS])
    p.add_argument("--pairs", type=int, default=2, help="timed base/GAD pairs after the files' warm-up")
    p.add_argument("--batch", type=int, default=0, help="per-GPU batch (0 = the paper's; --small: 2)")
    p.add_argument("--skip", nargs="*", default=[], choices=["bench", "response", "fit"])
    p.add_argument("--out", default="runs/gpu_check")
    a = p.parse_args(argv)
    a.model, a.batch = ("tiny", a.batch or 2) if a.small else ("random", a.batch)
    a.small_models = {"dpdmd": "tiny-sd3", "adm": "tiny"}
    if a.device == "cpu":
        a.pairs = min(a.pairs, 1)
    os.makedirs(a.out, exist_ok=True)
    t0, lines, res = time.perf_counter(), [], {"bench": [], "response": [], "fit": []}
    dev = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    lines += [f"gpu_check on {dev}, model {a.model}, torch {torch.__version__}"
              + (" (CPU: the files' bench steps run in fp32, their --dtype auto)" if a.device == "cpu" else ""), ""]
    if "bench" not in a.skip:
        lines += ["| file | GAD config | batch (paper) | base s | GAD s | GAD/base | peak GiB base / GAD | plan GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in a.files:
            for cfg in a.configs:
                r = bench_file(key, a, None if cfg == "default" else cfg)
                res["bench"].append(dict(file=key, config=cfg, **r))
                d = default_config(FILES[key][0])
                name = (f"default = ({d}) {CONFIGS[d][0]}" if d else "file default") if cfg == "default" else \
                    f"({cfg}) {CONFIGS[cfg][0]}"
                if "na" in r:
                    lines.append(f"| {FILES[key][0]} | {name} | n/a: {r['na']} | | | | | |")
                else:
                    mem = f"{r['mem'][0]:.1f} / {r['mem'][1]:.1f}" if r["mem"] else "(CPU: not measured)"
                    b = f"{r['batch']} ({r['paper_batch']})" + (f", OOM at {r['oom']}" if r["oom"] else "")
                    lines.append(f"| {FILES[key][0]} | {name} | {b} | {r['base_s']:.3f} | {r['gad_s']:.3f} | "
                                 f"**{r['ratio']:.2f}** | {mem} | {r['plan']:.1f} |")
                print(lines[-1], flush=True)
        lines.append("")
    if "response" not in a.skip:
        lines += [f"Response estimate vs float64 exact JVP ({SAMPLES[a.small]} inputs, the file's h):", "",
                  "| file | estimate | cosine | relative error |", "|---|---|---|---|"]
        for key in a.files:
            for cfg, name, cos, rel in response_check(key, a):
                res["response"].append(dict(file=key, config=cfg, cos=cos, rel=rel))
                mark = " (file default)" if cfg == default_config(FILES[key][0]) else ""
                lines.append(f"| {FILES[key][0]} | ({cfg}) {name}{mark} | " +
                             ("n/a | |" if cos is None else f"{cos:.5f} | {rel:.2e} |"))
                print(lines[-1], flush=True)
        lines.append("")
    if "fit" not in a.skip:
        lines += ["| file | default batch | one step fits | peak GiB | plan GiB | s |", "|---|---|---|---|---|---|"]
        for name in ("dpdmd", "adm"):
            r = fit_check(name, a)
            res["fit"].append(dict(file=name, **r))
            peak = f"{r['peak']:.1f}" if r["peak"] is not None else "(CPU)"
            lines.append(f"| {name}.py | {r['batch']} | {r['fits']} | {peak} | {r['plan']:.1f} | {r['seconds']:.0f} |")
            print(lines[-1], flush=True)
    lines.append(f"\ntotal {time.perf_counter() - t0:.0f} s")
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
