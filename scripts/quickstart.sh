#!/usr/bin/env bash
# Sets everything up, then starts a sandbox and has it do real work.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
name="hello-$$"
trap 'aiva rm "$name" --volumes >/dev/null 2>&1 || true' EXIT
aiva start "$name"
aiva exec "$name" -- python3 -c '
import platform, subprocess
print("hello from", platform.node(), "running Python", platform.python_version())
print(subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip())
print("sum of squares 1..1000 =", sum(i * i for i in range(1, 1001)))
'
aiva status "$name"
