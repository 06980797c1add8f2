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
