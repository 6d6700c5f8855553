"""The results store: one record per reported figure, kept per machine and per notebook.

Layout under ``data/results/`` (or a scratch root for smoke runs):

    environments/<environment_id>.json     the fingerprint, saved once per machine
    <environment_id>/<notebook>.json       that notebook's records measured on that machine

A file is only ever replaced whole (written beside it, flushed, then renamed), so an interrupted run
leaves the previous file intact. A record is identified by (notebook, variant, stage, metric,
config); storing a record with the same identity replaces the old one, and records of other
machines live in other folders, so one machine's run never overwrites another's.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from utils.fingerprint import fingerprint
from utils.io import write_json_atomic
from utils.paths import DATA

SCHEMA_VERSION = 1

RESULTS = DATA / "results"

KINDS = ("measured", "derived", "projected", "emulated")

CONFIG_FIELDS = ("model", "weights", "resolution", "aspect_ratio", "frames", "steps", "dtype", "threads")

WEIGHTS = ("random", "real", "trained-mini", "none")  # "none": no model involved (GEMM, bandwidth)


class SchemaError(ValueError):
    pass


@dataclass
class Record:
    """One figure. ``kind`` says how it was obtained; ``spread`` holds n, iqr, min, max, ... for
    measured timings; ``quality`` holds fidelity or adherence fields where they apply."""

    variant: str
    stage: str
    metric: str
    unit: str
    value: float
    kind: str = "measured"
    spread: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    note: str = ""


def make_config(**fields) -> dict:
    """A record config: every ``CONFIG_FIELDS`` entry (None where it does not apply) plus extras."""
    return {name: None for name in CONFIG_FIELDS} | {"weights": "none"} | fields


def timing_record(variant: str, stage: str, timing, config: dict, metric: str = "seconds", note: str = "",
                  scale: float = 1.0) -> Record:
    """A measured record from a ``benchmark.Timing``: the median (times ``scale``) with its spread."""
    spread = {k: v * scale if k in ("iqr", "min", "max", "first") else v for k, v in timing.spread().items()}
    return Record(variant=variant, stage=stage, metric=metric, unit="s", value=timing.median_s * scale,
                  spread=spread, config=config, note=note)


def validate(record: dict) -> dict:
    """Check one stored record against the schema; returns it, or raises ``SchemaError``."""
    required = {"schema_version": int, "run_id": str, "environment_id": str, "notebook": str, "variant": str,
                "stage": str, "metric": str, "unit": str, "value": (int, float), "kind": str, "spread": dict,
                "config": dict, "quality": dict, "note": str, "time": str}
    for name, types in required.items():
        if name not in record:
            raise SchemaError(f"record lacks {name!r}: {record}")
        if not isinstance(record[name], types) or isinstance(record[name], bool):
            raise SchemaError(f"record field {name!r} must be {types}, got {record[name]!r}")
    if record["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(f"schema version {record['schema_version']} is not {SCHEMA_VERSION}")
    if record["kind"] not in KINDS:
        raise SchemaError(f"kind {record['kind']!r} is not one of {KINDS}")
    missing = [k for k in CONFIG_FIELDS if k not in record["config"]]
    if missing:
        raise SchemaError(f"record config lacks {missing}: {record['config']}")
    if record["config"]["weights"] not in WEIGHTS:
        raise SchemaError(f"config.weights must be one of {WEIGHTS}, got {record['config']['weights']!r}")
    return record


def _identity(record: dict) -> tuple:
    return (record["notebook"], record["variant"], record["stage"], record["metric"],
            json.dumps(record["config"], sort_keys=True))


def _run_of(record: dict) -> tuple:
    """What a ``not_run`` record stands for: a variant of an experiment. A later measurement of it
    supersedes the failure."""
    return record["notebook"], record["variant"], record["config"].get("experiment")


class ResultsStore:
    """Records of one notebook run on this machine. ``add`` stores immediately (atomically)."""

    def __init__(self, notebook: str, root: Path | str = RESULTS, device: str = "cpu"):
        self.notebook = notebook
        self.root = Path(root)
        self.environment = fingerprint(device)
        self.environment_id = self.environment["environment_id"]
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        self.path = self.root / self.environment_id / f"{notebook}.json"
        env_path = self.root / "environments" / f"{self.environment_id}.json"
        write_json_atomic(env_path, self.environment)  # refreshed: git commit and env vars may change

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return json.loads(self.path.read_text())["records"]

    def add(self, *records: Record) -> None:
        stamped = []
        for record in records:
            full = dict(vars(record), schema_version=SCHEMA_VERSION, run_id=self.run_id,
                        environment_id=self.environment_id, notebook=self.notebook,
                        time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        git_commit=self.environment["git"]["commit"], git_dirty=self.environment["git"]["dirty"])
            stamped.append(validate(full))
        ran = {_run_of(r) for r in stamped if r["metric"] != "not_run"}
        kept = {_identity(r): r for r in self._read() if not (r["metric"] == "not_run" and _run_of(r) in ran)}
        kept.update({_identity(r): r for r in stamped})
        write_json_atomic(self.path, {"schema_version": SCHEMA_VERSION, "environment_id": self.environment_id,
                                      "notebook": self.notebook, "records": list(kept.values())})


def load_environments(root: Path | str = RESULTS) -> dict[str, dict]:
    folder = Path(root) / "environments"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def load_records(root: Path | str = RESULTS):
    """Every stored record under ``root`` as a pandas DataFrame, config fields as ``config.<name>``
    columns and spread fields as ``spread.<name>``."""
    import pandas as pd  # not in the emulated aarch64 environment, which stores records through this module

    rows = []
    for path in sorted(Path(root).glob("*/*.json")):
        if path.parent.name == "environments":
            continue
        for record in json.loads(path.read_text())["records"]:
            rows.append(validate(record))
    if not rows:
        return pd.DataFrame(columns=["environment_id", "notebook", "variant", "stage", "metric", "value"])
    return pd.json_normalize(rows, sep=".")
