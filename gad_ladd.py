"""GAD on LADD: Geometry-Aware Distillation with Latent Adversarial Diffusion Distillation, SD 2.1-base, one step.

Paper: "Geometry-Aware Distillation" (GAD), Sec. 4.2 (output matching, Eq. 8), Sec. 5.1 (seed identifiability),
Tables 10-11; base method LADD (Sauer et al. 2024, arXiv 2403.12015) as the GAD authors ran it through AMD's Nitro-1 code.
A one-step student maps the initial noise z (fed at t = 999) to the teacher's 50-step DDIM endpoint (CFG 3.0, stored
offline). It is trained with a latent discriminator (frozen teacher encoder + trainable heads) and a SmoothL1
reconstruction; GAD adds Eq. 8: the student's response to z -> z' = z + h v must match the teacher's stored response.

Equation map
  Eq. 8 (GAD output matching) -> gad_loss(); the student pair in one fp32 forward -> student_pair()
  Eq. 7 (L_base + lambda L_GAD) -> g_step();  LADD losses (Nitro-1 BCE / LADD hinge) -> gen_loss(), disc_loss()
  x0 / eps / v conversions -> to_x0_eps();  re-noising at t_D ~ U{0..749} -> renoise()
  teacher ODE endpoint (DDIM, eta 0, CFG) -> teacher_sample();  data stage -> make_data();  Sec. 5.1 -> evaluate()

--gad-form: `jvp` (default) divides both finite differences by h, a true JVP match of size |dJ v|^2: this is what the
authors' released code does, so it produced the paper's numbers. `paper` is Eq. 6/8 as printed (differences not
divided by h, 1/h^2 absorbed into lambda); its signal scales with h^2 (1e-8 at h = 1e-4) and is nearly inert at lambda 1.

Deviations (each also marked `# DEVIATION:` at its line)
  1. With GAD on, the student's forward (z and z' batched) runs in fp32 with TF32 off, whatever --dtype: at h = 1e-4
     a bf16 difference is rounding noise (tests/test_gad_ladd.py shows it). Teacher data are generated in fp32 too.
  2. Teacher sampler and export use DDIM with "trailing" timesteps (first step at t = 999, the student's input time);
     the stock SD2.1 config uses "leading" (first step t = 981).
  3. Discriminator heads see the text and t through the frozen backbone and a projection term (pooled text + t
     embedding -> channel vector); the exact Nitro-1 head conditioning was not available to us.
  4. Seed identifiability: a tiny classifier on latents (paper: EfficientFormer-L3 on decoded images), prompts split
     70/30 into train/test, no validation split. Layout control (Sec. 5.3, BoxDiff) is not implemented.
  5. GAD and SmoothL1 are means over elements (Eq. 8 writes a squared L2 norm; the factor goes into lambda).

Commands
  GPU:      python gad_ladd.py --model stabilityai/stable-diffusion-2-1-base --prompts coco.txt --n-data 65536 --eval
  torchrun: torchrun --nproc_per_node 8 gad_ladd.py --prompts coco.txt --n-data 65536   (shards split across ranks)
  CPU tiny: python gad_ladd.py --model tiny --steps 20 --batch-size 4 --n-data 32 --shard-size 8 --teacher-steps 10 --eval
  base LADD: --gad-weight 0.  Overhead: --bench 30.  One-step call of the export (DDIM trailing + set_alpha_to_one:
  one UNet call at t = 999, x0 out): StableDiffusionPipeline.from_pretrained(out/pipeline)(p, num_inference_steps=1,
  guidance_scale=0.0)
Expect: out/data/shard_*.pt, metrics.jsonl + curves.png (loss_g, loss_d, adv, rec, gad, d_real, d_fake), samples_*.png,
ckpt.pt, pipeline/, and with --eval eval.json (geometry, diversity, seed identifiability).
"""
import copy
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import common

FAMILY = "sd21"


