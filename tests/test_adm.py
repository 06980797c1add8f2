"""Tests for adm.py (ADM / ADP / DMDX) on tiny CPU models."""
import copy
import os

import pytest
import torch
from docs_call import documented_call, export_call_covers_documented

import adm
import common

FLOW_CFG = {"num_train_timesteps": 1000, "shift": 1.0}
DDPM_CFG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    pipe = common.load_pipeline("sd3", "tiny-sd3")
    net = pipe.transformer
    sch = adm.Schedule("sd3", pipe.scheduler, 1 / 64)
    cond, uncond = common.encode(pipe, "sd3", ["a red fox", "a lighthouse"], "cpu")
    return pipe, net, sch, cond, uncond


# ---------------------------------------------------------------- equations on hand-made tensors


def test_hinge_losses_on_fixed_logits():
    d_fake, d_real = torch.tensor([[-2.0, 0.5], [0.0, -1.0]]), torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    assert adm.hinge_g(d_fake).item() == pytest.approx(-(-2 + 0.5 + 0 - 1) / 4)  # Eq. 7
    # Eq. 8: relu(1 + fake) = [0, 1.5, 1, 0] -> 0.625; relu(1 - real) = [0, 0.5, 2, 0] -> 0.625
    assert adm.hinge_d(d_fake, d_real).item() == pytest.approx(1.25)
    # perfectly separated logits beyond the margin give zero D loss
    assert adm.hinge_d(-torch.full((3,), 1.5), torch.full((3,), 1.2)).item() == 0.0
    # Eq. 9-10: weights 0.85 / 0.15, both generator terms push the D scores up (sign fix, see Deviations)
    lat, pix = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    assert adm.adp_g_loss(lat, pix, 0.85, 0.15).item() == pytest.approx(-0.85 * 2.0 - 0.15 * -1.0)
    ref = 0.85 * adm.hinge_d(lat, pix) + 0.15 * adm.hinge_d(pix, lat)
    assert adm.adp_d_loss(lat, pix, pix, lat, 0.85, 0.15).item() == pytest.approx(ref.item())


def test_cubic_schedule_concentrates_near_T():
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    t = adm.cubic_t(u, 1000.0)
    assert t.min() >= 0 and t.max() <= 1000
    assert (t > 500).float().mean().item() == pytest.approx(0.5 ** (1 / 3), abs=5e-3)  # P(u^3 < 1/2)
    assert t.mean().item() == pytest.approx(750, abs=3)  # E[1 - u^3] = 3/4, uniform would give 1/2
    assert (t > 900).float().mean().item() == pytest.approx(0.1 ** (1 / 3), abs=5e-3)  # ~46% of draws in the top 10%


def test_pf_ode_step_matches_diffusers_euler_and_ddim():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    # flow: one Euler step of FlowMatchEulerDiscreteScheduler from σ to σ - 1/64
    fm = FlowMatchEulerDiscreteScheduler.from_config(FLOW_CFG)
    sigma = 0.6
    fm.set_timesteps(sigmas=[sigma, sigma - 1 / 64])
    ref = fm.step(out, fm.timesteps[0], x).prev_sample
    sch = adm.Schedule("sd3", fm, 1 / 64)
    t = torch.full((2,), sigma)
    x0, eps = sch.to_x0_eps(out, x, t)
    ours = adm.pf_ode_step(x0, eps, *sch.coeffs(t - sch.dt))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # DDPM: one DDIM (eta = 0) step over Δt = floor(1000 / 64) = 15 timesteps
    dd = DDIMScheduler.from_config({**DDPM_CFG, "set_alpha_to_one": False, "clip_sample": False})
    dd.set_timesteps(64)  # step ratio 1000 // 64 = 15
    sch = adm.Schedule("sdxl", dd, 1 / 64)
    assert sch.dt == 15
    t = torch.full((2,), 600, dtype=torch.long)
    ref = dd.step(out, 600, x, eta=0.0).prev_sample
    x0, eps = sch.to_x0_eps(out, x, t)
    torch.testing.assert_close(adm.pf_ode_step(x0, eps, *sch.coeffs(t - sch.dt)), ref, atol=1e-5, rtol=1e-5)


