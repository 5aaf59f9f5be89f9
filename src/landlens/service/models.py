"""Request bodies of the service (pydantic models)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_FEEDBACK_IDS = 200
"""Most ids one feedback request may mark (relevant and not relevant together)."""

QUERY_TOKEN_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
"""What a ``query_token`` looks like (``secrets.token_urlsafe`` output)."""


class FeedbackQuery(BaseModel):
    """The query being refined: an indexed image (``id``) or an upload (``vector_token``)."""

    model_config = ConfigDict(extra="forbid")
    id: int | None = Field(None, ge=0, description="id of an indexed image")
    vector_token: str | None = Field(None, pattern=QUERY_TOKEN_PATTERN,
                                     description="query_token of an upload search (POST /api/search)")


class FeedbackWeights(BaseModel):
    """Rocchio weights: q' = a q + b mean(relevant) - c mean(not relevant)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    a: float = Field(1.0, ge=0, le=100)
    b: float = Field(0.75, ge=0, le=100)
    c: float = Field(0.15, ge=0, le=100)


class MarkedSearch(BaseModel):
    """What every search body that takes relevance feedback has: the marks, k, the class filter
    and the Rocchio weights."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    relevant: list[int] = Field(default_factory=list, max_length=MAX_FEEDBACK_IDS, description="ids marked relevant")
    irrelevant: list[int] = Field(default_factory=list, max_length=MAX_FEEDBACK_IDS,
                                  description="ids marked not relevant")
    k: int = Field(12, ge=1, description="number of results")
    class_name: str | None = Field(None, alias="class", description="only images of this class")
    weights: FeedbackWeights | None = None


class FeedbackRequest(MarkedSearch):
    """Body of ``POST /api/search/feedback``."""

    query: FeedbackQuery


MAX_TEXT_CHARS = 1000
"""Longest sentence a text query may be (characters)."""


class TextSearchRequest(MarkedSearch):
    """Body of ``POST /api/search/text``: a sentence, optionally with an image (an indexed id or
    an upload's ``vector_token``), optionally refined by relevance feedback."""

    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="the sentence, e.g. 'harbor with many boats'")
    image: FeedbackQuery | None = Field(None, description="an image to combine with the sentence")
    image_weight: float = Field(0.5, ge=0, le=1, description="the image's share of a text + image query")


__all__ = ["MAX_FEEDBACK_IDS", "MAX_TEXT_CHARS", "QUERY_TOKEN_PATTERN", "FeedbackQuery", "FeedbackRequest",
           "FeedbackWeights", "MarkedSearch", "TextSearchRequest"]