@dataclass
class Args:
    # paper hyperparameters (Table 11, SD2.1 column; the LADD parts as AMD's Nitro-1 code runs them)
    lr: float = 1e-6  # student learning rate, AdamW (0.9, 0.999) (Table 11)
    lr_d: float = 1e-6  # discriminator-head learning rate (Nitro-1)
    steps: int = 100_000  # training iterations (Table 11)
    batch_size: int = 64  # batch per GPU (Table 11)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # autocast dtype; auto = bf16 on CUDA (Table 11), fp32 on CPU
    h: float = 1e-4  # perturbation scale h (Table 11): the teacher's stored pair; the student's with --gad-jvp fd
    gad_jvp: Literal["exact", "fd"] = "exact"  # student response: h J v by forward-mode AD, or the fp32 z, z' pair
    gad_fp32: bool = False  # exact: the student's JVP forward in fp32 too (default: the step's precision)
    gad_weight: float = 1.0  # lambda of Eq. 7 (Table 11); 0 = plain LADD
    gad_form: Literal["jvp", "paper"] = "jvp"  # jvp: differences / h (released code); paper: Eq. 8 as printed
    gan_loss: Literal["bce", "hinge"] = "bce"  # bce: Nitro-1 non-saturating; hinge: LADD paper
    recon_weight: float = 1.0  # SmoothL1(x0_hat, teacher latent) weight (Nitro-1)
    t_d_max: int = 749  # discriminator re-noising t_D ~ U{0..t_d_max} (Nitro-1)
    teacher_steps: int = 50  # teacher DDIM steps for the stored endpoints (Nitro-1)
    cfg: float = 3.0  # teacher classifier-free guidance scale (Nitro-1)
    clip: float = 1.0  # gradient-norm clipping (G and D)
    # data stage
    stage: Literal["all", "data", "train"] = "all"  # all = generate missing shards, then train
    data_dir: str = ""  # teacher-pair shards; '' = <out>/data
    n_data: int = 65536  # number of (prompt, z) teacher pairs
    shard_size: int = 64  # pairs per shard (a crash loses at most one shard)
    # evaluation
    id_seeds: int = 10  # seed identifiability: K fixed seeds (Sec. 5.1 uses 10)
    id_prompts: int = 100  # prompts per seed (70% train / 30% test)
    eval_fd_h: float = 1e-3  # central-difference step for the geometry metrics (fp32)
    # run / system
    model: str = "stabilityai/stable-diffusion-2-1-base"  # hub id, local dir, 'tiny', or 'random' (real size)
    out: str = "runs/gad_ladd"  # output directory
    device: str = "auto"  # auto / cpu / cuda
    seed: int = 0  # global seed (rank offset added)
    resume: str = ""  # '' | 'latest' | path to ckpt.pt
    sample_every: int = 1000  # sample grid every N steps
    ckpt_every: int = 1000  # checkpoint every N steps
    log_every: int = 10  # metrics.jsonl row every N steps
    eval: bool = False  # run the evaluation at the end
    prompts: str = ""  # prompt file, one per line; '' = built-in list
    threads: int = 0  # CPU threads (0 = default / CPU_THREADS)
    grad_ckpt: bool = False  # gradient checkpointing in the student (memory for batch 64 with the fp32 pair)
    bench: int = 0  # >0: time N interleaved GAD/base steps on synthetic data, print ratios, exit


# ----------------------------------------------------------------------------------------------
# Equations (pure functions, fp32)


def to_x0_eps(pred, x_t, alpha_bar, prediction_type: str):
    """x_t = sqrt(a) x0 + sqrt(1-a) eps; the network predicts eps or v = sqrt(a) eps - sqrt(1-a) x0. fp32."""
    pred, x_t = pred.float(), x_t.float()
    a = alpha_bar.float().view(-1, *[1] * (x_t.ndim - 1))
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (x_t - sigma * pred) / alpha, pred
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    raise ValueError(f"prediction_type {prediction_type!r} not supported (epsilon, v_prediction)")


