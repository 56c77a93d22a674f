"""A portable model bundle: a trained sscell model in plain files, read without its run or store.

    BUNDLE/README.md           model card: task, training data, steps, headline results, usage
    BUNDLE/bundle.json         format and version, source run, checkpoint and step, loss, class names
                               (and their Cell Ontology ids) of a classifier, training data, results,
                               the sha256 of params.safetensors, genes.csv and config.json
    BUNDLE/config.json         the run's config (model.dtype settled)
    BUNDLE/genes.csv           the gene table, in model input order (index: gene ids; e.g. feature_name)
    BUNDLE/params.safetensors  the parameters, keys '/'-joined paths ("encoder/dense_0/kernel")

Reading one runs no code from it: JSON, CSV and safetensors only (no pickle, no import of the
config's loss.module). It refuses files that are symbolic links, parameters, a gene table or a config
whose sha256 is not the one recorded, and any malformed file, in one line. A bundle is written
into a temporary folder beside its path and swapped into place (`sscell.atomic.atomic_folder`),
so an interrupted export leaves the previous bundle, never a half-written one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd
import safetensors.numpy
from flax import traverse_util

from sscell.atomic import atomic_folder
from sscell.config import CONFIG_FILE, load_config, save_config
from sscell.errors import SscellError

FORMAT, VERSION = "sscell-bundle", 2  # 2: with sha256 checksums
META_FILE, PARAMS_FILE, GENES_FILE, CARD_FILE = "bundle.json", "params.safetensors", "genes.csv", "README.md"
CHECKED = (PARAMS_FILE, GENES_FILE, CONFIG_FILE)  # files whose sha256 bundle.json records
META_KEYS = {"source": str, "checkpoint": str, "step": int, "loss": str, "training": dict}  # what a reader needs
HEADLINE = ("knn_macro_f1", "knn_micro_f1", "probe_macro_f1", "recon_ev_weighted", "scib_donor_total",
            "finetune_macro_f1")


def flatten(params: dict) -> dict[str, np.ndarray]:
    """{"encoder/dense_0/kernel": array, ...} of a nested parameter dict (safetensors' flat layout)."""
    return {key: np.asarray(value) for key, value in traverse_util.flatten_dict(params, sep="/").items()}


def check_parameters(source: str, params: dict, wanted: dict, needs: str, kind: str) -> None:
    """Refuse `params` unless they hold every parameter of `wanted` (abstract arrays: the model's
    `jax.eval_shape`d init) with its shape and dtype, every value finite. The one line names
    `source`, what `needs` them (e.g. "its encoder (2000 genes)") and `kind` ("the bundle")."""
    have = traverse_util.flatten_dict(params, sep="/")
    for key, want in traverse_util.flatten_dict(wanted, sep="/").items():
        value = have.get(key)
        if value is None or value.shape != want.shape or value.dtype != want.dtype:
            found = "missing" if value is None else f"{value.dtype}{list(value.shape)}"
            raise SscellError(f"{source}: parameter {key} is {found}, {needs} needs {want.dtype}{list(want.shape)}; "
                              f"{kind} is inconsistent")
        if not np.isfinite(np.asarray(value)).all():
            raise SscellError(f"{source}: parameter {key} holds NaN or infinite values; {kind} is damaged")


def is_bundle(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def check_outside(bundle: str | os.PathLike, folder: str | os.PathLike, option: str) -> None:
    """Refuse `folder` (where a command writes, named by `option`) when it is the bundle at `bundle`
    or inside it: a bundle is never written into."""
    inside, target = Path(bundle).resolve(), Path(folder).resolve()
    if target == inside or inside in target.parents:
        raise SscellError(f"{option}={folder} is inside the bundle {bundle}, which is never written into; "
                          "choose a folder outside it")


def model_card(meta: dict, config: ml_collections.ConfigDict) -> str:
    """The bundle's README.md: what the model does, what it learnt from, how to use it."""
    training, classes = meta["training"], meta.get("classes")
    task = (f"cell-type classifier over {len(classes)} classes (loss `supervised`)" if classes else
            f"self-supervised encoder (loss `{meta['loss']}`)")
    init = f", fine-tuned from the encoder of `{config.train.init_from}`" if config.train.get("init_from") else ""
    lines = [f"# sscell model: {task}", "",
             f"Exported from the run `{meta['source']}`, {meta['checkpoint']} checkpoint (step {meta['step']}).", "",
             f"- Task: {task}{init}; embedding of {config.model.latent} dims from an MLP encoder "
             f"(hidden {list(config.model.hidden)}, {config.model.activation}, compute dtype {config.model.dtype}).",
             f"- Training data: store `{training['store']}` converted from "
             f"{', '.join(training['inputs']) or 'unknown inputs'}: "
             f"{training['cells']:,} cells ({training['train_cells']:,} trained on), {training['genes']:,} genes, "
             f"datasets {', '.join(training['datasets']) or '-'}.",
             f"- Training: {meta['step']:,} of {config.train.steps:,} steps of {config.train.batch_size:,} cells, "
             f"{config.train.optimizer} lr {config.train.lr:g}, seed {config.seed}."]
    if meta.get("results"):
        scores = ", ".join(f"{k} {v:.3f}" for k, v in meta["results"].items() if k != "method")
        lines.append(f"- Results (the run's results.csv, {meta['results']['method']}): {scores}.")
    if classes:
        lines.append(f"- Classes (code order): {'; '.join(classes)}.")
    lines += ["", "## Use", "", "```python", "import sscell", "", 'model = sscell.load("BUNDLE")',
              "embedding = model.embed(adata)  # also sets adata.obsm['X_sscell']"]
    if classes:
        lines.append("labels = model.predict(adata)  # obs['sscell_cell_type'], obs['sscell_confidence']")
    command = "predict" if classes else "embed"
    lines += ["```", "", f"or `python -m sscell.{command} --workdir=BUNDLE --input=data.h5ad "
              "--output=out.h5ad`. Genes are matched by id or by a text column of genes.csv (e.g. symbols); "
              "genes an input lacks are treated as unmeasured.", "",
              "## Files", "",
              f"`{PARAMS_FILE}` (parameters, '/'-joined names), `{GENES_FILE}` (model input genes, in order), "
              f"`{CONFIG_FILE}` (the run's config), `{META_FILE}` (this card's facts, class names)."]
    return "\n".join(lines) + "\n"


def write_bundle(path: str | os.PathLike, *, params: dict, genes: pd.DataFrame, config: ml_collections.ConfigDict,
                 meta: dict) -> Path:
    """Write a bundle at `path` (replacing a bundle there; refusing anything else)."""
    path = Path(path)
    if path.exists() and not is_bundle(path):
        raise SscellError(f"{path} exists and is not an sscell bundle; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # e.g. export("bundles/mine") with no bundles/ yet
    except OSError as error:
        raise SscellError(f"cannot create {path.parent} ({error.strerror}); choose another path") from None
    with atomic_folder(path) as tmp:
        safetensors.numpy.save_file(flatten(params), tmp / PARAMS_FILE, metadata={"format": FORMAT})
        genes.to_csv(tmp / GENES_FILE, index_label=genes.index.name or "gene_id")
        save_config(config, tmp)
        checksums = {name: _sha256(tmp / name) for name in CHECKED}
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta, "sha256": checksums},
                                                indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(meta, config))
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_meta(path: Path) -> dict:
    """bundle.json, checked: this format and version, the keys a reader needs, valid checksums."""
    try:
        meta = json.loads((path / META_FILE).read_bytes().decode())
    except (ValueError, RecursionError) as error:  # JSON and Unicode errors; nesting too deep
        raise SscellError(f"{path / META_FILE} is not valid JSON ({type(error).__name__}); export it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
        raise SscellError(f"{path}: bundle format {found[0]} version {found[1]}, this sscell reads {FORMAT} version "
                          f"{VERSION}; export it again with this sscell")
    wrong = [key for key, kind in {**META_KEYS, "sha256": dict}.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        raise SscellError(f"{path / META_FILE} lacks or garbles {', '.join(wrong)}; export it again")
    for name in CHECKED:
        if meta["sha256"].get(name) != _sha256(path / name):
            raise SscellError(f"{path / name} is not the file the bundle was exported with (its sha256 differs "
                              f"from {META_FILE}'s); export it again")
    return meta


def _checked(path: Path) -> dict:
    """The meta of the bundle at `path` once its files are its own, present and those it was exported with."""
    files = (META_FILE, PARAMS_FILE, GENES_FILE, CONFIG_FILE)
    linked = [name for name in files if (path / name).is_symlink()]
    if linked:
        raise SscellError(f"{path}: {', '.join(linked)} is a symbolic link; a bundle's files must be its own")
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise SscellError(f"{path} is not a complete sscell bundle (no {', '.join(missing)}); export it again")
    return _read_meta(path)


def read_bundle(path: str | os.PathLike) -> tuple[dict, pd.DataFrame, ml_collections.ConfigDict, dict]:
    """(params, gene table, config, meta) of the bundle at `path`, checked (module docstring)."""
    path = Path(path)
    meta = _checked(path)
    try:
        params = traverse_util.unflatten_dict(safetensors.numpy.load_file(path / PARAMS_FILE), sep="/")
    except (safetensors.SafetensorError, ValueError, OSError) as error:
        raise SscellError(f"{path / PARAMS_FILE} is not a readable safetensors file ({error}); export it again") from None
    return params, _read_genes(path), load_config(path), meta


def read_bundle_genes(path: str | os.PathLike) -> pd.DataFrame:
    """The gene table of the bundle at `path` (model input order), checked as `read_bundle` checks it;
    no parameters are loaded."""
    path = Path(path)
    _checked(path)
    return _read_genes(path)


def _read_genes(path: Path) -> pd.DataFrame:
    try:
        with open(path / GENES_FILE) as f:
            index_name = f.readline().split(",", 1)[0].strip()
        genes = pd.read_csv(path / GENES_FILE, index_col=0, dtype={index_name: str}, keep_default_na=False,
                            na_values=[""])
    except (ValueError, pd.errors.ParserError) as error:
        raise SscellError(f"{path / GENES_FILE} is not a readable gene table ({error}); export it again") from None
    return genes
