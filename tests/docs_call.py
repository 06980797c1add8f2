"""The documented stock-pipeline call of a method file, read from its docstring's "Reload with" block, so the tests
run exactly the call a user copies (issue 12: the README/docstring call for gad_tdm failed on the export)."""
import ast
import re


def documented_call(module) -> dict:
    """kwargs of the `pipe(prompt, ...)` call that follows "Reload with" in module.__doc__ (literals only)."""
    doc = module.__doc__
    start = doc.index("Reload with")
    m = re.search(r"pipe\(prompt,(.*?)\)\s*$", doc[start:], re.S | re.M)
    call = ast.parse("pipe(prompt," + " ".join(m[1].split()) + ")", mode="eval").body
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def export_call_covers_documented(module, pipeline_dir: str, family: str, **override) -> None:
    """The export's call.json (over the family's stock-call kwargs, as evaluate.load_model merges them) holds the
    documented call: evaluate.py runs an export the way its docstring says without @ settings."""
    import json
    import os

    import common
    with open(os.path.join(pipeline_dir, "call.json")) as f:
        call = {**common.PIPELINE_KWARGS[family], **json.load(f)}
    documented = {**documented_call(module), **override}
    assert {k: call.get(k) for k in documented} == documented, (call, documented)
