"""Summaries (median and spread), the machine description, targets and the text table."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

STAGES = ("ingest_ceiling", "learner_ceiling", "naive", "service")
_LIBRARIES = (
    "stream-trainer",
    "confluent-kafka",
    "river",
    "scikit-learn",
    "numpy",
    "msgspec",
    "prometheus-client",
)


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves (NaNs ignored)."""
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "runs": values}
    return {
        "median": statistics.median(known),
        "min": min(known),
        "max": max(known),
        "runs": values,
    }


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 or unknown."""
    return a / b if b and not math.isnan(b) else math.nan


def machine() -> dict[str, Any]:
    """CPU model, cores, Python and library versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    versions: dict[str, str] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        import confluent_kafka  # noqa: PLC0415

        versions["librdkafka"] = str(confluent_kafka.libversion()[0])
    except ImportError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": versions,
        "load_average": list(os.getloadavg()),
    }


def targets(
    mode: str,
    ratios: dict[str, float],
    service: dict[str, Any],
    search: dict[str, Any] | None = None,
    extra: dict[str, tuple[float, str, float]] | None = None,
) -> dict[str, Any]:
    """Issue 9's targets for ``mode`` (and issue 23's with ``search``, and ``extra``'s
    ``name: (value, ">=" or "<=", bound)``): each with its measured value and whether it is
    met."""
    checks: dict[str, tuple[float, str, float]] = {}
    if mode == "per_record":
        checks["service_vs_learner_ceiling"] = (ratios["service_vs_learner_ceiling"], ">=", 0.85)
        checks["service_vs_naive"] = (ratios["service_vs_naive"], ">=", 1.3)
    elif mode == "mini_batch":
        checks["service_vs_ingest_ceiling"] = (ratios["service_vs_ingest_ceiling"], ">=", 0.8)
        checks["service_vs_naive"] = (ratios["service_vs_naive"], ">=", 4.0)
    else:
        figures = service.get("full_batch", {})
        checks["ingest_during_retrain_vs_without"] = (
            figures.get("ratio", {}).get("median", math.nan),
            ">=",
            0.7,
        )
        # "No rebalance during retrains": the worst repeat counts.
        checks["revokes_or_losses"] = (
            figures.get("revokes_or_losses", {}).get("max", math.nan),
            "<=",
            0.0,
        )
    if search is not None:
        # Issue 23: N trial workers on N cores; the full_batch ratio above is then ingestion
        # during searches vs without.
        checks[f"search_speedup_{search['workers']}_workers"] = (
            search["speedup"]["median"],
            ">=",
            1.7,
        )
    checks["rss_growth_pct"] = (
        service.get("rss", {}).get("growth_pct", {}).get("median", math.nan),
        "<=",
        5.0,
    )
    checks.update(extra or {})
    out: dict[str, Any] = {}
    for name, (value, op, bound) in checks.items():
        met = None if math.isnan(value) else (value >= bound if op == ">=" else value <= bound)
        out[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return out


def _fmt_rate(s: dict[str, Any]) -> str:
    return f"{s['median']:>12,.0f} {s['min']:>12,.0f} {s['max']:>12,.0f}"


def num(value: float, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value * scale:.{digits}f}{unit}"


def table(report: dict[str, Any], extra_lines: Sequence[str] = ()) -> str:
    """The report as readable text; ``extra_lines`` (a section's own) go before the targets."""
    w = report["workload"]
    m = report["machine"]
    lines = [
        f"stream-trainer bench: mode {w['mode']}, {w['records']:,} records x {w['features']} "
        f"features ({w.get('dataset', 'numeric')}, {w.get('format', 'json')}), "
        f"{w['partitions']} partition(s), {report['repeats']} repeat(s), broker {w['broker']}",
        f"machine: {m['cpu_model']}, {m['cores']} cores, Python {m['python']}",
        "",
        f"{'stage':<18} {'records/s med':>12} {'min':>12} {'max':>12}",
    ]
    for stage in STAGES:
        lines.append(f"{stage:<18} {_fmt_rate(report['stages'][stage]['records_per_s'])}")
    lines.append("")
    paired = report.get("ratios_per_repeat", {})
    lines.append(f"{'ratio':<30} {'of medians':>10} {'per repeat: median [min-max]':>30}")
    for name, value in report["ratios"].items():
        each = paired.get(name)
        per_repeat = (
            f"{num(each['median'], digits=2)} [{num(each['min'], digits=2)}-"
            f"{num(each['max'], digits=2)}]"
            if each
            else ""
        )
        lines.append(f"{name:<30} {num(value, digits=2):>10} {per_repeat:>30}")
    svc = report["service"]
    cp = svc["checkpoint"]
    lines += [
        "",
        f"service start-up to first learnt record: {num(svc['startup_s']['median'], ' s', 1, 1)}",
        f"checkpoints: {cp['count']['median']:.0f} per run, p50 "
        f"{num(cp['p50_s']['median'], ' ms', 1000, 1)}, p99 "
        f"{num(cp['p99_s']['median'], ' ms', 1000, 1)}, size "
        f"{num(cp['size_bytes']['median'], ' kB', 1e-3, 1)}; after stop "
        f"{cp['files_after_stop']['median']:.0f} file(s), newest "
        f"{num(cp['newest_file_bytes']['median'], ' kB', 1e-3, 1)}",
        f"RSS: peak {num(svc['rss']['peak_bytes']['median'], ' MB', 1e-6, 0)}, growth after "
        f"warm-up {num(svc['rss']['growth_pct']['median'], ' %', 1, 1)} (warm-up ended at "
        f"{num(svc['rss']['warm_learnt']['median'], ' records', 1, 0)})",
    ]
    shares = svc.get("time_shares", {})
    if shares:
        lines.append(
            "service time shares: "
            + ", ".join(f"{k} {num(v['median'], ' %', 100, 0)}" for k, v in shares.items())
        )
    loop = svc.get("learn_loop")
    if loop:
        lines.append(
            f"service's learn loop (predict + learn calls): "
            f"{num(loop['records_per_s']['median'], ' rec/s', 1, 0)}, "
            f"{num(loop['vs_learner_ceiling']['median'], digits=2)} of the learner ceiling "
            f"[{num(loop['vs_learner_ceiling']['min'], digits=2)}-"
            f"{num(loop['vs_learner_ceiling']['max'], digits=2)}]: the learner's own speed "
            "inside the service (service / learner ceiling = this x the loop's share of wall time)"
        )
    profile = svc.get("profile")
    if profile:
        learner = num(profile["learner_share"], " %", 100, 1)
        lines.append(
            f"service poll thread ({profile['sampler']}; {profile['loop_samples']:,} samples "
            f"in the loop; the learner's own work {learner}):"
        )
        lines += [
            f"  {name:<48} {num(share, ' %', 100, 1):>8}"
            for name, share in profile["shares"].items()
        ]
    if "full_batch" in svc:
        fb = svc["full_batch"]
        lines.append(
            f"full_batch ingestion: {num(fb['rate_during_retrain']['median'], ' rec/s', 1, 0)} "
            f"during retrains vs {num(fb['rate_without_retrain']['median'], ' rec/s', 1, 0)} "
            f"without, both after the first fit (ratio {num(fb['ratio']['median'], digits=2)}; "
            f"before any model {num(fb['rate_before_first_model']['median'], ' rec/s', 1, 0)}), "
            f"{fb['retrains']['median']:.0f} retrains, "
            f"{fb['revokes_or_losses']['median']:.0f} revokes/losses"
        )
    search = report.get("search")
    if search:
        per_minute = search["trials_per_minute"]
        lines.append(
            f"search ({search['trials_per_search']} trials on {search['window_records']:,} "
            f"records): 1 worker {num(per_minute['1']['median'], ' trials/min', 1, 1)}, "
            f"{search['workers']} workers "
            f"{num(per_minute[str(search['workers'])]['median'], ' trials/min', 1, 1)}; "
            f"speedup {num(search['speedup']['median'], digits=2)} "
            f"[{num(search['speedup']['min'], digits=2)}-"
            f"{num(search['speedup']['max'], digits=2)}] against a CPU ceiling of "
            f"{num(search['cpu_speedup_ceiling']['median'], digits=2)} (N processes of pure "
            f"CPU work, same moments); pool start-up "
            f"{num(search['pool_start_s'], ' s', 1, 1)} (once per idle minute); the "
            "full_batch ingestion ratio above is during searches"
        )
    lines += extra_lines
    lines.append("")
    lines.append("targets (issue 9):")
    for name, t in report["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "unknown"}[t["met"]]
        lines.append(
            f"  {name:<34} {num(t['value'], digits=2):>8} (target {t['target']}): {verdict}"
        )
    return "\n".join(lines)
