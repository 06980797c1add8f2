"""GAD on TDM: Geometry-Aware Distillation on Trajectory Distribution Matching (PixArt-alpha, 4 steps).

Paper: Huang et al., "Restoring Initial Noise Sensitivity in Text-to-Image Distillation via Geometric
Alignment", ICML 2026, arXiv 2606.01651. Base: Luo et al., "Learning Few-Step Diffusion Models by
Trajectory Distribution Matching" (TDM), 2025.

A 4-step student is distilled from PixArt-alpha with TDM: a fake score learns the distribution of the
student's intermediate ODE points, and the student follows the teacher-minus-fake score difference. GAD adds
a first-order term: at the same noisy point x_tau the teacher and fake predictions are also taken at
x_tau + h v, and the student is pushed by the difference of their *responses* (Eq. 9-10), so it inherits
the teacher's sensitivity to its input instead of only its outputs.

Equation map (GAD paper; TDM as Luo et al. 2025 and its public code run it):
  TDM student rollout, deterministic DDIM between t = 899, 674, 449, 224  -> sample()
  TDM re-noising inside a step's interval, mixed noise m, weight w        -> renoise(), importance_weight()
  TDM fake-score loss (SNR-clipped, importance-weighted x0 regression)   -> tdm_fake_loss()
  TDM generator loss (Huber to sg(x0 + T_cfg - F), normalised by W)      -> tdm_generator_loss()
  Eq. 10  Delta(x_tau, v) = f(x_tau + h v) - f(x_tau)                     -> responses()
  Eq. 9   grad += lambda (Delta_fake - Delta_real) dx_tau/dtheta          -> gad_surrogate()
  Eq. 7   L = L_TDM + lambda L_GAD                                        -> train(), step 3
  Table 8 / Table 9 ablations (timestep range, h schedule)                -> gad_mask(), gad_h()

Sign of Eq. 9. We work in x0 space, as TDM does: Delta = Delta x0_hat. Eq. 9's ordering (fake - real) is the
DMD gradient convention for *scores* s = -eps/sigma (DMD: grad = (s_fake - s_real) dx/dtheta). Since
x0 = (x - sigma eps)/alpha, a score difference is alpha/sigma^2 times the x0 difference, so in x0 space the
gradient is (Delta x0_fake - Delta x0_real) dx_tau/dtheta up to a positive factor absorbed into lambda: descent
moves the student's sample towards the teacher's response and away from the fake's. Read literally with eps,
the sign would flip (Delta eps = (h v - alpha Delta x0)/sigma); the released code's derivative-space target
(student + Delta_teacher - Delta_fake) agrees with the x0 reading. tests/test_gad_tdm.py checks the direction.

Which parameters Eq. 9 moves (--gad-path). As printed, the GAD vector reaches theta only through dx_tau/dtheta,
which does not depend on v. To first order in h the vector is (J_fake - J_real) v: zero-mean over v ~ N(0, I).
Averaged over directions, the printed Eq. 9 pushes only through curvature (an O(h) term) and otherwise adds
zero-mean noise (tests check this on linear maps). `--gad-path xtau` (default) is the paper as printed.
`--gad-path response` drives the student's own matched response S(x_tau + h v, tau) - S(x_tau, tau) at sg(x_tau)
with the same vector (surrogate mean(sg(g) dS), i.e. 1/2 MSE to sg(dS - g)): a first-order push of the student's
Jacobian, whose mean over directions is not zero. It is a *repaired* form of the released block, not that block.
The released block is ds = (S(x_tau + delta, tau) - x0_hat(x_{t_g}, t_g)) / h: its base is the student's x0 at a
different input and noise level from the teacher's and fake's base x_tau, so its gradient is almost all the O(1)/h
gap S(x_tau, tau) - x0_hat(x_{t_g}, t_g) (>= 99.9% on stand-in networks, issue 11), odd in delta, and its mean over
directions is about zero: the flaw of printed Eq. 9 again. Ours changes three things: matched base S(x_tau, tau),
x_tau detached, and 1/2 MSE instead of the released Huber loss normalised by W (tests/test_gad_tdm.py checks the
mean-gradient claim both ways). One more student forward with grad; its gradient through the tangent is exact
(common.jvp_pair, checked against a float64 numerical derivative; back-propagating through torch.func.jvp is not).

x_tau is detached in the response path (the released s_pert is not): the teacher's and fake's responses are taken
at sg(x_tau), so the student's is too. Attached, the surrogate would also move the *point* x_tau by
g . d(J_S v)/dx dx_tau/dtheta, a second-order term in the student's own curvature (where the Jacobian is measured, not
the Jacobian); moving samples is the base loss's job. The weight gradient through S is the same either way
(test_response_path_detaches_x_tau_and_what_that_changes).

Two scalings (--gad-form). `jvp` (default) divides both differences by h: a finite-difference JVP match of
size ||Delta J v||, which is what the released code does and so what produced the paper's numbers. `paper` is
Eq. 9-10 as printed (differences not divided by h; the paper absorbs 1/h^2 into lambda): its signal scales
with h, so at h = 1e-2 it is nearly inert (a 2D prototype moved nothing with it).

Precision (--gad-jvp, --gad-fp32). The perturbation h v is ~1% of x_tau: in bf16 (3 significant digits) a finite
difference is mostly rounding noise (cosine 0.83 with the true response at PixArt's real size). The default,
`exact`, computes Delta = h J v by forward-mode AD (common.jvp_pair) in the step's own precision: bf16 autocast on
CUDA. A tangent is computed in its own right, so bf16 keeps it accurate (cosine 0.99999 with a float64 JVP at
PixArt-XL-2's depth and width, tests/test_gad_precision.py), and its primal is the teacher and fake forward the base
loss needs anyway: GAD adds one tangent per network (a GEMM per GEMM) instead of a second forward. `--gad-jvp fd`
takes x_tau and x_tau + h v in one batched forward per network, always in fp32 with TF32 off (~8x the price of
bf16 on an H200); `--gad-fp32` also runs the JVP in fp32. README "Cost on a GPU" has the modelled prices.

Deviations (each marked `# DEVIATION:` at its line):
  - Gradient of GAD reaches theta through x_tau (Eq. 9, default). The released code matches the student's own x0
    response between mismatched inputs (x_tau + delta at tau vs x_{t_g} at t_g), Huber-normalised by W, with grad
    through x_tau. --gad-path response is that block repaired: matched base, x_tau detached, 1/2 MSE (see above).
  - t_mid: the student's point is re-noised from the next student timestep (674, 449, 224, 0), the point the
    rollout visits; the released code uses t_g - 224 (675, 450, 225, 0).
  - The lr schedule (default: the released run's 50 warm-up steps, then cosine with restarts, one cycle over --steps,
    diffusers' get_scheduler) is applied to the student's lr; the fake's lr stays constant (the audit names the
    student's schedule only). --ema-decay uses torch's AveragedModel (plain decay from the first update); if the
    released --use_ema is diffusers' EMAModel, its decay is capped by (1 + n)/(10 + n) early on (not re-checked).
  - v ~ N(0, I) (paper). The released code uses a unit-norm direction: --gad-direction unit.
  - Responses by forward-mode JVP (bf16) or fp32 finite differences; the released code casts x_tau + delta to
    fp16 and differences it, which loses most of the move.
  - h schedules of Table 9 are not specified beyond "increasing/decreasing linear": we use
    h(tau) = h (1.5 - tau/1000) (increasing along generation) and h (0.5 + tau/1000); both average to h.
  - GAD is computed for every sample and masked by --gad-t-range (simpler; no compute saved).
  - Optimiser: AdamW betas (0, 0.95), wd 1e-2 as the TDM/GAD code runs (App. D says (0.9, 0.999)).
  - Stock-pipeline export: TCDScheduler(eta=0) with timesteps [899, 674, 449, 224] reproduces the sampler
    except its last step returns sqrt(abar_0) x0 + sqrt(1 - abar_0) eps_hat (abar_0 = 0.9999) instead of x0.

Commands (the memory plan printed first says what fits: README "Fitting on a GPU"):
  GPU:        python gad_tdm.py --steps 2000 --grad-ckpt     (PixArt-XL-2-512, bf16, 64 per GPU: ~53 GiB modelled)
  8 GPUs:     torchrun --nproc_per_node 8 gad_tdm.py --grad-ckpt          (64 per GPU, 512 per step; or --fsdp)
  less memory: python gad_tdm.py --batch-size 16 --grad-accum 4           (64 per optimiser step, 4 micro-batches of 16)
  plain TDM:  python gad_tdm.py --gad-weight 0;  recipe: --lr-schedule constant --lr-warmup 0 --ema-decay 0.999
  CPU tiny:   python gad_tdm.py --model tiny                              (a 20-step smoke run, ~20 s)
  evaluate:   python gad_tdm.py --eval --resume runs/gad_tdm/ckpt.pt [--feature-model openai/clip-vit-base-patch32]
  overhead:   python gad_tdm.py --model tiny --bench 20 --threads 1
Expect: samples.png every --sample-every steps (4 prompts x 4 fixed seeds: the same seeds every time, so noise
sensitivity is visible), curves.png, metrics.jsonl, ckpt.pt, and at the end pipeline/ (PixArtAlphaPipeline).
Reload with:
  pipe = DiffusionPipeline.from_pretrained("runs/gad_tdm/pipeline")
  pipe(prompt, num_inference_steps=4, timesteps=[899, 674, 449, 224], guidance_scale=1.0, use_resolution_binning=False)
(use_resolution_binning=False: the stock PixArt call otherwise snaps the size to its 256/512/1024 aspect-ratio tables)
"""
import copy
import dataclasses
import os
from typing import Literal

