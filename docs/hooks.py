"""mkdocs hook: the CLI and settings reference pages are rendered from the code at build time, so
they cannot drift from what `ortzo --help` prints and what a config file accepts.

A page holds a marker line, `<!-- generated: cli -->` or `<!-- generated: settings -->`, that
this hook replaces with the text. Listed under `hooks:` in mkdocs.yml."""
from __future__ import annotations

import argparse
import inspect
import os
import typing

MARKERS = {"<!-- generated: cli -->": "cli", "<!-- generated: settings -->": "settings"}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, what in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, cli_reference() if what == "cli" else settings_reference())
    return markdown


def cli_reference() -> str:
    """`ortzo --help`, then each subcommand's `--help`, at a fixed width so the page is stable."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        from ortzo.cli import _parser

        parser = _parser()
        out = ["```text", parser.format_help().rstrip(), "```"]
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        seen: set[int] = set()
        for name, sub in (subs[0].choices.items() if subs else ()):
            if id(sub) in seen:  # an alias: the same parser again
                continue
            seen.add(id(sub))
            out += ["", f"## ortzo {name}", "", "```text", sub.format_help().rstrip(), "```"]
        return "\n".join(out)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _type(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _text(help: str) -> str:
    """Help text as Markdown shows it literally: `<split>` is not an HTML tag, `*` not emphasis
    (code spans, between backticks, are literal already)."""
    parts = help.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = (parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                    .replace("*", "\\*").replace("_", "\\_"))
    return "`".join(parts)


def settings_reference() -> str:
    """Every pydantic settings model in ortzo/config.py: its docstring, then each field's option name,
    type, default, whether a resumed run may change it, and its help text."""
    from pydantic import BaseModel

    from ortzo import config

    out = []
    for cls in vars(config).values():
        if not (inspect.isclass(cls) and issubclass(cls, BaseModel) and cls.__module__ == config.__name__
                and cls.model_fields):
            continue
        out += [f"## {cls.__name__}", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        for name, field in cls.model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            flags = ", ".join(f"`{f}`" for f in [f"--{name.replace('_', '-')}", *extra.get("flags", [])])
            default = "required" if field.is_required() else f"`{field.get_default(call_default_factory=True)!r}`"
            notes = [f"`{_type(field.annotation)}`", f"default {default}"]
            if extra.get("resumable"):
                notes.append("may change on `--resume`")
            out.append(f"- **`{name}`** ({flags}; {', '.join(notes)}): {_text(field.description or '')}")
        out.append("")
    return "\n".join(out)
