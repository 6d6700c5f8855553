"""Files the study writes, each written whole: a temporary file beside the target, flushed, then renamed
over it, so an interrupted run leaves the previous file intact. Also the keyed JSON tables (the measured
footprints, the best attention kernels) and the one unit of memory every module reports in."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

GIB = 1024**3


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder made if needed); it replaces ``path`` only if the
    block succeeds, with ordinary permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path | str, payload) -> None:
    """``payload`` as indented JSON with sorted keys."""
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")


# ---- keyed tables: {"_doc": ..., "entries": [...]} ------------------------------------------------------

def read_table(path: Path | str) -> list[dict]:
    """The entries of a keyed table (none when the file does not exist)."""
    path = Path(path)
    return json.loads(path.read_text())["entries"] if path.is_file() else []


def merge_table(path: Path | str, entries: list[dict], identity: Callable[[dict], tuple], doc: str) -> None:
    """Add ``entries`` to the table at ``path``, replacing those with the same ``identity``; sorted by it."""
    kept = {identity(e): e for e in read_table(path)}
    kept.update({identity(e): e for e in entries})
    write_json_atomic(path, {"_doc": doc, "entries": sorted(kept.values(), key=lambda e: tuple(map(str, identity(e))))})


def nearest_environment(entries: list[dict], environment_id: str | None, arch: str | None) -> list[dict]:
    """The entries measured in ``environment_id`` if there are any, else on the same ``arch``, else all."""
    for narrowed in ([e for e in entries if e.get("environment_id") == environment_id],
                     [e for e in entries if arch is not None and e.get("arch") == arch]):
        if narrowed:
            return narrowed
    return entries
