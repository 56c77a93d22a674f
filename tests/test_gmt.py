"""GMT gene-set files: round trip and malformed input."""
import pytest

from sscell.data.gmt import read_gmt, write_gmt
from sscell.errors import SscellError


def test_round_trip(tmp_path):
    sets = {"T_cell": ["ENSG01", "ENSG02"], "TF_X_targets": ["ENSG03"]}
    write_gmt(tmp_path / "a.gmt", sets)
    assert read_gmt(tmp_path / "a.gmt") == sets


@pytest.mark.parametrize("text, problem", [("only_a_name\n", "needs a name"), ("a\td\tg1\na\td\tg2\n", "twice")])
def test_malformed(tmp_path, text, problem):
    (tmp_path / "bad.gmt").write_text(text)
    with pytest.raises(SscellError, match=problem):
        read_gmt(tmp_path / "bad.gmt")


def test_missing_file(tmp_path):
    with pytest.raises(SscellError, match="no such .gmt file"):
        read_gmt(tmp_path / "nope.gmt")
