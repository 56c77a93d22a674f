"""The study's Lightning checkpoints imported into sscell, and sscell models exported back.

The study's modules are rebuilt here in PyTorch with its own layer layout (theislab/ssl_in_scg:
`MLP` from self_supervision/models/base/base.py, the modules' attribute names from
self_supervision/models/lightning_modules/cellnet_autoencoder.py), saved as Lightning saves them,
imported, and compared output for output on an AnnData unlike the model's gene list.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch", reason="the study's modules are built in PyTorch (pip install torch)")
nn = torch.nn

import sscell  # noqa: E402
from sscell.errors import SscellError  # noqa: E402
from sscell.models.mlp import Autoencoder  # noqa: E402

N_GENES, UNITS, N_TYPES, N_CELLS = 300, [48, 32, 16], 7, 80


class MLP(nn.Sequential):
    """The study's MLP, as in self_supervision/models/base/base.py:155-205."""

    def __init__(self, in_channels, hidden_channels, norm_layer=None, activation_layer=nn.ReLU, inplace=True,
                 bias=True, dropout=0.0, final_activation=None):
        params = {} if inplace is None else {"inplace": inplace}
        layers, in_dim = [], in_channels
        for hidden_dim in hidden_channels[:-1]:
            layers.append(nn.Linear(in_dim, hidden_dim, bias=bias))
            if norm_layer is not None:
                layers.append(norm_layer(hidden_dim, eps=0.001))
            layers.append(activation_layer(**params))
            layers.append(nn.Dropout(dropout, **params))
            in_dim = hidden_dim
        layers.append(nn.Linear(in_dim, hidden_channels[-1], bias=bias))
        if final_activation is not None:
            layers.append(final_activation())
        super().__init__(*layers)


class MLPAutoEncoder(nn.Module):
    """cellnet_autoencoder.py:557-629 (its constructor's arguments, its modules)."""

    def __init__(self, gene_dim, units_encoder, units_decoder, train_set_size, val_set_size, batch_size,
                 supervised_subset=None, donor_subset=None, reconstruction_loss="mse", learning_rate=0.005,
                 weight_decay=0.1, dropout=0.1, optimizer=torch.optim.AdamW, lr_scheduler=None,
                 lr_scheduler_kwargs=None, output_activation=nn.Sigmoid, activation=nn.SELU, masking_rate=None,
                 masking_strategy=None, encoded_gene_program=None, norm_layer=None):
        super().__init__()
        self.encoder = MLP(gene_dim, units_encoder, norm_layer=norm_layer, activation_layer=activation,
                           inplace=False, dropout=dropout)
        self.decoder = nn.Sequential(MLP(units_encoder[-1], units_decoder + [gene_dim], activation_layer=activation,
                                         inplace=False, dropout=dropout), output_activation())

    def forward(self, x):
        z = self.encoder(x)
        return z, self.decoder(z)


class MLPNegBin(nn.Module):
    """cellnet_autoencoder.py:866-966."""

    def __init__(self, gene_dim, units_encoder, units_decoder, dropout=0.1, activation=nn.SELU):
        super().__init__()
        self.encoder = MLP(gene_dim, units_encoder, activation_layer=activation, inplace=False, dropout=dropout)
        self.decoder = nn.Sequential(MLP(units_encoder[-1], units_decoder + [2 * gene_dim], activation_layer=activation,
                                         final_activation=nn.Softplus, inplace=False, dropout=dropout))
        self.px_r = nn.Parameter(torch.randn(gene_dim))

    def forward(self, x):
        return self.encoder(x), None


class MLPBYOL(nn.Module):
    """cellnet_autoencoder.py:1589-1648: inner_model, also held by byol (its net and online encoder)."""

    def __init__(self, gene_dim, units_encoder, dropout=0.1, activation=nn.SELU):
        super().__init__()
        self.inner_model = MLP(gene_dim, units_encoder, activation_layer=activation, inplace=False, dropout=dropout)
        self.byol = nn.Module()
        self.byol.net = self.inner_model
        self.byol.online_encoder = nn.Module()
        self.byol.online_encoder.net = self.inner_model
        self.byol.online_encoder.projector = nn.Sequential(nn.Linear(units_encoder[-1], 32), nn.BatchNorm1d(32),
                                                           nn.ReLU(), nn.Linear(32, 8))
        self.byol.online_predictor = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x):
        return self.inner_model(x), None


