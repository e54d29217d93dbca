"""Small codec inputs run their matrix products on one BLAS thread (splitnet.codecs.threads)."""

import numpy as np  # noqa: F401  (loads numpy's BLAS before the controller looks for it)
import pytest

from splitnet.codecs.threads import SMALL_ROWS, one_blas_thread


def test_small_inputs_get_one_blas_thread_large_ones_keep_theirs():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    if not before:
        pytest.skip("no BLAS library visible to threadpoolctl")
    with one_blas_thread(SMALL_ROWS):
        assert all(i["num_threads"] == 1 for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")
    with one_blas_thread(SMALL_ROWS + 1):
        assert [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"] == before
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"] == before  # restored
