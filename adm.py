"""Adversarial Distribution Matching (ADM) and DMDX = ADP pre-training + one-step ADM.
Lu et al., "Adversarial Distribution Matching for Diffusion Distillation Towards Efficient Image and Video Synthesis",
ICCV 2025, arXiv 2507.18569. No public code exists: this file is written from the paper alone.

ADM: the generator output x̂0 is re-noised to x_t; the fake and the real score each take ONE PF-ODE step of Δt = T/64;
a hinge discriminator (frozen teacher + trainable 2D heads on many blocks) tells x^fake_{t-Δt} from x^real_{t-Δt}.
ADP pre-trains a one-step generator on offline teacher ODE pairs against a latent and a pixel discriminator.

Equation map: Eq. 1 -> Schedule.coeffs(), diffuse(); Eq. 2/3 (fake score) -> pretrain_loss(); Eq. 5-6 -> dmd_diagnostic()
(logged only); PF-ODE step t -> t-Δt -> pf_ode_step(); Eq. 7/8 -> hinge_g()/hinge_d(); Eq. 9/10 -> adp_g_loss()/adp_d_loss();
Sec. 4.2.1 -> cubic_t(); App. B.1 -> Heads, Taps, PixelEncoder; Alg. 1 -> adm_step(); Sec. 4.2 -> make_pairs(), adp_step();
Sec. 5 DMDX -> train(--pipeline dmdx).
Generator gradient (Alg. 1 l. 17-22): x̂0 = G(x_{t_n}, t_n) with grad; x_t = α_t x̂0 + σ_t z_g; x^fake = α' x0_ψ(x_t) +
σ' ε_ψ(x_t) (flow: x_t + (σ'-σ) v_ψ(x_t)). The gradient of -D(x^fake) reaches x̂0 (a) through x_t directly and (b)
through the fake score's INPUT x_t (its weights are frozen for this backward), both times α_t; before that it passes
the frozen D backbone's input. The real branch has no grad. test_generator_grad_paths checks
dL/dx̂0 = α_t [r + (σ'-σ) J_vᵀ r], r = dL/dx^fake.

Where the paper is silent, we chose (marked `# SILENT:` in the code)
  1. t ~ U(Δt, T) so that t-Δt >= 0; flow t = unshifted σ; DDPM t integer with Δt = floor(T/64) = 15.
  2. Fake score: t_f ~ U(0, T), w(t) = 1 (SD3 pretrained with logit-normal t).
  3. Generator schedule: the stock scheduler (SD3: FlowMatchEuler shift 3; SDXL: Euler "trailing", x_T = σ_T z), so
     the exported pipeline reproduces the training sampler; between steps the deterministic PF-ODE step.
  4. Heads: width 256, one conv block + 1x1 conv to a logit map, spatial mean per head, hinge per head averaged over
     heads, no timestep input (the backbone has it). The teacher module itself is the D backbone (shared, frozen).
  5. ADP: 2048 pairs, 25 teacher steps, CFG 7 for the pairs; latent D real/fake share t' with independent noises;
     pixel D resizes to the encoder's input size and uses its mean/std. TTUR k: k fake updates, then one G and one D.
  6. Recipe: constant lr, no warm-up, no EMA (--lr-schedule, --lr-warmup, --ema-decay offer them; the EMA is exported).
  7. LoRA (SD3-M, Table 2; rank, alpha and targets unstated): rank 64, alpha = rank, the attention projections of
     both MMDiT streams (common.LORA_TARGETS).
Deviations
  - Eq. 9 prints +λ2 D_τ2(x̃0) for the generator, which would make fakes look fake: we use -λ2 D_τ2 (sign typo).
  - ADP, DDPM teachers (SDXL): the paper switches the target to the pair velocity without saying how an ε-UNet does
    it. We keep ε: input = the pair's interpolation at the SNR of t at the UNet's scale, x_t = α_t x0 + σ_t z (for flow
    models exactly (1-t) x0 + t z); ε predicts the pair noise z, i.e. the velocity z - x0 by a fixed conversion.
  - SD3-M: LoRA on G as the paper (Table 2), fake score fully tuned (paper silent; --lora-rank acts on G only). DDP by
    default or FSDP2 (--fsdp, --offload for CPU offload; not with LoRA yet). Under --fsdp the rollout length n of
    Alg. 1 l. 15 is rank 0's draw on every rank (collective G).
  - Diversity: evaluate.diversity (1 - mean pairwise cosine) on 32x32 decoded pixels, not LPIPS (Table 6).

Commands
  GPU, SD3-M 4-step ADM:  python adm.py --family sd3 --steps 8000 --batch-size 4
  GPU, SDXL DMDX:         python adm.py --family sdxl --pipeline dmdx --steps 8000 --batch-size 4
  torchrun:               torchrun --nproc_per_node 8 adm.py --family sdxl --pipeline dmdx
  the paper's batch 128:  torchrun --nproc_per_node 8 adm.py --batch-size 4 --grad-accum 4   (Table 7: 32 GPUs x 4)
  sharded:                torchrun --nproc_per_node 8 adm.py --family sdxl --fsdp --grad-ckpt   (README "Scale")
  CPU tiny:               CPU_THREADS=1 python adm.py --model tiny --steps 20 --batch-size 2 --sample-every 10
Expect out/metrics.jsonl (loss_g, loss_d, loss_fake, dmd, d_fake, d_real, diversity), curves.png, grid_<step>.png,
ckpt.pt and pipeline/. loss_d near 2 = D cannot separate the two; the DMD diagnostic should drift down (Fig. 3).
Reload with (no CFG, Sec. 5; DMDX: runs/adm/adm/pipeline with num_inference_steps=1):
  pipe = DiffusionPipeline.from_pretrained("runs/adm/pipeline")
  pipe(prompt, num_inference_steps=4, guidance_scale=1.0)
"""
import copy
import hashlib
import math
import os
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from evaluate import diversity

