"""The study's masked autoencoder and its train step in plain PyTorch: the reference `bench_train` races.

What a user would write instead of sscell (the authors' code is PyTorch Lightning): the same
layers (G -> 512 -> 512 -> 256 -> 256 -> 64 -> mirrored -> G, SELU, dropout 0.1), the same
step (log1p of counts per 10k, a Bernoulli(0.5) gene mask per cell and gene, hidden inputs 0
and survivors scaled by 2, MSE on the hidden genes plus the all-gene MSE as a metric, AdamW
after clipping at global norm 1.0; fused=True, the fastest AdamW PyTorch has on CPU) on a dense
float32 batch of counts already in memory.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch


def mlp(widths: Sequence[int], dropout: float) -> list[torch.nn.Module]:
    """Linear layers of the given widths with SELU and dropout after all but the last."""
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers += [torch.nn.SELU(), torch.nn.Dropout(dropout)]
    return layers


def autoencoder(n_genes: int, hidden: Sequence[int], latent: int, dropout: float) -> torch.nn.Sequential:
    """Encoder to `latent` and the mirrored decoder, like `sscell.models.mlp.Autoencoder`."""
    encoder = mlp((n_genes, *hidden, latent), dropout)
    decoder = mlp((latent, *reversed(hidden), n_genes), dropout)
    return torch.nn.Sequential(*encoder, *decoder)


def masked_loss(model: torch.nn.Module, counts: torch.Tensor, mask_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE on the hidden genes, MSE on all genes) of the model's reconstruction of log1p(counts per 10k)."""
    library = counts.sum(1, keepdim=True)
    x = torch.log1p(counts * torch.where(library > 0, 1e4 / library.clamp_min(1e-12), 0.0))
    hidden = torch.rand_like(x) < mask_rate
    squared_error = (model(torch.where(hidden, 0.0, x / (1.0 - mask_rate))) - x) ** 2
    return (squared_error * hidden).sum() / hidden.sum().clamp_min(1), squared_error.detach().mean()


def make_step(model: torch.nn.Module, lr: float, weight_decay: float, grad_clip: float, mask_rate: float,
              compile_loss: bool, bfloat16: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """`step(counts) -> loss`: one AdamW update of `model`; the loss (forward and backward)
    compiled by `torch.compile` when `compile_loss`, its matmuls in bfloat16 under
    `torch.autocast` (PyTorch's mixed precision; parameters stay float32) when `bfloat16`; on
    the device `counts` (and the model) are on."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    loss_fn = torch.compile(masked_loss) if compile_loss else masked_loss

    def step(counts: torch.Tensor) -> torch.Tensor:
        with torch.autocast(counts.device.type, dtype=torch.bfloat16, enabled=bfloat16):
            loss, _ = loss_fn(model, counts, mask_rate)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss

    return step
