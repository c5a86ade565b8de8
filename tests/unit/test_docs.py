"""The documentation cannot rot silently: what README.md and docs/*.md quote must be true of the code.

- Every command quoted in a shell code block or an inline code span that starts with ``hlf-actors``,
  ``python -m hlf_actors``, ``scripts/replay.py`` or ``scripts/break_glass_sync.py`` (and each row of README's
  command table) is run as ``<command> --help`` once per distinct subcommand, in a subprocess with the Python that
  runs the tests (``.venv``'s, as ``scripts/test`` runs it); no database is needed. Each must exit 0, and its help
  must name every option the docs pass to that subcommand. Every ``hlf-actors`` subcommand must be quoted somewhere.
- Every ``HLF_*`` variable named exists in ``hlf_actors/config.py``'s reader or in ``../shared/INTERFACE.md``.
- Every relative link resolves, to a file and, for ``#anchor``, to a heading of it (GitHub's slugs).
- Every ``tests/….py::test_name`` named exists, and every metric in the runbook's table is one ``/metrics`` serves.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hlf_actors.cli import _parser
from hlf_actors.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INTERFACE = ROOT.parent / "shared" / "INTERFACE.md"

# A fenced block, also indented inside a list item; an inline code span may run over a line break (CommonMark).
_FENCE = re.compile(
    r"^[ \t]*(?P<fence>```|~~~)(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^[ \t]*(?P=fence)[ \t]*$", re.M | re.S
)
_SHELL = {"", "sh", "bash", "shell", "console"}
_INLINE = re.compile(r"`([^`]+)`")
_ENTRY = re.compile(
    r"(?:^|(?<=[\s(]))(?P<entry>hlf-actors|python3? -m hlf_actors|(?:\./)?scripts/(?:replay|break_glass_sync)\.py)"
    r"(?=\s|$)(?P<rest>.*)$"
)
_ASSIGNMENTS = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*")
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_VARIABLE = re.compile(r"\bHLF_[A-Z0-9_]*[A-Z0-9]\b")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return _FENCE.sub("", text)


# -- commands -------------------------------------------------------------------------------------------------


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf subcommand of the CLI, e.g. ("status",), ("dead-letters", "requeue")."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = list(_command_paths(sub, (*prefix, name)))
                yield from nested or [(*prefix, name)]


LEAVES = set(_command_paths(_parser()))
KNOWN_PATHS = {leaf[:i] for leaf in LEAVES for i in range(1, len(leaf) + 1)}


def _entry_key(entry: str) -> str:
    if "break_glass_sync" in entry:
        return "scripts/break_glass_sync.py"
    if "replay.py" in entry:
        return "scripts/replay.py"
    return "hlf-actors"


def _quoted(entry: str, rest: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """(the command's subcommand path, the options it passes) from the text after the entry point."""
    rest = re.split(r"\s#", rest, maxsplit=1)[0]  # a shell comment
    rest = re.split(r"\s(?:\|\||&&|\||;|>)\s", rest, maxsplit=1)[0]  # the next command of a pipeline
    options = frozenset(_OPTION.findall(rest))
    path: tuple[str, ...] = (_entry_key(entry),)
    if path[0] == "hlf-actors":
        words = [w for w in rest.split() if not w.startswith(("-", "[", "<"))]
        sub: tuple[str, ...] = ()
        for word in words:
            if (*sub, word) in KNOWN_PATHS:
                sub = (*sub, word)
            else:
                break
        if not sub and words and not rest.lstrip().startswith("-"):
            sub = (words[0],)  # unknown: kept, so that its --help fails and names it
        path += sub
    return path, options


def _commands_in(path: Path) -> Iterator[tuple[tuple[str, ...], frozenset[str], str]]:
    """(subcommand path, options, where) for each command the file quotes."""
    text = _read(path)
    for block in _FENCE.finditer(text):
        if block.group("lang") not in _SHELL:
            continue
        line_no = text.count("\n", 0, block.start("body")) + 1
        for i, line in enumerate(block.group("body").replace("\\\n", " ").splitlines()):
            found = _ENTRY.search(line.strip())
            if found:
                sub, options = _quoted(found.group("entry"), found.group("rest"))
                yield sub, options, f"{path.name}:{line_no + i}: {line.strip()}"
    prose = _prose(text)
    for span in _INLINE.finditer(prose):
        code = _ASSIGNMENTS.sub("", " ".join(span.group(1).split()))
        found = _ENTRY.match(code)
        if found:
            sub, options = _quoted(found.group("entry"), found.group("rest"))
            if sub != ("hlf-actors",) or options:  # a bare `hlf-actors` names the program; it is no command
                yield sub, options, f"{path.name}: `{code}`"
    if path.name == "README.md":
        yield from _command_table(prose)


def _command_table(prose: str) -> Iterator[tuple[tuple[str, ...], frozenset[str], str]]:
    """README's `| command | what it does |` table: each first cell is an `hlf-actors` subcommand."""
    in_table = False
    for line in prose.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if not cells:
            in_table = False
            continue
        if cells[0] == "command":
            in_table = True
            continue
        if not in_table or set(cells[0]) <= set("-: "):
            continue
        spans = _INLINE.findall(line.split("|")[1])
        for i, span in enumerate(spans):
            if span.startswith("--"):
                continue
            extra = " ".join(s for s in spans[i + 1 :] if s.startswith("--"))
            sub, options = _quoted("hlf-actors", f" {span} {extra}")
            yield sub, options, f"README.md command table: {line.strip()}"


def _argv(path: tuple[str, ...]) -> list[str]:
    if path[0] == "hlf-actors":
        return [sys.executable, "-m", "hlf_actors", *path[1:], "--help"]
    return [sys.executable, str(ROOT / path[0]), "--help"]


def _help(path: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HLF_")}
    env["COLUMNS"] = "200"  # no wrapping inside option names
    return subprocess.run(_argv(path), capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)


def _all_quoted() -> dict[tuple[str, ...], dict[str, list[str]]]:
    """subcommand path → option → where the docs pass it ("" collects the places that quote the command)."""
    quoted: dict[tuple[str, ...], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for doc in DOCS:
        for path, options, where in _commands_in(doc):
            quoted[path][""].append(where)
            for option in options:
                quoted[path][option].append(where)
    return quoted


def test_every_quoted_command_answers_help_and_knows_the_options_the_docs_pass() -> None:
    quoted = _all_quoted()
    # The extraction itself must have found the commands, or this test would pass on nothing.
    assert ("scripts/break_glass_sync.py",) in quoted and ("scripts/replay.py",) in quoted
    assert len([p for p in quoted if p[0] == "hlf-actors"]) >= len(LEAVES)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        helps = dict(zip(quoted, pool.map(_help, quoted), strict=True))
    problems: list[str] = []
    for path, options in sorted(quoted.items()):
        result = helps[path]
        command = " ".join(path)
        first_place = options[""][0]
        if result.returncode != 0:
            stderr = result.stderr.strip().splitlines()
            problems.append(
                f"`{command} --help` exited {result.returncode} ({stderr[-1] if stderr else ''}); "
                f"quoted at {first_place}"
            )
            continue
        for option, places in sorted(options.items()):
            if option and not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.stdout):
                problems.append(f"`{command}` has no option {option}; quoted at {places[0]}")
    assert not problems, "the docs quote commands that do not work:\n" + "\n".join(problems)


def test_every_subcommand_is_quoted_somewhere() -> None:
    quoted = {path[1:] for path in _all_quoted() if path[0] == "hlf-actors"}
    missing = sorted(" ".join(leaf) for leaf in LEAVES if leaf not in quoted)
    assert not missing, f"hlf-actors subcommands no doc quotes: {missing}"


def test_a_command_that_does_not_exist_is_caught() -> None:
    """The extraction and the help check, on made-up text: a wrong option and a wrong subcommand are both seen."""
    sub, options = _quoted("hlf-actors", " dead-letters requeue 24 --all --everything   # comment --not-this")
    assert sub == ("hlf-actors", "dead-letters", "requeue") and options == {"--all", "--everything"}
    result = _help(("hlf-actors", "no-such-command"))
    assert result.returncode != 0


# -- variables, links, tests, metrics ----------------------------------------------------------------------------


def test_every_hlf_variable_named_in_the_docs_exists() -> None:
    in_config = set(_VARIABLE.findall(_read(ROOT / "hlf_actors" / "config.py")))
    # README also tells how the test suite finds its database: variables the test fixtures read are real too.
    in_tests = set(_VARIABLE.findall(_read(ROOT / "tests" / "conftest.py")))
    unknown: dict[str, list[str]] = defaultdict(list)
    for doc in DOCS:
        allowed = in_config | (in_tests if doc.name == "README.md" else set())
        for name in set(_VARIABLE.findall(_read(doc))) - allowed:
            unknown[name].append(doc.name)
    if unknown:
        assert INTERFACE.is_file(), f"{sorted(unknown)} are not in config.py, and {INTERFACE} is not there to check"
        in_interface = set(_VARIABLE.findall(_read(INTERFACE)))
        unknown = {k: v for k, v in unknown.items() if k not in in_interface}
    assert not unknown, f"variables no reader knows (neither config.py nor INTERFACE.md): {dict(unknown)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: code and link text kept, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = defaultdict(int)
    anchors = set()
    for heading in _HEADING.findall(_prose(_read(path))):
        slug = _slug(heading)
        anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def test_relative_links_resolve_to_files_and_headings() -> None:
    broken: list[str] = []
    checked = 0
    for doc in DOCS:
        for target in _LINK.findall(_INLINE.sub("", _prose(_read(doc)))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            linked = (doc.parent / file_part).resolve() if file_part else doc
            if not linked.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{doc.name}: {target} (no heading #{anchor} in {linked.name})")
    assert checked >= 10, "found almost no links: the link pattern is broken"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_test_named_in_the_docs_exists() -> None:
    named = [(doc.name, file, test) for doc in DOCS for file, test in _TEST_REF.findall(_read(doc))]
    assert len(named) >= 6, "architecture.md names the tests of its invariants"
    missing = [
        f"{doc}: {file}::{test}"
        for doc, file, test in named
        if not (ROOT / file).is_file() or not re.search(rf"^(async )?def {test}\(", _read(ROOT / file), re.M)
    ]
    assert not missing, "tests named in the docs that do not exist:\n" + "\n".join(missing)


def test_every_metric_in_the_runbook_is_served() -> None:
    runbook = _read(ROOT / "docs" / "operations.md")
    section = runbook.split("## Health and metrics", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `hlf_")]
    names = {name for line in table for name in re.findall(r"`(hlf_[a-z_]+)", line.split("|")[1])}
    assert len(names) >= 8
    served = Metrics().render().decode()
    missing = sorted(n for n in names if not re.search(rf"^# TYPE {n} ", served, re.M))
    assert not missing, f"metrics the runbook names that /metrics does not serve: {missing}"


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Reading one mentor's story", "reading-one-mentors-story"),
        ("`hlf_sync_failure`", "hlf_sync_failure"),
        ("Public website (Power Pages) cache", "public-website-power-pages-cache"),
        ("Break-glass: the service cannot run", "break-glass-the-service-cannot-run"),
    ],
)
def test_slugs_are_githubs(heading: str, slug: str) -> None:
    assert _slug(heading) == slug
