"""On an RDMA device: ibv_reg_mr beyond RLIMIT_MEMLOCK gives the same clear error as
the TCP backend. Run without CAP_IPC_LOCK and with an 8 MiB limit, e.g.

    setpriv --bounding-set -ipc_lock --inh-caps -ipc_lock \\
        prlimit --memlock=8388608:8388608 python tests/rxe/memlock_check.py
"""

from __future__ import annotations

import mmap
import sys

from rdmamig.errors import MemlockLimitError
from rdmamig.testing import connected_pair
from rdmamig_verbs import VerbsBackend

with connected_pair(VerbsBackend()) as (_source, destination):
    buffer = mmap.mmap(-1, 16 << 20)
    try:
        destination.register(buffer=memoryview(buffer), remote_write=True)
    except MemlockLimitError as exc:
        print(exc)
        assert "RLIMIT_MEMLOCK is 8388608 bytes" in str(exc), exc
        assert destination.pinned_bytes == 0
        sys.exit(0)
sys.exit("ibv_reg_mr beyond RLIMIT_MEMLOCK succeeded")
