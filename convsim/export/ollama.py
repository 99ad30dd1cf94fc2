"""The Ollama `Modelfile` written beside an exported GGUF: convsim's prompt format as an Ollama TEMPLATE.

convsim's base prompt is bos, then one `[Name] text\\n` line per message, then the token of the person
who speaks next. Ollama's chat has two roles, so the Modelfile is for one persona (`--as`): the
assistant's messages are the persona's, the user's are the other person's (the first other speaker; in
a group chat a user message may itself hold more `[Name] text` lines). llama.cpp adds bos itself
(`add_bos_token` in the GGUF), so the template does not. Generation stops at every other speaker's token
and at end of turn / eos: the persona may send a burst of messages, each after its own token.

The TEMPLATE uses a small subset of Go's text/template: `range .Messages`, `if eq .Role "..."` /
`else if` / `end`, and `.Content`. tests/unit/test_ollama_modelfile.py renders it with a Python
implementation of that subset and compares the tokens with convsim's own prompt.
"""

from __future__ import annotations

from convsim.modeling.speakers import speaker_token

SAMPLING = {"temperature": 0.7, "top_p": 0.95, "num_predict": 96}


def template(persona: str, other: str) -> str:
    me, you = speaker_token(persona), speaker_token(other)
    return (
        '{{ range .Messages }}{{ if eq .Role "assistant" }}' + me + " {{ .Content }}\n"
        '{{ else if eq .Role "user" }}' + you + " {{ .Content }}\n"
        "{{ end }}{{ end }}" + me
    )


def stops(speakers: list[str], persona: str) -> list[str]:
    return [speaker_token(s) for s in speakers if s != persona] + ["<end_of_turn>", "<eos>"]


def modelfile(gguf_name: str, speakers: list[str], persona: str, adapter: str | None = None) -> str:
    """The Modelfile for `gguf_name`; with `adapter`, a GGUF LoRA that Ollama applies on it (`ADAPTER`)."""
    other = next((s for s in speakers if s != persona), persona)
    lines = [
        f"# {persona} as convsim trained them: the model continues a chat between {', '.join(speakers)}.",
        f"# Your messages are {other}'s; each reply is {persona}'s, possibly several messages in a row.",
        f"FROM ./{gguf_name}",
    ]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append(f'TEMPLATE """{template(persona, other)}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops(speakers, persona)]
    lines += [f"PARAMETER {k} {v}" for k, v in SAMPLING.items()]
    return "\n".join(lines) + "\n"
