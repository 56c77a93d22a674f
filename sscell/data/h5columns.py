"""One-dimensional elements of an open .h5ad (the obs index, obs columns) read in row blocks,
whatever anndata encoding wrote them.

`anndata.io.read_elem` follows every encoding but reads an element whole, as Python objects for
strings: too much for the cell ids of a 20 M-cell file. The encodings that hold one value per row
are sliced here instead: a plain `string-array` / `array` dataset, and the `values` / `mask`
datasets of a `nullable-string-array`, `nullable-integer` or `nullable-boolean` group (anndata 0.13
writes pandas string indices and columns this way). A `categorical` reads its categories (small)
with anndata and slices its codes; any other encoding is read whole by anndata, once.
"""
from __future__ import annotations

import functools

import anndata
import h5py
import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

MASKED = ("nullable-string-array", "nullable-integer", "nullable-boolean")  # groups of values + mask


def _sliced(dataset: h5py.Dataset, start: int, stop: int, decode: bool) -> np.ndarray:
    """Rows [start, stop) of a 1-D dataset; strings as str objects (bytes if not `decode`)."""
    if decode and h5py.check_string_dtype(dataset.dtype):
        return dataset.asstr()[start:stop]
    return dataset[start:stop]


def _with_missing(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """`values` as an object array holding None where `missing`."""
    if not missing.any():
        return values
    values = values.astype(object)
    values[missing] = None
    return values


class Column:
    """A 1-D element of an open .h5ad: `len(column)` rows, read with `block(start, stop)`."""

    def __init__(self, elem: h5py.Dataset | h5py.Group):
        self.elem = elem
        self.encoding = str(elem.attrs.get("encoding-type", "array"))

    @functools.cached_property
    def _whole(self) -> np.ndarray:
        """The element read whole by anndata (encodings without one dataset of rows), None where missing."""
        values = np.asarray(anndata.io.read_elem(self.elem), dtype=object)
        return _with_missing(values, pd.isna(values))

    @functools.cached_property
    def _categories(self) -> np.ndarray:
        return np.asarray(anndata.io.read_elem(self.elem["categories"]), dtype=object)

    def __len__(self) -> int:
        if isinstance(self.elem, h5py.Dataset):
            return len(self.elem)
        if self.encoding in MASKED:
            return len(self.elem["values"])
        if self.encoding == "categorical":
            return len(self.elem["codes"])
        return len(self._whole)

    def block(self, start: int, stop: int, *, decode: bool = True) -> np.ndarray:
        """Values of rows [start, stop): strings as str (UTF-8 bytes if not `decode`), None where missing."""
        if isinstance(self.elem, h5py.Dataset):
            return _sliced(self.elem, start, stop, decode)
        if self.encoding in MASKED:
            values = _sliced(self.elem["values"], start, stop, decode)
            return _with_missing(values, self.elem["mask"][start:stop].astype(bool))
        if self.encoding == "categorical":
            return np.append(self._categories, None)[self.elem["codes"][start:stop]]  # code -1: None
        return self._whole[start:stop]

    def categorical(self, block_rows: int) -> pd.Categorical:
        """The whole column as a categorical of strings (missing values: code -1), built from blocks
        of `block_rows` rows so no array of every row's value is ever held."""
        if self.encoding == "categorical":
            return categorical_of_strings(pd.Categorical(anndata.io.read_elem(self.elem)))
        n = len(self)
        return union_categoricals([categorical_of_strings(pd.Categorical(self.block(start, min(start + block_rows, n))))
                                   for start in range(0, n, block_rows)] or [categorical_of_strings(pd.Categorical([]))])


def categorical_of_strings(column: pd.Categorical) -> pd.Categorical:
    """`column` with its categories as str (an object index, the same dtype whatever they were)."""
    return pd.Categorical.from_codes(column.codes, pd.Index([str(c) for c in column.categories], dtype=object))