DEFAULT_MODEL = {"sd3": "stabilityai/stable-diffusion-3-medium-diffusers", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


@dataclass
class Args:
    # --- paper hyperparameters (Sec. 4, 5, App. B.5) ---
    stage: Literal["adm", "adp"] = "adm"  # ADM score distillation (Alg. 1) or ADP adversarial pre-training (Sec. 4.2)
    pipeline: Literal["single", "dmdx"] = "single"  # dmdx: ADP, then one-step ADM from the ADP generator (Sec. 5)
    family: Literal["sd3", "sdxl"] = "sd3"  # teacher family (SD3-Medium: 4-step ADM; SDXL: DMDX)
    gen_steps: int = 0  # generator steps N; 0 = 4 for sd3, 1 for sdxl and for dmdx
    lr_g: float = 0.0  # generator lr; 0 = App. B.5: 1e-6 ADP, 1e-7 ADM SDXL, 1e-6 ADM SD3-M
    lr_d: float = 5e-6  # discriminator heads lr (App. B.5)
    lr_fake: float = 1e-6  # fake score lr (App. B.5)
    betas: tuple[float, ...] = (0.0, 0.99)  # AdamW betas, no weight decay (App. B.5)
    ttur: int = 1  # fake-score updates per generator update (App. A, Table 5)
    cfg_range: tuple[float, ...] = (6.0, 8.0)  # real-score CFG ~ U[lo, hi] (App. B.5: SDXL and SD3-M)
    ode_dt: float = 1 / 64  # PF-ODE step Δt / T (Sec. 4.1)
    head_channels: int = 256  # width of each D head (paper silent)
    lambda_latent: float = 0.85  # λ1, latent D weight in ADP (Eq. 9-10)
    lambda_pixel: float = 0.15  # λ2, pixel D weight in ADP (Eq. 9-10)
    pixel_encoder: str = "facebook/sam-vit-base"  # ADP pixel D backbone (transformers id; 'tiny' = random 12-layer ViT)
    pixel_layers: tuple[int, ...] = (3, 6, 9, 12)  # encoder layers with heads (App. B.1)
    pairs: int = 2048  # ADP: number of teacher ODE pairs (paper silent)
    pair_steps: int = 25  # ADP: teacher sampler steps per pair (paper silent; Table 1 runs SDXL with 25)
    pair_cfg: float = 7.0  # ADP: teacher CFG for the pairs (paper silent)
    shard_size: int = 64  # ADP: pairs per shard file (resumable)
    init: str = ""  # start the generator from this ckpt.pt (dmdx sets it to the ADP checkpoint)
    lora_rank: int = -1  # LoRA rank of G (common.add_lora); 0 = all weights; -1 = the paper's: 64 for sd3, 0 for sdxl
    # --- run / system ---
    model: str = ""  # hub id, local dir, 'tiny' or 'random' (real size); '' = the family's default (SD3-Medium, SDXL-Base)
    out: str = "runs/adm"  # output directory
    steps: int = 8000  # generator iterations per stage (Sec. 5: 8K)
    batch_size: int = 4  # per-GPU micro-batch (Table 7: micro batch 4); global = batch x accumulation x GPUs
    grad_accum: int = 1  # micro-batches of --batch-size per optimiser step (gradients summed; 1 = none)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # compute dtype (auto: bf16 on CUDA, fp32 on CPU)
    device: str = "auto"  # cuda / cpu / auto
    seed: int = 0  # global seed (offset by rank)
    resume: str = ""  # '' | 'latest' | 'auto' (latest if there is one) | path to ckpt.pt
    overwrite: bool = False  # start fresh in a non-empty --out (its files are replaced as the run writes them)
    sample_every: int = 500  # sample grid + curves + diversity every N steps
    ckpt_every: int = 500  # checkpoint every N steps
    log_every: int = 10  # metrics.jsonl row every N steps
    eval: bool = True  # diversity metric on the grid samples
    prompts: str = ""  # FILE.txt, FILE.{jsonl,csv,parquet}:COL, hf:ID[/CONFIG][@SPLIT][:COL], builtin (README Evaluate)
    threads: int = 0  # CPU threads (0 = default / CPU_THREADS)
    lr_schedule: Literal["constant", "cosine_with_restarts"] = "constant"  # lr schedule of every net (paper silent)
    lr_warmup: int = 0  # linear lr warm-up steps (paper silent: none)
    ema_decay: float = 0.0  # EMA of the generator, exported when on; 0 = off (paper silent)
    grad_ckpt: bool = False  # gradient checkpointing of generator and fake (diffusers enable_gradient_checkpointing)
    fsdp: bool = False  # FSDP2: shard generator, fake, heads and teacher per block (default: DDP)
    offload: bool = False  # FSDP2 CPUOffloadPolicy: shards, gradients and optimizer states in CPU memory (needs --fsdp)


# ---- Schedules (Eq. 1) and the paper's equations as pure functions ---------------------------------------


class Schedule:
    """Flow (SD3): t = σ in [0, 1], α = 1 - σ, net timestep 1000 σ, prediction v.
    DDPM (SDXL): integer t in [0, T), α = sqrt(ᾱ_t), σ = sqrt(1 - ᾱ_t), prediction ε. All arithmetic in fp32."""

    def __init__(self, family: str, scheduler, ode_dt: float):
        self.flow, self.scheduler = family == "sd3", scheduler
        self.T = 1.0 if self.flow else scheduler.config.num_train_timesteps
        self.dt = ode_dt if self.flow else int(self.T * ode_dt)  # SILENT: integer Δt = floor(T/64) for DDPM
        self.acp = None if self.flow else scheduler.alphas_cumprod.double()
        if self.dt <= 0:
            raise ValueError(f"--ode-dt {ode_dt} gives Δt = {self.dt}")

    def coeffs(self, t: torch.Tensor):
        """α_t, σ_t as (B, 1, 1, 1) fp32 tensors (Eq. 1)."""
        if self.flow:
            return (1 - t.float()).view(-1, 1, 1, 1), t.float().view(-1, 1, 1, 1)
        a = self.acp.to(t.device)[t.long()]
        return a.sqrt().float().view(-1, 1, 1, 1), (1 - a).sqrt().float().view(-1, 1, 1, 1)

    def net_t(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() * 1000 if self.flow else t.float()

    def sample_t(self, n: int, device, low=0.0, include_T: bool = False) -> torch.Tensor:
        """t ~ U(low, T) (continuous for flow, integers for DDPM); include_T: U(low, T]."""
        if self.flow:
            u = torch.rand(n, device=device)
            return low + (self.T - low) * ((1 - u) if include_T else u)
        return torch.randint(int(low) + int(include_T), int(self.T), (n,), device=device)

    def to_x0_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """Network output -> (x0, ε) in fp32 (flow: x0 = x - σv, ε = x + (1-σ)v; DDPM: x0 = (x - σε)/α)."""
        (a, s), out, x = self.coeffs(t), out.float(), x.float()
        return (x - s * out, x + a * out) if self.flow else ((x - s * out) / a, out)

    def gen_timesteps(self, n: int) -> torch.Tensor:
        """The stock scheduler's n inference timesteps t_N > ... > t_1 (SILENT: generator schedule)."""
        s = copy.deepcopy(self.scheduler)
        s.set_timesteps(n)
        return s.sigmas[:n].float() if self.flow else s.timesteps.long()

    def cubic(self, u: torch.Tensor) -> torch.Tensor:
        return cubic_t(u, self.T) if self.flow else cubic_t(u, self.T).long().clamp(0, int(self.T) - 1)


def diffuse(x0, noise, a, s):
    """Eq. 1: x_t = α_t x0 + σ_t ε."""
    return a * x0 + s * noise


def pf_ode_step(x0, eps, a_next, s_next):
    """One deterministic PF-ODE (DDIM) step to t': x_{t'} = α_{t'} x0 + σ_{t'} ε. For flow models (α = 1 - σ)
    this equals the Euler step x + (σ' - σ) v; for DDPM it is Euler in (x/α, σ/α) (Sec. 3.1)."""
    return a_next * x0 + s_next * eps


def pretrain_loss(out, x0, eps, flow: bool):
    """Eq. 2 / Eq. 3 with w(t) = 1: ‖ε_ψ - ε‖² (DDPM) or ‖v_ψ - (ε - x0)‖² (flow), mean, fp32."""
    return (out.float() - ((eps - x0) if flow else eps).float()).pow(2).mean()


def hinge_g(d_fake):
    """Eq. 7: L_G = E[-D(x^fake)]."""
    return -d_fake.float().mean()


def hinge_d(d_fake, d_real):
    """Eq. 8: L_D = E[max(0, 1 + D(fake)) + max(0, 1 - D(real))]."""
    return F.relu(1 + d_fake.float()).mean() + F.relu(1 - d_real.float()).mean()


def adp_g_loss(d_lat_fake, d_pix_fake, lam1, lam2):
    """Eq. 9 (with the pixel term's sign corrected, see Deviations): -λ1 D_τ1(x̃_t') - λ2 D_τ2(x̃0)."""
    # DEVIATION: Eq. 9 prints +λ2 D_τ2(x̃0); the generator must raise the pixel D's score, as it does the latent one.
    return lam1 * hinge_g(d_lat_fake) + lam2 * hinge_g(d_pix_fake)


def adp_d_loss(d_lat_fake, d_lat_real, d_pix_fake, d_pix_real, lam1, lam2):
    """Eq. 10: λ1 hinge(latent D) + λ2 hinge(pixel D)."""
    return lam1 * hinge_d(d_lat_fake, d_lat_real) + lam2 * hinge_d(d_pix_fake, d_pix_real)


def cubic_t(u, T):
    """Sec. 4.2.1: t = (1 - u³) T, u ~ U[0, 1): concentrates near T (P(t > T/2) = 0.5^(1/3) ≈ 0.79, E t = 0.75 T)."""
    return (1 - u.float() ** 3) * T


@torch.no_grad()
def dmd_diagnostic(x0_hat, x0_fake, x0_real):
    """Eq. 5-6 (DMD2 form), logged only: g = (x0_f - x0_r) / mean|x̂0 - x0_r|, L = 0.5 mean‖x̂0 - sg(x̂0 - g)‖²."""
    g = (x0_fake.float() - x0_real.float()) / (x0_hat.float() - x0_real.float()).abs().mean((1, 2, 3), keepdim=True)
    return 0.5 * g.pow(2).mean()


# ---- Networks: denoiser calls, sampler, discriminator taps and heads, pixel encoder ----------------------


def predict(net, x, t, cond, sch, uncond=None, w=1.0):
    """(x0, ε) in fp32 of `net` at (x, t); with `uncond`, CFG on the raw output: u + w (c - u)."""
    dtype = next(net.parameters()).dtype
    if uncond is None:
        out = net(x.to(dtype), timestep=sch.net_t(t), **cond, return_dict=False)[0]
    else:
        c, u = net(torch.cat([x, x]).to(dtype), timestep=sch.net_t(torch.cat([t, t])), **common.cat(cond, uncond),
                   return_dict=False)[0].float().chunk(2)
        out = u + (w.view(-1, 1, 1, 1) if torch.is_tensor(w) else w) * (c - u)
    return sch.to_x0_eps(out, x, t)


def rollout(net, z, cond, sch, ts, stop: int, uncond=None, w=1.0):
    """Deterministic PF-ODE sampler over ts[0] > ts[1] > ...: returns x_{ts[stop]}, or x0 when stop == len(ts)
    (Alg. 1 l. 9 and l. 16). DDPM starts from x_{t_N} = σ_{t_N} z, as the stock Euler pipeline does; flow from z."""
    B = z.shape[0]
    x = z.float() if sch.flow else z.float() * sch.coeffs(ts[0].expand(B).to(z.device))[1]
    for i in range(stop):
        x0, eps = predict(net, x, ts[i].expand(B).to(z.device), cond, sch, uncond, w)
        if i + 1 == len(ts):
            return x0
        x = pf_ode_step(x0, eps, *sch.coeffs(ts[i + 1].expand(B).to(z.device)))
    return x


class Taps:
    """Forward hooks collecting the D features of the frozen backbone while `on` (App. B.1): SD3: every transformer
    block's image stream, reshaped [B, N, C] -> [B, C, h, w]; SDXL: the last ResNet of each down, mid and up block."""

    def __init__(self, net, family: str):
        self.on, self.feats, self.hw, self.patch = False, [], None, net.config.patch_size if family == "sd3" else 1
        mods = list(net.transformer_blocks) if family == "sd3" else \
            [b.resnets[-1] for b in net.down_blocks] + [net.mid_block.resnets[-1]] + [b.resnets[-1] for b in net.up_blocks]
        for m in mods:
            m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, out):
        if self.on:  # JointTransformerBlock returns (text stream, image stream [B, N, C])
            h = out[1].transpose(1, 2).unflatten(2, (self.hw[0] // self.patch, -1)) if isinstance(out, tuple) else out
            self.feats.append(h)

    def __call__(self, net, x, t, cond, sch) -> list:
        self.feats, self.on, self.hw = [], True, x.shape[-2:]
        try:
            net(x.to(next(net.parameters()).dtype), timestep=sch.net_t(t), **cond, return_dict=False)
        finally:
            self.on = False
        return self.feats


class Heads(nn.Module):
    """Per feature map: Conv 4x4 s2 -> GroupNorm(32) -> SiLU -> Conv 1x1 logit map (App. B.1); [B, K] spatial means."""

    def __init__(self, channels: list, width: int):
        super().__init__()
        groups = math.gcd(32, width)  # 32 for every width we use; fewer only if --head-channels is not a multiple of 32
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 4, 2, 1), nn.GroupNorm(groups, width), nn.SiLU(),
                                                 nn.Conv2d(width, 1, 1)) for c in channels)

    def forward(self, feats: list) -> torch.Tensor:
        return torch.stack([h(f.float()).mean(dim=(1, 2, 3)) for h, f in zip(self.heads, feats)], 1)


