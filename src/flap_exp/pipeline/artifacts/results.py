"""Read back what the evaluate and search stages wrote for the cells of cells.yaml (stale outputs of cells
no longer in the study are ignored): one row per evaluated cell (its perplexity record merged with its
zero-shot and speed records where its tables measure them), the dense row, the selections, and which
tables each cell belongs to."""
from __future__ import annotations

from pathlib import Path

from . import paths
from .io import read_json

METHOD_LABELS = {"wifv": "FLAP", "ifv": "FLAP-IFV", "wifn": "FLAP-WIFN", "wanda_sp": "Wanda-sp",
                 "weight_magnitude": "Magnitude"}


def method_name(row: dict) -> str:
    return f"{row['metric']}/{row['structure']} ({row['compensation']})"


def run_name(row: dict | None, protocol: str) -> str:
    """What a person recognises in the MLflow UI: method, structure, ratio, compensation, calibration, protocol."""
    if row is None:
        return f"dense [{protocol}]"
    label = METHOD_LABELS.get(row["metric"], row["metric"])
    calib = f" {row['calib']}" if row.get("calib") else ""
    return f"{label} {row['structure']} {row['ratio']:g} {row['compensation']}{calib} [{protocol}]"


def achieved_group(achieved: float) -> str:
    """The budget a cell is compared at: its achieved ratio to 0.01 (the default rules land within one
    unit's cost per layer of the target, far below 0.005), e.g. "0.20"; tables and MLflow group by it."""
    return f"{round(float(achieved) + 0.0, 2):.2f}"


def _merged(root: Path, key: str, measures) -> dict:
    row = read_json(root / paths.measurement(key, "ppl"))
    for m in measures:
        extra = read_json(root / paths.measurement(key, m))
        row |= {k: v for k, v in extra.items() if k not in row}
    return row


def collect(cells: dict, root: str | Path = ".") -> tuple[list[dict], dict, dict[str, dict]]:
    """cells: cells.yaml's `cells`. Returns (rows, dense, selections by search cell key); each row carries
    `key`, `tables` (the tables it appears in) and `measures`."""
    root = Path(root)
    member: dict[str, list[str]] = {}
    for tname, t in cells["tables"].items():
        for key in t["cells"]:
            member.setdefault(key, []).append(tname)
    rows = []
    for key in cells["evaluate"]:
        measures = [m for m in ("zeroshot", "speed") if key in cells.get(m, {})]
        rows.append({**_merged(root, key, measures), "key": key, "tables": member.get(key, []), "measures": measures})
    dense_measures = [m for m in cells["dense"]["measure"] if m != "ppl"]
    dense = {**_merged(root, paths.DENSE, dense_measures), "key": paths.DENSE, "measures": dense_measures}
    sels = {c["cell"]: read_json(root / paths.selection(c["cell"])) for c in cells["evaluate"].values()}
    return rows, dense, sels
