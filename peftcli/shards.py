"""Safetensors files one tensor at a time: a checked header reader whose tensors are views of a
memory map (pages handed back to the kernel after each tensor), and a writer that lays out the header
first and then streams the data, so that no whole shard is ever held in memory.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data section,
every byte of it owned by exactly one tensor. We pad the header with spaces so that the data section
starts on a 64-byte boundary (as merge.align_safetensors does for the in-memory path).
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from peftcli.errors import UserError, one_line

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors' own limit
ALIGN = 64
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"{path}: corrupt or truncated safetensors file ({one_line(why, 160)}); "
                     "re-download or re-save the base model")


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor name -> TensorInfo, and the file's __metadata__. Checks what safetensors checks: a sane
    header, known dtypes, offsets that match the shapes, and a data section exactly as long as the
    tensors (a truncated download fails here, before anything is written)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"{size} bytes, shorter than a header")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER, size - 8):
                raise _corrupt(path, f"header length {n} exceeds the file ({size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise _corrupt(path, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, h in header.items():
        try:
            dtype = ST_DTYPES[h["dtype"]]
            shape = tuple(int(d) for d in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad header entry for {name!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if any(d < 0 for d in shape) or not 0 <= b <= e or e - b != prod(shape) * itemsize:
            raise _corrupt(path, f"tensor {name!r}: offsets {[b, e]} do not fit shape {list(shape)} of {h['dtype']}")
        tensors[name] = TensorInfo(dtype, shape, data_start + b, data_start + e)
        spans.append((b, e))
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            raise _corrupt(path, "tensors overlap or leave gaps in the data section")
        pos = e
    if data_start + pos != size:
        what = "truncated" if data_start + pos > size else "trailing bytes"
        raise _corrupt(path, f"{what}: the header describes {data_start + pos} bytes, the file has {size}")
    return tensors, meta


class MappedFile:
    """A safetensors file mapped copy-on-write (never written): `get` returns a view of the map,
    `release` hands the pages of a tensor back to the kernel so that resident memory stays at about
    one tensor however large the file."""

    def __init__(self, path: str | Path, tensors: dict[str, TensorInfo] | None = None):
        self.path = Path(path)
        self.tensors = tensors if tensors is not None else read_header(self.path)[0]
        self._f = self.path.open("rb")
        size = os.fstat(self._f.fileno()).st_size
        self._mm = mmap.mmap(self._f.fileno(), size, access=mmap.ACCESS_COPY) if size else None

    def fileno(self) -> int:
        return self._f.fileno()

    def get(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        if t.nbytes == 0:
            return torch.empty(t.shape, dtype=t.dtype)
        return torch.frombuffer(self._mm, dtype=t.dtype, count=t.nbytes // t.dtype.itemsize, offset=t.begin).view(t.shape)

    def sample(self, name: str, step: int, n: int) -> torch.Tensor:
        """Elements 0, step, 2 step, ... (at most n) of the flattened tensor, read with pread: touching
        them through the map would map whole folios around each (the entire tensor, for large ones)."""
        t = self.tensors[name]
        size = t.dtype.itemsize
        count = min(n, -(-(t.nbytes // size) // step))
        raw = b"".join(os.pread(self._f.fileno(), size, t.begin + i * step * size) for i in range(count))
        return torch.frombuffer(bytearray(raw), dtype=t.dtype) if raw else torch.empty(0, dtype=t.dtype)

    def view_bytes(self, name: str) -> memoryview:
        t = self.tensors[name]
        return memoryview(self._mm)[t.begin:t.end] if t.nbytes else memoryview(b"")

    def release(self, name: str) -> None:
        t = self.tensors[name]
        lo, hi = t.begin - t.begin % PAGE, t.end
        if self._mm is not None and hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a tensor view is still alive somewhere: the GC unmaps it later
                pass
            self._mm = None
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class OutEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def header_bytes(entries: list[OutEntry], metadata: dict | None = None) -> tuple[bytes, list[OutEntry]]:
    """The header (padded so the data starts 64-byte aligned) and the entries in data order: larger
    element sizes first (every tensor then starts at a multiple of its own element size), the given
    order within one element size."""
    order = sorted(entries, key=lambda e: -e.dtype.itemsize)  # stable: keeps the given order otherwise
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    pos = 0
    for e in order:
        header[e.name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return len(raw).to_bytes(8, "little") + raw, order


class WritePipe:
    """A thread that runs file writes in order while the caller computes the next tensors (writes and
    fsync release the GIL). At most `depth` jobs wait, so at most that many finished tensors are held.
    The first error stops the remaining jobs and is raised to the caller at its next call."""

    def __init__(self, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._err: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            if self._err is None:
                try:
                    job()
                except BaseException as exc:  # re-raised in the caller's thread
                    self._err = exc

    def put(self, job) -> None:
        if self._err is not None:
            raise self._err
        self._q.put(job)

    def close(self, raise_errors: bool = True) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if raise_errors and self._err is not None:
            raise self._err


class _Inline:
    """WritePipe's interface, run at once (no thread)."""

    def put(self, job) -> None:
        job()

    def close(self, raise_errors: bool = True) -> None:
        pass


