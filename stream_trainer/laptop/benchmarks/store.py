"""``bench --store s3``: checkpoint and publish cost on an S3 object store beside the disk.

Each repeat runs the service twice, back to back on the same workload: once with everything
on local disk (the bench's usual run) and once with ``registry.root`` on a local SeaweedFS
(``weed server -s3``, the server the tests use, started from its cached binary); the S3 run
goes first in odd repeats. Both runs are reported as shares of their wall time (the
learning span, as ``time_shares``):

- ``checkpoint``: ``checkpoint_duration_seconds`` (the durable write, on the writer thread);
- ``publish``: ``publish_duration_seconds`` (gate, registry upload and version event, on the
  poll thread);
- ``object_store``: every request of ``object_store_request_seconds`` (S3 only), with the
  p50 / p99 of the uploads (``put``, ``put_if_absent``, ``put_if_match`` together),
  bucket-interpolated like ``histogram_quantile``.

Shares and quantiles are reported, never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from stream_trainer.errors import StreamTrainerError
from stream_trainer.laptop.benchmarks import report as rep
from stream_trainer.laptop.benchmarks.service_run import P, ServiceRun, quantile

if TYPE_CHECKING:
    from stream_trainer.testing.seaweedfs import SeaweedFS

STORES = ("disk", "s3")
BUCKET = "stream-trainer-bench"
UPLOADS = ("put", "put_if_absent", "put_if_match")
# Issue: checkpoint + publish cost at most 5 % of run time, on disk and on S3 alike.
COST_TARGET = 0.05
_LE = re.compile(r'le="([^"]+)"')
_OPERATION = re.compile(r'operation="([^"]+)"')


class StoreUnavailable(StreamTrainerError):
    """The S3 server of ``bench --store s3`` cannot be started (binary not built, start-up)."""


def start_s3(stack: ExitStack) -> SeaweedFS:
    """Start SeaweedFS from its cached binary (never building it: that takes ~10 min) and
    create the bench's bucket; stopped when ``stack`` closes. Raises StoreUnavailable."""
    # Here, not at import: the CLI imports this module to build its parser.
    from stream_trainer.testing.seaweedfs import SeaweedFS, seaweedfs_home  # noqa: PLC0415

    binary = seaweedfs_home() / "weed"
    if not binary.is_file():
        raise StoreUnavailable(
            f"bench --store s3 needs the SeaweedFS binary {binary}: build it once with "
            "`make s3-server` (needs go, ~10 minutes on 2 cores)"
        )
    server = SeaweedFS(bucket=BUCKET)
    try:
        stack.enter_context(server)
    except Exception as error:  # BrokerStartError and whatever the process start raised
        raise StoreUnavailable(f"SeaweedFS did not start: {error}") from error
    return server


def s3_config(server: SeaweedFS, prefix: str) -> dict[str, Any]:
    """Config sections that put a run's registry and checkpoints under
    ``s3://BUCKET/<prefix>`` on ``server``; the keys come from the environment
    (:meth:`SeaweedFS.admin` ``.env()``), never the config."""
    url = f"s3://{BUCKET}/{prefix}"
    return {
        "registry": {"root": f"{url}/registry"},
        # Checkpoints on the store too: their uploads join the upload quantiles.
        "checkpoint": {"dir": f"{url}/checkpoints"},
        "object_store": {
            "endpoint_url": server.endpoint_url,
            "region": server.region,
            "path_style": True,
        },
    }


