"""Unit tests of common.py: CLI, checkpoints, exact resume, tiny families, export, fail-fast loading (metrics: test_evaluate)."""
import dataclasses
import os
import time
from types import SimpleNamespace
from typing import Literal

import pytest
import torch

import common


@dataclasses.dataclass
class _Args:
    lr: float = 1e-3  # learning rate
    steps: int = 10  # number of steps
    use_ema: bool = False  # keep an EMA copy
    mode: Literal["fd", "exact"] = "fd"  # how to take the JVP
    timesteps: tuple[int, ...] = (899, 674)  # student timesteps
    name: str = ""  # a free string


def test_parse_types_bools_choices_tuples_and_help():
    a = common.parse(_Args, ["--lr", "2e-4", "--use-ema", "--mode", "exact", "--timesteps", "3", "2", "1"])
    assert a == _Args(lr=2e-4, steps=10, use_ema=True, mode="exact", timesteps=(3, 2, 1), name="")
    assert common.parse(_Args, []) == _Args()
    assert common.parse(_Args, ["--use-ema", "--no-use-ema"]).use_ema is False
    with pytest.raises(SystemExit):
        common.parse(_Args, ["--mode", "bogus"])
    helptext = common.build_parser(_Args).format_help()
    assert "learning rate" in helptext and "how to take the JVP" in helptext and "student timesteps" in helptext


def _toy_run(out, steps, resume="", lr=1e-2):
    """A miniature training loop in the shape the method files use: all randomness from the global RNG; a
    non-constant lr schedule (warm-up, then cosine) and an EMA of the model, both checkpointed (issue 11)."""
    common.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.0, 0.95))
    sched = common.lr_schedulers({"opt": opt}, SimpleNamespace(lr_schedule="cosine_with_restarts", lr_warmup=2, steps=9))
    ema = common.make_ema(model, 0.8)
    start, losses, lrs = 0, [], []
    path = common.resolve_resume(resume, out)
    if path:
        start = common.load_checkpoint(path, {"m": model, "ema": ema}, {"opt": opt}, schedulers=sched)["step"]
    for step in range(start + 1, steps + 1):
        x = torch.randn(16, 3)
        loss = (model(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ema.update_parameters(model)
        common.lr_step(sched)
        losses.append(loss.item())
        if step % 3 == 0:
            common.save_checkpoint(os.path.join(out, "ckpt.pt"), {"m": model, "ema": ema}, {"opt": opt}, step, _Args(),
                                   schedulers=sched)
    return model, losses, lrs, ema


def test_checkpoint_atomic_and_resume_is_exact(tmp_path):
    full, full_losses, full_lrs, full_ema = _toy_run(str(tmp_path / "a"), 9)
    assert full_lrs[:3] == [0.0, 5e-3, 1e-2] and full_lrs[3] < 1e-2  # warm-up over 2 steps, then the cosine decays
    _toy_run(str(tmp_path / "b"), 6)  # stopped after step 6 (checkpoint at 6)
    assert os.path.exists(tmp_path / "b" / "ckpt.pt") and not os.path.exists(tmp_path / "b" / "ckpt.pt.tmp")
    resumed, resumed_losses, resumed_lrs, resumed_ema = _toy_run(str(tmp_path / "b"), 9, resume="latest")
    assert resumed_losses == full_losses[6:] and resumed_lrs == full_lrs[6:]  # bit-exact, schedule included
    for p, q in zip(list(full.parameters()) + list(full_ema.parameters()),
                    list(resumed.parameters()) + list(resumed_ema.parameters())):
        assert torch.equal(p, q)
    # an explicitly typed --lr on resume becomes the schedule's base: lr = new base x the same multiplier
    _toy_run(str(tmp_path / "c"), 6)
    _, _, lrs_new, _ = _toy_run(str(tmp_path / "c"), 9, resume="latest", lr=2e-2)
    assert lrs_new == pytest.approx([2 * v for v in full_lrs[6:]], rel=1e-12)
    assert common.resolve_resume("auto", str(tmp_path / "empty")) is None  # 'auto': resume if present
    with pytest.raises(common.UsageError, match="no checkpoint at"):  # 'latest' with none is an error (issue 12)
        common.resolve_resume("latest", str(tmp_path / "empty"))
    with pytest.raises(common.UsageError, match="nope.pt"):
        common.resolve_resume(str(tmp_path / "nope.pt"), str(tmp_path))


def test_ema_on_a_known_sequence_of_weights():
    """--ema-decay d: the first update copies theta, then ema <- d ema + (1 - d) theta; decay 0 = no EMA."""
    w = torch.nn.Parameter(torch.zeros(2))
    net = torch.nn.Module()
    net.w = w
    ema = common.make_ema(net, 0.9)
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            w.fill_(value)
        ema.update_parameters(net)
    assert torch.allclose(ema.module.w, torch.full((2,), 0.9 * (0.9 * 1.0 + 0.1 * 2.0) + 0.1 * 4.0))  # 1.39
    assert common.make_ema(net, 0.0) is None


def test_logger_forgets_rows_after_resumed_step_and_plots(tmp_path):
    log = common.Logger(str(tmp_path), total=4, enabled=True)
    for s in range(1, 5):
        log.log(s, loss=1.0 / s, other=s)
    log.close()
    common.Logger(str(tmp_path), total=4, start=2, enabled=True).close()
    assert [r["step"] for r in common.Logger.read(str(tmp_path / "metrics.jsonl"))] == [1, 2]
    common.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"))
    common.save_grid(torch.rand(6, 3, 8, 8) * 2 - 1, str(tmp_path / "grid.png"), nrow=3)
    assert os.path.getsize(tmp_path / "curves.png") > 1000 and os.path.getsize(tmp_path / "grid.png") > 1000


@pytest.mark.parametrize("family", sorted(common.TINY))
def test_tiny_family_builds_encodes_and_runs_forward(family):
    pipe = common.load_pipeline(family, "tiny")
    cond, uncond = common.encode(pipe, family, ["a red fox", "a blue car"], "cpu")
    net = getattr(pipe, pipe.denoiser_name)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    x = torch.randn(common.latent_shape(pipe, 2))
    both = common.cat(cond, uncond)
    out = net(torch.cat([x, x]), timestep=torch.full((4,), 500.0), **both, return_dict=False)[0]
    assert out.shape[0] == 4 and out.shape[2:] == x.shape[2:] and torch.isfinite(out).all()
    # the text condition reaches the output: two prompts, two different predictions
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])
    assert common.decode(pipe, x[:1]).shape[1] == 3


