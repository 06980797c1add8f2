"""2D toy of DP-DMD's mode-coverage claim. From the repository root:
    CPU_THREADS=1 python bench/dpdmd_toy.py --iters 3000 --seeds 0 1 2
Teacher: a small MLP flow-matching model on 8 Gaussians (radius 2, std 0.08). Students (4 steps, shift-3 schedule) are
distilled with dpdmd.student_loss / dpdmd.fake_loss themselves (the repo's code), under identical budgets."""
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
K, R, STD = 8, 2.0, 0.08
MU = torch.tensor([[R * math.cos(2 * math.pi * i / K), R * math.sin(2 * math.pi * i / K)] for i in range(K)])


def data(n):
    return (MU[torch.randint(K, (n,))] + STD * torch.randn(n, 2)).view(n, 2, 1, 1)


class MLP(torch.nn.Module):
    """v(x, sigma) with a sinusoidal embedding of sigma = timestep / 1000; called like a diffusers denoiser."""

    def __init__(self, h=128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 16, h), torch.nn.SiLU(), torch.nn.Linear(h, h), torch.nn.SiLU(),
                                       torch.nn.Linear(h, h), torch.nn.SiLU(), torch.nn.Linear(h, 2))

    def forward(self, x, timestep, return_dict=False):
        s = (timestep.float() / 1000).view(-1, 1) * torch.arange(1, 9).float() * math.pi
        return (self.net(torch.cat([x.flatten(1), torch.sin(s), torch.cos(s)], 1)).view_as(x),)


def train_teacher(steps, seed=0, bs=512):
    torch.manual_seed(seed)
    net = MLP()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0, e, s = data(bs), torch.randn(bs, 2, 1, 1), torch.rand(bs, 1, 1, 1)
        loss = F.mse_loss(net((1 - s) * x0 + s * e, s.flatten() * 1000)[0], e - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
    return net.requires_grad_(False).eval()


def stats(x):
    """(modes holding >= 2% of the samples within 4 std, fraction of samples within 4 std of a mode,
    normalised entropy of the nearest-mode histogram: 1 = all 8 modes equally used)."""
    d = torch.cdist(x.flatten(1), MU).min(1)
    near = d.values < 4 * STD
    cov = int((torch.bincount(d.indices[near], minlength=K) >= 0.02 * len(x)).sum())
    p = torch.bincount(d.indices, minlength=K).float() / len(x)
    ent = -(p[p > 0] * p[p > 0].log()).sum().item() / math.log(K)
    return cov, round(near.float().mean().item(), 3), round(ent, 3)


def distill(T, sch, a, seed, iters, lr=1e-3, bs=256):
    """Alternate fake / student updates exactly like dpdmd.train (AdamW, clip), using the file's loss functions."""
    torch.manual_seed(seed)
    stu, fake = copy.deepcopy(T).requires_grad_(True).train(), copy.deepcopy(T).requires_grad_(True).train()
    wd = 0.01  # the recorded toy setup (README); dpdmd.Args().weight_decay is 0.0 since issue 11
    opts = {n: torch.optim.AdamW(m.parameters(), lr, weight_decay=wd) for n, m in (("s", stu), ("f", fake))}
    for it in range(1, iters + 1):
        z = torch.randn(bs, 2, 1, 1)
        if it % (a.fake_updates_per_student + 1):
            loss, net, opt = dpdmd.fake_loss(stu, fake, z, {}, sch), fake, opts["f"]
        else:
            loss, net, opt = dpdmd.student_loss(stu, T, fake, z, {}, {}, 1.0, sch, a)[0], stu, opts["s"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), a.grad_clip)
        opt.step()
    return stu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--teacher-steps", type=int, default=4000)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lam", type=float, default=0.05)
    p.add_argument("--ks", type=int, nargs="+", default=[5, 19], help="anchor steps")
    p.add_argument("--fake-ratio", type=int, default=5)
    a = p.parse_args()
    t0 = time.time()
    T = train_teacher(a.teacher_steps)
    sch = dpdmd.Schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), True, 4, 30)
    z = torch.randn(2000, 2, 1, 1, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        final = dpdmd.teacher_rollout(T, z, {}, None, 1.0, sch, 30)[0]
        print(f"teacher trained in {time.time() - t0:.1f}s; 30-step {stats(final)}; 4-step "
              f"{stats(dpdmd.student_rollout(T, z, {}, sch)[0])}")
        mode = torch.cdist(final.flatten(1), MU).argmin(1)
        agree = []  # does the teacher's x0 prediction at z_k already name the mode its trajectory ends in?
        for k in range(1, 30):
            zk, (tk, ak, sk) = dpdmd.teacher_rollout(T, z, {}, None, 1.0, sch, k)
            x0 = sch.to_x0(zk, dpdmd.denoise(T, zk, tk, {}), ak, sk)
            agree.append((k, sk, (torch.cdist(x0.flatten(1), MU).argmin(1) == mode).float().mean().item()))
    print("k, sigma_k, x0-mode agreement:", " ".join(f"{k}:{s:.3f}:{g:.2f}" for k, s, g in agree))
    ks = a.ks  # default 5 = the paper's k; 19 (sigma 0.614): adjacent modes 1.53 apart are separated by one noise std
    runs = [("DMD (lambda 0)", dict(div_weight=0.0))]
    runs += [(f"DP-DMD lambda {a.lam} k {k} (sigma_k {sch.teacher[k][2]:.3f})", dict(div_weight=a.lam, anchor_step=k))
             for k in ks]
    for seed in a.seeds:
        for name, kw in runs:
            t1 = time.time()
            args = dpdmd.Args(fake_updates_per_student=a.fake_ratio, **kw)
            stu = distill(T, sch, args, seed, a.iters)
            with torch.no_grad():
                s = stats(dpdmd.student_rollout(stu, z, {}, sch)[0])
            print(f"seed {seed} | {name} | modes, near, entropy = {s} | {time.time() - t1:.1f}s", flush=True)


if __name__ == "__main__":
    main()
