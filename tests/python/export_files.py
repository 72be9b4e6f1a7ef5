"""The files a validator of exports reads: what both validate_fhir.py and
validate_jp_profiles.py take as arguments (directories are searched for .ndjson and .json)."""

from __future__ import annotations

import sys
from pathlib import Path


def inputs(paths: list[str], program: str) -> list[Path]:
    """The `.ndjson` and `.json` files named or found below the named directories, in
    order; exits 2 (bad arguments) naming `program` when a path does not exist."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".ndjson", ".json"))
            )
        elif path.is_file():
            found.append(path)
        else:
            print(f"{program}: no such file or directory: {name}", file=sys.stderr)
            sys.exit(2)
    return found
