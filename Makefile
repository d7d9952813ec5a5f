.PHONY: check lint test test-unit bench

# lint + type check + the whole test suite (unit and integration, as CI runs it)
check: lint test

lint:
	ruff check serving feedback retrain deploy tests bench
	ruff format --check serving feedback retrain deploy tests bench
	mypy

test:
	python -m pytest -q -p no:cacheprovider --durations=15

test-unit:
	python -m pytest -q -m "not integration and not slow"

bench:
	python bench/serving.py
