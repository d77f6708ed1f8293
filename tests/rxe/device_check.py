"""On an RDMA device: ``--device`` checks the device rdma_cm chose for the address.

    python tests/rxe/device_check.py HOST DEVICE
"""

from __future__ import annotations

import sys

from rdmamig.caps import Capability
from rdmamig.errors import TransportError
from rdmamig_verbs import VerbsBackend

host, device = sys.argv[1], sys.argv[2]
with VerbsBackend(device=device).listen(host=host, port=0, supported=Capability(0)) as ok:
    print(f"{host} is on {device}: listening on port {ok.address[1]}")
try:
    VerbsBackend(device="nosuch0").listen(host=host, port=0, supported=Capability(0))
except TransportError as exc:
    assert f"reached through RDMA device {device}, not the requested nosuch0" in str(exc), exc
    print(exc)
else:
    sys.exit("a listener on the wrong device was accepted")