class Discriminator(nn.Module):
    """All trainable D parameters in one module (one DDP wrapper): latent heads and, for ADP, pixel heads."""

    def __init__(self, lat_channels: list, pix_channels: list | None, width: int):
        super().__init__()
        self.lat, self.pix = Heads(lat_channels, width), (Heads(pix_channels, width) if pix_channels else None)

    def forward(self, lat_feats, pix_feats=None):
        return self.lat(lat_feats), (self.pix(pix_feats) if pix_feats is not None else None)


class PixelEncoder:
    """Frozen vision encoder for the ADP pixel D (the paper: SAM's). Hidden states of `layers` as [B, C, h, w]."""

    def __init__(self, name: str, layers: tuple, device):
        import transformers

        if name == "tiny":
            cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64,
                                         image_size=32, patch_size=8)
            self.net, mean, std = transformers.ViTModel(cfg, add_pooling_layer=False), [0.5] * 3, [0.5] * 3
        else:
            m = transformers.AutoModel.from_pretrained(name)
            self.net = getattr(m, "vision_encoder", None) or getattr(m, "vision_model", None) or m
            proc = transformers.AutoImageProcessor.from_pretrained(name)
            mean, std = proc.image_mean, proc.image_std
        self.net.to(device).eval().requires_grad_(False)
        if max(layers) > self.net.config.num_hidden_layers or min(layers) < 1:
            raise ValueError(f"--pixel-layers {layers}: {name} has layers 1..{self.net.config.num_hidden_layers}")
        self.layers, self.size = layers, self.net.config.image_size
        self.mean, self.std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))

    def __call__(self, images: torch.Tensor) -> list:
        x = F.interpolate((images.float() + 1) / 2, size=(self.size, self.size), mode="bilinear", align_corners=False)
        dtype = next(self.net.parameters()).dtype
        hs = self.net(pixel_values=((x - self.mean) / self.std).to(dtype), output_hidden_states=True).hidden_states
        # hidden_states[l] = output of layer l. SAM: [B, h, w, C]; ViT / DINOv2: [B, prefix + h*w, C], prefix dropped
        sq = lambda h: h[:, -math.isqrt(h.shape[1]) ** 2:].transpose(1, 2).unflatten(2, (math.isqrt(h.shape[1]), -1))
        return [hs[i].permute(0, 3, 1, 2) if hs[i].ndim == 4 else sq(hs[i]) for i in self.layers]


