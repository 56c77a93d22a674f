"""model.dtype "auto" on a CPU with bfloat16 instructions: the faster dtype, measured once and cached."""
import json
import math

import pytest

from sscell.config import default_config
from sscell.models import dtype_probe
from sscell.models.dtype_probe import Choice, Shapes, auto_dtype, faster_dtype

TIMINGS = {"bfloat16": 2.0, "float32": 3.0}


def test_bfloat16_only_when_clearly_faster():
    assert faster_dtype({"bfloat16": 10.0, "float32": 15.0}) == "bfloat16"  # AMD Zen 4: bfloat16 1.5x
    assert faster_dtype({"bfloat16": 14.6, "float32": 10.0}) == "float32"  # a Xeon without AMX: float32 1.46x
    assert faster_dtype({"bfloat16": 9.9, "float32": 10.0}) == "float32"  # within timing noise: exact float32


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """A CPU with bfloat16 instructions whose (counted) measurements say TIMINGS; the cache under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(dtype_probe, "cpu_has_bfloat16", lambda: True)
    calls = []

    def measure(shapes):
        calls.append(shapes)
        return dict(TIMINGS)

    monkeypatch.setattr(dtype_probe, "measure", measure)
    return calls


def test_measured_once_at_the_runs_shapes_then_read_from_the_cache(probe, tmp_path):
    model = default_config().model
    first = auto_dtype(model, 256, 2000)
    assert first == Choice("bfloat16", TIMINGS) and len(probe) == 1
    assert probe[0] == Shapes(256, 2000, (512, 512, 256, 256), 64, "selu", "none")
    again = auto_dtype(model, 256, 2000)
    assert again == Choice("bfloat16", TIMINGS, cached=True) and len(probe) == 1
    assert "model.dtype auto -> bfloat16 (cached: bf16 2.00 ms/step, f32 3.00 ms/step on " in again.describe()
    auto_dtype(model, 100_000, 2000)  # other shapes (batch capped at PROBE_ROWS cells): measured
    assert len(probe) == 2 and probe[1].rows == dtype_probe.PROBE_ROWS
    assert dtype_probe.cache_file() == tmp_path / "sscell" / "dtype_probe.json"
    assert len(json.loads(dtype_probe.cache_file().read_text())) == 2


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"KEY": {"bfloat16": "fast", "float32": 1}}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(probe, garbage):
    model, path = default_config().model, dtype_probe.cache_file()
    key = Shapes.of(model, 256, 2000).key()
    path.parent.mkdir(parents=True)
    path.write_text(garbage.replace("KEY", key))
    assert auto_dtype(model, 256, 2000) == Choice("bfloat16", TIMINGS) and len(probe) == 1
    assert json.loads(path.read_text()) == {key: TIMINGS}
    assert not list(path.parent.glob(".*.tmp"))


def test_a_cpu_without_bfloat16_instructions_stays_float32_unmeasured(probe, monkeypatch):
    monkeypatch.setattr(dtype_probe, "cpu_has_bfloat16", lambda: False)
    assert auto_dtype(default_config().model, 256, 2000) == Choice("float32")
    assert not probe and not dtype_probe.cache_file().exists()


def test_the_probe_times_both_dtypes():  # no assertion on which is faster: that is the host's to say
    ms = dtype_probe.measure(Shapes(8, 32, (16,), 4, "selu", "none"), budget_s=0.01)
    assert set(ms) == {"bfloat16", "float32"} and all(0 < v < math.inf for v in ms.values())
