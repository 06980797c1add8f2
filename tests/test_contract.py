"""The run contract (issue 12, README "Runs and resume"), driven through each file's command line.

`cli()` runs `python <file>.py ARGS` inside this process: the file's own `__main__` block via runpy, with sys.argv
set, so what is tested is what a user types (exit code, message) without paying ~7 s of imports per case.
Each refused case must exit with code 2 within 2 s, name the flag or file, and leave --out as it was.
"""
import json
import os
import runpy
import sys
import time

import pytest
import torch

import adm
import common
import dpdmd
import gad_ladd
import gad_sid
import gad_tdm
import swiss_roll

FILES = {"gad_tdm": (gad_tdm, ["--model", "tiny"]), "gad_sid": (gad_sid, ["--model", "tiny"]),
         "gad_ladd": (gad_ladd, ["--model", "tiny"]), "dpdmd": (dpdmd, ["--model", "tiny-sd3"]),
         "adm": (adm, ["--model", "tiny"]), "swiss_roll": (swiss_roll, [])}
OTHER_FAMILY = {"gad_tdm": ("StableDiffusion3Pipeline", "sd3"), "gad_sid": ("PixArtAlphaPipeline", "pixart"),
                "gad_ladd": ("StableDiffusionXLPipeline", "sdxl"), "dpdmd": ("SanaPipeline", "sana"),
                "adm": ("StableDiffusionPipeline", "sd21")}