class MLPBarlowTwins(nn.Module):
    """cellnet_autoencoder.py:1705-1796 with BarlowTwins (bt.py:57-77): inner_model = barlow_twins.backbone."""

    def __init__(self, gene_dim, units_encoder, dropout=0.0, activation=nn.SELU):
        super().__init__()
        self.inner_model = MLP(gene_dim, units_encoder, activation_layer=activation, inplace=False, dropout=dropout)
        self.barlow_twins = nn.Module()
        self.barlow_twins.backbone = self.inner_model
        self.barlow_twins.projector = nn.Sequential(nn.Linear(units_encoder[-1], 32, bias=False), nn.BatchNorm1d(32),
                                                    nn.ReLU(), nn.Linear(32, 32, bias=False))
        self.barlow_twins.bn = nn.BatchNorm1d(32, affine=False)

    def forward(self, x):
        return self.inner_model(x), None


class MLPClassifier(nn.Module):
    """cellnet_autoencoder.py:1415-1476 (BaseClassifier's buffers at 355-356); ReLU: its MLP gets no activation."""

    def __init__(self, gene_dim, type_dim, class_weights, child_matrix, units, train_set_size, val_set_size,
                 batch_size, supervised_subset=None, dropout=0.0, learning_rate=0.005, weight_decay=0.1,
                 optimizer=torch.optim.AdamW, lr_scheduler=None, lr_scheduler_kwargs=None):
        super().__init__()
        self.register_buffer("class_weights", torch.tensor(np.asarray(class_weights).astype("f4")))
        self.register_buffer("child_lookup", torch.tensor(np.asarray(child_matrix).astype("i8")))
        self.classifier = MLP(gene_dim, units + [type_dim], dropout=dropout, inplace=False)

    def forward(self, x):
        embedding = nn.Sequential(*list(self.classifier)[:-3])(x)  # sscell's: the last hidden Linear's output
        return embedding, self.classifier(x)


