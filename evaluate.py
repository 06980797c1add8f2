"""Evaluate text-to-image models the way GAD, DP-DMD and ADM report them; the metrics every file's --eval uses.

Every model in --models (our exports, their teachers, anyone's released distilled pipeline) samples the same prompts
with the same N seeds per prompt: seed s gives the same initial noise to every model of the same latent shape, so
images can be compared side by side and the geometry metrics compare two maps at the same z.

Metric map (name in metrics.json: what it reproduces; implementation; feature model):
  clip_score   GAD Table 3 and Tables 7-9, ADM Tables 1-3: 100 * max(cos(image, text), 0) (Hessel et al., 2021),
               mean over images; transformers CLIPModel projections of --clip-model -> clip_score()
  pickscore    GAD Table 3, DP-DMD, ADM: logit_scale.exp() * cos(image, text) of PickScore_v1 (a CLIPModel, Kirstain
               et al., 2023) with the CLIP-ViT-H-14 processor (the PickScore model card's pairing) -> pickscore()
  vendi        GAD Tables 7-9: exp(entropy of the eigenvalues of K / n), K the cosine kernel of the --clip-model
               image embeddings of one prompt's N seeds, mean over prompts -> vendi()
  lpips        GAD App. A (4 images per prompt), ADM Table 6 (4 seeds, PartiPrompts): mean LPIPS over the pairs of
               one prompt's images, mean over prompts; torchmetrics' LPIPS (--lpips-net) -> intra_prompt_mean()
  div_dino, div_clip   DP-DMD Eq. 9: 1 - mean pairwise cosine of one prompt's N images (N = 16 standalone), mean over
               prompts; DINOv3 ViT-L/16 pooler output and CLIP ViT-L/14 CLS before projection, as the authors' code
               -> diversity(), eq9_features()
  fid_ref      GAD Table 12 "vs COCO-30k", ADM: torchmetrics FrechetInceptionDistance against the --fid-ref folder
  fid_teacher  GAD Table 12 "vs teacher": the same, against the --teacher model's samples
  jvp_cos, jac_norm_ratio, jac_norm_ratio_top10, spectral_kl, jvp_mse   GAD Table 1 -> geometry_metrics(), on the
               maps z -> latent that the two pipelines' own __call__ define (latents=z, output_type='latent'), with
               forward-mode JVPs (common.jvp): exact, never a finite difference in half precision
Not here: seed identifiability (GAD Table 2: gad_ladd.py --eval), ImageReward, HPSv2, MPS, YOLO AP (no
transformers implementation; a user runs their own packages on the saved contact sheets' models).

Deviations:
  - CLIP score model: the papers do not name it; default openai/clip-vit-large-patch14 (--clip-model).  # DEVIATION
  - Vendi on CLIP image embeddings with a cosine kernel: GAD does not say which features.  # DEVIATION
  - by-hand Vendi (one line, eigvalsh): the vendi_score package imports scikit-learn (~5 s) for the same formula.

Outputs in --out: metrics.json, metrics.md (models as rows, metrics as columns: paste it beside the paper's table),
sheet_<model>.png (the first 4 prompts x up to 8 seeds).

Commands (one per paper table: README "Evaluate"):
  python evaluate.py --models student=runs/gad_tdm/pipeline teacher=PixArt-alpha/PixArt-XL-2-512x512@num_inference_steps=20 \
      --teacher teacher --prompts coco_captions.jsonl:caption --metrics clip_score pickscore --seeds 1
  CPU smoke run: python evaluate.py --models a=tiny-sd21 b=tiny-sd21@num_inference_steps=2 --teacher a \
      --metrics clip_score vendi div_clip fid_teacher jvp_cos --clip-model tiny --eq9-clip-model tiny \
      --fid-features tiny --num-prompts 4 --seeds 2 --out runs/eval_tiny
"""
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Literal

import torch

import common

GEOMETRY = ("jvp_cos", "jac_norm_ratio", "jac_norm_ratio_top10", "spectral_kl", "jvp_mse")
METRICS = ("clip_score", "pickscore", "vendi", "lpips", "div_dino", "div_clip", "fid_ref", "fid_teacher") + GEOMETRY


