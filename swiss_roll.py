"""Swiss-roll toy of GAD (App. F, Fig. 9): pointwise distillation takes shortcuts off the curve, GAD does not.

Huang et al., "Restoring Initial Noise Sensitivity in Text-to-Image Distillation via Geometric Alignment" (GAD),
ICML 2026, arXiv 2606.01651. A v-prediction MLP teacher learns the 2D Swiss roll (40-step DDIM sampler). K-step
students start from the teacher and regress its states at their timesteps, from a pool of precomputed teacher
trajectories (teacher forcing); GAD adds Eq. 6 at the student's inputs x, with x' = x + h v.
Equation map: Eq. 5-6 -> response(), gad_loss(); Eq. 7 -> distil(); Table 1 -> evaluate.geometry_metrics.
--gad-form paper: Eq. 6 as printed, differences ~ h J v not divided by h, so the term scales as lambda h^2 (at the
paper's h = 1e-2, lambda = 1: inert here). --gad-form jvp (default): divided by h, a finite-difference JVP match
(as the released code does). --jvp exact: h J v by forward-mode AD instead of differences.
Settings (ours): off-manifold = farther than 0.2 (3.3 noise std; arms 1.26 apart) from the noise-free curve;
h = 0.1 (local at this scale; 1e-2 was for image latents); lambda = 0.3 (prototype range 0.1-1, not tuned); a cheap
teacher (3k steps, not cached) to fit 60 s on 2 CPUs. --extras: pointwise_2x (equal wall time; a GAD step costs ~2x)
and control (pointwise on x and x + h v, no difference term).
Deviation: one fixed v per pool state, its teacher response precomputed, not a fresh v every step (make_pool).
Commands: python swiss_roll.py (CPU, <= 60 s);  python swiss_roll.py --seeds 3 --student-steps 1.  Expect: fewer
off-manifold points and a higher JVP cosine for GAD at equal steps; pointwise_2x matches it at equal time (README).
"""
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

import common
from evaluate import geometry_metrics


@dataclass
class Args:
    # GAD (Eq. 6-7). Paper image settings (Table 11): h = 1e-2, lambda = 1, printed form.
    student_steps: int = 4  # student sampling steps (1, 2 or 4; the teacher uses 40)
    h: float = 0.1  # perturbation size, x' = x + h v (Eq. 6)
    lam: float = 0.3  # lambda, weight of L_GAD (Eq. 7)
    gad_form: Literal["paper", "jvp"] = "jvp"  # paper: Eq. 6 as printed (not / h); jvp: differences / h
    jvp: Literal["fd", "exact"] = "fd"  # student and teacher responses by finite difference or forward-mode AD
    # toy
    noise: float = 0.3  # Swiss-roll noise in raw units (std 0.06 after scaling by SCALE)
    off_threshold: float = 0.2  # off-manifold: distance to the noise-free curve above this (3.3 noise std)
    teacher_iters: int = 3000  # teacher training steps
    teacher_batch: int = 512  # teacher batch size
    student_iters: int = 1000  # student training steps (each student)
    student_batch: int = 512  # student batch size
    lr: float = 1e-2  # teacher Adam learning rate (cosine decay)
    student_lr: float = 1e-3  # student Adam learning rate (constant)
    pool: int = 16384  # precomputed teacher trajectories for teacher forcing
    n_eval: int = 4000  # evaluation noises z
    extras: bool = True  # also train the equal-time pointwise student and the x + h v control
    # run / system
    seeds: int = 1  # repeat with seeds seed .. seed + seeds - 1 and print mean +- std
    seed: int = 0  # first seed
    device: str = "auto"  # auto, cpu or cuda
    threads: int = 1  # CPU threads (0: CPU_THREADS or torch's default; 2 threads are no faster for this MLP)
    out: str = "runs/swiss_roll"  # output folder (figure, samples.npz, metrics.json)
    overwrite: bool = False  # replace the files of an earlier run in --out (a non-empty --out is refused otherwise)

T = 1000  # DDPM discrete timesteps, linear betas 1e-4 .. 2e-2
ALPHA_BAR = torch.cat([torch.cumprod(1 - torch.linspace(1e-4, 2e-2, T, dtype=torch.float64), 0), torch.ones(1)])
SCALE = 0.2  # raw roll (radius 4.7 .. 14) -> std about 1.3, arms 1.26 apart
TEACHER_TS = torch.cat([torch.linspace(T - 1, 0, 40).round().long(), torch.tensor([-1])])  # -1: clean (alpha_bar 1)

