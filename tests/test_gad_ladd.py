"""Tests for gad_ladd.py on the tiny SD2.1 pipeline (CPU)."""
import copy
import os

import pytest
import torch
from docs_call import documented_call, export_call_covers_documented

import common
import gad_ladd as G

TINY = dict(model="tiny", batch_size=2, n_data=6, shard_size=4, teacher_steps=4, log_every=1, sample_every=100,
            ckpt_every=100, id_seeds=3, id_prompts=4, dtype="fp32", device="cpu", lr=1e-3, lr_d=1e-3)


@pytest.fixture(scope="module")
def pipe():
    return common.load_pipeline("sd21", "tiny", torch.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory, pipe):
    """Teacher shards made once; the train tests share them through --data-dir."""
    d = str(tmp_path_factory.mktemp("data"))
    G.train(G.Args(**TINY, stage="data", data_dir=d, out=d))
    return d


@pytest.fixture
def no_plots(monkeypatch):
    """matplotlib costs ~2-4 s per call here; runs that do not check the pictures record the calls instead."""
    calls = []
    monkeypatch.setattr(common, "save_grid", lambda images, path, nrow, titles=None: calls.append(path))
    monkeypatch.setattr(common, "plot_curves", lambda a, b: calls.append(b))
    return calls


def _ab(pipe):
    return pipe.scheduler.alphas_cumprod


def _batch(pipe, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shp = common.latent_shape(pipe, B)
    cond, _ = common.encode(pipe, "sd21", common.PROMPTS[:B], "cpu")
    b = {k: torch.randn(shp, generator=g) for k in ("z", "v", "x0_T", "x0_T_prime")}
    return {**b, "cond": cond}


# ---------------------------------------------------------------- equations


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_to_x0_eps_inverts_forward_process(pipe, pt):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler.from_config({**pipe.scheduler.config, "prediction_type": pt})
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 3])
    x_t = sch.add_noise(x0, eps, t)
    pred = eps if pt == "epsilon" else sch.get_velocity(x0, eps, t)
    x0_r, eps_r = G.to_x0_eps(pred, x_t, sch.alphas_cumprod[t], pt)
    torch.testing.assert_close(x0_r, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_r, eps, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(G.renoise(x0, t, eps, sch.alphas_cumprod), x_t)


def test_gad_loss_values_forms_and_gradient():
    h = 1e-2
    dS = torch.tensor([[0.02, -0.01], [0.0, 0.03]], requires_grad=True)
    dT = torch.tensor([[0.01, -0.01], [0.01, 0.01]], requires_grad=True)
    expect = ((0.01 / h) ** 2 + 0 + (0.01 / h) ** 2 + (0.02 / h) ** 2) / 4  # independent hand computation
    jvp = G.gad_loss(dS, dT, h, "jvp")
    assert jvp.item() == pytest.approx(expect, rel=1e-5)
    assert G.gad_loss(dS, dT, h, "paper").item() == pytest.approx(h**2 * expect, rel=1e-5)  # printed form = h^2 x jvp
    assert G.gad_loss(dS, dS.detach().clone(), h, "jvp").item() == 0.0
    jvp.backward()
    assert dS.grad.abs().sum() > 0 and dT.grad is None  # sg on the teacher response


def test_gan_losses_values():
    r, f = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, -3.0]])
    sp = torch.nn.functional.softplus
    assert G.disc_loss(r, f, "bce").item() == pytest.approx((sp(-r).mean() + sp(f).mean()).item())
    assert G.disc_loss(r, f, "hinge").item() == pytest.approx((0 + 2) / 2 + (1.5 + 0) / 2)
    assert G.gen_loss(f, "bce").item() == pytest.approx(sp(-f).mean().item())
    assert G.gen_loss(f, "hinge").item() == pytest.approx(1.25)


