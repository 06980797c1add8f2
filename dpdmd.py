"""Diversity-Preserved Distribution Matching Distillation for Fast Visual Synthesis (DP-DMD, paper 003).

A 4-step student is distilled from a multi-step teacher with two role-separated losses: its FIRST step
regresses a teacher-derived target (the velocity from the noise z to the teacher's ODE state after k steps,
or, for eps-prediction teachers, the teacher-implied x0 there), and its output is DETACHED before the remaining
steps, which are trained with the DMD loss (DMD2 form). No GAN, no LPIPS, no stored teacher images.
With lambda = 0 nothing is detached: that is the plain DMD baseline, trained through the whole rollout.

Equation map (equation numbers as in the paper; the forms follow its text and the authors' public SD3.5 code):
  Eq. 1-2 (linear flow path, v = eps - x0)   -> Schedule.to_x0(), Schedule.step()
  Eq. 4-5 (DMD gradient, DMD2 form)          -> dmd_grad(), dmd_loss()
  Eq. 6   (teacher-derived velocity v*)      -> anchor_velocity(), teacher_rollout()
  Eq. 7 / Eq. 41 (diversity loss)            -> div_loss()
  Eq. 8   (L_DMD + lambda L_div, detach)      -> student_rollout(), train() step 3
  Eq. 39-40 (x0 targets, diffusion teacher)  -> Schedule.to_x0()
  Eq. 9   (diversity metric)                 -> evaluate() via evaluate.diversity
  Alg. 1                                      -> train()

Deviations (each also marked `# DEVIATION:` at its line):
  - SDXL teacher CFG defaults to 8.0 (DMD2's SDXL value): the paper's value was lost in extraction.
  - Student/teacher trajectories use the stock diffusers schedulers: FlowMatchEuler shift 3 (SD3: student
    sigma = 1, 0.8577, 0.6022, 0.0089 -> 0; teacher 30 steps), and for SDXL deterministic DDIM with trailing
    spacing (student t = 999, 749, 499, 249; teacher 30 steps from t = 999) so that z -> sample is a fixed map.
  - DMD timesteps for the flow family: u ~ U{0.02..0.98} (DMD2's range) mapped through the shift-3 warp.
  - Diversity features are the raw latents unless --feature-model names a transformers vision model
    (the paper uses DINOv3-ViT-L and CLIP-ViT-L, N = 9 seeds).
  - Multi-rank resume: common.load_checkpoint derives one RNG stream per rank from rank 0's saved state, so
    only single-process resume is exact.
  - DMD normaliser: mean|x_hat - x0_real| as Eq. 5 / DMD2 / ADM Eq. 5 write it (default); the authors' SD3.5 code
    divides by mean|x_t - x0_real| (--dmd-norm x_t). With Gaussian denoisers theirs is 0.8-4.7x ours depending on
    sigma (issue 11 audit), which shifts the balance of DMD against lambda L_div behind the paper's numbers.
  - lr schedule: DMD2's (main/train_sd.py: diffusers constant_with_warmup, warmup_step 500, both nets, stepped every
    iteration); the DP-DMD authors' own schedule was not re-checked here.
Matched to the authors' code (issue 11): AdamW weight decay 0.0 (was 0.01, torch's default).

Commands:
  single GPU : python dpdmd.py                       # SD3.5-Medium, lambda = 0.05, k = 5
               python dpdmd.py --family sdxl         # SDXL x0 variant (App. C)
               python dpdmd.py --div-weight 0        # plain DMD baseline (no detach: DMD trains all steps)
               python dpdmd.py --no-detach           # Fig. 5 ablation: lambda > 0, DMD also reaches step 1
  torchrun   : torchrun --nproc_per_node 8 dpdmd.py --batch-size 2
  less memory: python dpdmd.py --batch-size 2 --grad-accum 2   # 4 per optimiser step, 2 micro-batches of 2
  sharded    : torchrun --nproc_per_node 8 dpdmd.py --fsdp --grad-ckpt      # FSDP2; README "Scale"
  CPU tiny   : python dpdmd.py --model tiny-sd3 --steps 12 --batch-size 2 --sample-every 6 --eval-every 6
Expect: metrics.jsonl with fake_loss on fake iterations and dmd_loss/div_loss on student iterations, a
`diversity` (Eq. 9) value every --eval-every steps, samples_*.png grids, curves.png, ckpt.pt, pipeline/.
On the real models DP-DMD should keep diversity clearly above the lambda = 0 run (Table 1: DINO 0.179 vs 0.137).
Reload with (the scheduler that reproduces the student's sampler is saved with it):
  pipe = DiffusionPipeline.from_pretrained("runs/dpdmd/pipeline")
  pipe(prompt, num_inference_steps=4, guidance_scale=1.0)
"""
import copy
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import common
from evaluate import diversity, latent_features, load_features

