"""Write the results page (Markdown) and the scale plot from one benchmark run's results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.perf.codec_table import MAX_BYTES_SHARE, MIN_OVERLAP, CodecRow, default_codec
from benchmarks.perf.overhead import OverheadResult
from benchmarks.perf.querying import AnnResult, QueryResult
from benchmarks.perf.scale import ScalePoint

OVERHEAD_TARGET = 1.15
SPEEDUP_TARGET = 50


@dataclass
class Results:
    """Everything one run measured; a section that did not run stays None."""

    command: str
    machine: dict
    pool: dict
    overhead: OverheadResult | None = None
    query: QueryResult | None = None
    ann: AnnResult | None = None
    codecs: list[CodecRow] | None = None
    scale: list[ScalePoint] | None = None
    scale_codec: str = "sq8"
    scale_notes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total_seconds: float = 0.0
    plot: Path | None = None


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def machine_section(results: Results) -> list[str]:
    machine = results.machine
    memory = machine["memory_bytes"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items())
    load, load_end = machine["load_average"], machine.get("load_average_end")
    return [
        "## Run", "",
        f"- Command: `{results.command}`",
        f"- Date: {machine['date']}; total time {results.total_seconds / 60:.1f} min",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable, "
        f"torch uses {machine['torch_threads']} threads); RAM {memory / 2**30:.1f} GiB" if memory else
        f"- CPU: {machine['cpu']}, {machine['cores']} cores",
        f"- GPU: {machine['gpu']}",
        f"- Python {machine['python']}; {versions}",
        f"- Load average (1, 5, 15 min) at the start: {', '.join(f'{value:.1f}' for value in load)}"
        + (f"; at the last section: {', '.join(f'{value:.1f}' for value in load_end)}" if load_end else "")
        if load else "",
        *[f"- {note}" for note in results.notes],
        "",
    ]


def overhead_section(results: Results) -> list[str]:
    overhead, pool = results.overhead, results.pool
    if overhead is None:
        return ["## 1. Index overhead", "", "Not run.", ""]
    rendered = overhead.pool
    forward = overhead.forward_seconds
    lines = [
        "## 1. Index overhead", "",
        f"Pool: {pool['description']}: {rendered.n_samples} samples, "
        f"{rendered.n_forward_tokens:,} tokens through the model, "
        f"{rendered.n_content_tokens:,} content tokens stored, {len(rendered.segments)} segment(s). Model: "
        f"{pool.get('model', 'unknown')}, {pool['dtype']}, on {overhead.device}; batches of at most "
        f"{pool['batch_tokens']} padded tokens, max length {pool['max_length']}.", "",
        "- Bare forward: `model.get_decoder()` over the same rendered sequences, the same segments and "
        "`plan_batches` batches, SDPA attention, no hooks, nothing stored. Run twice, interleaved with the "
        "index runs (forward, index, forward, index); the lower time is the reference.",
        "- `index_corpus` times exclude the model load, measured inside each run (the call of "
        "`trimdb.indexing.load_model`) and subtracted. They include reading and rendering the corpus twice "
        f"(plan, then stream; one rendering pass alone took {rendered.render_seconds:.1f} s), forward "
        "passes, saliency, and writing vectors and rows.", "",
    ]
    rows = [["bare forward (SDPA)", " / ".join(f"{value:.1f}" for value in forward), "", "",
             f"{rendered.n_forward_tokens / overhead.forward_best:,.0f}", "1.00"]]
    for run in overhead.index_runs:
        ratio = overhead.ratio(run)
        rows.append([f"`index_corpus`, {run.label}", f"{run.seconds:.1f}", f"{run.load_seconds:.1f}",
                     _gb(run.bytes_on_disk), f"{rendered.n_forward_tokens / run.seconds:,.0f}",
                     f"**{ratio:.2f}** ({'meets' if ratio <= OVERHEAD_TARGET else 'misses'} "
                     f"<= {OVERHEAD_TARGET})"])
    lines += _table(["pass", "seconds", "model load (s, subtracted)", "on disk", "tokens/s", "ratio to forward"],
                    rows)
    lines += ["", f"The benchmark's own model load took {overhead.model_load_seconds:.1f} s.", ""]
    return lines


def query_section(results: Results) -> list[str]:
    query, overhead = results.query, results.overhead
    if query is None or overhead is None:
        return ["## 2. Query", "", "Not run.", ""]
    best, read = query.best, query.read
    forward = overhead.forward_best
    scan_rate = query.scan_gb_per_second
    lines = [
        "## 2. Query", "",
        f"`trimdb.query.query_tasks` for the `{query.task}` target at a 5% budget on the index of section 1 "
        f"(float32 vectors), run {len(query.runs)} times; the fastest is shown.", "",
    ]
    lines += _table(["", "seconds"], [
        ["query, total (per run)", " / ".join(f"{run['seconds']:.1f}" for run in query.runs)],
        ["  model load", f"{best['load_seconds']:.1f}"],
        ["  scan (`_scan`: decode, token rows, scores)", f"{best['scan_seconds']:.2f}"],
        ["  rest (target forward, fingerprints, selection, writes)",
         f"{query.query_seconds - best['scan_seconds']:.1f}"],
        ["query without model load", f"{query.query_seconds:.1f}"],
        ["recompute from scratch = bare forward + query without model load",
         f"{forward:.1f} + {query.query_seconds:.1f} = {query.recompute_seconds(forward):.1f}"],
    ])
    speedup = query.speedup(forward)
    with_load = (forward + best["seconds"]) / best["seconds"]
    lines += [
        "",
        f"**Speed-up: {speedup:.1f}x** (target >= {SPEEDUP_TARGET}x: "
        f"{'met' if speedup >= SPEEDUP_TARGET else 'missed'}). With the model load counted on both sides it is "
        f"{with_load:.1f}x. Recomputing means the pool's forward passes plus the query's own work; the scoring "
        "of recomputed states would be the same arithmetic as the scan.", "",
        f"Scan rate: the plain read (`Store.iter_vectors` over every segment, summing each chunk) decoded "
        f"{read.n_vectors:,} vectors ({_gb(read.stored_bytes)} of FAISS files) in {read.seconds:.2f} s = "
        f"**{read.stored_gb_per_second:.2f} GB/s**; the query's scan took {best['scan_seconds']:.2f} s = "
        f"**{scan_rate:.2f} GB/s**, {scan_rate / read.stored_gb_per_second:.0%} of the plain read's rate "
        f"({read.n_vectors / best['scan_seconds']:,.0f} tokens/s).", "",
        f"One query with both tasks ({', '.join(query.both_tasks['n_fingerprints'])}; "
        f"{', '.join(str(n) for n in query.both_tasks['n_fingerprints'].values())} fingerprints) took "
        f"{query.both_tasks['seconds']:.1f} s (scan {query.both_tasks['scan_seconds']:.2f} s): all tasks share one "
        "scan.", "",
    ]
    return lines


def codec_section(results: Results) -> list[str]:
    rows = results.codecs
    if not rows:
        return ["## 3. Codecs", "", "Not run.", ""]
    float32 = next(row for row in rows if row.codec == "float32")
    tasks = list(float32.overlap)
    best, reason = default_codec(rows, float32.code_bytes_per_token)

    lines = [
        "## 3. Codecs", "",
        "The float32 vectors of the section-1 index, encoded into each codec as `Store.write_segment` does "
        "(`build_codec` trained on the first segment, `IndexIDMap2`), written to disk and decoded with "
        "`reconstruct_n`; scored with the fingerprints of the float32 query run (both tasks) through "
        "`score_tokens` and `SampleAccumulator`. Overlap: share of the float32 5% coreset that the codec "
        "selects too. Spearman: rank correlation of all sample scores with float32 (numpy ranks). "
        "File bytes include FAISS's 8-byte token key per vector; DuckDB adds about 25 bytes per token for "
        "every codec.", "",
    ]
    header = ["codec", "file bytes/token", "code bytes/token", "share of float32", "encode s", "decode s"]
    header += [f"{task} overlap" for task in tasks] + [f"{task} Spearman" for task in tasks]

    table = []
    for row in rows:
        if row.timed_out is not None:
            table.append([f"`{row.codec}`", "", row.code_bytes_per_token,
                          f"{row.code_bytes_per_token / float32.code_bytes_per_token:.3f}",
                          f"stopped after {row.timed_out:.0f} s", *[""] * (1 + 2 * len(tasks))])
            continue
        table.append([
            f"`{row.codec}`", f"{row.file_bytes_per_token:,.1f}", row.code_bytes_per_token,
            f"{row.code_bytes_per_token / float32.code_bytes_per_token:.3f}",
            f"{row.encode_seconds:.1f}", f"{row.decode_seconds:.2f}",
            *[f"{row.overlap[task]:.1%}" for task in tasks], *[f"{row.spearman[task]:.4f}" for task in tasks],
        ])
    lines += _table(header, table)

    check = max(float32.max_abs_score_difference.values())
    lines += [
        "",
        f"Check: the benchmark's float32 scores equal the scores that `query_tasks` stored within {check:.1e}.", "",
        f"**Default codec rule** (at most {MAX_BYTES_SHARE:.3f} of float32's code bytes, at least "
        f"{MIN_OVERLAP:.0%} overlap on every task): {reason}.",
        "Measured in file bytes instead, the 8-byte key puts `sq4` and `pca-sq8` just above 1/8 of the float32 "
        "file." if best is not None and best.codec in ("sq4", "pca-sq8") else "", "",
    ]
    return lines


def ann_section(results: Results) -> list[str]:
    ann = results.ann
    if ann is None:
        return ["## 4. Approximate query path", "", "Not run.", ""]
    approximate, exact = ann.query, ann.exact_query
    tasks = list(ann.overlap)
    lines = [
        "## 4. Approximate query path", "",
        f"`trimdb.ann.build_ann` on the section-1 index ({ann.n_samples:,} sample summaries, "
        f"{ann.bytes / 1e6:.1f} MB) took {ann.build_seconds:.1f} s. Then `query_tasks(..., candidates=\"auto\")` "
        "for every task: only the samples nearest to the target samples' summaries are scored, each exactly. "
        "Overlap: share of the exact 5% coreset (the two-task exact run of section 2) that the approximate "
        "run selects too.", "",
    ]
    rows = [["exact scan", f"{exact['seconds']:.1f}", f"{exact['load_seconds']:.1f}", f"{exact['scan_seconds']:.2f}",
             *[f"{exact['n_scored'][task]:,}" for task in tasks], *["100%" for _ in tasks]],
            ["approximate (candidates auto)", f"{approximate['seconds']:.1f}", f"{approximate['load_seconds']:.1f}",
             f"{approximate['scan_seconds']:.2f}", *[f"{approximate['n_scored'][task]:,}" for task in tasks],
             *[f"{ann.overlap[task]:.1%}" for task in tasks]]]
    lines += _table(["query", "seconds", "model load s", "scan s", *[f"{task} samples scored" for task in tasks],
                     *[f"{task} overlap" for task in tasks]], rows)
    lines.append("")
    return lines


def scale_section(results: Results) -> list[str]:
    points = results.scale
    if not points:
        return ["## 5. Scale curve", "", "Not run.", ""]
    first = points[0]
    lines = [
        "## 5. Scale curve (synthetic vectors)", "",
        "**Synthetic data**: seeded standard-normal vectors scaled to unit length (D = "
        f"{results.pool.get('dim', 576)}), stored with codec `{results.scale_codec}` in a real trimdb store "
        "(`Store.write_segment` per segment of up to 1M vectors; samples of 200 to 400 tokens, random token "
        f"classes in [0, {results.pool.get('vocab_size', 49152)}), prompt then response rows inserted with "
        "`Store.insert_arrow` in one "
        "transaction per segment; the catalog copied from the section-1 index). Each size is queried "
        f"(`{results.query.task if results.query else 'gsm8k'}` target, 5%) in a fresh process that "
        "loads the real model from the catalog for the target forward pass.",
        "Peak RSS is the child's VmHWM from /proc/self/status: on Linux, `ru_maxrss` of a child process "
        "starts from the parent's peak (it survives fork and exec), so it would report the benchmark "
        "process's own peak.", "",
    ]
    lines += [*[f"- {note}" for note in results.scale_notes], ""] if results.scale_notes else []

    table = []
    for point in points:
        query = point.query
        table.append([
            f"{point.n_vectors:,}", _gb(point.disk_bytes), f"{point.build_seconds:.0f}", f"{query['seconds']:.1f}",
            f"{query['load_seconds']:.1f}", f"{query['scan_seconds']:.1f}",
            f"{query['scan_seconds'] / first.query['scan_seconds'] / (point.n_vectors / first.n_vectors):.2f}",
            f"{point.scan_tokens_per_second / 1e6:.2f}", _gb(query["peak_rss_bytes"]),
            _gb(query["rss_before_query_bytes"]) if query.get("rss_before_query_bytes") else "",
        ])
    lines += _table(["stored vectors", "on disk", "build s (vectors added)", "query s", "model load s", "scan s",
                     "scan s per vector, relative to the smallest", "scan M tokens/s", "peak RSS",
                     "RSS before the query"], table)

    lines += _ann_scale_lines(points)
    if results.plot is not None:
        lines += ["", f"![query time and peak memory against stored vectors]({results.plot.name})"]
    lines.append("")
    return lines


def _ann_scale_lines(points: list[ScalePoint]) -> list[str]:
    measured = [point for point in points if point.ann is not None]
    if not measured:
        return []
    lines = ["", "The approximate path on the synthetic store (time only: summaries of random vectors carry no "
             "signal, so the overlap with the exact selection says nothing about real data):", ""]
    rows = []
    for point in measured:
        ann, query = point.ann, point.ann["query"]
        rows.append([f"{point.n_vectors:,}", f"{ann['build_seconds']:.1f}", f"{ann['bytes'] / 1e6:.1f} MB",
                     f"{query['seconds']:.1f}", f"{point.query['seconds']:.1f}", f"{query['scan_seconds']:.1f}",
                     f"{point.query['scan_seconds']:.1f}",
                     f"{point.query['scan_seconds'] / max(query['scan_seconds'], 1e-9):.1f}x",
                     f"{next(iter(query['n_scored'].values())):,}", _gb(query["peak_rss_bytes"])])
    lines += _table(["stored vectors", "build_ann s", "summary index", "approximate query s", "exact query s",
                     "candidate scan s", "exact scan s", "scan speed-up", "samples scored", "peak RSS"], rows)
    return lines


def render_page(results: Results) -> str:
    lines = [
        "# trimdb performance", "",
        "Written by the command in the next section (see benchmarks/README.md). Every figure below comes from "
        "that run; rerun the command to refresh it.", "",
    ]
    lines += machine_section(results)
    lines += overhead_section(results)
    lines += query_section(results)
    lines += codec_section(results)
    lines += ann_section(results)
    lines += scale_section(results)
    return "\n".join(line for index, line in enumerate(lines)
                     if line != "" or index == 0 or lines[index - 1] != "") + "\n"


def write_plot(points: list[ScalePoint], path: Path) -> Path | None:
    """Plot query time and peak RSS against stored vectors; return the file, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = [point.n_vectors / 1e6 for point in points]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    time_axis.plot(sizes, [point.query["seconds"] for point in points], "o-", label="query")
    time_axis.plot(sizes, [point.query["scan_seconds"] for point in points], "s--", label="scan")
    time_axis.set(xlabel="stored vectors (millions)", ylabel="seconds", title="query time")
    time_axis.legend()
    memory_axis.plot(sizes, [point.query["peak_rss_bytes"] / 1e9 for point in points], "o-")
    memory_axis.set(xlabel="stored vectors (millions)", ylabel="GB", title="peak RSS of the query process")
    memory_axis.set_ylim(bottom=0)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