def decode_with_grad(pipe, x0):
    """VAE decode (frozen weights) keeping the graph, so the pixel D's gradient reaches the generator (Sec. 4.2)."""
    cfg = pipe.vae.config
    return pipe.vae.decode(x0.to(pipe.vae.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0)).sample.float()


def export_scheduler(pipe, family):
    """The scheduler the exported pipeline uses; its set_timesteps(N) gives the generator's training schedule."""
    from diffusers import EulerDiscreteScheduler as Euler

    return pipe.scheduler if family == "sd3" else Euler.from_config(pipe.scheduler.config, timestep_spacing="trailing")


# ---- ADP data: teacher ODE pairs, generated offline into resumable shards (Sec. 4.2, point 1) ------------


@torch.no_grad()
def make_pairs(pipe, teacher, sch, family, prompts, args, pair_dir, dist) -> None:
    """Shard k: (z = x_T, x0 = teacher PF-ODE endpoint, prompt) from its own generator seeded by (seed, k), so it is the
    same whether made in one run or after a restart (common.make_shards: atomic, resumable, split across ranks)."""
    ts = sch.gen_timesteps(args.pair_steps)

    def make(k):
        g, n = torch.Generator().manual_seed(args.seed * 1_000_003 + k), min(args.shard_size, args.pairs - k * args.shard_size)
        ps = [prompts[j] for j in torch.randint(len(prompts), (n,), generator=g)]
        z, x0, bs = torch.randn(common.latent_shape(pipe, n), generator=g), [], args.batch_size
        for i in range(0, n, bs):
            cond, uncond = common.encode(pipe, family, ps[i:i + bs], dist.device)
            with common.autocast(dist.device, teacher.dtype):
                x0.append(rollout(teacher, z[i:i + bs].to(dist.device), cond, sch, ts, len(ts), uncond, args.pair_cfg).cpu())
        return {"z": z, "x0": torch.cat(x0), "prompts": ps}

    common.make_shards(pair_dir, math.ceil(args.pairs / args.shard_size), make, dist, "ODE pairs")


