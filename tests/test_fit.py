"""Tests of the fitting plumbing in common.py (issue 15 part B): LoRA (gradient routing, both exports reload to the
student's output, exact resume), the prompt-embedding cache (one encoder run per distinct prompt, identical rows,
encoders moved off the compute device) and the memory plan (gad_tdm's default refused on 141 GB, the suggestion fits)."""
import copy

import pytest
import torch

import common


@pytest.fixture(scope="module")
def sd3():
    common.seed_everything(0)
    return common.load_pipeline("sd3", "tiny-sd3")


def _out(net, x, t, c):
    return net(x, timestep=t, **c, return_dict=False)[0]


def test_lora_trains_only_adapters_and_both_exports_reload(sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    teacher = sd3.transformer
    student = common.add_lora(copy.deepcopy(teacher).float().requires_grad_(True).train(), 4)
    params = common.trainable(student)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} >= {"to_q", "add_q_proj"}  # both MMDiT streams
    base = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    x, t = torch.randn(common.latent_shape(sd3, 2), generator=torch.Generator().manual_seed(0)), torch.tensor([700., 300.])
    c, _ = common.encode(sd3, "sd3", ["a red fox", "a lighthouse"], "cpu")
    with torch.no_grad():  # B = 0 at init: the student starts as the teacher
        torch.testing.assert_close(_out(student, x, t, c), _out(teacher, x, t, c), atol=0, rtol=0)
    opt = torch.optim.AdamW(params, lr=1e-2)
    _out(student, x, t, c).pow(2).mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in student.parameters())  # gradients reach adapters only
    opt.step()
    assert len(opt.state) == len(params) and all(torch.equal(base[n], p) for n, p in student.named_parameters()
                                                 if n in base)  # optimiser state only for adapters; base unchanged
    student.eval()
    with torch.no_grad():
        ours = _out(student, x, t, c)
    assert (ours - _out(teacher, x, t, c)).abs().max() > 1e-3  # the adapters moved the output
    common.export_pipeline(sd3, student, str(tmp_path / "pipeline"))
    merged = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "pipeline")).transformer  # a stock model
    assert not any("lora" in k for k in merged.state_dict())
    fresh = common.load_pipeline("sd3", "tiny-sd3")  # the base pipeline, as a user has it
    fresh.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        for net in (merged, fresh.transformer):
            torch.testing.assert_close(_out(net, x, t, c), ours, atol=1e-5, rtol=1e-5)


def test_lora_checkpoint_resume_is_exact(sd3, tmp_path):
    """save -> load into a freshly built LoRA student and optimiser -> the next step equals the uninterrupted one."""
    x, t = torch.randn(common.latent_shape(sd3, 2), generator=torch.Generator().manual_seed(1)), torch.tensor([600., 200.])
    c, _ = common.encode(sd3, "sd3", ["a red fox", "a lighthouse"], "cpu")

    def build():
        net = common.add_lora(copy.deepcopy(sd3.transformer).float().requires_grad_(True).train(), 2)
        return net, torch.optim.AdamW(common.trainable(net), lr=1e-2)

    def step(net, opt):
        opt.zero_grad()
        _out(net, x, t, c).pow(2).mean().backward()
        opt.step()

    a, opt_a = build()
    step(a, opt_a)
    common.save_checkpoint(str(tmp_path / "ckpt.pt"), {"student": a}, {"student": opt_a}, 1, {"lora_rank": 2})
    b, opt_b = build()
    common.load_checkpoint(str(tmp_path / "ckpt.pt"), {"student": b}, {"student": opt_b})
    step(a, opt_a)
    step(b, opt_b)
    sa, sb = a.state_dict(), b.state_dict()
    assert any("lora_" in k for k in sa) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(opt_b.state) == len(common.trainable(b))  # AdamW state for the adapters only
    common._RUN.ckpt = None


def test_prompt_cache_encodes_once_and_moves_encoders_off(sd3, monkeypatch):
    pipe = copy.copy(sd3)  # same modules, its own prompt_cache attribute
    pipe.__dict__.pop("prompt_cache", None)
    rows, moved = [], []
    hook = pipe.text_encoder_3.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    monkeypatch.setattr(pipe.text_encoder_3, "to", lambda *a, **k: moved.append(a) or torch.nn.Module.to(
        pipe.text_encoder_3, *a, **k))
    try:
        prompts = ["a red fox", "a cat", "a red fox", "a lighthouse", "a cat"]
        direct = common.encode(pipe, "sd3", ["a cat", "a red fox", "a cat"], "cpu")
        rows.clear()
        assert common.cache_prompts(pipe, "sd3", prompts, "cpu", batch=2)
        assert sum(rows) == 2 * 3 and moved == [("cpu",)]  # 3 distinct prompts (+ their empty negatives), then off
        rows.clear()
        cached = common.encode(pipe, "sd3", ["a cat", "a red fox", "a cat"], "cpu")
        assert rows == []  # a lookup: no encoder run
        for d, e in zip(direct, cached):
            for k in d:
                assert torch.equal(d[k], e[k])
        common.encode(pipe, "sd3", ["unseen", "unseen"], "cpu")  # a miss: encoded once, where the encoder now is
        assert sum(rows) == 2 and "unseen" in pipe.prompt_cache["rows"]
        other = copy.copy(sd3)
        other.__dict__.pop("prompt_cache", None)
        monkeypatch.setattr(common, "PROMPT_CACHE_GB", 1e-9)  # a prompt set too large to cache: nothing changes
        moved.clear()
        assert not common.cache_prompts(other, "sd3", prompts, "cpu") and not hasattr(other, "prompt_cache")
        assert moved == []
    finally:
        hook.remove()


def test_memory_plan_refuses_gad_tdm_default_on_141gb_and_its_suggestion_fits():
    import re
    from types import SimpleNamespace

    import gad_tdm

    args = gad_tdm.Args(model="random")  # the paper's per-GPU batch 64 on one GPU
    plan = common.memory_plan(args, "gad_tdm", "pixart")
    assert 140.4 < plan["peak"] < 161  # gpu_cost: 161 GiB with T5 on the GPU; the cache takes T5's 8.9 GiB off
    with pytest.raises(common.UsageError, match="--grad-ckpt") as e:
        common.check_memory(args, "gad_tdm", "pixart", device_gib=140.4)
    flags = re.search(r"add (--[^\n]*?)(?: or |$)", str(e.value)).group(1).split()
    over = {f[2:].replace("-", "_"): (int(v) if v.isdigit() else True) for f, v in zip(flags, flags[1:] + ["--"])
            if f.startswith("--")}
    assert common.memory_plan(SimpleNamespace(**{**vars(args), **over}), "gad_tdm", "pixart")["peak"] <= 0.97 * 140.4
    # gpu_cost's other figure: batch 8 per GPU models 47.0 GiB with T5 (8.9 GiB) on the GPU
    assert abs(common.memory_plan(SimpleNamespace(batch_size=8), "gad_tdm", "pixart")["peak"] + 8.9 - 47.0) < 1.5
    small = common.memory_plan(SimpleNamespace(batch_size=4, lora_rank=64), "adm", "sd3")["weights_and_states"]
    assert small < common.memory_plan(SimpleNamespace(batch_size=4, lora_rank=0), "adm", "sd3")["weights_and_states"] - 20
