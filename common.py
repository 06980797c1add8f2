"""Plumbing shared by the method files: CLI, device and precision, seeding, distributed,
checkpoints, logging, model loading (real, tiny, and real-size random), pipeline export, shared metrics.

Nothing in here is a loss or a sampler of any method: those live in the method files, next
to the equations they implement. Every helper is small enough to read in one sitting.
"""
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import socket
import typing
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as torch_dist

# ==== CLI: an argparse parser generated from a dataclass. A field's help is its trailing comment:
#     lr: float = 4e-6  # learning rate (Table 11)
# Bools become --flag / --no-flag; Literal types become choices; tuples take several values.

def _field_comments(cls) -> dict:
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):  # subclasses override their parents' help
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M):
            comments[m.group(1)] = m.group(2).strip()
    return comments

def build_parser(cls):
    import argparse
    hints = typing.get_type_hints(cls)
    helps = _field_comments(cls)
    doc = (cls.__doc__ or "").strip() if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else None
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(default=default, help=helps.get(f.name, " "), dest=f.name)
        if tp is bool:
            p.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            p.add_argument(name, type=type(choices[0]), choices=choices, **kw)
        elif typing.get_origin(tp) in (tuple, list):
            p.add_argument(name, type=typing.get_args(tp)[0], nargs="+", **kw)
        else:
            p.add_argument(name, type=tp, **kw)
    return p

def parse(cls, argv=None):
    """Parse sys.argv (or `argv`) into an instance of the dataclass `cls`."""
    ns = build_parser(cls).parse_args(argv)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items()}
    return cls(**values)

# ==== Device, precision, seeding

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but torch.cuda.is_available() is False")
    return torch.device(name)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on CUDA, fp32 on CPU (bf16 autocast on CPU is slower for tiny models)."""
    return DTYPES[("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name]

def autocast(device: torch.device, dtype: torch.dtype):
    """The one place precision is chosen: autocast for half dtypes, nothing for fp32."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

def make_scaler(device: torch.device, dtype: torch.dtype):
    """A GradScaler only for fp16 (bf16 and fp32 need none). Returns None otherwise."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

def seed_everything(seed: int, rank: int = 0) -> None:
    s = seed + rank  # different data per rank, reproducible per run
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)

def set_cpu_threads(n: int = 0) -> None:
    """n > 0: use n threads. n = 0: leave torch's default (all cores) unless CPU_THREADS is set."""
    n = n or int(os.environ.get("CPU_THREADS", 0))
    if n > 0:
        torch.set_num_threads(n)

# ==== Distributed (torchrun). A plain `python file.py` gets world_size 1 and no process group.

def init_distributed(device_name: str = "auto") -> SimpleNamespace:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return SimpleNamespace(rank=rank, world_size=world, local_rank=local_rank, device=device, is_main=rank == 0)

def print0(*a, **k) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)

def wrap_ddp(model: torch.nn.Module, dist) -> torch.nn.Module:
    if dist.world_size == 1:
        return model
    ids = [dist.local_rank] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model

def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()

def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()

# ==== Checkpoints: one dict {models, optimizers, scaler, step, args, rng}, written atomically.

def _rng_state() -> dict:
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), **cuda}

def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

def save_checkpoint(path: str, models: dict, optimizers: dict, step: int, args, scaler=None, extra=None) -> None:
    """Write to `path` via a temp file and an atomic rename: a crash never leaves half a file."""
    ckpt = {"models": {k: unwrap(m).state_dict() for k, m in models.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
            "args": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args, "rng": _rng_state(), "extra": extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)

def resolve_resume(resume: str, out_dir: str) -> str | None:
    """'' -> None; 'latest' -> out_dir/ckpt.pt if it exists; otherwise the path, which must exist."""
    path = os.path.join(out_dir, "ckpt.pt") if resume == "latest" else resume
    if not resume or (resume == "latest" and not os.path.exists(path)):
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path}")
    return path