import torch

import common
from evaluate import diversity, geometry_metrics, latent_features, load_features


@dataclasses.dataclass
class Args:
    # GAD (GAD paper Sec. 4.2, Table 11 PixArt column, Tables 8-9)
    gad_weight: float = 1.0  # lambda of Eq. 7 (Table 11); 0 = plain TDM
    gad_h: float = 1e-2  # perturbation scale h (Table 11)
    gad_form: Literal["jvp", "paper"] = "jvp"  # jvp: differences / h (released code); paper: Eq. 9-10 as printed
    gad_jvp: Literal["exact", "fd"] = "exact"  # Eq. 10's Delta as h J v by forward-mode AD, or a finite difference
    gad_t_range: Literal["all", "high", "mid", "low"] = "all"  # Table 8: all, tau > 600, 200-600, < 200
    gad_h_schedule: Literal["fixed", "increasing", "decreasing"] = "fixed"  # Table 9: h(tau)
    gad_direction: Literal["gaussian", "unit"] = "gaussian"  # v ~ N(0, I) (paper) or unit norm (released code)
    gad_path: Literal["xtau", "response"] = "xtau"  # Eq. 9's gradient via dx_tau/dtheta (paper) or the student's response
    gad_fp32: bool = False  # exact: JVP forwards in fp32 too (default: the step's precision). fd: always fp32
    # TDM (Luo et al. 2025, as its public code runs it)
    timesteps: tuple[int, ...] = (899, 674, 449, 224)  # student steps, deterministic DDIM between them
    cfg: float = 4.5  # teacher guidance in the generator update
    huber_c: float = 1e-3  # pseudo-Huber constant of the generator loss
    snr_clip: float = 5.0  # min(SNR(tau), 5) weight of the fake-score loss
    lr: float = 4e-6  # student learning rate (Table 11)
    lr_fake: float = 2e-5  # fake-score learning rate (TDM code: 5x the student's)
    betas: tuple[float, ...] = (0.0, 0.95)  # AdamW betas (TDM code)
    weight_decay: float = 1e-2  # AdamW weight decay (TDM code)
    grad_clip: float = 1.0  # gradient-norm clip of the student
    lr_schedule: Literal["constant", "cosine_with_restarts"] = "cosine_with_restarts"  # student lr (released GAD/TDM run)
    lr_warmup: int = 50  # linear warm-up steps of the student lr (released GAD/TDM run)
    ema_decay: float = 0.0  # EMA of the student, exported when on (released --use_ema, off by default); 0 = off
    # run
    model: str = "PixArt-alpha/PixArt-XL-2-512x512"  # hub id, local dir, 'tiny', or 'random' (real size)
    steps: int = 2000  # training iterations (Table 11)
    batch_size: int = 64  # per-GPU micro-batch (Table 11: 64 per GPU); global = batch x accumulation x GPUs
    grad_accum: int = 1  # micro-batches of --batch-size per optimiser step (gradients summed; 1 = none)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # autocast dtype; auto = bf16 on CUDA, fp32 on CPU
    prompts: str = ""  # FILE.txt, FILE.{jsonl,csv,parquet}:COL, hf:ID[/CONFIG][@SPLIT][:COL], builtin (README Evaluate)
    out: str = "runs/gad_tdm"  # output directory
    seed: int = 0  # global seed (offset by rank)
    resume: str = ""  # '' | 'latest' | 'auto' (latest if there is one) | path to ckpt.pt
    overwrite: bool = False  # start fresh in a non-empty --out (its files are replaced as the run writes them)
    sample_every: int = 100  # sample grid + curves every N steps
    ckpt_every: int = 250  # checkpoint every N steps
    eval: bool = False  # evaluate a checkpoint (geometry + diversity) instead of training
    eval_teacher_steps: int = 20  # teacher DDIM steps (CFG = --cfg) for the geometry metrics
    eval_seeds: int = 4  # seeds per prompt for the diversity metric
    feature_model: str = ""  # transformers vision model for diversity features ('' = raw latents)
    bench: int = 0  # > 0: time N interleaved TDM / TDM+GAD steps and print the ratios, then exit
    grad_ckpt: bool = False  # gradient checkpointing of student and fake (diffusers enable_gradient_checkpointing)
    fsdp: bool = False  # FSDP2: shard student, fake and teacher per transformer block (default: DDP)
    offload: bool = False  # FSDP2 CPUOffloadPolicy: shards, gradients and optimizer states in CPU memory (needs --fsdp)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads (0 = torch default)


