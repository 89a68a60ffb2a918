#!/usr/bin/env python3
"""Chat templates rendered by jinja2 exactly as Hugging Face's apply_chat_template does
(transformers.utils.chat_template_utils._compile_jinja_template: ImmutableSandboxedEnvironment
with trim_blocks, lstrip_blocks and the loopcontrols extension, raise_exception as a global,
tojson with ensure_ascii=False), the reference for serve/ot_chat_template.c.

  chat_template_ref.py --write CASES   fills every case's "expected" (or "error") from jinja2
  chat_template_ref.py --check CASES   exits 1 if a stored expectation differs from jinja2
Exit 77 (a skip) when jinja2 is not installed."""
import json
import os
import sys

try:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.ext import loopcontrols
except ImportError:
    print("jinja2 is not installed: skipped")
    sys.exit(77)


class TemplateError(Exception):
    pass


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(src):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(src)


def template_source(case, root):
    if "template" in case:
        with open(os.path.join(root, case["template"]), encoding="utf-8") as f:
            return f.read()
    with open(os.path.join(root, case["config"]), encoding="utf-8") as f:
        return json.load(f)["chat_template"]


def render(case, convs, root):
    t = compile_template(template_source(case, root))
    kw = {"messages": convs[case["conversation"]], "add_generation_prompt": case["add_generation_prompt"]}
    for k in ("bos_token", "eos_token"):
        if k in case:
            kw[k] = case[k]
    try:
        return {"expected": t.render(**kw)}
    except TemplateError as e:
        return {"error": str(e)}


def main():
    mode, path = sys.argv[1], sys.argv[2]
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    bad = 0
    for case in data["cases"]:
        got = render(case, data["conversations"], os.path.join(root, case.get("root", ".")))
        if mode == "--write":
            case.pop("expected", None)
            case.pop("error", None)
            case.update(got)
        else:
            want = {k: case[k] for k in ("expected", "error") if k in case}
            if want != got:
                bad += 1
                print("MISMATCH", case.get("template", case.get("config")), case["conversation"], "stored", want, "jinja2", got)
    if mode == "--write":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
            f.write("\n")
    print(f"{len(data['cases'])} cases, {bad} differ from jinja2 {jinja2.__version__}")
    sys.exit(1 if bad else 0)


main()
