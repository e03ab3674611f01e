"""Plugins (seed 000 §7): pluggy hooks the engine calls as sandboxes live and work.

A plugin is any module or object with functions marked ``@hookimpl`` whose names match
the specs in :class:`AivaSpecs`. Third-party plugins are found through the
``aiva.plugins`` entry-point group; aiva's own (:mod:`aiva.plugins.builtin`) use the same
hooks. The engine only ever calls :func:`call_hook`, which runs each implementation on its
own, so one failing plugin is logged and never breaks the engine or the other plugins.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from typing import Any

import pluggy

from aiva.plugins import builtin
from aiva.plugins.hookspecs import PROJECT, AivaSpecs

ENTRY_POINT_GROUP = "aiva.plugins"

log = logging.getLogger("aiva.plugins")


_pm: pluggy.PluginManager | None = None
_pm_lock = threading.Lock()


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, made on first use so importing aiva stays cheap."""
    global _pm
    with _pm_lock:
        if _pm is None:
            _pm = _make_manager()
        return _pm


def reset_plugin_manager() -> None:
    """Forget the manager; the next call loads plugins again (tests, a daemon reload)."""
    global _pm
    with _pm_lock:
        _pm = None


def _make_manager() -> pluggy.PluginManager:

    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(AivaSpecs)
    for name, plugin in builtin.PLUGINS.items():
        pm.register(plugin, name=name)
    _load_entry_points(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # e.g. a typo: on_vm_strat
        log.warning("plugin %s has a hook aiva does not know: %s", exc.plugin, exc)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Load each ``aiva.plugins`` entry point on its own: a broken one is logged, skipped."""
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for name in sorted(names):
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except Exception:
            log.exception("cannot load aiva plugin %r; it is skipped", name)


def call_hook(name: str, **kwargs: Any) -> list[Any]:
    """Call hook ``name`` on every plugin; a plugin that raises is logged and skipped.

    pluggy stops at the first exception, so each implementation is called here on its
    own, in pluggy's order (tryfirst first, last registered first). Wrappers are not
    supported on these notification hooks and are skipped. Returns the non-None results.
    """
    pm = get_plugin_manager()
    caller: pluggy.HookCaller | None = getattr(pm.hook, name, None)
    if caller is None or caller.spec is None:
        raise ValueError(f"no aiva hook named {name!r}")
    missing = [a for a in caller.spec.argnames if a not in kwargs]
    if missing:  # the caller's bug, not a plugin's: fail loudly
        raise TypeError(f"hook {name} needs {', '.join(missing)}")
    results: list[Any] = []
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            log.warning("plugin %s: wrappers are not supported on %s", impl.plugin_name, name)
            continue
        args = [kwargs[a] for a in impl.argnames]
        extra = {a: kwargs[a] for a in impl.kwargnames if a in kwargs}
        try:
            res = impl.function(*args, **extra)
        except Exception:
            log.exception("plugin %s failed in %s", impl.plugin_name, name)
            continue
        if res is not None:
            results.append(res)
    return results


def list_plugins() -> list[dict[str, Any]]:
    """Each plugin: its name, the hooks it implements, where it comes from (``aiva plugins``)."""
    pm = get_plugin_manager()
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda np: str(np[0])):
        if plugin is None:  # blocked
            continue
        dist = dists.get(id(plugin))
        out.append({
            "name": name,
            "hooks": sorted(c.name for c in pm.get_hookcallers(plugin) or []),
            "version": dist.version if dist is not None else None,
            "distribution": dist.project_name if dist is not None else None,
            "builtin": name in builtin.PLUGINS,
        })
    return out
