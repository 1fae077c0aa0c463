"""The evaluation as markdown: scores per kind, the retention report, the side-by-side answers."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from persona.scoring import CONTENDER_TITLES, Answer, Scores, retention


@dataclass(frozen=True)
class EvaluationReport:
    """What an evaluation hands on (the `evaluation_report` asset's value): the MLflow metrics
    (persona.scoring.metrics), the tables as markdown, every contender's answers, and the adapter and MLflow run
    they belong to."""

    scores: dict[str, float]
    adapter: str
    mlflow_run_id: str
    kinds_markdown: str = ""
    table_markdown: str = ""
    retention_markdown: str = ""
    by_kind: dict = field(default_factory=dict)
    answers: dict[str, list[dict]] = field(default_factory=dict)

    def as_json(self) -> dict:
        return asdict(self)


def _cell(v: float | None) -> str:
    return "—" if v is None or v != v else f"{v:.2f}"


def scores_table(results: dict[str, Scores]) -> str:
    """The tutorials' comparison: one row per probe kind, one column per contender ('—': not asked)."""
    names = list(results)
    kinds = sorted({k for s in results.values() for k in s.by_kind})
    rows = ["| kind | " + " | ".join(CONTENDER_TITLES[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in kinds:
        counts = {n: sum(1 for a in results[n].answers if a.probe.kind == k) for n in names}
        rows.append(f"| {k} ({max(counts.values())}) | "
                    + " | ".join(_cell(results[n].by_kind.get(k)) for n in names) + " |")
    rows.append("| answers cut at max_new_tokens | " + " | ".join(str(results[n].truncated) for n in names) + " |")
    return "\n".join(rows)


def retention_report(results: dict[str, Scores], limit: int = 160) -> str:
    """'kept k of n base-right general answers', then the lost ones: question, base answer, adapter answer."""
    if "base" not in results or "adapter" not in results:
        return ""
    kept = retention(results["base"], results["adapter"])
    base = results["base"].general_answers()
    lines = [f"General retention: {kept}."]
    for a in kept.lost:
        lines.append(f"- lost: {a.probe.question} | base: {_short(base[a.probe.question].text, limit)} | adapter: "
                     f"{_short(a.text, limit)}")
    return "\n".join(lines)


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def comparison_table(results: dict[str, Scores], limit: int = 160) -> str:
    """The tutorials' side-by-side answers: question | base | prompt-only | adapter, one row per probe ('—': that
    contender was not asked). The seeds' own question comes first."""

    def cell(a: Answer | None) -> str:
        if a is None:
            return "—"
        return f"{'✅' if a.passed else '❌'} {_short(a.text, limit)}{' ✂' if a.truncated else ''}"

    names = list(results)
    by_key = {n: {} for n in names}
    for n in names:
        for a in results[n].answers:
            by_key[n].setdefault((a.probe.kind, a.probe.question), a)  # a stability probe: its first sample
    order = list(dict.fromkeys(k for n in names for k in by_key[n]))
    rows = ["| kind | question | " + " | ".join(CONTENDER_TITLES[n] for n in names) + " |",
            "|---|---" + "|---" * len(names) + "|"]
    for kind, question in order:
        rows.append(f"| {kind} | {question} | "
                    + " | ".join(cell(by_key[n].get((kind, question))) for n in names) + " |")
    return "\n".join(rows)