def test_one_mean_over_the_heads_concatenated_maps():
    """Issue 11 item 7: Nitro-1 takes ONE BCE mean over the three heads' concatenated maps: zero logits give log 2
    (per-head means summed gave 3 log 2) and each head weighs by its map size. Heads' maps of 4, 2 and 1 positions."""
    maps = [torch.zeros(2, 1, 2, 2), torch.full((2, 1, 1, 2), 4.0), torch.full((2, 1, 1, 1), -2.0)]
    logits = torch.cat([m.flatten(1) for m in maps], 1)  # what DHeads.forward returns
    l2, sp = torch.tensor(2.0).log().item(), lambda x: torch.nn.functional.softplus(torch.tensor(x)).item()
    assert G.gen_loss(torch.zeros_like(logits), "bce").item() == pytest.approx(l2)
    assert G.disc_loss(torch.zeros_like(logits), torch.zeros_like(logits), "bce").item() == pytest.approx(2 * l2)
    assert G.gen_loss(logits, "bce").item() == pytest.approx((4 * l2 + 2 * sp(-4.0) + sp(2.0)) / 7)  # size-weighted
    assert G.gen_loss(logits, "hinge").item() == pytest.approx((0 - 2 * 4.0 + 2.0) / 7)


def test_heads_are_nitro1s_on_the_real_sd21_widths():
    """Issue 11 item 8: on the real SD2.1 UNet (meta device, no weights) the backbone gives 320/640/1280 channels at
    32/16/8, and Nitro-1's heads (GN 32, Conv C -> C/4 4x4 s2 p2, SiLU, Conv 1x1) give 17/9/5 maps, 8.6M parameters
    (the old C -> C heads with a projection term: 39.6M and 16/8/4)."""
    import json

    from diffusers import UNet2DConditionModel

    with open(os.path.join(os.path.dirname(G.__file__), "configs", "sd21", "unet.json")) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
        feats = G.backbone_features(unet, torch.empty(2, 4, 64, 64), torch.zeros(2, dtype=torch.long),
                                    {"encoder_hidden_states": torch.empty(2, 77, 1024)})
        heads = G.DHeads(unet.config.block_out_channels)
        logits = heads(feats)
    assert [tuple(f.shape[1:]) for f in feats] == [(320, 32, 32), (640, 16, 16), (1280, 8, 8)]
    assert tuple(logits.shape) == (2, 17 * 17 + 9 * 9 + 5 * 5)
    per_head = lambda c: 2 * c + (16 * c * (c // 4) + c // 4) + (c // 4 + 1)  # GN affine, 4x4 conv, 1x1 conv
    n = sum(p.numel() for p in heads.parameters())
    assert n == sum(per_head(c) for c in (320, 640, 1280)) == 8_607_203
    assert [m.num_groups for m in heads.modules() if isinstance(m, torch.nn.GroupNorm)] == [32, 32, 32]


# ---------------------------------------------------------------- precision and the GAD property


def test_fp32_pair_survives_h_1e4_where_bf16_difference_is_noise(pipe):
    S, b, ab, pt, h = pipe.unet, _batch(pipe), _ab(pipe), "epsilon", 1e-4
    f = lambda z: G.student_x0(S, z, b["cond"], ab, pt)
    ref = common.jvp(f, b["z"], b["v"], mode="exact").flatten()  # forward-mode AD in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the pair under bf16 autocast ...
        _, d_ours = G.student_pair(S, b["z"], b["v"], h, b["cond"], ab, pt)  # ... ours is forced to fp32
        naive = (f(b["z"] + h * b["v"]) - f(b["z"])) / h  # a naive difference is taken in bf16
    cos = lambda a: torch.nn.functional.cosine_similarity(a.flatten(), ref, dim=0).item()
    assert cos(d_ours / h) > 0.999
    assert ((d_ours / h).flatten() - ref).norm() / ref.norm() < 0.05
    assert cos(naive) < 0.5  # rounding noise, not the JVP
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the default: the student's JVP in bf16 (h-free)
        _, d_jvp = G.student_pair(S, b["z"], b["v"], h, b["cond"], ab, pt, "exact", torch.autocast("cpu", torch.bfloat16))
    assert cos(d_jvp / h) > 0.999


@pytest.mark.parametrize("mode", ["exact", "fd"])
def test_gad_term_zero_when_student_is_teacher_map(pipe, mode):
    b, ab = _batch(pipe), _ab(pipe)
    teacher = copy.deepcopy(pipe.unet)
    _, dT = G.student_pair(teacher, b["z"], b["v"], 1e-4, b["cond"], ab, "epsilon", mode)
    b["x0_T"] = torch.randn_like(dT)
    b["x0_T_prime"] = b["x0_T"] + dT.detach()
    args = G.Args(**{**TINY, "h": 1e-4, "gad_jvp": mode})
    heads = G.DHeads(pipe.unet.config.block_out_channels)
    _, _, logs = G.g_step(pipe.unet, heads, pipe.unet, b, args, common.autocast(torch.device("cpu"), torch.float32),
                          ab, "epsilon")
    assert logs["gad"] == pytest.approx(0.0, abs=1e-6)
    b["x0_T_prime"] = b["x0_T"] + 2 * dT  # a different teacher response is penalised
    _, _, logs = G.g_step(pipe.unet, heads, pipe.unet, b, args, common.autocast(torch.device("cpu"), torch.float32),
                          ab, "epsilon")
    assert logs["gad"] > 1e-3


def test_teacher_sampler_matches_stock_pipeline(pipe):
    p = copy.copy(pipe)
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(**{**pipe.components, "scheduler": G.ddim_scheduler(pipe)})
    z = torch.randn(common.latent_shape(pipe, 2), generator=torch.Generator().manual_seed(1))
    stock = sd(common.PROMPTS[:2], num_inference_steps=5, guidance_scale=3.0, latents=z, output_type="latent").images
    cond, uncond = common.encode(p, "sd21", common.PROMPTS[:2], "cpu")
    ours = G.teacher_sample(pipe.unet, z, cond, uncond, 5, 3.0, _ab(pipe), "epsilon")
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- gradient routing


def test_discriminator_gradient_routing(pipe):
    b, ab, ctx = _batch(pipe), _ab(pipe), common.autocast(torch.device("cpu"), torch.float32)
    S, heads, args = copy.deepcopy(pipe.unet).requires_grad_(True), G.DHeads(pipe.unet.config.block_out_channels), G.Args(**TINY)
    loss_d, _ = G.d_step(heads, pipe.unet, G.student_x0(S, b["z"], b["cond"], ab, "epsilon").detach(), b, args, ctx, ab)
    loss_d.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    assert all(p.grad is None for p in pipe.unet.parameters())  # frozen backbone
    assert all(p.grad is None for p in S.parameters())  # fake is detached
    loss_g, _, _ = G.g_step(S, heads, pipe.unet, b, args, ctx, ab, "epsilon")
    heads.zero_grad(set_to_none=True)
    loss_g.backward()
    assert all(p.grad is None for p in heads.parameters()) and all(p.requires_grad for p in heads.parameters())
    assert sum(p.grad.abs().sum() for p in S.parameters() if p.grad is not None) > 0


def test_generator_step_does_not_update_D_and_vice_versa(pipe):
    b, ab, ctx = _batch(pipe), _ab(pipe), common.autocast(torch.device("cpu"), torch.float32)
    S, heads, args = copy.deepcopy(pipe.unet).requires_grad_(True), G.DHeads(pipe.unet.config.block_out_channels), G.Args(**TINY)
    opt_g, opt_d = torch.optim.AdamW(S.parameters(), 1e-3), torch.optim.AdamW(heads.parameters(), 1e-3)
    snap = lambda m: [p.detach().clone() for p in m.parameters()]
    same = lambda a, m: all(torch.equal(x, y) for x, y in zip(a, m.parameters()))
    s0, h0 = snap(S), snap(heads)
    rows, used = G.g_update(S, heads, pipe.unet, opt_g, None, lambda: b, args, ctx, ab, "epsilon")
    assert same(h0, heads) and not same(s0, S)
    s1 = snap(S)
    G.d_update(S, heads, pipe.unet, opt_d, None, lambda: b, used, rows, args, ctx, ab, "epsilon")
    assert same(s1, S) and not same(h0, heads)


# ---------------------------------------------------------------- the D step and the iteration as Nitro-1


def test_d_step_counts_misaligned_pairs_as_fakes_and_draws_t_D_per_row(pipe, monkeypatch):
    """Issue 11 item 9: fakes = student rows + real latent i-1 with prompt i; real and fake t_D drawn independently
    (before: one t shared by real and fake rows, no misaligned rows). Noise-free re-noising and a stub backbone/head
    that return per-row logits, so the loss can be computed by hand."""
    b, ab, B = _batch(pipe, B=3), _ab(pipe), 3
    seen = {}
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # x_t = sqrt(a_t) x0
    monkeypatch.setattr(G, "backbone_features", lambda unet, x_t, t, cond: seen.update(x_t=x_t, t=t, cond=cond) or [x_t])
    heads = lambda feats: torch.linspace(-2, 2, feats[0].shape[0])[:, None].repeat(1, 5)  # noqa: E731  row-wise logits
    x_fake, ctx = b["z"], common.autocast(torch.device("cpu"), torch.float32)  # any latents stand for the student's
    sp = torch.nn.functional.softplus
    for misaligned, k in ((True, 3), (False, 2)):
        args = G.Args(**{**TINY, "misaligned_d": misaligned})
        loss, logs = G.d_step(heads, None, x_fake, b, args, ctx, ab)
        v = torch.linspace(-2, 2, k * B)
        assert loss.item() == pytest.approx((sp(v[:-B]).mean() + sp(-v[-B:]).mean()).item(), rel=1e-6)
        assert logs["d_fake"] == pytest.approx(v[:B].mean().item(), abs=1e-6)
        t, x0 = seen["t"], seen["x_t"] / ab[seen["t"]].sqrt().view(-1, 1, 1, 1)
        torch.testing.assert_close(x0[:B], x_fake)
        torch.testing.assert_close(x0[-B:], b["x0_T"])  # reals
        torch.testing.assert_close(seen["cond"]["encoder_hidden_states"], b["cond"]["encoder_hidden_states"].repeat(k, 1, 1))
        assert not torch.equal(t[:B], t[-B:]) and t.shape == (k * B,)  # independent t_D for fake and real rows
        if misaligned:  # row i: latent i-1 with prompt i (the cond rows checked above)
            torch.testing.assert_close(x0[B:2 * B], b["x0_T"][[2, 0, 1]])


@pytest.mark.parametrize("d_batch", ["next", "same"])
def test_d_update_uses_the_next_batch_and_the_updated_students_fakes(pipe, monkeypatch, d_batch):
    """Issue 11 item 9 (Nitro-1): the D step draws its own batch and its fakes come from the student AFTER the G
    update; --d-batch same reuses the G step's batch and (pre-update) fakes."""
    ab, ctx = _ab(pipe), common.autocast(torch.device("cpu"), torch.float32)
    S, heads = copy.deepcopy(pipe.unet).requires_grad_(True), G.DHeads(pipe.unet.config.block_out_channels)
    args = G.Args(**TINY, gad_weight=0.0, d_batch=d_batch)
    batches, seen, real_d_step = iter([_batch(pipe, seed=1), _batch(pipe, seed=2)]), [], G.d_step
    monkeypatch.setattr(G, "d_step", lambda h, u, x0_fake, batch, *a: seen.append((x0_fake, batch)) or real_d_step(
        h, u, x0_fake, batch, *a))
    before = copy.deepcopy(S)
    opt_g, opt_d = torch.optim.AdamW(S.parameters(), 1e-3), torch.optim.AdamW(heads.parameters(), 1e-3)
    G.train_step(S, heads, pipe.unet, opt_g, opt_d, None, lambda: next(batches), args, ctx, ab, "epsilon")
    (x0_fake, batch), = seen
    with torch.no_grad():
        after_fake, before_fake = (G.student_x0(m, batch["z"], batch["cond"], ab, "epsilon") for m in (S, before))
    assert not torch.allclose(after_fake, before_fake, atol=1e-6)  # the G update moved the student
    if d_batch == "next":
        assert torch.equal(batch["z"], _batch(pipe, seed=2)["z"])
        torch.testing.assert_close(x0_fake, after_fake, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(batch["z"], _batch(pipe, seed=1)["z"]) and next(batches, None) is not None  # one draw
        torch.testing.assert_close(x0_fake, before_fake, rtol=1e-5, atol=1e-6)


def test_grad_accum_gradients_equal_the_double_batch(pipe, monkeypatch):
    """--grad-accum 2 on micro-batches of 1 gives the G and D gradients of one batch of 2 (lr 0: weights fixed, so
    the refreshed fakes agree; t_D = 0 and zero noise, so the draws agree). A missing 1/N doubles them."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    ab, ctx = _ab(pipe), common.autocast(torch.device("cpu"), torch.float32)
    big = [_batch(pipe, seed=1), _batch(pipe, seed=2)]  # G batch, then D batch
    micro = [{**{k: v[i:i + 1] for k, v in bb.items() if k != "cond"}, "cond": common.select(bb["cond"], slice(i, i + 1))}
             for bb in big for i in range(2)]
    heads0, grads = G.DHeads(pipe.unet.config.block_out_channels), []
    for n, draws in ((1, big), (2, micro)):
        S, heads = copy.deepcopy(pipe.unet).requires_grad_(True), copy.deepcopy(heads0)
        args = G.Args(**{**TINY, "batch_size": 2 // n}, grad_accum=n, t_d_max=0, misaligned_d=False, clip=1e9)
        opt_g, opt_d = torch.optim.SGD(S.parameters(), lr=0.0), torch.optim.SGD(heads.parameters(), lr=0.0)
        it = iter(draws)
        row = G.train_step(S, heads, pipe.unet, opt_g, opt_d, None, it.__next__, args, ctx, ab, "epsilon")
        assert row["gad"] > 0 and next(it, None) is None  # GAD term on; every micro-batch drawn once
        grads.append([torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (S, heads)])
    for g1, g2 in zip(*grads):  # G, then D
        assert g1.norm() > 0 and (g2 - g1).norm() / g1.norm() < 1e-4


# ---------------------------------------------------------------- data stage


def test_data_stage_shards_crash_and_resume(tmp_path, data, monkeypatch):
    ref = [torch.load(common.shard_path(data, s)) for s in range(2)]
    assert ref[0]["z"].shape[0] == 4 and ref[1]["z"].shape[0] == 2  # 6 pairs in shards of 4
    assert set(ref[0]) >= {"z", "v", "x0_T", "x0_T_prime", "ehs", "prompts"}
    d, real, calls = str(tmp_path / "d"), G.teacher_sample, []

    def crash_in_second_shard(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # shard 0 = two chunks of batch 2; crash inside shard 1
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(G, "teacher_sample", crash_in_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        G.train(G.Args(**TINY, stage="data", data_dir=d, out=d))
    assert sorted(os.listdir(d)) == ["meta.json", "shard_00000.pt"]  # nothing half-written
    monkeypatch.setattr(G, "teacher_sample", real)
    mtime = os.path.getmtime(common.shard_path(d, 0))
    G.train(G.Args(**TINY, stage="data", data_dir=d, out=d))
    assert os.path.getmtime(common.shard_path(d, 0)) == mtime  # finished shard not regenerated
    for s in range(2):  # resumed data equal an uninterrupted run
        got = torch.load(common.shard_path(d, s))
        for k in ("z", "v", "x0_T", "x0_T_prime", "ehs"):
            torch.testing.assert_close(got[k], ref[s][k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        G.train(G.Args(**{**TINY, "h": 1e-3}, stage="data", data_dir=d, out=d))


# ---------------------------------------------------------------- smoke runs, resume, export, eval


def test_smoke_gad_resume_export(tmp_path, data, pipe, monkeypatch):
    a, curves = str(tmp_path / "a"), []
    monkeypatch.setattr(common, "plot_curves", lambda j, png: curves.append(png))  # matplotlib subplots: seconds
    full = G.train(G.Args(**TINY, steps=2, stage="train", data_dir=data, out=a))
    assert os.path.exists(os.path.join(a, "samples_000002.png")) and curves[-1] == os.path.join(a, "curves.png")
    assert full["gad"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in full.values())
    b = str(tmp_path / "b")
    monkeypatch.setattr(common, "save_grid", lambda *a, **k: None)  # pictures checked above; matplotlib is slow
    G.train(G.Args(**TINY, steps=1, stage="train", data_dir=data, out=b))
    resumed = G.train(G.Args(**TINY, steps=2, stage="train", data_dir=data, out=b, resume="latest"))
    assert resumed == full  # identical losses at the last step
    wa, wb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)["models"] for d in (a, b))
    assert all(torch.equal(wa["student"][k], wb["student"][k]) for k in wa["student"])
    assert all(torch.equal(wa["heads"][k], wb["heads"][k]) for k in wa["heads"])
    # export: the documented one-step stock call reproduces the student from the same latents
    from diffusers import DiffusionPipeline

    exp = DiffusionPipeline.from_pretrained(os.path.join(a, "pipeline"))
    S = copy.deepcopy(pipe.unet)
    S.load_state_dict(wa["student"])
    z = torch.randn(common.latent_shape(pipe, 2), generator=torch.Generator().manual_seed(3))
    out = exp(common.PROMPTS[:2], latents=z, output_type="latent", **documented_call(G)).images  # the docstring's call
    cond, _ = common.encode(exp, "sd21", common.PROMPTS[:2], "cpu")  # tiny weights depend on the seed: use the export's
    torch.testing.assert_close(out, G.student_x0(S, z, cond, _ab(pipe), "epsilon"), atol=1e-4, rtol=1e-4)
    assert exp(common.PROMPTS[:1], **documented_call(G)).images[0].size == (128, 128)
    export_call_covers_documented(G, os.path.join(a, "pipeline"), "sd21")  # what evaluate.py will run


def test_smoke_base_ladd_hinge_with_eval(tmp_path, data, no_plots):
    out = str(tmp_path / "base")
    small = {**TINY, "teacher_steps": 2, "id_seeds": 2, "id_prompts": 3}  # eval only reads the teacher's config
    res = G.train(G.Args(**small, steps=2, stage="train", data_dir=data, out=out, gad_weight=0.0, gan_loss="hinge", eval=True))
    assert res["gad"] == 0.0 and os.path.join(out, "samples_000002.png") in no_plots
    for k in ("ident_teacher", "ident_student", "teacher_alignment"):
        assert 0.0 <= res[k] <= 1.0
    assert 0 < res["diversity_student"] <= 2 and -1 <= res["jvp_cos"] <= 1 and os.path.exists(os.path.join(out, "eval.json"))


def test_both_gad_forms_in_the_generator_step(pipe):
    """--gad-form paper is the printed Eq. 8: on the same batch it is exactly h^2 times the jvp form."""
    b, ab, ctx = _batch(pipe), _ab(pipe), common.autocast(torch.device("cpu"), torch.float32)
    S, heads = copy.deepcopy(pipe.unet), G.DHeads(pipe.unet.config.block_out_channels)
    gad = {f: G.g_step(S, heads, pipe.unet, b, G.Args(**TINY, gad_form=f), ctx, ab, "epsilon")[2]["gad"]
           for f in ("jvp", "paper")}
    assert gad["jvp"] > 1.0 and gad["paper"] == pytest.approx(1e-8 * gad["jvp"], rel=1e-4)


def test_grad_ckpt_with_the_exact_jvp_is_refused_before_loading(tmp_path):
    """Checkpoint recomputation runs outside forward-mode AD and would drop the student's tangent."""
    with pytest.raises(common.UsageError, match="--gad-jvp fd"):
        G.train(G.Args(**{**TINY, "out": str(tmp_path / "r")}, grad_ckpt=True))
    with pytest.raises(common.UsageError, match="--misaligned-d"):  # a latent needs another row's prompt
        G.train(G.Args(**{**TINY, "out": str(tmp_path / "r"), "batch_size": 1}))
    with pytest.raises(common.UsageError, match="--grad-accum"):
        G.train(G.Args(**{**TINY, "out": str(tmp_path / "r")}, grad_accum=0))
