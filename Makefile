# The two commands of the README: `make demo` and `make test`. Both run the set-up first.
.PHONY: setup demo test test-fast clean-cache

setup:
	@bash ops/setup.sh

demo: setup
	.venv/bin/liber demo

test: setup
	.venv/bin/python -m pytest

# Without the set-up step, for a developer's inner loop.
test-fast:
	.venv/bin/python -m pytest -x -q

clean-cache:
	rm -rf "$${LIBER_HOME:-$$HOME/.cache/liber-stream}"
