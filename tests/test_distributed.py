"""Two CPU processes (gloo) in ONE torchrun launch of tests/distributed_checks.py: FSDP2 against one process on the
same global batch, a JVP through a sharded network, gathered save -> sharded (offloaded) resume, and gad_tdm.py
under --fsdp --grad-ckpt and under DDP, gad_sid.py under --fsdp. Also the refusals that need no launch."""
import importlib
import json
import os
import subprocess
import sys

import pytest

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CPU_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           os.path.join(ROOT, "tests", "distributed_checks.py"), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(out / "results.json") as f:
        return json.load(f)


def test_fsdp2_two_processes_equal_one_process_on_the_same_global_batch(results):
    assert results["sharded"] == ["DTensor", True]  # really sharded, not replicated
    assert results["loss_fsdp"] == pytest.approx(results["loss_single"], rel=1e-6)
    assert results["loss_fsdp"][1] < results["loss_fsdp"][0]  # the second loss comes after a real update
    assert results["weights_max_diff"] < 1e-4 * results["weights_moved"]


def test_forward_mode_jvp_through_a_sharded_frozen_network(results):
    assert results["jvp_rel_err"] < 1e-6 and results["jvp_primal_max_diff"] < 1e-6


def test_gathered_checkpoint_resumes_into_sharded_offloaded_models(results):
    assert results["loss_resumed"] == results["loss_continued"] and results["resume_weights_max_diff"] == 0
    assert results["file_vs_gathered_max_diff"] == 0  # full weights in the plain format
    assert results["file_optimizer_keys"] == ["param_groups", "state"]


def test_gad_tdm_sharded_and_ddp_runs_checkpoint_and_export(results):
    fsdp, ddp = results["fsdp_rows"], results["ddp_rows"]
    assert [r["step"] for r in fsdp] == [1, 2] and [r["step"] for r in ddp] == [1, 2] and results["ddp_pipeline"]
    assert results["export_vs_ckpt_max_diff"] == 0  # the exported student is the gathered one
    # step 1's losses come before the generator's first update, so the sharded (xtau) and the DDP (response) runs agree
    for k in ("loss_fake", "loss_tdm", "gad_mismatch"):
        assert fsdp[0][k] == pytest.approx(ddp[0][k], rel=1e-5) and fsdp[0][k] > 0, k
    assert fsdp[1]["loss_fake"] != pytest.approx(ddp[1]["loss_fake"], rel=1e-7)  # and then the two routes differ


def test_gad_sid_sharded_with_the_fd_response_path(results):
    rows = results["sid_rows"]
    assert [r["step"] for r in rows] == [1, 2], rows
    assert rows[0]["gad_gap"] == 0  # step 1: the fake is still the teacher's copy, so GAD vanishes (its property)
    assert rows[1]["gad_gap"] > 0 and rows[1]["loss_gad"] != 0 and rows[1]["loss_fake"] > 0, rows


@pytest.mark.parametrize("file, flags, message", [
    ("gad_tdm", dict(offload=True), "--offload: needs --fsdp"),
    ("gad_tdm", dict(fsdp=True, dtype="fp16"), "--fsdp: --dtype fp16"),
    ("gad_tdm", dict(fsdp=True, gad_path="response"), "--fsdp: not with --gad-path response and --gad-jvp exact"),
    ("gad_tdm", dict(grad_ckpt=True, gad_path="response"), "--grad-ckpt: not with --gad-path response and --gad-jvp exact"),
    ("gad_sid", dict(fsdp=True, gad_path="response"), "--fsdp: not with --gad-path response and --gad-jvp exact"),
    ("gad_ladd", dict(fsdp=True), "--fsdp: needs --gad-jvp fd"),
    ("gad_sid", dict(fsdp=True, gad_jvp="fd", ema_decay=0.9), "--ema-decay: not with --fsdp"),
])
def test_refused_before_loading(tmp_path, file, flags, message):
    module = importlib.import_module(file)
    with pytest.raises(common.UsageError, match=message):
        module.train(module.Args(model="tiny", device="cpu", out=str(tmp_path / "r"), **flags))


def test_lora_with_fsdp_is_refused_before_sharding(tmp_path):
    """adm's default on SD3 is LoRA (rank 64): --fsdp over peft's layers is untested, so wrap() refuses it, and before
    it would create a process group."""
    import torch.distributed as torch_dist

    import adm
    with pytest.raises(common.UsageError, match="--lora-rank: not with --fsdp"):
        adm.train(adm.Args(model="tiny", device="cpu", fsdp=True, out=str(tmp_path / "r")))
    assert not torch_dist.is_initialized()
