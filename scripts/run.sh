#!/usr/bin/env bash
# Start Redis, the local Asterisk, Kannel with its fake SMSC, the dev mail sink and ivr-bridge on the embedded
# defaults (called by `make run`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
source scripts/services.sh
BIN=.venv/bin/ivr-bridge
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

step "Starting Redis on 127.0.0.1:6379"
start_redis 6379 "$ROOT/var/redis"
step "Starting Asterisk (instance dev)"
$BIN asterisk start
step "Starting Kannel with its fake SMSC (SMS sent by calls land in var/kannel/dev/fakesmsc.log)"
$BIN kannel start
step "Starting the dev mail sink on 127.0.0.1:8025 (mails land in var/dev-mail/)"
mkdir -p var
$BIN dev-mail >>var/dev-mail.log 2>&1 &
MAIL_PID=$!
trap 'kill $MAIL_PID 2>/dev/null || true' EXIT
$BIN db upgrade

cat <<MSG

ivr-bridge is starting. In another terminal:
  .venv/bin/ivr-bridge call 100                    # call the hotline in English (101: Chinese, 102: choose)
  .venv/bin/ivr-bridge call 100 --digits 2,2       # orders > returns: the link to the answer arrives by SMS
  .venv/bin/ivr-bridge kannel received             # the SMS the fake SMSC got
  .venv/bin/ivr-bridge outbox list                 # follow-ups (SMS, email) and their states
  .venv/bin/ivr-bridge interactions                # the calls stored, with the path each took
  .venv/bin/ivr-bridge report deflection           # links sent, opened, and callers who did not call back
  .venv/bin/ivr-bridge flows check                 # lint the flows and the FAQ catalogue in flows/
Self-service pages: http://127.0.0.1:8080/help   What the SMS and mail sinks got: http://127.0.0.1:8080/dev/outbox
A SIP softphone can register as user 'softphone' on 127.0.0.1:5060 (password: var/secrets.yaml).
Stop with Ctrl-C (Asterisk and Kannel keep running; stop them with: $BIN asterisk stop; $BIN kannel stop).

MSG
$BIN run