CFG_DEFAULT = {"sd3": 3.5, "sdxl": 8.0}  # Sec. 5.1 for SD3.5-M; DEVIATION: SDXL value from DMD2 (paper's lost)


@dataclass
class Args:
    # DP-DMD hyperparameters (Sec. 5.1, Tables 3-4; update ratio, lr and clip from the authors' SD3.5 code)
    family: Literal["sd3", "sdxl"] = "sd3"  # sd3 = flow teacher (SD3.5-M); sdxl = eps teacher (App. C)
    div_weight: float = 0.05  # lambda in Eq. 8 (Table 4); 0 = the plain DMD baseline (no detach, DMD on all steps)
    anchor_step: int = 5  # k: teacher ODE steps from z to the diversity anchor z_k (Table 3)
    teacher_steps: int = 30  # steps of the teacher's ODE sampler whose k-th state is the anchor
    cfg: float = -1.0  # teacher CFG for the anchor and the real score; -1 = family default (3.5 sd3, 8 sdxl)
    detach: bool = True  # with lambda > 0, stop DMD at the first step's output (Sec. 4.2); --no-detach = Fig. 5 ablation
    student_steps: int = 4  # student NFE (4 in all tables)
    fake_updates_per_student: int = 5  # fake-score updates between two student updates (authors' code)
    lr: float = 1e-5  # AdamW learning rate of student and fake score (Sec. 5.1)
    weight_decay: float = 0.0  # AdamW weight decay (the authors' SD3.5 code and run script)
    dmd_norm: Literal["x_hat", "x_t"] = "x_hat"  # DMD normaliser mean|. - x0_real|: x_hat (Eq. 5, DMD2) or x_t (authors' code)
    lr_schedule: Literal["constant", "cosine_with_restarts"] = "constant"  # lr schedule of both nets (DMD2: constant)
    lr_warmup: int = 500  # linear lr warm-up, in iterations (DMD2 main/train_sd.py: warmup_step 500, both nets)
    ema_decay: float = 0.0  # EMA of the student, exported when on; 0 = off
    grad_clip: float = 1.0  # gradient-norm clip for both nets (authors' code)
    min_t: float = 0.02  # DMD timesteps are drawn from [min_t, max_t] x T (DMD2)
    max_t: float = 0.98  # upper end of the DMD timestep range
    # run / system
    model: str = ""  # hub id, local dir, tiny-<family> or random[-sd35m|-sd3m] (real size); '' = the family's default
    out: str = "runs/dpdmd"  # output directory
    steps: int = 6000  # iterations, fake and student updates together (paper's count lost in extraction)
    batch_size: int = 4  # per-GPU micro-batch of prompts (paper's value lost); global = batch x accumulation x GPUs
    grad_accum: int = 1  # micro-batches of --batch-size per optimiser step (gradients summed; 1 = none)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # autocast dtype; auto = bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # cuda / cpu / auto
    seed: int = 0  # global seed (offset by rank)
    resume: str = ""  # '' | 'latest' | 'auto' (latest if there is one) | path to ckpt.pt
    overwrite: bool = False  # start fresh in a non-empty --out (its files are replaced as the run writes them)
    prompts: str = ""  # FILE.txt, FILE.{jsonl,csv,parquet}:COL, hf:ID[/CONFIG][@SPLIT][:COL], builtin; paper: DiffusionDB
    sample_every: int = 500  # fixed-seed sample grid and loss curves every N steps
    eval: bool = True  # compute the Eq. 9 diversity metric
    eval_every: int = 500  # diversity metric every N steps
    eval_prompts: int = 4  # fixed prompts for the diversity metric
    eval_seeds: int = 9  # seeds per prompt for the diversity metric (N in Eq. 9)
    feature_model: str = ""  # transformers vision model for Eq. 9 features ('' = raw latents), e.g. facebook/dinov2-base
    ckpt_every: int = 1000  # checkpoint every N steps
    log_every: int = 1  # metrics.jsonl row every N steps
    export: bool = True  # save the student as a stock diffusers pipeline in out/pipeline at the end
    grad_ckpt: bool = False  # gradient checkpointing of student and fake (diffusers enable_gradient_checkpointing)
    fsdp: bool = False  # FSDP2: shard student, fake and teacher per transformer block (default: DDP)
    offload: bool = False  # FSDP2 CPUOffloadPolicy: shards, gradients and optimizer states in CPU memory (needs --fsdp)
    lora_rank: int = 0  # LoRA rank of the student (common.add_lora; 0 = full fine-tuning, as the paper; fake: full)
    threads: int = 0  # CPU threads (0 = default / $CPU_THREADS)


