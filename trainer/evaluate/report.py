"""``reward eval`` reports: the JSON (its schema below; built by ``datasets.py`` and
``best_of_n.py``), the Markdown and the PNG plots, written under ``--report`` and printed
(:func:`finish_report`); the exit statuses and error line of the command (:func:`fail`).

matplotlib is imported only when plots are drawn, with the Agg backend (no display needed);
without matplotlib the plots are skipped with a warning and the rest of the report is written.

JSON report (``report.json``; stable keys; ``null`` where a value is undefined)
------------------------------------------------------------------------------
Both modes::

    schema_version   1
    kind             "preference" | "best_of_n"
    created          ISO-8601 UTC time
    config           the flags that shape the numbers (seed, bootstrap, ci_method "wilson",
                     confidence 0.95, calibration_bins 10, datasets, chunk_size, concurrency...)
    models           [{label, url, model (requested name or null), served_model (name@version),
                       card (the service's /v1/models entry)}]  (best_of_n: the proxy, then gold)
    plots            PNG file names in the report folder: preference {DATASET: {reliability,
                     reward_vs_length}}; best_of_n {best_of_n}; {} without --report or matplotlib
    scoring          {label: {items, seconds, items_per_second}}

kind "preference" adds::

    datasets: {NAME: {
        path, n_records, n_pairs, n_unique_responses, categories [sorted names; "(none)" for
        records without one], load {rows_read, rows_loaded, malformed},
        longer_wins {accuracy, ci_low, ci_high, n_pairs, n_ties}     # the length baseline
        shorter_wins {...}                                           # its opposite
        baselines_per_category: {CATEGORY: {longer_wins {...}, shorter_wins {...}}}
        objective          what the whole set measures (--data ...:objective=NAME, else the
                           folder's default: alpacaeval helpfulness, hh-harmless harmlessness,
                           truthfulqa truthfulness) or null
        category_objectives {CATEGORY: OBJECTIVE}   # categories that are sections of their own
                           (sets without an objective: truthful, harmless, helpful -> ...ness)
        models: {LABEL: {
            accuracy, ci_low, ci_high, n_pairs, n_ties,
            per_category: {CATEGORY: {accuracy, ci_low, ci_high, n_pairs, n_ties}},
            objectives: null (one head) | {names [the heads, in the model's order],
                         heads {OBJECTIVE: {accuracy, ci_low, ci_high, n_pairs, n_ties}},
                         per_category {CATEGORY: {OBJECTIVE: {...}}}},
            length: {shorter_chosen {accuracy, n_pairs, n_ties}, longer_chosen {...},
                     equal_length_pairs, length_controlled_accuracy, longer_wins_accuracy,
                     pearson_reward_length, spearman_reward_length},
            calibration: {ece, brier, n_pairs, label_mean, bins: [{lower, upper, n, mean_p, frac_a_better}]},
            reward_distribution: {all: STATS, per_category: {CATEGORY: STATS}}
                # STATS = {n, mean, std (population), min, q05, q25, median, q75, q95, max}
        }},
        comparisons: [{a, b, n_pairs, accuracy_a, accuracy_b, diff (b - a), diff_ci_low,
                       diff_ci_high, agreement}]   # every model pair a < b in --url/--model order
    }}
    summary: {LABEL: {mean_accuracy (unweighted over datasets), pooled_accuracy, n_pairs, n_ties}}
    objectives: {LABEL: {names, combine ("gate" | "weights" | null), sections: [   # models with heads only
        {dataset, category (null: the whole set), objective (or null), n_pairs,
         combined {accuracy, ci_low, ci_high, n_pairs, n_ties}, heads {OBJECTIVE: {...}},
         matching_head (the head named by objective, or null), longer_wins {...}, shorter_wins {...}}]}}
    uncertainty: {LABEL: {...}}   # only when an evaluated model is an ensemble (uncertainty.py); per ensemble:
        members K, aggregate (the rule the reward used: --aggregate or the served default),
        uncertainty_penalty (its λ; null unless mean_minus_var), pair_scores [member_diff_std,
        mean_item_std, member_disagreement], binned_by "member_diff_std", n_bins, bootstrap,
        datasets: {NAME: SECTION}, overall: SECTION (every set's pairs; item_std over their
        unique responses, the in-distribution items),
        ood: {NAME: {path, load {rows_read, rows_loaded, malformed}, n_items (unique, not dev
              items), n_shared_with_dev, item_std STATS, auroc {auroc, ci_low, ci_high,
              n_positive (its items), n_negative (the dev items)}}}   # {} without --ood
        SECTION = {n_pairs, n_wrong, n_ties (left out of the AUROC), accuracy {accuracy, ci_low,
                   ci_high, n_pairs, n_ties},
                   pair_error_auroc: {SCORE: {auroc, ci_low, ci_high, n_positive (wrong pairs),
                                              n_negative (right pairs)}},
                   bins: [{bin (1: least uncertain), uncertainty_low, uncertainty_high, accuracy,
                           ci_low, ci_high, n_pairs, n_ties}],
                   item_std STATS (the members' std of each unique response)}

kind "best_of_n" adds::

    best_of_n: {policy | null (--samples), n_prompts, n_samples, prompts_source,
                samples_source (--samples: the earlier run's samples.jsonl scored again) | null,
                generation {temperature, top_p, top_k, max_new_tokens, max_prompt_length (null: the policy's
                context minus max_new_tokens), prompts_truncated (how many prompts kept only their most recent
                tokens), seed} | null (--samples: nothing sampled), proxy LABEL, gold LABEL | null,
                curve: [{n, kl, proxy_reward, proxy_reward_sem, gold_reward, gold_reward_sem}],
                samples_file "samples.jsonl" (one line per sample: prompt_index, sample_index,
                prompt, response, proxy_score, gold_score; with --proxy-rules also proxy_members
                [each member's reward]),
                proxy_rules [RULE, ...] | null (--proxy-rules: mean, min, mean_minus_var, member:M),
                members K | null, uncertainty_penalty (the lambda of mean_minus_var) | null,
                by_rule {RULE: [{n, kl, proxy_reward, proxy_reward_sem, gold_reward, gold_reward_sem,
                         ensemble_std, ensemble_std_sem, with a gold: gold_minus_peak, gold_minus_peak_sem
                         (paired by prompt, against the rule's own peak n), and for each rule after the
                         first gold_minus_first, gold_minus_first_sem (paired, against the first rule)}]} | null
                         # the proxy picked by each rule
                by_rule_check {served_rule, served_uncertainty_penalty, max_abs_diff, tolerance, ok} | null
                    # the served default rule computed from the members against the service's reward}
    plots: best_of_n_rules (with --proxy-rules) beside best_of_n
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from .config import EvalConfig

SCHEMA_VERSION = 1
EXIT_SERVICE = 1  # exit status: the service could not be used
EXIT_INPUT = 2  # exit status: bad input


# =========================================================================== JSON


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays to Python; nan/inf to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def write_report(report: dict[str, Any], folder: Path) -> str:
    """``report.json`` and ``report.md`` in ``folder`` (an existing folder); returns the Markdown."""
    (folder / "report.json").write_text(json.dumps(to_jsonable(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    markdown = render_markdown(report)
    (folder / "report.md").write_text(markdown, encoding="utf-8")
    return markdown


def fail(message: str, code: int) -> int:
    """Say what went wrong on stderr; returns the exit status ``code``."""
    print(f"reward eval: {message}", file=sys.stderr)
    return code


def finish_report(report: dict[str, Any], config: EvalConfig, **plot_data: Any) -> int:
    """Write plots, report.json and report.md under --report (when given); print the Markdown."""
    if config.report:
        out = Path(config.report)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return fail(f"cannot create the report folder {out}: {exc}", EXIT_INPUT)
        if config.plots:
            report["plots"] = write_plots(report, out, **plot_data)
        markdown = write_report(report, out)
    else:
        markdown = render_markdown(report)
    sys.stdout.write(markdown)
    sys.stdout.flush()
    if config.report:
        print(f"reward eval: report written to {Path(config.report) / 'report.json'} and report.md", file=sys.stderr)
    return 0


# =========================================================================== Markdown


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.1f}%"


def _acc_ci(block: dict[str, Any]) -> str:
    return f"{_pct(block['accuracy'])} [{_pct(block['ci_low'])}, {_pct(block['ci_high'])}]"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict[str, Any]) -> str:
    if report["kind"] == "best_of_n":
        return _render_best_of_n(report)
    return _render_preference(report)


def _models_table(report: dict[str, Any]) -> str:
    return _table(
        ["label", "served model", "url", "architecture"],
        [[m["label"], m["served_model"], m["url"], m.get("card", {}).get("architecture", "")] for m in report["models"]],
    )


def _render_preference(report: dict[str, Any]) -> str:
    cfg = report["config"]
    labels = [m["label"] for m in report["models"]]
    out = ["# Reward model evaluation\n\n", f"Created {report['created']}. Scored through the service over HTTP.\n\n", _models_table(report)]
    out.append(
        "\nAccuracy: share of (chosen, rejected) pairs where the chosen response gets the higher reward; exact ties "
        f"count as half and are counted in *ties*. Brackets: {int(cfg['confidence'] * 100)}% Wilson interval "
        "(pairs treated as independent). K-way rankings contribute all their implied pairs.\n"
    )
    out.append("\n## Summary\n\n")
    header = ["dataset", "pairs"] + [f"{label} accuracy" for label in labels] + ["longer-wins baseline", "shorter wins"]
    rows = []
    for name, d in report["datasets"].items():
        rows.append([name, d["n_pairs"]] + [_acc_ci(d["models"][label]) for label in labels]
                    + [_pct(d["longer_wins"]["accuracy"]), _pct(_shorter_wins(d)["accuracy"])])
    out.append(_table(header, rows))
    if len(report["datasets"]) > 1:
        out.append("\n" + _table(
            ["model", "mean accuracy over datasets", "pooled accuracy", "pairs", "ties"],
            [[label, _pct(s["mean_accuracy"]), _pct(s["pooled_accuracy"]), s["n_pairs"], s["n_ties"]] for label, s in report["summary"].items()],
        ))

    for label, objectives in report.get("objectives", {}).items():
        out.append(_render_objectives(label, objectives))

    for label, uncertainty in report.get("uncertainty", {}).items():
        out.append(_render_uncertainty(label, uncertainty, cfg))

    for name, d in report["datasets"].items():
        out.append(f"\n## {name}\n\n")
        out.append(
            f"`{d['path']}`: {d['n_records']} records, {d['n_pairs']} pairs, {d['n_unique_responses']} unique responses "
            f"({d['load']['malformed']} malformed rows skipped). The \"longer answer wins\" baseline: "
            f"{_acc_ci(d['longer_wins'])} ({d['longer_wins']['n_ties']} equal-length pairs counted half)."
            f"{_measures(d) if report.get('objectives') else ''}\n\n"
        )
        out.append("### Accuracy, length and calibration\n\n")
        out.append(_table(
            ["model", "accuracy [95% CI]", "ties", "chosen shorter", "chosen longer", "length-controlled", "longer wins",
             "Pearson r(reward, length)", "Spearman", "ECE", "Brier"],
            [[label, _acc_ci(m), m["n_ties"],
              f"{_pct(m['length']['shorter_chosen']['accuracy'])} (n={m['length']['shorter_chosen']['n_pairs']})",
              f"{_pct(m['length']['longer_chosen']['accuracy'])} (n={m['length']['longer_chosen']['n_pairs']})",
              _pct(m["length"]["length_controlled_accuracy"]), _pct(m["length"]["longer_wins_accuracy"]),
              _num(m["length"]["pearson_reward_length"]), _num(m["length"]["spearman_reward_length"]),
              _num(m["calibration"]["ece"]), _num(m["calibration"]["brier"])]
             for label, m in d["models"].items()],
        ))
        out.append(
            "\nLength in characters; length-controlled = mean of the accuracies on pairs whose chosen answer is shorter "
            f"and longer ({d['models'][labels[0]]['length']['equal_length_pairs']} equal-length pairs in neither). "
            "Calibration: each pair shown in a seeded random order a/b, p = sigmoid(r_a - r_b), "
            f"ECE over {cfg['calibration_bins']} equal-width bins.\n\n"
        )
        out.append("### Per category\n\n")
        rows = []
        baselines = d.get("baselines_per_category", {})
        for c in d["categories"]:
            first = d["models"][labels[0]]["per_category"][c]
            rows.append([c, first["n_pairs"]] + [
                f"{_acc_ci(d['models'][label]['per_category'][c])}, ties {d['models'][label]['per_category'][c]['n_ties']}"
                for label in labels
            ] + ([_pct(baselines[c]["longer_wins"]["accuracy"]), _pct(baselines[c]["shorter_wins"]["accuracy"])] if baselines else []))
        out.append(_table(["category", "pairs"] + labels + (["longer wins", "shorter wins"] if baselines else []), rows))
        out.append("\n### Reward distribution\n\n")
        rows = []
        for label in labels:
            dist = d["models"][label]["reward_distribution"]
            for c, s in [("all", dist["all"])] + list(dist["per_category"].items()):
                rows.append([label, c, s["n"], _num(s["mean"]), _num(s["std"]), _num(s["q05"]), _num(s["q25"]),
                             _num(s["median"]), _num(s["q75"]), _num(s["q95"])])
        out.append(_table(["model", "category", "responses", "mean", "std", "q05", "q25", "median", "q75", "q95"], rows))
        out.append("\n### Reliability\n\n")
        first_bins = d["models"][labels[0]]["calibration"]["bins"]
        rows = []
        for i, b in enumerate(first_bins):
            rows.append([f"[{b['lower']:.1f}, {b['upper']:.1f}{']' if i == len(first_bins) - 1 else ')'}"] + [
                f"{_num(d['models'][label]['calibration']['bins'][i]['frac_a_better'], 2)} "
                f"(p={_num(d['models'][label]['calibration']['bins'][i]['mean_p'], 2)}, "
                f"n={d['models'][label]['calibration']['bins'][i]['n']})"
                for label in labels
            ])
        out.append(_table(["p_a_better bin"] + [f"{label}: observed (mean p, n)" for label in labels], rows))
        if d["comparisons"]:
            out.append("\n### Side by side\n\n")
            out.append(_table(
                ["a", "b", "pairs", "accuracy a", "accuracy b", "b - a [95% CI]", "agreement"],
                [[c["a"], c["b"], c["n_pairs"], _pct(c["accuracy_a"]), _pct(c["accuracy_b"]),
                  f"{_signed_pct(c['diff'])} [{_signed_pct(c['diff_ci_low'])}, {_signed_pct(c['diff_ci_high'])}]",
                  _pct(c["agreement"])] for c in d["comparisons"]],
            ))
            out.append(
                f"\nDifference: paired bootstrap over pairs ({cfg['bootstrap']} resamples, seed {cfg['seed']}), percentile "
                "interval. Agreement: share of pairs where both models pick the same winner.\n"
            )
        plots = report.get("plots", {}).get(name, {})
        if plots:
            out.append("\n" + "".join(f"![{kind}]({file})\n" for kind, file in plots.items()))
    return "".join(out)


def _shorter_wins(d: dict[str, Any]) -> dict[str, Any]:
    """The "shorter answer wins" block (reports from before it was recorded: 1 - longer wins)."""
    if "shorter_wins" in d:
        return d["shorter_wins"]
    longer = d["longer_wins"]
    return {"accuracy": None if longer["accuracy"] is None else 1 - longer["accuracy"]}


def _measures(d: dict[str, Any]) -> str:
    if d.get("objective"):
        return f" It measures **{d['objective']}**."
    sections = d.get("category_objectives") or {}
    if sections:
        return " Its categories measure " + ", ".join(f"{c}: **{o}**" for c, o in sections.items()) + "."
    return ""


def _render_objectives(label: str, objectives: dict[str, Any]) -> str:
    """The per-objective table of one model with several heads: per set (and section), the
    combination's accuracy, each head's, and the two length baselines."""
    names = objectives["names"]
    combine = f", combined by {objectives['combine']}" if objectives.get("combine") else ""
    out = [
        f"\n## Per objective: {label}\n\n",
        f"`{label}` has {len(names)} reward heads ({', '.join(names)}){combine}. Accuracy of the combination (the "
        "reward a caller gets) and of each head on the same pairs, with 95% Wilson intervals; **bold**: the head "
        "of the objective the set or section measures. Longer / shorter wins: picking the longer / the shorter "
        "answer (equal lengths count half).\n\n",
    ]
    rows = []
    for r in objectives["sections"]:
        section = r["dataset"] if r["category"] is None else f"{r['dataset']} · {r['category']}"
        measures = r["objective"] or ("(by category)" if r["category"] is None and any(
            x["dataset"] == r["dataset"] and x["category"] is not None for x in objectives["sections"]) else "")
        heads = [_acc_ci(r["heads"][n]) for n in names]
        heads = [f"**{h}**" if n == r["matching_head"] else h for n, h in zip(names, heads)]
        rows.append([section, measures, r["n_pairs"], _acc_ci(r["combined"]), *heads,
                     _pct(r["longer_wins"]["accuracy"]), _pct(r["shorter_wins"]["accuracy"])])
    out.append(_table(["set", "measures", "pairs", "combination", *names, "longer wins", "shorter wins"], rows))
    return "".join(out)


_PAIR_SCORE_TITLES = {"member_diff_std": "std of differences", "mean_item_std": "mean item std",
                      "member_disagreement": "disagreement", "spread_over_margin": "spread / margin",
                      "small_margin": "small margin (no ensemble)"}


def _auroc_ci(block: dict[str, Any]) -> str:
    return f"{_num(block['auroc'])} [{_num(block['ci_low'])}, {_num(block['ci_high'])}]"


def _render_uncertainty(label: str, u: dict[str, Any], cfg: dict[str, Any]) -> str:
    """The Uncertainty section of one ensemble: the AUROC of each pair score for its wrong pairs
    per set and overall, accuracy per quantile bin of pair uncertainty, and --ood sets."""
    rule = u["aggregate"] + (f" (λ = {u['uncertainty_penalty']:g})" if u["uncertainty_penalty"] is not None else "")
    scores = u["pair_scores"]
    out = [
        f"\n## Uncertainty: {label}\n\n",
        f"`{label}` is an ensemble of {u['members']} members; its reward here aggregates them by **{rule}**. Does the "
        "members' disagreement pick out the pairs that reward gets wrong (the rejected answer above the chosen one)? "
        "AUROC 1: every wrong pair is more uncertain than every right one; 0.5: no better than chance. Pair "
        "uncertainty: *std of differences*, the members' standard deviation of r_chosen - r_rejected; *mean item "
        "std*, the mean of the two answers' `ensemble_std`; *disagreement*, 1 - |2a - 1| with a the share of members "
        "that rank the chosen answer higher; *spread / margin*, the std of differences over the members' mean "
        "difference (scale-free); *small margin (no ensemble)*, -|r_chosen - r_rejected| of the reward itself, the "
        "baseline a score of the members has to beat. Exact ties of the reward are left out of the AUROC and count half in "
        f"the accuracies. Brackets: 95% bootstrap interval ({u['bootstrap']} resamples of the wrong and the right "
        f"pairs, seed {cfg['seed']}). Item std: the members' standard deviation of each unique response.\n\n",
    ]
    sections = [*u["datasets"].items(), ("all sets", u["overall"])] if len(u["datasets"]) > 1 else list(u["datasets"].items())
    out.append(_table(
        ["set", "pairs", "wrong", "accuracy", *(f"AUROC {_PAIR_SCORE_TITLES.get(s, s)}" for s in scores),
         "item std mean", "item std median"],
        [[name, x["n_pairs"], x["n_wrong"], _acc_ci(x["accuracy"]), *(_auroc_ci(x["pair_error_auroc"][s]) for s in scores),
          _num(x["item_std"]["mean"]), _num(x["item_std"]["median"])] for name, x in sections],
    ))
    out.append(
        f"\n### Accuracy per quantile of pair uncertainty: {label}\n\nPairs sorted by "
        f"{_PAIR_SCORE_TITLES.get(u['binned_by'], u['binned_by'])} and cut into {u['n_bins']} bins of equal size, "
        "1 the least uncertain.\n\n"
    )
    rows = [[name, b["bin"], f"{_num(b['uncertainty_low'])} to {_num(b['uncertainty_high'])}", b["n_pairs"], _acc_ci(b)]
            for name, x in sections for b in x["bins"]]
    out.append(_table(["set", "bin", "pair uncertainty", "pairs", "accuracy [95% CI]"], rows))
    if u["ood"]:
        dev = u["overall"]["item_std"]
        out.append(
            f"\n### Out of distribution: {label}\n\nThe members' standard deviation on responses unlike the dev sets "
            "(`--ood`) against the dev sets' responses. AUROC: of that std for telling the set's responses from the dev "
            "sets' (1: every one has a larger spread). Responses that are also in a dev set are left out of the set.\n\n"
        )
        rows = [["dev sets (in distribution)", dev["n"], _num(dev["mean"]), _num(dev["median"]), _num(dev["q95"]), ""]]
        rows += [[name, o["n_items"], _num(o["item_std"]["mean"]), _num(o["item_std"]["median"]), _num(o["item_std"]["q95"]),
                  _auroc_ci(o["auroc"])] for name, o in u["ood"].items()]
        out.append(_table(["responses", "n", "item std mean", "median", "q95", "AUROC vs dev [95% CI]"], rows))
    return "".join(out)


def _signed_pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:+.1f} pt"


def _render_best_of_n(report: dict[str, Any]) -> str:
    b = report["best_of_n"]
    g = b["generation"] or {}
    truncated = ""
    if g.get("prompts_truncated"):
        limit = g.get("max_prompt_length") or "auto: the context minus the new tokens"
        truncated = (f"{g['prompts_truncated']} prompts were longer than the policy was given and kept only their most "
                     f"recent tokens (`--max-prompt-length` {limit}).\n\n")
    out = ["# Best-of-N evaluation\n\n", f"Created {report['created']}. Scored through the service over HTTP.\n\n", _models_table(report)]
    if b["generation"] is None:  # --samples: an earlier run's samples scored again
        drawn = (f"\nSamples of an earlier run scored again (nothing sampled): {b['n_prompts']} prompts from "
                 f"`{b['samples_source']}`, N = {b['n_samples']} samples each.")
    else:
        drawn = (f"\nPolicy `{b['policy']}`: {b['n_prompts']} prompts from `{b['prompts_source']}`, N = {b['n_samples']} "
                 f"samples each (temperature {g['temperature']}, top-p {g['top_p']}, top-k {g['top_k'] or 'off'}, max "
                 f"{g['max_new_tokens']} new tokens, seed {g['seed']}).")
    out.append(
        drawn + f" Proxy: **{b['proxy']}**" + (f"; gold: **{b['gold']}**" if b["gold"] else "") + ".\n\n"
        + truncated
        + "Best-of-n reward: exact expectation over draws of n of the N samples without replacement "
        "(sum_i C(i-1, n-1)/C(N, n) s_(i) over sorted scores), mean over prompts (± standard error); gold: the gold "
        "reward of the proxy's pick. KL = log n - (n-1)/n.\n\n"
    )
    header = ["n", "KL (nats)", "proxy reward"] + (["gold reward"] if b["gold"] else [])
    rows = []
    for r in b["curve"]:
        row = [r["n"], _num(r["kl"], 4), f"{_num(r['proxy_reward'])} ± {_num(r['proxy_reward_sem'])}"]
        if b["gold"]:
            row.append(f"{_num(r['gold_reward'])} ± {_num(r['gold_reward_sem'])}")
        rows.append(row)
    out.append(_table(header, rows))
    if b.get("by_rule"):
        out.append(_render_rules(b))
    if b.get("samples_file"):
        out.append(f"\nSamples and their scores: `{b['samples_file']}`.\n")
    plots = report.get("plots", {})
    if plots:
        out.append("\n" + "".join(f"![{kind}]({file})\n" for kind, file in plots.items()))
    return "".join(out)


def _render_rules(b: dict[str, Any]) -> str:
    """The --proxy-rules tables: per n, each rule's proxy reward, the gold reward of its pick and
    the members' spread at its pick."""
    rules = list(b["by_rule"])
    penalty = f" (λ = {_num(b['uncertainty_penalty'])})" if b.get("uncertainty_penalty") is not None else ""
    check = b.get("by_rule_check") or {}
    out = [
        f"\n## The proxy under each rule\n\nThe proxy is an ensemble of {b['members']} members; each rule picks from "
        f"the same samples{penalty}. The samples were scored once with each member's reward and each rule derived from "
        "the members with the service's formula (`member:M`: member M alone). Check: the served default rule "
        f"`{check.get('served_rule')}` computed that way differs from the service's reward by at most "
        f"{_num(check.get('max_abs_diff'), 7)} ({'ok' if check.get('ok') else 'NOT the same formula'}).\n\n"
    ]
    sections = [("Gold reward of each rule's pick", "gold_reward"), ("Proxy reward under each rule", "proxy_reward"),
                ("Members' standard deviation at each rule's pick", "ensemble_std")]
    for title, key in sections:
        if key == "gold_reward" and not b["gold"]:
            continue
        rows = [[r["n"], _num(r["kl"], 4)] + [f"{_num(b['by_rule'][rule][i][key])} ± {_num(b['by_rule'][rule][i][key + '_sem'])}"
                                             for rule in rules]
                for i, r in enumerate(b["by_rule"][rules[0]])]
        out.append(f"{title} (mean over prompts ± standard error):\n\n" + _table(["n", "KL (nats)"] + rules, rows) + "\n")
    return "".join(out)


