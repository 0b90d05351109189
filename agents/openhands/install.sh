#!/usr/bin/env bash
# Installs the Python environment the OpenHands adapter runs in (runtime.kind = "openhands"):
# Python 3.12 and openhands-ai 0.53.0, resolved as of 2025-08-15 with uv, with compiled
# bytecode (a start takes ~3 s instead of ~9 s without it). Idempotent: an environment that
# is already complete is left alone, so it is cheap to run before every test run.
#
#   agents/openhands/install.sh            # → ~/.cache/switchboard/openhands-0.53.0
#   SWITCHBOARD_OPENHANDS_VENV=/opt/oh agents/openhands/install.sh
#
# SWITCHBOARD_OPENHANDS_VENV is also where the server looks (runtime.openhands.venv). uv is
# taken from PATH, or installed once into <cache>/switchboard/uv with pip; Python 3.12 from
# PYTHON312, PATH, or uv. Needs the network (PyPI) the first time; ~1.5 GB of disk.
set -euo pipefail

VERSION=0.53.0
EXCLUDE_NEWER=2025-08-15T00:00:00Z
ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/switchboard"
VENV="${SWITCHBOARD_OPENHANDS_VENV:-$ROOT/openhands-$VERSION}"

# Complete: it imports what the adapter needs (checked once, then remembered in a marker).
complete() {
    [ -x "$1/bin/python" ] || return 1
    [ -f "$1/.switchboard-complete" ] && return 0
    "$1/bin/python" -c "import openhands.agenthub, openhands.controller, openhands.runtime.impl.cli.cli_runtime" \
        >/dev/null 2>&1 || return 1
    echo "openhands-ai==$VERSION --exclude-newer $EXCLUDE_NEWER" >"$1/.switchboard-complete"
}

if complete "$VENV"; then
    echo "OpenHands $VERSION is installed in $VENV"
    exit 0
fi

UV="$(command -v uv || true)"
if [ -z "$UV" ]; then
    UV="$ROOT/uv/bin/uv"
    if [ ! -x "$UV" ]; then
        echo "== installing uv into $ROOT/uv"
        mkdir -p "$ROOT"
        if python3 -m venv "$ROOT/uv" 2>/dev/null; then
            "$ROOT/uv/bin/python" -m pip install --quiet --disable-pip-version-check uv
        else  # no venv module (Debian without python3-venv)
            python3 -m pip install --quiet --disable-pip-version-check --target "$ROOT/uv" uv
        fi
    fi
fi

# Python 3.12: PYTHON312, python3.12 on PATH, a pyenv install, one uv finds, or one uv installs.
# Each candidate must run (a pyenv shim may exist for a version that is not selected).
python312() {
    local c
    for c in "${PYTHON312:-}" "$(command -v python3.12 || true)" \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
        "$("$UV" python find 3.12 2>/dev/null || true)"; do
        [ -n "$c" ] && [ -x "$c" ] || continue
        "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.executable)' 2>/dev/null &&
            return 0
    done
    return 1
}
PYTHON="$(python312 || true)"
if [ -z "$PYTHON" ]; then
    echo "== installing Python 3.12 with uv"
    "$UV" python install 3.12
    PYTHON="$(python312)"
fi

# Built aside and moved into place: an interrupted install never looks complete.
TMP="$VENV.tmp"
rm -rf "$TMP"
echo "== creating $VENV (openhands-ai==$VERSION, packages as of $EXCLUDE_NEWER)"
"$UV" venv --quiet --python "$PYTHON" "$TMP"
VIRTUAL_ENV="$TMP" "$UV" pip install --quiet --python "$TMP/bin/python" \
    --exclude-newer "$EXCLUDE_NEWER" --compile-bytecode "openhands-ai==$VERSION"
complete "$TMP" || { echo "install.sh: the new environment does not import openhands" >&2; exit 1; }
rm -rf "$VENV"
mv "$TMP" "$VENV"
echo "OpenHands $VERSION is installed in $VENV"
