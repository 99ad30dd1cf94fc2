"""The Ollama Modelfile's TEMPLATE gives convsim's own prompt tokens.

Ollama cannot be installed here, so the template is rendered by `go_render` below: a Python
implementation of the part of Go's text/template that the Modelfile uses (literal text, `{{- -}}` trim
markers, `range`, `if` / `else if` / `else` / `end`, `eq`, string literals and `.Field` lookups), with
Go's rules: a `-` trims all adjacent white space, `range` over a list sets dot to each element, `eq`
compares values. Anything else in the template raises, so the test fails if the template grows past
the checked subset.
"""

from __future__ import annotations

import re

import pytest

from convsim.data.schema import Message

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _lex(template: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    for m in ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if out and out[-1][0] == "trim_next":
            out.pop()
            text = text.lstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        if m.group(3):
            out.append(("trim_next", ""))
        pos = m.end()
    text = template[pos:]
    if out and out[-1][0] == "trim_next":
        out.pop()
        text = text.lstrip(" \t\r\n")
    out.append(("text", text))
    return [t for t in out if t != ("text", "")]


def _value(expr: str, dot):
    expr = expr.strip()
    if expr.startswith('"') and expr.endswith('"'):
        return expr[1:-1]
    if expr == ".":
        return dot
    if re.fullmatch(r"(\.[A-Za-z_]\w*)+", expr):
        v = dot
        for part in expr[1:].split("."):
            v = v[part]
        return v
    m = re.fullmatch(r'eq\s+(\S+)\s+("[^"]*"|\S+)', expr)
    if m:
        return _value(m.group(1), dot) == _value(m.group(2), dot)
    raise NotImplementedError(f"template expression outside the checked subset: {expr!r}")


def _parse(tokens, i=0, stop=("end",)):
    """Nodes until one of `stop`; returns (nodes, index of the stopping action, that action)."""
    nodes = []
    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        if val == "end" or val == "else" or val.startswith("else if "):
            if val.split(" ")[0] in stop or val in stop:
                return nodes, i, val
            raise ValueError(f"unexpected {val!r}")
        if val.startswith("range "):
            body, i, _ = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", val[6:], body))
            i += 1
        elif val.startswith("if "):
            branches = []
            cond = val[3:]
            while True:
                body, i, end = _parse(tokens, i + 1, ("end", "else"))
                branches.append((cond, body))
                if end == "end":
                    break
                cond = end[8:] if end.startswith("else if ") else None
            nodes.append(("if", branches))
            i += 1
        else:
            nodes.append(("expr", val))
            i += 1
    return nodes, i, None


def _exec(nodes, dot) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            out.append(str(_value(node[1], dot)))
        elif node[0] == "range":
            for item in _value(node[1], dot) or []:
                out.append(_exec(node[2], item))
        else:
            for cond, body in node[1]:
                if cond is None or _value(cond, dot):
                    out.append(_exec(body, dot))
                    break
    return "".join(out)


def go_render(template: str, data: dict) -> str:
    nodes, _, _ = _parse(_lex(template))
    return _exec(nodes, data)


def test_go_render_follows_go_rules():
    msgs = {"Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    t = '{{ range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}{{ else }}A:{{ .Content }}{{ end }};{{ end }}'
    assert go_render(t, msgs) == "U:a;A:b;"
    assert go_render("x  {{- .A -}}  \n y", {"A": "1"}) == "x1y"
    with pytest.raises(NotImplementedError):
        go_render("{{ slice .A 1 }}", {"A": "ab"})


HISTORIES = [
    [Message("Ben", "are you coming tonight?")],
    [
        Message("Ana", "hey how are you"),
        Message("Ben", "Not bad. Working late again."),
        Message("Ana", "lol yes"),
        Message("Ana", "i love pizza so much"),
        Message("Ben", "Maybe tomorrow then."),
    ],
    [],
]


def ollama_messages(history, persona):
    return [{"Role": "assistant" if m.speaker == persona else "user", "Content": m.text} for m in history]


@pytest.mark.parametrize("persona", ["Ana", "Ben"])
def test_template_renders_convsim_prompt(persona):
    from convsim.data.examples import PromptFormat, render
    from convsim.export.ollama import modelfile, stops, template
    from convsim.modeling.models import load_base
    from convsim.modeling.speakers import add_speaker_tokens

    model, tok = load_base("tiny-gemma3", device="cpu")
    add_speaker_tokens(model, tok, ["Ana", "Ben"])
    fmt = PromptFormat("base", ("Ana", "Ben"))
    other = "Ben" if persona == "Ana" else "Ana"
    tmpl = template(persona, other)
    mf = modelfile("model.gguf", ["Ana", "Ben"], persona)
    assert f'TEMPLATE """{tmpl}"""' in mf and "FROM ./model.gguf" in mf
    assert stops(["Ana", "Ben"], persona) == [f"[{other}]", "<end_of_turn>", "<eos>"]
    for s in stops(["Ana", "Ben"], persona):
        assert f'PARAMETER stop "{s}"' in mf
    for history in HISTORIES:
        text = go_render(tmpl, {"Messages": ollama_messages(history, persona)})
        want = render(tok, fmt, history, persona).input_ids
        # llama.cpp adds bos (add_bos_token) and reads speaker tokens in the prompt as single tokens
        assert tok(text).input_ids == want, (text, history)
