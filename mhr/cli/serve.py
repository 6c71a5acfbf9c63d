"""`mhr serve RUN`: the run behind an HTTP API and a page."""

from __future__ import annotations

import typer

from mhr.cli.common import context, run_name


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        ctx: typer.Context,
        run: str = typer.Argument(..., help="Run name or run:<name>."),
        host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; "
                                 "there is no authentication)."),
        port: int = typer.Option(8000, help="TCP port."),
        fusion: str = typer.Option("max", help="Any `mhr recommend` fusion: max, avg, learned, invvar, router."),
        max_batch: int = typer.Option(64, help="Most concurrent requests ranked in one scoring call."),
        wait_ms: float = typer.Option(2.0, help="How long a lone request waits for others to share its call."),
    ) -> None:
        """Serve recommendations over HTTP: a page at /, JSON at /recommend, /users/ID, /items/ID, /health,
        and the OpenAPI docs at /docs. Ranks as `mhr recommend` does.

        Example: mhr serve quickstart-both-s0 --port 8000

        Example: curl 'http://127.0.0.1:8000/recommend?user=1&k=5'
        """
        from mhr.serve.server import serve

        serve(context(ctx).dataset(), run_name(run), host, port, fusion, max_batch, wait_ms)
