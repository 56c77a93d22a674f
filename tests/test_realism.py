"""Tests for sscell.data.realism (statistics against numpy/scipy references on data with known
parameters) and for the synthetic atlas's realism="calibrated" option."""
from __future__ import annotations

import dataclasses

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats

from sscell.data import realism, synthetic
from sscell.data.synthetic import AtlasSpec, generate_atlas, write_atlas
from sscell.errors import SscellError

SPEC = AtlasSpec(n_cells=1_200, n_genes=300, n_datasets=2, donors_per_dataset=2, realism="calibrated")


def _negative_binomial(rng, mean: np.ndarray, phi: float) -> np.ndarray:
    """scipy's NB with mean `mean` and var mean + phi mean^2 (n = 1/phi, p = n / (n + mean))."""
    n = 1 / phi
    return scipy.stats.nbinom.rvs(n, n / (n + mean), random_state=rng)


@pytest.mark.parametrize("phi", [0.1, 0.5, 2.0])
def test_dispersion_recovers_a_known_phi_despite_unequal_library_sizes(phi):
    rng = np.random.default_rng(0)
    sizes = rng.lognormal(0.0, 0.5, (4_000, 1))
    genes = rng.uniform(1.0, 10.0, 40)
    counts = _negative_binomial(rng, sizes * genes, phi)
    mu, estimated = realism.fit_dispersion(sp.csr_matrix(counts))
    assert np.median(estimated) == pytest.approx(phi, rel=0.1)
    s = counts.sum(1) / counts.sum(1).mean()
    np.testing.assert_allclose(mu, counts.sum(0) / s.sum())  # mean at size factor 1
    # with equal sizes it is the textbook moment estimate (var - mean) / mean^2
    flat = _negative_binomial(rng, np.ones((4_000, 1)) * genes, phi)
    _, simple = realism.fit_dispersion(sp.csr_matrix(flat))
    s = flat.sum(1) / flat.sum(1).mean()
    m = flat.sum(0) / s.sum()
    reference = (((flat - m * s[:, None]) ** 2).sum(0) - m * s.sum()) / (m**2 * (s**2).sum())
    np.testing.assert_allclose(simple, reference, rtol=1e-9)


def test_poisson_counts_have_no_overdispersion_and_no_excess_zeros():
    rng = np.random.default_rng(1)
    counts = rng.poisson(rng.lognormal(0, 0.3, (5_000, 1)) * rng.uniform(0.2, 5.0, 30))
    mu, phi = realism.fit_dispersion(counts)
    assert abs(np.median(phi)) < 0.02
    zeros = realism.zero_excess(counts, phi=1e-6)
    np.testing.assert_allclose(zeros["observed"], (counts == 0).mean(0))
    np.testing.assert_allclose(zeros["observed"], zeros["poisson"], atol=0.02)
    np.testing.assert_allclose(zeros["poisson"], zeros["negative_binomial"], atol=1e-4)


def test_zero_fraction_of_negative_binomial_matches_scipy():
    rng = np.random.default_rng(2)
    mean, phi = np.array([0.3, 1.0, 3.0]), 0.8
    counts = _negative_binomial(rng, np.ones((10_000, 1)) * mean, phi)
    counts = np.hstack([counts, rng.poisson(5.0, (10_000, 300))])  # many genes: size factors ~1
    zeros = {k: v[:3] for k, v in realism.zero_excess(counts, phi).items()}
    n = 1 / phi
    expected = scipy.stats.nbinom.pmf(0, n, n / (n + zeros["mean"]))
    np.testing.assert_allclose(zeros["negative_binomial"], expected, rtol=0.01)
    np.testing.assert_allclose(zeros["observed"], zeros["negative_binomial"], atol=0.02)
    assert np.all(zeros["observed"][1:] > zeros["poisson"][1:] + 0.1)  # overdispersed: more zeros than Poisson


