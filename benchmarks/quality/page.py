"""Render the quality benchmark's results dict as a Markdown page with PNG plots."""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.quality.data import RELATED
from benchmarks.quality.pipeline import ABLATION_GROUPS, BUDGETS, COMBINED, DOWNSTREAM_BUDGET, group_winner
from trimdb.settings import ScoreSettings



def default_names(base: dict) -> dict[str, str]:
    """Return how the page names the base setting of each ablation group, from the run's base settings."""
    saliency = base["saliency"]
    return {
        "row saliency": saliency["row_saliency"], "layers L": f"L = {saliency['layers']}",
        "unseen penalty λ": f"λ = {base['unseen_penalty']}", "scope": base["scope"],
        "pooling (mean, max)": f"{base['mean_weight']}, {base['max_weight']}",
        "saliency blend (row, column)": f"{saliency['row_weight']}, {saliency['column_weight']}",
        "warmup": "no warmup",
    }


def changed_defaults(base: dict) -> list[str]:
    """Return "name: now X, this run Y" for every score setting whose default differs from the run's base."""
    current = ScoreSettings().to_dict()
    flat = lambda settings: {**{k: v for k, v in settings.items() if k != "saliency"}, **settings["saliency"]}  # noqa: E731
    now, then = flat(current), flat(base)
    return [f"{key}: now {now[key]}, this run {then[key]}" for key in now if key in then and now[key] != then[key]]