CHUNK = 64 << 20  # bytes per copy call: a cancelled copy stops within one chunk


class Cancelled(Exception):
    """A background copy was told to stop."""


def copy_range(src_fd: int, dst_fd: int, begin: int, end: int, dst_begin: int | None = None, stop=None) -> None:
    """Bytes [begin, end) of `src_fd` to `dst_fd` at `dst_begin` (default: the same offsets), in the
    kernel (copy_file_range: no trip through user space, as cp does) where it can, else pread/pwrite.
    Positional: neither file's offset moves. `stop` (a threading.Event) cancels between chunks."""
    src, dst = begin, begin if dst_begin is None else dst_begin
    kernel = hasattr(os, "copy_file_range")
    while src < end:
        if stop is not None and stop.is_set():
            raise Cancelled
        n = min(end - src, CHUNK)
        k = 0
        if kernel:
            try:
                k = os.copy_file_range(src_fd, dst_fd, n, src, dst)
            except OSError:  # EXDEV on old kernels, a filesystem without it: plain reads and writes
                kernel = False
        if k <= 0:
            data = os.pread(src_fd, n, src)
            if not data:
                raise OSError(f"unexpected end of file at byte {src}")
            k = os.pwrite(dst_fd, data, dst)
        src += k
        dst += k


class ShardWriter:
    """Writes one safetensors file: header first, then each tensor in `order` as it is produced. The
    writes run on `pipe` (a WritePipe overlaps them with the caller's work), each followed by a hint
    that starts the kernel's write-back early; `finish` queues the fsync and the close."""

    def __init__(self, path: str | Path, entries: list[OutEntry], metadata: dict | None = None, pipe=None):
        self.path = Path(path)
        head, self.order = header_bytes(entries, metadata)
        self._f = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed by finish()/abort()
        self._pipe = pipe or _Inline()
        self._pos = 0
        self._next = 0
        self._pipe.put(lambda: self._write(head))

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        start = self._pos
        while view:
            n = self._f.write(view)
            view = view[n:]
            self._pos += n
        self._writeback(start)

    def _writeback(self, start: int) -> None:
        """Start writing [start, pos) to disk now (asynchronously) rather than at the fsync."""
        if hasattr(os, "posix_fadvise") and self._pos > start:
            os.posix_fadvise(self._f.fileno(), start, self._pos - start, os.POSIX_FADV_DONTNEED)

    def _expect(self, name: str, nbytes: int) -> None:
        e = self.order[self._next]
        if e.name != name or e.nbytes != nbytes:
            raise RuntimeError(f"shard writer: got {name} ({nbytes} bytes), expected {e.name} ({e.nbytes} bytes)")
        self._next += 1

    def write_tensor(self, name: str, t: torch.Tensor) -> None:
        e = self.order[self._next]
        if t.dtype != e.dtype or tuple(t.shape) != e.shape:
            raise RuntimeError(f"shard writer: {name} is {t.dtype} {tuple(t.shape)}, expected {e.dtype} {e.shape}")
        self._expect(name, t.numel() * t.element_size())
        if t.numel():
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            self._pipe.put(lambda: self._write(data))

    def copy_from(self, name: str, src: MappedFile, src_name: str) -> None:
        """The bytes of `src_name` unchanged, copied in the kernel (copy_file_range) where it can.
        `src` must stay open until the pipe has run this (close it through the pipe too)."""
        self._expect(name, src.tensors[src_name].nbytes)
        self._pipe.put(lambda: self._copy(src, src_name))

    def _copy(self, src: MappedFile, src_name: str) -> None:
        info = src.tensors[src_name]
        start = self._pos
        copy_range(src.fileno(), self._f.fileno(), info.begin, info.end, start)
        self._pos += info.nbytes
        self._f.seek(self._pos)
        self._writeback(start)

    def finish(self) -> None:
        if self._next != len(self.order):
            raise RuntimeError(f"shard writer: {len(self.order) - self._next} tensors of {self.path.name} never written")
        self._pipe.put(self._close)

    def _close(self) -> None:
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()
