"""The README's command table is the command line: every command has a row, and each row names exactly the options
that command's --help lists (walked from the click tree, so a new option or command without a README row fails here)."""

from __future__ import annotations

import re

import click

from dcr_pipelines.cli import main
from dcr_pipelines.lib.settings import PROJECT_ROOT


def _commands(cmd: click.Command, path: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """'query run' -> the options --help lists (each by its first name)."""
    if isinstance(cmd, click.Group):
        out: dict[str, set[str]] = {}
        for name, sub in cmd.commands.items():
            out |= _commands(sub, (*path, name))
        return out
    return {" ".join(path): {p.opts[0] for p in cmd.params if isinstance(p, click.Option) and not p.hidden and p.opts[0] != "--help"}}


def _readme_rows() -> dict[str, set[str]]:
    """'query run' -> the options its README row names; a row may hold several commands (`a|b`, `x / y`)."""
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("## Command line"):]
    table = table[: table.index("\n\n", table.index("| command |"))]
    rows: dict[str, set[str]] = {}
    for line in table.splitlines():
        if not line.startswith("| `dcr "):
            continue
        cell = line.split(" | ")[0].removeprefix("| ")
        for usage in re.findall(r"`dcr ([^`]+)`", cell):
            words = []
            for word in usage.split():
                if not re.fullmatch(r"[a-z][a-z\\|]*", word):
                    break
                words.append(word)
            options = set(re.findall(r"(--[a-z][a-z-]*)", usage))
            heads = [words[:1]] if len(words) == 1 else [[words[0], w] for w in words[1].replace("\\", "").split("|")]
            for head in heads:
                rows.setdefault(" ".join(head), set()).update(options)
    return rows


def test_every_command_has_a_readme_row_naming_exactly_its_options() -> None:
    commands, rows = _commands(main), _readme_rows()
    assert set(commands) - set(rows) == set(), "commands without a row in the README's command table"
    assert set(rows) - set(commands) == set(), "README rows for commands that do not exist"
    problems = {name: {"missing from the README": sorted(commands[name] - rows[name]), "not an option": sorted(rows[name] - commands[name])}
                for name in commands if commands[name] != rows[name]}
    assert not problems, problems


def test_the_reader_sees_a_missing_option() -> None:
    """Not vacuous: the row of `dcr release` lists its options, so dropping one from the README would fail."""
    assert {"--param", "--dry-run", "--chart", "--format", "--credentials"} <= _readme_rows()["release"]
    assert _readme_rows()["member add"] == _readme_rows()["member rotate"]