# valid ranges of the numeric flags (common.RANGES covers steps, lr, periods, ...): checked before any model loads
RANGES = {"gad_h": "(0, 1]", "timesteps": "[1, 999]", "cfg": ">= 0", "huber_c": "> 0", "snr_clip": "> 0"}


# ----------------------------------------------------------------------------------------------
# Schedule helpers (fp32). DDPM: x_t = alpha_t x0 + sigma_t eps, alpha = sqrt(abar), sigma = sqrt(1 - abar).


def alpha_sigma(abar: torch.Tensor, t: torch.Tensor):
    a = abar[t.long()].float().view(-1, 1, 1, 1)
    return a.sqrt(), (1 - a).sqrt()


def predict(net, x, t, cond, abar):
    """(eps, x0) of an eps-prediction PixArt net; the first 4 of its 8 output channels (learned sigma)."""
    eps = net(x, timestep=t, **cond, return_dict=False)[0][:, : x.shape[1]].float()
    alpha, sigma = alpha_sigma(abar, t)
    return eps, (x.float() - sigma * eps) / alpha


def teacher_x0(teacher, x, t, cond, uncond, w, abar):
    """Teacher x0 with CFG w: cond and uncond batched in one forward. Also returns (x0_cond, x0_uncond)."""
    _, x0 = predict(teacher, torch.cat([x, x]), torch.cat([t, t]), common.cat(cond, uncond), abar)
    x0_c, x0_u = x0.chunk(2)
    return x0_u + w * (x0_c - x0_u), x0_c, x0_u


