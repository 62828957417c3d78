"""Request and response bodies of ``POST /v1/values``; the per-state schemas are cpl's own."""

from __future__ import annotations

from pydantic import BaseModel, Field

from cpl.protocols import State, ValueResult


class ValuesRequest(BaseModel):
    states: list[State] = Field(min_length=1)


class ValuesResponse(BaseModel):
    values: list[ValueResult] = Field(description="V(s) in [-1, 1] per state, in request order")
    model_version: str = Field(description="the model version that served every state of this batch")
