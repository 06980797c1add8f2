"""2D toy of DP-DMD's claim with a CFG-guided teacher (the setting the paper's collapse comes from). From the repo root:
    nice -n 10 python bench/dpdmd_cfg_toy.py --seeds 0 1 2
Data: 4 classes on a ring of 16 Gaussian modes (radius 4, std 0.1). Class c owns modes 4c .. 4c+4 (mod 16), equally
weighted: 3 exclusive modes and 2 shared with a neighbouring class (one on each side), so p(c | x) = 1/2 on a shared
mode and guidance (w > 1) turns the shared modes into low-probability modes (weight ~ p(x|c) p(c|x)^(w-1)).
Teacher: class-conditional flow-matching MLP, condition dropout 10% (null class token), sampled with CFG w (30 Euler
steps, shift 3). Students (4 steps, shift 3): DMD (lambda 0) and DP-DMD (lambda 0.05, anchor k) distilled with
dpdmd.student_loss / dpdmd.fake_loss themselves (real score with CFG w, fake and student unguided, as in dpdmd.py),
same budget, same init (the teacher), same seed. One teacher per seed. ~30 s CPU per student run, ~6.5 CPU-min per seed.
Expect (docs/readme_toys_dpdmd_cfg.md): the guided teacher loses the shared modes (entropy 1.00 -> 0.50 at w = 3);
DMD and DP-DMD follow its mode distribution with no consistent gap between them."""
import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

import dpdmd  # noqa: E402

torch.set_num_threads(1)
C, MODES_PER_CLASS, RING, R, STD = 4, 5, 16, 4.0, 0.1  # classes, modes per class, modes on the ring, radius, std
MU = torch.tensor([[R * math.cos(2 * math.pi * i / RING), R * math.sin(2 * math.pi * i / RING)] for i in range(RING)])
CLASS_MODES = torch.tensor([[(4 * c + j) % RING for j in range(MODES_PER_CLASS)] for c in range(C)])  # (C, 5)
NULL = C  # class token of the unconditional branch (condition dropout)
P_UNCOND = 0.1  # condition dropout rate when training the teacher
NEAR = 4.0  # a sample is near a mode when within NEAR * STD of it
COVER = 0.02  # a class's mode is covered when >= COVER of that class's samples lie near it


def data(y):
    """x ~ p(x | y): one of class y's modes, uniformly, plus Gaussian noise. Shape (n, 2, 1, 1)."""
    m = CLASS_MODES[y, torch.randint(MODES_PER_CLASS, (len(y),))]
    return (MU[m] + STD * torch.randn(len(y), 2)).view(-1, 2, 1, 1)


class MLP(torch.nn.Module):
    """v(x, sigma, class) with a sinusoidal embedding of sigma = timestep / 1000 and a learned class embedding
    (C classes + the null token); called like a diffusers denoiser with `class_labels`."""

    def __init__(self, h=128, emb=16):
        super().__init__()
        self.cls = torch.nn.Embedding(C + 1, emb)
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 16 + emb, h), torch.nn.SiLU(), torch.nn.Linear(h, h),
                                       torch.nn.SiLU(), torch.nn.Linear(h, h), torch.nn.SiLU(), torch.nn.Linear(h, 2))

    def forward(self, x, timestep, class_labels, return_dict=False):
        s = (timestep.float() / 1000).view(-1, 1) * torch.arange(1, 9).float() * math.pi
        h = torch.cat([x.flatten(1), torch.sin(s), torch.cos(s), self.cls(class_labels)], 1)
        return (self.net(h).view_as(x),)


