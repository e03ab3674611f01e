"""Plugins (seed 000 §7): pluggy hooks the engine calls as sandboxes live and work.

``hookspecs`` holds the hooks and the ``hookimpl`` marker, ``manager`` finds plugins
(the ``aiva.plugins`` entry-point group) and calls them, ``builtin`` is aiva's own.
This package's names are what a plugin author imports; see docs/PLUGINS.md.
"""

from aiva.plugins.hookspecs import AivaSpecs, hookimpl, hookspec
from aiva.plugins.manager import (
    ENTRY_POINT_GROUP,
    call_hook,
    get_plugin_manager,
    list_plugins,
    reset_plugin_manager,
)

__all__ = ["ENTRY_POINT_GROUP", "AivaSpecs", "call_hook", "get_plugin_manager", "hookimpl",
           "hookspec", "list_plugins", "reset_plugin_manager"]