def renoise(x0, t, eps, alphas_bar):
    """Forward process x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, in fp32 (discriminator input)."""
    a = alphas_bar[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * x0.float() + (1 - a).sqrt() * eps.float()


def gad_loss(delta_S, delta_T, h: float, form: str):
    """Eq. 8: || dx0_S - sg(dx0_T) ||^2 (mean over elements). form 'jvp' divides both by h (true JVP match,
    released code); 'paper' is as printed (so it is h^2 times the jvp form)."""
    if form not in ("jvp", "paper"):
        raise ValueError(form)
    return ((delta_S.float() - delta_T.detach().float()) / (h if form == "jvp" else 1.0)).pow(2).mean()


def gen_loss(logits: list, kind: str):
    """Generator adversarial loss summed over heads: BCE non-saturating softplus(-D) or hinge -D."""
    return sum((F.softplus(-lg) if kind == "bce" else -lg).float().mean() for lg in logits)


def disc_loss(real: list, fake: list, kind: str):
    """Discriminator loss summed over heads: BCE softplus(-D_r) + softplus(D_f); hinge relu(1-D_r) + relu(1+D_f)."""
    if kind == "bce":
        return sum(F.softplus(-r).float().mean() + F.softplus(f).float().mean() for r, f in zip(real, fake))
    return sum(F.relu(1 - r).float().mean() + F.relu(1 + f).float().mean() for r, f in zip(real, fake))


# ----------------------------------------------------------------------------------------------
# Student, teacher sampler, discriminator

T_STUDENT = 999  # the one-step student's timestep: its input is exactly z


def student_x0(student, z, cond, alphas_bar, prediction_type):
    """One-step student: x0_hat = f(z, t = 999, c), converted to x0 in fp32."""
    t = torch.full((z.shape[0],), T_STUDENT, device=z.device, dtype=torch.long)
    out = student(z, timestep=t, **cond, return_dict=False)[0]
    return to_x0_eps(out, z, alphas_bar[t], prediction_type)[0]


def student_pair(student, z, v, h, cond, alphas_bar, prediction_type, mode="fd", ctx=None):
    """(x0_hat(z), Delta_S) with gradients. 'exact': Delta_S = h J v by forward-mode AD (common.jvp_pair, reverse over
    forward) under the autocast context ctx (None: fp32). 'fd': Delta_S = x0_hat(z + h v) - x0_hat(z) from z and
    z' = z + h v in ONE batched forward, in fp32 with autocast off."""
    if mode == "exact":
        with ctx if ctx is not None else torch.autocast(z.device.type, enabled=False):
            x0, jv = common.jvp_pair(lambda y: student_x0(student, y, cond, alphas_bar, prediction_type), z.float(),
                                     v.float())
        return x0.float(), h * jv.float()
    # DEVIATION: fp32 regardless of --dtype (Table 11 says bf16): at h = 1e-4 a bf16 difference is rounding noise.
    with torch.autocast(z.device.type, enabled=False):
        zz = torch.cat([z.float(), z.float() + h * v.float()])
        x0 = student_x0(student, zz, common.cat(cond, cond), alphas_bar, prediction_type)
    x0_z, x0_zp = x0.chunk(2)
    return x0_z, x0_zp - x0_z


def ddim_scheduler(pipe):
    """DDIM (eta 0), trailing timesteps, set_alpha_to_one (the last step returns x0): N steps = teacher_sample();
    N = 1 is one UNet call at t = 999 returning its x0, i.e. the one-step student."""
    from diffusers import DDIMScheduler

    # DEVIATION: "trailing" spacing (first step at t = 999) instead of the stock config's "leading" (t = 981).
    cfg = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}  # else from_config drops ours
    cfg.update(timestep_spacing="trailing", clip_sample=False, thresholding=False, set_alpha_to_one=True)
    return DDIMScheduler.from_config(cfg)


@torch.no_grad()
def teacher_sample(unet, z, cond, uncond, n_steps, w, alphas_bar, prediction_type):
    """Deterministic DDIM endpoint with CFG eps_u + w (eps_c - eps_u), = the stock pipeline with ddim_scheduler():
    timesteps round(1000 - i 1000/N) - 1, prev = t - 1000 // N, last step returns x0. fp32 arithmetic."""
    T = alphas_bar.shape[0]
    ts = [round(T - i * T / n_steps) - 1 for i in range(n_steps)]
    x, c2 = z.float(), common.cat(cond, uncond)
    for t in ts:
        tt = torch.full((2 * x.shape[0],), t, device=x.device, dtype=torch.long)
        out_c, out_u = unet(torch.cat([x, x]), timestep=tt, **c2, return_dict=False)[0].float().chunk(2)
        x0, eps = to_x0_eps(out_u + w * (out_c - out_u), x, alphas_bar[tt[: x.shape[0]]], prediction_type)
        t_prev = t - T // n_steps
        if t_prev < 0:
            return x0
        a_prev = alphas_bar[t_prev].float()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x0