def test_dmd_diagnostic_value():
    x0_hat, x0_r = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    x0_f = torch.tensor([[[[3.0, 2.0], [2.0, 1.0]]]])
    # g = (x0_f - x0_r) / mean|x0_hat - x0_r| = [0.5, 0, 0, -0.5]; L = 0.5 mean g^2 = 0.0625
    assert adm.dmd_diagnostic(x0_hat, x0_f, x0_r).item() == pytest.approx(0.0625)


# ---------------------------------------------------------------- gradient routing


def test_heads_get_grad_backbone_none(sd3):
    pipe, net, sch, cond, _ = sd3
    net = copy.deepcopy(net)
    taps = adm.Taps(net, "sd3")
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.7])
    feats = taps(net, x, t, cond, sch)
    assert len(feats) == len(net.transformer_blocks) and feats[0].shape == (2, 32, 8, 8)  # every block, [B, C, h, w]
    D = adm.Discriminator([f.shape[1] for f in feats], None, 32)
    logits, _ = D(feats)
    adm.hinge_d(logits, -logits).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())
    assert all(p.grad is None for p in net.parameters())
    assert D.lat.heads[0][1].num_groups == 32
    # SDXL UNet: the last ResNet of each down, mid and up block (2 + 1 + 2 on the tiny UNet, 3 + 1 + 3 on SDXL)
    xl = common.load_pipeline("sdxl", "tiny-sdxl")
    uc, _ = common.encode(xl, "sdxl", ["x"], "cpu")
    feats = adm.Taps(xl.unet, "sdxl")(xl.unet, torch.randn(1, 4, 16, 16), torch.tensor([500]), uc,
                                      adm.Schedule("sdxl", xl.scheduler, 1 / 64))
    assert [f.shape[1] for f in feats] == [32, 64, 64, 64, 32]


def test_generator_grad_paths(sd3):
    """dL/dx̂0 = α_t [r + (σ' - σ) J_vᵀ r]: through x_t directly AND through the fake score's input; fake weights frozen."""
    pipe, net, sch, cond, _ = sd3
    fake = copy.deepcopy(net).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    x0_hat = torch.randn(2, 4, 16, 16, generator=g).requires_grad_(True)
    z, r = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([0.4, 0.8])
    x_t, _, x_fake = adm.fake_branch(fake, x0_hat, z, t, cond, sch)
    (x_fake * r).sum().backward()
    # independent: the VJP of the fake's velocity w.r.t. its input
    x = ((1 - t).view(-1, 1, 1, 1) * x0_hat.detach() + t.view(-1, 1, 1, 1) * z).requires_grad_(True)
    v = fake(x, timestep=1000 * t, **cond, return_dict=False)[0]
    (jv,) = torch.autograd.grad((v * r).sum(), x)
    a = (1 - t).view(-1, 1, 1, 1)
    expected = a * (r + (-sch.dt) * jv)
    torch.testing.assert_close(x0_hat.grad, expected, atol=1e-5, rtol=1e-4)
    assert (jv.abs().sum() > 0) and not torch.allclose(x0_hat.grad, a * r)  # the input path matters
    assert all(p.grad is None for p in fake.parameters())


@pytest.fixture(scope="module")
def adm_models(sd3):
    """A small ADM model set like train() builds, for one adm_step."""
    pipe, net, sch, cond, uncond = sd3
    args = adm.Args(model="tiny", batch_size=2, head_channels=32)
    M = type("M", (), {})()
    M.pipe, M.teacher, M.shape, M.sch = pipe, net, (2, 4, 16, 16), adm.Schedule("sd3", pipe.scheduler, 1 / 64)
    M.ts, M.ac = M.sch.gen_timesteps(4), lambda: common.autocast(torch.device("cpu"), torch.float32)
    M.G = M.G_u = copy.deepcopy(net).requires_grad_(True)
    M.fake = M.fake_u = copy.deepcopy(net).requires_grad_(True)
    M.taps = adm.Taps(net, "sd3")
    M.D = M.D_u = adm.Discriminator([32, 32], None, 32)
    opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.0, 0.99), weight_decay=0.0)
    M.opt, M.scaler = {"G": opt(M.G_u), "D": opt(M.D_u), "fake": opt(M.fake_u)}, None
    return M, args, cond, uncond