# =========================================================================== plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("reward eval: matplotlib is not installed; skipping the PNG plots", file=sys.stderr)
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "data"


def write_plots(report: dict[str, Any], out: Path, scores: dict[str, np.ndarray] | None = None, datasets: Any = None) -> dict[str, Any]:
    """Draw the report's PNGs into ``out``; returns what goes under the report's ``plots`` key."""
    plt = _pyplot()
    if plt is None:
        return {}
    if report["kind"] == "best_of_n":
        plots = {"best_of_n": _plot_best_of_n(plt, report, out)}
        if report["best_of_n"].get("by_rule"):
            plots["best_of_n_rules"] = _plot_best_of_n_rules(plt, report, out)
        return plots
    plots: dict[str, Any] = {}
    by_name = {d.name: d for d in (datasets or [])}
    for name, d in report["datasets"].items():
        entry = {"reliability": _plot_reliability(plt, name, d, out)}
        if scores is not None and name in by_name:
            entry["reward_vs_length"] = _plot_length(plt, name, d, by_name[name], scores, out)
        plots[name] = entry
    return plots


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path.name


def save_figure(fig: Any, path: Path, *, dpi: int) -> None:
    """Write a matplotlib figure as a PNG of 256 palette colours. Line plots have few colours,
    so it looks the same at about a third of the bytes of matplotlib's RGBA PNG; reports are
    committed, and the working tree travels to lent GPU machines under a size limit.
    Falls back to matplotlib's own PNG where Pillow cannot quantise it."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    try:
        from PIL import Image

        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)
    except (ImportError, OSError, ValueError):
        Path(path).write_bytes(buffer.getvalue())


def _plot_reliability(plt, name: str, d: dict[str, Any], out: Path) -> str:
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    labels = list(d["models"])
    width = 0.1 / max(1, len(labels))
    for k, (label, m) in enumerate(d["models"].items()):
        bins = [b for b in m["calibration"]["bins"] if b["n"]]
        ax.plot([b["mean_p"] for b in bins], [b["frac_a_better"] for b in bins], marker="o",
                label=f"{label} (ECE {m['calibration']['ece']:.3f})")
        all_bins = m["calibration"]["bins"]
        hist.bar([b["lower"] + (k + 0.5) * width for b in all_bins], [b["n"] for b in all_bins], width=width, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency a is better")
    ax.set_title(f"Reliability: {name}")
    ax.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("p_a_better = sigmoid(r_a - r_b)")
    hist.set_ylabel("pairs")
    return _save(plt, fig, out / f"reliability-{slug(name)}.png")


def _plot_length(plt, name: str, d: dict[str, Any], dataset: Any, scores: dict[str, np.ndarray], out: Path) -> str:
    labels = list(d["models"])
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    lengths = np.maximum(dataset.response_len, 1)
    for ax, label in zip(axes[0], labels):
        m = d["models"][label]["length"]
        ax.scatter(lengths, scores[label][dataset.responses], s=6, alpha=0.4)
        if lengths.max() >= 10 * lengths.min():
            ax.set_xscale("log")
        ax.set_xlabel("response length (characters)")
        ax.set_ylabel("reward")
        r, rho = m["pearson_reward_length"], m["spearman_reward_length"]
        ax.set_title(f"{label}: Pearson {r if r is None else round(r, 3)}, Spearman {rho if rho is None else round(rho, 3)}", fontsize=9)
    fig.suptitle(f"Reward vs length: {name}")
    return _save(plt, fig, out / f"reward-vs-length-{slug(name)}.png")


def _plot_best_of_n(plt, report: dict[str, Any], out: Path) -> str:
    # Gains over n = 1 on one axis: proxy and gold rewards live on different scales, and what
    # matters (Gao et al. 2022) is whether gold keeps rising with the proxy or turns down.
    b = report["best_of_n"]
    curve = b["curve"]
    kl = [r["kl"] for r in curve]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    series = [("proxy", b["proxy"], "o")] + ([("gold", b["gold"], "s")] if b["gold"] else [])
    for key, label, marker in series:
        base = curve[0][f"{key}_reward"]
        ax.errorbar(kl, [r[f"{key}_reward"] - base for r in curve], yerr=[r[f"{key}_reward_sem"] or 0.0 for r in curve],
                    marker=marker, capsize=3, label=f"{key} ({label}); n=1: {base:.3f}")
    for r in curve:
        ax.annotate(f"n={r['n']}", (r["kl"], r["proxy_reward"] - curve[0]["proxy_reward"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("KL(best-of-n || policy) = log n - (n-1)/n  [nats]")
    ax.set_ylabel("expected reward of the best of n, minus n=1")
    ax.set_title(f"Best-of-N (N={b['n_samples']}, {b['n_prompts']} prompts)")
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "best-of-n.png")


def _plot_best_of_n_rules(plt, report: dict[str, Any], out: Path) -> str:
    """Per rule against the analytic KL: the proxy's gain over n = 1 (each rule on its own scale),
    the gold reward of the rule's pick (one scale for all: over-optimisation is where it turns
    down), and the members' spread at the pick. Bars: ± standard error."""
    b = report["best_of_n"]
    panels = [("proxy_reward", "proxy reward under the rule, minus n=1", True)]
    if b["gold"]:
        panels.append(("gold_reward", f"gold reward ({b['gold']}) of the rule's pick", False))
    panels.append(("ensemble_std", "members' std at the rule's pick", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, ylabel, relative) in zip(axes[0], panels):
        for rule, curve in b["by_rule"].items():
            base = curve[0][key] if relative else 0.0
            ax.errorbar([r["kl"] for r in curve], [r[key] - base for r in curve],
                        yerr=[r[f"{key}_sem"] or 0.0 for r in curve], marker="o", capsize=3, label=rule)
        ax.set_xlabel("KL(best-of-n || policy) = log n - (n-1)/n  [nats]")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"Best-of-N by proxy rule (N={b['n_samples']}, {b['n_prompts']} prompts, ensemble of {b['members']})")
    return _save(plt, fig, out / "best-of-n-rules.png")
