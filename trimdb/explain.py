"""Explain one sample's score: recompute its token scores from the stored vectors and fingerprints.

Stages, in order:
1. resolve the query run and read its score settings (``runs.settings``);
2. read the sample's token rows and their vectors, which sit at consecutive positions of one
   vector segment, and the task's fingerprints;
3. score the tokens with ``trimdb.scoring.score_tokens`` under the run's settings, so the mean,
   max and sample score equal the scores table up to float32 rounding;
4. decode each token with the index's tokenizer (the model itself is never loaded).

``trimdb.report.explanation_html`` renders the result as one standalone HTML page.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from trimdb.errors import ModelError, SettingsError, StorageError
from trimdb.export import resolve_run
from trimdb.fingerprints import Fingerprints
from trimdb.query import SCOPE_PARTS
from trimdb.render import PART_NAMES
from trimdb.scoring import score_tokens
from trimdb.settings import SaliencySettings, ScoreSettings
from trimdb.store import Segment, Store

log = logging.getLogger(__name__)

# Tokens listed in the top table by default: enough to see what drives the mean of a short sample.
DEFAULT_TOP = 10
# Sample ids shown when a requested id is not found.
SHOWN_SAMPLE_IDS = 5
# A UTF-8 character spans at most 4 bytes, so byte-level tokens complete a character within 4 tokens.
MAX_PENDING_TOKENS = 4
# Sequential colour scales from ColorBrewer (Cynthia Brewer, colorbrewer2.org), the values of
# matplotlib's "YlOrRd" (token scores) and "Blues" (saliency) maps. Light means low, dark high.
SCORE_COLORS = ("#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026")
SALIENCY_COLORS = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")


@dataclass
class TokenScore:
    """One stored token of the sample with its recomputed score.

    ``fingerprint_class`` is the fingerprint the token matched (its own class) or, on the unseen
    path, the nearest one; ``similarity`` is the cosine with it. Out-of-scope tokens have no score.
    """

    position: int
    token_class: int
    text: str
    part: str
    saliency: float | None
    in_scope: bool
    score: float | None = None
    unseen: bool = False
    fingerprint_class: int | None = None
    fingerprint_text: str | None = None
    similarity: float | None = None


@dataclass
class StoredScore:
    """The sample's row in the scores table of the run."""

    rank: int
    score: float
    mean_part: float
    max_part: float
    unseen_share: float
    n_tokens: int


@dataclass
class Explanation:
    """A sample's recomputed score for one task and run, token by token.

    ``mean``, ``max`` and ``score`` are NaN when no token is in scope. ``max_tokens`` and
    ``top_tokens`` index into ``tokens``; ``stored`` is None when the run did not score the sample.
    """

    task: str
    run_id: int
    sample_id: str
    source: str
    settings: ScoreSettings
    tokens: list[TokenScore]
    mean: float
    max: float
    score: float
    unseen_share: float
    stored: StoredScore | None
    selected: bool
    n_scored: int
    n_selected: int
    max_tokens: list[int] = field(default_factory=list)
    top_tokens: list[int] = field(default_factory=list)

    @property
    def has_saliency(self) -> bool:
        return any(token.saliency is not None for token in self.tokens)

    def score_range(self) -> tuple[float, float]:
        """Return the lowest and highest in-scope token score, the ends of the colour scale."""
        scores = [token.score for token in self.tokens if token.score is not None]
        return (min(scores), max(scores)) if scores else (0.0, 1.0)

    def formula(self) -> str:
        """Return the sample score written out as the weighted mean and max."""
        weights = self.settings
        return (f"{self.score:.6f} = {weights.mean_weight:g} × mean {self.mean:.6f} "
                f"+ {weights.max_weight:g} × max {self.max:.6f}")


