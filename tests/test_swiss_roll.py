"""Tests of swiss_roll.py: GAD's Eq. 6 on hand-made maps, its two forms, the metric, and a fast in-process run."""
import copy
import math

import pytest
import torch

import swiss_roll as sr


def _nets(seed=0):
    torch.manual_seed(seed)
    teacher = sr.MLP(32, 2)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return teacher, student


def _segment(net):
    t, s = torch.full((64,), 500), torch.full((64,), 250)
    return lambda x: sr.ddim_step(net, x, t, s)


@pytest.mark.parametrize("jvp", ["fd", "exact"])
@pytest.mark.parametrize("form", ["paper", "jvp"])
def test_gad_loss_is_zero_when_student_is_teacher(jvp, form):
    teacher, _ = _nets()
    student = copy.deepcopy(teacher)
    x, v = torch.randn(64, 2), torch.randn(64, 2)
    d_s = sr.response(_segment(student), x, v, 0.1, jvp, form)
    d_t = sr.response(_segment(teacher), x, v, 0.1, jvp, form)
    assert sr.gad_loss(d_s, d_t).item() == 0.0
    teacher2, student2 = _nets()  # and clearly nonzero for a different student
    assert sr.gad_loss(sr.response(_segment(student2), x, v, 0.1, jvp, form),
                       sr.response(_segment(teacher2), x, v, 0.1, jvp, form)).item() > 0


def test_finite_difference_loss_approaches_exact_jvp_loss():
    teacher, student = _nets()
    x, v = torch.randn(64, 2), torch.randn(64, 2)
    loss = lambda h, jvp: sr.gad_loss(sr.response(_segment(student), x, v, h, jvp, "jvp"),
                                      sr.response(_segment(teacher), x, v, h, jvp, "jvp")).item()
    exact = loss(0.1, "exact")  # the jvp form of the exact loss does not depend on h
    errors = [abs(loss(h, "fd") - exact) / exact for h in (0.3, 0.03, 3e-3)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2, errors


def test_paper_form_is_h_squared_times_jvp_form():
    teacher, student = _nets(1)
    x, v, h = torch.randn(64, 2), torch.randn(64, 2), 0.05
    for jvp in ("fd", "exact"):
        paper, jvpf = [sr.gad_loss(sr.response(_segment(student), x, v, h, jvp, f),
                                   sr.response(_segment(teacher), x, v, h, jvp, f)).item() for f in ("paper", "jvp")]
        assert paper == pytest.approx(h**2 * jvpf, rel=1e-4)


def test_gad_gradient_reaches_the_student_only():
    teacher, student = _nets()
    teacher.requires_grad_(True)
    x, v = torch.randn(64, 2), torch.randn(64, 2)
    sr.gad_loss(sr.response(_segment(student), x, v, 0.1, "fd", "jvp"),
                sr.response(_segment(teacher), x, v, 0.1, "fd", "jvp")).backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    out_bias = f"net.{len(student.net) - 1}.bias"  # a constant offset cancels in a response (difference)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n != out_bias) and grads[out_bias].abs().max() < 1e-6
    assert all(p.grad is None for p in teacher.parameters())  # sg(teacher response), Eq. 6


def test_distance_to_curve():
    s = torch.tensor([5.0, 7.0, 11.0])
    on = torch.stack([s * s.cos(), s * s.sin()], 1) * sr.SCALE
    normal = torch.nn.functional.normalize(torch.stack([s.cos() - s * s.sin(), s.sin() + s * s.cos()], 1), dim=1)
    normal = normal @ torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # rotate the tangent by 90 degrees
    assert sr.dist_to_curve(on).max() < 3e-3
    assert torch.allclose(sr.dist_to_curve(on + 0.15 * normal), torch.full((3,), 0.15), atol=3e-3)
    assert sr.dist_to_curve(torch.zeros(1, 2)).item() == pytest.approx(1.5 * math.pi * sr.SCALE, abs=3e-3)


def test_fast_run_gad_beats_pointwise(tmp_path):
    """1-step students, small budgets (about 12 s). Margins at seeds 0, 1, 2: 8.0, 5.8, 7.0 points of off-manifold
    rate and 0.05-0.06 of JVP cosine, so the test is not at the edge of flaking."""
    args = sr.Args(student_steps=1, teacher_iters=1500, teacher_batch=512, student_iters=400, student_batch=256,
                   pool=4096, n_eval=2000, extras=False, seed=0, out=str(tmp_path))
    s = sr.train(args)["summary"]
    assert s["gad"]["off"][0] < s["pointwise"]["off"][0], s
    assert s["gad"]["jvp_cos"][0] > s["pointwise"]["jvp_cos"][0], s
    assert (tmp_path / "swiss_roll.png").exists() and (tmp_path / "metrics.json").exists()
    assert set(sr.np.load(tmp_path / "samples.npz").files) >= {"data", "teacher", "pointwise", "gad", "z"}