def merge(config: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """``config`` with each of ``sections``' keys updated one level deep (a new dict)."""
    out = dict(config)
    for name, section in sections.items():
        out[name] = {**(out.get(name) or {}), **section}
    return out


def _buckets(
    final: dict[str, float], name: str, operations: tuple[str, ...]
) -> list[tuple[float, float]]:
    """Cumulative ``(le, count)`` of histogram ``name`` summed over ``operations``."""
    summed: dict[float, float] = {}
    for key, value in final.items():
        if not key.startswith(f"{name}_bucket{{"):
            continue
        operation = _OPERATION.search(key)
        le = _LE.search(key)
        if operation is None or le is None or operation.group(1) not in operations:
            continue
        bound = float(le.group(1))
        summed[bound] = summed.get(bound, 0.0) + value
    return sorted(summed.items())


def costs(run: ServiceRun) -> dict[str, float]:
    """Checkpoint, publish and object-store seconds of ``run`` as shares of its wall time,
    their counts, and the upload p50 / p99 (NaN without uploads)."""
    rate = run.rate()
    wall = run.total / rate if rate > 0 else math.nan
    final = run.final

    def seconds(histogram: str) -> float:
        return final.get(f"{P}_{histogram}_seconds_sum", 0.0)

    def count(histogram: str) -> float:
        return final.get(f"{P}_{histogram}_seconds_count", 0.0)

    store = f"{P}_object_store_request_seconds"
    store_seconds = math.fsum(v for k, v in final.items() if k.startswith(f"{store}_sum{{"))
    uploads = _buckets(final, store, UPLOADS)
    checkpoint = seconds("checkpoint_duration") / wall
    publish = seconds("publish_duration") / wall
    return {
        "wall_s": wall,
        "checkpoint_share": checkpoint,
        "publish_share": publish,
        "checkpoint_publish_share": checkpoint + publish,
        "object_store_share": store_seconds / wall,
        "checkpoints": count("checkpoint_duration"),
        "publishes": count("publish_duration"),
        "object_store_requests": math.fsum(
            v for k, v in final.items() if k.startswith(f"{store}_count{{")
        ),
        "uploads": uploads[-1][1] if uploads else 0.0,
        "upload_p50_s": quantile(0.5, uploads),
        "upload_p99_s": quantile(0.99, uploads),
        "object_store_failures": math.fsum(
            v for k, v in final.items() if k.startswith(f"{P}_object_store_request_failures_total")
        ),
    }


def _stats(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {k: rep.spread([r.get(k, math.nan) for r in runs]) for k in runs[0]} if runs else {}


def section(disk: list[ServiceRun], s3: list[ServiceRun], endpoint: str) -> dict[str, Any]:
    """The report's ``store`` section: per store, records/s and :func:`costs` (medians and
    spread), the s3 / disk rate per repeat, and where each store's bytes went."""
    out: dict[str, Any] = {
        "server": f"SeaweedFS (weed server -s3) at {endpoint}",
        "on_s3": ["registry", "checkpoints"],
    }
    for name, runs in (("disk", disk), ("s3", s3)):
        out[name] = {
            "records_per_s": rep.spread([r.rate() for r in runs]),
            "costs": _stats([costs(r) for r in runs]),
        }
    out["s3_vs_disk_rate"] = rep.spread(
        [rep.ratio(b.rate(), a.rate()) for a, b in zip(disk, s3, strict=True)]
    )
    return out


def targets(store: dict[str, Any]) -> dict[str, tuple[float, str, float]]:
    """Checkpoint + publish share, median over the repeats, per store: at most 5 %."""
    return {
        f"checkpoint_publish_share_{name}": (
            store[name]["costs"]["checkpoint_publish_share"]["median"],
            "<=",
            COST_TARGET,
        )
        for name in STORES
    }


def table_lines(store: dict[str, Any]) -> list[str]:
    """The ``store`` section as text lines."""

    def pct(s: dict[str, Any]) -> str:
        return (
            f"{rep.num(s['median'], ' %', 100, 2)} "
            f"[{rep.num(s['min'], '', 100, 2)}-{rep.num(s['max'], '', 100, 2)}]"
        )

    def ms(s: dict[str, Any]) -> str:
        return rep.num(s["median"], " ms", 1000, 1)

    lines = [
        "",
        f"store ({store['server']}; on S3: {', '.join(store['on_s3'])}), shares of run time, "
        "median [min-max]:",
        f"  {'':<5} {'records/s':>10} {'checkpoint':>22} {'publish':>22} {'object store':>22} "
        f"{'upload p50':>11} {'p99':>9}",
    ]
    for name in STORES:
        c = store[name]["costs"]
        lines.append(
            f"  {name:<5} {store[name]['records_per_s']['median']:>10,.0f} "
            f"{pct(c['checkpoint_share']):>22} {pct(c['publish_share']):>22} "
            f"{pct(c['object_store_share']):>22} {ms(c['upload_p50_s']):>11} "
            f"{ms(c['upload_p99_s']):>9}"
        )
    s3 = store["s3"]["costs"]
    lines.append(
        f"  s3: {s3['uploads']['median']:.0f} uploads, {s3['object_store_requests']['median']:.0f} "
        f"requests, {s3['publishes']['median']:.0f} publishes, "
        f"{s3['checkpoints']['median']:.0f} checkpoints, "
        f"{s3['object_store_failures']['median']:.0f} failed requests per run; s3 / disk "
        f"records/s {rep.num(store['s3_vs_disk_rate']['median'], digits=2)}"
    )
    return lines
