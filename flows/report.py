"""The per-run report: Markdown + PNG plots in the store, mirrored as Prefect artifacts."""

from __future__ import annotations

import base64
import re

from tracecore.storage.store import ArtifactStore

COLUMNS = ["stage", "artifact", "status", "shards", "skipped_shards", "rows", "rejects", "seconds", "notes"]


# What the store and the runner write into every manifest; everything else in it is the stage's own
# statistics.
BOOKKEEPING_KEYS = {"ref", "stage", "config_hash", "inputs", "code_version", "packages", "shards", "rows",
                    "bytes", "schema", "checksum", "shard_checksums", "files", "committed_at", "plots",
                    "report_columns", "report_rows", "intermediate", "cleaned", "skipped_shards", "seconds",
                    "rejected"}


def shown(value):
    """A float at 4 significant digits (sums of pass times carry float noise, e.g. 0.30000000000000004);
    anything else as it is."""
    if not isinstance(value, float):
        return value
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def stats_of(manifest: dict, width: int = 48) -> dict:
    """A manifest's statistics: the scalar values a stage recorded through `commit`/`write`, whatever their
    names (the report shows them all, so a stage adds one without touching the report)."""
    return {k: (shown(v) if not isinstance(v, str) or len(v) <= width else v[:width - 1] + "…")
            for k, v in manifest.items()
            if k not in BOOKKEEPING_KEYS and isinstance(v, (bool, int, float, str))}


def artifact_rows(store: ArtifactStore, record: dict, checksums: bool = False) -> list[dict]:
    """One row per artifact a run planned: what the run recorded and what the store holds now (= what a
    re-run skips), from one `store.status` per artifact (`checksums`: hash every part, not only stamps).
    `tracecore status` shows all of it; the report the committed part."""
    rows = []
    for stage, info in record["stages"].items():
        for name, ref in info.get("refs", {}).items():
            status = store.status(ref, checksums)
            markers, committed = status.markers, status.committed
            m = store.manifest(ref) if committed else {}
            notes = stats_of(m)
            rows.append({"stage": stage, "output": name, "artifact": ref, "status": info.get("status", "?"),
                         "committed": committed, "shards_done": len(markers), "shards": m.get("shards", "?"),
                         "skipped_shards": m.get("skipped_shards", 0),
                         "rows": sum(x["rows"] for x in markers),
                         "rejects": m.get("rejected", ""), "seconds": shown(m.get("seconds", "")),
                         "notes": ", ".join(f"{k}={v}" for k, v in notes.items()),
                         "on_rerun": (f"repair ({len(status.corrupt)} corrupt parts recomputed)"
                                      if status.corrupt
                                      else "skip" if committed
                                      else f"resume ({len(markers)} shards kept)" if markers else "compute"),
                         "error": info.get("error") or "", "intermediate": bool(m.get("intermediate"))})
    return rows


def stage_rows(store: ArtifactStore, record: dict) -> list[dict]:
    """The report's table: committed artifacts (intermediates, e.g. ingest's `parsed` and dedup tables, left
    out)."""
    return [r for r in artifact_rows(store, record) if r["committed"] and not r["intermediate"]]