def swiss_roll(n: int, noise: float, device) -> torch.Tensor:
    """n points of the 2D Swiss roll (angle 1.5 pi .. 4.5 pi), Gaussian noise, times SCALE."""
    s = 1.5 * math.pi * (1 + 2 * torch.rand(n, device=device))
    return (torch.stack([s * s.cos(), s * s.sin()], 1) + noise * torch.randn(n, 2, device=device)) * SCALE

def dist_to_curve(x: torch.Tensor) -> torch.Tensor:
    """Distance of each point to the noise-free curve (5000 points, spacing < 6e-3: error < 3e-3)."""
    s = torch.linspace(1.5 * math.pi, 4.5 * math.pi, 5000, dtype=torch.float64, device=x.device)
    c = (torch.stack([s * s.cos(), s * s.sin()], 1) * SCALE).float()
    return torch.cat([torch.cdist(xb, c).min(1).values for xb in x.split(1000)])

class MLP(torch.nn.Module):
    """v-prediction network v(x_t, t) for teacher and students: sin/cos features of t, 4 x 128 SiLU layers."""

    def __init__(self, width: int = 128, depth: int = 4, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq))
        dims = [2 + 2 * n_freq] + [width] * depth
        layers = [m for a, b in zip(dims, dims[1:]) for m in (torch.nn.Linear(a, b), torch.nn.SiLU())]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 2))

    def forward(self, x, t):
        f = (t.float() / T)[:, None] * self.freqs
        return self.net(torch.cat([x, f.sin(), f.cos()], 1))

def ddim_step(net, x, t, s):
    """Deterministic DDIM step x_t -> x_s with a v-prediction (s = -1: to the clean sample x0)."""
    ab_t, ab_s = ALPHA_BAR.to(x.device)[t].float()[:, None], ALPHA_BAR.to(x.device)[s].float()[:, None]
    a_t, sig_t, a_s, sig_s = ab_t.sqrt(), (1 - ab_t).sqrt(), ab_s.sqrt(), (1 - ab_s).sqrt()
    v = net(x, t.expand(len(x)))
    x0, eps = a_t * x - sig_t * v, sig_t * x + a_t * v
    return a_s * x0 + sig_s * eps

def sample(net, x, ts):
    """Run DDIM through the timesteps ts (differentiable; wrap in no_grad where needed)."""
    for t, s in zip(ts[:-1], ts[1:]):
        x = ddim_step(net, x, t.view(1), s.view(1))
    return x

def response(phi, x, v, h: float, jvp: str, form: str, phi_x=None, phi_xp=None):
    """Eq. 5-6: the response of phi to x' = x + h v. Printed form: phi(x') - phi(x) (exact: h J v).
    jvp form: that divided by h, i.e. a finite-difference (or exact) Jacobian-vector product J v."""
    if jvp == "fd":
        d = (phi(x + h * v) if phi_xp is None else phi_xp) - (phi(x) if phi_x is None else phi_x)
    else:
        d = h * common.jvp(phi, x, v, "exact")
    return d / h if form == "jvp" else d

def gad_loss(d_s, d_t):
    """Eq. 6: E || student response - sg(teacher response) ||^2 (sum over dims, mean over the batch)."""
    return (d_s - d_t.detach()).pow(2).sum(1).mean()

