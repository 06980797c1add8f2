"""GAD on Score identity Distillation (SiD) for flow-matching DiTs: a 4-step SANA student.

Huang et al., "Restoring Initial Noise Sensitivity in Text-to-Image Distillation via Geometric Alignment"
(GAD, ICML 2026, arXiv 2606.01651), Sec. 4.2 score-based form, Table 3 setting C, Tables 10-11 (SANA).
Base: SiD for flow matching (Zhou et al. 2025, arXiv 2509.25127) as ml-sid-dit runs it on SANA.
SiD trains a 4-step generator against a frozen teacher and a fake score fitted to the generator's samples
(Fisher-divergence gradient through both scores). GAD adds a term that matches how the two scores *respond*
to a small move h v of the noisy sample x_t: the generator is pushed where the fake's response differs from
the teacher's.

Flow conventions (SANA, SD3): x_s = (1 - s) x0 + s eps, the net predicts v = eps - x0, so from v:
    x0 = x_s - s v,   eps = x_s + (1 - s) v,   score = -eps / s.
Eq. 9 in flow form. Eq. 9's (Delta eps_fake - Delta eps_real) is DMD's score-space gradient (s_fake - s_real)
with eps written for s. With Delta eps = h v_dir + (1 - s) Delta v and Delta x0 = h v_dir - s Delta v:
    Delta s_fake - Delta s_real = -(Delta eps_f - Delta eps_r) / s = ((1 - s) / s^2) (Delta x0_f - Delta x0_r).
    Delta x0_f - Delta x0_r = -s (Delta v_f - Delta v_r) = -(s / (1 - s)) (Delta eps_f - Delta eps_r).
We use the x0-space direction D = w(s) (Delta x0_f - Delta x0_r) [/ h], the SiD weight w = 1 - s replacing the
(1 - s)/s^2 score weight, so that D is the change of SiD's own direct x_g-gradient w (y_f - y_r) between x_t + h v
and x_t (the surrogate's gradient on x_g carries one more factor dx_t/dx_g = 1 - s), with the orientation of the
released GAD code (it pulls the student's x0 response toward Delta_T - Delta_F).
Surrogate: L_GAD = mean(sg(D) * x_t), whose gradient is D dx_t/dtheta (Eq. 9). Descending it moves x_t along
Delta x0_real - Delta x0_fake. Read literally in eps, Eq. 9 has the opposite sign (the factor -s/(1 - s) above),
so it would push against the base loss's own direction; tests check the orientation we use.
Note: Eq. 9 is linear in v_dir to first order and dx_t/dtheta does not depend on v_dir, so its mean over
v_dir ~ N(0, I) is only O(h) (the Laplacian of the score gap); single draws carry the signal as noise-like
per-sample pushes. --gad-path response drives G's own matched response instead: the repaired form of the released
TDM block (matched base, x_t detached, 1/2 MSE; see gad_tdm.py), whose mean over directions is not zero.

Equation map:
    Eq. 7  (L_base + lambda L_GAD)                 -> train(), step 2
    Eq. 9  (score-form GAD gradient)               -> gad_direction(), gad_surrogate()
    Eq. 10 (Delta eps = eps(x_t + h v) - eps(x_t)) -> gad_delta() (fd pair or exact JVP), x0 form
    Eq. 6/8 scaling (--gad-form paper: differences not divided by h)  -> gad_direction()
    SiD generator loss (Zhou et al. 2025)          -> sid_generator_loss();  fake-score loss -> fake_score_loss()
    SiD 4-step generator, fresh noise per step     -> rollout()
Deviations:
    - Eq. 9 read in score space (orientation of DMD/SiD and of the released GAD code), weighted by SiD's w(s)
      instead of (1 - s)/s^2; see above.  # DEVIATION marked at gad_direction()
    - --gad-form jvp (default) divides the differences by h as the released code does; Eq. 6/8/9 as printed
      (--gad-form paper) is h times weaker: its gradient is h x the jvp form's (1e-2 at h = 1e-2).
    - Adam betas (0, 0.999) as released SiD; the paper's App. D says AdamW (0.9, 0.999) for every backbone.
    - Eq. 10's Delta by forward-mode AD by default (--gad-jvp exact: h J v, common.jvp_pair) in the step's precision
      (bf16 on CUDA; cosine 0.99999 with a float64 JVP at SANA-600M's size, tests/test_gad_precision.py): one extra
      no-grad JVP per network. --gad-jvp fd: finite differences, always in fp32 (inputs, networks, outputs) since
      the bf16 grid (2^-8) swallows an h = 1e-2 move; under bf16 the pair [x_t, x_t + h v] is one extra fp32 forward.
    - Non-finite loss stops the run naming the step; released SiD drops NaN samples silently.
Recipe as ml-sid-dit runs it (training/sid_dit_training_loop.py; issue 11): losses reduced as there,
    generator sum x loss_scaling_G (100) / batch and fake sum / batch (--loss-reduction sum, default; loss_scale());
    --loss-reduction mean gives per-element means (819,200x smaller generator loss at SANA-512: the same direction,
    but Adam's eps = 1e-8 weighs more). Constant lr, no warm-up (no scheduler there): --lr-schedule constant.
    No EMA (ema_halflife_kimg = 0, and G_ema = None under FSDP): --ema-decay 0; > 0 exports the EMA.
    - One generator sample per iteration serves both updates (generator first, then the fake on sg(x_g)).
    - fp16 is refused (two optimisers would need two GradScalers); use bf16 or fp32.
    - --fsdp: the generator step k is rank 0's draw on every rank (a sharded G must run equally often on all ranks);
      under DDP each rank draws its own k.
Commands:
    GPU:      python gad_sid.py                          (SANA 600M 512px, batch 8, 5k steps, bf16)
    torchrun: torchrun --nproc_per_node 8 gad_sid.py     (batch 8 per GPU as in Table 11)
    less memory: python gad_sid.py --batch-size 4 --grad-accum 2   (8 per optimiser step, 2 micro-batches of 4)
    sharded:  torchrun --nproc_per_node 8 gad_sid.py --fsdp --grad-ckpt   (FSDP2; README "Scale")
    CPU tiny: python gad_sid.py --model tiny --steps 20 --batch-size 2 --sample-every 10 --eval --threads 1
    plain SiD: --gad-weight 0.   fp32 finite differences instead of bf16 JVPs: --gad-jvp fd.   Overhead: --bench 5.
Expect: runs/gad_sid/{metrics.jsonl, curves.png, samples_*.png, ckpt.pt, pipeline/}. On the tiny model the
losses are noise around small values; on SANA loss_sid turns negative and grids sharpen within ~1k steps.
Reload with:
  pipe = DiffusionPipeline.from_pretrained("runs/gad_sid/pipeline")
  pipe(prompt, sigmas=[1.0, 0.75, 0.5, 0.25], num_inference_steps=4, guidance_scale=1.0, use_resolution_binning=False,
       clean_caption=False)
"""
import copy
import math
import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Literal

