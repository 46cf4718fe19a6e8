#!/usr/bin/env bash
# Set up everything ivr-bridge needs on Debian 12, idempotently: apt packages, a cached Asterisk 22 root
# (Debian sid chroot, see shared/PLATFORM.md), the virtualenv with the project, secrets, prompts.
# Fast when everything is already there. Usage: scripts/setup.sh [--test]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AST_ROOT=${IVR_ASTERISK_ROOT:-/var/cache/ivr-bridge/asterisk-root}
VENV=${IVR_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
MODE=${1:-run}
export DEBIAN_FRONTEND=noninteractive

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }
t0=$(date +%s)

if [ "$(id -u)" != 0 ]; then
  echo "setup needs root (it installs apt packages and an Asterisk root)" >&2
  exit 1
fi

# ---------------------------------------------------------------- apt packages
APT_PKGS=(debootstrap redis-server espeak-ng libespeak-ng1 sox sip-tester ca-certificates kannel kannel-extras)
if [ "$MODE" = test ]; then
  APT_PKGS+=(postgresql chromium fonts-wqy-microhei)
fi
missing=()
for pkg in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "Installing apt packages: ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  step "apt packages present"
fi

# ---------------------------------------------------------------- Asterisk root
if [ -x "$AST_ROOT/usr/sbin/asterisk" ] && [ -f "$AST_ROOT/.ivr-bridge-ready" ]; then
  step "Asterisk root present at $AST_ROOT"
else
  step "Building the Asterisk 22 root at $AST_ROOT (Debian sid chroot, about a minute, cached afterwards)"
  MIRROR=${IVR_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
  MIRROR=${MIRROR:-$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  tmp="$AST_ROOT.tmp"
  rm -rf "$tmp"
  mkdir -p "$(dirname "$AST_ROOT")"
  note "debootstrap sid from $MIRROR"
  debootstrap --variant=minbase sid "$tmp" "$MIRROR" >"$tmp.log" 2>&1 || { tail -n 20 "$tmp.log"; exit 1; }
  note "apt-get install asterisk asterisk-modules (inside the root)"
  chroot "$tmp" apt-get -q -o Acquire::Check-Valid-Until=false update >>"$tmp.log" 2>&1
  chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get -q -o Acquire::Check-Valid-Until=false install -y \
    --no-install-recommends asterisk asterisk-modules >>"$tmp.log" 2>&1 || { tail -n 20 "$tmp.log"; exit 1; }
  chroot "$tmp" apt-get clean
  touch "$tmp/.ivr-bridge-ready"
  rm -rf "$AST_ROOT"
  mv "$tmp" "$AST_ROOT"
  rm -f "$tmp.log"
  note "$(chroot "$AST_ROOT" asterisk -V)"
fi

# ---------------------------------------------------------------- virtualenv
stamp="$VENV/.ivr-bridge-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)-$MODE"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/ivr-bridge" ]; then
  step "virtualenv up to date ($VENV)"
else
  step "Installing the project into $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  target="$ROOT"
  [ "$MODE" = test ] && target="$ROOT[dev]"
  pip_log="$VENV/pip-install.log"
  if ! { "$VENV/bin/pip" install -q --upgrade pip && "$VENV/bin/pip" install -q -e "$target"; } >"$pip_log" 2>&1; then
    tail -n 30 "$pip_log"
    echo "pip install failed (full log: $pip_log)" >&2
    exit 1
  fi
  echo "$want" >"$stamp"
fi

# ---------------------------------------------------------------- secrets and prompts
step "Secrets (var/secrets.yaml, mode 0600) and prompts"
"$VENV/bin/ivr-bridge" setup-secrets
"$VENV/bin/ivr-bridge" prompts build

step "Set-up done in $(( $(date +%s) - t0 )) s"