def load_checkpoint(path: str, models: dict, optimizers: dict, scaler=None, restore_rng: bool = True) -> dict:
    """Load state in place and return the checkpoint dict (its 'step' is the last finished step)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for k, m in models.items():
        unwrap(m).load_state_dict(ckpt["models"][k])
    for k, o in optimizers.items():
        o.load_state_dict(ckpt["optimizers"][k])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng:
        _set_rng_state(ckpt["rng"])
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            # the file holds rank 0's streams: derive one per rank from it (exact resume is single-process only)
            seed_everything(int(torch.randint(2**31, (1,))), torch_dist.get_rank())
    return ckpt

# ==== Logging: tqdm bar, metrics.jsonl, loss curves, image grids (rank 0 only).

class Logger:
    def __init__(self, out_dir: str, total: int, start: int = 0, enabled: bool = True, desc: str = "train"):
        from tqdm.auto import tqdm
        self.enabled, self.path = enabled, os.path.join(out_dir, "metrics.jsonl")
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            rows = self.read(self.path)  # on resume, forget what came after the checkpoint
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= start)
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True)

    @staticmethod
    def read(path: str) -> list:
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def log(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"}, refresh=False)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()

def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    return __import__("matplotlib.pyplot").pyplot

def plot_curves(jsonl_path: str, png_path: str) -> None:
    """One subplot per logged scalar against step."""
    plt = pyplot()
    rows = Logger.read(jsonl_path)
    keys = sorted({k for r in rows for k in r} - {"step"})
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

def save_grid(images: torch.Tensor, path: str, nrow: int) -> None:
    """images: (N, C, H, W) in [-1, 1], C = 1 or 3 (extra channels are dropped). Rows of `nrow`."""
    plt = pyplot()
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)[:, :3]
    n, rows = x.shape[0], math.ceil(x.shape[0] / nrow)
    fig, axes = plt.subplots(rows, nrow, figsize=(1.8 * nrow, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = x[i].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

# ==== Prompts

PROMPTS = [
    "a photo of a red fox sitting in fresh snow", "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table, studio lighting", "an astronaut riding a horse on the moon",
    "a cozy cabin in a pine forest at night, warm windows", "a close-up portrait of an old fisherman, film grain",
    "a city street in the rain with neon signs", "a vintage bicycle leaning against a yellow wall",
]

def read_prompts(path: str = "") -> list:
    """One prompt per line from `path`; the built-in list when `path` is empty."""
    if not path:
        return list(PROMPTS)
    with open(path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no non-empty lines")
    return prompts

# ==== Model loading. A family is a diffusers pipeline class plus the name of its denoiser.
# Real: DiffusionPipeline.from_pretrained(hub id or local dir). Tiny: the same pipeline class
# assembled from small configs with random weights and offline tokenizers. Random: the same class at real
# size, from the real configs in configs/ (below the tiny builders).

FAMILIES = {"sd21": ("StableDiffusionPipeline", "unet", "stabilityai/stable-diffusion-2-1-base"),
            "pixart": ("PixArtAlphaPipeline", "transformer", "PixArt-alpha/PixArt-XL-2-512x512"),
            "sana": ("SanaPipeline", "transformer", "Efficient-Large-Model/Sana_600M_512px_diffusers"),
            "sd3": ("StableDiffusion3Pipeline", "transformer", "stabilityai/stable-diffusion-3.5-medium"),
            "sdxl": ("StableDiffusionXLPipeline", "unet", "stabilityai/stable-diffusion-xl-base-1.0")}
_NO_BINNING = {"use_resolution_binning": False, "clean_caption": False}
PIPELINE_KWARGS = {"sd21": {}, "sd3": {}, "sdxl": {}, "pixart": _NO_BINNING, "sana": _NO_BINNING}  # for a stock __call__

def is_tiny(model: str) -> bool:
    return model == "tiny" or model.startswith("tiny-")

def _check_reachable(model_id: str) -> None:
    """Fail within seconds, naming the id, when a hub id is neither cached nor downloadable."""
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(model_id, "model_index.json"), str):
        return  # cached: from_pretrained will use it
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    reason = "HF_HUB_OFFLINE is set" if offline else None
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
            return
        except OSError as e:
            reason = f"the hub is unreachable ({e.__class__.__name__})"
    raise FileNotFoundError(f"Model '{model_id}' is not a local directory, not in the Hugging Face cache, and {reason}.\n"
                            f"Download it on a machine with network (huggingface-cli download {model_id} --local-dir DIR)"
                            f" and pass --model DIR, or pass --model tiny for the random-weight CPU model.")

def _check_tokenizers(pipe, model_id: str) -> None:
    """transformers returns a near-empty tokenizer (2-104 tokens) for an unreachable id. Refuse it."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is not None and len(tok) < 200:
            raise RuntimeError(f"{model_id}: {name} has only {len(tok)} tokens; the tokenizer did not load properly")

