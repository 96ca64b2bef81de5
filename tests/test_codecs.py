"""Vector codecs: what "auto" resolves to, how well each codec decodes, and the codec an index keeps."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.conftest import POOL, write_jsonl
from trimdb.codecs import AUTO, AUTO_CODEC, AUTO_MIN_VECTORS, CODECS, build_codec, resolve_codec
from trimdb.errors import SettingsError
from trimdb.settings import IndexSettings
from trimdb.store import Store

# Cosine between a unit vector and its decoded copy, at least, for D = 64 Gaussian vectors.
MIN_COSINE = {"float32": 0.999999, "float16": 0.9999, "sq8": 0.999, "sq4": 0.95, "pca-sq8": 0.6, "pq2": 0.95,
              "pq4": 0.85}


def test_auto_resolves_by_first_segment_size():
    assert resolve_codec(AUTO, AUTO_MIN_VECTORS) == AUTO_CODEC
    assert resolve_codec(AUTO, AUTO_MIN_VECTORS - 1) == "float32"
    assert resolve_codec("pq2", 10) == "pq2"
    assert IndexSettings().codec == AUTO
    with pytest.raises(SettingsError, match="unknown codec 'zip'"):
        resolve_codec("zip", 10)


@pytest.mark.parametrize("codec", list(CODECS))
def test_codec_decodes_close_to_input(codec):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index, _ = build_codec(codec, vectors)
    index.add(vectors)
    decoded = index.reconstruct_n(0, len(vectors))
    cosine = np.sum(vectors * decoded, axis=1) / np.linalg.norm(decoded, axis=1)
    assert cosine.mean() >= MIN_COSINE[codec]


def catalog_codec(db) -> str:
    with Store(db, read_only=True) as store:
        return store.catalog()["index_settings"]["codec"]


def index(db, model, corpus, *extra):
    return CliRunner().invoke(cli, ["index", str(corpus), "--db", str(db), "--model", str(model), "--layers", "2",
                                    "--no-progress", *extra])


def test_small_index_stores_float32_by_default(tmp_path, tiny_model_dir, pool_file):
    db = tmp_path / "pool.duckdb"
    result = index(db, tiny_model_dir, pool_file)
    assert result.exit_code == 0, result.output
    assert catalog_codec(db) == "float32"


def test_append_keeps_the_index_codec(tmp_path, tiny_model_dir):
    db = tmp_path / "pool.duckdb"
    first = write_jsonl(tmp_path / "first.jsonl", POOL[:8])
    second = write_jsonl(tmp_path / "second.jsonl", POOL[8:])
    assert index(db, tiny_model_dir, first, "--codec", "sq8").exit_code == 0
    result = index(db, tiny_model_dir, second, "--append")
    assert result.exit_code == 0, result.output
    assert catalog_codec(db) == "sq8"
    mismatch = index(db, tiny_model_dir, second, "--append", "--codec", "float16")
    assert mismatch.exit_code != 0
    assert "codec: index 'sq8', now 'float16'" in mismatch.output