# ----------------------------------------------------------------------------------------------
# Schedule arithmetic (fp32). A timestep t is what the denoiser is fed. Flow (sd3): t = 1000 sigma,
# x_sigma = (1 - sigma) x0 + sigma eps, output v = eps - x0. Diffusion (sdxl): t in {0..999},
# x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(abar_t), output eps.


def stock_scheduler(pipe, flow: bool):
    """The stock scheduler whose 4-step call reproduces the student sampler (used for export too)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if flow:
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    # DEVIATION: SDXL student/teacher sample with deterministic DDIM, trailing spacing (t = 999, 749, 499, 249)
    return DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     clip_sample=False, prediction_type="epsilon")


class Schedule:
    def __init__(self, scheduler, flow: bool, student_steps: int, teacher_steps: int):
        self.flow, self.sched = flow, scheduler
        self.shift = scheduler.config.shift if flow else None
        self.abar = None if flow else scheduler.alphas_cumprod.double()
        self.student, self.teacher = self.trajectory(student_steps), self.trajectory(teacher_steps)

    def trajectory(self, n: int) -> list:
        """[(t, alpha, sigma)] of the stock n-step sampler, ending with the clean state (None, 1, 0)."""
        s = copy.deepcopy(self.sched)
        s.set_timesteps(n)
        if self.flow:
            pts = [(t, 1.0 - sg, sg) for t, sg in zip(s.timesteps.tolist(), s.sigmas.tolist())]
        else:
            pts = [(t, self.abar[t].sqrt().item(), (1 - self.abar[t]).sqrt().item()) for t in s.timesteps.tolist()]
        return pts[:n] + [(None, 1.0, 0.0)]

    def coeffs(self, t: torch.Tensor) -> tuple:
        """(alpha_t, sigma_t) as (B, 1, 1, 1) fp32 for a batch of timesteps."""
        if self.flow:
            sigma = t.double() / 1000
            alpha = 1 - sigma
        else:
            abar = self.abar.to(t.device)[t.long()]
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)

    def sample_t(self, n: int, lo: float, hi: float, device) -> torch.Tensor:
        """t with u ~ U{lo T .. hi T} from the global RNG; flow: sigma = shift u / (1 + (shift - 1) u)."""
        u = torch.randint(int(lo * 1000), int(hi * 1000) + 1, (n,))
        if not self.flow:
            return u.clamp(max=999).to(device)
        u = u.double() / 1000  # DEVIATION: DMD2's U{0.02 T..0.98 T} through SD3's shift warp
        return (1000 * self.shift * u / (1 + (self.shift - 1) * u)).float().to(device)

    def to_x0(self, x, out, alpha, sigma):
        """x0 from the raw output: flow x0 = x - sigma v (Eq. 1-2); eps x0 = (x - sigma eps)/alpha (Eq. 39-40)."""
        x, out = x.float(), out.float()
        return x - sigma * out if self.flow else (x - sigma * out) / alpha

    def step(self, x, out, cur: tuple, nxt: tuple):
        """One sampler step cur -> nxt: Euler x + (sigma' - sigma) v (flow), DDIM eta=0 alpha' x0 + sigma' eps."""
        x, out = x.float(), out.float()
        if self.flow:
            return x + (nxt[2] - cur[2]) * out
        return nxt[1] * self.to_x0(x, out, cur[1], cur[2]) + nxt[2] * out

    def target(self, x0, eps):
        """Pretraining regression target of the fake score: v = eps - x0 (flow) or eps."""
        return eps - x0 if self.flow else eps


# ----------------------------------------------------------------------------------------------
# The paper's equations as pure functions on tensors


def dmd_grad(x, x0_real, x0_fake, x_norm=None):
    """Eq. 5 (DMD2 form): g = (x0_fake - x0_real) / mean_CHW |x - x0_real|, in fp32. x_norm: the tensor the normaliser
    is taken at instead of x (--dmd-norm x_t: the noisy input x_t, as the authors' code divides)."""
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    at = x if x_norm is None else x_norm.float()  # DEVIATION: default at x (Eq. 5); authors' code: x_t
    norm = (at - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return (x0_fake - x0_real) / norm


def dmd_loss(x, g):
    """Eq. 4-5 surrogate: L = 0.5 mean (x - sg(x - g))^2, whose gradient w.r.t. x is g / numel."""
    x = x.float()
    return 0.5 * F.mse_loss(x, (x - g).detach())


def anchor_velocity(z, z_k, sigma_k: float):
    """Eq. 6: v* = (z - z_k) / (1 - sigma_k), the straight-line velocity from z (sigma = 1) to z_k."""
    return (z.float() - z_k.float()) / (1.0 - sigma_k)


def div_loss(pred, target):
    """Eq. 7 (flow: pred = v_theta(z, 1, c)) / Eq. 41 (diffusion: pred = first-step x0): mean (pred - sg(target))^2."""
    return F.mse_loss(pred.float(), target.float().detach())


# ----------------------------------------------------------------------------------------------
# Denoiser calls and samplers


def denoise(net, x, t, cond, uncond=None, w: float = 1.0):
    """Raw denoiser output in fp32 at timestep t (scalar or (B,)); CFG out_u + w (out_c - out_u) if uncond."""
    if not torch.is_tensor(t):
        t = torch.tensor(t, dtype=torch.long if isinstance(t, int) else torch.float32)
    t = t.to(x.device).expand(x.shape[0])
    if uncond is None or w == 1.0:
        return net(x, timestep=t, **cond, return_dict=False)[0].float()
    out = net(torch.cat([x, x]), timestep=torch.cat([t, t]), **common.cat(cond, uncond), return_dict=False)[0].float()
    out_c, out_u = out.chunk(2)
    return out_u + w * (out_c - out_u)


@torch.no_grad()
def teacher_rollout(teacher, z, cond, uncond, w: float, sch: Schedule, k: int):
    """The teacher's ODE sampler (CFG w) for k steps from z -> (z_k, (t_k, alpha_k, sigma_k))."""
    x = z.float()
    for i in range(k):
        x = sch.step(x, denoise(teacher, x, sch.teacher[i][0], cond, uncond, w), sch.teacher[i], sch.teacher[i + 1])
    return x, sch.teacher[k]


@torch.no_grad()
def diversity_target(teacher, z, cond, uncond, w: float, sch: Schedule, k: int):
    """Flow: v* of Eq. 6. Diffusion: x0* = (z_k - sigma_k eps_T(z_k)) / alpha_k of Eq. 39 (z_k itself at sigma_k = 0)."""
    z_k, (t_k, a_k, s_k) = teacher_rollout(teacher, z, cond, uncond, w, sch, k)
    if sch.flow:
        return anchor_velocity(z, z_k, s_k)
    if t_k is None:
        return z_k
    return sch.to_x0(z_k, denoise(teacher, z_k, t_k, cond, uncond, w), a_k, s_k)


def student_rollout(student, z, cond, sch: Schedule, detach: bool = True):
    """The student's few-step sampler. Returns (x_hat, first) where `first` is the first step's diversity
    prediction (v_theta(z, 1, c) for flow, its x0 for diffusion). With `detach` the first step's output is cut
    from the graph (Sec. 4.2), so the DMD loss on x_hat reaches only steps 2..n."""
    S = sch.student
    out = denoise(student, z, S[0][0], cond)
    first = out if sch.flow else sch.to_x0(z, out, S[0][1], S[0][2])
    x = sch.step(z, out, S[0], S[1])
    if detach:
        x = x.detach()  # Eq. 8: DMD gradients stop at the first step
    for i in range(1, len(S) - 1):
        x = sch.step(x, denoise(student, x, S[i][0], cond), S[i], S[i + 1])
    return x, first


@torch.no_grad()
def sample(student, pipe, family, prompts, seeds, sch: Schedule, device) -> torch.Tensor:
    """Student samples (latents) for every prompt x seed; the noise of seed j is the same for every prompt."""
    cond, _ = common.encode(pipe, family, prompts, device)
    shape = common.latent_shape(pipe, 1)[1:]
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    out = []
    for p in range(len(prompts)):
        c = common.select(cond, torch.full((len(seeds),), p, device=device, dtype=torch.long))
        out.append(student_rollout(student, z, c, sch, detach=True)[0])
    return torch.cat(out)


def fake_loss(student, fake, z, cond, sch: Schedule):
    """Fake-score update: the pretraining loss (v or eps regression) on noised sg(student samples), t ~ U[0, T]."""
    with torch.no_grad():
        x_hat = student_rollout(student, z, cond, sch)[0]
    t = sch.sample_t(z.shape[0], 0.0, 1.0, z.device)
    eps = torch.randn(x_hat.shape).to(z.device)
    alpha, sigma = sch.coeffs(t)
    return F.mse_loss(denoise(fake, alpha * x_hat + sigma * eps, t, cond), sch.target(x_hat, eps))


def detaches(a: Args) -> bool:
    """The first step is cut from the DMD loss only when the diversity loss trains it (lambda > 0, --detach):
    lambda = 0 is plain DMD, whose gradient runs through the whole rollout."""
    return a.detach and a.div_weight > 0


def student_loss(student, teacher, fake, z, cond, uncond, w: float, sch: Schedule, a: Args) -> tuple:
    """Eq. 8: L_DMD(x_hat) + lambda L_div(first step) -> (total, L_DMD, L_div). Real score with CFG w, fake without.
    lambda = 0: plain DMD on the whole rollout; lambda > 0 with --detach: DMD on steps 2..n only (Sec. 4.2)."""
    target = diversity_target(teacher, z, cond, uncond, w, sch, a.anchor_step) if a.div_weight > 0 else None
    x_hat, first = student_rollout(student, z, cond, sch, detaches(a))
    t = sch.sample_t(z.shape[0], a.min_t, a.max_t, z.device)
    eps = torch.randn(x_hat.shape).to(z.device)
    alpha, sigma = sch.coeffs(t)
    x_t = alpha * x_hat.detach() + sigma * eps
    with torch.no_grad():
        x0_real = sch.to_x0(x_t, denoise(teacher, x_t, t, cond, uncond, w), alpha, sigma)
        x0_fake = sch.to_x0(x_t, denoise(fake, x_t, t, cond), alpha, sigma)
    loss_dmd = dmd_loss(x_hat, dmd_grad(x_hat.detach(), x0_real, x0_fake, x_t if a.dmd_norm == "x_t" else None))
    loss_div = div_loss(first, target) if target is not None else torch.zeros((), device=z.device)
    return loss_dmd + a.div_weight * loss_div, loss_dmd, loss_div


# ----------------------------------------------------------------------------------------------
# Training (Alg. 1)


# valid ranges of the numeric flags (common.RANGES covers steps, lr, periods, ...): checked before any model loads
RANGES = {"anchor_step": ">= 1", "cfg": (lambda w: w == -1 or w >= 0, "must be -1 (the family's default) or >= 0"),
          "fake_updates_per_student": ">= 1", "min_t": "[0, 1]", "max_t": "[0, 1]", "eval_prompts": ">= 1"}


def check_args(a: Args) -> None:
    """Ranges, then the checks that involve two flags (UsageError naming them)."""
    common.check_args(a, RANGES)
    common.require(a.student_steps >= (2 if detaches(a) else 1),
                   "argument --student-steps: --detach needs >= 2 student steps (DMD trains steps 2..n)")
    common.require(a.anchor_step <= a.teacher_steps, "argument --anchor-step: must be <= --teacher-steps")
    common.require(a.min_t < a.max_t, "argument --min-t: must be < --max-t")


def train(args: Args, pipe=None) -> dict:
    # run contract (common.start_run): flags, --out, resume, prompts and model ids, before any model loads
    ckpt_path = common.start_run(args, RANGES, family=args.family if pipe is None else None,
                                 model_ids={"--feature-model": args.feature_model * args.eval})
    check_args(args)
    dist = common.init_distributed(args.device)
    common.check_memory(args, "dpdmd", args.family, dist.world_size)  # the plan on rank 0; refused if it cannot fit
    device, flow = dist.device, args.family == "sd3"
    common.set_cpu_threads(args.threads)
    dtype = common.resolve_dtype(args.dtype, device)
    w = CFG_DEFAULT[args.family] if args.cfg < 0 else args.cfg

    # models: teacher frozen in the compute dtype; student and fake score copies in fp32
    if pipe is None:
        common.seed_everything(args.seed)  # the same (tiny) teacher on every rank
        pipe = common.load_pipeline(args.family, args.model or common.FAMILIES[args.family][2], dtype)
    pipe.to(device)
    teacher = getattr(pipe, pipe.denoiser_name)
    student = common.add_lora(copy.deepcopy(teacher).float().requires_grad_(True).train(), args.lora_rank)
    fake = copy.deepcopy(teacher).float().requires_grad_(True).train()
    for net in (student, fake) if args.grad_ckpt else ():
        net.enable_gradient_checkpointing()
    # DDP (default) or FSDP2 (--fsdp), before the optimizers: FSDP2 replaces the parameters by their shards
    wrap = lambda net: common.wrap(net, dist, args.fsdp, args.offload)  # noqa: E731
    teacher, student_d, fake_d = wrap(teacher), wrap(student), wrap(fake)
    sch = Schedule(stock_scheduler(pipe, flow), flow, args.student_steps, args.teacher_steps)
    opt_s = torch.optim.AdamW(common.trainable(student), lr=args.lr, weight_decay=args.weight_decay)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheds = common.lr_schedulers({"student": opt_s, "fake": opt_f}, args)  # both stepped every iteration, as DMD2
    ema = common.make_ema(student, args.ema_decay)
    models = {"student": student, "fake": fake, **({"ema": ema} if ema else {})}
    scaler = common.make_scaler(device, dtype)
    prompts = common.read_prompts(args.prompts)
    eval_prompts = [common.PROMPTS[i % len(common.PROMPTS)] for i in range(args.eval_prompts)]
    common.cache_prompts(pipe, args.family, prompts + eval_prompts, device)  # encoded once; encoders leave the GPU

    # resume: models, optimizers, step and the global RNG
    common.seed_everything(args.seed, dist.rank)
    start, path = 0, ckpt_path
    if path:
        start = common.load_checkpoint(path, models, {"student": opt_s, "fake": opt_f}, scaler, schedulers=scheds)["step"]
        common.print0(f"resumed from {path} at step {start}")
    feat_model = None
    if args.eval and args.feature_model and dist.is_main:
        feat_model = load_features(args.feature_model, device)
    logger = common.Logger(args.out, args.steps, start, enabled=dist.is_main)
    amp = lambda: common.autocast(device, dtype)  # noqa: E731
    metrics = {}

    N = args.grad_accum  # micro-batches per optimiser step: each loss / N, one step after them (common.micro_batches)

    for it in range(start, args.steps):
        step = it + 1
        student_turn = step % (args.fake_updates_per_student + 1) == 0
        opt, net = (opt_s, student_d) if student_turn else (opt_f, fake_d)
        opt.zero_grad(set_to_none=True)
        rows = []  # logged scalars, one row per micro-batch
        for _ in common.micro_batches(N, net):
            # 1. a batch of prompts and initial noise z, all from the global RNG
            idx = torch.randint(len(prompts), (args.batch_size,))
            cond, uncond = common.encode(pipe, args.family, [prompts[i] for i in idx], device)
            z = torch.randn(common.latent_shape(pipe, args.batch_size)).to(device)
            if not student_turn:
                # 2. fake score: the model's own pretraining loss on sg(student samples)
                with amp():
                    loss_fake = fake_loss(student_d, fake_d, z, cond, sch)
                common.check_finite(step, fake_loss=loss_fake)
                common.backward(loss_fake, N, scaler)
                rows.append({"fake_loss": loss_fake.detach()})
            else:
                # 3. student: L_div on the first step (Eq. 6-7 / 39-41), DMD on steps 2..n (Eq. 4-5), total Eq. 8
                with amp():
                    loss, loss_dmd, loss_div = student_loss(student_d, teacher, fake_d, z, cond, uncond, w, sch, args)
                common.check_finite(step, dmd_loss=loss_dmd, div_loss=loss_div)
                common.backward(loss, N, scaler)
                rows.append({"dmd_loss": loss_dmd.detach(), "div_loss": loss_div.detach(), "loss": loss.detach()})
        gn = common.clip_and_step(opt, net.parameters(), args.grad_clip, scaler)
        ema.update_parameters(student) if ema and student_turn else None
        row = {**common.mean_rows(rows), ("grad_norm" if student_turn else "fake_grad_norm"): gn.item()}
        metrics.update(row)
        common.lr_step(scheds)

        # logging, evaluation, grids, checkpoints (rank 0 writes)
        if dist.is_main and common.due(step, args.log_every, step == args.steps):
            logger.log(step, **row)
        last = step == args.steps
        if args.eval and common.due(step, args.eval_every, last):  # every rank (FSDP2's forwards), rank 0 logs
            metrics["diversity"] = evaluate(student, pipe, args, eval_prompts, sch, device, feat_model, amp)
            logger.log(step, diversity=metrics["diversity"])
        if common.due(step, args.sample_every, last):
            with amp():
                lat = sample(student, pipe, args.family, eval_prompts[:4], range(4), sch, device)
            common.save_grid(common.decode(pipe, lat), os.path.join(args.out, f"samples_{step:06d}.png"), nrow=4)
            common.plot_curves(logger.path, os.path.join(args.out, "curves.png"))
        if common.due(step, args.ckpt_every, last):
            common.save_checkpoint(os.path.join(args.out, "ckpt.pt"), models, {"student": opt_s, "fake": opt_f}, step, args,
                                   scaler, schedulers=scheds)
        common.barrier()
        logger.update()
    logger.close()

    # export: stock pipeline + the student + the scheduler that reproduces the training sampler
    if args.export:  # rank 0 writes
        metrics["pipeline"] = common.export_pipeline(pipe, ema.module if ema else student, os.path.join(args.out, "pipeline"),
                                                     scheduler=stock_scheduler(pipe, flow),
                                                     call=dict(num_inference_steps=args.student_steps, guidance_scale=1.0))
    common.barrier()
    common.cleanup()
    metrics["step"] = args.steps
    return metrics


def evaluate(student, pipe, args, eval_prompts, sch, device, feat_model, amp) -> float:
    """Eq. 9 diversity of the student over eval_prompts x eval_seeds (fixed seeds)."""
    with amp():
        lat = sample(student, pipe, args.family, eval_prompts, range(args.eval_seeds), sch, device)
    f = latent_features(pipe, lat, feat_model)
    return diversity(f.view(len(eval_prompts), args.eval_seeds, -1))


if __name__ == "__main__":
    common.main(Args, train)