def load_pairs(pair_dir, n_shards):
    shards = common.load_shards(pair_dir, n_shards)
    return torch.cat([s["z"] for s in shards]), torch.cat([s["x0"] for s in shards]), sum((s["prompts"] for s in shards), [])


# ---- Training --------------------------------------------------------------------------------------------


def opt_step(opt, scaler):
    if scaler is None:
        return opt.step()
    scaler.step(opt)
    scaler.update()


def fake_branch(fake, x0_hat, z_g, t, cond, sch):
    """Alg. 1 l. 18-20: x_t = q(x_t | x̂0) with fresh noise, one PF-ODE step of the fake score to t - Δt.
    Gradient reaches x̂0 through x_t directly and through the fake score's input (its weights must be frozen here)."""
    x_t = diffuse(x0_hat, z_g, *sch.coeffs(t))
    x0_f, eps_f = predict(fake, x_t, t, cond, sch)
    return x_t, x0_f, pf_ode_step(x0_f, eps_f, *sch.coeffs(t - sch.dt))


def adm_step(M, cond, uncond, args, dev):
    """One generator iteration of Alg. 1 (l. 7-26) after the prompts are encoded: cond and uncond hold --grad-accum
    micro-batches of --batch-size rows; each update sums their gradients and steps once. Returns logged scalars."""
    B, N, shape, sch, ac = args.batch_size, args.grad_accum, M.shape, M.sch, M.ac
    mb = lambda c, i: common.select(c, slice(i * B, (i + 1) * B))  # micro-batch i's rows
    # l. 7-11: fake score update on sg(G samples), pretraining loss, no CFG (TTUR times)
    for _ in range(args.ttur):
        M.opt["fake"].zero_grad(set_to_none=True)
        fake_losses = []  # the last round's are logged
        for i in common.micro_batches(N, M.fake):
            with torch.no_grad(), ac():
                x0 = rollout(M.G_u, torch.randn(shape, device=dev), mb(cond, i), sch, M.ts, len(M.ts))
            z_f, t_f = torch.randn(shape, device=dev), sch.sample_t(B, dev)  # SILENT: t_f ~ U(0, T), w(t) = 1
            with ac():
                out = M.fake(diffuse(x0, z_f, *sch.coeffs(t_f)), timestep=sch.net_t(t_f), **mb(cond, i), return_dict=False)[0]
            fake_losses.append(pretrain_loss(out, x0, z_f, sch.flow))
            common.backward(fake_losses[-1], N, M.scaler)
        opt_step(M.opt["fake"], M.scaler)
    freeze = lambda frozen: [m.requires_grad_(not frozen) for m in (M.fake_u, M.D_u)]
    freeze(True)
    rows, kept = [], []
    M.opt["G"].zero_grad(set_to_none=True)
    for i in common.micro_batches(N, M.G):
        c = mb(cond, i)
        # l. 15-17: roll G without grad to t_n, then x̂0 = G(x_{t_n}, t_n) with grad
        n = common.same_on_all_ranks(int(torch.randint(len(M.ts), ())), args.fsdp)  # FSDP2: rank 0's n (collective G)
        with torch.no_grad(), ac():
            x_tn = rollout(M.G_u, torch.randn(shape, device=dev), c, sch, M.ts, n)
        t_n = M.ts[n].expand(B).to(dev)
        with ac():
            x0_hat, _ = predict(M.G, x_tn, t_n, c, sch)
            # l. 18-20: diffuse with fresh noise, one fake PF-ODE step (grad to x̂0 through x_t and the fake's input)
            t = sch.sample_t(B, dev, low=sch.dt)  # SILENT: t ~ U(Δt, T) so that t - Δt >= 0
            x_t, x0_f, x_fake = fake_branch(M.fake_u, x0_hat, torch.randn(shape, device=dev), t, c, sch)
            # l. 21: one real PF-ODE step with CFG w ~ U[lo, hi], no grad
            with torch.no_grad():
                w = args.cfg_range[0] + (args.cfg_range[1] - args.cfg_range[0]) * torch.rand(B, device=dev)
                x0_r, eps_r = predict(M.teacher, x_t.detach(), t, c, sch, mb(uncond, i), w)
                x_real = pf_ode_step(x0_r, eps_r, *sch.coeffs(t - sch.dt))
            # l. 22: generator hinge loss, Eq. 7, through the frozen D backbone and frozen heads
            d_g, _ = M.D_u(M.taps(M.teacher, x_fake, t - sch.dt, c, sch))
            loss_g = hinge_g(d_g)
        common.backward(loss_g, N, M.scaler)
        kept.append((x_fake.detach(), x_real, t, c))  # the D update's samples
        rows.append(dict(loss_g=loss_g.detach(), loss_fake=fake_losses[i].detach(),
                         dmd=dmd_diagnostic(x0_hat.detach(), x0_f.detach(), x0_r)))
    opt_step(M.opt["G"], M.scaler)
    freeze(False)
    # l. 25-26: discriminator hinge loss, Eq. 8, fake and real in one backbone pass
    M.opt["D"].zero_grad(set_to_none=True)
    for i in common.micro_batches(N, M.D):
        x_fake, x_real, t, c = kept[i]
        with ac():
            d, _ = M.D(M.taps(M.teacher, torch.cat([x_fake, x_real]), (t - sch.dt).repeat(2), common.cat(c, c), sch))
            loss_d = hinge_d(d[:B], d[B:])
        common.backward(loss_d, N, M.scaler)
        rows[i].update(loss_d=loss_d.detach(), d_fake=d[:B].mean(), d_real=d[B:].mean())
    opt_step(M.opt["D"], M.scaler)
    return common.mean_rows(rows)


