"""PyTorch checkpoint files (what `torch.save` and Lightning write) read and written without torch.

A checkpoint is a zip: `PREFIX/data.pkl`, a pickle whose tensors point at storages `PREFIX/data/KEY`
(raw little-endian bytes). `read_checkpoint` unpickles it with a restricted unpickler that runs no
code of the file: tensors are rebuilt here from the storages (numpy arrays), `collections.OrderedDict`
is the real one, and every other global the pickle names (torch.nn.SELU, Lightning's AttributeDict,
numpy reconstructors, ...) becomes an inert `Placeholder` class that only records its name. A global
outside the modules a model checkpoint uses (os.system, builtins.eval, subprocess, ...) is refused in
one line before anything else happens. `write_checkpoint` writes the same format, its pickle only of
dicts, lists, tuples, strings, numbers and tensors, so `torch.load(weights_only=True)` reads it.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from sscell.errors import SscellError

# Modules whose globals become placeholders; any other global is refused.
PLACEHOLDER_ROOTS = frozenset({
    "torch", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "numpy", "collections",
    "_codecs", "copyreg", "argparse", "pathlib", "functools", "typing", "datetime", "enum", "omegaconf",
    "self_supervision", "cellnet", "scvi"})
SAFE_BUILTINS = frozenset({"set", "frozenset", "slice", "complex", "bytearray", "object", "range"})
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
STORAGE_NAMES = {np.dtype(v): k for k, v in STORAGE_DTYPES.items()}
TENSOR_REBUILDERS = {"_rebuild_tensor", "_rebuild_tensor_v2"}
PARAMETER_REBUILDERS = {"_rebuild_parameter", "_rebuild_parameter_with_state"}


class Placeholder(dict):
    """An object of a class the pickle named: its constructor arguments, items and state, recorded only."""

    module: str = ""
    name: str = ""

    def __init__(self, *args, **kwargs):  # REDUCE calls the class; NEWOBJ only its __new__
        super().__init__()
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state

    def append(self, item) -> None:
        self.__dict__.setdefault("appended", []).append(item)

    def extend(self, items) -> None:
        self.__dict__.setdefault("appended", []).extend(items)

    @classmethod
    def qualname(cls) -> str:
        return f"{cls.module}.{cls.name}"


def placeholder(module: str, name: str) -> type[Placeholder]:
    return type(name, (Placeholder,), {"module": module, "name": name})


def qualname(value) -> str | None:
    """'torch.nn.modules.activation.SELU' of a placeholder class (a hyper-parameter naming a class), else None."""
    return value.qualname() if isinstance(value, type) and issubclass(value, Placeholder) else None


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage, where: str):
        super().__init__(io.BytesIO(data))
        self.storage, self.where, self.classes = storage, where, {}

    def find_class(self, module: str, name: str):
        # Python 2 names (protocol 2 writes builtins as __builtin__), mapped as pickle itself maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        root = module.split(".")[0]
        if module == "torch._utils" and name in TENSOR_REBUILDERS:
            return _rebuild_tensor
        if module == "torch._utils" and name in PARAMETER_REBUILDERS:
            return lambda data, *_: data
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if (root == "builtins" and name not in SAFE_BUILTINS) or (root != "builtins" and root not in PLACEHOLDER_ROOTS):
            raise SscellError(f"{self.where}: its pickle asks for {module}.{name}, which no model checkpoint needs; "
                              "refused, nothing in the file was run")
        return self.classes.setdefault((module, name), placeholder(module, name))

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise SscellError(f"{self.where}: its pickle references {pid!r}, not a tensor storage; refused")
        _, kind, key, _location, numel = pid
        dtype = STORAGE_DTYPES.get(getattr(kind, "name", ""))
        if dtype is None:
            raise SscellError(f"{self.where}: tensor storage of type {qualname(kind) or kind!r} is not supported")
        return self.storage(str(key), np.dtype(dtype), int(numel))


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_) -> np.ndarray:
    """The tensor (a numpy copy) viewing `storage` at element `offset` with `size` and `stride`."""
    if any(s < 0 for s in (offset, *size, *stride)) or (
            all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= len(storage)):
        raise SscellError("checkpoint: a tensor reaches outside its storage; the file is damaged")
    view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size),
                                           tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)


def read_checkpoint(path: str | Path) -> object:
    """The object a PyTorch checkpoint file holds, tensors as numpy arrays, classes as placeholders."""
    path = Path(path)
    if not path.is_file():
        raise SscellError(f"{path} does not exist; give the study's .ckpt file")
    if not zipfile.is_zipfile(path):
        raise SscellError(f"{path} is not a PyTorch zip checkpoint (torch >= 1.6 writes one); the legacy "
                          "format is not read: re-save it with torch.save in a current torch")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise SscellError(f"{path}: a zip without exactly one PREFIX/data.pkl is not a PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        names, loaded = set(archive.namelist()), {}

        def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise SscellError(f"{path}: its pickle references storage {key}, which the zip lacks; the file is damaged")
            if name not in loaded:
                raw = archive.read(name)
                if len(raw) < numel * dtype.itemsize:
                    raise SscellError(f"{path}: storage {key} is shorter than its {numel} elements; the file is damaged")
                loaded[name] = np.frombuffer(raw, dtype.newbyteorder("<"), numel)
            return loaded[name]

        try:
            return _Unpickler(archive.read(pickles[0]), storage, str(path)).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            raise SscellError(f"{path}: its pickle could not be read ({type(error).__name__}: {error})") from None


class _Pickler:
    """Protocol-2 pickle opcodes of plain values and numpy arrays (as torch tensors), written by hand."""

    def __init__(self):
        self.out, self.storages = bytearray(b"\x80\x02"), []

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + f"{module}\n{name}\n".encode()

    def dump(self, value) -> None:
        out = self.out
        if value is None:
            out += b"N"
        elif isinstance(value, (bool, np.bool_)):
            out += b"\x88" if value else b"\x89"
        elif isinstance(value, (int, np.integer)):
            value = int(value)
            if -2**31 <= value < 2**31:
                out += b"J" + struct.pack("<i", value)
            else:
                raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
                out += b"\x8a" + bytes([len(raw)]) + raw
        elif isinstance(value, (float, np.floating)):
            out += b"G" + struct.pack(">d", float(value))
        elif isinstance(value, str):
            raw = value.encode()
            out += b"X" + struct.pack("<I", len(raw)) + raw
        elif isinstance(value, np.ndarray):
            self.tensor(value)
        elif isinstance(value, dict):
            if isinstance(value, collections.OrderedDict):
                self.global_("collections", "OrderedDict")
                out += b")R"
            else:
                out += b"}"
            if value:
                out += b"("
                for key, item in value.items():
                    self.dump(key)
                    self.dump(item)
                out += b"u"
        elif isinstance(value, list):
            out += b"]"
            if value:
                out += b"("
                for item in value:
                    self.dump(item)
                out += b"e"
        elif isinstance(value, tuple):
            out += b"("
            for item in value:
                self.dump(item)
            out += b"t"
        else:
            raise TypeError(f"cannot write {type(value).__name__} into a checkpoint")

    def tensor(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        kind = STORAGE_NAMES[array.dtype]
        key = str(len(self.storages))
        self.storages.append(array)
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"(("
        self.dump("storage")
        self.global_("torch", kind)
        self.dump(key)
        self.dump("cpu")
        self.dump(array.size)
        self.out += b"tQ"
        self.dump(0)
        self.dump(tuple(array.shape))
        self.dump(tuple(s // array.itemsize for s in array.strides) if array.size else (1,) * array.ndim)
        self.dump(False)
        self.dump(collections.OrderedDict())
        self.out += b"tR"


def write_checkpoint(path: str | Path, value: dict) -> Path:
    """Write `value` (plain values, numpy arrays as tensors) as a PyTorch zip checkpoint at `path`."""
    path = Path(path)
    pickler = _Pickler()
    pickler.dump(value)
    pickler.out += b"."
    prefix = "archive"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", bytes(pickler.out))
        archive.writestr(f"{prefix}/byteorder", "little")
        for key, array in enumerate(pickler.storages):
            archive.writestr(f"{prefix}/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
        archive.writestr(f"{prefix}/version", "3\n")
    return path
