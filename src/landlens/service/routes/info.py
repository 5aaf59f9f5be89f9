"""Service information and classification: health, classes, classifying an upload."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from landlens.service.common import ServiceError, Timer
from landlens.service.state import SearchService, get_service

Service = Annotated[SearchService, Depends(get_service)]

router = APIRouter()


@router.get("/api/health", tags=["service"])
async def health(service: Service) -> dict[str, Any]:
    """Liveness and a summary: image count, backbone, classifier, generation, writes."""
    await run_in_threadpool(service.refresh)
    a = service.archive
    return {"status": "ok", "images": len(a), "backbone": a.backbone_name,
            "classifier": service.predictor is not None, "generation": a.generation,
            "writable": service.token is not None, "rerank": a.rerank_info(), "forward": service.forward,
            "text": a.text_info() is not None}


@router.get("/api/classes", tags=["archive"])
async def classes(service: Service) -> dict[str, Any]:
    """Classes of the archive with image counts, and the classifier's classes (or null)."""
    await run_in_threadpool(service.refresh)
    counts = service.class_counts()
    return {"classes": [{"name": n, "count": int(c)} for n, c in counts.items()],
            "classifier_classes": list(service.predictor.classes) if service.predictor is not None else None}


@router.post("/api/classify", tags=["classify"])
async def classify_upload(
    service: Service,
    file: Annotated[UploadFile, File(description="image to classify")],
    top_k: Annotated[int, Form(ge=1, le=1000, description="number of classes returned")] = 5,
) -> JSONResponse:
    """Classify an uploaded image with the loaded classifier (404 when there is none)."""
    if service.predictor is None:
        raise ServiceError(404, "no classifier loaded: start the server with --run RUN_DIR")
    timer = Timer()
    k = min(int(top_k), len(service.predictor.classes))
    result = await service.on_upload(file, timer, lambda image: service.classify(image, k), "classify")
    timing = timer.finish()
    return JSONResponse({**result, "timing_ms": timing}, headers={"Server-Timing": Timer.header(timing)})


__all__ = ["router"]
