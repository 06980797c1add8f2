"""How much of a denoiser's saved-for-backward activations --grad-ckpt keeps, at real depth and width (CPU).

  python bench/ckpt_factor.py pixart sana

Builds the family's `--model random` denoiser, runs one forward and backward of a plain loss on a small latent (PixArt
32x32 -> 256 tokens, SANA 16x16 -> 256 tokens; batch 2; 8 text tokens) with and without diffusers'
enable_gradient_checkpointing, and reports the peak bytes saved for backward (common.SavedBytes; weights excluded).
During backward one block is recomputed at a time, so its share (1 / blocks) is added. The memory plan's --grad-ckpt
factor applies to a whole training step's activations, which also hold frozen networks' and tangents' tensors that
checkpointing does not touch, so it must be at least this figure.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

INPUTS = {"pixart": ((2, 4, 32, 32), 4096, {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}),
          "sana": ((2, 32, 16, 16), 2304, {})}


def peak_saved(net, x, kw, ckpt: bool) -> int:
    net.enable_gradient_checkpointing() if ckpt else net.disable_gradient_checkpointing()
    saved = common.SavedBytes(net)
    with saved:
        loss = net(x, timestep=torch.tensor([500] * len(x)), return_dict=False, **kw)[0].float().pow(2).mean()
    loss.backward()
    net.zero_grad(set_to_none=True)
    return saved.peak


def main(families: list) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    for family in families:
        shape, width, extra = INPUTS[family]
        net, g = common.random_denoiser(family).train(), torch.Generator().manual_seed(0)
        kw = dict(encoder_hidden_states=torch.randn(shape[0], 8, width, generator=g) * 0.1,
                  encoder_attention_mask=torch.ones(shape[0], 8), **extra)
        x = torch.randn(shape, generator=g)
        plain, ckpt = peak_saved(net, x, kw, False), peak_saved(net, x, kw, True)
        blocks = len(net.transformer_blocks)
        print(f"{family}: saved for backward {plain / 2**20:.1f} MiB plain, {ckpt / 2**20:.1f} MiB checkpointed; "
              f"{blocks} blocks: factor {ckpt / plain:.3f} + {1 / blocks:.3f} (one block recomputed) = "
              f"{ckpt / plain + 1 / blocks:.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["pixart", "sana"])