def adp_step(M, cond, z, x0, args, dev):
    """One ADP iteration (Sec. 4.2, Eq. 9-10) on a batch of teacher ODE pairs (z = x_T, x0): --grad-accum
    micro-batches of --batch-size rows, each update sums their gradients and steps once."""
    B, N, sch, ac, lam1, lam2 = args.batch_size, args.grad_accum, M.sch, M.ac, args.lambda_latent, args.lambda_pixel
    mb = lambda c, i: common.select(c, slice(i * B, (i + 1) * B))  # micro-batch i's rows
    rows, kept = [], []
    M.D_u.requires_grad_(False)
    M.opt["G"].zero_grad(set_to_none=True)
    for i in common.micro_batches(N, M.G):
        c, z_i, x0_i = mb(cond, i), z[i * B:(i + 1) * B], x0[i * B:(i + 1) * B]
        t = sch.cubic(torch.rand(B, device=dev))  # Sec. 4.2.1: cubic generator timestep
        # DEVIATION (DDPM teachers): interpolate the pair at the SNR of t, at the UNet's input scale (flow: (1-t) x0 + t z)
        x_t = diffuse(x0_i, z_i, *sch.coeffs(t))
        t1 = sch.sample_t(B, dev, include_T=True)  # Sec. 4.2.2: t' ~ U(0, T]
        with ac():
            x0_g, _ = predict(M.G, x_t, t, c, sch)  # the generator predicts the pair's velocity (flow) / noise (DDPM)
            x_fake_t1 = diffuse(x0_g, torch.randn_like(x0_i), *sch.coeffs(t1))
            img_fake = decode_with_grad(M.pipe, x0_g)
            d_lat, d_pix = M.D_u(M.taps(M.teacher, x_fake_t1, t1, c, sch), M.pixel(img_fake))
            loss_g = adp_g_loss(d_lat, d_pix, lam1, lam2)
        common.backward(loss_g, N, M.scaler)
        kept.append((x_fake_t1.detach(), img_fake.detach(), x0_i, t1, c))  # the D update's samples
        rows.append(dict(loss_g=loss_g.detach()))
    opt_step(M.opt["G"], M.scaler)
    M.D_u.requires_grad_(True)
    M.opt["D"].zero_grad(set_to_none=True)
    for i in common.micro_batches(N, M.D):
        x_fake_t1, img_fake, x0_i, t1, c = kept[i]
        with torch.no_grad(), ac():
            x_real_t1 = diffuse(x0_i, torch.randn_like(x0_i), *sch.coeffs(t1))  # SILENT: same t', independent noise
            img_real = common.decode(M.pipe, x0_i)
            lat_feats = M.taps(M.teacher, torch.cat([x_fake_t1, x_real_t1]), t1.repeat(2), common.cat(c, c), sch)
            pix_feats = M.pixel(torch.cat([img_fake, img_real]))
        with ac():
            d_lat, d_pix = M.D(lat_feats, pix_feats)
            loss_d = adp_d_loss(d_lat[:B], d_lat[B:], d_pix[:B], d_pix[B:], lam1, lam2)
        common.backward(loss_d, N, M.scaler)
        rows[i].update(loss_d=loss_d.detach(), d_fake=d_lat[:B].mean(), d_real=d_lat[B:].mean(),
                       d_pix_fake=d_pix[:B].mean(), d_pix_real=d_pix[B:].mean())
    opt_step(M.opt["D"], M.scaler)
    return common.mean_rows(rows)


