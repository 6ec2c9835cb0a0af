"""Extension list and C flags only (metadata is in pyproject.toml).

MTA_DEBUG=1 builds with -O0 -g, Cython linetrace and -DMTA_DEBUG=1;
MTA_SANITIZE=1 adds AddressSanitizer and UBSan.
MTA_FUZZ=1 builds only the wire extension with clang, AddressSanitizer and
libFuzzer's coverage hooks (-fsanitize=fuzzer-no-link) for tests/fuzz; use it with
--build-lib build/fuzz/lib (`make fuzz-build`), never in place: the result only
loads under atheris' asan_with_fuzzer.so (see docs/fuzzing.md).
"""
import os
import sys

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - build-time guard
    sys.exit("building mta needs Cython: pip install 'Cython>=3.0'")


def _require_header(path: str, package: str) -> None:
    # A missing system header is the commonest first-build failure: name the package.
    if not os.path.exists(path):
        sys.exit(f"building mta needs {path}: apt-get install {package}")


_require_header("/usr/include/liburing.h", "liburing-dev")
_require_header("/usr/include/zlib.h", "zlib1g-dev")
_require_header("/usr/include/openssl/evp.h", "libssl-dev")

DEBUG = os.environ.get("MTA_DEBUG") == "1"
SANITIZE = os.environ.get("MTA_SANITIZE") == "1"
FUZZ = os.environ.get("MTA_FUZZ") == "1"
if FUZZ:
    os.environ["CC"] = "clang"
    os.environ["LDSHARED"] = "clang -shared"

cflags = ["-Wall", "-Wextra", "-std=gnu11"]
ldflags: list[str] = []
macros = [("MTA_DEBUG", "1" if DEBUG else "0")]
if DEBUG:
    cflags += ["-O0", "-g"]
    macros.append(("CYTHON_TRACE_NOGIL", "1"))
else:
    cflags += ["-O2"]
if SANITIZE:
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    ldflags += ["-fsanitize=address,undefined"]
if FUZZ:
    cflags += ["-g", "-fsanitize=address,fuzzer-no-link", "-fno-omit-frame-pointer"]
    # no sanitizer runtime linked in: atheris' asan_with_fuzzer.so (LD_PRELOAD) provides it


def ext(name: str, sources: list[str], libraries: list[str] = ()) -> Extension:
    return Extension(
        f"mta._native.{name}",
        sources=sources,
        include_dirs=["native/include", f"native/{name}"],
        libraries=list(libraries),
        define_macros=macros,
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )


extensions = [
    ext("wire", ["native/wire/wire.pyx", "native/wire/data.c", "native/wire/stuff.c"]),
    ext("spool", ["native/spool/spool.pyx", "native/spool/writer.c"], ["uring", "z"]),
    ext("queues", ["native/queues/queues.pyx"]),
    ext("dkim", ["native/dkim/dkim.pyx", "native/dkim/sign.c", "native/dkim/canon.c", "native/dkim/pool.c"], ["crypto", "pthread"]),
]
if FUZZ:
    extensions = [e for e in extensions if e.name == "mta._native.wire"]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={"linetrace": DEBUG, "boundscheck": False, "wraparound": False},
    )
)
