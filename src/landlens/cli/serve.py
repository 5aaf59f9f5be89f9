"""``landlens serve``: run the search service and web page over an archive.

:data:`serve_cmd` is registered at the top level of ``landlens`` (see :mod:`landlens.cli.main`).
The app is built by :func:`landlens.service.app.create_app`, which loads the archive, its
backbone and the optional classifier before the server starts, so a bad archive or run
directory is one line and exit status 2, not a server that fails on its first request.

The server listens on 127.0.0.1 (this machine only) unless ``--host`` says otherwise; writes
(adding and removing images) need a token from ``--token-file`` or ``$LANDLENS_TOKEN`` and are
refused without one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from landlens.cli.common import OneLineErrorCommand, plain_rerank
from landlens.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
TOKEN_ENV = "LANDLENS_TOKEN"


def read_token(token_file: Path | None, environ: dict[str, str] | None = None) -> str | None:
    """The write token: the stripped contents of ``token_file``, else ``$LANDLENS_TOKEN``, else ``None``.

    Raises:
        ConfigError: the token file cannot be read or is empty.
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the token file {token_file}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        if not token:
            raise ConfigError(f"the token file {token_file} is empty")
        return token
    token = (env.get(TOKEN_ENV) or "").strip()
    return token or None


def serve_config(app: Any, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info") -> Any:
    """The ``uvicorn.Config`` the command runs: one process (the model is loaded once), no proxy
    headers trusted, no ``Server`` header."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=int(port), log_level=log_level, workers=1, proxy_headers=False,
                          server_header=False, timeout_keep_alive=5)


def run_server(config: Any) -> None:
    """Run a uvicorn server with ``config`` until it is stopped (Ctrl-C)."""
    import uvicorn

    uvicorn.Server(config).run()


def server_url(host: str, port: int) -> str:
    """The address to open in a browser (``0.0.0.0`` / ``::`` shown as localhost)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


WILDCARD_HOSTS = ("0.0.0.0", "::", "")
"""``--host`` values that bind every interface (no single name to accept)."""


def host_names(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The ``Host`` names the server accepts: localhost, 127.0.0.1, ::1 ([::1]), the address it
    binds (unless that is every interface) and ``extra`` (``--allowed-host``), without repeats."""
    from landlens.service.app import DEFAULT_ALLOWED_HOSTS

    names = list(DEFAULT_ALLOWED_HOSTS)
    if host not in WILDCARD_HOSTS:
        names.append(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    names.extend(extra)
    return list(dict.fromkeys(n.strip().lower() for n in names if n.strip()))


@click.command("serve", cls=OneLineErrorCommand)
@click.argument("archive_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="address to listen on (0.0.0.0: every interface; only behind a firewall or proxy)")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="run directory of a trained classifier (`landlens train run`): enables classification")
@click.option("--token-file", type=click.Path(path_type=Path), default=None,
              help=f"file holding the write token (else ${TOKEN_ENV}); without a token writes are refused")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="host name clients may reach the server by, besides localhost, 127.0.0.1, ::1 and --host "
                   "(repeatable; '*.example.org' patterns; '*' accepts any Host header)")
@click.option("--read-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds a request body may pause between chunks before the request is refused (408; 0: no limit)")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds a whole request body may take to arrive (408 past it; 0: no limit)")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="origin allowed to call the API from another site's page (repeatable); none by default")
@click.option("--max-upload-mb", default=20.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="largest upload in MiB")
@click.option("--max-pixels", default=50_000_000, show_default=True, type=click.IntRange(min=1),
              help="largest upload width x height, checked before decoding")
@click.option("--max-k", default=100, show_default=True, type=click.IntRange(min=1),
              help="most results a search may ask for")
@click.option("--query-cache", default=256, show_default=True, type=click.IntRange(min=0),
              help="uploaded query vectors kept for relevance feedback (0: no feedback on uploads)")
@click.option("--rerank", default=None, metavar="SPEC",
              help="re-rank every search without labels (aqe, diffusion, aqe+diffusion, kreciprocal, ...; see "
                   "`landlens retrieval evaluate --help`), fitted on the archive at start-up and after each update "
                   "[default: the archive's own, set by `index build --rerank`]")
@click.option("--plain", is_flag=True, help="no re-ranking (same as --rerank none)")
@click.option("--optimize", type=click.Choice(["jit", "compile", "none"]), default="jit", show_default=True,
              help="the backbone's forward pass: traced and frozen once at start-up, torch.compile, or eager")
@click.option("--decode-budget-mb", default=1024.0, show_default=True, type=click.FloatRange(min=1),
              help="MiB that concurrent image decodes (uploads, thumbnails) may hold together, estimated from "
                   "each header; requests past it wait, and an upload that alone needs more is refused (413)")
@click.option("--thumbnail-decodes", default=None, type=click.IntRange(min=1),
              help="thumbnail images decoded at a time (default: one per CPU)")
@click.option("--workers-threads", default=None, type=click.IntRange(min=1),
              help="threads for decoding, search and thumbnails (default 40)")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
def serve_cmd(archive_dir: Path, host: str, port: int, run_dir: Path | None, token_file: Path | None,
              allowed_hosts: Sequence[str], read_timeout: float, body_timeout: float, cors_origins: Sequence[str], max_upload_mb: float, max_pixels: int, max_k: int,
              query_cache: int, rerank: str | None, plain: bool, optimize: str, decode_budget_mb: float,
              thumbnail_decodes: int | None, workers_threads: int | None, log_level: str) -> None:
    """Serve the search API and web page over the archive DIR (`landlens index build`).

    Open the printed address in a browser: drop an image to find the most similar archive
    images (and its predicted classes with --run). The API is documented at /docs.
    """
    from landlens.service.app import create_app

    rerank = plain_rerank(plain, rerank, "serves")
    token = read_token(token_file)
    app = create_app(archive_dir, classifier_run=run_dir, token=token,
                     max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
                     cors_origins=tuple(cors_origins), max_k=max_k, threads=workers_threads,
                     query_cache=query_cache, rerank=rerank, optimize=optimize,
                     decode_budget_bytes=int(decode_budget_mb * 1024 * 1024), thumbnail_decodes=thumbnail_decodes,
                     allowed_hosts=host_names(host, allowed_hosts), read_timeout=read_timeout or None,
                     body_timeout=body_timeout or None)
    service = app.state.service
    config = serve_config(app, host=host, port=port, log_level=log_level)
    click.echo(f"landlens: serving {archive_dir} ({len(service.archive)} images, {service.archive.backbone_name}"
               + (f", classifier {run_dir}" if run_dir is not None else "")
               + (f", re-ranked by {service.archive.rerank}" if service.archive.rerank else "") + ")")
    click.echo(f"landlens: writes {'enabled (token)' if token else 'disabled (no token)'}"
               + (f"; CORS origins: {', '.join(cors_origins)}" if cors_origins else ""))
    hosts = host_names(host, allowed_hosts)
    click.echo("landlens: Host names accepted: " + ("any" if "*" in hosts else ", ".join(hosts))
               + (" (add this machine's name with --allowed-host)" if host in WILDCARD_HOSTS and "*" not in hosts
                  else ""))
    click.echo(f"landlens: open {server_url(host, port)}")
    try:
        run_server(config)
    finally:
        service.close()


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "TOKEN_ENV", "WILDCARD_HOSTS", "host_names", "read_token", "run_server", "serve_cmd", "serve_config",
           "server_url"]
