"""Stream cells from the CELLxGENE Census (or any SOMA experiment) into an sscell store.

    python -m sscell.data.census --output=STORE --recipe=sctab --vocabulary=protein_coding.txt
    python -m sscell.data.census --output=STORE --uri=PATH_OR_URI_OR_CENSUS_VERSION [--organism="Homo sapiens"]
        [--obs-filter="is_primary_data == True and assay in ['10x 3\\' v3']"] [--vocabulary=FILE] [--recipe=NAME]

The cells go through sscell.data.convert unchanged (same count checks, vocabulary handling, split
policies, out-of-core shuffle, atomic appearance and report); the source is sscell.data.soma. A
recipe is a TOML file of these options (sscell/data/recipes/NAME.toml, or a path); flags given on
the command line override it. Reading a recipe never runs code.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path

from sscell.data import convert as converter
from sscell.data.soma import open_soma_input
from sscell.errors import SscellError, exit_on_error

RECIPES = Path(__file__).with_name("recipes")


@dataclasses.dataclass
class Recipe:
    """Which cells and genes to take from a Census release, and how to split them."""

    census_version: str | None = None  # or --uri
    organism: str = "Homo sapiens"
    obs_filter: str | None = None      # TileDB-SOMA value filter over obs
    min_cells_per_cell_type: int = 0
    min_donor_units_per_cell_type: int = 0
    vocabulary: str | None = None      # a gene-list path, or "required": the user must pass --vocabulary
    split: str = "donor"
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)


def load_recipe(name: str) -> Recipe:
    """A recipe by name (sscell/data/recipes/NAME.toml) or path to a .toml file."""
    path = Path(name) if name.endswith(".toml") else RECIPES / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.toml")))
        raise SscellError(f"no recipe {name!r}: give one of {known} or the path of a .toml file")
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SscellError(f"{path}: cannot read the recipe ({e})") from None
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise SscellError(f"{path}: unknown recipe key(s) {', '.join(unknown)}; recipe keys are {', '.join(sorted(fields))}")
    if "split_fractions" in values:
        values["split_fractions"] = tuple(values["split_fractions"])
    return Recipe(**values)


def convert_census(output: str, *, uri: str | None = None, recipe: str | Recipe | None = None,
                   organism: str | None = None, obs_filter: str | None = None, vocabulary: str | None = None,
                   layer: str = "raw", gene_column: str | None = None, split: str | None = None, seed: int = 0,
                   block_cells: int = 8192, bucket_nonzeros: int = converter.BUCKET_NONZEROS) -> dict:
    """Write the cells of a SOMA experiment or Census release selected by `recipe` and the
    arguments (which override it) into a store at `output`; returns convert's report."""
    plan = load_recipe(recipe) if isinstance(recipe, str) else recipe or Recipe()
    given = {"census_version": uri, "organism": organism, "obs_filter": obs_filter, "split": split}
    plan = dataclasses.replace(plan, **{k: v for k, v in given.items() if v is not None})
    if plan.census_version is None:
        raise SscellError("give --uri (a SOMA experiment, a Census-shaped collection or a Census version) or a --recipe")
    vocabulary = vocabulary or plan.vocabulary
    if vocabulary == "required":
        raise SscellError(f"recipe {recipe!r} needs a gene vocabulary: pass --vocabulary=FILE (docs/census.md "
                          "says how to make the study's)")
    opener = functools.partial(open_soma_input, plan.census_version, organism=plan.organism,
                               obs_filter=plan.obs_filter, layer=layer,
                               min_cells_per_cell_type=plan.min_cells_per_cell_type,
                               min_donor_units_per_cell_type=plan.min_donor_units_per_cell_type)
    return converter.convert([opener], output, vocabulary=vocabulary, gene_column=gene_column, split=plan.split, seed=seed,
                             split_fractions=plan.split_fractions, block_cells=block_cells,
                             bucket_nonzeros=bucket_nonzeros)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; prints the report as JSON."""
    parser = argparse.ArgumentParser(prog="python -m sscell.data.census", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="store directory to create")
    parser.add_argument("--uri", help="a SOMA experiment or Census-shaped collection (path or URI), or a Census "
                                      "release (e.g. 2023-05-15, stable); default: the recipe's census_version")
    parser.add_argument("--organism", help="the Census experiment (default: the recipe's, else Homo sapiens)")
    parser.add_argument("--obs-filter", help="TileDB-SOMA value filter over obs (replaces the recipe's)")
    parser.add_argument("--vocabulary", help="text file of gene ids, one per line (default: the experiment's var)")
    parser.add_argument("--recipe", help="a named recipe (e.g. sctab) or a .toml path")
    parser.add_argument("--layer", default="raw", help="X layer holding raw counts")
    parser.add_argument("--gene-column", help="var column of gene ids (default: feature_id, else var_id)")
    parser.add_argument("--split", choices=converter.SPLIT_POLICIES, help="split by donor unit or by cell")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and the cell order")
    parser.add_argument("--block-cells", type=int, default=8192, help="rows read at a time")
    parser.add_argument("--bucket-nonzeros", type=int, default=converter.BUCKET_NONZEROS,
                        help="nonzeros per shuffle bucket (bounds memory of the write pass)")
    args = parser.parse_args(argv)
    with exit_on_error():
        report = convert_census(args.output, uri=args.uri, recipe=args.recipe, organism=args.organism,
                                obs_filter=args.obs_filter, vocabulary=args.vocabulary, layer=args.layer,
                                gene_column=args.gene_column, split=args.split, seed=args.seed,
                                block_cells=args.block_cells, bucket_nonzeros=args.bucket_nonzeros)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
