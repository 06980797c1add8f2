"""GAD/base step-time ratio of gad_sid.py on the tiny SANA model: one thread, interleaved runs, medians.

Usage (from the repository root): CPU_THREADS=1 python bench/gad_sid_overhead.py [reps=5] [steps=10]
"""
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import gad_sid  # noqa: E402

torch.set_num_threads(1)
reps, steps = (int(a) for a in (sys.argv[1:] + ["5", "10"][len(sys.argv) - 1:])[:2])
pipe = common.load_pipeline("sana", "tiny")
modes = {"base": dict(gad_weight=0.0), "gad_batched": dict(gad_batched=True), "gad_separate": dict(gad_batched=False)}
times = {m: [] for m in modes}
for _ in range(reps):
    for m, kw in modes.items():  # interleaved: base, batched, separate, base, ...
        a = gad_sid.Args(model="tiny", steps=steps, batch_size=2, sample_every=0, log_every=1000, export=False,
                         out=f"runs/bench_gad_sid/{m}", threads=1, **kw)
        times[m].append(gad_sid.train(a, pipe=pipe)["step_time_median"])
for m in modes:
    med = statistics.median(times[m])
    print(f"{m:14s} median s/step {med:.4f}  ratio {med / statistics.median(times['base']):.3f}")
