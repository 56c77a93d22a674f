"""Training data held on the accelerators: each step's batch is gathered on device.

A host loader reads, decodes and lays out every batch (~34 k cells/s per thread at 19,331
genes), while an accelerator trains millions of cells/s. With `data.device_resident` the
selected train cells' nonzeros (gene ids and counts in the store's uint16 / uint32) are put on
the devices once, sharded over the mesh's "data" axis: data position d holds the selected cells
[d * C, (d + 1) * C) (C = ceil(cells / positions)) concatenated, and their local indptr. Each
step the host computes only the batch's selection (`CellLoader.selection`, the same pure
function of (seed, epoch, step)), a (batch,) int32 array, and a jitted gather builds the batch
in `sscell.data.loader`'s flat sharded layout, with the host loader's padded size: every
position fills the slots of the cells it holds, zeros elsewhere, and a reduce-scatter over
"data" gives each position its own shard. The batch is bit for bit the streamed one, so the
train step and its results are unchanged. Labels (four int32 a cell) still come from the host.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from sscell.data.loader import CellLoader
from sscell.data.preprocess import row_ids
from sscell.data.store import runs
from sscell.errors import SscellError
from sscell.training.mesh import batch_sharded, global_batch, replicated

MAX_LOCAL_NONZEROS = 2**31 - 1  # offsets into a position's nonzeros are int32
READ_RUNS = 1024  # runs of rows read at once while putting: tensorstore's decoded results wait in memory
# until copied, so reading every run at once held a second copy of the data (3.2x its size in all)


def device_memory(device: jax.Device) -> int | None:
    """Bytes of memory `device` offers to JAX, or None where it does not say (CPU)."""
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


class DeviceResidentData:
    """The train split of `loader` on `mesh`'s devices; `batch(step)` equals the streamed
    `global_batch(loader.batch(step), batch_sharded(mesh))` bit for bit."""

    def __init__(self, loader: CellLoader, mesh: Mesh):
        if loader.modality is not None:
            raise SscellError("data.device_resident does not hold a second modality (data.modality); "
                              "set data.device_resident=False")
        self.loader, self.mesh = loader, mesh
        self.positions = mesh.shape["data"]
        self.cells_per_position = -(-loader.n_cells // self.positions)
        indptr = loader.store.indptr
        self.lengths = (indptr[loader.rows + 1] - indptr[loader.rows]).astype(np.int32)
        padded = np.pad(self.lengths.astype(np.int64), (0, self.cells_per_position * self.positions - loader.n_cells))
        per_position = padded.reshape(self.positions, -1)
        self.local_nonzeros = max(1, int(per_position.sum(1).max()))
        self._starts = np.zeros((self.positions, self.cells_per_position + 1), np.int64)
        np.cumsum(per_position, axis=1, out=self._starts[:, 1:])
        store = loader.store
        self.dtypes = (np.dtype(store.indices_dtype), np.dtype(store.data_dtype))

    @property
    def bytes_per_device(self) -> int:
        """Device memory the resident arrays take on each device."""
        nonzero = sum(dtype.itemsize for dtype in self.dtypes)
        return self.local_nonzeros * nonzero + 4 * (self._starts.shape[1] + self.loader.n_cells)

    def check_fits(self, share: float) -> None:
        """Refuse, naming the sizes, when the arrays take over `share` of a device's memory."""
        gib = self.bytes_per_device / 2**30
        if self.local_nonzeros > MAX_LOCAL_NONZEROS:
            raise SscellError(f"data.device_resident: {self.local_nonzeros:,} nonzeros per data position ({gib:.1f} "
                              f"GiB) exceed the int32 offsets ({MAX_LOCAL_NONZEROS:,}); use more devices or "
                              "data.device_resident=False")
        limit = device_memory(self.mesh.devices.flat[0])
        if limit is not None and self.bytes_per_device > share * limit:
            raise SscellError(f"data.device_resident: the train cells take {gib:.2f} GiB per device, over "
                              f"{share:.0%} of its {limit / 2**30:.1f} GiB (data.device_memory_share); use more "
                              "devices, fewer cells (data.train_fraction) or data.device_resident=False")

    def fits(self, share: float) -> bool:
        """Whether the arrays take at most `share` of a device's memory (False where it is unknown)."""
        limit = device_memory(self.mesh.devices.flat[0])
        return limit is not None and self.local_nonzeros <= MAX_LOCAL_NONZEROS and self.bytes_per_device <= share * limit

    def put(self) -> None:
        """Read the cells each of this process's devices holds and put them there (once)."""
        sharded = batch_sharded(self.mesh)

        @functools.lru_cache(maxsize=1)
        def position(d: int) -> tuple[np.ndarray, np.ndarray]:  # the model axis asks for a position again
            first, last = d * self.cells_per_position, min((d + 1) * self.cells_per_position, self.loader.n_cells)
            genes, counts = (np.zeros(self.local_nonzeros, dtype) for dtype in self.dtypes)
            ranges = runs(self.loader.rows[first:last])
            store = self.loader.store
            bounds = store.indptr[np.asarray(ranges, np.int64).reshape(-1, 2)]
            offsets = np.cumsum(bounds[:, 1] - bounds[:, 0]) - (bounds[:, 1] - bounds[:, 0])
            for a in range(0, len(ranges), READ_RUNS):  # straight into place, a bounded group of reads at a time
                store.read_nonzeros_into(ranges[a:a + READ_RUNS], offsets[a:a + READ_RUNS], counts, genes)
            return genes, counts

        shape = (self.positions, self.local_nonzeros)
        self.genes, self.counts = (
            jax.make_array_from_callback(shape, sharded, lambda index, f=f: position(index[0].start or 0)[f][None],
                                         dtype=self.dtypes[f]) for f in (0, 1))
        self.starts = jax.make_array_from_callback(self._starts.shape, sharded,
                                                   lambda index: self._starts[index].astype(np.int32))
        self.cell_lengths = jax.make_array_from_callback(self.lengths.shape, replicated(self.mesh),
                                                         lambda index: self.lengths[index])
        self._gather = jax.jit(self._gather_fn, static_argnames="size")

    def _gather_fn(self, genes, counts, starts, cell_lengths, selection, size: int):
        shard_cells, per_position = selection.shape[0] // self.positions, self.cells_per_position

        def local(genes, counts, starts, cell_lengths, selection):
            me = jax.lax.axis_index("data")
            lengths = cell_lengths[selection].reshape(self.positions, shard_cells)
            indptr = jnp.concatenate([jnp.zeros((self.positions, 1), jnp.int32), jnp.cumsum(lengths, 1)], 1)

            def shard(cells, indptr):  # this position's nonzeros of one output shard, zeros elsewhere
                row = row_ids(indptr, size)
                valid = row < shard_cells
                row = jnp.minimum(row, shard_cells - 1)
                cell = cells[row]
                mine = valid & (cell // per_position == me)
                source = starts[0, cell % per_position] + jnp.arange(size, dtype=jnp.int32) - indptr[row]
                source = jnp.where(mine, source, 0)
                return (jnp.where(mine, genes[0, source], 0).astype(genes.dtype),
                        jnp.where(mine, counts[0, source], 0).astype(counts.dtype))

            parts = jax.vmap(shard)(selection.reshape(self.positions, shard_cells), indptr)
            own = [jax.lax.psum_scatter(p, "data", scatter_dimension=0, tiled=True) for p in parts]
            return own[0], own[1], jax.lax.dynamic_slice_in_dim(indptr, me, 1)

        data, whole = PartitionSpec("data"), PartitionSpec()
        genes, counts, indptr = jax.shard_map(local, mesh=self.mesh, in_specs=(data, data, data, whole, whole),
                                              out_specs=(data, data, data))(genes, counts, starts, cell_lengths,
                                                                            selection)
        return {"genes": genes, "counts": counts, "indptr": indptr}

    def batch(self, step: int) -> dict[str, jax.Array]:
        """Global batch `step` on the devices, in the streamed batch's layout, shardings and values."""
        loader = self.loader
        selection = jax.make_array_from_process_local_data(replicated(self.mesh),
                                                           loader.selection(step).astype(np.int32))
        size = loader.epoch_size(step // loader.steps_per_epoch)
        nonzeros = self._gather(self.genes, self.counts, self.starts, self.cell_lengths, selection, size=size)
        nonzeros = {name: nonzeros[name] for name in ("genes", "counts", "indptr")}  # the streamed order
        return {**nonzeros, **global_batch(loader.cell_labels(loader.local_selection(step)), batch_sharded(self.mesh))}

    def iterate(self, start_step: int, stop_step: int) -> Iterator[dict[str, jax.Array]]:
        """Batches for steps [start_step, stop_step)."""
        return (self.batch(step) for step in range(start_step, stop_step))


def resident_data(loader: CellLoader, mesh: Mesh, setting: bool | str, share: float) -> DeviceResidentData | None:
    """The train data to hold on the devices for `data.device_resident` = False (None: streamed),
    True (refused, naming the sizes, where it takes over `share` of a device's memory) or "auto"
    (held where it fits, a single-modality run on devices that state their memory); not yet put."""
    if setting not in (False, True, "auto"):
        raise SscellError(f"data.device_resident={setting!r} is not False, True or 'auto'; choose one")
    if not setting or (setting == "auto" and loader.modality is not None):
        return None
    resident = DeviceResidentData(loader, mesh)
    if setting == "auto" and not resident.fits(share):
        return None
    resident.check_fits(share)
    return resident


def train_batches(loader: CellLoader, mesh: Mesh, setting: bool | str, share: float
                  ) -> tuple[str, Callable[[int, int], Iterator[dict[str, jax.Array]]]]:
    """(how the train batches come, `iterate(start, stop)` of global batches): held on the devices
    as `resident_data` decides, else streamed by `loader`."""
    resident = resident_data(loader, mesh, setting, share)
    if resident is not None:
        resident.put()
        return f"device-resident ({resident.bytes_per_device / 2**20:,.1f} MiB per device)", resident.iterate
    sharding = batch_sharded(mesh)
    return "streamed", lambda start, stop: (global_batch(b, sharding) for b in loader.iterate(start, stop))
