"""The study's MLP modules as sscell parameters and settings, and sscell's models as the study's state dicts.

The study's MLP (theislab/ssl_in_scg, self_supervision/models/base/base.py:155-205) is a
torch.nn.Sequential of Linear, activation, Dropout for each hidden layer and a last Linear, so its
Linear layers sit at indices 0, 3, 6, ... ; a Linear's weight is (out, in), sscell's kernel (in, out).
Its modules (self_supervision/models/lightning_modules/cellnet_autoencoder.py) hold that MLP as:

    MLPAutoEncoder  encoder.*, decoder.0.* (+ decoder.1, the output activation: Sigmoid by default)
    MLPNegBin       encoder.*, decoder.0.* (2 x genes outputs, Softplus), px_r
    MLPBYOL         inner_model.* (also under byol.*, with its projector, predictor, target)
    MLPBarlowTwins  inner_model.* (also barlow_twins.backbone.*, projector, bn); BarlowTwins.save_model: backbone.*
    MLPClassifier   classifier.* (ReLU between every two Linear layers: its MLP is built without an
                    activation argument), buffers class_weights, child_lookup
"""
from __future__ import annotations

import collections
import dataclasses
import re

import ml_collections
import numpy as np

from sscell.errors import SscellError
from sscell.study.checkpoint import qualname

ACTIVATIONS = {"SELU": "selu", "ReLU": "relu", "SiLU": "silu"}  # torch class -> sscell (GELU: sscell's is tanh-approximated)
TORCH_ACTIVATIONS = {v: k for k, v in ACTIVATIONS.items()}
OUTPUT_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "none"}
MASKING_LOSSES = {"random": "masked", "gene_program": "gp_masked", "single_gene_program": "gp_to_gp",
                  "gp_to_tf": "gp_to_tf"}
MASKING_STRATEGIES = {v: k for k, v in MASKING_LOSSES.items()}  # sscell loss -> the study's masking_strategy
# module -> (prefix of its encoder MLP, constructor default dropout)
MODULES = {"MLPClassifier": ("classifier.", 0.0), "MLPAutoEncoder": ("encoder.", 0.1), "MLPNegBin": ("encoder.", 0.1),
           "MLPBYOL": ("inner_model.", 0.1), "MLPBarlowTwins": ("inner_model.", 0.0), "BarlowTwins": ("backbone.", 0.0)}
LOSSES = {"MLPClassifier": "supervised", "MLPBYOL": "byol", "MLPBarlowTwins": "barlow_twins", "BarlowTwins": "barlow_twins"}
LIGHTNING_VERSION = "2.1.0"


@dataclasses.dataclass
class Imported:
    """A study module in sscell's terms: parameters, config.model / config.loss fields, what was left out."""

    module: str
    params: dict
    model: dict
    loss: dict
    not_imported: list[str]


def linear_layers(state: dict, prefix: str, where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kernel (in, out), bias) of each Linear of the study's MLP under `prefix`; refuses, naming the
    key, anything else under it (a norm layer, a residual block, a Linear without bias)."""
    found = {}
    for key in (k for k in state if k.startswith(prefix)):
        match = re.fullmatch(r"(\d+)\.(weight|bias)", key[len(prefix):])
        if not match or int(match[1]) % 3:
            raise SscellError(f"{where}: {key} is a layer sscell's MLP cannot express (it runs Linear, activation, "
                              "Dropout only); this checkpoint cannot be imported")
        found[(int(match[1]), match[2])] = np.asarray(state[key], np.float32)
    layers = []
    for i in range(0, 3 * len(found), 3):
        if (i, "weight") not in found:
            break
        weight, bias = found[(i, "weight")], found.get((i, "bias"))
        if bias is None or weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise SscellError(f"{where}: {prefix}{i}.weight {weight.shape} has no matching bias; sscell's layers have one")
        if layers and layers[-1][0].shape[1] != weight.shape[1]:
            raise SscellError(f"{where}: {prefix}{i}.weight reads {weight.shape[1]} features, the layer before "
                              f"writes {layers[-1][0].shape[1]}")
        layers.append((weight.T.copy(), bias))
    if 2 * len(layers) != len(found):
        raise SscellError(f"{where}: the Linear layers under {prefix} are not numbered 0, 3, 6, ...; not the study's MLP")
    return layers


def mlp_params(layers: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    return {f"dense_{i}": {"kernel": k, "bias": b} for i, (k, b) in enumerate(layers)}


def detect_module(state: dict, hparams: dict, where: str) -> str:
    """Which of the study's modules wrote `state` (by its keys)."""
    prefixes = {key.split(".")[0] for key in state}
    if "classifier" in prefixes:
        return "MLPClassifier"
    if "encoder" in prefixes:
        return "MLPNegBin" if "px_r" in state or "gene_likelihood" in hparams else "MLPAutoEncoder"
    if "inner_model" in prefixes:
        return "MLPBarlowTwins" if "barlow_twins" in prefixes else "MLPBYOL"
    if "backbone" in prefixes:
        return "BarlowTwins"
    raise SscellError(f"{where}: no encoder of the study's modules in it (its keys start with "
                      f"{', '.join(sorted(prefixes)[:6]) or 'nothing'}); not a checkpoint of theislab/ssl_in_scg")


