import functools
import gc
import http.server
import os
import pathlib
import tempfile
import threading

import jax
import pytest


# Strict JAX everywhere: no silent dtype or rank promotion, float64 for exact checks.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", True)
# The command line keeps compiled programs under $XDG_CACHE_HOME: the tests' runs in
# other processes keep theirs in a folder of the session's, not the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="bioflax_eqx_tests_")


_MAPS = pathlib.Path("/proc/self/maps")
# Well under Linux's default `vm.max_map_count`, 65,530.
_MAPS_LIMIT = 30_000


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Drops JAX's compiled programs when the process holds many memory mappings.
    XLA:CPU maps memory for every program it compiles (~200 new mappings a second
    in these tests); one process running every file passed the kernel's limit after
    ~600 tests and crashed with a segmentation fault while compiling."""
    yield
    if _MAPS.exists() and _MAPS.read_text().count("\n") > _MAPS_LIMIT:
        jax.clear_caches()
        gc.collect()


@pytest.fixture(autouse=True)
def _no_compile_cache_in_process(monkeypatch):
    """`main()` called in this process leaves JAX's compilation cache off: turned on
    halfway through a session, writing an executable to it crashed XLA:CPU
    (segmentation fault in `put_executable_and_time`, tests/test_transformer.py,
    after ~600 tests). A fresh `bioflax-eqx` process turns it on before compiling
    anything (tests/test_cli.py runs one)."""
    from bioflax_eqx.training import _cli

    monkeypatch.setattr(_cli, "compile_cache_dir", lambda disabled: None)


_SHARED_MNIST = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
)


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
    """The canonical MNIST files (IDX, gzipped): `$BIOFLAX_EQX_DATA` or ../shared."""
    path = pathlib.Path(os.environ.get("BIOFLAX_EQX_DATA", _SHARED_MNIST))
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"MNIST not found in {path}; set BIOFLAX_EQX_DATA")
    return path


@pytest.fixture
def getkey():
    """A fresh `jax.random` key on every call, the same sequence in every test."""
    keys = iter(jax.random.split(jax.random.key(5678), 1000))
    return lambda: next(keys)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """A local stand-in for a download site, on loopback: (folder it serves, its
    URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
