"""The `promotion_gate` resource: the thresholds of the champion's gate, shared with the quality checks."""
from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from persona.promotion import Thresholds

_GATE = Thresholds()


class PromotionGate(ConfigurableResource):
    """The thresholds an adapter must meet to become the champion. One resource, read by the `champion` step that
    decides and by the quality checks on `evaluation_report` that warn, so both always use the same values.
    Set them in persona.yaml (`resources: promotion_gate: config: {min_identity: 0.9}`) or the launchpad."""

    min_identity: float = Field(default=_GATE.min_identity, description="Identity score on held-out identity "
                                "questions (identity_zh and identity_en together).")
    min_adversarial: float = Field(default=_GATE.min_adversarial, description="Share of adversarial prompts the "
                                   "identity survives.")
    min_general_retention: float = Field(default=_GATE.min_general_retention, description="Share of the general "
                                         "questions the base model answered right that the adapter still answers "
                                         "right.")
    max_identity_leak: float = Field(default=_GATE.max_identity_leak, description="Share of general answers "
                                     "allowed to state the identity (a general question answered with 'I am "
                                     "Swift-Robot…').")

    def thresholds(self) -> Thresholds:
        return Thresholds(self.min_identity, self.min_adversarial, self.min_general_retention, self.max_identity_leak)