# ----------------------------------------------------------------------------------------------
# TDM (Luo et al. 2025, as its public code runs it)


def renoise(x_mid, t_mid, tau, noise, abar):
    """Diffuse the student's ODE point x_mid (at t_mid) forward to tau > t_mid:
    x_tau = (alpha_tau/alpha_mid) x_mid + beta noise, beta = sqrt(sigma_tau^2 - (alpha_tau sigma_mid/alpha_mid)^2)."""
    a_m, s_m = alpha_sigma(abar, t_mid)
    a_t, s_t = alpha_sigma(abar, tau)
    beta = (s_t**2 - (a_t * s_m / a_m) ** 2).clamp_min(0).sqrt()
    return a_t / a_m * x_mid + beta * noise


def mixed_noise(eps_hat, t_mid, tau, noise, abar):
    """The effective noise m of x_tau = alpha_tau x0_hat + sigma_tau m: ((a_tau/a_mid) s_mid eps_hat + beta noise)/s_tau."""
    a_m, s_m = alpha_sigma(abar, t_mid)
    a_t, s_t = alpha_sigma(abar, tau)
    beta = (s_t**2 - (a_t * s_m / a_m) ** 2).clamp_min(0).sqrt()
    return (a_t / a_m * s_m * eps_hat + beta * noise) / s_t


def importance_weight(m, noise):
    """w = exp(-mean(m^2)/2) / exp(-mean(noise^2)/2), per sample."""
    return torch.exp(-0.5 * m.pow(2).flatten(1).mean(1) + 0.5 * noise.pow(2).flatten(1).mean(1))


def tdm_fake_loss(x0_fake, x0_student, tau, w, abar, snr_clip):
    """mean_b [ mean ||F_x0(x_tau, tau) - x0_hat||^2 * min(SNR(tau), clip) * w ] in fp32."""
    a, s = alpha_sigma(abar, tau)
    snr = (a / s).pow(2).flatten().clamp(max=snr_clip)
    return ((x0_fake.float() - x0_student.float()).pow(2).flatten(1).mean(1) * snr * w).mean()


def tdm_generator_loss(x0, x0_real_cfg, x0_fake, huber_c):
    """Pseudo-Huber(x0 - sg(x0 + T_cfg - F)) / W with W = mean|x0 - T_cfg| per sample, in fp32.
    (x0 + (T_c - F) + (w - 1)(T_c - T_u) of the TDM code is the same target: T_cfg = T_u + w (T_c - T_u).)"""
    x0 = x0.float()
    target = (x0 + x0_real_cfg - x0_fake).detach()
    W = (x0 - x0_real_cfg).abs().mean((1, 2, 3), keepdim=True).detach()
    return ((torch.sqrt((x0 - target).pow(2) + huber_c**2) - huber_c) / W).mean()