def load_pipeline(family: str, model: str, dtype: torch.dtype = torch.float32, device=None):
    """The family's diffusers pipeline, all parts in `dtype` and frozen in eval mode.

    `model`: 'tiny' / 'tiny-<family>' (small, random weights, offline), 'random' / 'random-<variant>' (real size,
    random weights, offline: see random_variant), a local directory, or a hub id.
    `device`: where the pipeline ends up; a random model is built there directly, so device='meta' gives the
    real-size architecture without memory (parameter counts, FLOP counting). Default: CPU.
    The method file copies the denoiser for its student and fake score and casts them to fp32.
    """
    import diffusers
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
    cls_name, denoiser, _ = FAMILIES[family]
    if is_tiny(model):
        with torch.random.fork_rng(devices=[]):  # the same random weights every time; caller's RNG untouched
            torch.manual_seed(0)
            pipe = TINY[family]()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    elif is_random(model):
        with _own_rng(), torch.device(device or "cpu"):
            pipe = _random_pipeline(family, random_variant(family, model))
    else:
        if not os.path.isdir(model):
            _check_reachable(model)
        try:
            pipe = getattr(diffusers, cls_name).from_pretrained(model, dtype=dtype)
        except OSError as e:
            raise FileNotFoundError(f"could not load '{model}' as a {cls_name}: {e}\nPass --model /local/dir") from e
    _check_tokenizers(pipe, model)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            if getattr(m, "dtype", dtype) != dtype:  # diffusers 0.42 loads SD3's transformer in fp32 whatever dtype says
                m.to(dtype=dtype)
            m.eval().requires_grad_(False)
    pipe.denoiser_name = denoiser
    return pipe.to(device) if device is not None and not is_random(model) else pipe

def export_pipeline(pipe, student: torch.nn.Module, out_dir: str, scheduler=None) -> str:
    """Save `pipe` with its denoiser replaced by `student` (and optionally a scheduler) so that
    `DiffusionPipeline.from_pretrained(out_dir)` loads the distilled model."""
    import copy
    components = dict(pipe.components)
    net = copy.deepcopy(unwrap(student))
    components[pipe.denoiser_name] = net.to(dtype=pipe.dtype) if net.dtype != pipe.dtype else net
    if scheduler is not None:
        components["scheduler"] = scheduler
    type(pipe)(**components).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# Tiny tokenizers: byte-level alphabets, no download. Their sizes stay above the 200-token check.

def _bytes_alphabet() -> list:
    chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [c for c in range(256) if c not in chars]
    return [chr(c) for c in chars] + [chr(256 + i) for i in range(len(extra))]

def _tiny_clip_tokenizer():
    from transformers import CLIPTokenizer
    alphabet = _bytes_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"])}
    tok = CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>")
    tok.model_max_length = 77
    return tok

def _tiny_t5_tokenizer():
    from transformers import T5Tokenizer
    chars = [chr(c) for c in list(range(33, 127)) + list(range(161, 256))]
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + chars + ["▁" + c for c in chars]
    tok = T5Tokenizer(vocab=[(p, 0.0 if i < 4 else -float(i)) for i, p in enumerate(pieces)], extra_ids=0)
    tok.model_max_length = 512
    return tok

