# shellcheck shell=bash
# Shared install step, sourced by scripts/up and scripts/test (not run on its own).
# Idempotent: each step checks first, so a second run costs well under a second.
#   - memcached from apt when it is not on PATH
#   - .venv in the repo root (python3 -m venv), with python3-venv from apt if venv is unusable
#   - pip install -e '.[test]' only when pyproject.toml changed since the last install
# After sourcing: REPO_ROOT is set and the current directory is the repo root.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

_mcb_say() { printf '[mcbroker] %s\n' "$*" >&2; }

# Root needs no sudo; a developer account does. Without either we cannot install, so say why.
_mcb_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _mcb_say "need root or sudo to run: $*"
        return 1
    fi
}

_mcb_apt_updated=0
_mcb_apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        _mcb_say "apt-get not found; install these by hand: $*"
        return 1
    fi
    if [ "$_mcb_apt_updated" -eq 0 ]; then
        # Package lists on fresh images are often empty or stale.
        _mcb_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        _mcb_apt_updated=1
    fi
    _mcb_say "apt-get install $*"
    _mcb_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

_mcb_ensure_memcached() {
    command -v memcached >/dev/null 2>&1 && return 0
    _mcb_apt_install memcached
    command -v memcached >/dev/null 2>&1 || { _mcb_say "memcached still not on PATH after install"; return 1; }
}

# Test-only: tests/service/test_service_deploy.py runs `systemd-analyze verify` on the unit file.
_mcb_ensure_systemd_analyze() {
    command -v systemd-analyze >/dev/null 2>&1 && return 0
    _mcb_apt_install systemd
}

_mcb_ensure_venv() {
    [ -x "$REPO_ROOT/.venv/bin/python" ] && return 0
    local py="${PYTHON:-python3}"
    # Debian splits ensurepip out of the interpreter; venv creation then fails half way.
    if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        _mcb_apt_install python3-venv
    fi
    _mcb_say "creating .venv with $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    rm -rf "$REPO_ROOT/.venv"
    "$py" -m venv "$REPO_ROOT/.venv"
}

_mcb_ensure_deps() {
    local stamp="$REPO_ROOT/.venv/.mcbroker-install-stamp"
    local want
    want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    _mcb_say "installing mcbroker and test dependencies into .venv"
    "$REPO_ROOT/.venv/bin/python" -m pip install -qq -e "$REPO_ROOT[test]"
    # Written last, so an interrupted install is retried next time.
    printf '%s\n' "$want" >"$stamp"
}

_mcb_ensure_memcached
_mcb_ensure_venv
_mcb_ensure_deps
