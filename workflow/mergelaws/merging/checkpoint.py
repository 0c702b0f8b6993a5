"""Safetensors checkpoints, one tensor at a time: reading (:class:`SafetensorsSource`, a state dict
as :class:`DictSource`, embeddings cut to a vocabulary as :class:`RowCutSource`) and writing
(:class:`SafetensorsWriter`, header first, then each tensor as it is produced)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mergelaws.errors import CheckpointError  # noqa: F401  (raised here and re-exported)

__all__ = ["CheckpointError", "SafetensorsSource", "DictSource", "as_source", "RowCutSource", "SafetensorsWriter",
           "read_f32"]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


class SafetensorsSource:
    """The tensors of one checkpoint (a model directory's ``*.safetensors`` files, or one file),
    read one at a time through a memory map.

    ``get(name)`` is a zero-copy CPU tensor over the file's pages (a private copy-on-write map,
    never written back): holding a source costs no memory beyond the OS page cache, which the
    kernel reclaims under pressure, and reading a tensor costs its bytes only. ``bytes_read``
    counts the bytes of the tensors handed out. Treat the tensors as read-only.
    """

    def __init__(self, path: str | Path):
        import mmap
        import struct

        path = Path(path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors weights")
        self.path = path
        self.bytes_read = 0
        self._maps: list[Any] = []
        self._files: list[Path] = []
        self._fds: dict[int, int] = {}
        self._index: dict[str, tuple[int, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                try:
                    (hlen,) = struct.unpack("<Q", fh.read(8))
                    if hlen > size - 8:
                        raise ValueError("header longer than the file")
                    header = json.loads(fh.read(hlen))
                except (struct.error, ValueError, UnicodeDecodeError) as exc:
                    raise CheckpointError(f"{f} is not a readable safetensors file ({exc}); copy it again") from None
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
            self._files.append(f)
            start = 8 + hlen
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                a, b = info["data_offsets"]
                if info["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
                if start + b > size:
                    raise CheckpointError(f"{f} is truncated (tensor {name} ends past the end of the file); "
                                          f"copy it again")
                self._index[name] = (len(self._maps), _ST_DTYPES[info["dtype"]], tuple(info["shape"]),
                                     start + a, start + b)
            self._maps.append(mm)

    def keys(self):
        return self._index.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self._index[name][1]

    def get(self, name: str) -> Tensor:
        i, dtype, shape, a, b = self._index[name]
        self.bytes_read += b - a
        n = math.prod(shape)
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._maps[i], dtype=dtype, count=n, offset=a).view(shape)

    def read(self, name: str, out: Tensor) -> Tensor:
        """Tensor ``name`` read (copied) into the front of ``out`` (a contiguous CPU tensor of the
        tensor's dtype with at least its numel entries, e.g. a buffer reused across tensors):
        no page-mapping and no fresh allocation per tensor. Returns the view of ``out``."""
        import os

        i, dtype, shape, a, b = self._index[name]
        n = math.prod(shape)
        if out.dtype != dtype or not out.is_contiguous() or out.numel() < n or out.device.type != "cpu":
            raise ValueError(f"read({name}): needs a contiguous CPU {dtype} buffer of >= {n} entries")
        view = out.reshape(-1)[:n]
        if n:
            if i not in self._fds:
                self._fds[i] = os.open(self._files[i], os.O_RDONLY)
            mv = memoryview(view.view(torch.uint8).numpy()).cast("B")
            done = 0
            while done < b - a:
                got = os.preadv(self._fds[i], [mv[done:]], a + done)
                if got <= 0:
                    raise CheckpointError(f"{self._files[i]}: short read of tensor {name}")
                done += got
        self.bytes_read += b - a
        return view.view(shape)

    def close(self) -> None:
        import os

        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def nbytes(self, names: Sequence[str] | None = None) -> int:
        names = self._index if names is None else names
        return sum(self._index[n][4] - self._index[n][3] for n in names)

    def release(self, name: str) -> None:
        """Drop the pages of tensor ``name`` from this process (madvise DONTNEED): they stay in
        the page cache, the resident set shrinks, and a later access reads them again."""
        import mmap

        i, _, _, a, b = self._index[name]
        mm = self._maps[i]
        if mm is None or b <= a or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        start = a - a % page
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, b - start)
        except (OSError, ValueError):
            pass


class DictSource:
    """A state dict behind the :class:`SafetensorsSource` interface (``bytes_read`` counts too)."""

    def __init__(self, state: dict[str, Tensor]):
        self.state = state
        self.bytes_read = 0

    def keys(self):
        return self.state.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> Tensor:
        t = self.state[name]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def release(self, name: str) -> None:
        pass

    def read(self, name: str, out: Tensor) -> Tensor:
        t = self.get(name)
        return out.reshape(-1)[:t.numel()].view(t.shape).copy_(t)


def as_source(x: Any) -> Any:
    """``x`` as a source: a state dict wrapped in a :class:`DictSource`, anything else as it is."""
    return DictSource(x) if isinstance(x, dict) else x


class RowCutSource:
    """A source whose tensors ``rows`` (name -> n) are cut to their first n rows (dim 0): an
    expert's embedding matrices cut to the base's vocabulary. Zero-copy over the inner source."""

    def __init__(self, inner: Any, rows: dict[str, int]):
        self.inner = inner
        self.rows = dict(rows)

    @property
    def bytes_read(self) -> int:
        return getattr(self.inner, "bytes_read", 0)

    def keys(self):
        return self.inner.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.inner.shape(name))
        return (self.rows[name], *shape[1:]) if name in self.rows else shape

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(name)

    def get(self, name: str) -> Tensor:
        t = self.inner.get(name)
        return t[: self.rows[name]] if name in self.rows else t

    def read(self, name: str, out: Tensor) -> Tensor:
        t = self.get(name)
        return out.reshape(-1)[:t.numel()].view(t.shape).copy_(t)

    def release(self, name: str) -> None:
        self.inner.release(name)


# ---------------------------------------------------------------- writing

_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time: the header (names, dtypes, shapes, offsets)
    first, then each tensor's bytes as it is produced, so the whole state dict never exists."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._order = sorted(layout)
        for n in self._order:
            dtype, shape = layout[n]
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[n] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self._header, self.nbytes = header, offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(path, "wb")
        self._fh.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if name != self._order[self._next]:
            raise RuntimeError(f"tensor {name} written out of order (expected {self._order[self._next]})")
        info = self._header[name]
        if _ST_NAMES[t.dtype] != info["dtype"] or list(t.shape) != info["shape"]:
            raise RuntimeError(f"tensor {name}: {t.dtype} {tuple(t.shape)} does not match the header")
        if t.numel():
            self._fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._next} tensors were not written")
        self._fh.close()


def read_f32(src, n: str, buf: torch.Tensor) -> torch.Tensor:
    """Tensor ``n`` of ``src`` as fp32, in ``buf`` when stored as fp32."""
    if src.dtype(n) == torch.float32:
        return src.read(n, buf)
    return src.get(n).float()
