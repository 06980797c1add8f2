"""--grad-accum N (issue 15): an optimiser step of N micro-batches sees the large-batch gradient, once per network.

How the draws are controlled: common.micro_batches is wrapped so that every micro-batch starts from its own seed
(micro-batch i of draw group c: seed 100 + c N + i), and an optimiser step pre-hook records each optimiser's gradients
and sets its lr to 0, so the networks keep their initial weights and every update of every step is comparable.
A --grad-accum 1 run then gives the per-micro-batch gradients g_0, g_1 (two steps = two seeds) and a --grad-accum 2 run
must hand each optimiser exactly (g_0 + g_1) / 2, the gradient of the batch of both micro-batches (the losses are means
over samples). Without the 1/N it would see g_0 + g_1, with zero_grad inside the loop g_1 / 2, and a step per
micro-batch is counted as one call too many.
"""
import contextlib
import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import adm
import common
import dpdmd
import gad_sid
import gad_tdm


@pytest.fixture(autouse=True)
def _no_pictures(monkeypatch):
    """Sample grids, curves and the pipeline export are not under test here (seconds on a loaded machine)."""
    monkeypatch.setattr(common, "decode", lambda pipe, latents: torch.zeros(latents.shape[0], 3, 8, 8))
    monkeypatch.setattr(common, "save_grid", lambda images, path, nrow: open(path, "wb").close())
    monkeypatch.setattr(common, "plot_curves", lambda jsonl, png: open(png, "wb").close())
    monkeypatch.setattr(common, "export_pipeline", lambda *a, **k: None)


class Record(list):
    """[(optimiser, [grad of each parameter])], one per optimiser step. group: consecutive micro_batches calls that
    draw from the same seeds (e.g. a fake and a generator update over the same micro-batches)."""
    group, calls = 1, 0

    def reset(self):
        self.clear()
        self.calls = 0