def percent(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def number(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def flops(value) -> str:
    return "0 (no model)" if value is None else f"{value:.2e}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def render_page(results: dict, machine: dict, command: str, plots: dict[str, str]) -> str:
    """Return the Markdown page for one benchmark run."""
    lines = _header(results, machine, command)
    lines += _headline(results)
    lines += _downstream(results)
    lines += _pool(results)
    lines += _cost(results)
    lines += _lengths(results, plots)
    lines += _ablations(results)
    lines += _notes(results, plots)
    return "\n".join(lines) + "\n"


def _targets(results: dict) -> list[str]:
    return [t for t in ("gsm8k", "mmlu", "bbh") if t in results["pool"]["targets"]]


def _header(results: dict, machine: dict, command: str) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    memory = machine["memory_bytes"] / 2**30 if machine.get("memory_bytes") else float("nan")
    load = ", ".join(f"{value:.1f}" for value in machine.get("load_average") or ())
    cpu = results.get("cpu_timings", {})
    timings = ", ".join(f"{k} {v / 60:.1f} min" + (f" (CPU {cpu[k] / 60:.1f} min)" if k in cpu else "")
                        for k, v in results["timings"].items())
    model = results["model"]
    return [
        "# Selection quality: TRIM against baselines", "",
        f"Mode `{results['mode']}`, run on {machine['date']} with", "", f"    {command}", "",
        f"- machine: {machine['cpu']}, {machine['usable_cores']} usable cores, {memory:.0f} GiB RAM, GPU: "
        f"{machine['gpu']}; load average (1, 5, 15 min) at the start: {load}",
        f"- versions: Python {machine['python']}, {versions}",
        f"- model: {model['name']} ({model['parameters'] / 1e6:.1f} M parameters, {model['num_layers']} layers), "
        f"index dtype {results['config']['index']['dtype']}",
        f"- wall time {results['seconds'] / 60:.1f} min ({timings}){_cpu_time(results, machine)}", "",
        "Caveat: the scorer and the fine-tuned model have 135 M parameters, the fine-tunes run a few LoRA steps "
        "on CPU, and the evaluation sets are small, so absolute downstream numbers are small and noisy. "
        "Relevance (the share of a coreset drawn from sources labelled related to the target) is the more "
        "stable signal here; differences of one or two samples at the 1% budget are noise.", "",
    ]


def _cpu_time(results: dict, machine: dict) -> str:
    if "cpu_seconds" not in results:
        return ""
    cores = machine.get("usable_cores") or 1
    return (f"; CPU time of the process {results['cpu_seconds'] / 60:.1f} min, so about "
            f"{results['cpu_seconds'] / 60 / cores:.1f} min of wall time on {cores} idle cores (an estimate that "
            "assumes both cores stay busy)")


def _headline(results: dict) -> list[str]:
    targets = _targets(results)
    header = ["method"] + [f"{t} {percent(b)}" for t in targets for b in BUDGETS]
    rows = []
    for label, per_target in results["relevance"].items():
        rows.append([label] + [percent(per_target[t][str(b)]["share"]) for t in targets for b in BUDGETS])
    ablations = results.get("ablations") or {}
    extra = [name for name in (COMBINED, _best_ablation(ablations)) if name in ablations and name != "default"]
    for position, name in enumerate(dict.fromkeys(extra), start=1):
        rows.insert(position, [f"trim: {name}"] + [percent(ablations[name][t][str(b)]) for t in targets for b in BUDGETS])
    combined = COMBINED in ablations
    first = next(iter(results["relevance"].values()))
    rows.append(["pool base rate (random expectation)"]
                + [percent(first[t][str(b)]["base_rate"]) for t in targets for b in BUDGETS])
    rows.append(["ceiling (related samples / budget)"]
                + [percent(first[t][str(b)]["ceiling"]) for t in targets for b in BUDGETS])
    sizes = ", ".join(f"{percent(b)} = {first[targets[0]][str(b)]['n']} samples" for b in BUDGETS)
    return ["## Headline: relevance of each coreset", "",
            f"Share of the coreset from sources labelled related to the target (labels below). Pool of "
            f"{results['pool']['n']} samples; {sizes}."
            + (f" `trim: {COMBINED}` takes the winner of each ablation group below at once." if combined else "")
            + (" The other `trim:` row is the ablation variant with the most related coresets (mean over both "
               "budgets)." if len(set(extra)) > int(combined) else ""),
            ""] + table(header, rows) + [""]


def _downstream(results: dict) -> list[str]:
    downstream = results.get("downstream")
    if not downstream:
        return ["## Downstream", "", "Not run.", ""]
    targets = _targets(results)
    header = ["model"] + [f"{t} loss" for t in targets]
    with_accuracy = any(row.get("gsm8k", {}).get("accuracy") is not None for row in downstream.values())
    if with_accuracy:
        header.append("gsm8k accuracy")
    rows = []
    for label, per_target in downstream.items():
        name = label if label in ("untuned", "full pool") else f"{label} ({percent(DOWNSTREAM_BUDGET)} coreset)"
        row = [name] + [number(per_target.get(t, {}).get("loss")) for t in targets]
        if with_accuracy:
            gsm = per_target.get("gsm8k", {})
            row.append(f"{percent(gsm.get('accuracy'))} of {gsm.get('n_accuracy', 0)}")
        rows.append(row)
    train = results["config"]["train"]
    evals = ", ".join(f"{t} {n}" for t, n in results["pool"]["evals"].items())
    lines = ["## Downstream: held-out loss after fine-tuning on each 5% coreset", "",
             "Mean negative log-likelihood per response token (nats; lower is better) on each target's held-out "
             f"evaluation set ({evals} items), after a LoRA fine-tune with identical settings for every coreset: "
             f"rank {train['rank']}, alpha {train['alpha']}, learning rate {train['learning_rate']}, "
             f"{train['epochs']} epochs capped at {train['max_steps']} optimizer steps, batches of at most "
             f"{train['batch_tokens']} padded tokens, {train['dtype']}, response tokens only (`trimdb warmup` "
             "with fraction 1)."]
    if with_accuracy:
        lines.append(f"GSM8K accuracy: greedy decoding of at most {results['config']['max_new_tokens']} new tokens, "
                     "exact match of the last number.")
    return lines + [""] + table(header, rows) + [""] + _training_details(downstream, targets)


def _training_details(downstream: dict, targets: list[str]) -> list[str]:
    rows = []
    for label, per_target in downstream.items():
        for target in targets:
            item = per_target.get(target, {})
            if "n_steps" in item:
                rows.append([label, target, item.get("n_samples", "all"), item["n_steps"],
                             number(item.get("first_loss")), number(item.get("last_loss")),
                             f"{item['train_seconds']:.0f} s"])
    if not rows:
        return []
    return ["Training runs:", ""] + table(
        ["coreset", "target", "samples", "steps", "first loss", "last loss", "train time"], rows) + [""]


def _pool(results: dict) -> list[str]:
    pool = results["pool"]
    sources = ", ".join(f"{name} {count}" for name, count in sorted(pool["sources"].items()))
    lines = ["## Pool, targets and held-out splits", "",
             f"{pool['n']} pool samples from {len(pool['sources'])} sources: {sources}. Sample length (tokens with "
             f"the chat template): median {pool['lengths']['median']:.0f}, p90 {pool['lengths']['p90']:.0f}.", ""]
    for target, text in results["splits"].items():
        lines.append(f"- **{target}** ({pool['targets'][target]} targets, {pool['evals'][target]} evaluation "
                     f"items): {text}")
    lines += ["", "Relevance labels: a pool sample is related to a target when one of the target's rules "
              "matches its source and task label.", ""]
    rows = []
    for target, rules in RELATED.items():
        related = pool["related"][target]
        for rule in rules:
            matched = [t.split(":", 1)[1] for t in related["tasks"] if t.startswith(rule.source + ":")]
            listed = ", ".join(matched[:12]) + (f" and {len(matched) - 12} more" if len(matched) > 12 else "")
            pattern = rule.task_pattern.replace("|", "\\|")  # a bare | would end the table cell
            rows.append([target, rule.source, f"`{pattern}`", rule.reason, listed or "none in this pool"])
        rows.append([target, "**total**", "", f"{related['n']} related samples in the pool", ""])
    return lines + table(["target", "source", "task regex", "why", "task labels matched in this pool"], rows) + [""]


def _cost(results: dict) -> list[str]:
    index = results["index"]
    lines = ["## Cost of selection", "",
             f"The index pass is shared by TRIM, embedding and every later target task: {index['seconds']:.0f} s "
             f"for {index['n_samples']} samples and {index['n_forward_tokens']} forward tokens, about "
             f"{flops(index['flops'])} FLOPs" + (" (reused from the cache; time of the run that built it)"
                                                  if index["cached"] else "") + ". "
             "FLOPs are estimates: a forward pass costs 2 x parameters per token; TRIM's scan adds 2 x hidden size "
             "per stored token and fingerprint; LESS reports its own estimate (forward and backward, about "
             "3 forward passes per pool token, plus the random projection).", ""]
    rows = []
    for run in results["runs"]:
        uses_index = run["method"] in ("trim", "embedding")
        rows.append([run["label"], "yes" if uses_index else "no", f"{run['seconds']:.1f} s", flops(run["flops"])])
    return lines + table(["method", "needs the shared index", "query time (all targets)", "query FLOPs"], rows) + [""]


def _lengths(results: dict, plots: dict[str, str]) -> list[str]:
    targets = _targets(results)
    pool = results["pool"]["lengths"]
    header = ["coreset (5%)"] + [f"{t} median / p90" for t in targets]
    rows = [["pool", *[f"{pool['median']:.0f} / {pool['p90']:.0f}"] * len(targets)]]
    for label, per_target in results["relevance"].items():
        cells = []
        for target in targets:
            stats = per_target[target][str(DOWNSTREAM_BUDGET)]["lengths"]
            cells.append(f"{stats['median']:.0f} / {stats['p90']:.0f}")
        rows.append([label] + cells)
    lines = ["## Coreset lengths", "", "Tokens per sample (chat template included) in each 5% coreset.", ""]
    lines += table(header, rows) + [""]
    if "lengths" in plots:
        lines += [f"![coreset length distributions]({plots['lengths']})", ""]
    return lines + _source_mix(results, targets)


def _source_mix(results: dict, targets: list[str]) -> list[str]:
    sources = sorted(results["pool"]["sources"])
    rows = []
    for label, per_target in results["relevance"].items():
        for target in targets:
            mix = per_target[target][str(DOWNSTREAM_BUDGET)]["mix"]
            rows.append([label, target] + [str(mix.get(source, 0)) for source in sources])
    return ["Source mix of each 5% coreset (sample counts):", ""] + table(["method", "target", *sources], rows) + [""]


def _ablations(results: dict) -> list[str]:
    ablations = results.get("ablations") or {}
    if not ablations:
        return []
    targets = _targets(results)
    header = ["TRIM variant"] + [f"{t} {percent(b)}" for t in targets for b in BUDGETS] + \
             [f"mean {percent(b)}" for b in BUDGETS]
    rows = [[name] + [percent(row[t][str(b)]) for t in targets for b in BUDGETS]
            + [percent(row["mean"][str(b)]) for b in BUDGETS] for name, row in ablations.items()]
    lines = ["## Ablations of TRIM's settings", "",
             "Relevance of TRIM's coresets when one setting changes from the settings of the headline table ("
             f"{_settings_text(results['config']['base_settings'])}, no warmup). The warmup variant indexes the pool again with a `trimdb warmup` adapter (cpu preset, 5% of "
             "the pool).", ""] + table(header, rows) + ["", "Best setting per group (by mean relevance averaged "
                                                        "over the 1% and 5% budgets; the default wins ties):", ""]
    base_names = default_names(results["config"]["base_settings"])
    for group, names in ABLATION_GROUPS.items():
        best = group_winner(names, ablations)
        if best is None:
            continue
        winner = f"{base_names[group]} (default)" if best == "default" else best
        lines.append(f"- {group}: **{winner}** ({percent(ablations[best]['mean']['0.05'])} at 5%, "
                     f"{percent(ablations[best]['mean']['0.01'])} at 1%)")
    if COMBINED in ablations:
        lines += ["", f"`{COMBINED}` applies every group's winner above at once (warmup excepted): "
                  f"{_settings_text(ablations[COMBINED]['settings'])}."]
    best = _best_ablation(ablations)
    lines += ["", f"Best configuration measured (mean relevance averaged over both budgets): **{best}**, "
              f"{percent(_budget_mean(ablations[best]))}, against {percent(_budget_mean(ablations['default']))} "
              "for the default."]
    changed = changed_defaults(results["config"]["base_settings"])
    if changed:
        lines += ["", f"trimdb's defaults differ from this run's base settings ({'; '.join(changed)}): the rows "
                  "named default above used the run's settings, and the current defaults follow the best "
                  "configuration."]
    if "with warmup" not in ablations:
        lines += ["", "The warmup variant is not part of this mode (the full modes run it)."]
    warm = ablations.get("with warmup")
    if warm:
        lines += ["", f"Warmup cost: {warm['warmup_seconds']:.0f} s of training and {warm['index_seconds']:.0f} s "
                  "to index the pool again with the adapter."]
    return lines + [""]


def _best_ablation(ablations: dict) -> str | None:
    """Return the ablation variant with the highest mean relevance averaged over both budgets."""
    if not ablations:
        return None
    return max(ablations, key=lambda n: (round(_budget_mean(ablations[n]), 6), n == "default"))


def _budget_mean(row: dict) -> float:
    return sum(row["mean"][str(b)] for b in BUDGETS) / len(BUDGETS)


def _settings_text(settings: dict) -> str:
    saliency = settings["saliency"]
    return (f"L = {saliency['layers']}, {saliency['row_saliency']} row saliency, λ = {settings['unseen_penalty']}, "
            f"scope {settings['scope']}, pooling {settings['mean_weight']} mean + {settings['max_weight']} max, "
            f"saliency blend {saliency['row_weight']} row + {saliency['column_weight']} column")


def _notes(results: dict, plots: dict[str, str]) -> list[str]:
    lines = ["## Notes", ""] + [f"- {note}" for note in results["notes"]]
    methods = results.get("methods", {})
    for method in ("random", "bm25", "embedding", "less"):
        if method in methods.get("available", []):
            continue
        if method == "less" and method in methods.get("offered", []):
            lines.append("- less: not run, because on a CPU it costs a forward and a backward pass per pool sample "
                         "and query (about three times the compute of the index pass); add it with "
                         "`--methods trim,random,bm25,embedding,less`.")
        elif method in methods.get("offered", []):
            lines.append(f"- {method}: not run in this mode; add it with `--methods`.")
        else:
            lines.append(f"- {method}: not available in this trimdb version.")
    for label, error in methods.get("failed", {}).items():
        lines.append(f"- {label}: failed, so it is missing from the tables: {error}")
    if "relevance" in plots:
        lines += ["", f"![relevance at 5%]({plots['relevance']})"]
    return lines + [""]
