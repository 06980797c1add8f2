"""Peak CPU memory and time of loading a real-size denoiser with and without accelerate's low-memory path.

  python bench/load_memory.py pixart sd21       # families; each: save a random real-size denoiser, load it twice

diffusers' `from_pretrained` loads with low CPU memory only when `accelerate` is installed; without it, it warns and
falls back to `low_cpu_mem_usage=False`. peft (requirements.txt) depends on accelerate, so it is installed here; the
"without" rows emulate its absence by making diffusers' own availability check (`modeling_utils.
is_accelerate_available`) answer False in that process, which is the branch a missing package takes. Each load runs in
a fresh process (peak RSS: VmHWM of /proc/self/status; getrusage's maxrss would carry the parent's peak across exec),
measured after loading and again after reading every weight once (as moving the model to a GPU does). The saved model
is the family's `--model random` denoiser in fp32 (safetensors), in a temporary directory removed afterwards.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hwm() -> int:
    """This process's peak resident set in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def load(path: str, cls_name: str, with_accelerate: bool) -> None:
    """Run in a fresh process: load, then print seconds and the peak RSS (GiB) above the interpreter's baseline after
    loading and after reading every weight once."""
    import diffusers
    import diffusers.models.modeling_utils as mu
    import torch

    if not with_accelerate:
        mu.is_accelerate_available = lambda: False

    base = hwm()
    t0 = time.perf_counter()
    net = getattr(diffusers, cls_name).from_pretrained(path)
    dt, loaded = time.perf_counter() - t0, hwm()
    with torch.no_grad():  # read every weight once, as moving the model to a GPU does (mmapped pages come in)
        sum(p.sum() for p in net.parameters())
    print(f"{dt:.2f} {(loaded - base) / 2**20:.2f} {(hwm() - base) / 2**20:.2f}")


def main(families: list) -> None:
    import common

    print("| denoiser | weights (GiB, fp32) | accelerate | load s | peak RSS after loading (GiB) |"
          " after reading every weight (GiB) |")
    print("|---|---|---|---|---|---|")
    for family in families:
        tmp = tempfile.mkdtemp(prefix=f"load_{family}_")
        try:
            net = common.random_denoiser(family)
            size = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**30
            cls_name = type(net).__name__
            net.save_pretrained(tmp)
            del net
            for acc in (True, False):
                out = subprocess.run([sys.executable, __file__, "--load", tmp, cls_name, str(int(acc))],
                                     capture_output=True, text=True, check=True).stdout.split()
                print(f"| {family} {cls_name} | {size:.2f} | {'with' if acc else 'without'} | {out[0]} | {out[1]} |"
                      f" {out[2]} |", flush=True)
        finally:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    if sys.argv[1] == "--load":
        load(sys.argv[2], sys.argv[3], sys.argv[4] == "1")
    else:
        main(sys.argv[1:] or ["pixart"])
