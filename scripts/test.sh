#!/usr/bin/env bash
# Installs what the tests need, then runs lint, types and the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
say "ruff"
ruff check src tests bench
say "mypy"
mypy
say "pytest"
pytest -q "$@"
