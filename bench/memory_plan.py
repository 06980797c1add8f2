"""Print common.memory_plan for each file at the paper's per-GPU batch and the configurations in the README's fit
table (parameter counts on the meta device; no GPU needed). Usage: python bench/memory_plan.py"""
import os
import sys
from types import SimpleNamespace as A

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

ROWS = [("gad_tdm", "pixart", 8, A(batch_size=8)), ("gad_tdm", "pixart", 8, A(batch_size=64, grad_ckpt=True)),
        ("gad_tdm", "pixart", 1, A(batch_size=64)),
        ("gad_tdm", "pixart", 1, A(batch_size=64, grad_ckpt=True)), ("gad_tdm", "pixart", 1, A(batch_size=32)),
        ("gad_sid", "sana", 8, A(batch_size=8)), ("gad_sid", "sana", 1, A(batch_size=8)),
        ("gad_ladd", "sd21", 8, A(batch_size=64)), ("gad_ladd", "sd21", 8, A(batch_size=16)),
        ("gad_ladd", "sd21", 1, A(batch_size=16)), ("gad_ladd", "sd21", 1, A(batch_size=32)),
        ("dpdmd", "sd3", 8, A(batch_size=4, grad_ckpt=True)), ("dpdmd", "sd3", 8, A(batch_size=4, grad_ckpt=True, fsdp=True)),
        ("dpdmd", "sd3", 1, A(batch_size=4, grad_ckpt=True, lora_rank=64)),
        ("dpdmd", "sd3", 1, A(batch_size=1, grad_ckpt=True, lora_rank=64)),
        ("adm", "sd3", 8, A(batch_size=4, lora_rank=64)), ("adm", "sd3", 1, A(batch_size=4, lora_rank=64, grad_ckpt=True)),
        ("adm", "sd3", 1, A(batch_size=2, lora_rank=64, grad_ckpt=True))]
for file, family, world, a in ROWS:
    p = common.memory_plan(a, file, family, world)
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(a).items())
    print(f"{file:8s} {world} GPU  {flags:45s} weights+states {p['weights_and_states']:6.1f}  act {p['activations']:6.1f}"
          f"  peak {p['peak']:6.1f} GiB")
