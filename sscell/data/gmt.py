"""Gene sets in the GMT format (MSigDB, the study's gene programmes): `name<TAB>description<TAB>gene...`."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from sscell.atomic import atomic_file
from sscell.errors import SscellError


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Gene sets by name, genes in file order; blank lines are skipped."""
    if not os.path.isfile(path):
        raise SscellError(f"{path}: no such .gmt file")
    sets: dict[str, list[str]] = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if len(fields) < 3 or not fields[0]:
                raise SscellError(f"{path}:{number}: a .gmt line needs a name, a description and genes, "
                                  "separated by tabs")
            if fields[0] in sets:
                raise SscellError(f"{path}:{number}: gene set {fields[0]!r} appears twice")
            sets[fields[0]] = [gene for gene in fields[2:] if gene]
    return sets


def write_gmt(path: str | os.PathLike, sets: Mapping[str, Sequence[str]], description: str = "sscell") -> None:
    """Write gene sets to `path` (atomically)."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for name, genes in sets.items():
            f.write("\t".join([name, description, *genes]) + "\n")