def test_export_reloads_in_a_stock_pipeline_and_samples(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = common.load_pipeline("sd21", "tiny")
    student = getattr(pipe, pipe.denoiser_name)
    torch.nn.init.normal_(student.conv_out.weight, std=0.1)  # a "trained" student differs from init
    common.export_pipeline(pipe, student, str(tmp_path / "pipe"))
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert torch.equal(loaded.unet.conv_out.weight, student.conv_out.weight)
    img = loaded("a red fox", num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 128, 128) and torch.isfinite(img).all()


def test_unreachable_model_fails_fast_with_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    t0 = time.time()
    with pytest.raises(common.UsageError) as e:
        common.load_pipeline("pixart", "no-such-org/no-such-model")
    assert time.time() - t0 < 10
    assert "no-such-org/no-such-model" in str(e.value) and "--model" in str(e.value)
    assert "hf download" in str(e.value) and "huggingface-cli" not in str(e.value)  # the CLI current hubs install


def test_check_finite_names_step_and_term():
    common.check_finite(3, loss=torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="step 7.*'gen'"):
        common.check_finite(7, gen=torch.tensor(float("nan")))


def test_autocast_and_scaler_policy():
    cpu = torch.device("cpu")
    assert common.resolve_dtype("auto", cpu) == torch.float32 and common.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert common.make_scaler(cpu, torch.bfloat16) is None and common.make_scaler(cpu, torch.float32) is None
    with common.autocast(cpu, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with common.autocast(cpu, torch.float32):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_tiny_pipelines_are_reproducible_and_leave_the_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = common.load_pipeline("sd21", "tiny")
    assert torch.equal(torch.get_rng_state(), state)
    b = common.load_pipeline("sd21", "tiny")
    assert all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), b.unet.parameters()))


def test_sdxl_unconditional_branch_is_the_stock_one():
    """Stock SDXL (force_zeros_for_empty_prompt) uses zero embeddings for the empty negative prompt."""
    pipe = common.load_pipeline("sdxl", "tiny")
    assert pipe.config.force_zeros_for_empty_prompt
    _, uncond = common.encode(pipe, "sdxl", ["a red fox"], "cpu")
    assert uncond["encoder_hidden_states"].abs().max() == 0 and uncond["added_cond_kwargs"]["text_embeds"].abs().max() == 0


@pytest.mark.parametrize("family", sorted(common.TINY))
def test_local_directory_loads_through_the_real_from_pretrained_path(family, tmp_path):
    """The real face: `--model /local/dir` goes through <Pipeline>.from_pretrained (here a saved tiny pipeline)."""
    common.load_pipeline(family, "tiny").save_pretrained(str(tmp_path))
    ref = common.load_pipeline(family, "tiny")
    pipe = common.load_pipeline(family, str(tmp_path), torch.bfloat16)
    net, ref_net = getattr(pipe, pipe.denoiser_name), getattr(ref, ref.denoiser_name)
    assert type(pipe) is type(ref) and pipe.denoiser_name == ref.denoiser_name
    assert {q.dtype for q in net.parameters()} == {torch.bfloat16}  # the dtype asked for, also where diffusers ignores it
    assert all(torch.equal(p.to(q.dtype), q) for p, q in zip(ref_net.parameters(), net.parameters()))
    assert not any(p.requires_grad for p in net.parameters())
    cond, _ = common.encode(pipe, family, ["a red fox"], "cpu")
    c_ref, _ = common.encode(ref, family, ["a red fox"], "cpu")
    assert torch.allclose(cond["encoder_hidden_states"].float(), c_ref["encoder_hidden_states"], atol=0.05)
