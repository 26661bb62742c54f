# The two commands of the README: `make demo` and `make test`. Both run the set-up first.
.PHONY: setup demo test test-fast clean-cache

setup:
	@bash ops/setup.sh

demo: setup
	.venv/bin/liber demo

# Two test processes (one per core here), each file's tests in one of them: most tests wait on
# brokers and workers, so the suite takes about 15 minutes instead of 26.
test: setup
	.venv/bin/python -m pytest -n 2 --dist loadfile

# Without the set-up step, for a developer's inner loop.
test-fast:
	.venv/bin/python -m pytest -x -q

clean-cache:
	rm -rf "$${LIBER_HOME:-$$HOME/.cache/liber-stream}"