def _tiny_gemma_tokenizer():
    from transformers import GemmaTokenizer
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {c: i for i, c in enumerate(specials + ["▁"] + _bytes_alphabet())}
    tok = GemmaTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 4096  # SANA's instruction prefix alone is ~1000 characters
    return tok

def _clip(tok, hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=2 * hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

def _t5(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id))

def _vae_kl(shift_factor=None):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=128, shift_factor=shift_factor)

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

def _tiny_unet(**extra):
    from diffusers import UNet2DConditionModel
    cfg = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
               norm_num_groups=8)
    return UNet2DConditionModel(**{**cfg, **extra})

def _tiny_sd21():
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    tok = _tiny_clip_tokenizer()
    sched = DDIMScheduler.from_config({**SD_BETAS, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                                       "prediction_type": "epsilon"})
    return StableDiffusionPipeline(vae=_vae_kl(), text_encoder=_clip(tok, 32), tokenizer=tok, unet=_tiny_unet(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

def _tiny_pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    tok = _tiny_t5_tokenizer()
    tr = PixArtTransformer2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                                  caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=24,
                                  attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    sched = DPMSolverMultistepScheduler.from_config({"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                                                     "beta_schedule": "linear", "prediction_type": "epsilon"})
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=_t5(tok), vae=_vae_kl(), transformer=tr, scheduler=sched)

def _tiny_sana():
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model
    tok = _tiny_gemma_tokenizer()
    te = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0))
    tr = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                                attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                cross_attention_dim=16, caption_channels=32, sample_size=16)
    both = lambda **kw: {f"{side}_{k}": v for k, v in kw.items() for side in ("encoder", "decoder")}
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, upsample_block_type="interpolate",
                        downsample_block_type="conv", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        **both(block_types=("ResBlock", "ResBlock", "EfficientViTBlock"), block_out_channels=(8, 16, 16),
                               layers_per_block=(1, 1, 1), qkv_multiscales=((), (), (5,))))
    sched = FlowMatchEulerDiscreteScheduler.from_config({"num_train_timesteps": 1000, "shift": 3.0})
    return SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=tr, scheduler=sched)

def _tiny_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    tok, tok3 = _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                               attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                               caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16,
                               qk_norm="rms_norm", dual_attention_layers=(0,))
    sched = FlowMatchEulerDiscreteScheduler.from_config({"num_train_timesteps": 1000, "shift": 3.0})
    return StableDiffusion3Pipeline(transformer=tr, scheduler=sched, vae=_vae_kl(shift_factor=0.0),
                                    text_encoder=_clip(tok, 16, True), tokenizer=tok, text_encoder_2=_clip(tok, 16, True),
                                    tokenizer_2=_tiny_clip_tokenizer(), text_encoder_3=_t5(tok3, 32), tokenizer_3=tok3)

def _tiny_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    tok = _tiny_clip_tokenizer()
    te, te2 = _clip(tok, 32), _clip(tok, 32, True)  # cross-attention width 32 + 32, pooled projection 64
    unet = _tiny_unet(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + te2.config.projection_dim)
    sched = EulerDiscreteScheduler.from_config({**SD_BETAS, "steps_offset": 1, "timestep_spacing": "leading",
                                                "prediction_type": "epsilon"})
    return StableDiffusionXLPipeline(vae=_vae_kl(), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=_tiny_clip_tokenizer(), unet=unet, scheduler=sched)

TINY = {"sd21": _tiny_sd21, "pixart": _tiny_pixart, "sana": _tiny_sana, "sd3": _tiny_sd3, "sdxl": _tiny_sdxl}

# Random: each family's real architecture, built from the real configs shipped as data in configs/<variant>/
# (<component>.json as on the hub; sources in configs/README.md) by diffusers' and transformers' own from-config
# initialisation. Tokenizers: the tiny offline ones above (the real ones need a download) with the real
# model_max_length; their ids (< 520) stay below every real vocabulary (CLIP 49408, T5 32128, Gemma 256000),
# so prompts encode, but into different token sequences than the real tokenizers would give.

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
RANDOM_VARIANTS = {"sd21": ("sd21",), "pixart": ("pixart",), "sana": ("sana",), "sd3": ("sd35m", "sd3m"),
                   "sdxl": ("sdxl",)}  # the first is the family's default (FAMILIES' hub id)
