"""``aiva dashboard [--open]``: the URL of the dashboard the daemon serves on TCP.

The token goes in the URL's fragment (``/ui/#token=...``): browsers never send a fragment
to the server, and the page moves it to the tab's sessionStorage at once.
"""

from __future__ import annotations

from typing import Annotated

import typer

from aiva.errors import AivaError

START_HINT = "start it with a port: `aiva daemon start --port N`"


def dashboard_url() -> str:
    """``http://127.0.0.1:PORT/ui/#token=...`` of the running daemon, or an AivaError
    with a hint when no daemon listens on TCP."""
    from urllib.parse import quote

    from aiva.daemon import control, wire

    info = control.status()
    if not info["running"]:
        raise AivaError("no aiva daemon is running", hint=START_HINT)
    port = info.get("port")
    if not port:
        raise AivaError(
            f"the aiva daemon (pid {info['pid']}) listens on its Unix socket only; the "
            "dashboard needs a TCP port",
            hint="restart it with a port: `aiva daemon stop && aiva daemon start --port N`")
    token = wire.read_token()
    if token is None:
        raise AivaError(f"no daemon token in {wire.token_path()}",
                        hint="restart the daemon: `aiva daemon stop && aiva daemon start "
                             f"--port {port}`")
    return f"http://127.0.0.1:{port}/ui/#token={quote(token, safe='')}"


def dashboard(
    open_: Annotated[bool, typer.Option(
        "--open", help="also open it in the default web browser")] = False,
) -> None:
    """Print the dashboard's URL (the token rides in the #fragment, never sent to a
    server); needs a daemon started with --port."""
    url = dashboard_url()
    print(url)
    if open_:
        import webbrowser

        if not webbrowser.open(url, new=2):  # the URL is printed: not a failure (as vnc)
            from aiva.cli.output import err_console

            err_console.print("no web browser could be opened here; open the URL above in "
                              "a browser on this machine", highlight=False)
