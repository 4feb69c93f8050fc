#!/usr/bin/env bash
# Creates the virtualenv and installs edgeloop with every extra at exactly the versions in
# uv.lock (docs/architecture.md, "Reproducible installs"). Idempotent.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
root=$(cd "$(dirname "$0")/.." && pwd)

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "edgeloop needs Python 3.11 or newer; '$python' is $("$python" --version 2>&1)." >&2
    echo "Install it (Debian/Ubuntu: apt-get install python3.11 python3.11-venv) and run" >&2
    echo "  make install PYTHON=python3.11" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating virtualenv $venv"
    "$python" -m venv "$venv"
fi
venv=$(cd "$venv" && pwd)
if [ ! -x "$venv/bin/uv" ]; then
    # uv installs the large trainer stack (torch) in seconds from its cache. 0.13.9 wrote
    # uv.lock; an older uv may not read its format.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'uv>=0.13.9'
fi

cd "$root"
# --locked: a uv.lock that no longer matches pyproject.toml is an error, never a silent
# re-resolve (that would install whatever is newest today, the thing the lock prevents).
if ! "$venv/bin/uv" lock --check --quiet; then
    echo "uv.lock is missing or out of date with pyproject.toml (its dependencies changed)." >&2
    echo "Re-lock, then commit uv.lock with the pyproject.toml change:" >&2
    echo "  $venv/bin/uv lock" >&2
    exit 1
fi
echo "==> installing edgeloop[all] from uv.lock into $venv (torch is large the first time)"
# sync --inexact: every locked package at its locked version, edgeloop itself editable;
# packages the lock does not name (pip, this uv) stay, so $venv/bin/uv keeps working.
UV_PROJECT_ENVIRONMENT="$venv" "$venv/bin/uv" sync --locked --all-extras --inexact --quiet
