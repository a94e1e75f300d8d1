#!/usr/bin/env bash
# Idempotent project setup; run from anywhere: `bash scripts/setup.sh`.
#  - creates .venv (python3 -m venv) if missing
#  - installs the pinned torch/torchvision FIRST (an unpinned torch resolves to a huge CUDA build;
#    these two pinned versions lie on this machine's disk)
#  - installs the project editable with its dev extras
#  - installs Debian's chromium (for tests/test_widget_browser.py) when it is missing and apt-get is available
# A second run is fast: the torch step is skipped when the pinned versions import, and the
# editable install is skipped while .venv/.dino-setup-stamp names this checkout and is newer than
# settings.ini, setup.py and pyproject.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.dino-setup-stamp"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# quiet pip; drop only the machine-config notice "Location 'file:///...' is ignored", keep every other message
pipq() {
    "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2 || true)
}

if [ ! -x "$PY" ]; then
    echo "setup: creating $VENV" >&2
    python3 -m venv "$VENV"
    rm -f "$STAMP"
fi

# the 'import' check also catches a torchvision that does not load beside the installed torch
have=$("$PY" -c "import torch, torchvision; print(torch.__version__.split('+')[0], torchvision.__version__.split('+')[0])" 2>/dev/null || true)
if [ "$have" != "$TORCH_VERSION $TORCHVISION_VERSION" ]; then
    echo "setup: installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (found: '${have:-none}')" >&2
    pipq --upgrade pip
    pipq "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    rm -f "$STAMP"
fi

# the stamp records which checkout the editable install points at
stale=0
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$PWD" ]; then stale=1
else
    for f in settings.ini setup.py pyproject.toml; do
        if [ -e "$f" ] && [ "$f" -nt "$STAMP" ]; then stale=1; fi
    done
fi
if [ "$stale" = 1 ]; then
    echo "setup: pip install -e .[dev]" >&2
    # keep the pinned torch/torchvision whatever the requirements resolve to
    # (PYTHONWARNINGS silences setuptools' multi-line "Editable installation" notice; errors still show)
    PYTHONWARNINGS=ignore pipq -e ".[dev]" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    printf '%s' "$PWD" > "$STAMP"
fi

# a headless browser for tests/test_widget_browser.py: Debian's chromium, driven by the pip `playwright`
# (no `playwright install`). Best effort: without apt-get (or root / passwordless sudo) the browser test skips.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
    echo "setup: installing chromium with apt-get (for the browser widget test)" >&2
    apt_install() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }
    if ! apt_install && ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 && apt_install; }; then
        echo "setup: could not install chromium; tests/test_widget_browser.py will be skipped" >&2
    fi
fi
