"""Serving the page safely: loopback by default; beyond it only with a password; no public
link unless asked (and then with a password too); the command line's image limits plus an
upload size limit."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from ..errors import UserError, require

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    require(bool(sep and user and password), "--auth must be USER:PASS with both parts non-empty, e.g. --auth ann:s3cret")
    return user, password


def check_exposure(host: str, auth: str | None, share: bool) -> tuple[str, str] | None:
    """The (user, password) to ask for, or None on loopback with no --auth; refuses an open page."""
    credentials = parse_auth(auth)
    if credentials is None and not is_loopback(host):
        raise UserError(f"--host {host} opens the page to other machines: add --auth USER:PASS, "
                        f"or keep the default --host 127.0.0.1")
    if credentials is None and share:
        raise UserError("--share makes a public link: add --auth USER:PASS")
    return credentials


def no_calls_home() -> None:
    """gradio's usage analytics and version check off, before gradio is imported: a local tool."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def serve(*, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None, share: bool = False,
          base: str | None = None, work: str | Path | None = None, max_upload_mb: int = 100,
          compose_model: str = "", device: str = "auto", block: bool = True):
    """Start the page; returns gradio's (app, local url, share url) when `block` is False."""
    import tempfile

    credentials = check_exposure(host, auth, share)
    require(max_upload_mb >= 1, f"--max-upload-mb must be at least 1, got {max_upload_mb}")
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="multiconcept-ui-"))
    work.mkdir(parents=True, exist_ok=True)
    no_calls_home()
    from .app import build

    demo = build(work=work.resolve(), base=base, compose_model=compose_model, device=device)
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, auth=credentials, share=share,
                       max_file_size=max_upload_mb * 1024 * 1024, allowed_paths=[str(work.resolve())],
                       prevent_thread_lock=not block, show_error=False, quiet=False, enable_monitoring=False,
                       mcp_server=False, run_history=False, footer_links=[], inbrowser=False)
