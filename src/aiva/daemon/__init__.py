"""aiva-daemon: the :class:`~aiva.engine.Engine` served over HTTP on a Unix socket.

One long-lived process owns the agent connections, the command logs and the reconcile
loop, so short CLI runs and many SDK clients share them. ``server`` runs it, ``app`` is
the FastAPI app, ``client`` is :class:`RemoteEngine` (the same methods as ``Engine``),
``wire`` holds what both sides must agree on. Importing this package imports none of
them, so checking for a daemon stays cheap.
"""
