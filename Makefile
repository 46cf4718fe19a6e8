# The two commands: `make run` (set up, start Asterisk, Redis and ivr-bridge) and `make test` (set up, run the suite).
SHELL := /bin/bash
VENV ?= .venv

.PHONY: run test setup setup-test lint call

setup:
	@scripts/setup.sh run

setup-test:
	@scripts/setup.sh test

run: setup
	@scripts/run.sh

test: setup-test
	@scripts/test.sh

lint:
	@$(VENV)/bin/ruff check . && $(VENV)/bin/mypy

call:
	@$(VENV)/bin/ivr-bridge call 100