# ----------------------------------------------------------------------------------------------
# GAD (Eq. 9-10, score-based form)


def gad_h(tau, h, schedule):
    """h(tau), Table 9. 'increasing' grows along generation (small h at high noise), 'decreasing' the reverse."""
    t = tau.float().view(-1, 1, 1, 1) / 1000
    return {"fixed": h + 0 * t, "increasing": h * (1.5 - t), "decreasing": h * (0.5 + t)}[schedule]


def gad_mask(tau, t_range):
    """Table 8: apply GAD only to samples whose tau lies in the range."""
    lo, hi = {"all": (0, 1000), "high": (601, 1000), "mid": (200, 600), "low": (0, 199)}[t_range]
    return ((tau >= lo) & (tau <= hi)).float().view(-1, 1, 1, 1)


def direction(shape, kind, device):
    v = torch.randn(shape, device=device)
    return v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if kind == "unit" else v


def responses(f, x, v, h, mode):
    """f(x) and Eq. 10's Delta = f(x + h v) - f(x), returned in fp32. 'exact': Delta = h J_f(x) v by forward-mode AD
    (common.jvp_pair), in the caller's precision; 'fd': x and x + h v batched in one call of f (call it in fp32)."""
    x, v = x.float(), v.float()
    if mode == "fd":
        base, pert = f(torch.cat([x, x + h * v]), n=2).float().chunk(2)
        return base, pert - base
    base, jv = common.jvp_pair(lambda y: f(y, n=1).float(), x, v)
    return base, h * jv


def student_response(f_S, x_tau, v, h, mode, form):
    """--gad-path response: the student's own x0 response S(x_tau + h v, tau) - S(x_tau, tau) [/ h for --gad-form jvp],
    at sg(x_tau): its gradient reaches theta through S's weights only, never through x_tau (docstring, "x_tau is
    detached"). The released block differs in its base (S at x_tau vs x0_hat at x_{t_g}) and does not detach."""
    dS = responses(f_S, x_tau.detach(), v, h, mode)[1]
    return dS / h if form == "jvp" else dS


def gad_surrogate(x_tau, d_fake, d_real, h, form, mask):
    """Eq. 9 as a surrogate: its gradient w.r.t. x_tau is (Delta_fake - Delta_real)[/h] * mask / numel.
    Returns (surrogate, mismatch) where mismatch = mean ||Delta_fake - Delta_real||^2 (what GAD drives down)."""
    g = (d_fake - d_real) / (h if form == "jvp" else 1.0)
    return (g.detach() * mask * x_tau.float()).mean(), (g.pow(2) * mask).mean().detach()


# ----------------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def sample(student, z, cond, timesteps, abar, return_states=False):
    """The 4-step student: x_{t_0} = z; x0 = S(x_t, t); DDIM to the next t; the last step returns x0."""
    x, states = z, []
    for k, t in enumerate(timesteps):
        states.append(x)
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        eps, x0 = predict(student, x, tt, cond, abar)
        if k + 1 < len(timesteps):
            a, s = alpha_sigma(abar, torch.full_like(tt, timesteps[k + 1]))
            x = (a * x0 + s * eps).to(z.dtype)
    return (x0, states) if return_states else x0


def teacher_sample(teacher, z, cond, uncond, w, steps, abar):
    """The teacher's deterministic DDIM map z -> x0 with CFG w over `steps` steps from t = 999. Not under no_grad:
    --eval takes forward-mode JVPs through it."""
    ts = torch.linspace(999, 0, steps + 1).round().long().tolist()
    x = z
    for t, t_next in zip(ts[:-1], ts[1:]):
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        x0, _, _ = teacher_x0(teacher, x, tt, cond, uncond, w, abar)
        a, s = alpha_sigma(abar, tt)
        eps = (x.float() - a * x0) / s
        a2, s2 = alpha_sigma(abar, torch.full_like(tt, t_next))
        x = a2 * x0 + s2 * eps if t_next > 0 else x0
    return x


# ----------------------------------------------------------------------------------------------
# Training