def test_fake_score_updated_with_its_own_loss_only(adm_models):
    M, args, cond, uncond = adm_models
    # independent computation of the fake's gradient (Alg. 1 l. 8-11) from the same RNG state
    state = torch.get_rng_state()
    fake_ref = copy.deepcopy(M.fake_u)
    with torch.no_grad():
        x0 = adm.rollout(M.G_u, torch.randn(M.shape), cond, M.sch, M.ts, 4)
    z_f, t_f = torch.randn(M.shape), torch.rand(2)
    out = fake_ref((1 - t_f.view(-1, 1, 1, 1)) * x0 + t_f.view(-1, 1, 1, 1) * z_f, timestep=1000 * t_f, **cond,
                   return_dict=False)[0]
    ((out - (z_f - x0)) ** 2).mean().backward()
    torch.set_rng_state(state)
    seen, step = {}, M.opt["fake"].step
    M.opt["fake"].step = lambda: (seen.update({n: p.grad.clone() for n, p in M.fake_u.named_parameters()}), step())
    try:
        out = adm.adm_step(M, cond, uncond, args, torch.device("cpu"))
    finally:
        M.opt["fake"].step = step
    for n, p in fake_ref.named_parameters():
        torch.testing.assert_close(seen[n], p.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(dict(M.fake_u.named_parameters())[n].grad, seen[n], atol=0, rtol=0)  # nothing added
    assert all(p.requires_grad for p in M.fake_u.parameters()) and all(p.requires_grad for p in M.D_u.parameters())
    assert all(p.grad is None for p in M.teacher.parameters())  # frozen teacher = real score and D backbone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in M.G_u.parameters())
    assert all(torch.isfinite(torch.as_tensor(v)) for v in out.values())  # floats: means over micro-batches


# ---------------------------------------------------------------- ADP pairs, smoke runs, export, resume


def test_adp_pair_shards_resume(tmp_path, sd3):
    pipe, net, sch, _, _ = sd3
    args = adm.Args(pairs=5, shard_size=2, pair_steps=2, batch_size=2, seed=3)
    dist = common.init_distributed("cpu")
    d = str(tmp_path / "pairs")
    adm.make_pairs(pipe, net, sch, "sd3", common.PROMPTS, args, d, dist)
    files = sorted(os.listdir(d))
    assert files == ["shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]
    full = adm.load_pairs(d, 3)
    assert full[0].shape == (5, 4, 16, 16) and len(full[2]) == 5
    os.remove(os.path.join(d, "shard_00001.pt"))  # an interrupted run: shard 1 missing
    mtimes = {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in ("shard_00000.pt", "shard_00002.pt")}
    adm.make_pairs(pipe, net, sch, "sd3", common.PROMPTS, args, d, dist)
    assert all(os.stat(os.path.join(d, f)).st_mtime_ns == m for f, m in mtimes.items())  # finished shards skipped
    again = adm.load_pairs(d, 3)
    torch.testing.assert_close(again[0], full[0], atol=0, rtol=0)
    torch.testing.assert_close(again[1], full[1], atol=0, rtol=0)
    assert again[2] == full[2]


def _assert_export_reproduces_sampler(pipe_dir, family, n):
    """The stock call pipe(prompt, num_inference_steps=n, guidance_scale=1.0) reproduces adm.rollout from the same z."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir))
    export_call_covers_documented(adm, str(pipe_dir), family, num_inference_steps=n)  # what evaluate.py will run
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    lat = pipe("a red fox", **{**documented_call(adm), "num_inference_steps": n}, latents=z.clone(),
               output_type="latent").images  # the docstring's call (DMDX: 1 step)
    sch = adm.Schedule(family, adm.export_scheduler(pipe, family), 1 / 64)
    cond, _ = common.encode(pipe, family, ["a red fox"], "cpu")
    net = pipe.transformer if family == "sd3" else pipe.unet
    ours = adm.rollout(net, z, cond, sch, sch.gen_timesteps(n), n)
    torch.testing.assert_close(lat.float(), ours, atol=1e-4, rtol=1e-4)


def _args(tmp_path, **kw):
    base = dict(model="tiny", batch_size=2, steps=2, sample_every=100, ckpt_every=100, log_every=1, head_channels=32,
                out=str(tmp_path))
    return adm.Args(**{**base, **kw})


def test_adm_sd3_smoke_export_and_resume(tmp_path):

    accum = dict(batch_size=1, grad_accum=2)  # 2 micro-batches per step (issue 15)
    full = adm.train(_args(tmp_path / "full", sample_every=2, **accum))
    assert {"loss_g", "loss_d", "loss_fake", "dmd", "diversity"} <= set(full)
    assert all(torch.isfinite(torch.tensor(v)) for v in full.values())
    assert os.path.exists(tmp_path / "full" / "grid_000002.png") and os.path.exists(tmp_path / "full" / "curves.png")
    # exact resume: 1 step, then --resume latest to 2, equals 2 steps straight
    adm.train(_args(tmp_path / "res", steps=1, **accum))
    resumed = adm.train(_args(tmp_path / "res", resume="latest", **accum))
    for k in ("loss_g", "loss_d", "loss_fake", "dmd"):
        assert resumed[k] == full[k], k
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)["models"]
    b = torch.load(tmp_path / "res" / "ckpt.pt", weights_only=False)["models"]
    for m in a:
        for n in a[m]:
            assert torch.equal(a[m][n], b[m][n]), (m, n)
    _assert_export_reproduces_sampler(tmp_path / "full" / "pipeline", "sd3", 4)  # 4 steps, no CFG


def test_dmdx_sdxl_smoke_and_export(tmp_path):

    out = adm.train(_args(tmp_path, family="sdxl", pipeline="dmdx", steps=1, pairs=3, shard_size=2, pair_steps=2,
                          grad_accum=2))  # ADP and ADM with 2 micro-batches per step
    assert {"loss_g", "loss_d", "loss_fake", "dmd"} <= set(out)
    rows = common.Logger.read(str(tmp_path / "adp" / "metrics.jsonl"))
    assert {"d_pix_fake", "d_pix_real"} <= set(rows[0])
    adp_g = torch.load(tmp_path / "adp" / "ckpt.pt", weights_only=False)["models"]["G"]
    assert torch.load(tmp_path / "adm" / "ckpt.pt", weights_only=False)["extra"]["gen_steps"] == 1
    pair_dirs = [d for d in os.listdir(tmp_path / "adp") if d.startswith("pairs_")]  # named by the pairs' settings
    assert len(pair_dirs) == 1 and len(os.listdir(tmp_path / "adp" / pair_dirs[0])) == 2 and adp_g
    with pytest.raises(ValueError, match="resume latest"):  # a path would be fed to both stages
        adm.train(_args(tmp_path, family="sdxl", pipeline="dmdx", resume=str(tmp_path / "adp" / "ckpt.pt")))
    # the ADM stage starts from the ADP generator, not from the teacher: one ADM step (lr 1e-7) moves it 10x less
    # than the ADP step (lr 1e-6) moved it away from the teacher
    adm_g = torch.load(tmp_path / "adm" / "ckpt.pt", weights_only=False)["models"]["G"]
    teacher = common.load_pipeline("sdxl", "tiny").unet.state_dict()
    dist = lambda a, b: sum((a[k].float() - b[k].float()).pow(2).sum() for k in a).sqrt().item()
    assert dist(adm_g, adp_g) < 0.5 * dist(adp_g, teacher)
    _assert_export_reproduces_sampler(tmp_path / "adm" / "pipeline", "sdxl", 1)


def test_pixel_discriminator_grad_reaches_latents(sd3):
    """ADP pixel D: latents -> VAE decode (frozen) -> vision encoder (frozen) -> heads on layers 3, 6, 9, 12."""
    from transformers import SamVisionConfig, SamVisionModel

    pipe = sd3[0]
    enc = adm.PixelEncoder("tiny", (3, 6, 9, 12), "cpu")
    x0 = torch.randn(2, 4, 16, 16, requires_grad=True)
    feats = enc(adm.decode_with_grad(pipe, x0))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 4)] * 4  # CLS dropped, tokens -> [B, C, h, w]
    heads = adm.Heads([32] * 4, 32)
    adm.hinge_g(heads(feats)).backward()
    assert x0.grad.abs().sum() > 0 and all(p.grad is not None for p in heads.parameters())
    assert all(p.grad is None for p in enc.net.parameters()) and all(p.grad is None for p in pipe.vae.parameters())
    # SAM's encoder returns channels-last hidden states [B, h, w, C]
    enc.net = SamVisionModel(SamVisionConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                             patch_size=16, output_channels=8, mlp_dim=32, window_size=2,
                                             global_attn_indexes=[1, 3])).eval()
    enc.layers, enc.size = (2, 4), 64
    assert [tuple(f.shape) for f in enc(torch.zeros(1, 3, 32, 32))] == [(1, 16, 4, 4)] * 2
