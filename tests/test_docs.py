"""The README and --help cover every command and option, and the README's commands exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.main import all_commands, cli

COMMANDS = all_commands()

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
COMMAND_IN_HEADING = re.compile(r"`trimdb ([a-z][a-z0-9-]*)`")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def readme_sections(text: str) -> list[tuple[str, str]]:
    """Split Markdown into (heading, body) pairs.

    A body runs to the next heading of the same or a higher level. Lines inside fenced code
    blocks are never headings.
    """
    headings, in_fence = [], False
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else HEADING.match(line)
        if match:
            headings.append((number, len(match.group(1)), match.group(2)))
    sections = []
    for index, (number, level, title) in enumerate(headings):
        end = next((n for n, other_level, _ in headings[index + 1:] if other_level <= level), len(lines))
        sections.append((title, "\n".join(lines[number + 1:end])))
    return sections


def command_sections(text: str) -> dict[str, str]:
    """Map each command named as `trimdb NAME` in a heading to its section's heading and body."""
    sections: dict[str, str] = {}
    for title, body in readme_sections(text):
        for name in COMMAND_IN_HEADING.findall(title):
            sections[name] = sections.get(name, "") + f"{title}\n{body}\n"
    return sections


def option_names(param: click.Parameter) -> list[str]:
    return [*param.opts, *getattr(param, "secondary_opts", [])]


def help_output(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def readme_text() -> str:
    return README.read_text(encoding="utf-8")


# Commands and options ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_help_text(name):
    assert (COMMANDS[name].help or "").strip(), f"`trimdb {name}` has no docstring for --help"


def test_readme_has_section_per_command(readme_text):
    documented = command_sections(readme_text)
    missing = sorted(name for name in COMMANDS if name not in documented)
    assert missing == [], f"README.md has no heading with `trimdb NAME` for: {', '.join(missing)}"


def test_help_lists_every_option():
    missing = []
    for name, command in [("", cli), *sorted(COMMANDS.items())]:
        output = help_output(*([name] if name else []))
        prefix = f"trimdb {name}".strip()
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            missing += [f"{prefix} {flag}" for flag in option_names(param) if flag not in output]
    assert missing == [], f"options missing from --help: {missing}"


def test_readme_shows_required_options(readme_text):
    """Every required option of a documented command appears in that command's README section."""
    sections = command_sections(readme_text)
    missing = []
    for name, command in sorted(COMMANDS.items()):
        if name not in sections:
            continue  # reported by test_readme_has_section_per_command
        for param in command.params:
            if isinstance(param, click.Option) and param.required:
                if not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", sections[name]) for flag in param.opts):
                    missing.append(f"trimdb {name} {'/'.join(param.opts)}")
    assert missing == [], f"required options missing from their README section: {missing}"


def test_readme_flags_exist(readme_text):
    """Every --flag in a command's README section is an option of one of the section's commands."""
    unknown = []
    for title, body in readme_sections(readme_text):
        names = [name for name in COMMAND_IN_HEADING.findall(title) if name in COMMANDS]
        if not names:
            continue
        known = {"--help"} | {flag for name in names for param in COMMANDS[name].params
                              for flag in option_names(param)}
        unknown += [f"{title}: {flag}" for flag in sorted(set(FLAG.findall(body))) if flag not in known]
    assert unknown == [], f"README sections mention flags that their commands lack: {unknown}"


# Quick start and CI ------------------------------------------------------------------------


def quick_start_targets(text: str) -> list[str]:
    """Return the make targets of the `make TARGET` lines in the Quick start section."""
    body = next(body for title, body in readme_sections(text) if title.strip().lower() == "quick start")
    return re.findall(r"^\s+make ([\w-]+)", body, flags=re.MULTILINE)


def test_quick_start_commands(readme_text):
    assert quick_start_targets(readme_text) == ["demo", "test"]


@pytest.mark.parametrize("target", ["demo", "test"])
def test_quick_start_target_in_makefile(target):
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(rf"^{target}\s*:", makefile, flags=re.MULTILINE), f"Makefile has no `{target}:` rule"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", ["demo", "test"])
def test_quick_start_target_resolves(target):
    """`make -n` resolves the target and its prerequisites and prints the recipe without running it."""
    result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_ci_runs_make_test():
    script = ROOT / ".ci" / "run"
    commands = [line.strip() for line in script.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in commands
    assert os.access(script, os.X_OK), f"{script} is not executable"
