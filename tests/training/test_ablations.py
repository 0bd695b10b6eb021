import json

import pytest

from tests.training.test_pretrain import TINY
from training import ablations


def _result(knn, used):
    return {"knn_top1": knn, "prototypes_used": used}


def test_verdicts_follow_the_papers_directions():
    baseline = _result(90.0, 40.0)
    assert ablations.verdict("collapses", _result(11.0, 1.0), baseline, chance=10.0) == "agrees"
    assert ablations.verdict("collapses", _result(80.0, 1.0), baseline, chance=10.0) == "DIFFERS"  # still learns
    assert ablations.verdict("collapses", _result(12.0, 39.0), baseline, chance=10.0) == "DIFFERS"  # no collapse
    assert ablations.verdict("below", _result(88.0, 40.0), baseline, chance=10.0) == "agrees"
    assert ablations.verdict("below", _result(91.0, 40.0), baseline, chance=10.0) == "DIFFERS"
    assert ablations.verdict("similar", _result(89.0, 40.0), baseline, chance=10.0) == "agrees"
    assert ablations.verdict("similar", _result(80.0, 40.0), baseline, chance=10.0) == "DIFFERS"


@pytest.mark.slow
def test_carp_ablations_writes_a_table_with_each_rows_command(tmp_path, capsys):
    out = tmp_path / "ablations"
    tiny = [flag for flag in TINY if flag not in ("--export", "false")]
    assert ablations.main(["--output-dir", str(out), "--rows", "one-block", "--", *tiny]) == 0
    rows = json.loads((out / "ablations.json").read_text())
    assert [row["row"] for row in rows] == ["random", "one-block"]
    assert "--block-size 64" in rows[1]["command"] and rows[1]["verdict"] in ("agrees", "DIFFERS")
    for row in rows:
        assert 0 <= row["knn_top1"] <= 100 and 1 <= row["prototypes_used"] <= 64
    table = (out / "ablations.md").read_text()
    assert table.count("| one-block |") == 1 and "carp-pretrain --preset digits" in table
    assert "carp-ablations: random: carp-pretrain" in capsys.readouterr().out
    # A second call reads the finished rows instead of training them again.
    assert ablations.main(["--output-dir", str(out), "--rows", "one-block", "--", *tiny]) == 0
    assert "carp-ablations: random: carp-pretrain" not in capsys.readouterr().out


def test_an_unknown_row_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown rows"):
        ablations.main(["--output-dir", str(tmp_path), "--rows", "bogus"])
