"""evaluate.py: each metric against an independent computation with a known answer, prompt sets in every format,
the refusal of built-in prompts for real models, and one end-to-end run on two tiny exports and a tiny teacher."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import evaluate as ev


def _identity(z):
    return z


# ==== GAD Table 1 geometry, DP-DMD Eq. 9, Vendi, CLIP score / PickScore, FID, intra-prompt pairs

def test_geometry_metrics_on_maps_with_known_jacobians():
    z = torch.randn(64, 2)
    same = ev.geometry_metrics(_identity, _identity, z, n_dirs=3)
    assert same["jvp_cos"] == pytest.approx(1.0, abs=1e-6) and same["jac_norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert same["spectral_kl"] == pytest.approx(0.0, abs=1e-6) and same["jvp_mse"] == pytest.approx(0.0, abs=1e-12)
    scaled = ev.geometry_metrics(lambda x: 2.0 * x, _identity, z, n_dirs=3)
    assert scaled["jvp_cos"] == pytest.approx(1.0, abs=1e-6) and scaled["jac_norm_ratio"] == pytest.approx(2.0, abs=1e-5)
    assert scaled["jac_norm_ratio_top10"] == pytest.approx(2.0, abs=1e-5) and scaled["spectral_kl"] == pytest.approx(0, abs=1e-6)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # 90 degrees: every response is orthogonal to the teacher's
    rotated = ev.geometry_metrics(lambda x: x @ rot.T, _identity, z, n_dirs=3)
    assert rotated["jvp_cos"] == pytest.approx(0.0, abs=1e-6) and rotated["jac_norm_ratio"] == pytest.approx(1.0, abs=1e-5)
    # same seeded directions: ||Rv - v||^2 = 2||v||^2 while ||2v - v||^2 = ||v||^2
    assert rotated["jvp_mse"] == pytest.approx(2 * scaled["jvp_mse"], rel=1e-5)
    # non-linear maps: exact forward-mode JVP and the central difference agree
    f = lambda x: torch.sin(3 * x) + x.pow(2)
    exact = ev.geometry_metrics(f, _identity, z, n_dirs=2, mode="exact")
    fd = ev.geometry_metrics(f, _identity, z, n_dirs=2, mode="fd", h=1e-3)
    assert fd["jvp_cos"] == pytest.approx(exact["jvp_cos"], abs=1e-4)


def test_geometry_metrics_on_images_and_spectral_kl_sees_blur():
    z = torch.randn(4, 3, 16, 16)
    blur = torch.nn.AvgPool2d(3, stride=1, padding=1)
    m = ev.geometry_metrics(blur, _identity, z, n_dirs=2)
    assert m["spectral_kl"] > 0.05 and m["jac_norm_ratio"] < 0.7 and 0 < m["jvp_cos"] < 1


def test_diversity_metric():
    assert ev.diversity(torch.ones(2, 5, 7)) == pytest.approx(0.0, abs=1e-6)
    assert ev.diversity(torch.eye(4).expand(3, 4, 4)) == pytest.approx(1.0, abs=1e-6)
    a = torch.tensor([[[1.0, 0.0], [math.cos(1.0), math.sin(1.0)]]])  # one prompt, two seeds at angle 1 rad
    assert ev.diversity(a) == pytest.approx(1 - math.cos(1.0), abs=1e-6)
    with pytest.raises(ValueError):
        ev.diversity(torch.ones(2, 1, 3))


def test_vendi_identical_orthogonal_and_two_at_an_angle():
    assert ev.vendi(torch.randn(1, 9).expand(5, 9)) == pytest.approx(1.0, abs=1e-6)
    assert ev.vendi(torch.eye(6)[:4] * torch.arange(1.0, 5.0)[:, None]) == pytest.approx(4.0, abs=1e-6)  # scale-free
    c = math.cos(1.0)  # K / 2 = [[1, c], [c, 1]] / 2 has eigenvalues (1 +- c) / 2
    lam = torch.tensor([(1 + c) / 2, (1 - c) / 2])
    two = torch.tensor([[1.0, 0.0], [c, math.sin(1.0)]])
    assert ev.vendi(two) == pytest.approx(math.exp(-(lam * lam.log()).sum().item()), abs=1e-6)


def test_intra_prompt_mean_over_pairs():
    x = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])[..., None]  # 2 prompts, 3 seeds, 1 value
    d = ev.intra_prompt_mean(x, lambda a, b: (a - b).abs().squeeze(-1))
    assert d.tolist() == pytest.approx([(1 + 3 + 2) / 3, 0.0])


def test_clip_score_and_pickscore_on_a_tiny_clip_trained_to_match():
    """A tiny random CLIP (configs/eval_tiny) fitted for a few steps to 4 (image, caption) pairs: matching captions
    must score above shuffled ones, and both scores equal the model's own logits_per_image (an independent path)."""
    model, proc = ev.load_features("tiny", "cpu")
    captions = ["a red square", "a green ring", "blue noise", "a dark stripe"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g)
    px = proc.image_processor(images=list((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()),
                              return_tensors="pt")["pixel_values"]
    tok = proc.tokenizer(captions, padding=True, return_tensors="pt")
    model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(12):
        opt.zero_grad()
        model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=px, return_loss=True).loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    img, txt = ev.image_embeddings((model, proc), images), ev.text_embeddings((model, proc), captions)
    shuffled = txt[[1, 2, 3, 0]]
    assert ev.clip_score(img, txt) > ev.clip_score(img, shuffled) + 5
    logits = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=px).logits_per_image
    assert ev.pickscore(img, txt, model.logit_scale) == pytest.approx(logits.diagonal().mean().item(), rel=1e-4)
    cos = logits.diagonal() / model.logit_scale.exp()
    assert ev.clip_score(img, txt) == pytest.approx((100 * cos.clamp_min(0)).mean().item(), rel=1e-4)