def backbone_features(unet, x_t, t, cond):
    """Frozen teacher encoder: conv_in, down blocks, mid block (text via cross-attention, t via temb).
    Returns ([first down block, second down block, mid block] features, t embedding)."""
    ehs = cond["encoder_hidden_states"]
    emb = unet.time_embedding(unet.time_proj(t).to(x_t.dtype))
    hs, feats = unet.conv_in(x_t), []
    for i, blk in enumerate(unet.down_blocks):
        hs, _ = blk(hs, emb, encoder_hidden_states=ehs) if getattr(blk, "has_cross_attention", False) else blk(hs, emb)
        if i < 2:
            feats.append(hs)
    feats.append(unet.mid_block(hs, emb, encoder_hidden_states=ehs))
    return feats, emb


class DHeads(torch.nn.Module):
    """Trainable heads GroupNorm -> Conv 4x4 s2 -> SiLU -> Conv 1x1 on three backbone features, plus a projection
    term <a, W [pooled text, t emb]> for explicit text/t conditioning. Output: list of logit maps."""

    def __init__(self, unet):
        super().__init__()
        ch = list(unet.config.block_out_channels)
        chans = [ch[0], ch[1], ch[-1]]  # first two down blocks, mid block
        cdim = unet.config.cross_attention_dim + unet.time_embedding.linear_2.out_features
        self.body = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.GroupNorm(math.gcd(32, c), c), torch.nn.Conv2d(c, c, 4, 2, 1), torch.nn.SiLU())
            for c in chans)
        self.out = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1) for c in chans)
        self.proj = torch.nn.ModuleList(torch.nn.Linear(cdim, c) for c in chans)  # DEVIATION: projection conditioning

    def forward(self, feats, ehs, emb):
        cvec = torch.cat([ehs.mean(1), emb], 1).to(feats[0].dtype)
        logits = []
        for f, body, out, proj in zip(feats, self.body, self.out, self.proj):
            a = body(f)
            logits.append(out(a) + (a * proj(cvec)[:, :, None, None]).sum(1, keepdim=True) / math.sqrt(a.shape[1]))
        return logits


def discriminate(unet, heads, x_t, t, cond):
    feats, emb = backbone_features(unet, x_t, t, cond)
    return heads(feats, cond["encoder_hidden_states"], emb)


# ----------------------------------------------------------------------------------------------
# Data stage: resumable shards of teacher pairs


def data_dir(args) -> str:
    return args.data_dir or os.path.join(args.out, "data")


def make_data(pipe, args, dist, prompts) -> str:
    """Shard s holds pairs s*S .. (s+1)*S-1: z, v (seeded by (seed, s)), teacher endpoints from z and z' = z + h v,
    text embeddings. Each shard is written atomically; existing shards are skipped (resume)."""
    from tqdm.auto import tqdm

    d, unet = data_dir(args), pipe.unet
    meta = {k: getattr(args, k) for k in ("model", "n_data", "shard_size", "h", "cfg", "teacher_steps", "seed")}
    meta.update(prediction_type=pipe.scheduler.config.prediction_type, prompts=prompts)
    mpath = os.path.join(d, "meta.json")
    if dist.is_main:
        os.makedirs(d, exist_ok=True)
        if os.path.exists(mpath):
            with open(mpath) as f:
                old = json.load(f)
            if old != meta:
                bad = sorted(k for k in meta if old.get(k) != meta[k])
                raise ValueError(f"{d} holds data made with other settings ({bad}); pass another --data-dir")
        else:
            with open(mpath, "w") as f:
                json.dump(meta, f)
    common.barrier()
    n_shards = math.ceil(args.n_data / args.shard_size)
    missing = [s for s in range(n_shards) if not os.path.exists(shard_path(d, s))]
    todo = missing[dist.rank::dist.world_size]
    alphas_bar, pt = pipe.scheduler.alphas_cumprod.to(dist.device), pipe.scheduler.config.prediction_type
    bar = tqdm(total=n_shards, initial=n_shards - len(missing), desc="teacher data", disable=not dist.is_main)
    for s in todo:
        idx = list(range(s * args.shard_size, min(args.n_data, (s + 1) * args.shard_size)))
        g, shape = torch.Generator().manual_seed(args.seed * 1_000_003 + s), common.latent_shape(pipe, len(idx))
        z, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # own generator: a redo is identical
        p_s = [prompts[i % len(prompts)] for i in idx]
        cond, uncond = common.encode(pipe, FAMILY, p_s, dist.device)
        x0s = []
        for i in range(0, len(idx), args.batch_size):  # z and z' of a chunk in one batch, fp32 (deviation 1)
            zc, vc = z[i:i + args.batch_size].to(dist.device), v[i:i + args.batch_size].to(dist.device)
            cc, uc = common.select(cond, slice(i, i + len(zc))), common.select(uncond, slice(i, i + len(zc)))
            x0 = teacher_sample(unet, torch.cat([zc, zc + args.h * vc]), common.cat(cc, cc), common.cat(uc, uc),
                                args.teacher_steps, args.cfg, alphas_bar, pt)
            x0s.append(x0.cpu())
        x0_T, x0_Tp = zip(*[x.chunk(2) for x in x0s])
        shard = {"z": z, "v": v, "x0_T": torch.cat(x0_T), "x0_T_prime": torch.cat(x0_Tp), "prompts": p_s,
                 "ehs": cond["encoder_hidden_states"].cpu().half()}  # fp16 embeddings: disk (77 x 1024 per pair)
        torch.save(shard, shard_path(d, s) + ".tmp")
        os.replace(shard_path(d, s) + ".tmp", shard_path(d, s))  # atomic: a crash never leaves half a shard
        bar.update(dist.world_size)
    bar.close()
    common.barrier()
    return d