@dataclass
class Args:
    models: tuple[str, ...] = ("tiny-sd21",)  # NAME=PIPELINE[@KEY=VALUE,...]: dir, hub id, tiny-<family>; @: __call__ args
    teacher: str = ""  # NAME of the --models entry that fid_teacher and the geometry metrics compare against
    metrics: tuple[str, ...] = ("clip_score", "pickscore")  # any of METRICS (see the docstring)
    prompts: str = ""  # prompt set (common.PROMPTS_SYNTAX); '' = the 8 built-in prompts, tiny models only
    num_prompts: int = 1000  # the first N prompts of --prompts (GAD Table 3: 1,000 COCO prompts)
    seeds: int = 4  # images per prompt, seeds --seed .. --seed+N-1 (GAD App. A and ADM Table 6: 4; DP-DMD: 16)
    seed: int = 0  # first seed
    batch_size: int = 8  # images per pipeline call
    clip_model: str = "openai/clip-vit-large-patch14"  # clip_score and vendi features ('tiny' = configs/eval_tiny)
    pickscore_model: str = "yuvalkirstain/PickScore_v1"  # pickscore weights (a CLIPModel)
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # pickscore's processor (PickScore model card)
    dino_model: str = "facebook/dinov3-vitl16-pretrain-lvd1689m"  # div_dino features: pooler output (DP-DMD Sec. 5)
    eq9_clip_model: str = "openai/clip-vit-large-patch14"  # div_clip features: CLS before projection (DP-DMD Sec. 5)
    fid_ref: str = ""  # folder of reference images for fid_ref (e.g. 30k MS-COCO images)
    fid_features: str = "inception"  # 'inception' (torch-fidelity's FID Inception-v3) or a transformers vision model id
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"  # LPIPS backbone (torchmetrics; needs torchvision)
    geometry_prompts: int = 2  # prompts (one seed each) at which the geometry metrics take JVPs
    geometry_dirs: int = 2  # random directions v per input (GAD Table 1)
    out: str = "runs/evaluate"  # output directory
    overwrite: bool = False  # allow writing into a non-empty --out
    device: str = "auto"  # cuda / cpu / auto
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"  # pipeline dtype; JVPs are forward-mode in it (exact)
    threads: int = 0  # CPU threads (0 = torch default)


RANGES = {"num_prompts": ">= 1", "geometry_prompts": ">= 1", "geometry_dirs": ">= 1"}

# ==== The metrics: pure functions on tensors


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """100 * max(cos(image_i, text_i), 0), mean over pairs (CLIPScore, Hessel et al. 2021; torchmetrics' convention)."""
    cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return (100 * cos.clamp_min(0)).mean().item()