def train(args: Args) -> dict:
    # run contract (common.start_run): flags, --out, resume, prompts and model ids, before any model loads
    ckpt_path = common.start_run(args, RANGES, family="pixart", model_ids={"--feature-model": args.feature_model * args.eval},
                                 writes=not (args.eval or args.bench))
    common.require(list(args.timesteps) == sorted(set(args.timesteps), reverse=True),
                   f"argument --timesteps: must decrease strictly, got {args.timesteps}")
    # the exact response path takes a JVP with gradients through the student: checkpoint recomputation drops its
    # tangents (CheckpointError), FSDP2's backward hook (an autograd Function without a forward-AD rule) refuses it
    common.refuse_jvp_with_grad(args, args.gad_weight > 0 and args.gad_path == "response" and args.gad_jvp == "exact",
                                "not with --gad-path response and --gad-jvp exact; use --gad-jvp fd or --gad-path xtau")
    # setup: distributed, device, precision, seeding
    dist = common.init_distributed(args.device)
    common.check_memory(args, "gad_tdm", "pixart", dist.world_size)  # the plan on rank 0; refused if it cannot fit
    device, dtype = dist.device, common.resolve_dtype(args.dtype, dist.device)
    common.set_cpu_threads(args.threads)
    common.seed_everything(args.seed, dist.rank)
    B = args.batch_size  # per GPU
    if args.gad_jvp == "fd" or args.gad_fp32:  # TF32 would round fp32 differences to a 10-bit mantissa (~5% noise)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    # models: frozen teacher, trainable student and fake score, both initialised from the teacher
    pipe = common.load_pipeline("pixart", args.model, torch.float32)
    for frozen in (pipe.text_encoder, pipe.vae):  # frozen parts in the compute dtype
        frozen.to(device) if dtype == torch.float32 else frozen.to(device, dtype)
    teacher = pipe.transformer.to(device)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    abar = pipe.scheduler.alphas_cumprod.to(device, torch.float32)
    prompts = common.read_prompts(args.prompts)
    common.cache_prompts(pipe, "pixart", prompts, device)  # each prompt encoded once; the T5 encoder leaves the GPU
    ema = common.make_ema(student, args.ema_decay)  # None when --ema-decay 0
    if args.eval:  # unsharded models; the EMA when there is one
        if ckpt_path:
            common.load_checkpoint(ckpt_path, {"student": student, "fake": fake, **({"ema": ema} if ema else {})}, {})
        return evaluate(args, pipe, teacher, ema.module if ema else student, abar, prompts, device)
    for net in (student, fake) if args.grad_ckpt else ():
        net.enable_gradient_checkpointing()
    # DDP (default) or FSDP2 (--fsdp), before the optimizers: FSDP2 replaces the parameters by their shards
    wrap = lambda net: common.wrap(net, dist, args.fsdp, args.offload)
    teacher, student_ddp, fake_ddp = wrap(teacher), wrap(student), wrap(fake)
    encode = lambda ps: [common.cast(c, torch.float32) for c in common.encode(pipe, "pixart", ps, device)]  # fp32 nets
    null = common.select(encode([""])[0], torch.zeros(B, dtype=torch.long, device=device))
    opt_g = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=args.betas, weight_decay=args.weight_decay)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=args.lr_fake, betas=args.betas, weight_decay=args.weight_decay)
    scaler = common.make_scaler(device, dtype)
    scheds = common.lr_schedulers({"opt_g": opt_g}, args)  # the student's lr (released run); the fake's is constant
    models, optims = {"student": student, "fake": fake, **({"ema": ema} if ema else {})}, {"opt_g": opt_g, "opt_f": opt_f}
    start = common.load_checkpoint(ckpt_path, models, optims, scaler, schedulers=scheds)["step"] if ckpt_path else 0
    T = torch.tensor(list(args.timesteps) + [0], device=device)  # t_0 > ... > t_{K-1} > 0
    K = len(args.timesteps)
    ac = lambda: common.autocast(device, dtype)
    # precision of the response forwards: a finite difference only in fp32; a JVP in the step's precision by default
    fp32 = lambda: torch.autocast(device.type, enabled=False) if args.gad_fp32 or args.gad_jvp == "fd" else ac()

    def draw_step():
        """Pick a student step k per sample, its t_g, next ODE time t_mid and tau ~ U[max(20, t_mid), t_g - 10)."""
        k = torch.randint(0, K, (B,), device=device)
        t_g, t_mid = T[k], T[k + 1]  # DEVIATION: t_mid = the next student step (674, ..., 0); released: t_g - 224
        lo = t_mid.clamp(min=20)
        tau = lo + (torch.rand(B, device=device) * (t_g - 10 - lo)).long()
        return k, t_g, t_mid, tau

    N = args.grad_accum  # micro-batches per optimiser step: each loss / N, one step after them (common.micro_batches)

    def step_fn(step, use_gad):
        rollouts, rows = [], []
        opt_f.zero_grad(set_to_none=True)
        for _ in common.micro_batches(N, fake_ddp):
            idx = torch.randint(0, len(prompts), (B,))
            cond = encode([prompts[i] for i in idx])[0]
            z = torch.randn(common.latent_shape(pipe, B), device=device)
            # 1. roll the student out without grad, keeping x at each of its timesteps (step 3 reuses them)
            with ac():
                _, states = sample(common.unwrap(student), z, cond, args.timesteps, abar, return_states=True)
            states = torch.stack(states)  # (K, B, C, H, W)
            rollouts.append((cond, states))

            # 2. fake-score update on the student's next ODE point, re-noised inside its own interval
            k, t_g, t_mid, tau = draw_step()
            noise = torch.randn_like(z)
            with torch.no_grad(), ac():
                eps_s, x0_s = predict(student, states[k, torch.arange(B, device=device)], t_g, cond, abar)
            a_m, s_m = alpha_sigma(abar, t_mid)
            x_tau = renoise(a_m * x0_s + s_m * eps_s, t_mid, tau, noise, abar)
            w = importance_weight(mixed_noise(eps_s, t_mid, tau, noise, abar), noise)
            with ac():
                _, x0_f = predict(fake_ddp, x_tau, tau, cond, abar)
            loss_fake = tdm_fake_loss(x0_f, x0_s, tau, w, abar, args.snr_clip)
            common.check_finite(step, loss_fake=loss_fake)
            common.backward(loss_fake, N, scaler)
            rows.append({"loss_fake": loss_fake.detach()})
        scaler.step(opt_f) if scaler else opt_f.step()

        opt_g.zero_grad(set_to_none=True)
        for i in common.micro_batches(N, student_ddp):  # 3. generator update on the same micro-batches
            rows[i].update(generator_backward(step, use_gad, *rollouts[i]))
        gnorm = common.clip_and_step(opt_g, student.parameters(), args.grad_clip, scaler)
        common.lr_step(scheds)
        ema.update_parameters(student) if ema else None
        return {**common.mean_rows(rows), "grad_norm": gnorm.item()}

    def generator_backward(step, use_gad, cond, states):
        """3. generator update on one micro-batch: grad through x0_hat = S(x_{t_g}, t_g); teacher and fake at x_tau
        without grad; back-propagates (TDM loss + lambda L_GAD) / N (Eq. 7, 9)."""
        k, t_g, t_mid, tau = draw_step()
        noise = torch.randn_like(states[0])
        with ac():
            eps_s, x0_s = predict(student_ddp, states[k, torch.arange(B, device=device)], t_g, cond, abar)
        a_m, s_m = alpha_sigma(abar, t_mid)
        x_tau = renoise(a_m * x0_s + s_m * eps_s, t_mid, tau, noise, abar)  # carries grad: dx_tau/dtheta (Eq. 9)
        xt = x_tau.detach()
        f_T = lambda x, n: teacher_x0(teacher, x, tau.repeat(n), common.cat(*[cond] * n), common.cat(*[null] * n),
                                      args.cfg, abar)[0]
        f_F = lambda x, n: predict(common.unwrap(fake), x, tau.repeat(n), common.cat(*[cond] * n), abar)[1]
        gad, mismatch = torch.zeros((), device=device), torch.zeros((), device=device)
        with torch.no_grad():
            if use_gad:  # Eq. 10: each network's response shares the forward the base loss needs (JVP or fd pair)
                h = gad_h(tau, args.gad_h, args.gad_h_schedule)
                v = direction(xt.shape, args.gad_direction, device)  # DEVIATION: --gad-direction unit = released
                with fp32():
                    T_cfg, dT = responses(f_T, xt, v, h, args.gad_jvp)
                    F_x0, dF = responses(f_F, xt, v, h, args.gad_jvp)
            else:
                with ac():
                    T_cfg, F_x0 = f_T(xt, 1), f_F(xt, 1)
        with ac():
            loss_tdm = tdm_generator_loss(x0_s, T_cfg, F_x0, args.huber_c)
            if use_gad and args.gad_path == "xtau":  # Eq. 9 with Eq. 7's lambda; gradient reaches theta via x_tau
                gad, mismatch = gad_surrogate(x_tau, dF, dT, h, args.gad_form, gad_mask(tau, args.gad_t_range))
            loss_g = loss_tdm + args.gad_weight * gad
        if use_gad and args.gad_path == "response":
            # DEVIATION (the released block, repaired): the same Eq. 9 vector drives the student's own response
            # S(x_tau + h v, tau) - S(x_tau, tau) at sg(x_tau) instead of x_tau. A second student forward, so the
            # first backward accumulates without DDP's all-reduce.
            with common.no_sync(student_ddp):
                common.backward(loss_g, N, scaler)
            f_S = lambda x, n: predict(student_ddp, x, tau.repeat(n), common.cat(*[cond] * n), abar)[1]
            with fp32():  # exact: back-propagating through the tangent (reverse over forward, common.jvp_pair)
                dS = student_response(f_S, x_tau, v, h, args.gad_jvp, args.gad_form)  # at sg(x_tau)
            gad, mismatch = gad_surrogate(dS, dF, dT, h, args.gad_form, gad_mask(tau, args.gad_t_range))
            loss_g = args.gad_weight * gad
        common.check_finite(step, loss_tdm=loss_tdm, gad=gad)
        common.backward(loss_g, N, scaler)
        return {"loss_tdm": loss_tdm.detach(), "gad_mismatch": mismatch}

    if args.bench:
        return common.interleaved_bench(step_fn, args.bench, device)
    # fixed grid: first 4 prompts x 4 fixed seeds, the same every time
    grid_prompts = (prompts * 4)[:4]
    grid_cond = common.select(encode(grid_prompts)[0], torch.arange(4).repeat_interleave(4))
    grid_z = torch.cat([torch.randn(common.latent_shape(pipe, 1), generator=torch.Generator().manual_seed(s))
                        for _ in range(4) for s in range(4)]).to(device)
    os.makedirs(args.out, exist_ok=True)
    if start == 0:  # every rank runs the networks (FSDP2's forwards are collective), rank 0 writes
        with torch.no_grad(), ac():
            x0 = teacher_sample(teacher, grid_z, grid_cond, common.select(null, torch.zeros(16, dtype=torch.long)),
                                args.cfg, args.eval_teacher_steps, abar)
        common.save_grid(common.decode(pipe, x0), os.path.join(args.out, "teacher.png"), nrow=4)

    log = common.Logger(args.out, args.steps, start, dist.is_main)
    metrics, use_gad = {}, args.gad_weight > 0
    for step in range(start + 1, args.steps + 1):
        metrics = step_fn(step, use_gad)
        log.log(step, **metrics)
        log.update()
        last = step == args.steps
        if common.due(step, args.sample_every, last):
            with ac():
                x0 = sample(common.unwrap(student), grid_z, grid_cond, args.timesteps, abar)
            common.save_grid(common.decode(pipe, x0), os.path.join(args.out, "samples.png"), nrow=4)
            common.plot_curves(log.path, os.path.join(args.out, "curves.png"))
        if common.due(step, args.ckpt_every, last):
            common.save_checkpoint(os.path.join(args.out, "ckpt.pt"), models, optims, step, args, scaler, schedulers=scheds)
        common.barrier()
    log.close()
    from diffusers import TCDScheduler

    # DEVIATION: the stock TCD last step returns sqrt(abar_0) x0 + sqrt(1 - abar_0) eps_hat, not x0
    sched = TCDScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    call = dict(num_inference_steps=len(args.timesteps), timesteps=list(args.timesteps), guidance_scale=1.0)
    common.export_pipeline(pipe, ema.module if ema else student, os.path.join(args.out, "pipeline"),
                           scheduler=sched, call=call)  # rank 0 writes; call.json: the "Reload with" call
    common.cleanup()
    return metrics


