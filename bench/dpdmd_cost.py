"""Cost of one dpdmd.py student iteration (student_loss forward + backward) for DMD, DP-DMD and DP-DMD without the
detach, on the tiny SD3 and SDXL models: one thread, median of 10 after 2 warm-up iterations.

Usage (from the repository root): CPU_THREADS=1 python bench/dpdmd_cost.py
"""
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import dpdmd  # noqa: E402

torch.set_num_threads(1)
common.seed_everything(0)
for fam in ("sd3", "sdxl"):
    pipe = common.load_pipeline(fam, "tiny-" + fam)
    T = getattr(pipe, pipe.denoiser_name)
    S, Fk = copy.deepcopy(T).requires_grad_(True), copy.deepcopy(T)
    sch = dpdmd.Schedule(dpdmd.stock_scheduler(pipe, fam == "sd3"), fam == "sd3", 4, 30)
    c, u = common.encode(pipe, fam, ["a fox", "a house"], "cpu")
    z = torch.randn(common.latent_shape(pipe, 2))
    res = {}
    for name, a in [("DMD (lambda=0)", dpdmd.Args(div_weight=0)), ("DP-DMD (lambda=0.05, k=5)", dpdmd.Args()),
                    ("DP-DMD no-detach", dpdmd.Args(detach=False))]:
        ts = []
        for _ in range(12):
            t0 = time.perf_counter()
            dpdmd.student_loss(S, T, Fk, z, c, u, 3.5, sch, a)[0].backward()
            ts.append(time.perf_counter() - t0)
        res[name] = statistics.median(ts[2:])
    for k, v in res.items():
        print(f"| {fam} | {k} | {1000 * v:.1f} ms | {v / res['DMD (lambda=0)']:.2f}x |")
