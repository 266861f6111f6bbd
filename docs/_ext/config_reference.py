"""The configuration reference, generated from ``TrilemmaMoEConfig``.

In a MyST page::

    ```{trilemma-config-reference}
    ```

renders every knob in declaration order, grouped by the section comments of the class
(``# --- structure ---`` ...): name, type and default from ``dataclasses.fields``, what it changes
from the field's source comment (with its ``#   `` continuation lines), read with ``tokenize``;
the allowed values and the paper's symbol from ``trilemma_moe.config_doc.KNOB_DOC``. A new knob
appears by itself (and ``tests/test_config_reference.py`` fails until ``KNOB_DOC`` has its row).

Each knob gets the label ``knob-<name>`` (``{ref}`knob-num_experts```, or
``[text](reference/config.md#knob-num_experts)`` from another page) and a heading whose anchor is
its name. :func:`render_markdown` returns the generated MyST text; the directive parses it in place.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
from typing import Dict, List, NamedTuple, Optional

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

LABEL_PREFIX = "knob-"
SECTION_MARK = re.compile(r"^#\s*---\s*(.*?)\s*-*\s*$")   # "# --- structure -------"
CONTINUATION = re.compile(r"^#\s{2,}")                      # "#   more of the comment above"


class Knob(NamedTuple):
    name: str
    section: str
    type: str
    default: object
    description: str


def _config_class():
    from trilemma_moe.config import TrilemmaMoEConfig
    return TrilemmaMoEConfig


def _comments(cls) -> tuple[Dict[str, str], Dict[str, str]]:
    """From the class's source: field name -> its comment (continuation lines joined), and field
    name -> the title of the section comment above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    field_rows: Dict[int, str] = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            for row in range(node.lineno, node.end_lineno + 1):
                field_rows[row] = node.target.id
    last_field = max(field_rows) if field_rows else 0
    comments: Dict[str, List[str]] = {}
    marks: List[tuple] = []                             # (row, section title)
    current = None                                      # the field a continuation line belongs to
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, text = tok.start[0], tok.string
        if not lines[row - 1][:tok.start[1]].strip():   # a comment alone on its line
            if SECTION_MARK.match(text):
                marks.append((row, SECTION_MARK.match(text).group(1)))
                current = None
            elif CONTINUATION.match(text) and current is not None:
                comments[current].append(text.lstrip("#").strip())
            else:
                current = None
        elif row <= last_field:                         # trailing: the field on this row
            current = field_rows.get(row)
            if current is not None:
                comments.setdefault(current, []).append(text.lstrip("#").strip())
    sections = {}
    for row, name in sorted(field_rows.items()):
        above = [title for mark_row, title in marks if mark_row < row]
        sections.setdefault(name, above[-1] if above else "")
    return {k: " ".join(v) for k, v in comments.items()}, sections


def knobs(cls=None) -> List[Knob]:
    """Every field of the config in declaration order, with its section and source comment."""
    cls = cls or _config_class()
    comments, sections = _comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:      # type: ignore[misc]
            default = f.default_factory()                       # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        out.append(Knob(f.name, sections.get(f.name, ""), _type_text(f.type), default,
                        comments.get(f.name, "")))
    return out


# --- text ------------------------------------------------------------------------------------------
def _type_text(annotation) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    m = re.fullmatch(r"Optional\[(.*)\]", text)
    return f"{m.group(1)} | None" if m else text


def default_text(value) -> str:
    """How a default is shown: Python's spelling, strings in double quotes."""
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")
_QUOTED = re.compile(r'"([A-Za-z0-9_.\-]+)"')                 # "full", "aio": literals
_PATH = re.compile(r"\b[\w./-]+\.(?:py|md|json|yaml)\b")       # core/drift.py, docs/RESULTS.md
_DOTTED = re.compile(r"\btrilemma_moe(?:\.\w+)+\b")
_CONSTANT = re.compile(r"\b(?:None|True|False)\b")
_PAPER_SECTION = re.compile(r"\((\d\.\d)\)")