import torch

import common
from evaluate import diversity, geometry_metrics


@dataclass
class Args:
    lr: float = 5e-6  # generator learning rate (Table 11, SANA)
    lr_fake: float = 5e-6  # fake-score learning rate (SiD uses the generator's)
    betas: tuple[float, ...] = (0.0, 0.999)  # Adam betas (released SiD; paper App. D: AdamW 0.9, 0.999)
    cfg: float = 4.5  # teacher CFG scale w (SiD on SANA)
    fake_cfg: bool = True  # CFG on the fake score too, as released SiD ("long-short guidance")
    alpha: float = 1.0  # SiD alpha in (y_r - y_f).[(y_r - x_g) - alpha (y_r - y_f)]
    t_gen: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # generator steps t_i (fresh noise at each)
    sigma_logit_mean: float = math.log(2)  # sigma ~ sigmoid(N(mean, std^2)) (SiD)
    sigma_logit_std: float = 1.6  # std of the logit-normal sigma (SiD)
    gad_weight: float = 1.0  # lambda, Eq. 7 (Table 11); 0 = plain SiD
    gad_h: float = 1e-2  # perturbation scale h (Table 11, SANA)
    gad_form: Literal["jvp", "paper"] = "jvp"  # jvp: differences / h (released code); paper: Eq. 9 as printed
    gad_jvp: Literal["exact", "fd"] = "exact"  # exact: forward-mode AD (h J v); fd: finite differences in fp32
    gad_fp32: bool = False  # exact: JVPs in fp32 too (default: the step's precision, bf16 on CUDA). fd: always fp32
    gad_path: Literal["xtau", "response"] = "xtau"  # Eq. 9's gradient via dx_t/dtheta (paper) or G's own response
    gad_batched: bool = True  # fp32 + fd: perturbed rows ride in the SiD teacher/fake forwards (fewest calls)
    loss_reduction: Literal["sum", "mean"] = "sum"  # sum: ml-sid-dit's scale (G: sum x 100 / batch, fake: sum / batch)
    lr_schedule: Literal["constant", "cosine_with_restarts"] = "constant"  # lr schedule (ml-sid-dit: none, constant)
    lr_warmup: int = 0  # linear lr warm-up steps (ml-sid-dit: none)
    ema_decay: float = 0.0  # EMA of the generator, exported when on; 0 = off (ml-sid-dit keeps none under FSDP)
    model: str = "Efficient-Large-Model/Sana_600M_512px_diffusers"  # hub id, local dir, 'tiny', or 'random' (real size)
    out: str = "runs/gad_sid"  # output directory
    steps: int = 5000  # training iterations (Table 11, SANA)
    batch_size: int = 8  # per-GPU micro-batch (Table 11, SANA); global = batch x accumulation x GPUs
    grad_accum: int = 1  # micro-batches of --batch-size per optimiser step (gradients summed; 1 = none)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # autocast dtype; auto = bf16 on CUDA, fp32 on CPU
    grad_ckpt: bool = False  # gradient checkpointing of generator and fake (diffusers enable_gradient_checkpointing)
    fsdp: bool = False  # FSDP2: shard generator, fake and teacher per transformer block (default: DDP)
    offload: bool = False  # FSDP2 CPUOffloadPolicy: shards, gradients and optimizer states in CPU memory (needs --fsdp)
    device: str = "auto"  # cuda, cpu or auto
    seed: int = 0  # global seed (offset by rank)
    resume: str = ""  # '' | 'latest' | 'auto' (latest if there is one) | path to ckpt.pt
    overwrite: bool = False  # start fresh in a non-empty --out (its files are replaced as the run writes them)
    sample_every: int = 250  # steps between sample grids and loss curves
    ckpt_every: int = 500  # steps between checkpoints
    log_every: int = 10  # steps between metrics.jsonl rows
    eval: bool = False  # at the end: geometry metrics vs the teacher and seed diversity
    eval_teacher_steps: int = 20  # teacher Euler steps for --eval (Table 3: 20)
    prompts: str = ""  # FILE.txt, FILE.{jsonl,csv,parquet}:COL, hf:ID[/CONFIG][@SPLIT][:COL], builtin (README Evaluate)
    export: bool = True  # save the student as a SanaPipeline in out/pipeline at the end
    threads: int = 0  # CPU threads (0 = torch default or $CPU_THREADS)
    bench: int = 0  # > 0: time N interleaved SiD / SiD+GAD steps (2 warm-up pairs first), print the ratios, exit


