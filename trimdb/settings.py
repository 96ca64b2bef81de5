"""Settings that change what trimdb stores or how it scores, with the reason for each default.

Every run stores its resolved settings as JSON, so a result can be traced to the switches that
produced it. The defaults follow the TRIM method (Nagaraj et al., "TRIM: Token-wise
Attention-Derived Saliency for Data-Efficient Instruction Tuning", arXiv:2510.07118, 2025) and the
choices trimdb makes where the paper leaves them open.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from trimdb.errors import SettingsError

ROW_SALIENCY_FORMS = ("normalized", "inverse")
SCOPES = ("all", "response", "prompt")
DTYPES = ("float32", "bfloat16")
# Selection methods of `trimdb query --method`: TRIM, the baselines of trimdb.baselines, and less (trimdb.less).
METHODS = ("trim", "random", "bm25", "embedding", "less")

# The paper's inverse-entropy row saliency adds this constant to avoid dividing by zero.
INVERSE_EPSILON = 1e-6
# A fingerprint whose weighted sum is shorter than this has no direction and is dropped.
MIN_FINGERPRINT_NORM = 1e-8


@dataclass(frozen=True)
class SaliencySettings:
    """Switches of the saliency stage: which layers, which row form, and the blend weights."""

    # The paper averages the last 4 layers; later layers carry the most task-specific attention.
    layers: int = 4
    # "normalized" divides entropy by log(visible keys), so early tokens gain nothing from
    # seeing few keys. "inverse" is 1 / (entropy + epsilon), the paper's literal form.
    row_saliency: str = "normalized"
    # Equal blend of row (sharpness) and column (attention received) saliency, as in the paper.
    row_weight: float = 0.5
    column_weight: float = 0.5

    def validate(self) -> None:
        if self.layers < 1:
            raise SettingsError(f"layers must be at least 1, got {self.layers}")
        if self.row_saliency not in ROW_SALIENCY_FORMS:
            raise SettingsError(
                f"row saliency must be one of {', '.join(ROW_SALIENCY_FORMS)}, got {self.row_saliency!r}"
            )
        if self.row_weight < 0 or self.column_weight < 0 or self.row_weight + self.column_weight == 0:
            raise SettingsError(
                f"saliency weights must be non-negative and not both 0, got row {self.row_weight} "
                f"and column {self.column_weight}"
            )


@dataclass(frozen=True)
class ScoreSettings:
    """Switches of the scoring stage: scope, unseen-class penalty and pooling weights."""

    saliency: SaliencySettings = field(default_factory=SaliencySettings)
    # Tokens counted in both stages: "all" is prompt and response content, never template tokens.
    scope: str = "all"
    # Factor on the nearest fingerprint for a token class the target never shows. The method's
    # 0.5 halves that credit, but 1.0 (no penalty) gave the most related coresets for every target
    # and budget in the quality benchmark's ablations (benchmarks/results/quality.md).
    unseen_penalty: float = 1.0
    # Sample score = mean_weight * mean token score + max_weight * max token score.
    mean_weight: float = 0.5
    max_weight: float = 0.5

    def validate(self) -> None:
        self.saliency.validate()
        if self.scope not in SCOPES:
            raise SettingsError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if not 0 < self.unseen_penalty <= 1:
            raise SettingsError(f"unseen penalty must be in (0, 1], got {self.unseen_penalty}")
        if self.mean_weight < 0 or self.max_weight < 0 or self.mean_weight + self.max_weight == 0:
            raise SettingsError(
                f"pooling weights must be non-negative and not both 0, got mean {self.mean_weight} "
                f"and max {self.max_weight}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class IndexSettings:
    """Switches of the index pass: rendering, truncation, dtype, batching and stored saliency."""

    # Longer samples keep their response and lose prompt tokens first; 1024 covers most
    # instruction-tuning samples while bounding attention memory.
    max_length: int = 1024
    dtype: str = "float32"
    # Saliency of candidate tokens is stored for inspection; it needs eager attention.
    store_saliency: bool = True
    saliency: SaliencySettings = field(default_factory=SaliencySettings)
    # Upper bound on padded tokens per forward batch; bounds activation memory.
    batch_tokens: int = 8192
    # Render samples with the plain template even when the tokenizer has a chat template.
    plain_template: bool = False
    # Vector codec of the stored token states (trimdb.codecs.CODECS), or "auto" (trimdb.codecs.resolve_codec).
    codec: str = "auto"

    def validate(self) -> None:
        self.saliency.validate()
        if self.max_length < 8:
            raise SettingsError(f"max length must be at least 8 tokens, got {self.max_length}")
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from trimdb.codecs import validate_codec

        validate_codec(self.codec)
        if self.batch_tokens < self.max_length:
            raise SettingsError(
                f"batch tokens ({self.batch_tokens}) must be at least the max length ({self.max_length})"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "IndexSettings":
        values = dict(values)
        values["saliency"] = SaliencySettings(**values.get("saliency", {}))
        # Indexes written before codecs existed stored float32 vectors.
        values.setdefault("codec", "float32")
        return cls(**values)


@dataclass(frozen=True)
class SelectionSettings:
    """Switches of the selection stage: budget split over tasks and deduplication."""

    # "equal", "proportional" (to each task's number of target samples), or task weights.
    split: str | dict = "equal"
    # Keep a sample out when its normalized text equals that of a sample already selected.
    exact_dedup: bool = False
    # Keep a sample out when the cosine of its mean-pooled token vectors to a selected sample's
    # reaches this value; None disables it.
    near_dedup_threshold: float | None = None

    def validate(self) -> None:
        threshold = self.near_dedup_threshold
        if threshold is not None and not 0 < threshold <= 1:
            raise SettingsError(f"near-duplicate threshold must be in (0, 1], got {threshold}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_budget(text: str | int) -> tuple[str, float]:
    """Parse "5%" into ("fraction", 0.05) and "200" into ("count", 200)."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            percent = float(raw[:-1])
            if not 0 < percent <= 100:
                raise ValueError
            return "fraction", percent / 100
        count = int(raw)
        if count < 1:
            raise ValueError
        return "count", float(count)
    except ValueError:
        raise SettingsError(
            f"invalid budget {raw!r}: give a percentage in (0, 100] such as 5% or a sample count such as 200"
        ) from None


def budget_size(budget: tuple[str, float], n_samples: int) -> int:
    """Return how many samples a budget selects from a pool of ``n_samples``."""
    kind, value = budget
    if kind == "fraction":
        return min(n_samples, math.ceil(value * n_samples))
    return min(n_samples, int(value))
