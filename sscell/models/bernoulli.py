"""Bernoulli draws from a keyed counter hash: `jax.random.bernoulli`'s job at a fraction of its CPU cost.

Masking 50% of a (cells, 19,331) batch draws one random number per entry. With threefry that
took ~25 ns per entry on a 2-core CPU, about a fifth of the masked autoencoder's train step;
here each entry is two rounds of a 32-bit integer mixer (lowbias32) of its position and the
key, which XLA fuses into the ops that use the mask. The draws are a pure function of
(key, shape), independent across entries for practical purposes (tests check the rate, the
per-cell spread and the correlation of neighbours), but are not the same bits as `jax.random`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sscell.errors import SscellError


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons' hash-prospector): a bijective uint32 -> uint32 mixer."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean array of `shape`, each entry True with probability `p` (to 2**-32; 1 exactly).

    A static `p` in [0, 1]; entries are independent draws for a given `key`. Arrays of up to
    2**32 entries (positions are counted in uint32).
    """
    if not 0.0 <= p <= 1.0:
        raise SscellError(f"a masking or dropout rate of {p} is not a probability; set loss.mask_rate and "
                          "model.dropout between 0 and 1")
    if p == 1.0:
        return jnp.ones(shape, bool)
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    position = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):  # row-major position of each entry
        position = position + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    draws = _mix(_mix(position ^ seeds[0]) + seeds[1])
    return draws < jnp.uint32(min(round(p * 2.0**32), 2**32 - 1))