# valid ranges of the numeric flags (common.RANGES covers steps, lr, periods, ...): checked before any model loads
RANGES = {"cfg": ">= 0", "alpha": ">= 0", "t_gen": "(0, 1]", "sigma_logit_mean": "any", "sigma_logit_std": "> 0",
          "gad_h": "(0, 1]"}


# ---------------------------------------------------------------------------------------------
# Flow-matching algebra (fp32) and the losses


def bc(s: torch.Tensor) -> torch.Tensor:
    return s.float().view(-1, 1, 1, 1)


def sample_sigma(n: int, mean: float, std: float, device) -> torch.Tensor:
    """SiD's logit-normal noise level: sigma = sigmoid(N(mean, std^2))."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device))


def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps (flow matching)."""
    return (1 - bc(sigma)) * x0.float() + bc(sigma) * eps.float()


SID_LOSS_SCALING_G = 100.0  # ml-sid-dit training_loop: loss_scaling_G (the fake's loss_scaling is 1)


def loss_scale(x: torch.Tensor, role: str, reduction: str) -> float:
    """ml-sid-dit's reductions as a factor on our per-element means: generator sum x loss_scaling_G / batch
    = mean x (C H W) x 100; fake score sum / batch = mean x (C H W). --loss-reduction mean: 1. Adam is invariant to
    the factor except through its eps (1e-8), which it shrinks relative to the gradients (819,200x at SANA-512)."""
    if reduction == "mean":
        return 1.0
    return x[0].numel() * (SID_LOSS_SCALING_G if role == "generator" else 1.0)


def sid_generator_loss(y_r, y_f, x_g, sigma, alpha: float) -> torch.Tensor:
    """SiD: mean of (y_r - y_f) . [(y_r - x_g) - alpha (y_r - y_f)] w(sigma), w = 1 - sigma (SiD as ml-sid-dit runs it)."""
    d = y_r - y_f
    return (d * ((y_r - x_g) - alpha * d) * (1 - bc(sigma))).mean()


