"""The fused small operators of CPU decode (native.c), compiled on first use and called by ctypes.

`load()` returns the library, or None where it cannot be had: no C compiler, a failed build, a
machine that is not Linux, or `LADDER_NATIVE=0` in the environment (the plain torch operators
then run, with the same results up to the order of additions). It is built with -march=native
for the machine it runs on, once per source and CPU, into `$LADDER_NATIVE_DIR` (default
`~/.cache/ladder-serve/native`), by a compiler run that takes about a second; concurrent first
uses (the ranks of a group) each build into a temporary file and rename it into place. Each
build prunes the directory to the `KEEP` newest libraries (other checkouts and CPUs sharing it
keep theirs) and drops temporary files a crashed build left an hour or more ago.

Whoever can write the directory or the library chooses the code this process runs, so a cached
library is loaded only if both are this user's, not writable by group or others and not links;
else (with a warning naming the path and why) the library is built into a fresh private
directory, loaded from there and that directory removed (the loaded library stays mapped).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ladder.private import unsafe_reason

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
# no fused multiply-adds where torch rounds twice; libmvec: glibc's vector expf (SwiGLU)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]
LIBS = ["-lmvec", "-lm"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
KEEP = 4  # libraries kept in the directory: this source's and a few other checkouts' or CPUs'

_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None

_P, _L, _F, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "ladder_native_version": ([], ctypes.c_int),
    "ladder_native_features": ([], ctypes.c_int),  # bits: gemm_f32 (AVX-512), gemm_bf16
    "ladder_gemm_f32": ([_P, _P, _P, _L, _L, _L, _I], None),
    "ladder_gemm_bf16": ([_P, _P, _P, _L, _L, _L, _I], None),
    "ladder_rmsnorm": ([_I, _P, _P, _P, _L, _L, _F], None),
    "ladder_silu_mul": ([_I, _P, _P, _L, _L, _I], None),
    "ladder_attn_decode": ([_I, _P, _P, _L, _L, _L, _L, _P, _P, _P, _P, _L, _P, _L, _P, _L, _P,
                            _F, _P, _L, _I], None),
    "ladder_attn_chunk_stride": ([_L, _L, _L], _L),
    "ladder_qgemm_scratch": ([_L, _L], _L),
    "ladder_qgemm_vnni": ([], ctypes.c_int),
    "ladder_qgemm": ([_P, _P, _P, _L, _L, _L, _I, _P, _I], None),
    "ladder_qgemm_reference": ([_P, _P, _P, _L, _L, _L, _I, _P], None),
    "ladder_attn_chunk": ([_I, _P, _P, _L, _L, _L, _L, _P, _P, _P, _P, _L, _P, _L, _L, _P, _F,
                           _P, _L, _I], None),
    "ladder_module_work": ([_P, _L], _L),
    "ladder_attn_module": ([_P, _P, _P, _P], None),
    "ladder_mlp_module": ([_P, _P, _P, _P], None),
    "ladder_decode_layers": ([_P, _P, _L, _P, _P, _P, _P, _P], ctypes.c_int),
    "ladder_shm_publish": ([_P, _P, _L], ctypes.c_int64),
    "ladder_shm_wait": ([_P, ctypes.c_int64, _I, _P, _L, _I], ctypes.c_int),
}


class Linear(ctypes.Structure):
    """native.c's ladder_linear: a weight product of a whole module (ladder.native.layouts)."""

    _fields_ = [("kind", _I), ("out", _L), ("inp", _L), ("w", _P), ("bias", _P)]


class Module(ctypes.Structure):
    """native.c's ladder_module: a layer's attention or MLP, described once."""

    _fields_ = [("dt", _I), ("dim", _L), ("norm", _P), ("eps", _F), ("first", Linear),
                ("second", Linear), ("H", _L), ("K", _L), ("E", _L), ("kv_map", _P),
                ("scale", _F), ("window", _L), ("layer", _L)]


class Step(ctypes.Structure):
    """native.c's ladder_step: a decode step's rows, cache and scratch, described once a step."""

    _fields_ = [("B", _L), ("cos", _P), ("sin", _P), ("k", _P), ("v", _P), ("layer_bytes", _L),
                ("block", _L), ("tables", _P), ("width", _L), ("pos", _P), ("scores", _P),
                ("stride", _L), ("work", _P), ("nt", _I)]


SHM_MAX_WORLD = 8


