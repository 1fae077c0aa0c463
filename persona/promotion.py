"""The promotion gate: which adapter becomes the champion.

An adapter is promoted only when it meets the thresholds (identity, adversarial, general retention vs
the base model, general answers that state the identity) and beats the current champion: a higher identity score, or an equal one with a
higher general score, and never a lower general score.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    min_identity: float = 0.8
    min_adversarial: float = 0.5
    min_general_retention: float = 0.9  # share of the base model's right general answers the adapter keeps
    max_identity_leak: float = 0.1  # share of general answers that state the identity


@dataclass(frozen=True)
class Candidate:
    """The numbers the gate looks at, taken from an evaluation's MLflow metrics."""

    identity: float
    general: float
    general_base: float
    adversarial: float | None = None
    identity_leak: float | None = None  # None: an evaluation from before this was measured
    kept: float | None = None  # base-right general answers the adapter still gets right (None: not measured)

    @classmethod
    def from_metrics(cls, m: dict[str, float]) -> "Candidate":
        return cls(identity=m["eval/identity_score_after"], general=m["eval/general_score_after"],
                   general_base=m["eval/general_score_before"], adversarial=m.get("eval/adversarial_adapter"),
                   identity_leak=m.get("eval/general_identity_leak_after"), kept=m.get("eval/general_retention"))

    @property
    def general_retention(self) -> float:
        """Kept / base-right general answers; for evaluations from before that was measured, the ratio of scores."""
        if self.kept is not None:
            return self.kept
        return self.general / self.general_base if self.general_base else 1.0


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return ("promoted: " if self.promote else "not promoted: ") + "; ".join(self.reasons)


@dataclass(frozen=True)
class PromotionDecision:
    """What the promotion step decided (the `champion` asset's value) and who holds the champion alias after it."""

    promoted: bool
    reasons: tuple[str, ...]
    candidate_run_id: str
    champion_version: str | None = None  # the registered model version holding the alias (None: no champion)
    champion_run_id: str | None = None


def decide(candidate: Candidate, champion: Candidate | None, t: Thresholds = Thresholds()) -> Decision:
    failed = []
    if candidate.identity < t.min_identity:
        failed.append(f"identity {candidate.identity:.2f} < {t.min_identity:.2f}")
    if candidate.adversarial is not None and candidate.adversarial < t.min_adversarial:
        failed.append(f"adversarial {candidate.adversarial:.2f} < {t.min_adversarial:.2f}")
    if candidate.general_retention < t.min_general_retention:
        failed.append(f"general retention {candidate.general_retention:.2f} < {t.min_general_retention:.2f}")
    if candidate.identity_leak is not None and candidate.identity_leak > t.max_identity_leak:
        failed.append(f"{candidate.identity_leak:.0%} of general answers state the identity "
                      f"(at most {t.max_identity_leak:.0%})")
    if champion is not None:
        if candidate.general < champion.general:
            failed.append(f"general {candidate.general:.2f} < champion's {champion.general:.2f}")
        elif not (candidate.identity > champion.identity
                  or (candidate.identity == champion.identity and candidate.general > champion.general)):
            failed.append(f"does not beat the champion (identity {candidate.identity:.2f} vs {champion.identity:.2f}, "
                          f"general {candidate.general:.2f} vs {champion.general:.2f})")
    if failed:
        return Decision(False, tuple(failed))
    why = "no champion yet" if champion is None else (
        f"beats the champion (identity {candidate.identity:.2f} vs {champion.identity:.2f}, "
        f"general {candidate.general:.2f} vs {champion.general:.2f})")
    return Decision(True, ("meets every threshold", why))
