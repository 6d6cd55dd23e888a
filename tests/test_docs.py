"""The documentation stays true to the code: every ``mra-export`` command line in it parses with the
CLI's own parser, the README's synopsis names every subcommand, and every relative link resolves
to a file (and a heading, for links into Markdown files).

Commands are parsed, never run. A synopsis line (``[--opset N]``, ``portable|plugin``) is parsed
with its optional parts included, the first of each set of alternatives and a sample value for
each placeholder of a typed option, after each alternative has been checked against the option's
choices.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from mra_export.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
COMMAND_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                ROOT / "engines" / "README.md"]
LINK_DOCS = [*COMMAND_DOCS, ROOT / "plugins" / "README.md"]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!\!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^()\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
SAMPLE_BY_TYPE = {int: "1", float: "1.0"}


def fenced_lines(text: str):
    """(line number, line) of every line inside a fenced code block."""
    inside = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            inside = not inside
        elif inside:
            yield number, line


def command_lines(text: str) -> list[tuple[int, str]]:
    """Every ``mra-export ...`` line of the code blocks, continuations (``\\``) joined, comments
    dropped; a synopsis's follow-on lines (indented, starting with ``[``) joined too."""
    commands: list[list] = []
    previous = None  # the line before, within a code block
    for number, line in fenced_lines(text):
        stripped = line.strip()
        in_command = commands and previous == number - 1
        if in_command and (commands[-1][1].endswith("\\") or
                           (stripped.startswith("[") and "[" in commands[-1][1])):
            commands[-1][1] = commands[-1][1].rstrip("\\").strip() + " " + stripped
        elif stripped.startswith("mra-export "):
            commands.append([number, stripped])
        else:
            continue
        previous = number
    return [(number, re.sub(r"\s+#.*$", "", command).rstrip("\\").strip())
            for number, command in commands]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def synopsis_argv(command: str, parser: argparse.ArgumentParser) -> list[str]:
    """A synopsis line as an argv that exercises every option it names: brackets dropped, each
    ``a|b`` checked against the option's choices and replaced by ``a``, placeholders of typed
    options replaced by a sample value."""
    words = shlex.split(command.replace("[", " ").replace("]", " "))[1:]
    subcommand = subparsers(parser).get(words[0])
    if subcommand is None:
        raise AssertionError(f"unknown subcommand {words[0]!r}")
    options = {s: a for a in subcommand._actions for s in a.option_strings}
    argv = [words[0]]
    for word in words[1:]:
        previous = options.get(argv[-1])
        if previous is not None and previous.nargs != 0:
            alternatives = word.split("|")
            if previous.choices is not None:
                unknown = [a for a in alternatives if a not in previous.choices]
                if unknown:
                    raise AssertionError(f"{argv[-1]} has no choice {unknown[0]!r}")
            word = SAMPLE_BY_TYPE.get(previous.type, alternatives[0])
        argv.append(word)
    return argv


def parse(command: str, parser: argparse.ArgumentParser) -> str | None:
    """None if ``command`` parses, else why not (argparse's own message)."""
    try:
        if "[" in command or "|" in command:
            argv = synopsis_argv(command, parser)
        else:
            argv = shlex.split(command)[1:]
        parser.parse_args(argv)
    except AssertionError as error:
        return str(error)
    except SystemExit:
        return "argparse refused it (its message is above)"
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def prose(markdown: Path, inline_code: bool = False) -> str:
    """The file's text with code blocks blanked and, unless ``inline_code``, inline code removed
    (line numbers kept)."""
    lines = markdown.read_text().splitlines()
    for number, _ in fenced_lines(markdown.read_text()):
        lines[number - 1] = ""
    for number, line in enumerate(lines):  # the fences themselves
        if FENCE.match(line.strip()):
            lines[number] = ""
    text = "\n".join(lines)
    return text if inline_code else INLINE_CODE.sub("", text)


def anchors(markdown: Path) -> set[str]:
    found: set[str] = set()
    for line in prose(markdown, inline_code=True).splitlines():  # code text is in the anchor
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            anchor, count = base, 1
            while anchor in found:  # GitHub numbers repeated headings
                anchor, count = f"{base}-{count}", count + 1
            found.add(anchor)
    return found


def broken_links(markdown: Path) -> list[str]:
    """Every relative link of ``markdown`` (outside code) whose file or heading is missing."""
    text = prose(markdown)
    problems = []
    for match in [*LINK.finditer(text), *IMAGE.finditer(text)]:
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        where = f"{markdown.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
        path, _, anchor = target.partition("#")
        resolved = (markdown.parent / path).resolve() if path else markdown
        if not resolved.exists():
            problems.append(f"{where}: {target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: {target}: no heading #{anchor} in "
                            f"{resolved.relative_to(ROOT)}")
    return problems


@pytest.fixture(scope="module")
def cli_parser():
    return _parser()


@pytest.mark.parametrize("doc", COMMAND_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_parses_with_the_cli(doc, cli_parser):
    commands = command_lines(doc.read_text())
    failures = [f"{doc.relative_to(ROOT)}:{number}: {command}\n  {problem}"
                for number, command in commands
                if (problem := parse(command, cli_parser)) is not None]
    assert not failures, "\n".join(failures)


def test_the_readme_shows_commands_and_its_synopsis_names_every_subcommand(cli_parser):
    commands = command_lines((ROOT / "README.md").read_text())
    assert len(commands) >= 10  # the synopsis and the worked path, found by the reader above
    named = {command.split()[1] for _, command in commands}
    missing = sorted(set(subparsers(cli_parser)) - named)
    assert not missing, f"README.md's command lines never show: {', '.join(missing)}"


@pytest.mark.parametrize("doc", LINK_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    problems = broken_links(doc)
    assert not problems, "\n".join(problems)


def test_the_readme_fits_in_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


# The checks themselves: each must catch what it is there to catch.

@pytest.mark.parametrize("command", [
    "mra-export exprot --model m --out o",                          # subcommand misspelled
    "mra-export export --model m --out o --flavor plugin",          # option misspelled
    "mra-export export --model m",                                  # a required option left out
    "mra-export export --model m --out o --dtype fp8",              # not one of the choices
    "mra-export export --model DIR --out OUT [--dtype fp32|fp64]",  # a synopsis choice
    "mra-export bench [--layers N] [--budgte S]",                   # a synopsis option
    "mra-export build --onnx x --workspace lots",                   # an int option's value
])
def test_a_misspelled_command_is_caught(command, cli_parser):
    assert parse(command, cli_parser) is not None


def test_commands_are_read_across_continuations_and_synopsis_lines():
    text = ("```\nmra-export build --onnx o/model.onnx \\\n    --plugin p.so --out e\n"
            "mra-export build  --onnx X [--precision fp16]\n                  [--workspace MB]\n"
            "echo mra-export export\n```\nmra-export export --model outside-a-code-block\n")
    assert command_lines(text) == [
        (2, "mra-export build --onnx o/model.onnx --plugin p.so --out e"),
        (4, "mra-export build  --onnx X [--precision fp16] [--workspace MB]")]


def test_a_broken_link_or_heading_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# A heading, with `code`\n")
    doc = tmp_path / "doc.md"
    doc.write_text("[fine](other.md#a-heading-with-code) [gone](missing.md) "
                   "[no such heading](other.md#nowhere) `[in code](missing.md)` "
                   "[web](https://example.com)\n```\n[in a block](missing.md)\n```\n")
    assert broken_links(doc) == ["doc.md:1: missing.md: no such file",
                                 "doc.md:1: other.md#nowhere: no heading #nowhere in other.md"]
