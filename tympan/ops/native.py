"""Small C kernels compiled on first use with the system C compiler and loaded through ctypes.

:class:`NativeLibrary` builds a C source once into ``$TYMPAN_CACHE/kernels`` (default ``~/.cache/tympan/kernels``),
keyed by the source, the flags, the compiler's version and the CPU's feature flags (the code is built for the CPU
it runs on, ``-march=native``), and loads it. Without a working compiler (``$CC``, ``cc``, ``gcc`` or ``clang``),
or with its environment switch set to ``0`` (``TYMPAN_NATIVE=0`` disables every library), ``lib()`` is None and
callers take their PyTorch path. No fast-math flag is used (it could change the process's float environment).
``optional_flags`` (e.g. ``-fopenmp``) are tried first and dropped when the compiler rejects them. An OpenMP build
links ``libgomp.so.1``, which in a process that imported torch (its OpenMP runtime has that name) is torch's own:
the kernels' parallel regions run on the same thread team as torch's intra-op work.

A parallel helper splits a range of independent work items over ``torch.get_num_threads()`` Python threads
(ctypes releases the GIL during each foreign call).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

__all__ = ["NativeLibrary", "parallel_ranges", "tracing", "FLAGS"]

FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-std=c11"]
I64, PTR, INT, FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float


def tracing() -> bool:
    """Under torch.export / dynamo / TorchScript tracing or the ONNX exporter: a foreign call (or a Python-level
    fast path such as DASS's tiling) is invisible there, so callers take their plain torch ops. The one check for
    that: TymNet, SAT, the fused scan and DASS's tiling all ask it."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export())  # fmt: skip


def exporting() -> bool:
    """Under an exporter (torch.export, the ONNX exporter, TorchScript tracing), not torch.compile: for choices
    that only the exported graph's runtime decides (e.g. ONNX Runtime's DFT op is slower than a DFT as a matmul)."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    """Where built libraries live: ``$TYMPAN_CACHE/kernels`` or ``~/.cache/tympan/kernels``."""
    from tympan.files import cache_root

    return cache_root() / "kernels"


class NativeLibrary:
    """A C source built on first use; ``functions`` maps entry names to ``(restype, argtypes)``."""

    def __init__(self, name: str, source: str, functions: dict[str, tuple[object, list]], switch: str,
                 optional_flags: tuple[str, ...] = ()):
        self.name, self.source, self.functions, self.switch = name, source, functions, switch
        self.optional_flags = tuple(optional_flags)
        self.flags: list[str] = []  # the optional flags the loaded build has
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self.error: str | None = None

    def _build(self) -> ctypes.CDLL:
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC)")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        attempts = [list(self.optional_flags), []] if self.optional_flags else [[]]
        for extra in attempts:
            try:
                lib = self._load(compiler, FLAGS + extra, version)
            except (RuntimeError, OSError):  # the optional flags failed to build or load: without them
                if extra == attempts[-1]:
                    raise
                continue
            self.flags = extra
            break
        for fname, (restype, argtypes) in self.functions.items():
            fn = getattr(lib, fname)
            fn.restype, fn.argtypes = restype, argtypes
        return lib

    def _load(self, compiler: str, flags: list[str], version: str) -> ctypes.CDLL:
        """The library built with ``flags`` (from the cache when there), loaded."""
        key = hashlib.sha256("\0".join([self.source, " ".join(flags), version, _cpu_signature()]).encode())
        folder = cache_dir()
        path = folder / f"{self.name}_{key.hexdigest()[:16]}.so"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src, out = Path(tmp) / f"{self.name}.c", Path(tmp) / f"{self.name}.so"
                src.write_text(self.source)
                result = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True,
                                        text=True, timeout=180)
                if result.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
                os.replace(out, path)  # atomic: concurrent builders end with one complete file
        return ctypes.CDLL(str(path))

    def lib(self) -> ctypes.CDLL | None:
        """The loaded library, built now if needed; None (with ``error`` set) when unavailable."""
        if self._lib is not None or self.error is not None:
            return self._lib
        with self._lock:
            if self._lib is None and self.error is None:
                if "0" in (os.environ.get("TYMPAN_NATIVE", "1"), os.environ.get(self.switch, "1")):
                    self.error = f"disabled by TYMPAN_NATIVE=0 or {self.switch}=0"
                else:
                    try:
                        self._lib = self._build()
                    except Exception as exc:  # noqa: BLE001 - any build/load failure: use the PyTorch path
                        self.error = f"{type(exc).__name__}: {exc}"
        return self._lib


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def parallel_ranges(total: int, run: Callable[[int, int], None], min_items: int = 1) -> None:
    """Call ``run(start, stop)`` on ``torch.get_num_threads()`` slices of ``range(total)`` at once (each at least
    ``min_items`` long), the first slice on the calling thread."""
    global _pool
    threads = max(1, min(torch.get_num_threads(), total // max(min_items, 1)))
    bounds = [total * i // threads for i in range(threads + 1)]
    if threads == 1:
        run(0, total)
        return
    with _pool_lock:
        if _pool is None or _pool._max_workers < threads - 1:
            _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="tympan-native")
        pool = _pool
    futures = [pool.submit(run, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    run(bounds[0], bounds[1])
    for future in futures:
        future.result()
