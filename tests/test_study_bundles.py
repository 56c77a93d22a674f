"""Bundles (an imported study checkpoint here) as pretrained models: fine-tuning from one
(`train.init_from=BUNDLE`, `python -m sscell.evaluation.finetune --workdir=BUNDLE --outdir=DIR`),
a store converted onto a bundle's genes (`convert --vocabulary=BUNDLE`), evaluation of a bundle on
a store (`python -m sscell.evaluation --workdir=BUNDLE --store=STORE --outdir=DIR`), and the study's
zero-shot embedding under `eval.protocol="study"`, checked against the study's classifier stack
rebuilt in PyTorch with the encoder loaded as the study loads it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import anndata
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the study's modules are built in PyTorch (pip install torch)")

from test_finetune import assert_trees_equal, classifier_config  # noqa: E402
from test_from_study import MLP, MLPAutoEncoder, randomise  # noqa: E402

import sscell  # noqa: E402
from sscell.data.convert import convert  # noqa: E402
from sscell.data.inputs import read_vocabulary  # noqa: E402
from sscell.data.store import open_store  # noqa: E402
from sscell.errors import SscellError  # noqa: E402
from sscell.evaluation.cells import Evaluator  # noqa: E402
from sscell.evaluation.evaluate import eval_settings, evaluate  # noqa: E402
from sscell.evaluation.finetune import finetune  # noqa: E402
from sscell.evaluation.run import open_bundle  # noqa: E402
from sscell.training.train import train  # noqa: E402

UNITS = [32, 32, 16, 16, 8]  # five Linear layers, as the study's 512-512-256-256-64: its classifier[14] exists


def files_of(folder) -> dict:
    """{name: (size, mtime_ns)} of every file under `folder`: a bundle must come out of every command unchanged."""
    return {os.path.relpath(os.path.join(root, f), folder): (os.stat(os.path.join(root, f)).st_size,
                                                            os.stat(os.path.join(root, f)).st_mtime_ns)
            for root, _, names in os.walk(folder) for f in names}


@pytest.fixture(scope="module")
def study(tiny_store, tmp_path_factory):
    """The study's masked autoencoder (SELU) over the tiny store's genes, imported and exported as a
    bundle whose config names modules (never imported from a bundle); and its PyTorch module."""
    root = tmp_path_factory.mktemp("study_bundle")
    n_genes = tiny_store.n_genes
    hparams = {"gene_dim": n_genes, "units_encoder": UNITS, "units_decoder": list(reversed(UNITS[:-1])),
               "train_set_size": 100, "val_set_size": 10, "batch_size": 8, "dropout": 0.1,
               "activation": torch.nn.SELU, "masking_rate": 0.5, "masking_strategy": "random"}
    module = randomise(MLPAutoEncoder(**hparams), seed=11)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 77},
               root / "masking.ckpt")
    (root / "genes.txt").write_text("\n".join(tiny_store.var.index.astype(str)) + "\n")
    model = sscell.from_study(root / "masking.ckpt", root / "genes.txt")
    model.config.loss.module = model.config.eval.module = "sscell_no_such_module"  # importing it would fail
    bundle = model.export(root / "bundle")
    reversed_genes = dataclasses.replace(model, genes=model.genes.iloc[::-1])
    return {"bundle": bundle, "module": module, "model": model,
            "reversed": reversed_genes.export(root / "reversed_bundle")}


def test_init_from_a_bundle_copies_its_encoder(study, tiny_store, tmp_path):
    config = classifier_config(tiny_store, init_from=study["bundle"])
    config.model.update(hidden=tuple(UNITS[:-1]), latent=UNITS[-1])
    before = files_of(study["bundle"])
    tuned = train(config, str(tmp_path / "tuned"), tiny_store).state  # steps 0: the fresh state
    assert_trees_equal(tuned["params"]["encoder"], study["model"].params["encoder"])
    assert files_of(study["bundle"]) == before
    config.model.latent = 4
    with pytest.raises(SscellError, match=r"dense_4/kernel is \(16, 8\) there, \(16, 4\) here"):
        train(config, str(tmp_path / "narrow"), tiny_store)


def test_a_store_is_converted_onto_a_bundles_genes_and_other_orders_are_refused(study, tiny_h5ad, tiny_store,
                                                                               tmp_path):
    reversed_bundle = study["reversed"]
    config = classifier_config(tiny_store, init_from=reversed_bundle)
    config.model.update(hidden=tuple(UNITS[:-1]), latent=UNITS[-1])
    with pytest.raises(SscellError) as refused:
        train(config, str(tmp_path / "run"), tiny_store)
    message = str(refused.value)
    assert "\n" not in message and f"orders its genes unlike the bundle {reversed_bundle}" in message
    assert f"convert it with --vocabulary={reversed_bundle}" in message
    expected = list(study["model"].genes.index[::-1])
    assert list(read_vocabulary(os.path.join(reversed_bundle, "genes.csv"))) == expected
    convert([tiny_h5ad], tmp_path / "onto_bundle", vocabulary=reversed_bundle)
    store = open_store(tmp_path / "onto_bundle")
    assert list(store.var.index) == expected
    config.data.store = store.path
    assert int(train(config, str(tmp_path / "run"), store).state["step"]) == 0  # accepted now


def test_finetune_from_a_bundle_writes_only_into_the_outdir(study, tiny_store, tmp_path):
    bundle, before = study["bundle"], files_of(study["bundle"])
    base = classifier_config(tiny_store, steps=2)
    with pytest.raises(SscellError, match="is a bundle, which is never written into; .* --outdir=DIR"):
        finetune(bundle, tiny_store.path, [1.0], base=base)
    with pytest.raises(SscellError, match="is inside the bundle"):
        finetune(bundle, tiny_store.path, [1.0], base=base, outdir=os.path.join(bundle, "tuned"))
    rows = finetune(bundle, tiny_store.path, [1.0], base=base, arms=("pretrained",), outdir=str(tmp_path / "out"))
    assert rows[0]["method"] == "fine-tuned from bundle bundle (masked)" and 0 <= rows[0]["finetune_macro_f1"] <= 1
    assert (tmp_path / "out" / "finetune.csv").is_file()
    assert (tmp_path / "out" / "finetune" / "pretrained_1" / "config.json").is_file()
    assert files_of(bundle) == before


def test_a_bundle_is_evaluated_on_a_store_into_the_outdir(study, tiny_store, tmp_path, capsys):
    bundle, before = study["bundle"], files_of(study["bundle"])
    with pytest.raises(SscellError, match="is a bundle.* --store=STORE --outdir=DIR"):
        evaluate(bundle, tasks=["knn"], store=tiny_store.path)
    with pytest.raises(SscellError, match="is inside the bundle"):
        evaluate(bundle, tasks=["knn"], store=tiny_store.path, outdir=bundle)
    out = tmp_path / "eval"
    rows = evaluate(bundle, tasks=["knn", "reconstruction", "finetune"], store=tiny_store.path, outdir=str(out),
                    baselines="pca")
    assert rows[0]["method"] == "bundle bundle (masked, step 77)" and 0 <= rows[0]["knn_macro_f1"] <= 1
    assert math.isnan(rows[0]["fit_seconds"]) and rows[1]["method"].startswith("PCA")
    assert (out / "results.csv").is_file() and any((out / "eval_cache").iterdir())
    assert not (out / "loss_curve.png").exists() and files_of(bundle) == before
    assert ("not run: reconstruction (a bundle is evaluated by its encoder alone); finetune (a bundle holds no "
            "run's tables)") in capsys.readouterr().out
    run = subprocess.run([sys.executable, "-m", "sscell.evaluation", f"--workdir={bundle}"], capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 2 and run.stderr.strip().startswith("error: ") and len(run.stderr.strip().splitlines()) == 1


def study_embedding(module: MLPAutoEncoder, x: torch.Tensor) -> np.ndarray:
    """The study's zero-shot embedding of its pretrained `module`: the encoder loaded into the
    MLPClassifier stack (ReLU MLP, cellnet_autoencoder.py:1471-1476) by update_weights
    (trainer/classifier/train.py:44-109), the output of classifier[14] by a forward hook
    (estimator/cellnet.py:217-252), in eval mode (trainer.predict)."""
    classifier = MLP(x.shape[1], UNITS + [5], dropout=0.1, inplace=False)  # MLPClassifier.classifier; 5 types
    pretrained, final = {f"encoder{k.split('encoder', 1)[1]}": v for k, v in module.state_dict().items()
                         if "encoder" in k}, {}
    for key, value in classifier.state_dict().items():  # update_weights: 'encoder.N' -> 'classifier.N'
        final[key] = pretrained.get(f"encoder.{key}", value)
    classifier.load_state_dict(final)
    captured = []
    hook = classifier[14].register_forward_hook(lambda m, i, output: captured.append(output.detach()))
    with torch.no_grad():
        classifier.eval()(x)
    hook.remove()
    assert isinstance(classifier[14], torch.nn.Dropout) and isinstance(classifier[13], torch.nn.ReLU)
    return captured[0].numpy()


def test_the_study_protocol_embeds_an_imported_model_as_the_study_does(study, tiny_store, tmp_path):
    start, stop = tiny_store.split_range("test")
    counts = anndata.read_zarr(tiny_store.path).X[start:stop]
    counts = np.asarray(counts.todense() if hasattr(counts, "todense") else counts, np.float64)
    library = counts.sum(1, keepdims=True)
    x = torch.from_numpy(np.log1p(counts * (1e4 / np.where(library > 0, library, 1))).astype(np.float32))
    embedded = {}
    for protocol in ("sscell", "study"):
        run = open_bundle(study["bundle"], tiny_store, protocol)
        settings = eval_settings(run.config)
        settings.baselines = ()
        embedded[protocol] = Evaluator(run, tiny_store, settings, "bundle", False).cells("test", 0).embeddings["bundle"]
    expected = study_embedding(study["module"], x)
    np.testing.assert_allclose(embedded["study"], expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        np.testing.assert_allclose(embedded["sscell"], study["module"].encoder(x).numpy(), atol=1e-4, rtol=0)
    assert (embedded["study"] >= 0).all() and np.abs(embedded["study"] - embedded["sscell"]).max() > 0.1
    rows = evaluate(study["bundle"], tasks=["knn"], store=tiny_store.path, outdir=str(tmp_path),
                    baselines="", protocol="study")
    assert rows[0]["method"] == "bundle bundle (masked, the study's embedding, step 77)"
