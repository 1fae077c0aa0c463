"""CI's learning gate (.ci/check_learning.py): it passes a run that learned and fails one that did not."""
import importlib.util
import json
from pathlib import Path

import pytest

GATE_FILE = Path(__file__).resolve().parent.parent / ".ci" / "check_learning.py"


@pytest.fixture(scope="module")
def gate():
    spec = importlib.util.spec_from_file_location("check_learning", GATE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(tmp_path, promoted=True, **scores) -> Path:
    s = {"eval/identity_zh_adapter": 1.0, "eval/identity_en_adapter": 1.0, "eval/general_retention": 0.97,
         "eval/general_kept": 151.0, "eval/general_base_right": 156.0, **scores}
    path = tmp_path / "last_run.json"
    path.write_text(json.dumps({"scores": s, "promoted": promoted, "reasons": ["r"], "mlflow_run_id": "abc"}))
    return path


def test_a_run_that_learned_passes(gate, tmp_path, capsys):
    assert gate.main(summary(tmp_path)) == 0
    assert "FAIL" not in capsys.readouterr().out


@pytest.mark.parametrize("change", [{"eval/identity_zh_adapter": 0.0},   # lr 0: nothing learned
                                    {"eval/identity_en_adapter": 0.85}])
def test_a_run_that_did_not_learn_its_identity_fails(gate, tmp_path, capsys, change):
    assert gate.main(summary(tmp_path, **change)) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("change", [{"eval/general_retention": 0.81},   # forgot general answers
                                    {"promoted": False}])
def test_a_run_that_forgot_or_was_not_promoted_fails(gate, tmp_path, capsys, change):
    promoted = change.pop("promoted", True)
    path = summary(tmp_path, promoted, **change)
    assert gate.main(path) == 1 and "FAIL" in capsys.readouterr().out
    assert gate.main(path, required=("identity_zh", "identity_en")) == 0  # reported only, when not required


def test_a_missing_summary_fails_with_a_reason(gate, tmp_path, capsys):
    assert gate.main(tmp_path / "absent.json") == 1
    assert "did `make run` finish?" in capsys.readouterr().err


def test_a_summary_without_scores_counts_as_not_learned(gate, tmp_path):
    path = summary(tmp_path)
    data = json.loads(path.read_text())
    data["scores"] = {}
    path.write_text(json.dumps(data))
    assert gate.main(path) == 1
