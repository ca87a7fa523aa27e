"""Starting the playground: queue limits, launch on a host and port, shut down cleanly."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from dataclasses import dataclass

import gradio as gr

from ui.app import CSS, create_app
from ui.settings import UISettings
from ui.studio import Studio

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


@dataclass
class Server:
    demo: gr.Blocks
    studio: Studio
    url: str

    def close(self) -> None:
        """Cancel running jobs (no half runs are left), then stop the web server."""
        self.studio.shutdown()
        self.demo.close()


def launch(
    settings: UISettings,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = DEFAULT_PORT,
    block: bool = True,
    quiet: bool = False,
) -> Server:
    """Serve the playground at ``http://host:port/`` (its API under ``/gradio_api/``).

    Requests are queued: at most ``limits.concurrency`` of one kind run at once (erasure jobs:
    ``limits.max_running_jobs``), at most ``limits.queue_size`` wait, further ones are refused. With ``block``
    this returns only when the server stops (Ctrl-C), after cancelling running jobs.
    """
    demo, studio = create_app(settings)
    demo.queue(default_concurrency_limit=settings.limits.concurrency, max_size=settings.limits.queue_size)
    _, local_url, _ = demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        quiet=quiet,
        css=CSS,
        footer_links=["api"],
    )
    server = Server(demo=demo, studio=studio, url=local_url)
    if block:
        try:
            demo.block_thread()
        finally:
            studio.shutdown()
    return server
