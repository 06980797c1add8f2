"""Score-based GAD (Eq. 9-10) on the Swiss roll: which route of the GAD vector moves the student's geometry?

Huang et al., "Restoring Initial Noise Sensitivity in Text-to-Image Distillation via Geometric Alignment" (GAD),
ICML 2026, arXiv 2606.01651. swiss_roll.py shows the pointwise form (Eq. 6); gad_tdm/gad_sid use the score-based
form: a learned fake score F and the teacher T are both perturbed at the re-noised student sample x_tau, and
  g = (Delta_F - Delta_T) / h,   Delta_f = f_x0(x_tau + h v, tau) - f_x0(x_tau, tau)          (Eq. 10, jvp form)
must reach the student's parameters. Three routes (gad_term(), a few lines each):
  xtau      mean(sg(g) . x_tau): Eq. 9 as printed; g multiplies dx_tau/dtheta, which does not depend on v.
  released  the authors' released block: ds = (S_x0(x_tau + delta, tau) - x0_hat) / h, where x0_hat = the student's
            x0 at its own last input (x_{K-1}, t_{K-1}): a difference between mismatched inputs;
            pseudo-Huber(ds - sg(ds + Delta_T/h - Delta_F/h)) / mean|ds - Delta_T/h|, delta = h v/|v| (unit norm).
  response  mean(sg(g) . [S_x0(x_tau + h v, tau) - S_x0(x_tau, tau)] / h): the student's own matched response
            (gad_tdm.py --gad-path response).
Base (no GAD): a K-step student distilled DMD2-style with a learned fake score: the fake learns
sg(student x0) by denoising; the student follows the normalised (F - T) x0 difference at the re-noised x_tau.
Equation map: Eq. 10 -> response_pair(); Eq. 9 and the two other routes -> gad_term(); Eq. 7 -> distil().
Teacher, sampler and metrics come from swiss_roll.py (off-manifold %, new-off %, sliced W1, JVP cosine, |J| ratios).
Deviations: the base is DMD2's L2 loss with its |x0 - T| normaliser (TDM: pseudo-Huber) on the K-step sample, back-
propagated through all K steps (DMD2: backward simulation; TDM: intermediate points), re-noised at tau ~ U[tau_min,
tau_max); students start from swiss_roll.py's pointwise student (--pre-iters), the fake from the teacher; the
released route keeps the released code's Huber normaliser and unit direction, in fp32 (its fp16 cast of x_tau + delta:
not kept).
h = 0.1, lambda: chosen on seed 0, K = 1 (README: response 0.1 of {0.1, 0.3, 1}; xtau, released: 1); same for K = 4.
Commands: python swiss_roll_routes.py --seed S --seeds 1 --out runs/routes_sS   (S = 0, 1, 2: K = 1 and 4; ~12 min
each, 3 in parallel on 2 shared cores), then python swiss_roll_routes.py --merge runs/routes_s{0,1,2}/metrics.json for the table.
Expect (docs/readme_toys_gad_routes.md): xtau indistinguishable from base; response at lambda 0.1 too, and at
lambda >= 0.3 it lowers the JVP cosine (breaks the sampler at 1); released raises the 4-step JVP cosine but adds
off-manifold points at 1 step.
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import common
import swiss_roll as sr
from evaluate import geometry_metrics

ROUTES = ("xtau", "released", "response")


@dataclass
class Args:
    # GAD (Eq. 7, 9-10); chosen on seed 0, K = 1 (see the README section); the paper's PixArt values: h 1e-2, lambda 1
    h: float = 0.1  # perturbation size h (all routes; the released route moves by h along a unit direction)
    lam_xtau: float = 1.0  # lambda of Eq. 7, route xtau
    lam_released: float = 1.0  # lambda, route released (its loss is Huber-normalised, a different scale)
    lam_response: float = 0.1  # lambda, route response (0.3 and 1 lowered the JVP cosine; 1 broke the sampler)
    huber_c: float = 1e-3  # pseudo-Huber constant of the released route (released code)
    # base: DMD2-style distillation with a learned fake score
    student_steps: tuple[int, ...] = (1, 4)  # K-step students to train (1, 2 or 4)
    routes: tuple[str, ...] = ROUTES  # GAD routes to train next to the base (xtau, released, response)
    iters: int = 800  # generator iterations per student (one fake update each)
    batch: int = 256  # batch size (student, fake)
    student_lr: float = 1e-4  # student Adam learning rate
    fake_lr: float = 1e-3  # fake-score Adam learning rate
    betas: tuple[float, ...] = (0.0, 0.99)  # Adam betas (DMD2)
    tau_min: int = 20  # re-noising range tau ~ U[tau_min, tau_max) (DMD2: 0.02 T .. 0.98 T)
    tau_max: int = 980
    pre_iters: int = 1000  # student init: swiss_roll.py's pointwise (teacher-forced) student after this many steps
    pool: int = 16384  # teacher trajectories for that pointwise init (swiss_roll.make_pool)
    eqtime: bool = True  # also train base to GAD's wall time (continued from base; steps x measured time ratio)
    # teacher and evaluation (swiss_roll.py's defaults)
    noise: float = 0.3  # Swiss-roll noise in raw units
    off_threshold: float = 0.2  # off-manifold: distance to the noise-free curve above this
    teacher_iters: int = 3000  # teacher training steps
    teacher_batch: int = 512  # teacher batch size
    lr: float = 1e-2  # teacher Adam learning rate (cosine decay)
    n_eval: int = 4000  # evaluation noises z
    # run / system
    seeds: int = 3  # seeds seed .. seed + seeds - 1, mean +- std
    seed: int = 0  # first seed
    device: str = "auto"  # auto, cpu or cuda
    threads: int = 1  # CPU threads
    out: str = "runs/swiss_roll_routes"  # output folder (figure, metrics.json)
    merge: tuple[str, ...] = ()  # metrics.json files of single-seed runs: print their mean +- std table, no training


def x0_pred(net, x, t):
    """x0 of a v-prediction net at (x, t): x0 = alpha_t x - sigma_t v."""
    ab = sr.ALPHA_BAR.to(x.device)[t].float()[:, None]
    return ab.sqrt() * x - (1 - ab).sqrt() * net(x, t)


def response_pair(net, x, d, tau):
    """Eq. 10: the x0 prediction f(x) and Delta = f(x + d) - f(x) at noise level tau, in one batched call."""
    base, pert = x0_pred(net, torch.cat([x, x + d]), tau.repeat(2)).chunk(2)
    return base, pert - base


def gad_term(route, student, x_tau, x0_hat, tau, d, dT, dF, h, huber_c):
    """The GAD loss whose gradient carries g = (Delta_F - Delta_T)/h to the student (descent moves the student's
    response towards the teacher's and away from the fake's). x_tau carries grad (through x0_hat)."""
    g = ((dF - dT) / h).detach()
    if route == "xtau":  # Eq. 9 as printed: g . dx_tau/dtheta
        return (g * x_tau).sum(1).mean()
    if route == "response":  # the student's own matched response [S(x_tau + h v) - S(x_tau)] / h
        return (g * response_pair(student, x_tau.detach(), d, tau)[1] / h).sum(1).mean()
    if route == "released":  # released code: student base x0_hat at its own (x, t), not (x_tau, tau); Huber
        ds = (x0_pred(student, x_tau.detach() + d, tau) - x0_hat) / h
        target = (ds + (dT - dF) / h).detach()
        W = (ds - dT / h).abs().mean(1, keepdim=True).detach()
        return ((((ds - target).pow(2) + huber_c**2).sqrt() - huber_c) / W).mean()
    raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")


def pointwise_init(teacher, args, K):
    """The students' starting point: swiss_roll.py's pointwise student (regression on the teacher's 40-step states,
    Adam 1e-3) after --pre-iters steps. (From the raw teacher, a 1-step DMD student was still 34% off-manifold after
    3000 steps on seed 0: too slow for this budget.)"""
    dev = next(teacher.parameters()).device
    a = sr.Args(student_steps=K, noise=args.noise, pool=args.pool)
    pool = sr.make_pool(teacher, a, sr.TEACHER_TS[:: 40 // K].to(dev), dev)
    student = copy.deepcopy(teacher)
    return sr.distil(student, torch.optim.Adam(student.parameters(), a.student_lr), pool, a, "pointwise",
                     args.pre_iters)


def distil(teacher, init, args, K, route, iters, state=None):
    """DMD2-style distillation of a K-step student from `init` (+ lambda * GAD through `route`, or none); the fake
    score starts from the teacher. Returns the state (student, fake, optimisers) so a run can be continued."""
    dev = next(teacher.parameters()).device
    ts = sr.TEACHER_TS[:: 40 // K].to(dev)  # student times t_0 > ... > t_{K-1} > clean
    if state is None:
        student, fake = copy.deepcopy(init).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
        state = dict(student=student, fake=fake, opt_s=torch.optim.Adam(student.parameters(), args.student_lr,
                     betas=args.betas), opt_f=torch.optim.Adam(fake.parameters(), args.fake_lr, betas=args.betas))
    student, fake, opt_s, opt_f = state["student"], state["fake"], state["opt_s"], state["opt_f"]
    ab, B = sr.ALPHA_BAR.to(dev).float(), args.batch
    lam = getattr(args, f"lam_{route}") if route else 0.0
    for step in range(iters):
        # 1. the student's sample x0_hat = Phi_S(z): its K-step rollout, back-propagated through every step
        x0_hat = sr.sample(student, torch.randn(B, 2, device=dev), ts)
        # 2. fake-score update: denoising (v-prediction) loss on sg(x0_hat) re-noised at uniform t
        t = torch.randint(0, sr.T, (B,), device=dev)
        a, sig, eps = ab[t].sqrt()[:, None], (1 - ab[t]).sqrt()[:, None], torch.randn(B, 2, device=dev)
        x0 = x0_hat.detach()
        loss_fake = (fake(a * x0 + sig * eps, t) - (a * eps - sig * x0)).pow(2).sum(1).mean()
        opt_f.zero_grad(set_to_none=True)
        loss_fake.backward()
        opt_f.step()
        # 3. generator: x_tau = alpha x0_hat + sigma eps; DMD2 gradient (F - T) / mean|x0_hat - T|
        tau = torch.randint(args.tau_min, args.tau_max, (B,), device=dev)
        a, sig = ab[tau].sqrt()[:, None], (1 - ab[tau]).sqrt()[:, None]
        x_tau = a * x0_hat + sig * torch.randn(B, 2, device=dev)
        v = torch.randn(B, 2, device=dev)
        d = args.h * (v / v.norm(dim=1, keepdim=True) if route == "released" else v)  # released: unit direction
        with torch.no_grad():  # Eq. 10 for teacher and fake (the unperturbed half feeds the base loss)
            T0, dT = response_pair(teacher, x_tau.detach(), d, tau)
            F0, dF = response_pair(fake, x_tau.detach(), d, tau)
        W = (x0_hat - T0).abs().mean(1, keepdim=True).detach()
        loss = 0.5 * (x0_hat - (x0_hat - (F0 - T0) / W).detach()).pow(2).sum(1).mean()
        gad = gad_term(route, student, x_tau, x0_hat, tau, d, dT, dF, args.h, args.huber_c) if route else 0 * loss
        common.check_finite(step, fake=loss_fake, dmd=loss, gad=gad)
        opt_s.zero_grad(set_to_none=True)
        (loss + lam * gad).backward()  # Eq. 7
        opt_s.step()
    return state


def evaluate(teacher, student, K, z, data, samples_t, off_t, args, seed):
    """swiss_roll.py's metrics of the student's K-step map z -> x0 against the teacher's 40-step map."""
    ts = sr.TEACHER_TS[:: 40 // K].to(z.device)
    phi_s = lambda y: sr.sample(student, y, ts)
    phi_t = lambda y: sr.sample(teacher, y, sr.TEACHER_TS.to(z.device))
    with torch.no_grad():
        x = phi_s(z)
    off = sr.dist_to_curve(x) > args.off_threshold
    row = dict(off=off.float().mean().item(), new_off=(off & ~off_t).float().mean().item(),
               sw=sr.sliced_wasserstein(x, samples_t))
    row.update(geometry_metrics(phi_s, phi_t, z[:1000], n_dirs=4, seed=seed))
    return row, x


def run_seed(args, seed, dev):
    common.seed_everything(seed)
    z, data = torch.randn(args.n_eval, 2, device=dev), sr.swiss_roll(args.n_eval, args.noise, dev)
    teacher = sr.fit_teacher(args, dev)
    with torch.no_grad():
        x_t = sr.sample(teacher, z, sr.TEACHER_TS.to(dev))
    off_t = sr.dist_to_curve(x_t) > args.off_threshold
    rows = {"teacher": dict(off=off_t.float().mean().item(), new_off=0.0, sw=sr.sliced_wasserstein(x_t, x_t))}
    samples = {"data": data, "teacher": x_t}
    for K in args.student_steps:
        init = pointwise_init(teacher, args, K)
        row, samples[f"K{K}/init"] = evaluate(teacher, init, K, z, data, x_t, off_t, args, seed)
        rows[f"K{K}/init"] = row
        times, students = {}, {}
        for route in ("",) + args.routes:
            torch.manual_seed(seed * 1000 + K)  # the same batches and noises for every route
            t0 = time.time()
            students[route or "base"] = distil(teacher, init, args, K, route, args.iters)
            times[route or "base"] = time.time() - t0
        ratio = max(times[r] for r in args.routes) / times["base"] if args.routes else 1.0
        if args.eqtime:  # continue base for (ratio - 1) x iters more steps: base at GAD's wall time
            extra = round((ratio - 1) * args.iters)
            torch.manual_seed(seed * 1000 + K + 1)
            base = students["base"]
            students["base_eqtime"] = distil(teacher, init, args, K, "", extra, state=_clone_state(base, args))
            times["base_eqtime"] = times["base"] * (1 + extra / args.iters)
        for name, st in students.items():
            row, x = evaluate(teacher, st["student"].eval(), K, z, data, x_t, off_t, args, seed)
            rows[f"K{K}/{name}"] = row | dict(time_s=times[name])
            samples[f"K{K}/{name}"] = x
        print(f"seed {seed} K={K} wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) +
              f" (GAD/base ratio {ratio:.2f})", flush=True)
    return rows, {k: v.cpu().numpy() for k, v in samples.items()}


def _clone_state(state, args):
    """A copy of (student, fake, optimisers) that continues training without touching the original."""
    student, fake = copy.deepcopy(state["student"]), copy.deepcopy(state["fake"])
    opt_s = torch.optim.Adam(student.parameters(), args.student_lr, betas=args.betas)
    opt_f = torch.optim.Adam(fake.parameters(), args.fake_lr, betas=args.betas)
    opt_s.load_state_dict(state["opt_s"].state_dict()), opt_f.load_state_dict(state["opt_f"].state_dict())
    return dict(student=student.train(), fake=fake, opt_s=opt_s, opt_f=opt_f)


def plot(samples, rows, args, path):
    """Like swiss_roll.png: one row per K; red = new off-manifold points (teacher on, student off), orange = off
    for both."""
    plt = common.pyplot()
    names = ["base", *args.routes]
    Ks = args.student_steps
    fig, axes = plt.subplots(len(Ks), 2 + len(names), figsize=(3.2 * (2 + len(names)), 3.4 * len(Ks)), squeeze=False)
    off_t = sr.dist_to_curve(torch.from_numpy(samples["teacher"])).numpy() > args.off_threshold
    for i, K in enumerate(Ks):
        for ax, n in zip(axes[i], ["data", "teacher"] + [f"K{K}/{n}" for n in names]):
            x = samples[n]
            off = sr.dist_to_curve(torch.from_numpy(x)).numpy() > args.off_threshold
            red = off & ~off_t if "/" in n else off
            ax.scatter(*x[~off].T, s=1, c="tab:blue", alpha=0.5)
            ax.scatter(*x[off & ~red].T, s=3, c="orange")
            ax.scatter(*x[red].T, s=4, c="red")
            title = n if n == "data" else (f"{n} (40 steps)" if n == "teacher" else f"{n.split('/')[1]}, K={K}")
            sub = (f"\nnew off {100 * rows[n]['new_off']:.1f}%, JVP cos {rows[n]['jvp_cos']:.3f}" if "/" in n
                   else f"\noff {100 * off.mean():.1f}%")
            ax.set(title=title + sub, aspect="equal", xlim=(-3.2, 3.2), ylim=(-3.2, 3.2), xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLS = {"off": "off %", "new_off": "new off %", "sw": "SW to T", "jvp_cos": "JVP cos", "jac_norm_ratio": "|J| ratio",
        "jac_norm_ratio_top10": "top10 ratio", "time_s": "train s"}


def summarize(per_seed, args) -> dict:
    """Mean +- std over seeds of every row, printed as a table (off rates in %)."""
    summary = {n: {k: [float(np.mean(v)), float(np.std(v, ddof=min(1, len(v) - 1)))] for k in COLS if k in per_seed[0][n]
                   for v in [[r[n][k] * (100 if "off" in k else 1) for r in per_seed]]} for n in per_seed[0]}
    print(f"--h {args.h} --lam-xtau {args.lam_xtau} --lam-released {args.lam_released} --lam-response "
          f"{args.lam_response} --iters {args.iters}; "
          f"mean +- std over {len(per_seed)} seed(s)")
    print(f"{'':17}" + "".join(f"{c:>17}" for c in COLS.values()))
    for n, row in summary.items():
        print(f"{n:17}" + "".join(f"{row[k][0]:>9.3f} +-{row[k][1]:5.3f}" if k in row else " " * 17 for k in COLS))
    return summary


def train(args) -> dict:
    if args.merge:
        per_seed = [r for path in args.merge for r in json.load(open(path))["per_seed"]]
        return dict(summary=summarize(per_seed, args), per_seed=per_seed)
    if any(K not in (1, 2, 4) for K in args.student_steps) or args.h <= 0 or args.seeds < 1 or args.iters < 1:
        raise ValueError("need --student-steps in {1, 2, 4}, --h > 0, --seeds >= 1, --iters >= 1")
    if any(r not in ROUTES for r in args.routes):
        raise ValueError(f"--routes must be among {ROUTES}, got {args.routes}")
    common.set_cpu_threads(args.threads)
    dev = common.pick_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    per_seed = []
    for seed in range(args.seed, args.seed + args.seeds):
        rows, samples = run_seed(args, seed, dev)
        per_seed.append(rows)
        if seed == args.seed:
            plot(samples, rows, args, os.path.join(args.out, "swiss_roll_routes.png"))
    result = dict(args=asdict(args), summary=summarize(per_seed, args), per_seed=per_seed)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    train(common.parse(Args))
