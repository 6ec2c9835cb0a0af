# Thin wrappers; tools/dev.sh does the real work (installs, builds, runs).
.PHONY: build debug sanitize test demo bench clean
build:
	python3 setup.py -q build_ext --inplace
debug:
	MTA_DEBUG=1 python3 setup.py -q build_ext --inplace --force
sanitize:
	MTA_SANITIZE=1 python3 setup.py -q build_ext --inplace --force
test: build
	python3 -m pytest -q tests
demo: build
	python3 -m mta demo
bench: build
	python3 bench/accept_bench.py
clean:
	rm -rf build mta/_native/*.so native/*/*.c.html
	find native -name '*.pyx' | sed 's/\.pyx$$/.c/' | xargs rm -f
