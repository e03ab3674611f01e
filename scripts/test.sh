#!/usr/bin/env bash
# Installs what the tests need, then runs lint, types and the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# the dashboard's browser tests drive Debian's Chromium with Playwright (no download)
command -v chromium >/dev/null || { say "installing chromium"; apt_install chromium; }
say "ruff"
ruff check src tests bench
say "mypy"
mypy
say "pytest"
pytest -q "$@"