def shard_path(d, s) -> str:
    return os.path.join(d, f"shard_{s:05d}.pt")


def load_data(args, device) -> dict:
    d = data_dir(args)
    n_shards = math.ceil(args.n_data / args.shard_size)
    missing = [s for s in range(n_shards) if not os.path.exists(shard_path(d, s))]
    if missing:
        raise FileNotFoundError(f"{d}: {len(missing)} of {n_shards} shards missing; run --stage data")
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    keys = ("model", "n_data", "shard_size", "h", "cfg", "seed")  # not teacher_steps: --eval may use fewer for its map
    bad = sorted(k for k in keys if meta.get(k) != getattr(args, k))
    if bad:
        raise ValueError(f"{d} holds data made with other settings ({bad}); pass another --data-dir or remake it")
    return [torch.load(shard_path(d, s), map_location="cpu", mmap=True) for s in range(n_shards)]  # lazy, memory-mapped


def get_batch(shards, idx, device, shard_size):
    rows = [(int(i) // shard_size, int(i) % shard_size) for i in idx]
    pick = lambda k: torch.stack([shards[s][k][r] for s, r in rows]).to(device).float()
    return {**{k: pick(k) for k in ("z", "v", "x0_T", "x0_T_prime")}, "cond": {"encoder_hidden_states": pick("ehs")}}


# ----------------------------------------------------------------------------------------------
# One training iteration: generator step, then discriminator step (alternating)


def g_step(S, heads, unet, batch, args, ctx, alphas_bar, pt):
    """Eq. 7: L_G = adv + recon_weight SmoothL1(x0_hat, x0_T) + lambda L_GAD (Eq. 8). D heads get no gradient."""
    z, cond = batch["z"], batch["cond"]
    if args.gad_weight > 0:
        x0_hat, delta_S = student_pair(S, z, batch["v"], args.h, cond, alphas_bar, pt, args.gad_jvp,
                                       None if args.gad_fp32 else ctx)
        l_gad = gad_loss(delta_S, batch["x0_T_prime"] - batch["x0_T"], args.h, args.gad_form)  # Eq. 8
    else:
        with ctx:
            x0_hat = student_x0(S, z, cond, alphas_bar, pt)
        l_gad = torch.zeros((), device=z.device)
    l_rec = F.smooth_l1_loss(x0_hat.float(), batch["x0_T"].float())
    t = torch.randint(0, args.t_d_max + 1, (z.shape[0],), device=z.device)
    x_t = renoise(x0_hat, t, torch.randn_like(x0_hat), alphas_bar)
    h = common.unwrap(heads).requires_grad_(False)  # the generator step must not touch D
    with ctx:
        l_adv = gen_loss(discriminate(unet, h, x_t, t, cond), args.gan_loss)
    h.requires_grad_(True)
    loss = l_adv + args.recon_weight * l_rec + args.gad_weight * l_gad
    return loss, x0_hat.detach(), {"adv": l_adv.item(), "rec": l_rec.item(), "gad": l_gad.item()}


def d_step(heads, unet, x0_hat, batch, args, ctx, alphas_bar):
    """L_D on fake (student, detached) and real (teacher latents), re-noised at the same t_D, one forward."""
    B = x0_hat.shape[0]
    t = torch.randint(0, args.t_d_max + 1, (B,), device=x0_hat.device)
    x_f = renoise(x0_hat, t, torch.randn_like(x0_hat), alphas_bar)
    x_r = renoise(batch["x0_T"], t, torch.randn_like(x0_hat), alphas_bar)
    cond = common.cat(batch["cond"], batch["cond"])
    with ctx:
        feats, emb = backbone_features(unet, torch.cat([x_f, x_r]), torch.cat([t, t]), cond)
        logits = heads(feats, cond["encoder_hidden_states"], emb)
    fake, real = zip(*[lg.chunk(2) for lg in logits])
    return disc_loss(list(real), list(fake), args.gan_loss), {"d_real": sum(r.float().mean().item() for r in real),
                                                             "d_fake": sum(f.float().mean().item() for f in fake)}


def optimize(loss, params, opt, scaler, clip):
    opt.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt) if scaler else opt.step()


def train_step(S, heads, unet, opt_g, opt_d, scaler, batch, args, ctx, alphas_bar, pt):
    loss_g, x0_hat, logs = g_step(S, heads, unet, batch, args, ctx, alphas_bar, pt)  # 1. generator update
    optimize(loss_g, S.parameters(), opt_g, scaler, args.clip)
    loss_d, dlogs = d_step(heads, unet, x0_hat, batch, args, ctx, alphas_bar)  # 2. discriminator update
    optimize(loss_d, heads.parameters(), opt_d, scaler, args.clip)
    if scaler:
        scaler.update()
    return {"loss_g": loss_g.item(), "loss_d": loss_d.item(), **logs, **dlogs}


# ----------------------------------------------------------------------------------------------
# Samples, evaluation, overhead benchmark


@torch.no_grad()
def save_samples(pipe, S, path, device, alphas_bar, pt, prompts):
    p = [prompts[i % len(prompts)] for i in range(4) for _ in range(4)]
    z_k = [torch.randn(common.latent_shape(pipe, 1)[1:], generator=torch.Generator().manual_seed(k)) for k in range(4)]
    cond, _ = common.encode(pipe, FAMILY, p, device)  # rows: prompts, columns: the same 4 seeds every time
    x0 = student_x0(S, torch.stack(z_k * 4).to(device), cond, alphas_bar, pt)
    common.save_grid(common.decode(pipe, x0), path, nrow=4)


def fit_seed_classifier(x, y, K, iters=300):
    """Tiny classifier on latents (pool to 8x8 -> MLP) predicting the seed id."""
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(x.shape[1] * 64, 128),
                              torch.nn.SiLU(), torch.nn.Linear(128, K)).to(x.device)
    opt, xn = torch.optim.Adam(net.parameters(), 1e-3), (x - x.mean()) / x.std()
    for _ in range(iters):
        opt.zero_grad()
        F.cross_entropy(net(xn), y).backward()
        opt.step()
    return lambda q: (net((q - x.mean()) / x.std()).argmax(1)).detach()


