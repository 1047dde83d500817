"""Response bodies, as pydantic models so that /docs shows them (STYLE.md §4)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Tag(BaseModel):
    index: int = Field(description="class index in the model's logits")
    id: str = Field(description="label id, e.g. an AudioSet MID such as /m/09x0r")
    name: str = Field(description="display name")
    score: float = Field(description="sigmoid of the logit; for a clip, the max over its windows")


class WindowTags(BaseModel):
    start_s: float
    end_s: float
    tags: list[Tag]


class EventOut(BaseModel):
    index: int
    id: str
    name: str
    onset_s: float = Field(description="start of the event in the clip, seconds")
    offset_s: float = Field(description="end of the event in the clip, seconds")
    peak_score: float = Field(description="highest score of the windows overlapping the event")


class PredictResult(BaseModel):
    filename: str
    duration_s: float
    num_windows: int
    tags: list[Tag]
    timeline: list[WindowTags] | None = Field(None, description="per-window tags, with ?timeline=true")
    events: list[EventOut] | None = Field(None, description="sound events with times, with ?events=true")


class PredictResponse(BaseModel):
    model: str
    results: list[PredictResult]


class EmbedResult(BaseModel):
    filename: str
    duration_s: float
    num_windows: int
    pooling: Literal["cls", "mean", "time", "frame", "all"]
    dim: int
    embedding: list[float] | list[list[float]] = Field(
        description="[D] for cls/mean (averaged over windows); [T, D] for time, one row per time_step_s; "
        "[N, D] for frame (patch tokens, time-major, freq_patches per time step); [1+N, D] for all (CLS first)"
    )
    time_step_s: float | None = Field(None, description="seconds per time step for pooling=time/frame/all")


class EmbedResponse(BaseModel):
    model: str
    results: list[EmbedResult]


class LabelOut(BaseModel):
    index: int
    id: str
    name: str


class LabelsResponse(BaseModel):
    model: str
    num_classes: int
    labels: list[LabelOut]


class ModelResponse(BaseModel):
    model_name: str
    format_version: str
    provider: str
    precision: str
    sample_rate: int
    window_samples: int
    window_s: float
    hop_s: float
    target_frames: int
    embedding_dim: int
    num_classes: int
    has_classifier: bool
    time_patches: int
    freq_patches: int
    source_sha256: str
    max_batch: int
    batch_buckets: list[int]
    max_delay_ms: float
    queue_size: int
    max_concurrent_requests: int
    max_upload_bytes: int
    max_duration_s: float
    request_timeout_s: float


class Health(BaseModel):
    status: Literal["ok", "starting", "draining", "failed"]


class ErrorBody(BaseModel):
    error: str = Field(description="what went wrong, for people")
    error_type: str = Field(description="stable machine-readable kind, e.g. invalid_audio, overloaded")
