"""Checks that need several processes, run by tests/test_distributed.py in ONE torchrun launch of 2 CPU processes
(gloo), so the process start is paid once. Rank 0 writes OUT/results.json; the test asserts on it.

  1. FSDP2 (common.wrap) = one process on the same global batch: losses and weights after two SGD-momentum steps.
  2. Forward-mode JVP (common.jvp_pair, no grad: GAD's teacher and fake responses) through an FSDP2 network.
  3. Save (gathered, rank 0 writes) -> load into fresh sharded (CPU-offloaded) models -> the same next step; the file
     holds full weights that a plain model loads.
  4. gad_tdm.py end to end with --fsdp --grad-ckpt (sharded student, fake and teacher; checkpoint; gathered export),
     then with DDP (--gad-path response, the no_sync path), both with --grad-accum 2.
  5. gad_sid.py with --fsdp --grad-ckpt --gad-path response --gad-jvp fd.
"""
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import gad_sid  # noqa: E402
import gad_tdm  # noqa: E402

OUT, T0 = sys.argv[1], time.perf_counter()
dist = common.init_distributed("cpu")
cleanup, common.cleanup = common.cleanup, lambda: None  # one process group for the launch: train() ends by destroying
# it, and re-creating one under torchrun can hang (a rank may join a stale group); destroyed once, at the end
rank, W = dist.rank, dist.world_size
torch.manual_seed(0)
pipe = common.load_pipeline("pixart", "tiny")
cond = common.cast(common.encode(pipe, "pixart", ["a red fox", "a blue car"] * 2, "cpu")[0], torch.float32)
g = torch.Generator().manual_seed(1)
N = 2 * W  # global batch: 2 per process
x, v, y = (torch.randn(N, 4, 16, 16, generator=g) for _ in range(3))
tau = torch.tensor([800, 600, 400, 200])
mine = torch.arange(N)[rank * 2:(rank + 1) * 2]
f = lambda net, idx: (lambda z: net(z, timestep=tau[idx], **common.select(cond, idx), return_dict=False)[0][:, :4])


def step(net, opt, idx):
    loss = (f(net, idx)(x[idx]) - y[idx]).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def sgd(net):  # with state (momentum buffers) to save and restore; updates linear in the gradient: tight tolerances
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


base = copy.deepcopy(pipe.transformer).requires_grad_(True).train()
res = {}
# 1. one process, whole batch, vs FSDP2 over W processes
ref = copy.deepcopy(base)
opt_ref = sgd(ref)
ref_losses = [step(ref, opt_ref, torch.arange(N)).item() for _ in range(2)]
net = common.wrap(copy.deepcopy(base), dist, fsdp=True)
opt = sgd(net)
losses = []
for _ in range(2):
    loss = step(net, opt, mine)
    torch.distributed.all_reduce(loss)
    losses.append(loss.item() / W)
full = common.full_state_dict(net)  # gathered on rank 0 (the others get nothing)
res["loss_single"], res["loss_fsdp"] = ref_losses, losses
if rank == 0:
    res["weights_max_diff"] = max((full[k] - p).abs().max().item() for k, p in ref.state_dict().items())
    res["weights_moved"] = max((full[k] - p).abs().max().item() for k, p in base.state_dict().items())
res["sharded"] = [type(p).__name__ for p in net.parameters()][:1] + [common.is_sharded(net)]

# 2. a frozen FSDP2 network's forward-mode JVP (no grad), against the plain network's
teacher = common.wrap(copy.deepcopy(base).requires_grad_(False), dist, fsdp=True)
with torch.no_grad():
    p1, t1 = common.jvp_pair(f(teacher, mine), x[mine], v[mine])
    p0, t0 = common.jvp_pair(f(base, mine), x[mine], v[mine])
res["jvp_rel_err"] = ((t1 - t0).norm() / t0.norm()).item()
res["jvp_primal_max_diff"] = (p1 - p0).abs().max().item()

# 3. save after the two steps above, resume into fresh sharded models (CPU-offloaded), compare the next step
path = os.path.join(OUT, "ckpt.pt")
common.save_checkpoint(path, {"net": net}, {"opt": opt}, 2, {"note": "distributed_checks"})
common.barrier()
net2 = common.wrap(copy.deepcopy(base), dist, fsdp=True, offload=True)
opt2 = sgd(net2)
common.load_checkpoint(path, {"net": net2}, {"opt": opt2}, restore_rng=False)
res["loss_continued"], res["loss_resumed"] = step(net, opt, mine).item(), step(net2, opt2, mine).item()
a, b = common.full_state_dict(net), common.full_state_dict(net2)
if rank == 0:
    res["resume_weights_max_diff"] = max((a[k] - b[k]).abs().max().item() for k in a)
    plain = copy.deepcopy(base)
    saved = common.read_checkpoint(path)
    plain.load_state_dict(saved["models"]["net"])  # full weights, the plain format
    res["file_vs_gathered_max_diff"] = max((plain.state_dict()[k] - full[k]).abs().max().item() for k in full)
    res["file_optimizer_keys"] = sorted(saved["optimizers"]["opt"])

res["t_checks"] = time.perf_counter() - T0
# 4. the real file: sharded, then DDP
TINY = dict(model="tiny", steps=2, batch_size=1, grad_accum=2, device="cpu", sample_every=1000, eval_teacher_steps=2,
            lr_warmup=0)  # 2 micro-batches: FSDP2's and DDP's no-sync paths; no warm-up: step 1 moves the student
run = os.path.join(OUT, "fsdp")
res["fsdp_run"] = gad_tdm.train(gad_tdm.Args(**TINY, out=run, fsdp=True, grad_ckpt=True))
if rank == 0:
    from diffusers import PixArtTransformer2DModel

    exported = PixArtTransformer2DModel.from_pretrained(os.path.join(run, "pipeline"), subfolder="transformer")
    student = common.read_checkpoint(os.path.join(run, "ckpt.pt"))["models"]["student"]
    res["export_vs_ckpt_max_diff"] = max((exported.state_dict()[k] - student[k]).abs().max().item() for k in student)
    res["fsdp_rows"] = common.Logger.read(os.path.join(run, "metrics.jsonl"))
res["t_fsdp_run"] = time.perf_counter() - T0
res["ddp_run"] = gad_tdm.train(gad_tdm.Args(**TINY, out=os.path.join(OUT, "ddp"), gad_path="response"))
# 5. gad_sid.py sharded, with the fd response path (a second student forward with grad) and a per-step rollout length
# that must agree across ranks (common.same_on_all_ranks)
sid_out = os.path.join(OUT, "sid")
res["sid_run"] = gad_sid.train(gad_sid.Args(model="tiny", steps=2, batch_size=2, sample_every=0, ckpt_every=100,
                                            log_every=1, out=sid_out, device="cpu", export=False, fsdp=True,
                                            grad_ckpt=True, gad_path="response", gad_jvp="fd"))
if rank == 0:
    res["t_ddp_sid_runs"] = time.perf_counter() - T0
    res["sid_rows"] = common.Logger.read(os.path.join(sid_out, "metrics.jsonl"))
    res["ddp_rows"] = common.Logger.read(os.path.join(OUT, "ddp", "metrics.jsonl"))
    res["ddp_pipeline"] = os.path.exists(os.path.join(OUT, "ddp", "pipeline", "model_index.json"))
    with open(os.path.join(OUT, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
cleanup()