def test_library_sizes_and_correlations_match_numpy():
    rng = np.random.default_rng(3)
    latent = rng.normal(size=(600, 1))
    counts = rng.poisson(np.exp(1.0 + np.hstack([latent, latent, -latent, rng.normal(size=(600, 3))])))
    counts[:, 3] += 1
    library = realism.library_sizes(counts)
    totals = counts.sum(1)
    assert library["q50"] == np.median(totals) and library["cv"] == pytest.approx(totals.std() / totals.mean())
    structure = realism.correlation_structure(counts, top_genes=6)
    x = np.log1p(counts / totals[:, None] * 1e4)
    r = np.corrcoef(x, rowvar=False)
    np.testing.assert_allclose(structure["pairs"], r[np.triu_indices(6, 1)], atol=1e-12)
    np.testing.assert_allclose(structure["eigenvalues"], np.sort(np.linalg.eigvalsh(r))[::-1], atol=1e-10)
    assert structure["pairs"][0] > 0.3 and structure["pairs"][1] < -0.3  # genes 0-1 together, 0-2 opposed


def test_thinning_keeps_each_count_with_the_given_probability():
    counts = sp.csr_matrix(np.full((2_000, 5), 10.0))
    thinned = realism.thin(counts, 0.3, np.random.default_rng(4))
    assert thinned.toarray().mean() == pytest.approx(3.0, rel=0.02)
    assert thinned.toarray().var() == pytest.approx(10 * 0.3 * 0.7, rel=0.1)


def test_bad_input_gets_one_clear_line(tmp_path):
    with pytest.raises(SscellError, match="non-integer"):
        realism.fit_dispersion(np.array([[0.5, 1.0], [1.0, 2.0]]))
    with pytest.raises(SscellError, match="no counts"):
        realism.fit_dispersion(np.array([[0, 0], [1, 2]]))
    with pytest.raises(SscellError, match="does not exist"):
        realism.compare(tmp_path / "missing.h5ad", [], tmp_path / "out")


# --- the calibrated generator -------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated() -> anndata.AnnData:
    return generate_atlas(SPEC)


def test_calibrated_is_deterministic_and_the_same_at_any_chunk_size(calibrated, monkeypatch, tmp_path):
    again = generate_atlas(SPEC)
    assert (calibrated.X != again.X).nnz == 0 and calibrated.obs.equals(again.obs)
    # Counts draw one random stream per chunk (as the default's), so CHUNK_ENTRIES is part of the
    # definition; cell states are drawn per cohort, so they are the same at any chunk size.
    monkeypatch.setattr(synthetic, "CHUNK_ENTRIES", SPEC.n_genes * 100)  # 12 chunks of 100 cells
    write_atlas(SPEC, tmp_path / "a.h5ad")
    streamed, in_memory = anndata.read_h5ad(tmp_path / "a.h5ad"), generate_atlas(SPEC)
    assert (streamed.X != in_memory.X).nnz == 0
    assert streamed.obs.equals(calibrated.obs) and in_memory.obs.equals(calibrated.obs)
    assert abs(streamed.X.sum() / calibrated.X.sum() - 1) < 0.02  # same model, other draws
    other = generate_atlas(dataclasses.replace(SPEC, seed=1))
    assert (other.X != calibrated.X).nnz > 0