@torch.no_grad()
def evaluate(pipe, S, args, device, prompts) -> dict:
    """Sec. 5.1 seed identifiability (K seeds x M prompts), DP-DMD diversity over seeds, geometry metrics."""
    unet, pt, ab = pipe.unet, pipe.scheduler.config.prediction_type, pipe.scheduler.alphas_cumprod.to(device)
    K, M = args.id_seeds, args.id_prompts
    p_all = [prompts[m % len(prompts)] + (f", variation {m // len(prompts)}" if m >= len(prompts) else "") for m in range(M)]
    z_k = torch.stack([torch.randn(common.latent_shape(pipe, 1)[1:], generator=torch.Generator().manual_seed(10_000 + k))
                       for k in range(K)]).to(device)
    xs, xt = [], []
    for p in p_all:  # one prompt, K seeds per batch
        cond, uncond = common.encode(pipe, FAMILY, [p] * K, device)
        xs.append(student_x0(S, z_k, cond, ab, pt))
        xt.append(teacher_sample(unet, z_k, cond, uncond, args.teacher_steps, args.cfg, ab, pt))
    X_S, X_T = torch.stack(xs), torch.stack(xt)  # (M, K, C, h, w)
    n_tr, y = max(1, int(0.7 * M)), torch.arange(K, device=device)

    def split(X, part):
        X = X[:n_tr] if part == "train" else X[n_tr:]
        return X.reshape(-1, *X.shape[2:]), y.repeat(X.shape[0])

    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        clf_T, clf_S = fit_seed_classifier(*split(X_T, "train"), K), fit_seed_classifier(*split(X_S, "train"), K)
    (xT_te, y_te), (xS_te, _) = split(X_T, "test"), split(X_S, "test")
    acc = lambda clf, x: (clf(x) == y_te).float().mean().item()
    res = {"ident_teacher": acc(clf_T, xT_te), "ident_student": acc(clf_S, xS_te), "teacher_alignment": acc(clf_T, xS_te),
           "diversity_student": common.diversity(X_S.flatten(2)), "diversity_teacher": common.diversity(X_T.flatten(2))}
    n = min(4, K)  # geometry: first prompt, n seeds; central differences in fp32 for both maps
    cond, uncond = common.encode(pipe, FAMILY, [p_all[0]] * n, device)
    geo = common.geometry_metrics(lambda z: student_x0(S, z, cond, ab, pt),
                                  lambda z: teacher_sample(unet, z, cond, uncond, args.teacher_steps, args.cfg, ab, pt),
                                  z_k[:n], n_dirs=2, seed=args.seed, mode="fd", h=args.eval_fd_h)
    return {**res, **geo}