@torch.no_grad()
def sample_grid(M, prompts, family, dev, path, evaluate=True, n_seeds=4):
    """Fixed prompts x fixed seeds (own generator: the global RNG, hence resume, is untouched). Returns diversity."""
    P = min(4, len(prompts))
    z = [torch.randn(common.latent_shape(M.pipe, 1), generator=torch.Generator().manual_seed(s)) for s in range(n_seeds)]
    z = torch.cat(z * P)
    cond, _ = common.encode(M.pipe, family, [p for p in prompts[:P] for _ in range(n_seeds)], dev)
    with M.ac():
        images = common.decode(M.pipe, rollout(M.G_u, z.to(dev), cond, M.sch, M.ts, len(M.ts)))
    common.save_grid(images, path, nrow=n_seeds)
    return diversity(F.interpolate(images, size=(32, 32), mode="area").reshape(P, n_seeds, -1)) if evaluate else None


# valid ranges of the numeric flags (common.RANGES covers steps, lr, periods, ...): checked before any model loads
RANGES = {"gen_steps": ">= 0", "lr_g": ">= 0", "ttur": ">= 1", "cfg_range": ">= 0", "ode_dt": "(0, 1)",
          "head_channels": ">= 1", "lambda_latent": ">= 0", "lambda_pixel": ">= 0", "pixel_layers": ">= 1", "pairs": ">= 1",
          "pair_cfg": ">= 0", "shard_size": ">= 1", "lora_rank": ">= -1"}


def train(args: Args) -> dict:
    if args.pipeline == "dmdx":  # each stage resumes from its own directory (out/adp, out/adm)
        common.require(args.resume in ("", "latest", "auto"),
                       "--pipeline dmdx resumes each stage from its own directory: use --resume latest (or auto)")
        common.require(args.resume != "latest" or os.path.isfile(os.path.join(args.out, "adp", "ckpt.pt")),
                       f"--resume latest: no checkpoint at {os.path.join(args.out, 'adp', 'ckpt.pt')}; "
                       "--resume auto starts fresh when there is none")

    def stage(**kw):  # a stage's args; the flags typed on the command line stay marked as typed
        a = replace(args, **kw, resume="auto" if args.resume else "")
        if hasattr(args, "_explicit"):
            a._explicit = args._explicit
        return a
    try:  # one process group for both DMDX stages (re-initialising one under torchrun hangs)
        if args.pipeline == "single":
            return train_stage(args)
        train_stage(stage(stage="adp", gen_steps=1, out=os.path.join(args.out, "adp")))  # Sec. 5: DMDX = ADP,
        return train_stage(stage(stage="adm", gen_steps=1, out=os.path.join(args.out, "adm"),  # then one-step ADM
                                 init=os.path.join(args.out, "adp", "ckpt.pt")))
    finally:
        common.cleanup()