def train_teacher(steps, seed, bs=512, lr=2e-3):
    """Conditional flow matching (v = eps - x0, Eq. 1-2) with the label replaced by NULL with prob. P_UNCOND."""
    torch.manual_seed(seed)
    net = MLP()
    opt = torch.optim.Adam(net.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        y = torch.randint(C, (bs,))
        x0, e, s = data(y), torch.randn(bs, 2, 1, 1), torch.rand(bs, 1, 1, 1)
        y_in = torch.where(torch.rand(bs) < P_UNCOND, torch.full_like(y, NULL), y)
        loss = F.mse_loss(net((1 - s) * x0 + s * e, s.flatten() * 1000, y_in)[0], e - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.requires_grad_(False).eval()


def conds(y):
    return {"class_labels": y}, {"class_labels": torch.full_like(y, NULL)}


def stats(x, y):
    """Per class (samples x of label y), averaged over classes: (modes covered of 5, share of samples near one of the
    class's modes, normalised entropy of the nearest-own-mode histogram: 1 = all 5 used equally), plus the share
    of the class's covered modes that are shared ones (how many of the 2 shared modes survive, per class)."""
    cov, near, ent, shared = [], [], [], []
    for c in range(C):
        xc = x[y == c].flatten(1)
        d = torch.cdist(xc, MU[CLASS_MODES[c]]).min(1)
        close = d.values < NEAR * STD
        counts = torch.bincount(d.indices[close], minlength=MODES_PER_CLASS)
        covered = counts >= COVER * len(xc)
        cov.append(covered.sum().item())
        shared.append((covered[0].int() + covered[-1].int()).item())  # modes 4c and 4c+4 are the shared ones
        near.append(close.float().mean().item())
        p = torch.bincount(d.indices, minlength=MODES_PER_CLASS).float() / len(xc)
        ent.append(-(p[p > 0] * p[p > 0].log()).sum().item() / math.log(MODES_PER_CLASS))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"modes": mean(cov), "shared": mean(shared), "near": mean(near), "entropy": mean(ent)}


def radius(x):
    """Distance of the samples from the origin (the ring has radius R): 'mean (10% .. 90% quantile)'."""
    r = x.flatten(1).norm(dim=1)
    return f"radius {r.mean():.2f} ({r.quantile(0.1):.2f} .. {r.quantile(0.9):.2f})"


def distill(T, sch, a, w, seed, iters, lr=1e-3, bs=256):
    """Alternate fake / student updates exactly like dpdmd.train (AdamW, clip) with dpdmd's own losses; each batch
    draws uniform class labels; the real score uses CFG w against the null token."""
    torch.manual_seed(seed)
    stu, fake = copy.deepcopy(T).requires_grad_(True).train(), copy.deepcopy(T).requires_grad_(True).train()
    wd = 0.01  # the recorded toy setup (README); dpdmd.Args().weight_decay is 0.0 since issue 11
    opts = {n: torch.optim.AdamW(m.parameters(), lr, weight_decay=wd) for n, m in (("s", stu), ("f", fake))}
    for it in range(1, iters + 1):
        z, (cond, uncond) = torch.randn(bs, 2, 1, 1), conds(torch.randint(C, (bs,)))
        if it % (a.fake_updates_per_student + 1):
            loss, net, opt = dpdmd.fake_loss(stu, fake, z, cond, sch), fake, opts["f"]
        else:
            loss, net, opt = dpdmd.student_loss(stu, T, fake, z, cond, uncond, w, sch, a)[0], stu, opts["s"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), a.grad_clip)
        opt.step()
    return stu


def eval_batch(n_per_class, seed=123):
    """The same n fixed noises for every class."""
    z = torch.randn(n_per_class, 2, 1, 1, generator=torch.Generator().manual_seed(seed))
    return z.repeat(C, 1, 1, 1), torch.arange(C).repeat_interleave(n_per_class)


def fmt(vals):
    m = sum(vals) / len(vals)
    s = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}" if abs(m) >= 1 or m == 0 else f"{m:.3f} ± {s:.3f}"


def run(a) -> dict:
    """All seeds x CFG scales x methods -> {(w, method): [stats per seed]}; prints one line per run."""
    sch = dpdmd.Schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), True, 4, 30)
    z, y = eval_batch(a.n_eval)
    cond, uncond = conds(y)
    methods = [("DMD", dict(div_weight=0.0))]
    methods += [(f"DP-DMD k={k}", dict(div_weight=a.lam, anchor_step=k)) for k in a.ks]
    res = {}
    for seed in a.seeds:
        t0 = time.time()
        T = train_teacher(a.teacher_steps, seed)
        print(f"seed {seed}: teacher trained in {time.time() - t0:.1f}s", flush=True)
        for w in a.cfg:
            with torch.no_grad():
                x = dpdmd.teacher_rollout(T, z, cond, uncond, w, sch, 30)[0]
            res.setdefault((w, "teacher 30 steps"), []).append(s := stats(x, y))
            print(f"seed {seed} | w {w} | teacher 30 steps | {s}" + (f" | {radius(x)}" if a.radius else ""), flush=True)
            for name, kw in methods:
                t1 = time.time()
                args = dpdmd.Args(fake_updates_per_student=a.fake_ratio, **kw)
                stu = distill(T, sch, args, w, seed, a.iters)
                with torch.no_grad():
                    x = dpdmd.student_rollout(stu, z, cond, sch)[0]
                res.setdefault((w, name), []).append(s := stats(x, y))
                print(f"seed {seed} | w {w} | {name} | {s} | {time.time() - t1:.1f}s" + (f" | {radius(x)}" if a.radius else ""),
                      flush=True)
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--teacher-steps", type=int, default=5000)
    p.add_argument("--iters", type=int, default=3000, help="fake + student updates (5:1)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 6.0])
    p.add_argument("--lam", type=float, default=0.05)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 19], help="anchor steps (5 = the paper's; 19: sigma_k 0.614)")
    p.add_argument("--fake-ratio", type=int, default=5)
    p.add_argument("--n-eval", type=int, default=1000, help="fixed noises per class")
    p.add_argument("--radius", action="store_true", help="also print where the samples lie radially")
    a = p.parse_args()
    res = run(a)
    print(f"\n| w | model | modes covered / {MODES_PER_CLASS} per class | shared modes covered / 2 | near | entropy |")
    print("|---|---|---|---|---|---|")
    for (w, name), rows in res.items():
        cells = [fmt([r[k] for r in rows]) for k in ("modes", "shared", "near", "entropy")]
        print(f"| {w:g} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