def cli(module, argv, capsys):
    """`python module.py argv` in-process -> (exit code, stdout + stderr, seconds). An exception is exit code 1."""
    old, sys.argv = sys.argv, [module.__file__, *argv]
    t0, code, err = time.perf_counter(), 0, ""
    try:
        runpy.run_path(module.__file__, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception as e:  # noqa: BLE001 - what python would print as a traceback
        code, err = 1, f"{type(e).__name__}: {e}"
    finally:
        sys.argv = old
    seconds = time.perf_counter() - t0
    out = capsys.readouterr()
    return code, out.out + out.err + err, seconds


def snapshot(d):
    """Every file under d with its size and mtime (None when d does not exist)."""
    if not os.path.exists(d):
        return None
    return {os.path.relpath(os.path.join(r, f), d): (os.path.getsize(os.path.join(r, f)),
                                                      os.stat(os.path.join(r, f)).st_mtime_ns)
            for r, _, fs in os.walk(d) for f in fs}


def fake_checkpoint(module, out, **args):
    """A ckpt.pt as the file would write it at step 1 (no weights: resume refuses before anything loads)."""
    common.save_checkpoint(os.path.join(out, "ckpt.pt"), {}, {}, 1, module.Args(out=out, **args))


SECONDS = 5  # a refused case never loads a model (load_pipeline raises in these tests); the time is only parsing


def _no_model_loads(*a, **k):
    raise AssertionError("a model was loaded: the case was not refused up front")


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _setup(kind, file, out, tmp):
    """Prepare --out (and helper files) for a case; returns extra argv."""
    if kind == "nonempty":
        os.makedirs(out)
        open(os.path.join(out, "metrics.jsonl"), "w").write('{"step": 1, "loss": 0.5}\n')
        open(os.path.join(out, "samples.png"), "wb").write(b"\x89PNG")
    elif kind == "emptydir":
        os.makedirs(out)
    elif kind == "corrupt_ckpt":
        os.makedirs(out)
        open(os.path.join(out, "ckpt.pt"), "wb").write(b"PK\x03\x04 truncated")
    elif kind == "ckpt":
        fake_checkpoint(FILES[file][0], out, model=FILES[file][1][1], batch_size=2)
    elif kind == "bad_prompts":
        open(os.path.join(tmp, "p.txt"), "wb").write(b"caf\xe9 au lait\n")
        return ["--prompts", os.path.join(tmp, "p.txt")]
    elif kind == "other_family":
        os.makedirs(os.path.join(tmp, "pipe"))
        json.dump({"_class_name": OTHER_FAMILY[file][0]}, open(os.path.join(tmp, "pipe", "model_index.json"), "w"))
        return ["--model", os.path.join(tmp, "pipe")]
    return []


_MODEL_FILES = ("gad_tdm", "gad_sid", "gad_ladd", "dpdmd", "adm")
_ACCUM_FILES = ("gad_tdm", "gad_sid", "dpdmd", "adm")  # --grad-accum (issue 15)
# (case, files, setup, argv, message): every case must exit 2 before any model loads
CASES = [
    ("steps 0", _MODEL_FILES, None, ["--steps", "0"], r"argument --steps: must be >= 1 \(got 0\)"),
    ("steps -5", ("gad_tdm", "adm"), None, ["--steps", "-5"], r"argument --steps: must be >= 1"),
    ("batch 0", _MODEL_FILES, None, ["--batch-size", "0"], r"argument --batch-size: must be >= 1"),
    ("--grad-accum 0", _ACCUM_FILES, None, ["--grad-accum", "0"], r"argument --grad-accum: must be >= 1 \(got 0\)"),
    ("resume, --grad-accum changed", _ACCUM_FILES, "ckpt", ["--resume", "latest", "--grad-accum", "2"],
     r"change the experiment.*\n  --grad-accum: checkpoint 1, now 2"),  # the global batch
    ("period -1", _MODEL_FILES, None, ["--ckpt-every", "-1"], r"argument --ckpt-every: must be >= 0"),
    ("lr nan", ("gad_tdm", "dpdmd"), None, ["--lr", "nan"], r"argument --lr: must be > 0"),
    ("--lr-d 0", ("adm",), None, ["--lr-d", "0"], r"argument --lr-d: must be > 0"),
    ("no prompts file", ("gad_sid", "gad_ladd"), None, ["--prompts", "/nonexistent/p.txt"], r"--prompts.*/nonexistent/p.txt"),
    ("non-UTF-8 prompts", _MODEL_FILES, "bad_prompts", [], r"--prompts: .*p.txt is not UTF-8 text"),
    ("model dir missing", _MODEL_FILES, None, ["--model", "/nonexistent/dir"], r"--model: no such directory: /nonexist"),
    ("other family's dir", _MODEL_FILES, "other_family", [], r"--model: .*pipe holds a \w+ \(the \w+ family\)"),
    ("fresh run, --out not empty", _MODEL_FILES, "nonempty", [],
     r"--out: .* already holds metrics.jsonl, samples.png.*--resume latest.*--overwrite"),
    ("--resume latest, no ckpt", _MODEL_FILES, "emptydir", ["--resume", "latest"], r"no checkpoint at .*ckpt.pt"),
    ("corrupt ckpt.pt", _MODEL_FILES, "corrupt_ckpt", ["--resume", "latest"], r"ckpt.pt is not a readable checkpoint"),
    ("resume, --batch-size changed", _MODEL_FILES, "ckpt", ["--resume", "latest", "--batch-size", "4"],
     r"change the experiment.*\n  --batch-size: checkpoint 2, now 4"),
    ("resume, --model changed", ("gad_tdm",), "ckpt", ["--resume", "latest", "--model", "tiny-pixart"],
     r"--model: checkpoint 'tiny', now 'tiny-pixart'"),
    ("resume, --timesteps changed", ("gad_tdm",), "ckpt", ["--resume", "latest", "--timesteps", "899", "449"],
     r"--timesteps: checkpoint \(899, 674, 449, 224\), now \(899, 449\)"),
    ("timesteps not decreasing", ("gad_tdm",), None, ["--timesteps", "224", "899"], r"--timesteps: must decrease"),
    ("--t-gen not from 1", ("gad_sid",), None, ["--t-gen", "0.5", "0.25"], r"--t-gen: must decrease strictly from 1.0"),
    ("--t-d-max 1000", ("gad_ladd",), None, ["--t-d-max", "1000"], r"--t-d-max: must be \[0, 999\]"),
    ("--anchor-step > teacher", ("dpdmd",), None, ["--anchor-step", "40"], r"--anchor-step: must be <= --teacher-steps"),
    ("--model of another family", ("dpdmd",), None, ["--model", "tiny-sdxl"], r"tiny-sdxl is the sdxl family.*sd3"),
    ("--cfg-range hi < lo", ("adm",), None, ["--cfg-range", "8", "6"], r"--cfg-range: need two values lo <= hi"),
    ("swiss_roll --h 0", ("swiss_roll",), None, ["--h", "0"], r"argument --h: must be > 0"),
    ("swiss_roll --student-steps 3", ("swiss_roll",), None, ["--student-steps", "3"], r"--student-steps: must be 1, 2 or 4"),
    ("swiss_roll --out not empty", ("swiss_roll",), "nonempty", [], r"already holds metrics.jsonl, samples.png. Pass --overw"),
]
TABLE = [(case, f, setup, argv, msg) for case, files, setup, argv, msg in CASES for f in files]


@pytest.mark.parametrize("case,file,setup,argv,message", TABLE, ids=[f"{f}: {c}" for c, f, *_ in TABLE])
def test_refused_up_front(case, file, setup, argv, message, tmp_path, capsys, offline_empty_cache, monkeypatch):
    import re

    monkeypatch.setattr(common, "load_pipeline", _no_model_loads)
    module, base = FILES[file]
    out = str(tmp_path / "out")
    extra = _setup(setup, file, out, str(tmp_path))
    before = snapshot(out)
    code, text, seconds = cli(module, [*base, "--out", out, *extra, *argv], capsys)
    assert code == 2, text[-2000:]
    assert re.search(message, text), text[-2000:]
    assert seconds < SECONDS, seconds  # ~0.1-0.3 s on an idle machine; the bound allows a loaded one
    assert snapshot(out) == before  # nothing in --out created, replaced or truncated


@pytest.mark.parametrize("file,argv", [("gad_tdm", ["--eval"]), ("dpdmd", [])])
def test_feature_model_fails_fast_before_loading(file, argv, tmp_path, capsys, offline_empty_cache, monkeypatch):
    monkeypatch.setattr(common, "load_pipeline", _no_model_loads)  # gad_tdm --eval lost its metrics after loading
    module, base = FILES[file]
    code, text, seconds = cli(module, [*base, "--out", str(tmp_path / "o"), "--feature-model", "no-org/no-feat", *argv],
                              capsys)
    assert code == 2 and "argument --feature-model: Model 'no-org/no-feat'" in text and seconds < SECONDS, (code, text)
    assert "hf download no-org/no-feat --local-dir DIR) and pass --feature-model DIR." in text


@pytest.mark.parametrize("file", list(FILES))
def test_help_works_and_states_period_semantics(file, capsys):
    module, _ = FILES[file]
    code, text, _ = cli(module, ["--help"], capsys)
    assert code == 0 and "usage:" in text, text[-2000:]
    assert "--out" in text and "--overwrite" in text
    if any(f.endswith("_every") for f in module.Args.__dataclass_fields__):
        assert "0 = never; the last step always gets one" in " ".join(text.split())
    if file == "gad_ladd":
        assert "70% train" in text  # the '%' that crashed argparse


@pytest.mark.parametrize("file", list(FILES))
def test_every_numeric_flag_has_a_range_and_defaults_pass(file):
    module, _ = FILES[file]
    import ast

    common.check_args(module.Args(), module.RANGES)  # TypeError if a numeric field has no declared range
    tree = ast.parse(open(module.__file__).read())
    assert not [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]  # asserts vanish under python -O


def test_numeric_flag_without_a_range_is_a_programming_error():
    import dataclasses

    @dataclasses.dataclass
    class A:
        steps: int = 1
        mystery: float = 0.5

    with pytest.raises(TypeError, match="mystery"):
        common.check_args(A(), {})
    common.check_args(A(), {"mystery": "[0, 1]"})
    with pytest.raises(common.UsageError, match=r"--mystery: must be \[0, 1\] \(got 2.0\)"):
        common.check_args(A(mystery=2.0), {"mystery": "[0, 1]"})


def test_gad_tdm_periods_zero_resume_applies_lr_and_adopts_the_checkpoints_flags(tmp_path, capsys, monkeypatch):
    """One tiny run with every period 0 (ZeroDivisionError before), then `--resume latest --steps 2 --lr 1e-3`:
    the flags not typed come from the checkpoint (--model tiny, batch 2), the typed lr reaches the optimiser and
    metrics.jsonl, and a torn last metrics line is dropped with a warning."""
    monkeypatch.setattr(common, "plot_curves", lambda *a: None)  # matplotlib: seconds, not under test here
    monkeypatch.setattr(common, "save_grid", lambda images, path, nrow: open(path, "w").close())
    out = str(tmp_path / "run")
    run = ["--model", "tiny", "--steps", "1", "--batch-size", "2", "--sample-every", "0", "--ckpt-every", "0",
           "--eval-teacher-steps", "2", "--out", out]
    code, text, _ = cli(gad_tdm, run, capsys)
    assert code == 0, text[-2000:]
    assert {"ckpt.pt", "samples.png", "metrics.jsonl", "pipeline"} <= set(os.listdir(out))  # 0 = never, end still made
    assert os.path.isfile(os.path.join(out, "pipeline", "model_index.json"))
    assert not [n for n in os.listdir(out) if ".tmp" in n or ".old" in n]  # atomic export left nothing behind
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "loss_fa')  # a kill mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        code, text, _ = cli(gad_tdm, ["--resume", "latest", "--out", out, "--steps", "2", "--lr", "1e-3"], capsys)
    assert code == 0, text[-2000:]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 2 and ckpt["args"]["model"] == "tiny" and ckpt["args"]["batch_size"] == 2
    groups = ckpt["optimizers"]["opt_g"]["param_groups"]  # applied, not only recorded: the lr schedule's base (issue 11)
    assert [g["initial_lr"] for g in groups] == [1e-3] and groups[0]["lr"] == pytest.approx(1e-3 * 2 / 50)  # warm-up
    assert ckpt["optimizers"]["opt_f"]["param_groups"][0]["lr"] == gad_tdm.Args.lr_fake
    rows = common.Logger.read(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 1, 2]
    assert rows[1]["resume_changed"] == {"lr": [gad_tdm.Args.lr, 1e-3], "steps": [1, 2]}


def test_start_run_auto_overwrite_and_steps_behind_the_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    a = lambda **kw: gad_tdm.Args(model="tiny", out=out, **kw)
    assert common.start_run(a(resume="auto"), gad_tdm.RANGES) is None  # nothing there: starts fresh
    fake_checkpoint(gad_tdm, out, model="tiny", steps=5)
    assert common.start_run(a(resume="auto"), gad_tdm.RANGES) == os.path.join(out, "ckpt.pt")
    assert common.start_run(a(overwrite=True), gad_tdm.RANGES) is None  # asked for: fresh run in a used --out
    with pytest.raises(common.UsageError, match="--steps: .* is at step 1"):
        common.start_run(a(resume="latest", steps=0), gad_tdm.RANGES)


def test_logger_drops_a_torn_last_line_but_names_a_corrupt_middle_one(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    open(path, "w").write('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert common.Logger.read(path) == [{"step": 1, "loss": 1.0}]
    open(path, "w").write('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(common.UsageError, match="metrics.jsonl, line 2"):
        common.Logger.read(path)


def test_nan_stop_says_whether_a_checkpoint_exists(tmp_path):
    common.start_run(gad_tdm.Args(model="tiny", out=str(tmp_path / "o")), gad_tdm.RANGES)
    with pytest.raises(FloatingPointError, match=r"no checkpoint saved"):
        common.check_finite(3, loss=float("nan"))
    common.save_checkpoint(str(tmp_path / "o" / "ckpt.pt"), {}, {}, 2, {})
    with pytest.raises(FloatingPointError, match=r"last checkpoint kept: .*ckpt.pt at step 2"):
        common.check_finite(3, loss=float("nan"))


def test_export_is_atomic(tmp_path):
    """A crash inside save_pretrained leaves the previous pipeline/ whole (was: a pipeline/ without model_index.json)."""
    class Pipe:
        denoiser_name, dtype = "net", torch.float32

        def __init__(self, **components):
            self.components = components

        def save_pretrained(self, d, safe_serialization=True):
            os.makedirs(d)
            open(os.path.join(d, "weights"), "w").write(str(self.components["net"].weight.sum().item()))
            if self.components["net"].weight.sum() > 0:
                raise KeyboardInterrupt  # killed half-way
            open(os.path.join(d, "model_index.json"), "w").write("{}")

    class Net(torch.nn.Linear):
        dtype = torch.float32

    net, d = Net(2, 2, bias=False), str(tmp_path / "pipeline")
    torch.nn.init.constant_(net.weight, -1.0)
    common.export_pipeline(Pipe(net=net), net, d)
    torch.nn.init.constant_(net.weight, 1.0)
    with pytest.raises(KeyboardInterrupt):
        common.export_pipeline(Pipe(net=net), net, d)
    assert sorted(os.listdir(d)) == ["model_index.json", "weights"] and open(os.path.join(d, "weights")).read() == "-4.0"


@pytest.mark.parametrize("argv, steps, n_data", [(["--model", "tiny"], 20, 64),  # the command-line smoke run
                                                 (["--model", "tiny", "--steps", "7", "--n-data", "9"], 7, 9),  # typed
                                                 (["--model", "random"], 100_000, 65536)])  # not tiny: the paper's
def test_tiny_command_line_is_a_short_smoke_run_unless_flags_are_typed(tmp_path, argv, steps, n_data):
    args = common.parse(gad_ladd.Args, argv + ["--out", str(tmp_path / "r")])
    common.start_run(args, gad_ladd.RANGES, tiny=gad_ladd.TINY_SMOKE)
    assert (args.steps, args.n_data) == (steps, n_data)
    assert args.teacher_steps == (4 if argv == ["--model", "tiny"] or "--n-data" in argv else 50)
    direct = gad_ladd.Args(model="tiny", out=str(tmp_path / "d"))  # built in code (tests, notebooks): as given
    common.start_run(direct, gad_ladd.RANGES, tiny=gad_ladd.TINY_SMOKE)
    assert direct.steps == 100_000
