"""landlens: remote-sensing scene retrieval and classification.

The package is organised by capability (see ``DESIGN.md`` in the shared folder):
``data`` (catalog, decoding, splits), ``models`` (backbones and weight sources),
``features`` (extraction and the feature store), ``retrieval`` (metrics, search).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("landlens")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
