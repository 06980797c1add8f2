"""Tests of dpdmd.py: equations against independent computations, gradient routing, argument checks, the update
schedule, smoke runs for both families (DMD, DP-DMD, no-detach ablation), exact resume and export parity.
There is no mode-coverage test: the 2D toy (README) showed no DMD vs DP-DMD difference, so there is nothing to assert."""
import copy
import json
import math
import os

import pytest
import torch
from docs_call import documented_call, export_call_covers_documented

import common
import dpdmd

# ----------------------------------------------------------------------------------------------
# fixtures: pictures as empty files; one tiny pipeline per family for the whole module


@pytest.fixture(autouse=True)
def _no_matplotlib(monkeypatch):
    """Grids and curves are made (empty files) but not drawn: a period of 0 still samples at the end (issue 12), and
    matplotlib costs ~1 s per picture here; common.save_grid / plot_curves are tested in test_common.py."""
    monkeypatch.setattr(common, "save_grid", lambda images, path, nrow: open(path, "wb").close())
    monkeypatch.setattr(common, "plot_curves", lambda jsonl, png: open(png, "wb").close())


@pytest.fixture(scope="module")
def pipes():
    common.seed_everything(0)
    return {f: common.load_pipeline(f, "tiny-" + f) for f in ("sd3", "sdxl")}


def _sched(pipe, family, student_steps=4, teacher_steps=30):
    flow = family == "sd3"
    return dpdmd.Schedule(dpdmd.stock_scheduler(pipe, flow), flow, student_steps, teacher_steps)


