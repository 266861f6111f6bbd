"""The ``trainer-flags`` directive: every flag of ``python -m trilemma_moe.train``, read from the
trainer's own argparse parser at build time, so the page cannot fall behind the code.

Help strings are inserted as plain text nodes (never parsed as markup): whatever a help string
holds, it cannot break the strict build.
"""
from __future__ import annotations

import argparse

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def flag_sections(parser: argparse.ArgumentParser) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """``[(group title, [(flags, default, help), ...]), ...]`` in the parser's order, ``--help``
    left out; a flag's ``%(default)s``-style help is expanded as argparse would."""
    sections = []
    for group in parser._action_groups:   # argparse keeps no public list of groups
        rows = []
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(action.option_strings) or action.dest
            if action.choices is not None:
                flags += " {" + ",".join(str(c) for c in action.choices) + "}"
            elif action.nargs != 0:
                flags += " " + (action.metavar or action.dest.upper())
            default = "" if action.default in (None, argparse.SUPPRESS, False) else repr(action.default)
            help_text = (action.help or "") % {"default": action.default, "prog": parser.prog}
            rows.append((flags, default, help_text))
        if rows:
            sections.append((group.title or "", rows))
    return sections


class TrainerFlags(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        from trilemma_moe.training import build_parser

        out: list[nodes.Node] = []
        for title, rows in flag_sections(build_parser()):
            out.append(nodes.rubric(text=title))
            dl = nodes.definition_list()
            for flags, default, help_text in rows:
                term = nodes.term()
                term += nodes.literal(text=flags)
                if default:
                    term += nodes.Text("  (default ")
                    term += nodes.literal(text=default)
                    term += nodes.Text(")")
                definition = nodes.definition()
                definition += nodes.paragraph(text=help_text)
                dl += nodes.definition_list_item("", term, definition)
            out.append(dl)
        return out


def setup(app):
    app.add_directive("trainer-flags", TrainerFlags)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