@pytest.fixture
def record(monkeypatch):
    rec, real = Record(), common.micro_batches

    def hook(opt, args, kwargs):
        rec.append((opt, [p.grad.clone() if p.grad is not None else None for g in opt.param_groups for p in g["params"]]))
        for g in opt.param_groups:
            g["lr"] = 0.0  # the weights stay put: the next update and step see the same networks

    def seeded(n, *models):
        c, rec.calls = rec.calls, rec.calls + 1
        for i in real(n, *models):
            torch.manual_seed(100 + (c // rec.group) * n + i)
            yield i

    monkeypatch.setattr(common, "micro_batches", seeded)
    handle = register_optimizer_step_pre_hook(hook)
    yield rec
    handle.remove()


def flat(grads):
    return torch.cat([g.flatten() for g in grads if g is not None])


def check_accumulated(single, accumulated, updates):
    """single: 2 steps of --grad-accum 1 (seeds 100, 101), accumulated: 1 step of --grad-accum 2 (seeds 100 + i)."""
    assert len(single) == 2 * updates and len(accumulated) == updates  # one optimiser step per network and step
    for j in range(updates):
        (opt0, g0), (opt1, g1), (_, g) = single[j], single[updates + j], accumulated[j]
        assert opt0 is opt1 and len(g0) == len(g) and [x is None for x in g0] == [x is None for x in g]
        g0, g1, g = flat(g0), flat(g1), flat(g)
        assert (g0 - g1).norm() > 0.05 * g0.norm() > 0  # two micro-batches with different draws
        torch.testing.assert_close(g, (g0 + g1) / 2, rtol=1e-4, atol=1e-5 * g.abs().max().item())


# ---- the mechanics in common.py ---------------------------------------------------------------------------------------


def test_micro_batches_skip_the_all_reduce_on_all_but_the_last():
    class DDPLike(torch.nn.Linear):  # no_sync() as DDP has it
        syncing = True

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

    class FSDPLike(torch.nn.Linear):  # FSDP2's switch
        syncing = True

        def set_requires_gradient_sync(self, flag):
            self.syncing = flag

    a, b, plain = DDPLike(1, 1), FSDPLike(1, 1), torch.nn.Linear(1, 1)
    seen = [(i, a.syncing, b.syncing) for i in common.micro_batches(3, a, b, plain)]
    assert seen == [(0, False, False), (1, False, False), (2, True, True)] and a.syncing and b.syncing
    assert [(i, a.syncing) for i in common.micro_batches(1, a)] == [(0, True)]
    with pytest.raises(RuntimeError):  # an error inside a micro-batch restores the sync
        for _ in common.micro_batches(2, b):
            raise RuntimeError
    assert b.syncing
    assert common.mean_rows([{"l": torch.tensor(1.0), "k": 2}, {"l": 3.0, "k": 4}]) == {"l": 2.0, "k": 3.0}


# ---- each file's update structure -------------------------------------------------------------------------------------


def test_gad_tdm_fake_and_generator_updates(record, tmp_path):
    """Both updates over the same micro-batches (the rollout states of step 1 serve both), response path: two
    backwards per micro-batch."""
    kw = dict(model="tiny", device="cpu", sample_every=0, ckpt_every=0, eval_teacher_steps=1, gad_path="response", gad_jvp="fd",
              gad_weight=1e4, grad_clip=1e9)
    record.group = 2
    gad_tdm.train(gad_tdm.Args(**kw, batch_size=1, steps=2, out=str(tmp_path / "a")))
    single = list(record)
    record.reset()
    m = gad_tdm.train(gad_tdm.Args(**kw, batch_size=1, grad_accum=2, steps=1, out=str(tmp_path / "b")))
    check_accumulated(single, list(record), updates=2)
    assert m["gad_mismatch"] > 0


def test_gad_sid_generator_and_fake_updates(record, tmp_path):
    pipe = common.load_pipeline("sana", "tiny")
    kw = dict(model="tiny", threads=1, sample_every=0, ckpt_every=0, log_every=1, export=False, fake_cfg=False, gad_jvp="fd")
    record.group = 2
    gad_sid.train(gad_sid.Args(**kw, batch_size=1, steps=2, out=str(tmp_path / "a")), pipe=pipe)
    single = list(record)
    record.reset()
    gad_sid.train(gad_sid.Args(**kw, batch_size=1, grad_accum=2, steps=1, out=str(tmp_path / "b")), pipe=pipe)
    check_accumulated(single, list(record), updates=2)


def test_dpdmd_fake_and_student_updates(record, tmp_path, monkeypatch):
    monkeypatch.setattr(dpdmd, "sample", lambda student, pipe, family, prompts, seeds, *a: torch.zeros(16, 4, 16, 16))
    common.seed_everything(0)
    pipe = common.load_pipeline("sd3", "tiny-sd3")
    kw = dict(family="sd3", model="tiny-sd3", fake_updates_per_student=1, eval=False, sample_every=0, ckpt_every=0,
              export=False, grad_clip=1e9, student_steps=2, teacher_steps=5, anchor_step=2)
    record.group = 2  # step 1 updates the fake, step 2 the student: both draw from the same seeds
    dpdmd.train(dpdmd.Args(**kw, batch_size=1, steps=4, out=str(tmp_path / "a")), pipe=pipe)
    single = [record[0], record[1], record[2], record[3]]
    record.reset()
    dpdmd.train(dpdmd.Args(**kw, batch_size=1, grad_accum=2, steps=2, out=str(tmp_path / "b")), pipe=pipe)
    check_accumulated(single, list(record), updates=2)


def test_adm_fake_generator_and_discriminator_updates(record):
    torch.manual_seed(0)
    pipe = common.load_pipeline("sd3", "tiny-sd3")
    cond, uncond = common.encode(pipe, "sd3", ["a red fox", "a lighthouse"], "cpu")
    net, M = pipe.transformer, type("M", (), {})()
    M.pipe, M.teacher, M.shape, M.sch = pipe, net, (1, 4, 16, 16), adm.Schedule("sd3", pipe.scheduler, 1 / 64)
    M.ts, M.ac = M.sch.gen_timesteps(2), lambda: common.autocast(torch.device("cpu"), torch.float32)
    M.G = M.G_u = copy.deepcopy(net).requires_grad_(True)
    M.fake = M.fake_u = copy.deepcopy(net).requires_grad_(True)
    M.taps, M.D = adm.Taps(net, "sd3"), adm.Discriminator([32, 32], None, 32)
    M.D_u, M.scaler = M.D, None
    M.opt = {k: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.0, 0.99), weight_decay=0.0)
             for k, m in (("G", M.G_u), ("D", M.D_u), ("fake", M.fake_u))}
    record.group = 3  # fake, G and D updates over the same micro-batches
    one = adm.Args(model="tiny", batch_size=1, head_channels=32)
    for r in (0, 1):  # micro-batch r of the accumulated step: prompt r, seed 100 + r
        adm.adm_step(M, common.select(cond, [r]), common.select(uncond, [r]), one, torch.device("cpu"))
    single = list(record)
    record.reset()
    out = adm.adm_step(M, cond, uncond, adm.Args(model="tiny", batch_size=1, grad_accum=2, head_channels=32),
                       torch.device("cpu"))
    check_accumulated(single, list(record), updates=3)
    assert set(out) == {"loss_g", "loss_fake", "dmd", "loss_d", "d_fake", "d_real"}