def _call(net, x, t, c):
    return net(x, timestep=t.expand(x.shape[0]), **c, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------
# equations on fixed tensors and against stock diffusers schedulers


def test_student_schedules_are_the_papers(pipes):
    s3 = _sched(pipes["sd3"], "sd3")
    sig = torch.tensor([p[2] for p in s3.student])
    assert torch.allclose(sig, torch.tensor([1.0, 0.8577, 0.6022, 0.0089, 0.0]), atol=1e-4)
    assert [p[0] for p in _sched(pipes["sdxl"], "sdxl").student] == [999, 749, 499, 249, None]


def test_flow_anchor_velocity_matches_independent_teacher_rollout(pipes):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, w, k = pipes["sd3"], 3.5, 5
    cond, uncond = common.encode(pipe, "sd3", ["a red fox", "a lighthouse"], "cpu")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    v_star = dpdmd.diversity_target(pipe.transformer, z, cond, uncond, w, _sched(pipe, "sd3"), k)
    s = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    s.set_timesteps(30)
    x = z.clone()
    with torch.no_grad():
        for t in s.timesteps[:k]:  # CFG by hand, separate cond / uncond calls, the stock Euler step
            vc, vu = _call(pipe.transformer, x, t, cond), _call(pipe.transformer, x, t, uncond)
            x = s.step(vu + w * (vc - vu), t, x).prev_sample
    expected = (z - x) / (1 - s.sigmas[k])  # Eq. 6
    assert 0.9 < s.sigmas[k] < 0.95 and (x - z).abs().mean() > 1e-3
    torch.testing.assert_close(v_star, expected, atol=2e-5, rtol=1e-4)


def test_diffusion_x0_target_matches_ddim_pred_original_sample(pipes):
    pipe, w, k = pipes["sdxl"], 8.0, 3
    cond, uncond = common.encode(pipe, "sdxl", ["a red fox", "a lighthouse"], "cpu")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    # 25 steps: trailing spacing is uniform (40), where the stock DDIM step lands on the next listed timestep
    x0_star = dpdmd.diversity_target(pipe.unet, z, cond, uncond, w, _sched(pipe, "sdxl", teacher_steps=25), k)
    s = dpdmd.stock_scheduler(pipe, False)
    s.set_timesteps(25)
    x = z.clone()
    with torch.no_grad():
        for i, t in enumerate(s.timesteps[:k + 1]):
            ec, eu = _call(pipe.unet, x, t, cond), _call(pipe.unet, x, t, uncond)
            res = s.step(eu + w * (ec - eu), t, x)
            x = res.prev_sample if i < k else x
    torch.testing.assert_close(x0_star, res.pred_original_sample, atol=1e-4, rtol=1e-4)  # Eq. 39


def test_dmd_grad_values_and_gradient_on_x():
    g0 = torch.Generator().manual_seed(3)
    x, r, f = (torch.randn(3, 4, 5, 5, generator=g0) for _ in range(3))
    g = dpdmd.dmd_grad(x, r, f)
    for i in range(3):  # per-sample normaliser, computed independently
        torch.testing.assert_close(g[i], (f[i] - r[i]) / (x[i] - r[i]).abs().mean())
    xg = x.clone().requires_grad_(True)
    dpdmd.dmd_loss(xg, g).backward()
    torch.testing.assert_close(xg.grad, g / x.numel())  # DMD gradient on x is g up to the mean's 1/numel
    assert dpdmd.dmd_grad(x, r, r).abs().max() == 0  # real == fake: nothing to match


def test_dmd_normaliser_of_the_authors_code_and_weight_decay_default():
    """--dmd-norm x_t divides by mean|x_t - x0_real| per sample (the authors' code), the default by mean|x - x0_real|
    (Eq. 5, DMD2); weight decay defaults to the authors' 0.0."""
    g0 = torch.Generator().manual_seed(4)
    x, x_t, r, f = (torch.randn(2, 3, 4, 4, generator=g0) for _ in range(4))
    ours, theirs = dpdmd.dmd_grad(x, r, f), dpdmd.dmd_grad(x, r, f, x_t)
    for i in range(2):
        torch.testing.assert_close(theirs[i], (f[i] - r[i]) / (x_t[i] - r[i]).abs().mean())
        torch.testing.assert_close(ours[i], (f[i] - r[i]) / (x[i] - r[i]).abs().mean())
    assert not torch.allclose(ours, theirs)
    a = dpdmd.Args()
    assert (a.weight_decay, a.dmd_norm, a.lr_schedule, a.lr_warmup, a.ema_decay) == (0.0, "x_hat", "constant", 500, 0.0)


def test_anchor_velocity_and_div_loss_values():
    z, zk = torch.full((1, 2), 3.0), torch.full((1, 2), 1.0)
    assert torch.equal(dpdmd.anchor_velocity(z, zk, 0.75), torch.full((1, 2), 8.0))
    pred = torch.tensor([[1.0, 2.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = dpdmd.div_loss(pred, target)
    loss.backward()
    assert loss.item() == pytest.approx(2.5) and target.grad is None  # sg on the target


# ----------------------------------------------------------------------------------------------
# gradient routing on nets whose steps are distinguishable


class StepNet(torch.nn.Module):
    """out = a_i x + b_i, with its own (a_i, b_i) for each student timestep i: the gradient says which step it reached."""

    def __init__(self, ts):
        super().__init__()
        self.ts = torch.tensor(ts, dtype=torch.float32)
        self.a = torch.nn.Parameter(torch.linspace(0.6, 0.9, len(ts)))
        self.b = torch.nn.Parameter(torch.linspace(-0.1, 0.1, len(ts)))

    def forward(self, x, timestep, return_dict=False):
        i = (self.ts - timestep.float()[0]).abs().argmin()
        return (self.a[i] * x + self.b[i],)


class Affine(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c))

    def forward(self, x, timestep, return_dict=False):
        return (self.c * x + 0.1 * timestep.float().view(-1, 1, 1, 1) / 1000,)


@pytest.mark.parametrize("div_weight,detach", [(0.05, True), (0.05, False), (0.0, True)])
def test_gradient_routing(pipes, div_weight, detach):
    sch = _sched(pipes["sd3"], "sd3")
    student, teacher, fake = StepNet([p[0] for p in sch.student[:-1]]), Affine(0.9), Affine(1.2)
    a = dpdmd.Args(div_weight=div_weight, detach=detach)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    total, l_dmd, l_div = dpdmd.student_loss(student, teacher, fake, z, {}, {}, 3.5, sch, a)
    ga = torch.autograd.grad(l_dmd, student.a, retain_graph=True)[0]
    cut = div_weight > 0 and detach  # DP-DMD cuts DMD at step 1; lambda = 0 (plain DMD) and --no-detach do not
    assert (ga[0] == 0) == cut and (ga[1:] != 0).all()
    if div_weight > 0:
        gd = torch.autograd.grad(l_div, student.a, retain_graph=True)[0]
        assert gd[0] != 0 and (gd[1:] == 0).all()  # the diversity loss trains the first step only
    else:
        assert l_div.item() == 0 and not l_div.requires_grad
    total.backward()
    assert teacher.c.grad is None and fake.c.grad is None  # frozen teacher; fake not trained by the student loss


def test_check_args_rejects_bad_values():
    dpdmd.check_args(dpdmd.Args(div_weight=0.0, student_steps=1))  # plain DMD: one step is fine (nothing detached)
    for kw in ({"fake_updates_per_student": 0}, {"student_steps": 1}, {"anchor_step": 31}, {"div_weight": -0.1}):
        with pytest.raises(common.UsageError):  # a named flag, not a bare assert (gone under python -O)
            dpdmd.check_args(dpdmd.Args(**kw))


def test_fake_loss_trains_fake_only(pipes):
    sch = _sched(pipes["sd3"], "sd3")
    student, fake = StepNet([p[0] for p in sch.student[:-1]]), Affine(1.2)
    dpdmd.fake_loss(student, fake, torch.randn(2, 4, 8, 8), {}, sch).backward()
    assert student.a.grad is None and fake.c.grad is not None and fake.c.grad != 0


# ----------------------------------------------------------------------------------------------
# in-process smoke runs, resume, export


def _args(tmp, family, **kw):
    base = dict(family=family, model="tiny-" + family, out=str(tmp), steps=2, batch_size=2, fake_updates_per_student=1,
                lr=1e-3, eval_prompts=2, eval_seeds=2, eval_every=100, sample_every=100, ckpt_every=100)
    return dpdmd.Args(**{**base, **kw})


# lambda = 0 with the default --detach is plain DMD; ("sdxl", 0.05, False) is the Fig. 5 no-detach ablation
@pytest.mark.parametrize("family,div_weight,detach,files", [("sd3", 0.05, True, True), ("sd3", 0.0, True, False),
                                                            ("sdxl", 0.05, True, False), ("sdxl", 0.05, False, False)])
def test_smoke(pipes, tmp_path, family, div_weight, detach, files):
    # grids, curves and export in one run (export: also below); the others: every period 0 = never, the end kept
    kw = {} if files else {"sample_every": 0, "export": False, "log_every": 0, "eval_every": 0, "ckpt_every": 0}
    m = dpdmd.train(_args(tmp_path, family, div_weight=div_weight, detach=detach, **kw), pipe=pipes[family])
    assert all(math.isfinite(m[k]) for k in ("fake_loss", "dmd_loss", "div_loss", "diversity"))
    assert (m["div_loss"] > 0) == (div_weight > 0) and 0 < m["diversity"] <= 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert ("fake_loss" in rows[0] and "dmd_loss" in rows[1]) if files else [r["step"] for r in rows] == [2, 2]
    assert "diversity" in rows[-1]  # (issue 12: a period of 0 was ZeroDivisionError)
    for f in ("ckpt.pt",) + (("curves.png", "samples_000002.png", "pipeline/model_index.json") if files else ()):
        assert os.path.exists(tmp_path / f), f
    if files:
        export_call_covers_documented(dpdmd, str(tmp_path / "pipeline"), family)  # what evaluate.py will run


def _weights(path, name):
    return torch.load(path, weights_only=False)["models"][name]


def _same(sd1, sd2):
    return all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_resume_is_exact_and_updates_alternate(pipes, tmp_path):
    # a cosine lr (full lr at step 1, half at step 2): the default 500-step warm-up would give step 1 lr 0
    pipe = pipes["sd3"]
    quiet = dict(eval=False, sample_every=0, export=False, lr_schedule="cosine_with_restarts", lr_warmup=0,
                 batch_size=1, grad_accum=2)  # issue 15: 2 micro-batches per step
    full = dpdmd.train(_args(tmp_path / "a", "sd3", **quiet), pipe=pipe)
    dpdmd.train(_args(tmp_path / "b", "sd3", steps=1, **quiet), pipe=pipe)
    s1 = {n: _weights(tmp_path / "b/ckpt.pt", n) for n in ("student", "fake")}
    resumed = dpdmd.train(_args(tmp_path / "b", "sd3", resume="latest", **quiet), pipe=pipe)
    assert resumed["dmd_loss"] == full["dmd_loss"] and resumed["div_loss"] == full["div_loss"]
    for n in ("student", "fake"):
        assert _same(_weights(tmp_path / "a/ckpt.pt", n), _weights(tmp_path / "b/ckpt.pt", n))
    # step 1 updated only the fake score, step 2 only the student
    assert _same(s1["student"], pipe.transformer.state_dict()) and not _same(s1["fake"], pipe.transformer.state_dict())
    s2 = {n: _weights(tmp_path / "b/ckpt.pt", n) for n in ("student", "fake")}
    assert _same(s1["fake"], s2["fake"]) and not _same(s1["student"], s2["student"])


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_export_reloads_and_reproduces_student_sampler(pipes, tmp_path, family):
    from diffusers import DiffusionPipeline

    pipe = pipes[family]
    student = copy.deepcopy(getattr(pipe, pipe.denoiser_name))
    torch.nn.init.normal_(next(p for p in student.parameters() if p.ndim > 1), std=0.05)  # not the teacher
    sch = _sched(pipe, family)
    common.export_pipeline(pipe, student, str(tmp_path), scheduler=dpdmd.stock_scheduler(pipe, family == "sd3"))
    re = DiffusionPipeline.from_pretrained(str(tmp_path))
    z = torch.randn(common.latent_shape(pipe, 2), generator=torch.Generator().manual_seed(5))
    prompts = ["a red fox", "a lighthouse"]
    stock = re(prompts, latents=z, output_type="latent", **documented_call(dpdmd)).images  # the docstring's call
    cond, _ = common.encode(pipe, family, prompts, "cpu")
    with torch.no_grad():
        ours = dpdmd.student_rollout(student, z, cond, sch)[0]
    torch.testing.assert_close(stock.float(), ours, atol=1e-4, rtol=1e-4)


def test_eq9_features_from_a_vision_model(pipes, tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    import evaluate

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    fm = evaluate.load_features(str(tmp_path), "cpu")  # the --feature-model path: transformers' Auto classes
    lat = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    f = evaluate.latent_features(pipes["sd3"], torch.cat([lat, lat[:1].expand(3, -1, -1, -1)]), fm)
    assert f.shape == (6, 16)
    div = evaluate.diversity(f.view(2, 3, 16))  # prompt 0: three different samples; prompt 1: one sample thrice
    one = evaluate.diversity(f[:3].unsqueeze(0))
    assert one > 1e-4 and evaluate.diversity(f[3:].unsqueeze(0)) == pytest.approx(0, abs=1e-5)
    assert div == pytest.approx(one / 2, abs=1e-5)
