"""One BLAS thread for small matrix products.

Decoding one request (tens of tokens) is a handful of small GEMMs. OpenBLAS splits even those
across its threads, and when another process keeps the cores busy (a second stage on the same
host, a benchmark beside it) its spinning threads wait on each other: a 42-token AlignedVQ decode
with the learned adapter measured 163 ms with numpy's default 2 threads and 3.4 ms with one, on
the 2-core VM next to a busy process. Below :data:`SMALL_ROWS` rows the codecs therefore run
their products on one thread (threadpoolctl, a scikit-learn dependency; about 25 us per call).
Large inputs keep every thread. The price, on an idle machine: the MiniLM bench's per-request
encode of 8 ctx + 3x12 with a sequence correction went from 20 to 29 ms (the nearest-anchor search
over 8 226 anchors used both cores); a stage worker shares its cores with torch's own threads, so
one thread is the safer default.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

SMALL_ROWS = 256
_controller = None


def one_blas_thread(rows: int) -> AbstractContextManager:
    """A context that limits BLAS to one thread when ``rows`` is small (else does nothing)."""
    global _controller
    if rows > SMALL_ROWS:
        return nullcontext()
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # no threadpoolctl (a minimal edge install): leave BLAS as it is
            _controller = False
        else:
            _controller = ThreadpoolController()
    if not _controller:
        return nullcontext()
    return _controller.limit(limits=1, user_api="blas")
