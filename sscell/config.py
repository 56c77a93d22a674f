"""A run's config: its defaults, saved resolved into its workdir and loaded back (the check before a
run resumes in a workdir: `sscell.training.resume`)."""
from __future__ import annotations

import json
import os

import ml_collections

from sscell.atomic import atomic_file
from sscell.errors import SscellError

CONFIG_FILE = "config.json"
MODULE_FIELDS = ("eval.module", "loss.module")  # config fields naming a module to import: code of your own


def save_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Write the resolved config to `workdir/config.json` (atomically)."""
    with atomic_file(os.path.join(workdir, CONFIG_FILE)) as tmp:
        tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run saved into `workdir`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise SscellError(f"{workdir} holds no sscell run (no {CONFIG_FILE}); train one with "
                          "python -m sscell.main --config=... --workdir=...")
    try:
        with open(path, "rb") as f:
            return ml_collections.ConfigDict(json.loads(f.read().decode()))
    except (ValueError, TypeError, RecursionError) as error:  # JSON, Unicode, not an object, nested too deep
        raise SscellError(f"{path} is not a readable sscell config ({type(error).__name__}); it is damaged") from None


def trust_modules(config: ml_collections.ConfigDict, source: str | os.PathLike, **named: str | None) -> None:
    """Set the module fields (MODULE_FIELDS) of a config read from someone's run at `source` to the
    modules the user names: `named` maps a field's keyword (eval_module for eval.module) to a module
    ("": none; None: not named). A field naming a module the user did not name is refused, so
    reading a run imports no code it names."""
    for field in MODULE_FIELDS:
        section, key = field.split(".")
        keyword = f"{section}_{key}"
        if named.get(keyword) is not None:
            config[section][key] = named[keyword]
        elif config[section].get(key):
            module = config[section][key]
            raise SscellError(f"{source} names {field} '{module}', code sscell imports only when you name it: "
                              f"pass --{keyword}={module} (Python: {keyword}='{module}') if you trust it, or "
                              f"--{keyword}= ({keyword}='') to import none")


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """{"train.lr": value, ...} of a nested config dict (tuples as lists, as JSON holds them)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def default_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with the study's settings; experiments/*.py start from this."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds the parameters, masks, batch order, splits of converted data and samples
    config.data = ml_collections.ConfigDict(dict(
        store="",               # a store made by `python -m sscell.data.convert`, or
        h5ad="",                # comma-separated .h5ad paths/globs, converted into WORKDIR/store, or
        vocabulary="",          # with h5ad: gene-id list file (one per line); empty: the inputs' genes
        split="donor",          # with h5ad: split cells by donor unit (needs >= 3) or "cells" (seeded, per cell)
        split_column="",        # with h5ad: obs column of train/val/test overriding the split
        # a generated atlas (sscell.data.synthetic.AtlasSpec fields), used when n_cells > 0
        synthetic=ml_collections.ConfigDict(dict(n_cells=0, n_genes=2000, n_datasets=4, donors_per_dataset=4,
                                                 n_proteins=0,  # > 0: a CITE-seq-like protein panel too
                                                 n_peaks=0)),   # > 0: multiome-like ATAC peaks instead
        modality="",            # an obsm key ("protein_counts", "atac_counts") the loader adds to batches
        train_datasets=(),      # dataset_id values to train on (empty: all); other cells are never read
        train_fraction=1.0,     # share of those train cells used, a seed-drawn random sample (nested)
        block_cells=64,         # contiguous cells per read; blocks are shuffled per epoch
        prefetch=4,             # batches read ahead on background threads
        # the train cells' nonzeros held on the accelerators (sscell.training.device_resident): False | True | "auto"
        device_resident=ml_collections.FieldReference(False, field_type=object),
        device_memory_share=0.5,  # the most of a device's memory they may take (True refuses beyond, "auto" streams)
    ))
    config.model = ml_collections.ConfigDict(dict(
        # encoder widths (the decoder mirrors them), embedding size, selu | relu | gelu | silu, dropout rate
        hidden=(512, 512, 256, 256), latent=64, activation="selu", dropout=0.1,
        norm="none",            # or "layer" (LayerNorm after each hidden layer)
        dtype="auto",           # compute dtype: float32 | bfloat16 | auto (the faster of the two, measured once on a
                                # CPU with bfloat16 instructions; bfloat16 on TPUs, Ampere+ GPUs; settled when a run
                                # starts, in its config.json); parameters stay float32
        sparse_nonzeros=0))     # > 0: sparse first layer for up to this many nonzeros per cell
    # The pretext task (sscell/losses); each task reads only its own fields.
    config.loss = ml_collections.ConfigDict(dict(
        name="masked",          # masked | gp_masked | gp_to_tf | gp_to_gp | byol | barlow_twins | supervised |
                                # protein_regression | atac_regression (with data.modality)
        module="",              # a module to import first that registers `name` (a task of your own)
        mask_rate=0.5,          # masked: share of genes hidden; gp_masked: share of programmes hidden
        likelihood="mse",       # reconstruction head: "mse" on log1p values or "nb" on counts
        gmt="",                 # gene programmes (.gmt); empty: the one written beside a generated store
        per_cell_masks=True,    # gp_masked: a mask per cell (False: one per batch, as the authors did)
        rescale_inputs=True,    # masked, gp_masked: scale the genes left visible by 1 / (1 - share hidden), as
                                # inverted dropout (the authors' choice); False: leave them as they are
        class_weights="balanced",  # supervised: "balanced" or "none"
        projector=(4096, 256), predictor=(4096, 256),  # byol / barlow_twins heads (batch norm between)
        ema_decay=0.99, ema_schedule="constant", ema_steps=0,  # byol target; "cosine": decay -> 1 over ema_steps
        lambd=0.0051,           # barlow_twins off-diagonal weight
        # contrastive views: each augmentation is applied to a cell with its probability
        aug_nb_prob=0.5, aug_nb_theta=10.0,
        aug_dropout_prob=0.5, aug_dropout_rate=0.2,
        aug_gauss_prob=0.5, aug_gauss_std=0.2))
    config.train = ml_collections.ConfigDict(dict(
        # training steps, cells per step (all devices), adamw | lars, peak learning rate, weight decay, global-norm
        # gradient clipping
        steps=10_000, batch_size=8192, optimizer="adamw", lr=1e-3, weight_decay=0.01, grad_clip=1.0,
        lr_decay=0.9, lr_decay_epochs=2.0,  # step_decay: lr x lr_decay every lr_decay_epochs epochs, or
        lr_decay_steps=0,       # > 0: every this many steps instead (the same schedule on any dataset size)
        # steps between metric records, validations (of val_batches batches) and checkpoints; checkpoints kept
        log_every=50, val_every=500, val_batches=8, checkpoint_every=500, keep_checkpoints=3,
        schedule="step_decay",  # or "warmup_cosine" (warmup_steps, then cosine decay to 0 at `steps`)
        warmup_steps=0,         # warmup_cosine: steps of linear warm-up from 0 to lr
        lr_reference_batch=0,   # > 0: lr is per this many cells, scaled by batch_size / it (Barlow Twins: 256)
        lars_exclude_bias_and_norm=True,  # lars: biases and norm parameters get no weight decay or trust ratio
        grad_accum=1,           # micro-batches of batch_size per optimiser update
        skip_nonfinite=0,       # N > 0: skip non-finite steps (state unchanged), stop at N+1 in a row
        profile_steps=(),       # (start, stop): jax.profiler trace of those steps into WORKDIR/profile
        init_from="",           # a run's workdir or a bundle: a fresh run starts from its encoder (fine-tuning)
        init_checkpoint="best",  # which checkpoint of init_from: "best" (lowest validation loss, the study's) or
                                 # "latest"; "best" refuses a run none of whose checkpoints was validated yet
    ))
    config.mesh = ml_collections.ConfigDict(dict(
        data=-1, model=1,       # device mesh axes; -1: all devices left over
        rules=(),               # (regex over state paths, "fsdp" | "replicate" | spec tuple); see training/mesh.py
    ))
    config.eval = ml_collections.ConfigDict(dict(
        knn_k=5, pca_components=64, batch_size=1024,  # kNN neighbours, PCA baselines' dims, cells per embedding batch
        max_cells=0,            # > 0: at most this many val and test cells (a random sample) for every task
        checkpoint="best",      # "best" (lowest validation loss, the study's; refused while no checkpoint
                                # has one: train past the next validation or choose it) or "latest"
        # knn | linear_probe | reconstruction | integration | umap, and the result tables of the
        # finetune / crossmodal commands (sscell/evaluation/tasks/), or tasks of `module`
        tasks=("knn", "linear_probe", "reconstruction", "integration", "umap", "finetune", "crossmodal",
               "crossmodal_atac"),
        module="",              # a module registering evaluation tasks of your own (docs/extending.md)
        knn_reference="val",    # kNN reference cells: val (the study's) | train | train+val; queries: test cells
        knn_reference_cells=20_000,  # training cells in a train / train+val reference (0: all)
        knn_method="auto",      # exact (blocked, JAX) | approximate (faiss IVF, re-ranked) | auto (by size and device)
        protocol="sscell",      # sscell | study: the study's own kNN (k+1 neighbours, nearest dropped; baselines
                                # by the 2nd-nearest alone), PCA fitted per split and, for a bundle imported from
                                # the study's checkpoints, the study's embedding (ReLU stack; docs/metrics.md)
        # baselines scored next to the model (sscell/evaluation/baselines/): pca (log1p counts; the
        # integration scores' unintegrated reference) | pca_hvg | hvg (the HVGs' log1p values) | scvi
        # (needs pip install -e '.[baselines]'; skipped, and said so, without it)
        baselines=("pca", "pca_hvg", "hvg", "scvi"),
        hvg_genes=2000,         # the highly variable genes of the pca_hvg, hvg and scvi baselines
        baseline_cells=20_000,  # validation cells the baselines' genes and PCAs are chosen and fitted on
        scvi_cells=20_000,      # training cells scVI is trained on (its raw counts of the HVGs)
        scvi_epochs=20,         # scVI's training epochs (scvi-tools' default: 400 below 20k cells, fewer above)
        probe_cells=20_000,     # training cells the linear probe is fitted on
        mask_rate=0.5,          # share of measured genes hidden for the masked reconstruction
        integration_cells=3_000,  # held-out (val + test) cells scored with scib-metrics
        integration_kbet=False,  # also kBET (slow: compiles per cell type)
        umap_cells=5_000))      # held-out (val + test) cells in the UMAP figures
    return config
