# The two commands of the README: `make demo` and `make test`.
# Each sets up .venv (Python 3.12) on first use and reuses it afterwards.
.PHONY: demo test venv

venv:
	@tools/ensure_venv.sh

demo: venv
	.venv/bin/python -m sere_jax.scripts.demo

test: venv
	.venv/bin/python -m pytest -n auto --maxprocesses=4 tests