def bench_hook(use_gad: bool) -> None:
    """Called at the start of every --bench step; bench/gpu_cost.py replaces it to count FLOPs and memory per step."""


def benchmark(S, heads, unet, opt_g, opt_d, scaler, args, ctx, ab, pt, device):
    """Interleaved base / GAD iterations (G + D step) on a synthetic batch; medians of time and peak memory. CUDA: the
    allocator peak. CPU: weights (frozen backbone; student and heads x4 for grads and AdamW) + peak bytes saved for
    backward (weights excluded)."""
    B, C, side = args.batch_size, unet.config.in_channels, unet.config.sample_size
    batch = {k: torch.randn(B, C, side, side, device=device) for k in ("z", "v", "x0_T", "x0_T_prime")}
    batch["cond"] = {"encoder_hidden_states": torch.randn(B, 77, unet.config.cross_attention_dim, device=device)}
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    state = nbytes(unet) + 4 * (nbytes(S) + nbytes(heads))
    # a storage's address from the tensor (storage().data_ptr() raises for some views saved under forward-mode AD)
    address = lambda t: t.data_ptr() - t.storage_offset() * t.element_size()  # noqa: E731
    params, saved, peak = {address(p) for m in (S, heads, unet) for p in m.parameters()}, {}, [0]

    def pack(t):
        if address(t) not in params:
            saved[address(t)] = t.untyped_storage().nbytes()
        peak[0] = max(peak[0], sum(saved.values()))
        return t

    res = {0.0: ([], []), args.gad_weight or 1.0: ([], [])}
    for i in range(args.bench + 2):  # 2 warm-up rounds
        for w, (times, mems) in res.items():
            a, peak[0] = copy.copy(args), 0
            a.gad_weight = w
            if device.type == "cuda":
                torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            bench_hook(w > 0)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                for stage in ("g", "d"):
                    saved.clear()
                    if stage == "g":
                        loss_g, x0_hat, _ = g_step(S, heads, unet, batch, a, ctx, ab, pt)
                        optimize(loss_g, S.parameters(), opt_g, scaler, a.clip)
                    else:
                        optimize(d_step(heads, unet, x0_hat, batch, a, ctx, ab)[0], heads.parameters(), opt_d, scaler, a.clip)
            if scaler:  # as train_step: one update per G + D iteration (fp16)
                scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
                mems.append(torch.cuda.max_memory_allocated() if device.type == "cuda" else state + peak[0])
    (tb, mb), (tg, mg) = [(statistics.median(t), statistics.median(m)) for t, m in res.values()]
    out = dict(time_base_s=tb, time_gad_s=tg, time_ratio=tg / tb, mem_base_mb=mb / 2**20, mem_gad_mb=mg / 2**20,
               mem_ratio=mg / mb)
    common.print0(json.dumps(out))
    return out


# ----------------------------------------------------------------------------------------------


