"""Integration fixtures: the headless browser (``chromium``, ``page``) from browser.py."""

from browser import chromium, page

__all__ = ["chromium", "page"]