def explain_sample(
    db_path: str | Path, task: str, sample_id: str, run_id: int | None = None, *, top: int = DEFAULT_TOP
) -> Explanation:
    """Recompute one sample's token and sample scores for ``task`` in a query run (default: the newest)."""
    with Store(db_path, read_only=True) as store:
        run_id = resolve_run(store, task, run_id)
        _check_trim_run(store, run_id)
        settings = run_settings(store, run_id)
        sample_key, source = _find_sample(store, sample_id, task, run_id)
        tokens = _token_rows(store, sample_key)
        vectors = read_token_vectors(store, tokens["token_key"])
        fingerprints = load_fingerprints(store, run_id, task)
        stored, selected = _stored_score(store, run_id, task, sample_key)
        n_scored, n_selected = store.query(
            "SELECT n_scored, n_selected FROM tasks WHERE run_id = ? AND task = ?", [run_id, task]).fetchone()
        model = store.catalog()["model"]

    tokenizer = load_tokenizer(model)
    in_scope = np.isin(tokens["part"], SCOPE_PARTS[settings.scope])
    rows = _score_rows(tokens, vectors, in_scope, fingerprints, settings, tokenizer)
    explanation = Explanation(task, run_id, sample_id, source, settings, rows, np.nan, np.nan, np.nan, np.nan,
                              stored, selected, n_scored, n_selected)
    _pool(explanation, top)
    return explanation


def _check_trim_run(store: Store, run_id: int) -> None:
    """Raise SettingsError when ``run_id`` ran a baseline, which has no token scores to explain."""
    method = store.query("SELECT json_extract_string(settings, '$.method') FROM runs WHERE run_id = ?",
                         [run_id]).fetchall()[0][0]
    if method not in (None, "trim"):
        raise SettingsError(
            f"run {run_id} used --method {method}, which scores whole samples, so it has no token scores to "
            "explain; pass --run with a TRIM run id (the runs table lists each run's settings)")


