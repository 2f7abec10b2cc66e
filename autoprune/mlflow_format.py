"""How a search's values become MLflow entities: names, strings, limits, versions, the store's
journal mode. Pure helpers of `tracking.Tracker` (the writer), kept apart so it reads as the
sequence of records it makes.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .names import TAG_VERSION_PREFIX

TRIAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
VERSIONED_PACKAGES = ("autoprune", "torch", "torch-pruning", "ray", "optuna", "mlflow")
ERROR_TAG_CHARS = 1000  # the tag shows the tail of a traceback; error.txt has all of it
# MLflow's limits (mlflow.utils.validation): 100 params/tags and 1000 entities per log_batch.
_BATCH_PARAMS, _BATCH_ENTITIES = 100, 1000
_PARAM_CHARS, _TAG_CHARS = 6000, 8000
# MLflow 3's UI opens an experiment without this tag on its GenAI traces "Overview"; tagged as
# custom model development it opens on the runs table (`autoprune ui` tags older ones too).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
ART_TRIALS_TABLE = "trials_table.json"  # log_table: rendered as a table by the artifact view


def runs_url(server: str, experiment_id: str) -> str:
    """UI link that opens the runs table (the UI's default GenAI view hides it)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _key(k: Any) -> str:
    """A valid MLflow param/metric name: letters, digits, `_-. :/` only, at most 250 chars."""
    return re.sub(r"[^\w.\- :/]", "_", str(k))[:250]


def _param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, tuple, dict, bool)) or v is None else str(v)
    return s[:_PARAM_CHARS]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _flag(b: bool) -> str:
    return "true" if b else "false"


def _quote(s: str) -> str:
    return "'" + s.replace("'", "\\'") + "'"


def _versions() -> dict[str, str]:
    """Installed versions without importing the packages (importing ray costs about a second)."""
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[TAG_VERSION_PREFIX + pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _use_wal(db: Path) -> None:
    """Put a SQLite file in WAL mode (a persistent property of the file).

    MLflow commits every logging call separately, and in the default rollback-journal mode each
    commit costs several fsyncs (about 20 ms on a VM disk, so 0.1 s per trial); in WAL mode one
    cheap append (about 4 ms). Readers such as `mlflow server` on the same host keep working and
    no longer block the writer. WAL needs shared memory, so it is unsafe for a database on a
    network file system: pass sqlite_wal=False there (or use a tracking server).
    """
    with contextlib.closing(sqlite3.connect(db, timeout=20)) as con:
        con.execute("PRAGMA journal_mode=WAL")