def sliced_wasserstein(a, b, n_proj: int = 256, seed: int = 0):
    """Sliced W1 distance between two equal-size point sets (random directions, seeded)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(2, n_proj, generator=g), dim=0).to(a.device)
    return ((a @ w).sort(0).values - (b @ w).sort(0).values).abs().mean().item()

def fit_teacher(args, dev):
    """Standard diffusion training: v-prediction loss at uniform t, fresh Swiss-roll samples each step."""
    net = MLP().to(dev)
    opt = torch.optim.Adam(net.parameters(), args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.teacher_iters)
    ab = ALPHA_BAR.to(dev).float()
    for step in range(args.teacher_iters):
        x0, eps = swiss_roll(args.teacher_batch, args.noise, dev), torch.randn(args.teacher_batch, 2, device=dev)
        t = torch.randint(0, T, (args.teacher_batch,), device=dev)
        a, sig = ab[t].sqrt()[:, None], (1 - ab[t]).sqrt()[:, None]
        loss = (net(a * x0 + sig * eps, t) - (a * eps - sig * x0)).pow(2).sum(1).mean()
        common.check_finite(step, teacher=loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(), sched.step()
    return net.requires_grad_(False).eval()

@torch.no_grad()
def make_pool(teacher, args, student_ts, dev):
    """Teacher forcing pool per student segment i: input x_i (teacher 40-step state at student time i), target
    x_{i+1}, a direction v, the teacher's response d_T (Eq. 6) and the teacher's output at x_i + h v (control)."""
    m, x, pool = 40 // args.student_steps, torch.randn(args.pool, 2, device=dev), []
    for i in range(args.student_steps):
        phi_t = lambda y, i=i: sample(teacher, y, TEACHER_TS[i * m:(i + 1) * m + 1].to(dev))
        v = torch.randn_like(x)  # DEVIATION: one fixed v per pool state (teacher response computed once)
        y, y_p = phi_t(x), phi_t(x + args.h * v)
        d_t = response(phi_t, x, v, args.h, args.jvp, args.gad_form, phi_x=y, phi_xp=y_p)
        pool.append(dict(x=x, target=y, v=v, d_t=d_t, target_p=y_p,
                         t=student_ts[i].expand(args.pool), s=student_ts[i + 1].expand(args.pool)))
        x = y
    return {k: torch.cat([p[k] for p in pool]) for k in pool[0]}

def distil(student, opt, pool, args, mode: str, iters: int):
    """Eq. 7: L = L_pointwise + lambda L_GAD (mode 'gad'), L_pointwise alone ('pointwise'), or L_pointwise on
    x and on x + h v without the difference term ('control'). Random segments from the pool each step."""
    student.requires_grad_(True).train()
    for step in range(iters):
        idx = torch.randint(0, len(pool["x"]), (args.student_batch,), device=pool["x"].device)
        b = {k: v[idx] for k, v in pool.items()}
        phi_s = lambda y, b=b: ddim_step(student, y, b["t"], b["s"])
        y = phi_s(b["x"])
        loss = (y - b["target"]).pow(2).sum(1).mean()
        if mode == "gad":
            d_s = response(phi_s, b["x"], b["v"], args.h, args.jvp, args.gad_form, phi_x=y)
            loss = loss + args.lam * gad_loss(d_s, b["d_t"])
        elif mode == "control":
            loss = loss + (phi_s(b["x"] + args.h * b["v"]) - b["target_p"]).pow(2).sum(1).mean()
        common.check_finite(step, **{mode: loss})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return copy.deepcopy(student).requires_grad_(False).eval()

def run_seed(args, seed, dev):
    common.seed_everything(seed)
    z, data = torch.randn(args.n_eval, 2, device=dev), swiss_roll(args.n_eval, args.noise, dev)  # same for all runs
    times, t0 = {}, time.time()
    teacher = fit_teacher(args, dev)
    times["teacher"], t0 = time.time() - t0, time.time()
    student_ts = TEACHER_TS[::40 // args.student_steps].to(dev)  # every m-th teacher time; the last step -> x0
    pool = make_pool(teacher, args, student_ts, dev)
    times["pool"] = time.time() - t0
    students = {}
    for name in ["pointwise", "gad"] + (["pointwise_2x", "control"] if args.extras else []):
        t0 = time.time()
        if name != "pointwise_2x":  # every student starts from the teacher; pointwise_2x continues pointwise
            live = copy.deepcopy(teacher)
            opt = torch.optim.Adam(live.parameters(), args.student_lr)
        students[name] = distil(live, opt, pool, args, name.replace("_2x", ""), args.student_iters)
        times[name] = time.time() - t0 + (times["pointwise"] if name == "pointwise_2x" else 0)
    # evaluation: off-manifold rate, 'new off' (off where the teacher from the same z is on), sliced W1 to the
    # teacher's samples, geometry metrics of the student's map z -> x0 against the teacher's 40-step map
    t0 = time.time()
    phi_t = lambda y: sample(teacher, y, TEACHER_TS.to(dev))
    maps = {"data": lambda _: data, "teacher": phi_t} | {n: lambda y, s=s: sample(s, y, student_ts)
                                                          for n, s in students.items()}
    with torch.no_grad():
        samples = {"z": z} | {n: phi(z) for n, phi in maps.items()}
        off = {n: dist_to_curve(samples[n]) > args.off_threshold for n in maps}
    rows = {n: dict(off=off[n].float().mean().item(), new_off=(off[n] & ~off["teacher"]).float().mean().item(),
                    sw=sliced_wasserstein(samples[n], samples["teacher"])) for n in maps}
    for n in students:
        rows[n].update(geometry_metrics(maps[n], phi_t, z[:1000], n_dirs=4, seed=seed))
    times["eval"] = time.time() - t0
    for n in set(rows) & set(times):
        rows[n]["time_s"] = times[n]
    return rows, times, {k: v.cpu().numpy() for k, v in samples.items()}

def plot(samples, rows, args, path):
    """Fig. 9: data, teacher (40 DDIM steps), pointwise and GAD students. Red: off-manifold points; for the
    students only their shortcuts (off where the teacher from the same z is on), orange: off for both."""
    plt = common.pyplot()
    names, k = ["data", "teacher", "pointwise", "gad"], f"{args.student_steps} step{'s' * (args.student_steps > 1)}"
    off = {n: dist_to_curve(torch.from_numpy(samples[n])).numpy() > args.off_threshold for n in names}
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.5))
    for ax, n, title in zip(axes, names, ["data", "teacher (40 DDIM steps)", f"pointwise ({k})", f"GAD ({k})"]):
        x, red = samples[n], off[n] & ~off["teacher"] if n in ("pointwise", "gad") else off[n]
        ax.scatter(*x[~off[n]].T, s=1.5, c="tab:blue", alpha=0.5)
        ax.scatter(*x[off[n] & ~red].T, s=4, c="orange")
        ax.scatter(*x[red].T, s=5, c="red")
        sub = f", shortcuts (red) {100 * rows[n]['new_off']:.1f}%" if n in ("pointwise", "gad") else " (red)"
        ax.set(title=f"{title}\noff-manifold {100 * rows[n]['off']:.1f}%{sub}", aspect="equal", xlim=(-3.2, 3.2),
               ylim=(-3.2, 3.2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

# valid ranges of the numeric flags (common.RANGES covers seeds, lr, threads): checked before anything runs
RANGES = {"student_steps": (lambda k: k in (1, 2, 4), "must be 1, 2 or 4"), "h": "> 0", "lam": ">= 0", "noise": "> 0",
          "off_threshold": "> 0", "teacher_iters": ">= 1", "teacher_batch": ">= 1", "student_iters": ">= 1",
          "student_batch": ">= 1", "pool": ">= 1", "n_eval": ">= 1"}

def train(args) -> dict:
    common.start_run(args, RANGES)  # flags and --out (never clobbered without --overwrite), before any training
    common.set_cpu_threads(args.threads)
    dev = common.pick_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    per_seed = []
    for seed in range(args.seed, args.seed + args.seeds):
        rows, times, samples = run_seed(args, seed, dev)
        per_seed.append(rows)
        print(f"seed {seed} wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
        if seed == args.seed:
            np.savez(os.path.join(args.out, "samples.npz"), **samples)
            plot(samples, rows, args, os.path.join(args.out, "swiss_roll.png"))
    cols = {"off": "off %", "new_off": "new off %", "sw": "SW to T", "jvp_cos": "JVP cos", "jac_norm_ratio": "|J| ratio",
            "jac_norm_ratio_top10": "top10 ratio", "time_s": "train s"}
    summary = {n: {k: [float(np.mean(v)), float(np.std(v, ddof=min(1, len(v) - 1)))] for k in cols if k in per_seed[0][n]
                   for v in [[r[n][k] * (100 if "off" in k else 1) for r in per_seed]]} for n in per_seed[0]}
    print(f"{args.student_steps}-step students, --gad-form {args.gad_form} --jvp {args.jvp} --h {args.h} --lam {args.lam}; "
          f"off = distance to the curve > {args.off_threshold}; mean +- std over {args.seeds} seed(s)")
    print(f"{'':13}" + "".join(f"{c:>17}" for c in cols.values()))
    for n, row in summary.items():
        print(f"{n:13}" + "".join(f"{row[k][0]:>9.3f} +-{row[k][1]:5.3f}" if k in row else " " * 17 for k in cols))
    result = dict(args=asdict(args), summary=summary, per_seed=per_seed)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result

if __name__ == "__main__":
    common.main(Args, train)