TEXT_MAX_LENGTH = {"pixart": 120, "sana": 300, "sd3": 256}  # T5 / Gemma lengths the pipelines use; CLIP keeps 77
_TINY_TOKENIZERS = {"CLIPTokenizer": _tiny_clip_tokenizer, "T5Tokenizer": _tiny_t5_tokenizer,
                    "GemmaTokenizer": _tiny_gemma_tokenizer}

def _own_rng():
    """Seeding inside leaves the caller's CPU and CUDA random streams as they were."""
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())))

def is_random(model: str) -> bool:
    return model == "random" or model.startswith("random-")

def random_variant(family: str, model: str) -> str:
    """The config set (a folder of configs/) that `model` names: 'random' and 'random-<family>' give the family's
    default (sd3: SD3.5-Medium, 'sd35m'); 'random-sd35m' / 'random-sd3m' choose SD3.5-Medium / SD3-Medium."""
    name = model.removeprefix("random").removeprefix("-") or family
    variants = RANDOM_VARIANTS[family]
    if name == family or name in variants:
        return variants[0] if name == family else name
    choices = ", ".join(["random", f"random-{family}"] + [f"random-{v}" for v in variants if v != family])
    raise ValueError(f"--model {model} is not a {family} model; choose one of: {choices}")

def _random_component(variant: str, component: str):
    """One component from configs/<variant>/<component>.json: diffusers classes by '_class_name', transformers
    models by 'architectures', each with its library's default initialisation."""
    import diffusers
    import transformers
    with open(os.path.join(CONFIGS, variant, component + ".json")) as f:
        cfg = json.load(f)
    torch.manual_seed(0)  # each component's weights do not depend on which were built before it
    if "_class_name" in cfg:
        cls = getattr(diffusers, cfg["_class_name"])
        if issubclass(cls, diffusers.SchedulerMixin):
            with torch.device("cpu"):  # tables, not weights: the pipeline's sampler reads them on the CPU
                return cls.from_config(cfg)
        return cls.from_config(cfg)
    cls = getattr(transformers, cfg["architectures"][0])
    return cls(cls.config_class.from_dict(cfg))

def _random_pipeline(family: str, variant: str):
    import diffusers
    cls = getattr(diffusers, FAMILIES[family][0])
    parts = {f[:-5]: _random_component(variant, f[:-5]) for f in sorted(os.listdir(os.path.join(CONFIGS, variant)))
             if f.endswith(".json")}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        kind = getattr(p.annotation, "__name__", str(p.annotation))
        if name.startswith("tokenizer"):
            parts[name] = _TINY_TOKENIZERS[kind]()
            if kind != "CLIPTokenizer":
                parts[name].model_max_length = TEXT_MAX_LENGTH[family]
        elif name not in parts and name != "self" and p.default is inspect.Parameter.empty:
            parts[name] = None  # safety checker, feature extractor: not part of the model
    if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:
        parts["requires_safety_checker"] = False  # as in SD 2.1-base's model_index.json
    return cls(**parts)

def random_denoiser(family: str, device="cpu", dtype: torch.dtype = torch.float32, model: str = "random"):
    """Only the denoiser of `load_pipeline(family, model, device=device)` for a random `model`, with the same
    weights, in train mode with gradients on. Small enough for the CPU in fp32: pixart 0.61B, sana 0.59B, sd21
    0.87B parameters (building takes ~35-60 s there: the random initialisation is one RNG stream)."""
    variant = random_variant(family, model)
    with _own_rng(), torch.device(device):
        net = _random_component(variant, FAMILIES[family][1])
    return net if net.dtype == dtype else net.to(dtype=dtype)

# ==== Prompt encoding: the pipeline's own encode_prompt, returned as keyword arguments for the
# denoiser's forward (cond, uncond), so a method file calls `model(x, timestep=t, **cond)`.