class Shm(ctypes.Structure):
    """native.c's ladder_shm: a shared-memory group's segment (ladder.links.shm.ShmComm) as the
    all-reduces of ladder_decode_layers see it, with the communicator's counters in and out."""

    _fields_ = [("w", _P), ("ring", _P), ("world", _L), ("rank", _L), ("n_slots", _L),
                ("slot_bytes", _L), ("pub", _L * SHM_MAX_WORLD), ("done", _L * SHM_MAX_WORLD),
                ("sleep", _L * SHM_MAX_WORLD), ("pid", _L * SHM_MAX_WORLD),
                ("seq", ctypes.c_int64), ("done_seq", ctypes.c_int64),
                ("min_done", ctypes.c_int64), ("timeout_s", ctypes.c_double),
                ("wait_s", ctypes.c_double * 2), ("waits", _L * 2), ("exposed_s", ctypes.c_double),
                ("failed_peer", _L), ("failed_why", _L), ("failed_pid", _L)]


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def library_path() -> Path:
    compiler = shutil.which(os.environ.get("CC", "cc")) or "cc"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS + LIBS), compiler, _cpu_id(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LADDER_NATIVE_DIR") or Path.home() / ".cache/ladder-serve/native")
    return root / f"ladder_native-{key}.so"


def build(path: Path) -> None:
    """Compile native.c into `path` (atomically: a temporary file renamed into place)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} is not on PATH)")
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), *LIBS], capture_output=True,
                             text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE}: {run.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # whatever the umask: a group-writable library would be refused
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    prune(path.parent, keep=path)


def prune(root: Path, keep: Path | None = None) -> list[Path]:
    """Remove all but the `KEEP` newest libraries in `root` (never `keep`), and temporary files of
    builds that started an hour or more ago; returns what it removed. A library in use stays
    mapped in the processes that loaded it."""
    import time
    now = time.time()
    libs, gone = [], []
    for p in root.glob("ladder_native-*"):
        try:
            mtime = p.stat().st_mtime
        except OSError:  # another process pruned or renamed it meanwhile
            continue
        if p.name.endswith(".so.tmp"):
            if now - mtime >= 3600:
                gone.append(p)
        elif p.suffix == ".so" and p != keep:
            libs.append((mtime, p))
    libs.sort(reverse=True)
    gone += [p for _, p in libs[KEEP - (keep is not None):]]
    for p in gone:
        try:
            p.unlink()
        except OSError:
            pass
    return gone


def load() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or None where it is unavailable."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("LADDER_NATIVE", "1") == "0":
        _error = "turned off by LADDER_NATIVE=0"
        return None
    if platform.system() != "Linux":
        _error = f"built on Linux only, this is {platform.system()}"
        return None
    try:
        path = library_path()
        why = _untrusted(path)
        if why:
            log.warning("not loading the native library cached at %s: %s; building a private "
                        "copy instead (fix or remove it, or set LADDER_NATIVE_DIR)", why[0],
                        why[1])
            lib = _load_private(path.name)
        else:
            if not path.exists():
                build(path)
            lib = ctypes.CDLL(str(path))
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _error = str(e)
        log.warning("fused CPU decode operators unavailable, using torch's: %s", e)
        return None
    _lib = lib
    return lib


def _untrusted(path: Path) -> tuple[Path, str] | None:
    """(the path, why) where the cache directory or the library in it may hold code somebody
    else chose; None where both are safe to use (or not there yet)."""
    for p, directory in ((path.parent, True), (path, False)):
        if os.path.lexists(p):
            why = unsafe_reason(p, directory=directory, others_read=True)
            if why:
                return p, why
    return None


def _load_private(name: str) -> ctypes.CDLL:
    """The library built into a fresh directory only this user can enter (mkdtemp: 0700, a name
    nobody can guess), loaded, and the directory removed."""
    with tempfile.TemporaryDirectory(prefix="ladder-native-") as d:
        path = Path(d) / name
        build(path)
        return ctypes.CDLL(str(path))


def gemm_dtypes(lib: ctypes.CDLL | None) -> set[torch.dtype]:
    """The weight dtypes whose products the library computes on this CPU."""
    if lib is None:
        return set()
    bits = lib.ladder_native_features()
    return {dt for dt, bit in ((torch.float32, 1), (torch.bfloat16, 2)) if bits & bit}


def block_weight(w: torch.Tensor) -> torch.Tensor:
    """[out, in] -> the blocked layout of the library's products (zeros pad the last block):
    float32 [ceil(out / 16), in, 16]; bfloat16 [ceil(out / 16), ceil(in / 2), 16, 2]."""
    out, inp = w.shape
    nb = -(-out // 16)
    pairs = -(-inp // 2) if w.dtype != torch.float32 else inp
    cols = inp if w.dtype == torch.float32 else pairs * 2
    padded = w
    if (nb * 16, cols) != (out, inp):  # a copy only where there is something to pad
        padded = w.new_zeros(nb * 16, cols)
        padded[:out, :inp] = w
    if w.dtype == torch.float32:
        return padded.reshape(nb, 16, inp).transpose(1, 2).contiguous()
    return padded.reshape(nb, 16, pairs, 2).transpose(1, 2).contiguous()


def unavailable_reason() -> str | None:
    """Why `load()` returned None (after it did), else None."""
    return _error
