"""The landlens search service: a FastAPI app over a persistent archive (see :mod:`landlens.service.app`)."""

from landlens.service.app import create_app

__all__ = ["create_app"]