def activation(hparams: dict, key: str, default: str, names: dict) -> str | None:
    """sscell's name of the class hyper-parameter `key` (a placeholder of e.g. torch.nn.SELU), `default` if absent."""
    value = hparams.get(key)
    name = default if value is None else (qualname(value) or str(value)).rsplit(".", 1)[-1]
    return names.get(name)


def from_state(state: dict, hparams: dict, where: str) -> Imported:
    """The encoder (and the head of a classifier, the decoder of an MSE autoencoder) of a study state dict."""
    module = detect_module(state, hparams, where)
    prefix, dropout = MODULES[module]
    act = "relu" if module == "MLPClassifier" else activation(hparams, "activation", "SELU", ACTIVATIONS)
    if act is None:
        raise SscellError(f"{where}: hyper_parameters['activation'] ({qualname(hparams['activation'])}) has no exact "
                          f"sscell counterpart ({', '.join(ACTIVATIONS)} do); this checkpoint cannot be imported")
    layers = linear_layers(state, prefix, where)
    if len(layers) < 2:
        raise SscellError(f"{where}: {prefix}* holds {len(layers)} Linear layer; sscell's encoder has at least two")
    model = {"activation": act, "dropout": float(hparams.get("dropout", dropout)), "norm": "none", "dtype": "float32"}
    loss = {"name": LOSSES.get(module, "masked")}
    if module == "MLPClassifier":
        encoder, head = layers[:-1], layers[-1]
        params = {"encoder": mlp_params(encoder), "head": {"kernel": head[0], "bias": head[1]}}
        model["head_activation"] = "relu"
    else:
        encoder = layers
        params = {"encoder": mlp_params(encoder)}
    widths = [k.shape[1] for k, _ in encoder]
    model.update(hidden=tuple(widths[:-1]), latent=widths[-1])
    if module in ("MLPAutoEncoder", "MLPNegBin"):
        strategy = hparams.get("masking_strategy")
        loss["name"] = MASKING_LOSSES.get(strategy, "masked")
        if hparams.get("masking_rate"):
            loss["mask_rate"] = float(hparams["masking_rate"])
        loss["likelihood"] = "nb" if module == "MLPNegBin" else "mse"
    kept = {prefix, "head"} | ({"decoder."} if module == "MLPAutoEncoder" else set())
    not_imported = sorted({key.split(".")[0] for key in state if not any(key.startswith(p) for p in kept)})
    if module == "MLPAutoEncoder":
        reason = _add_decoder(params, model, state, hparams, widths, layers[0][0].shape[0], where)
        if reason:
            not_imported.insert(0, f"decoder ({reason})")
            params.pop("decoder", None)
    return Imported(module, params, model, loss, not_imported)


