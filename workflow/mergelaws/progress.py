"""Progress on long steps: a tqdm bar on a terminal, plain periodic log lines otherwise
(so a SLURM log shows where a job is without carriage-return noise)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, *, every: float = 0.1, stream=None):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream or sys.stderr
        self.t0 = time.time()
        self._next = 0.0
        self.every = every
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **info) -> None:
        if n <= 0:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in info.items()},
                                     refresh=False)
            return
        frac = self.n / max(1, self.total)
        if frac >= self._next or self.n == self.total:
            self._next = frac + self.every
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            el = time.time() - self.t0
            eta = el / frac - el if frac > 0 else float("nan")
            print(f"[{self.desc}] {self.n}/{self.total} ({100 * frac:.0f}%) {el:.1f}s elapsed, "
                  f"~{eta:.0f}s left {extra}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