def encode(pipe, family: str, prompts: list, device, max_sequence_length: int = 0) -> tuple:
    """(cond, uncond) kwargs for the family's denoiser; uncond is the empty prompt."""
    n = len(prompts)
    with torch.no_grad():
        if family == "sd21":
            c, u = pipe.encode_prompt(prompts, device, 1, True, [""] * n)
            return {"encoder_hidden_states": c}, {"encoder_hidden_states": u}
        if family in ("pixart", "sana"):
            kw = {"max_sequence_length": max_sequence_length or (120 if family == "pixart" else 300)}
            if family == "sana":  # the stock pipeline's instruction prefix for non-empty prompts
                sig = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"]
                kw["complex_human_instruction"] = sig.default
            c, cm, u, um = pipe.encode_prompt(prompts, True, negative_prompt="", device=device, clean_caption=False, **kw)
            extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}} if family == "pixart" else {}
            return ({"encoder_hidden_states": c, "encoder_attention_mask": cm, **extra},
                    {"encoder_hidden_states": u, "encoder_attention_mask": um, **extra})
        if family == "sd3":
            c, u, cp, up = pipe.encode_prompt(prompts, None, None, device=device, negative_prompt=[""] * n,
                                              max_sequence_length=max_sequence_length or 256)
            return ({"encoder_hidden_states": c, "pooled_projections": cp},
                    {"encoder_hidden_states": u, "pooled_projections": up})
        if family == "sdxl":
            c, u, cp, up = pipe.encode_prompt(prompts, device=device, negative_prompt=None)  # stock: zeros (force_zeros...)
            res = pipe.unet.config.sample_size * pipe.vae_scale_factor
            ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=c.dtype).repeat(n, 1)
            return ({"encoder_hidden_states": c, "added_cond_kwargs": {"text_embeds": cp, "time_ids": ids}},
                    {"encoder_hidden_states": u, "added_cond_kwargs": {"text_embeds": up, "time_ids": ids}})
    raise ValueError(family)

def select(cond: dict, idx) -> dict:
    """Index (or repeat, with an index tensor) every tensor in a nested kwargs dict along dim 0."""
    return {k: select(v, idx) if isinstance(v, dict) else (v[idx] if torch.is_tensor(v) else v) for k, v in cond.items()}

def cast(cond: dict, dtype: torch.dtype) -> dict:
    """Cast the floating-point tensors of a nested kwargs dict (embeddings, not masks) to `dtype`."""
    return {k: cast(v, dtype) if isinstance(v, dict) else (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in cond.items()}

def cat(*conds: dict) -> dict:
    """Concatenate kwargs dicts of the same structure along dim 0 (e.g. to batch cond with uncond)."""
    c0 = conds[0]
    join = lambda k, v: cat(*[c[k] for c in conds]) if isinstance(v, dict) else torch.cat([c[k] for c in conds])
    return {k: join(k, v) if isinstance(v, dict) or torch.is_tensor(v) else v for k, v in c0.items()}

def latent_shape(pipe, batch: int, resolution: int = 0) -> tuple:
    """(B, C, h, w) of the denoiser's latents at `resolution` pixels (default: the model's own size)."""
    net = getattr(pipe, pipe.denoiser_name)
    side = resolution // pipe.vae_scale_factor if resolution else net.config.sample_size
    return (batch, net.config.in_channels, side, side)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] with the pipeline's VAE (scaling and shift as the pipeline does)."""
    vae = pipe.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    return vae.decode(z).sample.float()

# ==== Shared metrics