def test_default_atlas_is_untouched_by_the_calibrated_option(calibrated):
    """The option draws from streams of its own: the default's programmes, cells and per-chunk
    activity are the same objects with or without it, and the default has none of its columns."""
    default_spec = dataclasses.replace(SPEC, realism="default")
    default = generate_atlas(default_spec)
    bio, cohort, _ = synthetic._model(default_spec)
    cal_bio, cal_cohort, _ = synthetic._model(SPEC)
    np.testing.assert_array_equal(bio.baseline, cal_bio.baseline)
    np.testing.assert_array_equal(cohort.leaf, cal_cohort.leaf)
    np.testing.assert_array_equal(cohort.donor, cal_cohort.donor)
    assert default.uns["gene_programmes"] == calibrated.uns["gene_programmes"]
    assert "pseudotime" not in default.obs and "realism_programmes" not in default.uns
    # the default activity is exactly _activity's first draw of stream [seed, 2, 0]
    rng, activity, extra = synthetic._chunk_activity(default_spec, bio, cohort, 0, slice(0, 50))
    expected = synthetic._activity(np.random.default_rng([SPEC.seed, 2, 0]), bio.lineage[cohort.leaf[:50]],
                                   bio.owner < 0)
    np.testing.assert_array_equal(activity, expected)
    assert extra is None
    assert (default.X != calibrated.X).nnz > 0


def test_calibrated_cells_lie_on_trajectories_and_cycle(calibrated):
    obs = calibrated.obs
    for first, second in synthetic.TRAJECTORIES:
        t_first = obs.loc[obs["cell_type"] == first, "pseudotime"]
        t_second = obs.loc[obs["cell_type"] == second, "pseudotime"]
        assert t_first.between(0, 0.5).all() and t_second.between(0.5, 1).all()
    assert obs.loc[~obs["cell_type"].isin(sum(synthetic.TRAJECTORIES, ())), "pseudotime"].isna().all()
    cycling = (obs["cell_cycle_phase"] != "G1").mean()
    assert 0.05 < cycling < synthetic.CYCLING_RATE  # part of the cycling cells are between S and G2/M
    # S-phase genes are higher in S-phase cells, whatever their type
    genes = calibrated.var_names.get_indexer(calibrated.uns["realism_programmes"]["cell_cycle_S"])
    x = realism.log1p_normalised(calibrated.X)[:, genes].mean(1)
    phase = obs["cell_cycle_phase"].to_numpy()
    assert x[phase == "S"].mean() > x[phase == "G1"].mean() + 0.3
    # transient genes peak mid-trajectory: higher near pseudotime 0.5 than near the ends
    name = [n for n in calibrated.uns["realism_programmes"] if n.startswith("transient_classical")][0]
    genes = calibrated.var_names.get_indexer(calibrated.uns["realism_programmes"][name])
    t = obs["pseudotime"].to_numpy()
    y = realism.log1p_normalised(calibrated.X)[:, genes].mean(1)
    assert y[np.abs(t - 0.5) < 0.2].mean() > y[(t < 0.1) | (t > 0.9)].mean()


def test_calibrated_statistics_move_toward_the_real_cells():
    """Against scanpy's 700 PBMCs, matched as the docs' comparison: the calibrated atlas's
    median phi is within a factor 2 of the real one where the default's is not, and its library
    size CV is closer."""
    pytest.importorskip("scanpy")
    from sscell.data.examples import pbmc68k

    real = sp.csr_matrix(pbmc68k().X)
    real_row, _ = realism.statistics(real)
    median = float(np.median(np.asarray(real.sum(1)).ravel()))
    spec = AtlasSpec(n_cells=1_500, n_genes=2_000, n_datasets=1, donors_per_dataset=1)
    rows = {}
    for mode in synthetic.REALISMS:
        counts, _ = realism.match(generate_atlas(dataclasses.replace(spec, realism=mode)).X, *real.shape, median)
        rows[mode], _ = realism.statistics(counts)
    ratio = {m: rows[m]["phi_median"] / real_row["phi_median"] for m in rows}
    assert 0.5 < ratio["calibrated"] < 2 and not 0.5 < ratio["default"] < 2
    gap = {m: abs(rows[m]["library_cv"] - real_row["library_cv"]) for m in rows}
    assert gap["calibrated"] < gap["default"]


def test_an_unknown_realism_is_refused():
    with pytest.raises(SscellError, match="realism='linear': choose one of default, calibrated"):
        generate_atlas(dataclasses.replace(SPEC, realism="linear"))
