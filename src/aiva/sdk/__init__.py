"""The Python SDK: ``Sandbox``, ``AsyncSandbox`` and the controller facade."""

from aiva.sdk.async_sandbox import AsyncSandbox
from aiva.sdk.sandbox import Sandbox

__all__ = ["AsyncSandbox", "Sandbox"]