def run_settings(store: Store, run_id: int) -> ScoreSettings:
    """Return the score settings that a query run stored (its budget and unknown keys are ignored)."""
    values = json.loads(store.query("SELECT settings FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0])
    known = {f.name for f in dataclasses.fields(ScoreSettings)} - {"saliency"}
    return ScoreSettings(saliency=SaliencySettings(**values["saliency"]),
                         **{key: value for key, value in values.items() if key in known})


def _find_sample(store: Store, sample_id: str, task: str, run_id: int) -> tuple[int, str]:
    row = store.query("SELECT sample_key, source FROM sample_info WHERE sample_id = ?", [sample_id]).fetchone()
    if row is not None:
        return int(row[0]), row[1]
    top_ids = [r[0] for r in store.query("SELECT sample_id FROM scored WHERE run_id = ? AND task = ? ORDER BY rank LIMIT ?",
                                         [run_id, task, SHOWN_SAMPLE_IDS]).fetchall()]
    listing = f"trimdb sql --db {store.path} \"SELECT rank, sample_id, source, score FROM scored " \
              f"WHERE task = '{task}' AND run_id = {run_id} ORDER BY rank\""
    raise SettingsError(
        f"sample {sample_id!r} not found in {store.path}; the top samples of task {task!r} in run {run_id} are "
        f"{', '.join(top_ids) or 'none'}. List every sample id with: {listing}"
    )


def _token_rows(store: Store, sample_key: int) -> dict:
    rows = store.query("SELECT token_key, position, token_class, part, saliency FROM tokens WHERE sample_key = ? "
                       "ORDER BY token_key", [sample_key]).fetchnumpy()
    tokens = {name: np.asarray(rows[name]) for name in ("token_key", "position", "token_class", "part")}
    tokens["token_key"] = tokens["token_key"].astype(np.int64)
    tokens["token_class"] = tokens["token_class"].astype(np.int64)
    # DuckDB returns a masked array when some saliency is NULL (an index built with --no-saliency).
    saliency = rows["saliency"]
    tokens["saliency"] = [None if np.ma.is_masked(value) else float(value) for value in saliency]
    if len(tokens["token_key"]) == 0:
        raise StorageError(f"{store.path}: sample key {sample_key} has no token rows; rebuild the index")
    return tokens


def read_token_vectors(store: Store, token_keys: np.ndarray) -> np.ndarray:
    """Return the vectors (n, D) of consecutive token keys, read by their position in one segment."""
    first, last, count = int(token_keys[0]), int(token_keys[-1]), len(token_keys)
    if last - first + 1 != count:
        raise StorageError(f"{store.path}: token keys {first}..{last} of one sample are not consecutive; rebuild the index")
    row = store.query("SELECT segment_id, file, n_vectors, dim FROM segments "
                      "WHERE first_token_key <= ? AND last_token_key >= ?", [first, last]).fetchone()
    if row is None:
        raise StorageError(f"{store.path}: token keys {first}..{last} are in no vector segment; rebuild the index")
    index = store.open_segment(Segment(*row))
    ids = faiss.vector_to_array(index.id_map)
    start = int(np.searchsorted(ids, first))
    if not np.array_equal(ids[start:start + count], token_keys):
        raise StorageError(f"vector segment {row[1]} does not hold token keys {first}..{last} in order; rebuild the index")
    return faiss.downcast_index(index.index).reconstruct_n(start, count)  # (n, D), decoded by the segment's codec


def load_fingerprints(store: Store, run_id: int, task: str) -> Fingerprints:
    """Read a task's fingerprints of one run from the fingerprints table, sorted by token class."""
    rows = store.query("SELECT token_class, n_occurrences, saliency_sum, vector FROM fingerprints "
                       "WHERE run_id = ? AND task = ? ORDER BY token_class", [run_id, task]).fetchnumpy()
    if len(rows["token_class"]) == 0:
        raise StorageError(f"{store.path}: run {run_id} stored no fingerprints for task {task!r}; rerun the query")
    vectors = np.stack(list(rows["vector"])).astype(np.float32)  # (F, D)
    return Fingerprints(np.asarray(rows["token_class"], np.int64), vectors,
                        np.asarray(rows["n_occurrences"]), np.asarray(rows["saliency_sum"]))


def _stored_score(store: Store, run_id: int, task: str, sample_key: int) -> tuple[StoredScore | None, bool]:
    row = store.query(
        "SELECT sc.rank, sc.score, sc.mean_part, sc.max_part, sc.unseen_share, sc.n_tokens, sel.rank IS NOT NULL "
        "FROM scores sc LEFT JOIN selections sel USING (run_id, task, sample_key) "
        "WHERE sc.run_id = ? AND sc.task = ? AND sc.sample_key = ?", [run_id, task, sample_key]).fetchone()
    if row is None:
        return None, False
    return StoredScore(*row[:6]), bool(row[6])


def load_tokenizer(model: dict):
    """Load only the tokenizer of the index's model (catalog entry ``model``), never its weights."""
    from transformers import AutoTokenizer

    folder = Path(model["path"])
    name = str(model.get("name", folder))
    kwargs = {"gguf_file": Path(name).name} if name.endswith(".gguf") else {}
    if not folder.exists():
        raise ModelError(f"the index's model folder {folder} no longer exists; restore it to decode tokens of {name!r}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the tokenizer of {name!r} from {folder}: {error}") from error


def token_texts(tokenizer, token_classes: np.ndarray, positions: np.ndarray) -> list[str]:
    """Decode each token to the text it adds.

    A character whose UTF-8 bytes span several byte-level tokens decodes to U+FFFD piece by
    piece, so it is shown once, on the token that completes it, and the tokens before it are empty.
    """
    texts = [""] * len(token_classes)
    start = 0
    for i in range(len(token_classes)):
        if i > start and positions[i] != positions[i - 1] + 1:
            start = i  # a gap in positions (template tokens) ends any pending character
        piece = tokenizer.decode([int(c) for c in token_classes[start:i + 1]], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
        next_follows = i + 1 < len(token_classes) and positions[i + 1] == positions[i] + 1
        if piece.endswith("\ufffd") and next_follows and i - start + 1 < MAX_PENDING_TOKENS:
            continue
        texts[i] = piece
        start = i + 1
    return texts


def _score_rows(tokens, vectors, in_scope, fingerprints: Fingerprints, settings: ScoreSettings,
                tokenizer) -> list[TokenScore]:
    texts = token_texts(tokenizer, tokens["token_class"], tokens["position"])
    rows = [TokenScore(int(p), int(c), t, PART_NAMES[int(part)], s, bool(scope))
            for p, c, t, part, s, scope in zip(tokens["position"], tokens["token_class"], texts, tokens["part"],
                                                tokens["saliency"], in_scope)]
    keep = np.flatnonzero(in_scope)
    if len(keep) == 0:
        return rows
    similarities = vectors[keep] @ fingerprints.vectors.T  # (n, F)
    scores, unseen = score_tokens(vectors[keep], tokens["token_class"][keep], fingerprints,
                                  settings.unseen_penalty, similarities=similarities)
    matched = np.where(unseen, similarities.argmax(axis=1), fingerprints.rows_of(tokens["token_class"][keep]))
    for j, i in enumerate(keep):
        fingerprint_class = int(fingerprints.classes[matched[j]])
        rows[i].score = float(scores[j])
        rows[i].unseen = bool(unseen[j])
        rows[i].fingerprint_class = fingerprint_class
        rows[i].fingerprint_text = tokenizer.decode([fingerprint_class], skip_special_tokens=False,
                                                    clean_up_tokenization_spaces=False)
        rows[i].similarity = float(similarities[j, matched[j]])
    return rows


def _pool(explanation: Explanation, top: int) -> None:
    """Fill in the mean, max, sample score, unseen share and the tokens that drive them."""
    scored = [i for i, token in enumerate(explanation.tokens) if token.score is not None]
    if not scored:
        return
    scores = np.array([explanation.tokens[i].score for i in scored], dtype=np.float64)
    settings = explanation.settings
    explanation.mean = float(scores.mean())
    explanation.max = float(scores.max())
    explanation.score = settings.mean_weight * explanation.mean + settings.max_weight * explanation.max
    explanation.unseen_share = float(np.mean([explanation.tokens[i].unseen for i in scored]))
    explanation.max_tokens = [i for i, value in zip(scored, scores) if value == explanation.max]
    order = sorted(range(len(scored)), key=lambda j: (-scores[j], scored[j]))
    explanation.top_tokens = [scored[j] for j in order[:top]]


# Colours -------------------------------------------------------------------------------------


def scale_color(value: float, low: float, high: float, stops: tuple[str, ...] = SCORE_COLORS) -> str:
    """Return the "#rrggbb" colour of ``value`` on a sequential scale from ``low`` to ``high``."""
    fraction = 0.0 if high <= low else min(max((value - low) / (high - low), 0.0), 1.0)
    position = fraction * (len(stops) - 1)
    index = min(int(position), len(stops) - 2)
    a, b = _rgb(stops[index]), _rgb(stops[index + 1])
    weight = position - index
    return "#" + "".join(f"{round(x + (y - x) * weight):02x}" for x, y in zip(a, b))


def text_color(background: str) -> str:
    """Return black or white, whichever reads better on ``background`` (relative luminance)."""
    red, green, blue = (channel / 255 for channel in _rgb(background))
    return "#000000" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.5 else "#ffffff"


def _rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def visible_text(text: str) -> str:
    """Return token text with each line break marked by ↵, so newline tokens stay visible."""
    return text.replace("\n", "↵\n")


def describe_token(token: TokenScore) -> str:
    """Return one line with a token's position, part, score, matched fingerprint and saliency."""
    text = f"position {token.position}, {token.part}"
    if token.score is None:
        text += ", out of scope"
    else:
        path = "unseen class, nearest" if token.unseen else "matched"
        text += (f", score {token.score:.4f}, {path} fingerprint {token.fingerprint_text!r} "
                 f"(class {token.fingerprint_class}, cosine {token.similarity:.4f})")
    if token.saliency is not None:
        text += f", saliency {token.saliency:.3f}"
    return text


def token_blocks(explanation: Explanation) -> list[tuple[str, list[int]]]:
    """Split the tokens into blocks of one part at consecutive positions; return (label, indices) pairs."""
    blocks: list[tuple[str, list[int]]] = []
    previous = None
    for i, token in enumerate(explanation.tokens):
        if previous is None or token.part != previous.part or token.position != previous.position + 1:
            label = token.part if token.in_scope else f"{token.part} (out of scope {explanation.settings.scope!r})"
            blocks.append((label, []))
        blocks[-1][1].append(i)
        previous = token
    return blocks
