"""``python -m aiva.daemon [--port N]``: run the daemon in the foreground.

``aiva daemon start`` runs this detached; its output goes to ``AIVA_HOME/daemon.log``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from aiva.errors import AivaError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiva.daemon",
                                     description="Serve aiva's engine over HTTP.")
    parser.add_argument("--port", type=int, default=None,
                        help="also listen on 127.0.0.1:PORT (bearer token required)")
    parser.add_argument("--mcp-allow-dir", action="append", default=[], metavar="DIR",
                        help="a host directory the /mcp sync tool may touch (repeatable)")
    args = parser.parse_args(argv)
    # the daemon is the engine: nothing in it may go looking for a daemon (itself)
    os.environ["AIVA_NO_DAEMON"] = "1"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from aiva.daemon.control import serve

    try:
        serve(args.port, mcp_allow_dirs=args.mcp_allow_dir)
    except AivaError as exc:
        logging.getLogger("aiva.daemon").error("%s%s", exc.message,
                                               f" (hint: {exc.hint})" if exc.hint else "")
        sys.exit(1)
    logging.shutdown()
    # a thread stuck in a blocking engine call must not keep a stopped daemon alive
    os._exit(0)


if __name__ == "__main__":
    main()