class _CheapTangents(torch.overrides.TorchFunctionMode):
    """Forward-mode AD rules for the ops where PyTorch's own rules waste work or go wrong. Active inside jvp_pair().

    - linear / conv2d: PyTorch's rule fills the frozen weight's missing tangent with zeros and multiplies it, one
      full GEMM too many (a JVP cost 3 GEMMs instead of 2). Here the tangent is one GEMM: W t_x.
    - layer_norm / group_norm: written as plain ops in fp32. PyTorch's layer_norm JVP is silently wrong under
      reverse mode (its mean/rstd carry no gradient, so back-propagating through the tangent drops d(mean)/dtheta;
      a group_norm JVP under bf16 autocast returns an fp32 tangent for a bf16 value and the next conv fails).
    Any other op keeps PyTorch's rule. Only inputs that carry a tangent are rerouted."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        F = torch.nn.functional
        if func is F.scaled_dot_product_attention and not kwargs.get("dropout_p") and not kwargs.get("is_causal"):
            if any(torch.autograd.forward_ad.unpack_dual(a).tangent is not None for a in args[:3]):
                return _plain_attention(*args, **kwargs)
        if func in (F.linear, F.conv2d, F.layer_norm, F.group_norm) and args:
            fwAD = torch.autograd.forward_ad
            p, t = fwAD.unpack_dual(args[0])
            weights = list(args[1:]) + [kwargs.get("weight"), kwargs.get("bias")]
            if t is not None and all(fwAD.unpack_dual(w).tangent is None for w in weights if torch.is_tensor(w)):
                if func in (F.linear, F.conv2d):
                    out = func(p, *args[1:], **kwargs)
                    rest, kw = list(args[2:]), dict(kwargs)  # the tangent has no bias: W t_x
                    if rest:
                        rest[0] = None
                    else:
                        kw["bias"] = None
                    return fwAD.make_dual(out, func(t, args[1], *rest, **kw).to(out.dtype))
                return _plain_norm(func, args[0], *args[1:], **kwargs)
        return func(*args, **kwargs)


def _plain_norm(func, x, shape_or_groups, weight=None, bias=None, eps=1e-5):
    """layer_norm / group_norm from plain ops in fp32 (their autograd and forward-AD rules compose correctly).
    Returns fp32 under autocast (as autocast's own norms do), else the input's dtype."""
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if func is torch.nn.functional.layer_norm:
        dims = tuple(range(-len(shape_or_groups), 0))
        mu, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        y = (x - mu) * torch.rsqrt(var + eps)
        shape = (1,) * (x.ndim - len(shape_or_groups)) + tuple(shape_or_groups)
    else:
        g = x.view(x.shape[0], shape_or_groups, -1)
        mu, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
        y = ((g - mu) * torch.rsqrt(var + eps)).view_as(x)
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    y = y * weight.to(y.dtype).view(shape) if weight is not None else y
    return (y + bias.to(y.dtype).view(shape) if bias is not None else y).to(out_dtype)


def _plain_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q k^T scale + mask) v from matmuls, with the softmax written out in fp32. The fused kernels have no
    forward-AD rule, and back-propagating through F.softmax's tangent raises an in-place error (pytorch #162350)."""
    s = (q @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32))
    s = s * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(s.dtype)
    e = torch.exp(s - s.detach().amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)).to(v.dtype) @ v


def jvp_pair(f, x: torch.Tensor, v: torch.Tensor):
    """(f(x), J_f(x) v) in one forward with forward-mode AD, in whatever precision the caller runs f (e.g. bf16
    autocast: a tangent is computed in its own right, so unlike a finite difference it does not drown in rounding).
    Costs about 2x the GEMMs of f (see _CheapTangents) and 3x its attention matmuls (written out: the flash and
    memory-efficient kernels have no forward-AD rule; the N x N scores are materialised). With grad enabled, both
    outputs are differentiable w.r.t. f's parameters (reverse over forward), and d/dtheta of a loss on J v is
    correct: tests/test_common.py checks it against a float64 numerical derivative."""
    fwAD = torch.autograd.forward_ad
    with fwAD.dual_level(), _CheapTangents():
        out = fwAD.unpack_dual(f(fwAD.make_dual(x, v.to(x.dtype))))
    return out.primal, out.tangent