def pickscore(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> float:
    """PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(image_i, text_i), mean over pairs."""
    cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return (logit_scale.float().exp() * cos).mean().item()


def vendi(features: torch.Tensor) -> float:
    """Vendi score (Friedman & Dieng 2023) of n items: exp(-sum_i l_i log l_i), l the eigenvalues of K / n, K the
    cosine-similarity kernel. n identical items give 1, n orthogonal items give n."""
    f = torch.nn.functional.normalize(features.double().flatten(1), dim=-1)
    lam = torch.linalg.eigvalsh(f @ f.T / f.shape[0]).clamp_min(0)
    lam = lam[lam > 1e-12]
    return torch.exp(-(lam * lam.log()).sum()).item()


def diversity(features: torch.Tensor) -> float:
    """DP-DMD Eq. 9: features (P prompts, N seeds, D) -> mean over prompts of
    1 - mean pairwise cosine similarity between the N L2-normalised features (pairs i != j)."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"diversity needs features of shape (P, N >= 2, D), got {tuple(features.shape)}")
    f = torch.nn.functional.normalize(features.float().flatten(2), dim=-1)
    sim, n = f @ f.transpose(1, 2), f.shape[1]
    mean_offdiag = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))
    return (1 - mean_offdiag).mean().item()


def intra_prompt_mean(images: torch.Tensor, distance) -> torch.Tensor:
    """images (P, N, ...) -> (P,) mean of distance(a, b) over the N (N - 1) / 2 pairs within each prompt (intra-prompt
    LPIPS, GAD App. A; ADM Table 6). `distance` maps two batches to one value per pair."""
    P, N = images.shape[:2]
    i, j = torch.triu_indices(N, N, offset=1)
    return torch.stack([distance(images[p, i], images[p, j]).float().mean() for p in range(P)])


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
    Exact JVPs by default (forward-mode AD, common.jvp, in fp32); mode='fd' uses central differences in fp32.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    cos, ratio, kl, mse, norm_t = [], [], [], [], []
    for _ in range(n_dirs):
        v = torch.randn(z.shape, generator=g).to(z.device)
        rs, rt = common.jvp(phi_s, z, v, mode, h).flatten(1), common.jvp(phi_t, z, v, mode, h).flatten(1)
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


# ==== Feature models (transformers), by hub id, local directory, or 'tiny' (random weights from configs/eval_tiny)

TINY_CONFIGS = os.path.join(common.CONFIGS, "eval_tiny")


def check_features(model_id: str, flag: str, processor: str = "") -> None:
    """Before anything loads: 'tiny', or a local dir / cached or reachable hub id (common.check_model's rules)."""
    if model_id != "tiny":
        common.check_model(model_id, flag=flag)
        if processor:
            common.check_model(processor, flag=flag.replace("model", "processor"))


def load_features(model_id: str, device, processor: str = "", kind: str = "clip") -> tuple:
    """(model, processor) in eval mode, by transformers' Auto classes. 'tiny' builds configs/eval_tiny/<kind>.json
    ('clip': a CLIPModel with the tiny offline tokenizer; 'dino': a DINOv3 ViT) with random weights."""
    import transformers
    if model_id == "tiny":
        with open(os.path.join(TINY_CONFIGS, f"{kind}.json")) as f, open(os.path.join(TINY_CONFIGS, "image_processor.json")) as g:
            cfg, proc_cfg = json.load(f), json.load(g)
        cls = getattr(transformers, cfg["architectures"][0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls(cls.config_class.from_dict(cfg))
        image_proc = getattr(transformers, proc_cfg.pop("image_processor_type"))(**proc_cfg)
        proc = (transformers.CLIPProcessor(image_processor=image_proc, tokenizer=common._tiny_clip_tokenizer())
                if kind == "clip" else image_proc)
    else:
        model = transformers.AutoModel.from_pretrained(model_id)
        proc = transformers.AutoProcessor.from_pretrained(processor or model_id)  # an image processor for a DINO
    return model.to(device).eval().requires_grad_(False), proc


@torch.no_grad()
def image_embeddings(feat: tuple, images: torch.Tensor, kind: str = "projected") -> torch.Tensor:
    """images (n, 3, H, W) in [0, 1] -> (n, D). kind 'projected': a CLIP's image embedding (CLIP score, PickScore);
    'eq9': DP-DMD's features: a CLIP's CLS before projection, any other model's pooler output (DINO)."""
    model, proc = feat
    uint8 = list((images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    image_proc = getattr(proc, "image_processor", proc)
    px = image_proc(images=uint8, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    if hasattr(model, "vision_model"):  # CLIPModel
        cls = model.vision_model(pixel_values=px).pooler_output
        return (model.visual_projection(cls) if kind == "projected" else cls).float()
    return model(pixel_values=px).pooler_output.float()


@torch.no_grad()
def text_embeddings(feat: tuple, texts: list) -> torch.Tensor:
    model, proc = feat
    tok = proc.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(model.device)
    return model.text_projection(model.text_model(**tok).pooler_output).float()


def latent_features(pipe, latents: torch.Tensor, feat) -> torch.Tensor:
    """Eq. 9 features of latents for a training file's --eval: the raw latents when feat is None, else the
    eq9 embedding of the decoded images."""
    if feat is None:
        return latents.flatten(1).float()
    return image_embeddings(feat, (common.decode(pipe, latents) + 1) / 2, kind="eq9")


class _EmbeddingFeatures(torch.nn.Module):
    """A transformers vision model as torchmetrics' FID feature extractor (float images in [0, 1])."""

    def __init__(self, feat):
        super().__init__()
        self.model, self.proc = feat
        self.num_features = image_embeddings(feat, torch.rand(1, 3, 32, 32), "eq9").shape[-1]

    def forward(self, x):
        return image_embeddings((self.model, self.proc), x, "eq9")


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception-v3 (TF port)


def make_fid(features: str, device):
    """torchmetrics FrechetInceptionDistance on float images in [0, 1]; its reference ('real') side is kept across
    reset() so one reference serves every model."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    if features != "inception":
        extractor = _EmbeddingFeatures(load_features(features, device, kind="dino" if features == "tiny" else "clip"))
        return FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False).to(device)
    return FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False).to(device)


def check_inception() -> None:
    """FID Inception-v3 needs torch-fidelity and its weights file (downloaded into torch's hub cache on first use)."""
    import importlib.util
    if importlib.util.find_spec("torch_fidelity") is None:
        raise common.UsageError("argument --fid-features inception: needs torch-fidelity (pip install torch-fidelity), "
                                "or pass --fid-features MODEL (a transformers vision model's embedding)")
    path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if not os.path.isfile(path) and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise common.UsageError(f"argument --fid-features inception: offline and {path} is missing; copy "
                                f"{INCEPTION_FILE} (torch-fidelity's release file) there from a machine with network")


def make_lpips(net: str, device):
    """torchmetrics' LPIPS (Zhang et al. 2018) on images in [0, 1]; one value per pair (reduction='none' is not
    offered, so one call per pair)."""
    import importlib.util
    if importlib.util.find_spec("torchvision") is None:
        raise common.UsageError("lpips: torchmetrics' LPIPS needs torchvision (pip install torchvision matching torch)")
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).to(device)
    return lambda a, b: torch.stack([metric(a[k:k + 1], b[k:k + 1]) for k in range(a.shape[0])])


# ==== Models to compare

def parse_model(spec: str) -> tuple:
    """'NAME=PIPELINE@k=v,k=v' -> (name, pipeline, call kwargs). Values are JSON (4, 0.0, [999, 500]) or strings."""
    m = re.fullmatch(r"(?:(?P<name>[\w.-]+)=)?(?P<path>[^@]+)(?:@(?P<call>.+))?", spec)
    if m is None:
        raise common.UsageError(f"argument --models: cannot parse {spec!r} (NAME=PIPELINE@key=value,...)")
    call = {}
    for item in re.split(r",(?=\w+=)", m["call"] or ""):
        if item:
            k, _, v = item.partition("=")
            try:
                call[k] = json.loads(v)
            except json.JSONDecodeError:
                call[k] = v
    path = m["path"]
    return m["name"] or os.path.basename(path.rstrip("/")) or path, path, call


def load_model(path: str, dtype, device):
    """A diffusers pipeline (tiny-<family>, local dir or hub id) and its call defaults: the family's stock-call
    kwargs, then the export's call.json if it has one."""
    import diffusers
    if common.is_tiny(path):
        family = path.split("-", 1)[1] if "-" in path else "sd21"
        pipe = common.load_pipeline(family, "tiny", dtype)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, dtype=dtype)
    pipe.denoiser_name = "transformer" if hasattr(pipe, "transformer") else "unet"
    family = next((k for k, v in common.FAMILIES.items() if v[0] == type(pipe).__name__), None)
    call = dict(common.PIPELINE_KWARGS.get(family, {}))
    if os.path.isfile(os.path.join(path, "call.json")):
        with open(os.path.join(path, "call.json")) as f:
            call.update(json.load(f))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), call


def noise(pipe, seed: int) -> torch.Tensor:
    """The initial noise of seed `seed`: the same tensor for every model with the same latent shape."""
    return torch.randn(common.latent_shape(pipe, 1)[1:], generator=torch.Generator().manual_seed(seed))


def pipeline_map(pipe, prompts: list, call: dict, seed: int = 0):
    """z -> the latent the pipeline's own __call__ returns from latents=z (a fixed generator for any noise its
    sampler injects), in fp32: the map GAD Table 1 compares."""
    def phi(z):
        gen = torch.Generator(z.device).manual_seed(seed)
        return pipe(prompt=prompts, latents=z.to(pipe.dtype), output_type="latent", generator=gen, **call).images.float()
    return phi


# ==== Evaluation


def evaluate(args: Args) -> dict:
    # run contract: flags, --out, prompts and every model id, before any model loads
    common.start_run(args, RANGES, writes=True)
    specs = [parse_model(s) for s in args.models]
    names = [n for n, _, _ in specs]
    common.require(len(set(names)) == len(names), f"argument --models: names repeat ({names}); name them NAME=PIPELINE")
    unknown = sorted(set(args.metrics) - set(METRICS))
    common.require(not unknown, f"argument --metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
    wants = lambda *ms: any(m in args.metrics for m in ms)  # noqa: E731
    common.require(not wants("fid_teacher", *GEOMETRY) or args.teacher in names,
                   f"argument --teacher: fid_teacher and the geometry metrics need --teacher, one of {names}")
    common.require(not wants("lpips", "div_dino", "div_clip") or args.seeds >= 2,
                   "argument --seeds: lpips and DP-DMD Eq. 9 compare images of one prompt: need --seeds >= 2")
    common.require(not wants("fid_ref") or os.path.isdir(args.fid_ref), "argument --fid-ref: fid_ref needs a folder of images")
    common.check_prompt_source(args.prompts, [p for _, p, _ in specs])
    for _, path, _ in specs:
        if os.path.isdir(path) or common.is_tiny(path):
            common.require(common.is_tiny(path) or os.path.isfile(os.path.join(path, "model_index.json")),
                           f"argument --models: {path} has no model_index.json: not a diffusers pipeline")
        elif not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
            raise common.UsageError(f"argument --models: no such directory: {path}")
        else:
            try:
                common._check_reachable(path, "model_index.json", "--models")
            except FileNotFoundError as e:
                raise common.UsageError(f"argument --models: {e}") from None
    if wants("clip_score", "vendi"):
        check_features(args.clip_model, "--clip-model")
    if wants("pickscore"):
        check_features(args.pickscore_model, "--pickscore-model", args.pickscore_processor)
    if wants("div_dino"):
        check_features(args.dino_model, "--dino-model")
    if wants("div_clip"):
        check_features(args.eq9_clip_model, "--eq9-clip-model")
    if wants("fid_ref", "fid_teacher"):
        check_inception() if args.fid_features == "inception" else check_features(args.fid_features, "--fid-features")
    prompts = common.read_prompts(args.prompts)[:args.num_prompts]
    device = common.pick_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    common.set_cpu_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    # feature models, each loaded once
    feats = {}
    if wants("clip_score", "vendi"):
        feats["clip"] = load_features(args.clip_model, device)
    if wants("pickscore"):
        feats["pick"] = load_features(args.pickscore_model, device, args.pickscore_processor)
    if wants("div_dino"):
        feats["dino"] = load_features(args.dino_model, device, kind="dino")
    if wants("div_clip"):
        feats["eq9_clip"] = load_features(args.eq9_clip_model, device)
    lpips = make_lpips(args.lpips_net, device) if wants("lpips") else None
    fid_ref = fid_teacher = None
    if wants("fid_ref"):
        fid_ref = make_fid(args.fid_features, device)
        _update_from_folder(fid_ref, args.fid_ref, device)
    if wants("fid_teacher"):
        fid_teacher = make_fid(args.fid_features, device)

    # every model: same prompts, same seeds; the teacher first (its samples are the reference of fid_teacher)
    N, seeds = args.seeds, [args.seed + s for s in range(args.seeds)]
    per_call = max(1, args.batch_size // N)  # prompts per pipeline call (all N seeds of a prompt in one call)
    results, teacher_pipe = {}, None
    for name, path, call in sorted(specs, key=lambda s: s[0] != args.teacher):
        pipe, defaults = load_model(path, dtype, device)
        call = {**defaults, **call}
        cols, emb, sheet = {}, {k: [] for k in feats}, []
        text = {k: text_embeddings(feats[k], prompts).cpu() for k in ("clip", "pick") if k in feats}
        lp = []
        for i in range(0, len(prompts), per_call):
            ps = prompts[i:i + per_call]
            z = torch.stack([noise(pipe, s) for s in seeds]).repeat(len(ps), 1, 1, 1).to(device, pipe.dtype)
            with torch.no_grad():
                x = pipe(prompt=[p for p in ps for _ in seeds], latents=z, output_type="pt",
                         generator=torch.Generator(device).manual_seed(args.seed), **call).images.float().clamp(0, 1)
            for k in feats:
                emb[k].append(image_embeddings(feats[k], x, "eq9" if k in ("dino", "eq9_clip") else "projected").cpu())
            if lpips is not None:
                lp.append(intra_prompt_mean(x.view(len(ps), N, *x.shape[1:]), lpips).cpu())
            for fid, real in ((fid_ref, False), (fid_teacher, name == args.teacher)):
                if fid is not None:
                    fid.update(x, real=real)
            if len(sheet) < 4:  # contact sheet: the first 4 prompts x up to 8 seeds
                sheet += list(x.view(len(ps), N, *x.shape[1:])[:4 - len(sheet), :8].cpu())
        emb = {k: torch.cat(v) for k, v in emb.items()}
        rep = lambda t: t.repeat_interleave(N, 0)  # noqa: E731  one text embedding per image
        if wants("clip_score"):
            cols["clip_score"] = clip_score(emb["clip"], rep(text["clip"]))
        if wants("pickscore"):
            cols["pickscore"] = pickscore(emb["pick"], rep(text["pick"]), feats["pick"][0].logit_scale.cpu())
        if wants("vendi"):
            cols["vendi"] = sum(vendi(f) for f in emb["clip"].view(len(prompts), N, -1)) / len(prompts)
        if lpips is not None:
            cols["lpips"] = torch.cat(lp).mean().item()
        if wants("div_dino"):
            cols["div_dino"] = diversity(emb["dino"].view(len(prompts), N, -1))
        if wants("div_clip"):
            cols["div_clip"] = diversity(emb["eq9_clip"].view(len(prompts), N, -1))
        if fid_ref is not None:
            cols["fid_ref"] = fid_ref.compute().item()
            fid_ref.reset()
        if fid_teacher is not None and name != args.teacher:
            cols["fid_teacher"] = fid_teacher.compute().item()
            fid_teacher.reset()
        if wants(*GEOMETRY) and name == args.teacher:
            teacher_pipe = (pipe, call)
        elif wants(*GEOMETRY):
            cols.update(_geometry(pipe, call, *teacher_pipe, prompts, args))
        results[name] = cols
        common.save_grid(torch.stack(sheet).flatten(0, 1) * 2 - 1, os.path.join(args.out, f"sheet_{name}.png"),
                         nrow=min(N, 8))
        common.print0(name, " ".join(f"{k}={v:.4g}" for k, v in cols.items()))
        if name != args.teacher:
            del pipe

    # outputs: metrics.json and a markdown table (models as rows, metrics as columns)
    order = [n for n in names if n in results]
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"models": {n: results[n] for n in order}, "settings": dataclasses.asdict(args),
                   "num_prompts": len(prompts)}, f, indent=2)
    cols = [m for m in METRICS if any(m in r for r in results.values())]
    rows = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows += [f"| {n} | " + " | ".join(f"{results[n][c]:.4g}" if c in results[n] else "-" for c in cols) + " |"
             for n in order]
    with open(os.path.join(args.out, "metrics.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    common.print0("\n".join(rows))
    return {n: results[n] for n in order}


def _geometry(pipe, call, teacher, teacher_call, prompts, args) -> dict:
    """GAD Table 1 between this model's and the teacher's z -> latent maps at the first --geometry-prompts prompts."""
    shape = common.latent_shape(pipe, 1)
    common.require(shape == common.latent_shape(teacher, 1),
                   f"geometry metrics need one latent space: {shape} vs the teacher's {common.latent_shape(teacher, 1)}")
    ps = prompts[:args.geometry_prompts]
    z = torch.stack([noise(pipe, args.seed + k) for k in range(len(ps))]).to(pipe.device, torch.float32)
    return geometry_metrics(pipeline_map(pipe, ps, call), pipeline_map(teacher, ps, teacher_call), z,
                            n_dirs=args.geometry_dirs, seed=args.seed)


def _update_from_folder(fid, folder: str, device) -> None:
    """The reference side of FID: every image file in `folder` (PIL), one at a time (sizes may differ)."""
    import numpy as np
    from PIL import Image
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    common.require(len(files) >= 2, f"argument --fid-ref: {folder} holds {len(files)} images; FID needs >= 2")
    for f in files:
        img = np.asarray(Image.open(os.path.join(folder, f)).convert("RGB"), dtype=np.float32) / 255
        fid.update(torch.from_numpy(img).permute(2, 0, 1)[None].to(device), real=True)


if __name__ == "__main__":
    common.main(Args, evaluate)
