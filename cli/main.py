"""The `trimdb` command group: logging set-up and the translation of library errors."""

from __future__ import annotations

import logging
import sys

import click

from trimdb import __version__
from trimdb.errors import TrimdbError


class TrimdbGroup(click.Group):
    """A group that turns trimdb's own exceptions into one-line errors with exit code 1."""

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
    # transformers draws a bar for every weight load; trimdb draws its own for long work.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _register() -> None:
    from cli.explain_command import explain, report
    from cli.index_command import index
    from cli.info_command import info
    from cli.query_command import query
    from cli.sql_command import ann, compact, export, merge, migrate, sql
    from cli.warmup_command import warmup

    for command in (warmup, index, query, sql, export, migrate, compact, merge, ann, info, explain, report):
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="trimdb")