def randomise(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module.eval()


def lightning_save(module: nn.Module, path: Path, hparams: dict | None) -> Path:
    """Save as Lightning's checkpoint connector does: state_dict, hyper-parameters (classes, arrays),
    loops, callbacks, optimizer and scheduler states."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module.train()
    sum(o.sum() for o in module(torch.rand(4, N_GENES)) if o is not None).backward()
    optimizer.step()
    module.eval()
    checkpoint = {
        "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "2.0.9", "state_dict": module.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0}": {
            "monitor": "val_loss", "best_model_score": torch.tensor(0.25), "best_model_path": "/x/best.ckpt",
            "best_k_models": {"/x/best.ckpt": torch.tensor(0.25)}, "dirpath": "/x"}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [{"step_size": 2, "gamma": 0.9, "base_lrs": [1e-3], "last_epoch": 3}],
    }
    if hparams is not None:
        checkpoint["hparams_name"] = "kwargs"
        checkpoint["hyper_parameters"] = hparams
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The gene table (var.parquet), an AnnData with genes shuffled, 5% missing and 50 extra, class names."""
    root = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(0)
    ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    symbols = [f"GENE{i}" for i in range(N_GENES)]
    pd.DataFrame({"feature_id": ids, "feature_name": symbols}).to_parquet(root / "var.parquet")
    (root / "genes.txt").write_text("\n".join(ids) + "\n")
    kept = rng.permutation(N_GENES)[: int(N_GENES * 0.95)]
    names = np.concatenate([np.asarray(symbols)[kept], [f"EXTRA{i}" for i in range(50)]])
    order = rng.permutation(len(names))
    rates = rng.gamma(0.3, 3.0, size=(N_CELLS, len(names))) * rng.uniform(0.3, 3.0, size=(N_CELLS, 1))
    counts = rng.poisson(rates).astype(np.float32)[:, order]
    adata = anndata.AnnData(counts, var=pd.DataFrame(index=names[order]))
    classes = [f"type {i}" for i in range(N_TYPES)]
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return {"root": root, "adata": adata, "symbols": symbols, "classes": classes}


def study_input(files: dict) -> torch.Tensor:
    """The study's model input of the AnnData: its genes in model order (missing ones 0, extra ones
    dropped), each cell scaled to 10,000 counts over those genes, log1p (scTab's sf_log1p_norm)."""
    adata = files["adata"]
    position = {name: i for i, name in enumerate(adata.var_names)}
    x = np.zeros((adata.n_obs, N_GENES), np.float32)
    for j, symbol in enumerate(files["symbols"]):
        if symbol in position:
            x[:, j] = adata.X[:, position[symbol]]
    counts = x.sum(1, keepdims=True)
    counts += counts == 0
    return torch.log1p(torch.from_numpy(x * (10000.0 / counts)))


def build(kind: str) -> tuple[nn.Module, dict | None]:
    """A study module of `kind` with random weights and the hyper-parameters Lightning would save for it."""
    units_decoder = list(reversed(UNITS[:-1]))
    if kind == "autoencoder":
        hparams = {"gene_dim": N_GENES, "units_encoder": UNITS, "units_decoder": units_decoder,
                   "train_set_size": 1000, "val_set_size": 100, "batch_size": 64, "dropout": 0.1,
                   "optimizer": torch.optim.AdamW, "lr_scheduler": torch.optim.lr_scheduler.StepLR,
                   "lr_scheduler_kwargs": {"step_size": 2, "gamma": 0.9}, "output_activation": nn.Sigmoid,
                   "activation": nn.SELU, "masking_rate": 0.5, "masking_strategy": "random"}
        return MLPAutoEncoder(**hparams), hparams
    if kind == "negbin":
        return MLPNegBin(N_GENES, UNITS, units_decoder), None
    if kind == "byol":
        return MLPBYOL(N_GENES, UNITS), {"gene_dim": N_GENES, "units_encoder": UNITS, "activation": nn.SELU}
    if kind == "barlow_twins":
        return MLPBarlowTwins(N_GENES, UNITS), None
    hparams = {"gene_dim": N_GENES, "type_dim": N_TYPES, "class_weights": np.linspace(0.5, 2, N_TYPES),
               "child_matrix": np.eye(N_TYPES), "units": UNITS, "train_set_size": 1000, "val_set_size": 100,
               "batch_size": 64, "dropout": 0.1, "optimizer": torch.optim.AdamW}
    return MLPClassifier(**hparams), hparams


@pytest.mark.parametrize("kind,loss", [("autoencoder", "masked"), ("negbin", "masked"), ("byol", "byol"),
                                       ("barlow_twins", "barlow_twins"), ("classifier", "supervised")])
def test_imported_models_compute_what_the_study_computes(files, tmp_path, kind, loss):
    module, hparams = build(kind)
    randomise(module, seed=len(kind))
    checkpoint = lightning_save(module, tmp_path / f"{kind}.ckpt", hparams)
    model = sscell.from_study(checkpoint, files["root"] / "var.parquet",
                              classes=files["root"] / "classes.txt" if kind == "classifier" else None)
    assert model.config.loss.name == loss and model.step == 1234
    x = study_input(files)
    with torch.no_grad():
        embedding, output = module(x)
    adata = files["adata"].copy()
    np.testing.assert_allclose(model.embed(adata), embedding.numpy(), atol=1e-4, rtol=0)
    assert adata.uns["sscell"]["genes"].startswith("285 of the input's 335 genes matched by var['feature_name']; "
                                                   "285 of the run's 300 genes measured (95%)")
    if kind == "classifier":
        predicted = model.predict(adata)
        softmax = torch.softmax(output, -1).numpy()
        assert predicted["sscell_cell_type"].tolist() == [files["classes"][i] for i in softmax.argmax(1)]
        np.testing.assert_allclose(predicted["sscell_confidence"], softmax.max(1), atol=1e-5)
    if kind == "autoencoder":  # the decoder too, Sigmoid and all
        ae = Autoencoder(n_genes=N_GENES, hidden=tuple(UNITS[:-1]), latent=UNITS[-1], dropout=0.1,
                         output_activation=model.config.model.output_activation)
        decoded, _ = ae.apply({"params": model.params}, x.numpy())
        np.testing.assert_allclose(decoded, output.numpy(), atol=1e-4, rtol=0)
    if kind == "negbin":
        assert model.about["study"]["not_imported"] == ["decoder", "px_r"]


@pytest.mark.parametrize("kind", ["autoencoder", "classifier"])
def test_export_loads_into_the_study_module_strictly(files, tmp_path, kind):
    module, hparams = build(kind)
    randomise(module, seed=7)
    model = sscell.from_study(lightning_save(module, tmp_path / "in.ckpt", hparams), files["root"] / "genes.txt",
                              classes=files["root"] / "classes.txt")
    path = model.export_study(tmp_path / "out" / "exported.ckpt")
    exported = torch.load(path, weights_only=True)  # plain values and tensors only
    plain = exported["hyper_parameters"]
    if kind == "autoencoder":
        assert exported["sscell"]["classes"] == {"activation": "torch.nn.SELU", "output_activation": "torch.nn.Sigmoid"}
        fresh = MLPAutoEncoder(**plain, activation=nn.SELU, output_activation=nn.Sigmoid)
    else:
        fresh = MLPClassifier(**plain)
    fresh.load_state_dict(exported["state_dict"], strict=True)
    x = study_input(files)
    with torch.no_grad():
        for a, b in zip(fresh.eval()(x), module(x)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=0)


def test_an_sscell_encoder_only_model_is_refused_by_export(files, tmp_path):
    module, _ = build("byol")
    model = sscell.from_study(lightning_save(randomise(module, 1), tmp_path / "b.ckpt", None), files["root"] / "genes.txt")
    with pytest.raises(SscellError, match="MLPAutoEncoder .* or MLPClassifier; this model \\(loss byol"):
        model.export_study(tmp_path / "b_out.ckpt")


def test_command_writes_a_bundle_that_embeds_and_predicts(files, tmp_path):
    module, hparams = build("classifier")
    randomise(module, seed=3)
    checkpoint = lightning_save(module, tmp_path / "clf.ckpt", hparams)
    pd.DataFrame({"label": files["classes"]}).to_parquet(tmp_path / "cell_type.parquet")  # scTab's, found beside it
    bundle = tmp_path / "bundle"
    run = subprocess.run([sys.executable, "-m", "sscell.from_study", f"--checkpoint={checkpoint}",
                          f"--genes={files['root'] / 'var.parquet'}", f"--output={bundle}"],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr
    assert "MLPClassifier as an sscell classifier over 7 classes, 300 genes" in run.stdout
    loaded, adata = sscell.load(bundle), files["adata"].copy()
    with torch.no_grad():
        logits = module.classifier(study_input(files)).numpy()
    assert loaded.predict(adata)["sscell_cell_type"].tolist() == [files["classes"][i] for i in logits.argmax(1)]
    from sscell.predict import predict
    summary = predict(str(bundle), _write(files["adata"], tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"))
    assert anndata.read_h5ad(tmp_path / "out.h5ad").obs["sscell_cell_type"].tolist() == \
        adata.obs["sscell_cell_type"].tolist() and summary["classes"] == N_TYPES


def _write(adata: anndata.AnnData, path: Path) -> str:
    adata.write_h5ad(path)
    return str(path)


def test_a_classifier_without_class_names_embeds_and_refuses_to_predict(files, tmp_path):
    module, hparams = build("classifier")
    model = sscell.from_study(lightning_save(randomise(module, 5), tmp_path / "c.ckpt", hparams),
                              files["root"] / "var.parquet")
    adata = files["adata"].copy()
    assert model.embed(adata).shape == (N_CELLS, UNITS[-1])
    with pytest.raises(SscellError, match="has a classifier head but no class names"):
        model.predict(adata)


class _Hostile:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("call", ["system", "eval"])
def test_a_hostile_checkpoint_is_refused_and_nothing_runs(files, tmp_path, call):
    marker = tmp_path / "ran"
    command = f"touch {marker}"
    payload = _Hostile(os.system, command) if call == "system" else \
        _Hostile(eval, f"open({str(marker)!r}, 'w').close()")
    module, _ = build("byol")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"activation": payload}}, tmp_path / "evil.ckpt")
    with pytest.raises(SscellError) as refused:
        sscell.from_study(tmp_path / "evil.ckpt", files["root"] / "genes.txt")
    message = str(refused.value)
    assert "\n" not in message and ("posix.system" in message or "builtins.eval" in message) and "refused" in message
    assert not marker.exists()


def test_what_sscell_cannot_express_is_refused_naming_the_key(files, tmp_path):
    module = MLPAutoEncoder(N_GENES, UNITS, list(reversed(UNITS[:-1])), 0, 0, 0, norm_layer=nn.BatchNorm1d)
    torch.save({"state_dict": module.state_dict()}, tmp_path / "norm.ckpt")
    with pytest.raises(SscellError, match=r"encoder\.1\.weight is a layer sscell's MLP cannot express"):
        sscell.from_study(tmp_path / "norm.ckpt", files["root"] / "genes.txt")
    module, hparams = build("autoencoder")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {**hparams, "activation": nn.Tanh}},
               tmp_path / "tanh.ckpt")
    with pytest.raises(SscellError, match=r"hyper_parameters\['activation'\] \(torch\.nn\.modules\.activation\.Tanh\)"):
        sscell.from_study(tmp_path / "tanh.ckpt", files["root"] / "genes.txt")
    (tmp_path / "short.txt").write_text("\n".join(f"G{i}" for i in range(N_GENES - 1)))
    torch.save(build("autoencoder")[0].state_dict(), tmp_path / "plain.ckpt")  # a bare state dict
    with pytest.raises(SscellError, match=f"lists {N_GENES - 1} genes, the checkpoint's first layer reads {N_GENES}"):
        sscell.from_study(tmp_path / "plain.ckpt", tmp_path / "short.txt")