def jvp(f, z: torch.Tensor, v: torch.Tensor, mode: str = "exact", h: float = 1e-3) -> torch.Tensor:
    """J_f(z) v in fp32. 'exact': forward-mode AD (jvp_pair); 'fd': the central difference
    (f(z + h v) - f(z - h v)) / 2h for maps that forward AD cannot run."""
    z, v = z.float(), v.float()
    if mode == "fd":
        return (f(z + h * v).float() - f(z - h * v).float()) / (2 * h)
    return jvp_pair(lambda x: f(x).float(), z, v)[1]

def _power_spectrum(r: torch.Tensor) -> torch.Tensor:
    """Normalised power spectrum per sample: fft2 over (H, W) summed over channels for images,
    rfft over the flattened features otherwise."""
    p = torch.fft.fft2(r).abs().pow(2).sum(1).flatten(1) if r.ndim == 4 else torch.fft.rfft(r.flatten(1)).abs().pow(2)
    return p / p.sum(1, keepdim=True).clamp_min(1e-30)

def geometry_metrics(phi_s, phi_t, z: torch.Tensor, n_dirs: int = 4, seed: int = 0, mode: str = "exact",
                     h: float = 1e-3) -> dict:
    """Geometric alignment of a student map phi_s against a teacher map phi_t at inputs z (GAD Table 1).

    For each input z_i and random direction v ~ N(0, I) (seeded), with r_S = J_S v, r_T = J_T v:
      jvp_cos          mean cos(r_S, r_T)                                  1 = same directions
      jac_norm_ratio   mean ||r_S|| / ||r_T||                              1 = same stretching
      jac_norm_ratio_top10  the same over the 10% of (z, v) with largest ||r_T|| (where shortcuts hide)
      spectral_kl      mean KL(P_T || P_S) of normalised power spectra     0 = same frequency content
      jvp_mse          mean over elements of (r_S - r_T)^2                 0 = identical JVPs
    Exact JVPs by default (forward-mode AD in fp32); mode='fd' uses central differences.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    cos, ratio, kl, mse, norm_t = [], [], [], [], []
    for _ in range(n_dirs):
        v = torch.randn(z.shape, generator=g).to(z.device)
        rs, rt = jvp(phi_s, z, v, mode, h).flatten(1), jvp(phi_t, z, v, mode, h).flatten(1)
        cos.append(torch.nn.functional.cosine_similarity(rs, rt, dim=1))
        norm_t.append(rt.norm(dim=1))
        ratio.append(rs.norm(dim=1) / norm_t[-1].clamp_min(1e-30))
        ps, pt = _power_spectrum(rs.view_as(z)), _power_spectrum(rt.view_as(z))
        kl.append((pt * (pt.clamp_min(1e-30).log() - ps.clamp_min(1e-30).log())).sum(1))
        mse.append((rs - rt).pow(2).mean(1))
    ratio, norm_t = torch.cat(ratio), torch.cat(norm_t)
    top = norm_t >= torch.quantile(norm_t, 0.9)
    return {"jvp_cos": torch.cat(cos).mean().item(), "jac_norm_ratio": ratio.mean().item(),
            "jac_norm_ratio_top10": ratio[top].mean().item(), "spectral_kl": torch.cat(kl).mean().item(),
            "jvp_mse": torch.cat(mse).mean().item()}

def diversity(features: torch.Tensor) -> float:
    """DP-DMD Eq. 9: features (P prompts, N seeds, D) -> mean over prompts of
    1 - mean pairwise cosine similarity between the N L2-normalised features (pairs i != j)."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"diversity needs features of shape (P, N >= 2, D), got {tuple(features.shape)}")
    f = torch.nn.functional.normalize(features.float().flatten(2), dim=-1)
    sim, n = f @ f.transpose(1, 2), f.shape[1]
    mean_offdiag = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))
    return (1 - mean_offdiag).mean().item()

def check_finite(step: int, **losses) -> None:
    """Stop the run, naming the step and the term, when a loss is not finite (no silent NaN handling)."""
    for k, v in losses.items():
        if not torch.isfinite(torch.as_tensor(v)).all():
            raise FloatingPointError(f"step {step}: loss term '{k}' is {v}; stopping (last checkpoint kept)")