def _add_decoder(params: dict, model: dict, state: dict, hparams: dict, widths: list[int], n_genes: int,
                 where: str) -> str:
    """Add an MSE autoencoder's decoder to `params` when sscell's Autoencoder runs it exactly; else why not."""
    output = activation(hparams, "output_activation", "Sigmoid", OUTPUT_ACTIVATIONS)
    if output is None:
        return f"output activation {qualname(hparams['output_activation'])} has no sscell counterpart"
    layers = linear_layers(state, "decoder.0.", where)
    if [k.shape[1] for k, _ in layers] != [*reversed(widths[:-1]), n_genes]:
        return "its widths do not mirror the encoder's, as sscell's decoder does"
    params["decoder"] = mlp_params(layers)
    model["output_activation"] = output
    return ""


def _torch_layers(params: dict, prefix: str, start: int = 0) -> dict[str, np.ndarray]:
    """The study's `prefix{3i}.weight / .bias` of sscell MLP parameters {dense_i: {kernel, bias}}."""
    state = {}
    for i in range(len(params)):
        layer = params[f"dense_{i}"]
        state[f"{prefix}{3 * (start + i)}.weight"] = np.asarray(layer["kernel"], np.float32).T.copy()
        state[f"{prefix}{3 * (start + i)}.bias"] = np.asarray(layer["bias"], np.float32)
    return state


def to_state(params: dict, config: ml_collections.ConfigDict, where: str) -> dict:
    """The study's Lightning checkpoint (state_dict, plain hyper_parameters) of an sscell model: an
    MSE autoencoder as MLPAutoEncoder, a classifier as MLPClassifier; anything else is refused."""
    m = config.model
    if m.norm != "none":
        raise SscellError(f"{where}: model.norm {m.norm}: the study's modules build their MLP without norm layers")
    act = TORCH_ACTIVATIONS.get(m.activation)
    if act is None:
        raise SscellError(f"{where}: model.activation {m.activation} has no exact counterpart in the study's code")
    units = [*m.hidden, m.latent]
    common = {"gene_dim": int(params["encoder"]["dense_0"]["kernel"].shape[0]), "dropout": float(m.dropout),
              "train_set_size": 0, "val_set_size": 0, "batch_size": int(config.train.batch_size),
              "learning_rate": float(config.train.lr), "weight_decay": float(config.train.weight_decay)}
    if "head" in params:
        if m.activation != "relu" or m.get("head_activation", "none") != "relu":
            raise SscellError(f"{where}: the study's MLPClassifier runs ReLU between all its layers (also before the "
                              f"head); this classifier has model.activation {m.activation}, head activation "
                              f"{m.get('head_activation', 'none')}, so it would compute other logits there")
        n_types = int(params["head"]["kernel"].shape[1])
        state = {**_torch_layers(params["encoder"], "classifier."),
                 **_torch_layers({"dense_0": params["head"]}, "classifier.", len(units)),
                 "class_weights": np.ones(n_types, np.float32), "child_lookup": np.eye(n_types, dtype=np.int64)}
        hparams = {**common, "type_dim": n_types, "units": units,
                   "class_weights": [1.0] * n_types, "child_matrix": np.eye(n_types, dtype=int).tolist()}
        module = "MLPClassifier"
    elif "decoder" in params and config.loss.get("likelihood", "mse") == "mse":
        state = {**_torch_layers(params["encoder"], "encoder."), **_torch_layers(params["decoder"], "decoder.0.")}
        strategy = MASKING_STRATEGIES.get(config.loss.name)
        hparams = {**common, "units_encoder": units, "units_decoder": list(reversed(m.hidden)),
                   "reconstruction_loss": "mse", "masking_strategy": strategy,
                   "masking_rate": float(config.loss.mask_rate) if strategy else None}
        module = "MLPAutoEncoder"
    else:
        raise SscellError(f"{where}: export_study writes the study's MLPAutoEncoder (an MSE autoencoder) or "
                          f"MLPClassifier; this model (loss {config.loss.name}, "
                          f"likelihood {config.loss.get('likelihood', 'mse')}) is neither")
    classes = {"activation": f"torch.nn.{act}",
               "output_activation": "torch.nn.Sigmoid" if m.get("output_activation", "none") == "sigmoid"
               else "torch.nn.Identity"}
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": LIGHTNING_VERSION,
            "state_dict": collections.OrderedDict(state), "hyper_parameters": hparams,
            "sscell": {"module": module, "classes": classes if module == "MLPAutoEncoder" else {}}}