def test_fid_with_tiny_features_matches_scipy_and_is_zero_on_itself():
    from scipy import linalg
    fid = ev.make_fid("tiny", "cpu")
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, 3, 32, 32, generator=g), torch.rand(40, 3, 32, 32, generator=g) * 0.5
    fid.update(a, real=True)
    fid.update(a, real=False)
    assert fid.compute().item() == pytest.approx(0.0, abs=1e-3)
    fid.reset()  # the reference side is kept
    fid.update(b, real=False)
    fa, fb = (fid.inception(x).double().numpy() for x in (a, b))
    mu, cov = [f.mean(0) for f in (fa, fb)], [np.cov(f, rowvar=False) for f in (fa, fb)]
    ref = ((mu[0] - mu[1]) ** 2).sum() + np.trace(cov[0] + cov[1] - 2 * linalg.sqrtm(cov[0] @ cov[1]).real)
    assert fid.compute().item() == pytest.approx(ref, rel=1e-3) and ref > 0.1


def test_lpips_is_zero_on_identical_images():
    pytest.importorskip("torchvision")  # torchmetrics' LPIPS backbones come from torchvision
    try:
        dist = ev.make_lpips("alex", "cpu")
    except Exception as e:  # the AlexNet weights are a download
        pytest.skip(f"LPIPS weights unavailable offline: {e}")
    x = torch.rand(2, 3, 64, 64)
    assert dist(x, x).abs().max() < 1e-6 and (dist(x, x.flip(0)) > 0).all()


# ==== Prompt sets

def test_prompt_sets_from_every_format(tmp_path, monkeypatch):
    import pandas
    rows = pandas.DataFrame({"caption": ["a cat", " a dog ", ""], "id": [1, 2, 3]})
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    rows.to_json(tmp_path / "p.jsonl", orient="records", lines=True)
    rows.to_csv(tmp_path / "p.csv", index=False)
    rows.to_parquet(tmp_path / "p.parquet")
    assert common.read_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    for ext in ("jsonl", "csv", "parquet"):
        assert common.read_prompts(f"{tmp_path}/p.{ext}:caption") == ["a cat", "a dog"], ext
    with pytest.raises(common.UsageError, match=r"no column 'prompt'; columns: caption, id"):
        common.read_prompts(f"{tmp_path}/p.csv")
    assert common.read_prompts("builtin") == common.PROMPTS == common.read_prompts("")
    import datasets
    seen = {}

    def fake_load(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"Prompt": ["a red fox", "a lighthouse"]})
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert common.read_prompts("hf:someone/parti@test:Prompt") == ["a red fox", "a lighthouse"]
    assert seen == {"name": "someone/parti", "config": None, "split": "test"}
    common.read_prompts("hf:poloclub/diffusiondb/2m_random_1k:Prompt")
    assert seen == {"name": "poloclub/diffusiondb", "config": "2m_random_1k", "split": "train"}


