#!/usr/bin/env bash
# Creates the virtualenv and installs edgeloop with every extra. Idempotent.
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}

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
if [ ! -x "$venv/bin/uv" ]; then
    # uv resolves and installs the large trainer stack (torch) in seconds from its cache.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check uv
fi
echo "==> installing edgeloop[all] into $venv (torch is large the first time)"
"$venv/bin/uv" pip install --quiet --python "$venv/bin/python" -e '.[all]'
