# Thin wrappers; tools/dev.sh does the real work (installs, builds, runs).
.PHONY: build debug sanitize test demo bench clean fuzz-build fuzz
build:
	python3 setup.py -q build_ext --inplace
debug:
	MTA_DEBUG=1 python3 setup.py -q build_ext --inplace --force
sanitize:
	MTA_SANITIZE=1 python3 setup.py -q build_ext --inplace --force
test: build
	python3 -m pytest -q tests
# Coverage-guided fuzzing (docs/fuzzing.md): the wire extension built with clang and
# libFuzzer's coverage hooks into build/fuzz/lib (never in place), then every target
# for FUZZ_SECONDS each, one after the other. Findings: build/fuzz/findings/<target>/.
FUZZ_SECONDS ?= 300
fuzz-build:
	MTA_FUZZ=1 python3 setup.py -q build_ext --build-lib build/fuzz/lib --build-temp build/fuzz/temp --force
fuzz: build fuzz-build
	python3 tests/fuzz/run.py smtp_server --native --seconds $(FUZZ_SECONDS)
	python3 tests/fuzz/run.py data_scanner --native --seconds $(FUZZ_SECONDS)
	python3 tests/fuzz/run.py bounce_parser --seconds $(FUZZ_SECONDS)
	python3 tests/fuzz/run.py spool_recovery --seconds $(FUZZ_SECONDS)
demo: build
	python3 -m mta demo
bench: build
	python3 bench/accept_bench.py
clean:
	rm -rf build mta/_native/*.so native/*/*.c.html
	find native -name '*.pyx' | sed 's/\.pyx$$/.c/' | xargs rm -f
