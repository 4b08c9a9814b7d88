"""``rightsizer compare``: the verdict of an experiment, offline from request logs or live from a
proxy's ``/admin/experiments``, as text or JSON.

Offline, one log holding both groups (a canary's or shadow's log: records carry their group)
or two logs, the baseline's and the candidate's (records without a group take the side's).
What the groups run and cost comes from the proxy config (``--config``: its ``groups``,
``experiments``, SLO and model configs) or from ``--group NAME:key=value,...`` flags (keys:
``gpu``, ``count``, ``quant``, ``max_num_seqs``, ``usd_per_hour``, ``input`` and ``output``:
$ per 1M tokens of a managed API, ``model_config``). Parsing the proxy config is the proxy's
(``proxy/programs/cli.py``); this module only turns records and specs into the verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from estimator.capacity import Slo

__all__ = ["Slo", "emit", "offline", "parse_group", "render", "split_records"]
from estimator.catalog import load_gpu_catalog
from estimator.compare import ExperimentSpec, ExperimentsSpec, GroupSpec
from estimator.experiments import compare_records
from estimator.records import RequestRecord
from estimator.report import to_dict
from estimator.settings import EstimatorConfig
from estimator.traffic import read_log

_KEYS = {
    "gpu": "gpu",
    "count": "gpus_per_backend",
    "quant": "quant",
    "max_num_seqs": "max_num_seqs",
    "usd_per_hour": "usd_per_hour",
    "input": "usd_per_1m_input_tokens",
    "output": "usd_per_1m_output_tokens",
    "model_config": "model_config",
    "engine": "engine",
}
_INTS = {"gpus_per_backend", "max_num_seqs"}
_FLOATS = {"usd_per_hour", "usd_per_1m_input_tokens", "usd_per_1m_output_tokens"}


def parse_group(text: str) -> GroupSpec:
    """``NAME:gpu=h100-sxm,count=2,quant=fp8`` or ``NAME:input=0.15,output=0.6`` (managed)."""
    name, _, rest = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:key=value,...")
    kw: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        field = _KEYS.get(key)
        if not sep or field is None:
            raise argparse.ArgumentTypeError(f"{item!r}: keys are {', '.join(_KEYS)}")
        try:
            kw[field] = (
                int(value) if field in _INTS else float(value) if field in _FLOATS else value
            )
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value!r}: not a number") from None
    if ("usd_per_1m_input_tokens" in kw) != ("usd_per_1m_output_tokens" in kw):
        raise argparse.ArgumentTypeError(f"{name}: a managed API needs input= and output=")
    return GroupSpec(name=name, **kw)


def split_records(
    logs: Sequence[str], baseline: str | None, candidate: str | None
) -> tuple[list[RequestRecord], list[RequestRecord], str, str]:
    """(baseline records, candidate records, their group names) from one or two logs."""
    if len(logs) == 2:
        return (
            read_log(logs[0]),
            read_log(logs[1]),
            baseline or "baseline",
            candidate or "candidate",
        )
    records = read_log(logs[0])
    groups = sorted({r.group for r in records if r.group})
    if baseline is None or candidate is None:
        if len(groups) != 2:
            raise ValueError(
                f"{logs[0]}: records of groups {groups or 'none'}; name --baseline "
                "and --candidate, or give two logs"
            )
        baseline, candidate = baseline or groups[0], candidate or groups[1]
    base = [r for r in records if r.group == baseline]
    cand = [r for r in records if r.group == candidate]
    return base, cand, baseline, candidate


def offline(
    logs: Sequence[str],
    *,
    spec: ExperimentsSpec | None,
    groups: Sequence[GroupSpec],
    slo: Slo,
    experiment: str | None = None,
    baseline: str | None = None,
    candidate: str | None = None,
    rate_rps: float | None = None,
    model_configs: Mapping[str, str] | None = None,
    catalog_path: str | None = None,
) -> dict[str, Any]:
    """The verdict of logged records (module docstring) as a JSON-ready dict."""
    exp = None
    if spec is not None and spec.experiments:
        exp = next((e for e in spec.experiments if experiment in (None, e.name)), None)
        if exp is None:
            raise ValueError(f"no experiment {experiment!r} in the config")
        baseline, candidate = baseline or exp.baseline, candidate or exp.candidate
    base, cand, b_name, c_name = split_records(logs, baseline, candidate)
    known = {g.name: g for g in (spec.groups if spec else ())}
    known.update({g.name: g for g in groups})
    exp = (
        dataclasses.replace(exp, baseline=b_name, candidate=c_name)
        if exp
        else ExperimentSpec(
            name=experiment or "compare", baseline=b_name, candidate=c_name, min_requests=20
        )
    )
    full = ExperimentsSpec(
        groups=tuple(known.get(n, GroupSpec(name=n)) for n in (b_name, c_name)), experiments=(exp,)
    )
    config = EstimatorConfig(
        slo_ttft_p95_s=slo.ttft_p95_s,
        slo_itl_p95_s=slo.itl_p95_s,
        model_configs=dict(model_configs or {}),
        catalog=catalog_path,
    )
    catalog = load_gpu_catalog(extra=catalog_path)
    verdict = compare_records(base, cand, config, catalog, full, rate_rps=rate_rps)
    return to_dict(verdict)


def _num(x: Any, fmt: str = "{:.3g}") -> str:
    return "n/a" if x is None else fmt.format(x)


def render(v: Mapping[str, Any], out: TextIO | None = None) -> None:
    """One verdict (a ``Verdict`` as a dict) as text."""
    out = out or sys.stdout
    w = out.write
    w(f"experiment {v.get('experiment')} ({v.get('model')}): {v.get('status')}\n")
    w(f"  verdict: {v.get('verdict')}\n")
    groups = v.get("groups") or []
    rows = [("", *(f"{g['group']} ({g['role']})" for g in groups))]
    for label, key, fmt in (
        ("requests (live/shadow)", None, ""),
        ("error rate", "error_rate", "{:.2%}"),
        ("SLO attained", "slo_attainment", "{:.1%}"),
        ("TTFT p50 / p95 s", None, ""),
        ("ITL p50 / p95 s (per-request mean)", None, ""),
        ("capacity at SLO, req/s/replica", "capacity_rps", "{:.3g}"),
        ("  95% CI", None, ""),
        ("$/hour per replica", "usd_per_hour", "${:.2f}"),
        ("replicas now / at peak", None, ""),
        ("$/month now", "usd_per_month", "${:,.0f}"),
        ("$/month at forecast peak", "usd_per_month_peak", "${:,.0f}"),
        ("$/1M tokens (at capacity or list)", "usd_per_1m_tokens", "${:.3g}"),
    ):
        rows.append((label, *(_cell(g, label, key, fmt) for g in groups)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        w("  " + "  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)).rstrip() + "\n")
    for reason in v.get("reasons") or ():
        w(f"  - {reason}\n")
    methods = v.get("methods") or {}
    if methods:
        w("  methods: " + "; ".join(f"{k}: {m}" for k, m in methods.items()) + "\n")


def _cell(g: Mapping[str, Any], label: str, key: str | None, fmt: str) -> str:
    if key is not None:
        return _num(g.get(key), fmt)
    if label.startswith("requests"):
        return f"{g['requests']} ({g['live']}/{g['shadow']})"
    if label.startswith("TTFT"):
        return f"{_num(g.get('ttft_p50_s'))} / {_num(g.get('ttft_p95_s'))}"
    if label.startswith("ITL"):
        return f"{_num(g.get('itl_p50_s'))} / {_num(g.get('itl_p95_s'))}"
    if label.strip() == "95% CI":
        lo, hi = g.get("capacity_low_rps"), g.get("capacity_high_rps")
        return "n/a" if lo is None or hi is None else f"{lo:.3g}-{hi:.3g}"
    return f"{_num(g.get('replicas'), '{}')} / {_num(g.get('replicas_peak'), '{}')}"


def emit(verdicts: Sequence[Mapping[str, Any]], as_json: bool, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if as_json:
        json.dump(list(verdicts), out, indent=2)
        out.write("\n")
        return
    if not verdicts:
        out.write("no verdict yet\n")
    for v in verdicts:
        render(v, out)