def test_hub_prompt_set_offline_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(common.UsageError, match=r"--prompts: hf:nobody/no-such-prompts.*local file"):
        common.read_prompts("hf:nobody/no-such-prompts@train:text")


def test_real_models_refuse_the_builtin_prompts(tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    args = ev.Args(models=(f"s={tmp_path}/pipe",), metrics=(), out=str(tmp_path / "out"))
    with pytest.raises(common.UsageError, match=r"--prompts: .*real model.*DiffusionDB.*JourneyDB.*PartiPrompts.*builtin"):
        ev.evaluate(args)
    import gad_tdm
    targs = gad_tdm.Args(model=f"{tmp_path}/pipe", out=str(tmp_path / "t"))
    with pytest.raises(common.UsageError, match=r"--prompts: .*real model"):
        common.start_run(targs, gad_tdm.RANGES, family="pixart")
    targs.prompts = "builtin"  # said explicitly: allowed
    common.start_run(targs, gad_tdm.RANGES, family="pixart")
    common.start_run(gad_tdm.Args(model="tiny", out=str(tmp_path / "t2")), gad_tdm.RANGES, family="pixart")


# ==== End to end: a tiny teacher and two exports of it (one identical, one perturbed)

def test_evaluate_end_to_end_on_tiny_exports(tmp_path):
    pipe = common.load_pipeline("sd21", "tiny")
    same, moved = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.unet)
    with torch.no_grad():
        moved.conv_in.weight.mul_(1.5)
    call = {"num_inference_steps": 2, "guidance_scale": 1.0}
    common.export_pipeline(pipe, same, str(tmp_path / "same"), call=call)
    common.export_pipeline(pipe, moved, str(tmp_path / "moved"), call=call)
    args = ev.Args(models=("teacher=tiny-sd21@num_inference_steps=2,guidance_scale=1.0", f"same={tmp_path}/same",
                           f"moved={tmp_path}/moved"), teacher="teacher",
                   metrics=("clip_score", "vendi", "div_dino", "fid_teacher", "jvp_cos"), clip_model="tiny",
                   dino_model="tiny", fid_features="tiny", num_prompts=2, seeds=2, geometry_prompts=1,
                   geometry_dirs=1, prompts="builtin", out=str(tmp_path / "eval"))
    res = ev.evaluate(args)
    assert list(res) == ["teacher", "same", "moved"]
    assert res["same"]["jvp_cos"] == pytest.approx(1.0, abs=1e-5) and res["same"]["jvp_mse"] == pytest.approx(0, abs=1e-9)
    assert res["moved"]["jvp_cos"] < 0.9999 and res["moved"]["jvp_mse"] > 1e-6
    assert res["same"]["fid_teacher"] == pytest.approx(0.0, abs=1e-3) and res["moved"]["fid_teacher"] > 1e-3
    assert res["same"]["clip_score"] == pytest.approx(res["teacher"]["clip_score"], abs=1e-4)
    assert 1 <= res["moved"]["vendi"] <= 2 and "fid_teacher" not in res["teacher"]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["models"]["moved"] == pytest.approx(res["moved"]) and saved["num_prompts"] == 2
    table = (tmp_path / "eval" / "metrics.md").read_text().splitlines()
    assert table[0].startswith("| model | clip_score | vendi | div_dino | fid_teacher | jvp_cos |")
    assert [r.split(" | ")[0] for r in table[2:]] == ["| teacher", "| same", "| moved"]
    for n in ("teacher", "same", "moved"):
        assert os.path.getsize(tmp_path / "eval" / f"sheet_{n}.png") > 1000
