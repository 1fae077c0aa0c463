"""CI's learning gate: after `make run`, fail unless the embedded default really learned its identity and kept its
general answers, and the champion was promoted. Reads outputs/last_run.json, which `persona run` writes.

Thresholds (issue #15): identity after >= 0.9 in both languages, general retention >= 0.95, champion promoted.
"""
import json
import sys
from pathlib import Path

SUMMARY = Path(__file__).resolve().parent.parent / "outputs" / "last_run.json"
MIN_IDENTITY = 0.9
MIN_RETENTION = 0.95


def main(summary: Path = SUMMARY) -> int:
    try:
        run = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"check_learning: cannot read {summary} ({exc}); did `make run` finish?", file=sys.stderr)
        return 1
    s = run["scores"]
    checks = [
        (f"identity_zh after >= {MIN_IDENTITY}", s.get("eval/identity_zh_adapter", 0.0) >= MIN_IDENTITY,
         s.get("eval/identity_zh_adapter")),
        (f"identity_en after >= {MIN_IDENTITY}", s.get("eval/identity_en_adapter", 0.0) >= MIN_IDENTITY,
         s.get("eval/identity_en_adapter")),
        (f"general retention >= {MIN_RETENTION}", s.get("eval/general_retention", 0.0) >= MIN_RETENTION,
         f"{s.get('eval/general_retention', 0.0):.2f}, kept {s.get('eval/general_kept', 0):.0f} of "
         f"{s.get('eval/general_base_right', 0):.0f} base-right answers"),
        ("champion promoted", bool(run["promoted"]), "; ".join(run["reasons"])),
    ]
    failed = [c for c in checks if not c[1]]
    for name, ok, value in checks:
        print(f"check_learning: {'ok  ' if ok else 'FAIL'} {name}: {value}")
    if failed:
        print(f"check_learning: the run did not learn (MLflow run {run['mlflow_run_id']}); see the table above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else SUMMARY))
