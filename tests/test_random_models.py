"""`--model random`: each family's real architecture from the shipped configs, random weights, no download.

Sizes are checked on the meta device (no memory) against the published parameter counts; the PixArt denoiser
is materialised on the CPU and run once at a small latent.
"""
import json
import os

import diffusers
import pytest
import torch

import common

M, B = 1e6, 1e9
# Published sizes of the released weights (parameters plus persistent buffers, e.g. SD3's position-embedding
# table), as model cards and papers round them: SD2.1 UNet 865M, SD VAE 84M, PixArt-XL-2 611M, SANA 0.59B,
# T5-XXL encoder 4.76B, Gemma-2-2B 2.6B, SD3.5-M 2.5B, SD3-M 2B, SDXL UNet 2.57B, CLIP-L 123M, OpenCLIP-G 695M.
PUBLISHED = {
    "sd21": {"unet": 865 * M, "vae": 83.7 * M},
    "pixart": {"transformer": 611 * M, "text_encoder": 4.76 * B, "vae": 83.7 * M},
    "sana": {"transformer": 0.59 * B, "text_encoder": 2.6 * B},
    "sd35m": {"transformer": 2.5 * B, "text_encoder": 123 * M, "text_encoder_2": 695 * M, "text_encoder_3": 4.76 * B},
    "sdxl": {"unet": 2.57 * B, "text_encoder": 123 * M, "text_encoder_2": 695 * M, "vae": 83.7 * M},
}
TOLERANCE = 0.05  # the published figures are rounded (SD3-Medium's "2B" is 2.09B of weights)
VARIANT_OF = {"sd21": "sd21", "pixart": "pixart", "sana": "sana", "sd35m": "sd3", "sdxl": "sdxl"}


def n_weights(module: torch.nn.Module) -> int:
    """Parameters (a tied one once, as in T5) plus persistent buffers."""
    tied_names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    buffers = sum(t.numel() for k, t in module.state_dict().items() if k not in tied_names)
    return sum(p.numel() for p in module.parameters()) + buffers


@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_random_pipeline_on_meta_is_the_real_class_at_the_published_size(variant):
    family = VARIANT_OF[variant]
    rng = torch.get_rng_state()
    pipe = common.load_pipeline(family, f"random-{variant}", torch.bfloat16, device="meta")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is left alone
    assert type(pipe) is getattr(diffusers, common.FAMILIES[family][0])
    denoiser = getattr(pipe, pipe.denoiser_name)
    assert type(denoiser).__name__ == {"sd21": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel",
                                       "pixart": "PixArtTransformer2DModel", "sana": "SanaTransformer2DModel"}.get(
                                           family, "SD3Transformer2DModel")
    for name, published in PUBLISHED[variant].items():
        ours = n_weights(getattr(pipe, name))
        assert abs(ours / published - 1) < TOLERANCE, f"{variant}/{name}: {ours / M:.1f}M vs published {published / M:.0f}M"
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in denoiser.parameters())
    # tokenizers: offline stand-ins with the real lengths, ids inside the real vocabularies
    for i in ("", "_2", "_3"):
        tok, enc = getattr(pipe, "tokenizer" + i, None), getattr(pipe, "text_encoder" + i, None)
        if tok is not None:
            assert len(tok) <= enc.config.vocab_size
            kind = type(tok).__name__
            assert tok.model_max_length == (77 if kind.startswith("CLIP") else common.TEXT_MAX_LENGTH[family]), kind


def test_sd3_medium_differs_from_sd35_medium_only_in_the_transformer():
    """SD3-Medium (adm's default): the same VAE, text encoders and scheduler files as SD3.5-Medium, so only its
    MMDiT is built here (on meta): no dual attention, no qk-norm, a 192x192 position table."""
    for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"):
        with open(os.path.join(common.CONFIGS, "sd3m", part + ".json")) as a, \
             open(os.path.join(common.CONFIGS, "sd35m", part + ".json")) as b:
            assert json.load(a) == json.load(b), part
    net = common.random_denoiser("sd3", device="meta", dtype=torch.bfloat16, model="random-sd3m")
    assert type(net).__name__ == "SD3Transformer2DModel" and net.config.dual_attention_layers == ()
    assert abs(n_weights(net) / (2.0 * B) - 1) < TOLERANCE


def test_random_names_choose_the_family_config_and_refuse_another_family():
    assert common.is_random("random") and common.is_random("random-sd3m") and not common.is_random("tiny")
    assert common.random_variant("sd3", "random") == common.random_variant("sd3", "random-sd3") == "sd35m"
    assert common.random_variant("sd3", "random-sd3m") == "sd3m"
    assert common.random_variant("pixart", "random-pixart") == "pixart"
    with pytest.raises(ValueError, match="not a sdxl model"):
        common.random_variant("sdxl", "random-sd3m")


def test_random_pixart_denoiser_runs_on_cpu_at_a_small_latent(random_denoiser):
    """Real-size PixArt-XL-2 (28 layers, 1152 wide) in fp32 on the CPU, 8x8 latent instead of 64x64: the
    sin-cos position embedding is recomputed for the smaller grid. The map must depend on its input
    (a zero-initialised output layer would give a constant)."""
    net = random_denoiser("pixart")
    assert abs(sum(p.numel() for p in net.parameters()) / PUBLISHED["pixart"]["transformer"] - 1) < TOLERANCE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)  # two different latents, one forward
    y_text = torch.randn(1, 8, 4096, generator=g).expand(2, -1, -1)
    with torch.no_grad():
        out = net(x, encoder_hidden_states=y_text, timestep=torch.tensor([500.0, 500.0]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    assert out.std() > 0.1  # not a near-zero map
    assert (out[0] - out[1]).norm() > 0.1 * out[0].norm()  # different inputs, different outputs
