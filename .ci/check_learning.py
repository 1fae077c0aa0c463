"""CI's learning gate: after `make run`, fail unless the embedded default really learned its identity.
Reads outputs/last_run.json, which `persona run` writes.

Required (issue #15): identity after >= 0.9 in both languages (a learning rate of 0, or a broken training, fails
here), general retention >= 0.95 (kept / base-right general answers) and the champion promoted. The default recipe
keeps 149 of the 156 base-right answers (95.5 %) on the 2-core AMX machine (BENCHMARKS.md, CPU section).
"""
import json
import sys
from pathlib import Path

SUMMARY = Path(__file__).resolve().parent.parent / "outputs" / "last_run.json"
MIN_IDENTITY = 0.9
MIN_RETENTION = 0.95
REQUIRED = ("identity_zh", "identity_en", "retention", "promoted")


def checks(run: dict) -> list[tuple[str, str, bool, object]]:
    """(key, description, passed, value) for each learning check."""
    s = run.get("scores", {})
    return [
        ("identity_zh", f"identity_zh after >= {MIN_IDENTITY}", s.get("eval/identity_zh_adapter", 0.0) >= MIN_IDENTITY,
         s.get("eval/identity_zh_adapter")),
        ("identity_en", f"identity_en after >= {MIN_IDENTITY}", s.get("eval/identity_en_adapter", 0.0) >= MIN_IDENTITY,
         s.get("eval/identity_en_adapter")),
        ("retention", f"general retention >= {MIN_RETENTION}", s.get("eval/general_retention", 0.0) >= MIN_RETENTION,
         f"{s.get('eval/general_retention', 0.0):.1%}, kept {s.get('eval/general_kept', 0):.0f} of "
         f"{s.get('eval/general_base_right', 0):.0f} base-right answers"),
        ("promoted", "champion promoted", bool(run.get("promoted")), "; ".join(run.get("reasons", []))),
    ]


def main(summary: Path = SUMMARY, required: tuple[str, ...] = REQUIRED) -> int:
    try:
        run = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"check_learning: cannot read {summary} ({exc}); did `make run` finish?", file=sys.stderr)
        return 1
    failed = False
    for key, name, ok, value in checks(run):
        mark = "ok  " if ok else ("FAIL" if key in required else "warn")
        print(f"check_learning: {mark} {name}: {value}{'' if key in required else ' (reported, not required)'}")
        failed |= key in required and not ok
    if failed:
        print(f"check_learning: the run did not learn (MLflow run {run.get('mlflow_run_id')}); see the table above",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else SUMMARY))