def train_stage(args: Args) -> dict:
    # run contract (common.start_run): flags, --out, resume, prompts and model ids, before any model loads
    family, model = args.family, args.model or DEFAULT_MODEL[args.family]
    model = f"tiny-{family}" if model == "tiny" else model
    model = ("random-sd3m" if family == "sd3" else "random-sdxl") if model == "random" else model  # SD3-Medium, as above
    encoder = args.pixel_encoder if args.stage == "adp" and not common.is_tiny(model) else "tiny"  # 'tiny': built here
    ckpt_path = common.start_run(args, RANGES, family=family, model=model, own=("pairs_*",),
                                 model_ids={"--pixel-encoder": "" if encoder == "tiny" else encoder})
    common.require(len(args.cfg_range) == 2 and args.cfg_range[0] <= args.cfg_range[1],
                   f"argument --cfg-range: need two values lo <= hi, got {args.cfg_range}")
    lora_rank = args.lora_rank if args.lora_rank >= 0 else (64 if family == "sd3" else 0)  # SILENT 7 (Table 2, B.5)
    dist = common.init_distributed(args.device)
    common.check_memory(replace(args, lora_rank=lora_rank, model=model), "adm", family, dist.world_size)  # rank 0
    common.set_cpu_threads(args.threads)
    dev, dtype = dist.device, common.resolve_dtype(args.dtype, dist.device)
    common.seed_everything(args.seed)  # same (tiny, random) models on every rank; data seeds get the rank offset below
    N = args.gen_steps or (4 if family == "sd3" else 1)
    lr_g = args.lr_g or (1e-6 if args.stage == "adp" or family == "sd3" else 1e-7)  # App. B.5
    # models: generator G <- F, fake f <- F (ADM), D = frozen teacher F + trainable heads
    pipe = common.load_pipeline(family, model, torch.float32).to(dev)  # fp32 so the trainable copies are exact
    teacher = getattr(pipe, pipe.denoiser_name)
    M = type("Models", (), dict(pipe=pipe, teacher=teacher, shape=common.latent_shape(pipe, args.batch_size)))()
    M.sch = Schedule(family, export_scheduler(pipe, family), args.ode_dt)
    M.ts, M.ac = M.sch.gen_timesteps(N).to(dev), lambda: common.autocast(dev, dtype)
    M.G_u = common.add_lora(copy.deepcopy(teacher).float().requires_grad_(True).train(), lora_rank)
    M.taps = Taps(teacher, family)
    c0, _ = common.encode(pipe, family, [""], dev)
    with torch.no_grad():
        lat_ch = [f.shape[1] for f in M.taps(teacher, torch.zeros(common.latent_shape(pipe, 1), device=dev),
                                             M.sch.gen_timesteps(1).to(dev), c0, M.sch)]
        M.pixel, pix_ch = None, None
        if args.stage == "adp":
            enc = "tiny" if common.is_tiny(model) and args.pixel_encoder == Args.pixel_encoder else args.pixel_encoder
            M.pixel = PixelEncoder(enc, args.pixel_layers, dev)
            pix_ch = [f.shape[1] for f in M.pixel(torch.zeros(1, 3, 64, 64, device=dev))]
    M.D_u = Discriminator(lat_ch, pix_ch, args.head_channels).to(dev)
    M.fake_u = copy.deepcopy(teacher).float().requires_grad_(True).train() if args.stage == "adm" else None
    if not ckpt_path and args.init:  # DMDX: the ADM stage starts from the ADP generator
        M.G_u.load_state_dict(common.read_checkpoint(args.init)["models"]["G"])
    for net in (M.G_u, M.fake_u) if args.grad_ckpt else ():
        net.enable_gradient_checkpointing() if net is not None else None
    # DDP (default) or FSDP2 (--fsdp) before the optimizers: FSDP2 replaces the parameters by their shards
    wrap = lambda net: common.wrap(net, dist, args.fsdp, args.offload)
    M.G, M.D, M.fake = wrap(M.G_u), wrap(M.D_u), wrap(M.fake_u) if args.stage == "adm" else None
    adamw = lambda m, lr: torch.optim.AdamW(common.trainable(m), lr=lr, betas=tuple(args.betas), weight_decay=0.0)
    models, M.opt = {"G": M.G_u, "D": M.D_u}, {"G": adamw(M.G_u, lr_g), "D": adamw(M.D_u, args.lr_d)}
    if args.stage == "adm":
        models["fake"], M.opt["fake"] = M.fake_u, adamw(M.fake_u, args.lr_fake)
    if dtype != torch.float32:  # frozen parts (teacher = D backbone, text encoders, VAE) in the compute dtype
        pipe.to(dtype=dtype)
    # resume (exact: models, optimizers, RNG) or initialise G from another checkpoint (DMDX: the ADP generator)
    M.scaler, start = common.make_scaler(dev, dtype), 0
    scheds, ema = common.lr_schedulers(M.opt, args), common.make_ema(M.G_u, args.ema_decay)  # SILENT: constant, no EMA
    if ckpt_path:  # models, optimizers and RNG (one stream per rank under torchrun: common.load_checkpoint)
        start = common.load_checkpoint(ckpt_path, {**models, **({"ema": ema} if ema else {})}, M.opt, M.scaler,
                                       schedulers=scheds)["step"]
    else:
        common.seed_everything(args.seed, dist.rank)  # same models on every rank (built above), data differ per rank
    prompts = common.read_prompts(args.prompts)
    common.cache_prompts(pipe, family, prompts, dev)  # each prompt encoded once; the text encoders leave the GPU
    if args.stage == "adp":  # pairs live in a directory named by the settings that made them
        key = "|".join(map(str, [model, args.pairs, args.shard_size, args.pair_steps, args.pair_cfg, args.seed, *prompts]))
        pair_dir = os.path.join(args.out, "pairs_" + hashlib.sha1(key.encode()).hexdigest()[:10])
        make_pairs(pipe, teacher, M.sch, family, prompts, args, pair_dir, dist)
        Z, X0, pair_prompts = load_pairs(pair_dir, math.ceil(args.pairs / args.shard_size))
    wrap(teacher)  # the D backbone: sharded by --fsdp only now, as the pairs above split the ranks' work unevenly
    logger = common.Logger(args.out, args.steps, start, dist.is_main, desc=args.stage)
    metrics = {}
    for step in range(start + 1, args.steps + 1):
        if args.stage == "adm":  # prompts (and ADP pairs) for all --grad-accum micro-batches of the step
            idx = torch.randint(len(prompts), (args.batch_size * args.grad_accum,)).tolist()
            cond, uncond = common.encode(pipe, family, [prompts[i] for i in idx], dev)
            out = adm_step(M, cond, uncond, args, dev)
        else:
            j = torch.randint(len(Z), (args.batch_size * args.grad_accum,))
            cond, _ = common.encode(pipe, family, [pair_prompts[i] for i in j.tolist()], dev)
            out = adp_step(M, cond, Z[j].to(dev), X0[j].to(dev), args, dev)
        common.check_finite(step, **out)
        common.lr_step(scheds)
        ema.update_parameters(M.G_u) if ema else None
        metrics = out
        logger.update()
        if dist.is_main and common.due(step, args.log_every, step == args.steps):
            logger.log(step, **metrics)
        if common.due(step, args.sample_every, step == args.steps):  # every rank (FSDP2's forwards), rank 0 writes
            div = sample_grid(M, prompts, family, dev, os.path.join(args.out, f"grid_{step:06d}.png"), args.eval)
            if div is not None:
                metrics["diversity"] = div
                logger.log(step, diversity=div)
            common.plot_curves(logger.path, os.path.join(args.out, "curves.png"))
        if common.due(step, args.ckpt_every, step == args.steps):
            common.save_checkpoint(os.path.join(args.out, "ckpt.pt"), {**models, **({"ema": ema} if ema else {})}, M.opt,
                                   step, args, M.scaler, extra={"stage": args.stage, "gen_steps": N}, schedulers=scheds)
        common.barrier()
    logger.close()
    # the docstring's "Reload with" call (no CFG, Sec. 5); every rank gathers, rank 0 writes
    common.export_pipeline(pipe, ema.module if ema else M.G_u, os.path.join(args.out, "pipeline"),
                           scheduler=export_scheduler(pipe, family), call=dict(num_inference_steps=N, guidance_scale=1.0))
    common.barrier()
    return metrics


if __name__ == "__main__":
    common.main(Args, train)
