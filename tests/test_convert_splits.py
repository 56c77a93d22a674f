"""Split policies: by donor unit (needs >= 3), cell by cell (--split=cells), from an obs column;
recorded in the store, followed by --append, taken from the config; never an empty split."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from test_store import leftovers, make_adata

from sscell.config import default_config
from sscell.data.convert import convert, main
from sscell.data.prepare import prepare_store
from sscell.data.store import SPLITS, open_store
from sscell.errors import SscellError


def split_sizes(path) -> list[int]:
    store = open_store(path)
    return [int(np.diff(store.split_range(s))[0]) for s in SPLITS]


def expected_sizes(n: int, fractions=(0.7, 0.15, 0.15)) -> list[int]:
    cuts = np.round(np.cumsum(fractions[:2]) * n).astype(int)
    return [int(cuts[0]), int(cuts[1] - cuts[0]), int(n - cuts[1])]


@pytest.mark.parametrize("n_donors", [1, 2])
def test_too_few_donors_stop_with_the_choices(tmp_path, n_donors):
    make_adata(n_cells=100, n_donors=n_donors, seed=n_donors).write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(SscellError, match=rf"split would be empty: the cells come from {n_donors} donor unit.*"
                                          r"--split=cells.*--split-column=COLUMN") as error:
        convert([tmp_path / "in.h5ad"], tmp_path / "store")
    assert "\n" not in str(error.value)
    assert leftovers(tmp_path, [tmp_path / "in.h5ad"]) == []


def test_cells_split_without_donors(tmp_path, capsys):
    adata = make_adata(n_cells=201, n_donors=1, seed=3)
    del adata.obs["donor_id"]
    adata.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(SscellError, match=r"obs lacks required column\(s\) donor_id.*--split=cells"):
        convert([tmp_path / "in.h5ad"], tmp_path / "store")

    main([str(tmp_path / "in.h5ad"), f"--output={tmp_path / 'store'}", "--split=cells", "--seed=4"])
    report = json.loads(capsys.readouterr().out)
    convert([tmp_path / "in.h5ad"], tmp_path / "again", split="cells", seed=4)
    convert([tmp_path / "in.h5ad"], tmp_path / "other_seed", split="cells", seed=5)

    assert report["split"] == "cells"
    assert split_sizes(tmp_path / "store") == list(report["split_cells"].values()) == expected_sizes(201)
    assert zarr.open_group(tmp_path / "store", mode="r").attrs["sscell"]["split"] == "cells"
    obs = open_store(tmp_path / "store").read_obs()
    assert (obs["donor_id"] == "unknown").all()  # the store layout stays the same
    assert obs["split"].equals(open_store(tmp_path / "again").read_obs()["split"])  # seeded
    other = open_store(tmp_path / "other_seed").read_obs()
    assert not (other["split"].loc[obs.index] == obs["split"]).all()


def test_append_follows_the_stores_policy(tmp_path):
    old = make_adata(n_cells=120, n_donors=1, seed=0, prefix="old-")
    new = make_adata(n_cells=400, n_donors=1, seed=1, prefix="new-")  # the same single donor
    old.write_h5ad(tmp_path / "old.h5ad")
    new.write_h5ad(tmp_path / "new.h5ad")
    convert([tmp_path / "old.h5ad"], tmp_path / "store", split="cells")
    before = open_store(tmp_path / "store").read_obs()["split"]
    with pytest.raises(SscellError, match="was split by cells.*drop --split or pass --split=cells"):
        convert([tmp_path / "new.h5ad"], tmp_path / "store", append=True, split="donor")

    report = convert([tmp_path / "new.h5ad"], tmp_path / "store", append=True, seed=2)
    after = open_store(tmp_path / "store").read_obs()["split"]

    assert report["split"] == "cells" and report["appended_cells"] == 400
    assert after[before.index].equals(before)  # the store's cells keep their split
    appended = after[after.index.str.startswith("new-")]
    assert [int((appended == s).sum()) for s in SPLITS] == expected_sizes(400)  # split cell by cell too
    assert zarr.open_group(tmp_path / "store", mode="r").attrs["sscell"]["split"] == "cells"


def test_donor_split_is_recorded(tmp_path):
    make_adata(n_cells=150, n_donors=6).write_h5ad(tmp_path / "in.h5ad")
    report = convert([tmp_path / "in.h5ad"], tmp_path / "store")
    assert report["split"] == "donor" == zarr.open_group(tmp_path / "store", mode="r").attrs["sscell"]["split"]
    assert min(split_sizes(tmp_path / "store")) > 0


def test_split_column_without_a_split_value(tmp_path):
    adata = make_adata(n_cells=60, n_donors=1, seed=6)
    adata.obs["my_split"] = np.where(np.arange(60) < 40, "train", "test")
    adata.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(SscellError, match=r"the val split would be empty: of 60 cells, 0 split by donor and 60 "
                                          r"given by obs column 'my_split'"):
        convert([tmp_path / "in.h5ad"], tmp_path / "store", split_column="my_split")
    assert leftovers(tmp_path, [tmp_path / "in.h5ad"]) == []


def test_too_few_cells_for_a_cell_split(tmp_path):
    make_adata(n_cells=2, n_donors=1).write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(SscellError, match=r"the (val|test) split would be empty: of 2 cells, 2 split by cells; "):
        convert([tmp_path / "in.h5ad"], tmp_path / "store", split="cells")


def test_config_split_reaches_the_conversion(tmp_path):
    adata = make_adata(n_cells=100, n_donors=1)
    adata.write_h5ad(tmp_path / "in.h5ad")
    config = default_config()
    assert config.data.split == "donor"
    config.data.h5ad = str(tmp_path / "in.h5ad")
    with pytest.raises(SscellError, match="1 donor unit.*data.split=cells"):
        prepare_store(config, str(tmp_path / "run"))
    config.data.split = "cells"
    store = prepare_store(config, str(tmp_path / "run"))
    assert [int(np.diff(store.split_range(s))[0]) for s in SPLITS] == expected_sizes(100)
