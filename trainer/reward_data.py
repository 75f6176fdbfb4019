"""Data helpers of ``reward train-rm``: dev-set specs (``NAME=PATH[::MAX_ROWS]``), length-balancing
pair weights and the per-file load report written into ``reward_model.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .data import DataSpec, LoadReport, PreferenceRecord, parse_data_spec


def parse_eval_spec(text: str) -> DataSpec:
    """``NAME=PATH[::MAX_ROWS]`` or ``PATH``; the default name is ``<folder>/<file stem>``."""
    name, sep, rest = text.partition("=")
    if sep and name and rest and not Path(text).exists():
        spec = parse_data_spec(rest, name=name)
    else:
        spec = parse_data_spec(text)
        spec = DataSpec(path=spec.path, weight=spec.weight, max_rows=spec.max_rows, name=default_eval_name(spec.path))
    return spec


def default_eval_name(path: str) -> str:
    p = Path(path)
    stem = p.name
    for suffix in (".jsonl.gz", ".json.gz", ".jsonl", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{p.parent.name}/{stem}" if p.parent.name else stem


def length_balance_weights(records: Sequence[PreferenceRecord], strength: float) -> tuple[list[list[float]], dict]:
    """Per record, per pair (in ``record.pairs()`` order), a weight that balances length.

    Within each source, pairs whose better response is longer (in characters) and pairs whose
    better response is shorter get equal total weight at ``strength=1`` (pairs of equal length
    keep weight 1); ``strength`` in (0, 1) interpolates from 1. Returns the weights and a report.
    """
    kinds: list[list[int]] = []  # +1 longer better, -1 shorter better, 0 tie
    counts: dict[str, list[int]] = {}
    for r in records:
        ks = []
        for b, w in r.pairs():
            lb, lw = len(r.responses[b]), len(r.responses[w])
            k = (lb > lw) - (lb < lw)
            ks.append(k)
            c = counts.setdefault(r.source, [0, 0])
            if k > 0:
                c[0] += 1
            elif k < 0:
                c[1] += 1
        kinds.append(ks)
    factors: dict[str, tuple[float, float]] = {}
    report: dict[str, Any] = {}
    for source, (n_long, n_short) in counts.items():
        if strength > 0 and n_long and n_short:
            total = n_long + n_short
            f_long = 1.0 + strength * (total / (2 * n_long) - 1.0)
            f_short = 1.0 + strength * (total / (2 * n_short) - 1.0)
        else:
            f_long = f_short = 1.0
        factors[source] = (f_long, f_short)
        weighted_long = n_long * f_long
        weighted_short = n_short * f_short
        report[source] = {
            "pairs_longer_better": n_long, "pairs_shorter_better": n_short,
            "longer_better_fraction": n_long / max(1, n_long + n_short),
            "weight_longer_better": f_long, "weight_shorter_better": f_short,
            "weighted_longer_better_fraction": weighted_long / max(1e-12, weighted_long + weighted_short),
        }
    weights = []
    for r, ks in zip(records, kinds):
        f_long, f_short = factors[r.source]
        weights.append([f_long if k > 0 else f_short if k < 0 else 1.0 for k in ks])
    return weights, report


def file_report(report: LoadReport) -> list[dict[str, Any]]:
    return [
        {
            "source": f.source, "path": f.path, "rows_read": f.rows_read, "rows_loaded": f.rows_loaded,
            "malformed": f.malformed, "problems": [list(p) for p in f.problems[:5]], "formats": dict(f.formats),
            "weight": f.weight, "records_used": f.records_used,
        }
        for f in report.files
    ]