def fake_score_loss(v_fake, eps, x_g) -> torch.Tensor:
    """Flow-matching regression of the fake score on generator samples: ||v_F - (eps - sg(x_g))||^2."""
    return (v_fake.float() - (eps.float() - x_g.detach().float())).pow(2).mean()


def gad_direction(dy_f, dy_r, sigma, h: float, form: str) -> torch.Tensor:
    """Eq. 9 in x0 space: D = w(sigma) (Delta x0_fake - Delta x0_real), divided by h for --gad-form jvp."""
    # DEVIATION: score-space reading of Eq. 9 (DMD/SiD orientation) with SiD's weight w = 1 - sigma; see docstring.
    D = (1 - bc(sigma)) * (dy_f.float() - dy_r.float())
    return D / h if form == "jvp" else D


def gad_surrogate(D: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Eq. 9 surrogate: mean(sg(D) * x_t); its gradient is D dx_t/dtheta (same reduction as the SiD loss)."""
    return (D.detach() * x_t.float()).mean()


# ---------------------------------------------------------------------------------------------
# Network calls, the GAD responses, samplers


def velocity(net, x, sigma, cond, uncond=None, w: float = 1.0) -> torch.Tensor:
    """v(x, sigma) in fp32; with `uncond`, CFG v_u + w (v_c - v_u) from one batched forward."""
    t = 1000.0 * sigma.float() * common.unwrap(net).config.timestep_scale
    if uncond is None:
        return net(x, timestep=t, **cond, return_dict=False)[0].float()
    out = net(torch.cat([x, x]), timestep=torch.cat([t, t]), **common.cat(cond, uncond), return_dict=False)[0].float()
    v_c, v_u = out.chunk(2)
    return v_u + w * (v_c - v_u)


def x0_pred(net, x, sigma, cond, uncond=None, w: float = 1.0) -> torch.Tensor:
    return x.float() - bc(sigma) * velocity(net, x, sigma, cond, uncond, w)


def pair(c: dict) -> dict:
    return common.cat(c, c)


def gad_delta(net, x_t, sigma, v_dir, h: float, mode: str, cond, uncond=None, w: float = 1.0, ac=None) -> torch.Tensor:
    """Eq. 10 in x0 form, no grad, returned in fp32: h J_x0(x_t) v by forward-mode AD (mode 'exact', common.jvp_pair)
    under the autocast context `ac` (None: fp32), or Delta x0 = x0(x_t + h v) - x0(x_t) from one batched fp32
    forward of the pair (mode 'fd': a finite difference is never taken in half precision)."""
    x, v_dir = x_t.detach().float(), v_dir.float()
    fp32 = torch.autocast(x.device.type, enabled=False)
    with torch.no_grad(), (ac if ac is not None and mode == "exact" else fp32):
        if mode == "exact":
            return h * common.jvp_pair(lambda z: x0_pred(net, z, sigma, cond, uncond, w), x, v_dir)[1].float()
        y = x0_pred(net, torch.cat([x, x + h * v_dir]), sigma.repeat(2), pair(cond),
                    None if uncond is None else pair(uncond), w)
        y0, y1 = y.chunk(2)
        return y1 - y0


def rollout(G, z, cond, t_gen, k: int, noises=None, generator=None) -> torch.Tensor:
    """SiD generator, steps 1..k: x_{t_1} = z, D_i = x_{t_i} - t_i G(x_{t_i}), x_{t_{i+1}} = (1 - t_{i+1}) D_i +
    t_{i+1} eps_{i+1} with fresh eps. Only step k keeps grad (if enabled). Returns D_k (fp32)."""
    x, grad = z.float(), torch.is_grad_enabled()
    for i in range(k):
        t = torch.full((z.shape[0],), t_gen[i], device=z.device)
        with torch.set_grad_enabled(grad and i == k - 1):
            D = x0_pred(G if i == k - 1 else common.unwrap(G), x, t, cond)
        if i < k - 1:
            eps = noises[i] if noises is not None else torch.randn(z.shape, generator=generator, device=z.device)
            x = renoise(D, eps, torch.full_like(t, t_gen[i + 1]))
    return D


@torch.no_grad()
def teacher_sample(T, z, cond, uncond, w: float, n: int, shift: float = 3.0) -> torch.Tensor:
    """Teacher PF-ODE, Euler in sigma with the scheduler's shift (SANA: 3) and CFG w: the multi-step reference map z -> x0."""
    s = torch.linspace(1, 0, n + 1, device=z.device)
    s = shift * s / (1 + (shift - 1) * s)
    x = z.float()
    for i in range(n):
        x = x + (s[i + 1] - s[i]) * velocity(T, x, s[i].expand(z.shape[0]), cond, uncond, w)
    return x


def export_scheduler():
    """Stock scheduler whose `step` is exactly rollout(): x0 = x - s v, x' = (1 - s') x0 + s' * fresh noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, stochastic_sampling=True)


def stock_call_kwargs(t_gen, side_px: int) -> dict:
    """The documented call on the exported pipeline that reproduces the 4-step sampler."""
    return dict(sigmas=list(t_gen), num_inference_steps=len(t_gen), guidance_scale=1.0, height=side_px,
                width=side_px, **common.PIPELINE_KWARGS["sana"])


# ---------------------------------------------------------------------------------------------
# Training


def fake_guidance(args, uncond):
    """(uncond, w) for the fake score: CFG like the teacher's with --fake-cfg, else the conditional branch only."""
    return (uncond, args.cfg) if args.fake_cfg else (None, 1.0)


def generator_update(args, step, teacher, fake, x_g, sigma, eps, v_dir, cond, uncond, batched, ac, G=None, n=1) -> dict:
    """SiD generator loss at x_t = (1 - sigma) x_g + sigma eps with gradients reaching x_g directly and through
    y_r, y_f (teacher and fake get none), plus lambda L_GAD (Eq. 7, 9), back-propagated divided by n (one of n
    micro-batches; the caller steps the optimiser). Returns the losses.
    --gad-path response needs the generator G: D then drives G's own x0 response at x_t instead of x_t."""
    h, (u_f, cfg_f) = args.gad_h, fake_guidance(args, uncond)
    fake.requires_grad_(False)
    x_t = renoise(x_g, eps, sigma)
    if batched:  # [x_t, x_t + h v] in one teacher and one fake forward; the perturbed rows carry no grad
        x_p, s2 = x_t.detach() + h * v_dir, sigma.repeat(2)
        y_r, y_rp = x0_pred(teacher, torch.cat([x_t, x_p]), s2, pair(cond), pair(uncond), args.cfg).chunk(2)
        y_f, y_fp = x0_pred(fake, torch.cat([x_t, x_p]), s2, pair(cond), None if u_f is None else pair(u_f), cfg_f).chunk(2)
        dy_r, dy_f = (y_rp - y_r).detach(), (y_fp - y_f).detach()
    else:
        with ac:
            y_r = x0_pred(teacher, x_t, sigma, cond, uncond, args.cfg)
            y_f = x0_pred(fake, x_t, sigma, cond, u_f, cfg_f)
        if v_dir is not None:
            jac = None if args.gad_fp32 else ac  # precision of the JVP forwards
            dy_r = gad_delta(teacher, x_t, sigma, v_dir, h, args.gad_jvp, cond, uncond, args.cfg, jac)
            dy_f = gad_delta(fake, x_t, sigma, v_dir, h, args.gad_jvp, cond, u_f, cfg_f, jac)
    k = loss_scale(x_g, "generator", args.loss_reduction)  # the SiD and GAD terms alike: lambda keeps its meaning
    loss_sid = k * sid_generator_loss(y_r, y_f, x_g, sigma, args.alpha)
    out = {}
    loss_gad = torch.zeros((), device=x_g.device)
    if v_dir is not None:
        D = gad_direction(dy_f, dy_r, sigma, h, args.gad_form)
        loss_gad = k * gad_surrogate(D, x_t)
        out["gad_gap"] = D.abs().mean().item()  # mean |w (Delta x0_F - Delta x0_T)| [/h]
    common.check_finite(step, loss_sid=loss_sid, loss_gad=loss_gad)
    if v_dir is not None and args.gad_path == "response":
        # DEVIATION (gad_tdm's repaired released block): D drives G's response G_x0(x_t + h v) - G_x0(x_t) at sg(x_t).
        # Eq. 9 through x_t is zero-mean over v to first order; this is a first-order push on G's Jacobian.
        # A second forward of G: the first backward accumulates without DDP's all-reduce.
        with common.no_sync(G):
            (loss_sid / n).backward()
        x, vd = x_t.detach().float(), v_dir.float()
        if args.gad_jvp == "exact":  # back-propagating through the tangent (reverse over forward, common.jvp_pair)
            with ac if not args.gad_fp32 else torch.autocast(x.device.type, enabled=False):
                dS = h * common.jvp_pair(lambda z: x0_pred(G, z, sigma, cond), x, vd)[1].float()
        else:
            with torch.autocast(x.device.type, enabled=False):  # a finite difference only in fp32
                y0, y1 = x0_pred(G, torch.cat([x, x + h * vd]), sigma.repeat(2), pair(cond)).chunk(2)
                dS = y1 - y0
        loss_gad = k * gad_surrogate(D, dS / h if args.gad_form == "jvp" else dS)
        common.check_finite(step, loss_gad=loss_gad)
        (args.gad_weight * loss_gad / n).backward()
    else:
        ((loss_sid + args.gad_weight * loss_gad) / n).backward()
    fake.requires_grad_(True)
    return {"loss_sid": loss_sid.item(), "loss_gad": loss_gad.item(), **out}


def bench_result(rows: list) -> dict:
    """--bench: medians over the steps after 2 warm-up pairs of step time and (CUDA) peak memory, without / with GAD."""
    med = lambda gad, i: statistics.median(r[i] for r in rows[4:] if r[0] == gad)
    out = {"step_time_base": med(False, 1), "step_time_gad": med(True, 1)}
    out["time_ratio"] = out["step_time_gad"] / out["step_time_base"]
    if rows[0][2]:
        out.update(mem_base_gb=med(False, 2) / 2**30, mem_gad_gb=med(True, 2) / 2**30)
        out["mem_ratio"] = out["mem_gad_gb"] / out["mem_base_gb"]
    common.print0(" ".join(f"{k}={v:.4g}" for k, v in out.items()))
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def train(args: Args, pipe=None) -> dict:
    """SiD (+ GAD) training. `pipe`: an already loaded SanaPipeline (tests reuse one); left unmodified on CPU/fp32."""
    # run contract (common.start_run): flags, --out, resume, prompts and model ids, before any model loads
    ckpt_path = common.start_run(args, RANGES, family="sana" if pipe is None else None)
    common.require(list(args.t_gen) == sorted(set(args.t_gen), reverse=True) and args.t_gen[0] == 1.0,
                   f"argument --t-gen: must decrease strictly from 1.0 and stay > 0, got {args.t_gen}")
    # the exact response path takes a JVP with gradients through G: checkpoint recomputation drops its tangents,
    # FSDP2's backward hook (an autograd Function without a forward-AD rule) refuses it (tests/test_distributed.py)
    common.refuse_jvp_with_grad(args, args.gad_weight > 0 and args.gad_path == "response" and args.gad_jvp == "exact",
                                "not with --gad-path response and --gad-jvp exact; use --gad-jvp fd or --gad-path xtau")
    common.set_cpu_threads(args.threads)
    dist = common.init_distributed(args.device)
    device = dist.device
    dtype = common.resolve_dtype(args.dtype, device)
    if dtype == torch.float16:
        raise common.UsageError("--dtype fp16 is not supported here (two optimisers); use bf16 or fp32")
    common.seed_everything(args.seed, dist.rank)
    common.check_memory(args, "gad_sid", "sana", dist.world_size)  # the plan on rank 0; refused if it cannot fit
    gad = args.gad_weight > 0
    batched = gad and args.gad_batched and dtype == torch.float32 and args.gad_jvp == "fd"

    # models: teacher frozen; generator G and fake score F initialised from it, fp32 weights
    if args.gad_jvp == "fd" or args.gad_fp32:  # TF32 would round fp32 differences to a 10-bit mantissa (~5% noise)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    pipe = pipe if pipe is not None else common.load_pipeline("sana", args.model, torch.float32)
    pipe.to(device)
    if dtype != torch.float32:
        pipe.text_encoder.to(dtype)
    teacher = pipe.transformer
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    for net in (student, fake) if args.grad_ckpt else ():
        net.enable_gradient_checkpointing()
    # DDP (default) or FSDP2 (--fsdp), before the optimizers: FSDP2 replaces the parameters by their shards
    wrap = lambda net: common.wrap(net, dist, args.fsdp, args.offload)
    teacher, G, F = wrap(teacher), wrap(student), wrap(fake)
    opt_g = torch.optim.Adam(student.parameters(), lr=args.lr, betas=tuple(args.betas))
    opt_f = torch.optim.Adam(fake.parameters(), lr=args.lr_fake, betas=tuple(args.betas))
    scheds, ema = common.lr_schedulers({"g": opt_g, "f": opt_f}, args), common.make_ema(student, args.ema_decay)
    models = {"student": student, "fake": fake, **({"ema": ema} if ema else {})}
    start = 0
    if ckpt_path:
        start = common.load_checkpoint(ckpt_path, models, {"g": opt_g, "f": opt_f}, schedulers=scheds)["step"]

    # prompts: each encoded once, embeddings on the CPU, the Gemma encoder off the GPU (common.cache_prompts)
    prompts = common.read_prompts(args.prompts)
    common.cache_prompts(pipe, "sana", prompts, device)
    encode = lambda batch: common.encode(pipe, "sana", batch, device)

    def to_dev(c):  # fp32 embeddings: the fp32 finite-difference forwards run outside autocast
        return common.cast({k: v.to(device) for k, v in c.items()}, torch.float32)

    grid_prompts = prompts[:4]
    gen = torch.Generator().manual_seed(1234)  # fixed grid noise, same every time, outside the global RNG
    z_grid = torch.randn(common.latent_shape(pipe, 4 * len(grid_prompts)), generator=gen).to(device)
    grid_noises = [torch.randn(z_grid.shape, generator=gen).to(device) for _ in args.t_gen[1:]]
    grid_cond = to_dev(encode([p for p in grid_prompts for _ in range(4)])[0])
    side_px = common.latent_shape(pipe, 1)[-1] * pipe.vae_scale_factor
    ac = common.autocast(device, dtype)

    def save_samples(step):
        with torch.no_grad(), ac:
            x = rollout(student, z_grid, grid_cond, args.t_gen, len(args.t_gen), noises=grid_noises)
        common.save_grid(common.decode(pipe, x), os.path.join(args.out, f"samples_{step:06d}.png"), nrow=4)

    def save_ckpt(step):
        common.save_checkpoint(os.path.join(args.out, "ckpt.pt"), models, {"g": opt_g, "f": opt_f}, step, args,
                               schedulers=scheds)

    logger = common.Logger(args.out, args.steps, start, dist.is_main)
    times, last = [], {}
    rss0 = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    B, bench_rows = args.batch_size, []
    for step in range(start + 1, (2 * args.bench + 4 if args.bench else args.steps) + 1):
        use_gad = gad and not (args.bench and step % 2)  # --bench: odd steps without GAD, same draws as the next
        if args.bench:
            common.bench_hook(use_gad)
            common.seed_everything(args.seed + (step + 1) // 2, dist.rank)
            torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, N, rows, samples = time.perf_counter(), args.grad_accum, [], []
        opt_g.zero_grad(set_to_none=True)
        for _ in common.micro_batches(N, G):  # gradients of N micro-batches, one step (common.micro_batches)
            # 0. a batch of prompts, initial noise z, the generator step k ~ U{1..K}
            idx = torch.randint(len(prompts), (B,)).tolist()
            cond, uncond = (to_dev(c) for c in encode([prompts[i] for i in idx]))
            z = torch.randn(common.latent_shape(pipe, B), device=device)
            k = common.same_on_all_ranks(int(torch.randint(1, len(args.t_gen) + 1, ())), args.fsdp)  # FSDP2: rank 0's k

            # 1. generator sample x_g = D_k, only step k in the graph; kept (detached) for step 3
            with ac:
                x_g = rollout(G, z, cond, args.t_gen, k)
            samples.append((x_g.detach(), cond, uncond))

            # 2. generator update: SiD loss at x_t = (1 - sigma) x_g + sigma eps, plus lambda L_GAD (Eq. 7, 9)
            sigma = sample_sigma(B, args.sigma_logit_mean, args.sigma_logit_std, device)
            eps = torch.randn_like(z)
            v_dir = torch.randn_like(z)  # drawn even without GAD: runs with and without it see the same k, sigma, eps
            rows.append(dict(k=k, **generator_update(args, step, teacher, fake, x_g, sigma, eps, v_dir if use_gad else None,
                                                     cond, uncond, batched and use_gad, ac, G, n=N)))
        opt_g.step()

        # 3. fake-score update on sg(x_g) at a fresh sigma, eps
        opt_f.zero_grad(set_to_none=True)
        for i in common.micro_batches(N, F):
            x_g, cond, uncond = samples[i]
            sigma_f = sample_sigma(B, args.sigma_logit_mean, args.sigma_logit_std, device)
            eps_f = torch.randn_like(x_g)
            with ac:
                v_F = velocity(F, renoise(x_g, eps_f, sigma_f), sigma_f, cond, *fake_guidance(args, uncond))
            loss_fake = loss_scale(x_g, "fake", args.loss_reduction) * fake_score_loss(v_F, eps_f, x_g)
            common.check_finite(step, loss_fake=loss_fake)
            (loss_fake / N).backward()
            rows[i]["loss_fake"] = loss_fake.detach()
        opt_f.step()
        common.lr_step(scheds)
        ema.update_parameters(student) if ema else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if args.bench:
            bench_rows.append((use_gad, times[-1], torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0))
            continue

        # logging, samples, checkpoints (rank 0)
        last = common.mean_rows(rows)  # k: the mean generator step over the micro-batches
        if dist.is_main and common.due(step, args.log_every, step == args.steps):
            logger.log(step, sec=times[-1], **last)
        if common.due(step, args.sample_every, False):  # every rank (FSDP2's forwards are collective); rank 0 writes
            save_samples(step)
        if common.due(step, args.ckpt_every, False) and step != args.steps:
            save_ckpt(step)
        logger.update()
    logger.close()
    if args.bench:
        return bench_result(bench_rows)

    # end: checkpoint, curves, samples, export, eval (every rank computes, rank 0 writes and prints)
    result = dict(last, step=args.steps, step_time_median=statistics.median(times) if times else float("nan"))
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # process peak RSS above the RSS at the start of the loop (CPU: a coarse proxy for peak memory)
        result["rss_peak_delta_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    save_ckpt(args.steps)
    common.plot_curves(logger.path, os.path.join(args.out, "curves.png"))
    if not common.due(args.steps, args.sample_every, False):  # else already saved in the loop
        save_samples(args.steps)
    exported = ema.module if ema else student  # --ema-decay > 0: the EMA weights
    if args.export:
        result["pipeline_call"] = stock_call_kwargs(args.t_gen, side_px)  # from_pretrained(dir)(prompt, **this)
        result["pipeline"] = common.export_pipeline(pipe, exported, os.path.join(args.out, "pipeline"),
                                                    scheduler=export_scheduler(), call=result["pipeline_call"])
    if args.eval:
        result.update(evaluate(args, pipe, exported, grid_prompts, encode, to_dev, device))
    common.print0(result)
    common.barrier()
    common.cleanup()
    return result


@torch.no_grad()
def evaluate(args, pipe, student, prompts, encode, to_dev, device) -> dict:
    """Geometry of the student's 4-step map z -> x0 (fresh noises held fixed) against the teacher's
    multi-step ODE map (evaluate.geometry_metrics, exact JVPs in fp32), and seed diversity of raw latents."""
    cond, uncond = (to_dev(c) for c in encode(prompts))
    gen = torch.Generator().manual_seed(99)
    z = torch.randn(common.latent_shape(pipe, len(prompts)), generator=gen).to(device)
    noises = [torch.randn(z.shape, generator=gen).to(device) for _ in args.t_gen[1:]]
    K, T = len(args.t_gen), pipe.transformer
    cfg = pipe.scheduler.config  # the teacher's own shift (SANA 600M: DPMSolver flow_shift 3; FlowMatchEuler: shift)
    shift = cfg.get("flow_shift", 3.0) if cfg.get("use_flow_sigmas", False) else cfg.get("shift", 3.0)

    def phi_s(x):
        return rollout(student, x, cond, args.t_gen, K, noises=noises)

    def phi_t(x):
        return teacher_sample(T, x, cond, uncond, args.cfg, args.eval_teacher_steps, shift)

    with torch.set_grad_enabled(not common.is_sharded(student)):  # FSDP2's hooks take forward AD only without grad
        geo = geometry_metrics(phi_s, phi_t, z, n_dirs=2, seed=0, mode="exact")
    n = 4  # seeds per prompt
    c4, u4 = (to_dev(c) for c in encode([p for p in prompts for _ in range(n)]))
    z4 = torch.randn(common.latent_shape(pipe, n * len(prompts)), generator=gen).to(device)
    xs = rollout(student, z4, c4, args.t_gen, K, generator=gen)
    xt = teacher_sample(T, z4, c4, u4, args.cfg, args.eval_teacher_steps, shift)
    div = {f"diversity_{k}": diversity(x.view(len(prompts), n, -1)) for k, x in (("student", xs), ("teacher", xt))}
    return {**{f"eval_{k}": v for k, v in geo.items()}, **div}


if __name__ == "__main__":
    common.main(Args, train)