def train(args) -> dict:
    assert args.h > 0 and args.gad_weight >= 0 and 0 <= args.t_d_max < 1000 and args.shard_size > 0 and args.n_data > 0
    assert args.teacher_steps >= 1 and args.batch_size >= 1 and args.id_seeds >= 2 and args.id_prompts >= 2
    common.set_cpu_threads(args.threads)
    dist = common.init_distributed(args.device)
    device, dtype = dist.device, common.resolve_dtype(args.dtype, dist.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 finite differences need real fp32 (TF32 has a 10-bit mantissa)
    torch.backends.cudnn.allow_tf32 = False
    if args.grad_ckpt and args.gad_weight > 0 and args.gad_jvp == "exact":  # recomputation drops the tangents
        raise ValueError("--grad-ckpt needs --gad-jvp fd (checkpoint recomputation runs outside forward-mode AD)")
    common.seed_everything(args.seed, dist.rank)
    ctx, scaler = common.autocast(device, dtype), common.make_scaler(device, dtype)
    pipe = common.load_pipeline(FAMILY, args.model, torch.float32).to(device)
    pt, ab = pipe.scheduler.config.prediction_type, pipe.scheduler.alphas_cumprod.to(device)
    prompts = common.read_prompts(args.prompts)
    to_x0_eps(torch.zeros(1), torch.zeros(1), torch.ones(1), pt)  # fails loudly on an unsupported prediction type
    unet = pipe.unet  # frozen teacher: data-stage sampler and discriminator backbone (never updated)

    # 0. build student (copy of teacher) and discriminator heads; optimizers (AdamW 0.9, 0.999)
    S = copy.deepcopy(unet).requires_grad_(True).train()
    S.enable_gradient_checkpointing() if args.grad_ckpt else None
    heads = DHeads(unet).to(device)
    opt_g = torch.optim.AdamW(S.parameters(), args.lr, betas=(0.9, 0.999))
    opt_d = torch.optim.AdamW(heads.parameters(), args.lr_d, betas=(0.9, 0.999))
    if args.bench:
        return benchmark(S, heads, unet, opt_g, opt_d, scaler, args, ctx, ab, pt, device)

    if args.stage in ("data", "all"):  # 1. teacher pairs (skips shards already on disk)
        make_data(pipe, args, dist, prompts)
        if args.stage == "data":
            return common.cleanup() or {"data_dir": data_dir(args)}
    shards = load_data(args, device)

    start, ckpt_path = 0, common.resolve_resume(args.resume, args.out)
    if ckpt_path:
        start = common.load_checkpoint(ckpt_path, {"student": S, "heads": heads}, {"g": opt_g, "d": opt_d}, scaler)["step"]
    S_ddp, heads_ddp = common.wrap_ddp(S, dist), common.wrap_ddp(heads, dist)
    log, row = common.Logger(args.out, args.steps, start, dist.is_main), {}
    for step in range(start + 1, args.steps + 1):
        idx = torch.randint(0, args.n_data, (args.batch_size,))  # all randomness from the global torch RNG
        batch = get_batch(shards, idx, device, args.shard_size)
        row = train_step(S_ddp, heads_ddp, unet, opt_g, opt_d, scaler, batch, args, ctx, ab, pt)  # 2.-3. G then D
        common.check_finite(step, **row)
        if (args.log_every and step % args.log_every == 0) or step == args.steps:
            log.log(step, **row)
        if dist.is_main and ((args.sample_every and step % args.sample_every == 0) or step == args.steps):
            save_samples(pipe, S, os.path.join(args.out, f"samples_{step:06d}.png"), device, ab, pt, prompts)
            common.plot_curves(log.path, os.path.join(args.out, "curves.png"))
        if dist.is_main and ((args.ckpt_every and step % args.ckpt_every == 0) or step == args.steps):
            common.save_checkpoint(os.path.join(args.out, "ckpt.pt"), {"student": S, "heads": heads},
                                   {"g": opt_g, "d": opt_d}, step, args, scaler)
        log.update()
    log.close()
    result = dict(row)
    if dist.is_main:
        common.export_pipeline(pipe, S, os.path.join(args.out, "pipeline"), scheduler=ddim_scheduler(pipe))
        if args.eval:
            result.update(evaluate(pipe, S.eval(), args, device, prompts))
            with open(os.path.join(args.out, "eval.json"), "w") as f:
                json.dump({**result, "args": asdict(args)}, f, indent=1)
            common.print0(json.dumps(result))
    common.barrier()
    common.cleanup()
    return result


if __name__ == "__main__":
    train(common.parse(Args))
