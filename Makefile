.PHONY: check lint test test-unit bench

# lint + type check + the whole test suite (unit and integration, as CI runs it)
check: lint test

# ruff (style, C901 complexity), the import contracts in pyproject.toml (layers, no cycles), mypy
lint:
	ruff check core feedback serving retrain deploy tests bench
	ruff format --check core feedback serving retrain deploy tests bench
	lint-imports
	mypy

test:
	python -m pytest -q -p no:cacheprovider --durations=15

test-unit:
	python -m pytest -q -m "not integration and not slow"

bench:
	python bench/serving_load.py
