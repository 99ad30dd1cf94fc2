"""The files `convsim steer` reads: a phrases YAML (phrases with signed weights, and the build settings),
a pairs file (contrastive pairs, YAML or JSONL), and number lists given on the command line. Each ends a
bad input with a `UserError` naming the file and the problem.

    ps = load_phrase_set("examples/steer-happy.yaml")     # PhraseSet(phrases={...}, layer=-5, ...)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from convsim.errors import UserError, brief


@dataclass
class PhraseSet:
    """A `--phrases` YAML file: phrase -> signed weight, and how to build from them. A YAML file that is
    only a mapping of phrase -> number means `phrases:` with the defaults below."""

    phrases: dict[str, float] = field(default_factory=dict)
    pos_alpha: float = 1.0
    neg_alpha: float = 1.0
    layer: int | list[int] = -5
    pool: str = "mean"
    speaker: str | None = None  # prefix each phrase with this speaker's token


def load_phrase_set(path) -> PhraseSet:
    import yaml
    from convsim.config import safe_yaml, yaml_problem
    from convsim.fsutil import read_user_text

    p = Path(path)
    text = read_user_text(p, "phrases file", max_bytes=8 << 20)
    try:
        data = safe_yaml(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date-like scalar such as 2024-13-45
        raise UserError(f"{p}: not valid YAML ({yaml_problem(e)})") from None
    except RecursionError:
        raise UserError(f"{p}: YAML nested too deeply") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{p}: expected a mapping (phrases: {{phrase: weight}})")
    if "phrases" not in data and all(isinstance(v, (int, float)) for v in data.values()):
        data = {"phrases": data}
    unknown = sorted(str(k) for k in data if k not in {f.name for f in fields(PhraseSet)})
    if unknown:
        raise UserError(f"{p}: unknown setting(s) {', '.join(unknown)}")
    ps = PhraseSet(**data)
    if not isinstance(ps.phrases, dict) or not ps.phrases:
        raise UserError(f"{p}: `phrases` must map each phrase to a signed weight")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    for k, v in ps.phrases.items():
        if not number(v):
            raise UserError(f"{p}: the weight of {brief(k)} must be a finite number, not {brief(v)}")
    for name in ("pos_alpha", "neg_alpha"):
        if not number(getattr(ps, name)):
            raise UserError(f"{p}: {name} must be a finite number, not {brief(getattr(ps, name))}")
    layers = ps.layer if isinstance(ps.layer, list) else [ps.layer]
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise UserError(f"{p}: layer must be an integer or a list of integers, not {brief(ps.layer)}")
    if ps.speaker is not None and not isinstance(ps.speaker, str):
        raise UserError(f"{p}: speaker must be a name, not {brief(ps.speaker)}")
    if ps.pool not in ("mean", "last"):
        raise UserError(f"{p}: pool must be mean or last, not {ps.pool!r}")
    ps.phrases = {str(k): float(v) for k, v in ps.phrases.items()}
    return ps


def load_pairs(path) -> list[tuple[str, str]]:
    """YAML/JSON list of [toward, away] pairs or {positive, negative} objects; or JSONL of such objects."""
    import yaml
    from convsim.config import safe_yaml, yaml_problem
    from convsim.fsutil import read_user_text

    p = Path(path)
    text = read_user_text(p, "pairs file", max_bytes=8 << 20)
    try:
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = safe_yaml(text)
    except (ValueError, yaml.YAMLError) as e:
        raise UserError(f"{p}: cannot read ({yaml_problem(e)})") from None
    except RecursionError:
        raise UserError(f"{p}: nested too deeply") from None
    if isinstance(rows, dict) and "pairs" in rows:
        rows = rows["pairs"]
    out = []
    text_like = lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)  # noqa: E731
    for i, r in enumerate(rows if isinstance(rows, list) else [None], 1):
        if (
            isinstance(r, dict)
            and "positive" in r
            and "negative" in r
            and text_like(r["positive"])
            and text_like(r["negative"])
        ):
            out.append((str(r["positive"]), str(r["negative"])))
        elif isinstance(r, (list, tuple)) and len(r) == 2 and text_like(r[0]) and text_like(r[1]):
            out.append((str(r[0]), str(r[1])))
        else:
            raise UserError(f"{p}: pair {i} must be [toward, away] or {{positive: ..., negative: ...}}")
    if not out:
        raise UserError(f"{p}: no pairs")
    return out


def parse_numbers(text: str, what: str, cast=float) -> list:
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma-separated list of numbers, not {text!r}") from None
