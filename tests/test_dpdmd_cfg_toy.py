"""The guided 2D toy (bench/dpdmd_cfg_toy.py), scaled down to seconds. It asserts what the full run found
(docs/readme_toys_dpdmd_cfg.md): CFG makes the teacher drop the modes its class shares with a neighbour, and both
students, DMD and DP-DMD, inherit that drop through the guided real score / the guided anchor. There is no
DMD-vs-DP-DMD ordering to assert: the full run found none."""
import importlib.util
import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import dpdmd

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "dpdmd_cfg_toy.py")
_spec = importlib.util.spec_from_file_location("dpdmd_cfg_toy", _path)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

TEACHER_STEPS, TEACHER_BATCH = 800, 256  # the full run: 5000 x 512
ITERS = 300  # fake + student updates (50 student updates); the full run: 3000
N_EVAL = 250  # fixed noises per class; the full run: 1000
MARGIN = 0.2  # entropy drop demanded from w = 1 to w = 3 (full run: ~0.5 for the teacher and for both students)


def test_guidance_drops_shared_modes_in_teacher_and_both_students():
    sch = dpdmd.Schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), True, 4, 30)
    T = toy.train_teacher(TEACHER_STEPS, seed=0, bs=TEACHER_BATCH)
    z, y = toy.eval_batch(N_EVAL)
    cond, uncond = toy.conds(y)
    with torch.no_grad():
        teacher = {w: toy.stats(dpdmd.teacher_rollout(T, z, cond, uncond, w, sch, 30)[0], y) for w in (1.0, 3.0)}
    # the unguided teacher uses all 5 modes of each class, shared ones included; w = 3 keeps (almost) no shared one
    # (full run: 0 of 2 per class; here 0.25, one class keeps one)
    assert teacher[1.0]["modes"] >= 4.5 and teacher[1.0]["shared"] >= 1.5, teacher
    assert teacher[3.0]["shared"] <= teacher[1.0]["shared"] - 1, teacher
    assert teacher[3.0]["entropy"] < teacher[1.0]["entropy"] - MARGIN, teacher

    entropy = {}
    for name, kw, w in (("DMD", dict(div_weight=0.0), 1.0), ("DMD", dict(div_weight=0.0), 3.0),
                        ("DP-DMD", dict(div_weight=0.05, anchor_step=5), 3.0)):
        stu = toy.distill(T, sch, dpdmd.Args(**kw), w, seed=0, iters=ITERS)
        with torch.no_grad():
            entropy[name, w] = toy.stats(dpdmd.student_rollout(stu, z, cond, sch)[0], y)["entropy"]
    # unguided, the student keeps the 5 modes evenly (as DP-DMD did in the full run, where both matched at w = 1);
    # a guided real score (DMD) or a guided real score plus a guided anchor (DP-DMD) loses that spread
    assert entropy["DMD", 1.0] > teacher[1.0]["entropy"] - 0.05, entropy
    for name in ("DMD", "DP-DMD"):
        assert entropy[name, 3.0] < entropy["DMD", 1.0] - MARGIN, (entropy, teacher)