def markdown_table(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def collect_plots(store: ArtifactStore, record: dict) -> list[tuple[str, str, bytes]]:
    """(title, file name, PNG bytes): every plot a stage listed in its manifest (drawn when it computed)."""
    plots = []
    for stage, info in record["stages"].items():
        for ref in info.get("refs", {}).values():
            if store.is_committed(ref):
                for rel in store.manifest(ref).get("plots", []):
                    name = rel.rsplit("/", 1)[-1]
                    plots.append((f"{stage}: {name[:-4]}", f"{stage}_{name}", store.read_file(ref, rel)))
    return plots


def report_rows(store: ArtifactStore, ref: str, manifest: dict) -> list[dict]:
    """The table a manifest names `report_columns` for: its preview rows, kept in the manifest at commit so a
    report reads no artifact data (an artifact committed before previews: its first rows, read)."""
    if "report_rows" in manifest:
        return manifest["report_rows"]
    from tracecore.tasks.runtime.stage import preview_rows

    return preview_rows(store.read_table(ref).to_pylist(), manifest["report_columns"])


def stage_tables(store: ArtifactStore, record: dict) -> list[str]:
    """Markdown tables for artifacts whose manifest names `report_columns` (e.g. memorization scores)."""
    parts = []
    for stage, info in record["stages"].items():
        for ref in info.get("refs", {}).values():
            manifest = store.manifest(ref) if store.is_committed(ref) else {}
            if manifest.get("skipped"):
                parts += [f"## {stage}: {ref}", "", f"_{manifest['skipped']}_", ""]
                continue
            columns = manifest.get("report_columns")
            if columns:
                rows = [{c: (round(v, 3) if isinstance(v, float) else v) for c, v in r.items()}
                        for r in report_rows(store, ref, manifest)[:50]]
                parts += [f"## {stage}: {ref}", "", markdown_table(rows, columns), ""]
    return parts


def wall_clock_line(record: dict) -> str:
    """The run's wall clock with the calibration measured at its start (timings differ twofold between
    machines)."""
    from tracecore.flows.calibrate import calibration_line

    wall = record.get("wall_seconds")
    head = f"wall clock {wall:.0f} s ({wall / 60:.1f} min)" if wall is not None else "wall clock not recorded"
    calib = record.get("calibration")
    if calib:
        return f"{head}; {calibration_line(calib)}"
    return f"{head}; " + record.get("calibration_skipped", "calibration off (`calibrate: false`)")


def write_report(store: ArtifactStore, record: dict) -> str:
    """Write runs/<id>/report.md (+ plots) and return its path."""
    run_dir = store.run_dir(record["run_id"])
    rows = stage_rows(store, record)
    parts = [f"# tracecore run {record['run_id']}", "",
             f"state: **{record['state']}** · profile `{record['config'].get('profile')}` · store "
             f"`{store.display_path()}`",
             "", f"{wall_clock_line(record)}", "", markdown_table(rows), ""] + stage_tables(store, record)
    plots = collect_plots(store, record)
    for title, name, png in plots:
        store.fs.makedirs(f"{run_dir}/plots", exist_ok=True)
        with store.fs.open(f"{run_dir}/plots/{name}", "wb") as fh:
            fh.write(png)
        parts += [f"## {title}", "", f"![{title}](plots/{name})", ""]
    errors = {s: i["error"] for s, i in record["stages"].items() if i.get("error")}
    if errors:
        parts += ["## Errors", ""] + [f"- **{s}**: {e}" for s, e in errors.items()]
    parts += ["", ("Read any artifact with `pyarrow.parquet.read_table(<store>/artifacts/<artifact>/)` "
                   "or `pandas.read_parquet`; lineage is in each artifact's `_MANIFEST.json`.")]
    path = f"{run_dir}/report.md"
    with store.fs.open(path, "w") as fh:
        fh.write("\n".join(parts) + "\n")
    publish(store, record, rows, "\n".join(parts), plots)
    return store.display_path() + path[len(store.root):]


def publish(store: ArtifactStore, record: dict, rows: list[dict], markdown: str,
            plots: list[tuple[str, str, bytes]]) -> None:
    """Keyed Prefect artifacts (visible on the UI's Artifacts page) when inside a flow run."""
    from tracecore.tasks.runtime.common import in_prefect_run

    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    for stage in {r["stage"] for r in rows}:
        create_table_artifact([r for r in rows if r["stage"] == stage], key=f"tracecore-{stage}-outputs",
                              description=f"{stage} outputs of run {record['run_id']}")
    create_markdown_artifact(markdown, key="tracecore-pipeline-summary",
                             description=f"run {record['run_id']}")
    for info in record["stages"].values():
        for ref in info.get("refs", {}).values():
            manifest = store.manifest(ref) if store.is_committed(ref) else {}
            columns = manifest.get("report_columns")
            if columns:
                table = [{c: r.get(c) for c in columns} for r in report_rows(store, ref, manifest)]
                create_table_artifact(table, key="tracecore-" + ref.split("/")[0].replace("_", "-"),
                                      description=ref)
    for title, name, png in plots:  # inline PNG: the UI cannot reach files in the artifact store
        key = "tracecore-" + re.sub(r"[^a-z0-9]+", "-", name.lower().removesuffix(".png")).strip("-")
        image = base64.b64encode(png).decode()
        create_markdown_artifact(f"### {title}\n\n![{title}](data:image/png;base64,{image})", key=key,
                                 description=f"{title}, run {record['run_id']}")
