"""The `trimdb` command group: lazy command loading, logging set-up and the translation of library errors."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from trimdb import __version__
from trimdb.errors import TrimdbError

# Each command's module loads when the command runs, so `trimdb sql` and `trimdb info` skip the
# seconds that torch takes to import. `trimdb --help` loads them all for their one-line help.
COMMANDS = {
    "warmup": "cli.warmup_command:warmup",
    "index": "cli.index_command:index",
    "query": "cli.query_command:query",
    "sql": "cli.sql_command:sql",
    "export": "cli.sql_command:export",
    "migrate": "cli.sql_command:migrate",
    "compact": "cli.sql_command:compact",
    "merge": "cli.sql_command:merge",
    "ann": "cli.sql_command:ann",
    "info": "cli.info_command:info",
    "explain": "cli.explain_command:explain",
    "report": "cli.explain_command:report",
}


class TrimdbGroup(click.Group):
    """A group that loads its commands on first use and turns trimdb's own exceptions into one-line errors."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TrimdbError as error:
            raise click.ClickException(str(error)) from error


@click.group(cls=TrimdbGroup)
@click.version_option(__version__, prog_name="trimdb")
@click.option("-v", "--verbose", count=True, help="Log more: -v for debug messages from trimdb.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
def cli(verbose: int, quiet: bool) -> None:
    """Select the instruction-tuning samples that best teach a target task (TRIM).

    \b
    trimdb index pool.jsonl --db pool.duckdb          forward passes over the pool, once
    trimdb query --db pool.duckdb --task gsm8k=gsm8k.jsonl --budget 5%
    trimdb sql --db pool.duckdb "SELECT * FROM selected LIMIT 5"
    trimdb export --db pool.duckdb --task gsm8k -o coreset.jsonl
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("trimdb").setLevel(level)


def all_commands() -> dict[str, click.Command]:
    """Return every command of the group by name, loading the modules of those not loaded yet."""
    ctx = click.Context(cli)
    return {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}


def main() -> None:
    cli(prog_name="trimdb")