def _escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def _link(name: str) -> str:
    return f"[`{name}`](#{LABEL_PREFIX}{name})"


def prose(text: str, names=(), own: Optional[str] = None, sentence: bool = True) -> str:
    """A source comment as MyST text: Markdown escaped; other knobs' names (with an underscore,
    so plain words stay words) linked to their entries; short quoted values, paths, dotted
    module names and None/True/False as literals; a leading word capitalised; ``sentence``: a
    full stop at the end."""
    linkable = {n for n in names if "_" in n and n != own}
    pattern = re.compile("|".join(
        [_QUOTED.pattern, _PATH.pattern, _DOTTED.pattern, _CONSTANT.pattern]
        + ([r"\b(?:" + "|".join(sorted(map(re.escape, linkable), key=len, reverse=True)) + r")\b"]
           if linkable else [])))
    out, pos = [], 0
    for m in pattern.finditer(text):
        out.append(_escape(text[pos:m.start()]))
        token = m.group(0)
        if token in linkable:
            out.append(_link(token))
        else:
            out.append(f"`{token}`")
        pos = m.end()
    out.append(_escape(text[pos:]))
    result = "".join(out).strip()
    if re.match(r"[a-z]{2,}\b", result):      # a word, not a symbol such as "k," or "g1,"
        result = result[:1].upper() + result[1:]
    if sentence and result and result[-1] not in ".)":
        result += "."
    return result


def _section_title(title: str) -> str:
    title = _PAPER_SECTION.sub(r"(paper §\1)", title)
    return prose(title, sentence=False) if title else "Other knobs"


def _note_links(text: str, names) -> str:
    """``KNOB_DOC`` texts are Markdown already: link the knobs they name in backticks."""
    return re.sub(r"`(\w+)(=[^`]*)?`",
                  lambda m: f"[`{m.group(0)[1:-1]}`](#{LABEL_PREFIX}{m.group(1)})" if m.group(1) in names
                  else m.group(0), text)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_knob(knob: Knob, names=()) -> str:
    """One knob's entry: label, heading, a row of type / default / allowed values / symbol, and
    what it changes."""
    from trilemma_moe.config_doc import KNOB_DOC
    doc = KNOB_DOC.get(knob.name)
    allowed = _note_links(doc.allowed.describe(), names) if doc else "(not documented in config_doc.KNOB_DOC)"
    symbol = _escape(doc.symbol) if doc else "?"
    lines = [
        f"({LABEL_PREFIX}{knob.name})=",
        f"### `{knob.name}`",
        "",
        "| type | default | allowed | paper |",
        "|---|---|---|---|",
        f"| `{_cell(knob.type)}` | `{_cell(default_text(knob.default))}` | {_cell(allowed)} | {symbol} |",
        "",
        prose(knob.description, names, own=knob.name) or "(no comment in config.py)",
        "",
    ]
    return "\n".join(lines)


def render_markdown(cls=None) -> str:
    """The whole generated reference as MyST Markdown: a level-2 heading per section of the
    class, a level-3 heading per knob (see :func:`render_knob`)."""
    entries = knobs(cls)
    names = {k.name for k in entries}
    out: List[str] = []
    section = None
    for knob in entries:
        if knob.section != section:
            section = knob.section
            out += [f"## {_section_title(section)}", ""]
        out.append(render_knob(knob, names))
    return "\n".join(out)


class ConfigReference(SphinxDirective):
    """``{trilemma-config-reference}``: the generated knob reference, parsed in place."""
    has_content = False

    def run(self) -> List[nodes.Node]:
        import trilemma_moe.config
        import trilemma_moe.config_doc
        for module in (trilemma_moe.config, trilemma_moe.config_doc):
            self.env.note_dependency(inspect.getsourcefile(module))
        text = render_markdown()
        container = nodes.container()
        self.state.nested_parse(StringList(text.splitlines(), source=self.get_source_info()[0]),
                                self.content_offset, container, match_titles=True)
        return container.children


def setup(app):
    app.add_directive("trilemma-config-reference", ConfigReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