def evaluate(args, pipe, teacher, student, abar, prompts, device) -> dict:
    """Geometry metrics (evaluate.geometry_metrics, exact JVPs in fp32) of the student's 4-step map z -> x0 against
    the teacher's --eval-teacher-steps DDIM map with CFG, on fixed prompts and directions; and the diversity
    metric (DP-DMD Eq. 9) over --eval-seeds seeds per prompt."""
    P = min(4, len(prompts))
    cond, null = [common.cast(c, torch.float32) for c in common.encode(pipe, "pixart", prompts[:P], device)]
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(common.latent_shape(pipe, P), generator=g).to(device)
    phi_s = lambda x: sample(student, x, cond, args.timesteps, abar)
    phi_t = lambda x: teacher_sample(teacher, x, cond, null, args.cfg, args.eval_teacher_steps, abar)
    with torch.no_grad():
        x_s, x_t = phi_s(z), phi_t(z)
    out = geometry_metrics(phi_s, phi_t, z, n_dirs=2, seed=0)
    out["pointwise_mse"] = (x_s - x_t).pow(2).mean().item()
    N = args.eval_seeds
    zs = torch.randn(common.latent_shape(pipe, P * N), generator=g).to(device)
    with torch.no_grad():
        x = sample(student, zs, common.select(cond, torch.arange(P).repeat_interleave(N)), args.timesteps, abar)
        feat = load_features(args.feature_model, device) if args.feature_model else None
        out["diversity"] = diversity(latent_features(pipe, x, feat).view(P, N, -1))
    common.print0(" ".join(f"{k}={v:.4g}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    common.main(Args, train)
