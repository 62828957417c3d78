"""Request and response bodies of ``POST /v1/expand``; the per-state schemas are cpl's own."""

from __future__ import annotations

from pydantic import BaseModel, Field

from cpl.protocols import ExpandRequest, ExpandResult


class ExpandBatchRequest(BaseModel):
    requests: list[ExpandRequest] = Field(min_length=1, description="one entry per state")


class ExpandBatchResponse(BaseModel):
    results: list[ExpandResult] = Field(description="one entry per state, in request order")
    model_version: str = Field(description="the model version that served every state of this batch")
