"""The verbs backend: rdma_cm connection setup with the protocol's private data.

The source resolves the address and route, creates its queue pair and connects with
the 8-byte capability block as the connect request's private data; the destination
answers with the granted flags in the accept's private data, or rejects with the
reason. The queue pair is created by us (not by rdma_cm) so that RDMA WRITEs can be
posted from any registered address, and moved through INIT / RTR / RTS with the
attributes rdma_cm computes (``rdma_init_qp_attr``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import time
from typing import Any, ClassVar

from rdmamig import caps
from rdmamig.caps import Capability, PrivateData
from rdmamig.errors import BackendUnavailableError, RemoteProtocolError, TransportError
from rdmamig.transport import Backend, Listener, address_text

from . import compat
from .endpoint import RECV_DEPTH, SEND_DEPTH, VerbsEndpoint, control_buffer
from .events import CompletionChannel, EventChannel

log = logging.getLogger("rdmamig.verbs")

#: Milliseconds rdma_cm may take to resolve an address or a route.
RESOLVE_MS = 5000
#: Seconds an accepted source has to complete the connection (ESTABLISHED).
ESTABLISH_TIMEOUT = 10.0
#: Ports tried when the caller asks for any free one (rdma_cm has no "port 0").
_PORTS = range(20000, 60000)


def _pyverbs() -> Any:
    reason = compat.unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"backend 'verbs' cannot run here: {reason}")
    return compat.load()


def _rdma_error(pv: Any, what: str, exc: Exception) -> TransportError:
    code = getattr(exc, "error_code", None)
    return TransportError(f"{what}: {exc}", errno=code if isinstance(code, int) and code > 0
                          else errno.EIO)


def _queue_pair(pv: Any, cmid: Any) -> tuple[Any, Any, list[Any], CompletionChannel | None]:
    """CQ, RC QP in INIT state and the receive buffers, posted, and the CQ's
    completion channel (None where it cannot be waited on: the endpoint polls)."""
    e = pv.enums
    try:
        completions: CompletionChannel | None = CompletionChannel(pv, cmid.context)
    except TransportError as exc:
        log.info("polling completions without sleeping: %s", exc)
        completions = None
    cq = pv.cq.CQ(cmid.context, SEND_DEPTH + RECV_DEPTH, None,
                  completions.channel if completions is not None else None, 0)
    cap = pv.qp.QPCap(max_send_wr=SEND_DEPTH, max_recv_wr=RECV_DEPTH, max_send_sge=1,
                      max_recv_sge=1)
    # sq_sig_all=0 (pyverbs defaults to 1): only the signalled last write of a batch
    # completes, so that its completion – not its first write's – ends the batch.
    qp = pv.qp.QP(cmid.pd, pv.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap,
                                            sq_sig_all=0))
    _move(cmid, qp, e.IBV_QPS_INIT)
    recv_mrs = [control_buffer(pv, cmid.pd) for _ in range(RECV_DEPTH)]
    for index, mr in enumerate(recv_mrs):
        VerbsEndpoint.post_recv(pv, qp, mr, index)
    return cq, qp, recv_mrs, completions


def _move(cmid: Any, qp: Any, state: int) -> None:
    attr, mask = cmid.init_qp_attr(state)
    qp.modify(attr, mask)


def _param(pv: Any, qp: Any, data: bytes) -> Any:
    param = pv.cmid.ConnParam(qp_num=qp.qp_num, data_len=len(data))
    param.set_private_data(data)
    return param


class _ListenerResources:
    """The listening id and its event channel, shared with the accepted connection.

    An accepted id lives on the listener's event channel and uses the listener's
    device context and PD (pyverbs gives it no others), so both stay open until the
    listener and every accepted endpoint are closed.
    """

    def __init__(self, events: EventChannel, cmid: Any) -> None:
        self.events, self.cmid = events, cmid
        self._users = 1

    def acquire(self) -> _ListenerResources:
        self._users += 1
        return self

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            with contextlib.suppress(Exception):
                self.cmid.close()
            self.events.close()

    # As the endpoint's event source: the connection's DISCONNECTED arrives here.
    def poll(self) -> str | None:
        return self.events.poll()

    def close(self) -> None:
        self.release()


#: Connect requests a listener refuses before it asks to be made anew.
MAX_REFUSED = 64


class VerbsListener(Listener):
    """An rdma_cm id listening on an address bound to an RDMA device. It accepts one
    connection: events of the accepted id arrive on the listener's channel and
    pyverbs does not say which id an event belongs to; and closing an id made from
    a connect request clears the listener's own device context and PD in pyverbs
    (``CMID.close``), so a request it refused is kept, not closed, until the
    listener is. A service listens anew for each source."""

    concurrent: ClassVar[bool] = False

    def __init__(self, pv: Any, events: EventChannel, cmid: Any, host: str, port: int,
                 supported: Capability, required: Capability) -> None:
        self._pv = pv
        self._shared = _ListenerResources(events, cmid)
        self._host, self._port, self._supported = host, port, supported
        self._required = required
        self._closed = False
        self._accepted = False
        self._refused: list[Any] = []

    @property
    def address(self) -> tuple[str, int]:
        return self._host, self._port

    def accept(self, *, timeout: float | None) -> VerbsEndpoint:
        if self._accepted:
            raise TransportError("this verbs listener already accepted its connection",
                                 errno=errno.EISCONN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            endpoint = self._accept_one(remaining)
            if endpoint is not None:
                self._accepted = True
                return endpoint
            if len(self._refused) >= MAX_REFUSED:
                raise TransportError(f"refused {MAX_REFUSED} connect requests: listen anew",
                                     errno=errno.EAGAIN)

    def _accept_one(self, timeout: float | None) -> VerbsEndpoint | None:
        """The next connect request's endpoint, or None when it was refused."""
        pv = self._pv
        ce = pv.cm_enums
        events, listen_id = self._shared.events, self._shared.cmid
        event = events.wait({ce.RDMA_CM_EVENT_CONNECT_REQUEST}, timeout=timeout,
                            what="accept")
        data = bytes(event.private_data or b"")
        cmid = pv.cmid.CMID(creator=event, listen_id=listen_id)
        event.ack_cm_event()
        try:
            request = PrivateData.decode_untrusted(data)
            reply = caps.accept(request, supported=self._supported, required=self._required)
        except RemoteProtocolError as exc:
            log.warning("refused a connect request: %s", exc)
            reason = f"connection refused: {exc}".encode()[:140]
            with contextlib.suppress(Exception):
                cmid.reject(reason)
            self._refused.append(cmid)
            return None
        try:
            cq, qp, recv_mrs, completions = _queue_pair(pv, cmid)
            _move(cmid, qp, pv.enums.IBV_QPS_RTR)
            cmid.accept(_param(pv, qp, reply.encode()))
            _move(cmid, qp, pv.enums.IBV_QPS_RTS)
            events.wait({ce.RDMA_CM_EVENT_ESTABLISHED}, timeout=ESTABLISH_TIMEOUT,
                        what="accept").ack_cm_event()
        except (pv.pyverbs_error.PyverbsError, TransportError) as exc:
            log.warning("dropped a source during the connection: %s", exc)
            self._refused.append(cmid)
            return None
        return VerbsEndpoint(pv, cmid=cmid, events=self._shared.acquire(), pd=listen_id.pd,
                             cq=cq, qp=qp, recv_mrs=recv_mrs, completions=completions,
                             capabilities=Capability(reply.flags))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for cmid in self._refused:
                with contextlib.suppress(Exception):
                    cmid.close()
            self._refused.clear()
            self._shared.release()


class VerbsBackend(Backend):
    """RoCE / InfiniBand through pyverbs and rdma_cm: RC queue pair, SEND / RECV for
    control, RDMA WRITE for pages, ibv_reg_mr for pinning."""

    name: ClassVar[str] = "verbs"
    description: ClassVar[str] = "ibverbs (RoCE / InfiniBand) through pyverbs and rdma_cm"
    supported: ClassVar[Capability] = caps.KNOWN_CAPABILITIES

    def __init__(self, *, device: str | None = None) -> None:
        """``device``: the RDMA device the address must resolve to (rdma_cm picks
        the device, port and GID from the address; this only checks its choice)."""
        self.device = device

    def _check_device(self, cmid: Any, host: str) -> None:
        if self.device is not None and cmid.dev_name != self.device:
            raise TransportError(f"{host} is reached through RDMA device {cmid.dev_name}, "
                                 f"not the requested {self.device}", errno=errno.ENODEV)

    def unavailable_reason(self) -> str | None:
        return compat.unavailable_reason()

    def listen(self, *, host: str, port: int, supported: Capability,
               required: Capability = Capability(0)) -> VerbsListener:
        pv = _pyverbs()
        ce = pv.cm_enums
        devices = compat.rdma_ipv4_addresses()
        if ":" not in host and host not in devices:
            # pyverbs' bind_addr crashes the process on an address without a device.
            raise TransportError(
                f"cannot listen on {address_text(host, port)}: no RDMA device has that address "
                f"(RDMA devices' IPv4 addresses here: {', '.join(sorted(devices)) or 'none'})",
                errno=errno.EADDRNOTAVAIL)
        ports = [port] if port else random.sample(_PORTS, 20)
        for candidate in ports:
            events = EventChannel(pv)
            cmid = pv.cmid.CMID(creator=events.channel)
            try:
                info = pv.cmid.AddrInfo(src=host, src_service=str(candidate),
                                        port_space=ce.RDMA_PS_TCP, flags=ce.RAI_PASSIVE)
                cmid.bind_addr(info)
                cmid.listen()
            except pv.pyverbs_error.PyverbsError as exc:
                cmid.close()
                events.close()
                if port == 0 and getattr(exc, "error_code", None) == errno.EADDRINUSE:
                    continue
                raise _rdma_error(pv, f"cannot listen on {host}:{candidate} (the address "
                                      f"must belong to an RDMA device's netdev)", exc) from None
            if cmid.context is None:
                cmid.close()
                events.close()
                raise TransportError(f"cannot listen on {host}:{candidate}: no RDMA device "
                                     f"has that address", errno=errno.EADDRNOTAVAIL)
            try:
                self._check_device(cmid, host)
            except TransportError:
                cmid.close()
                events.close()
                raise
            return VerbsListener(pv, events, cmid, host, candidate, supported & self.supported,
                                 required)
        raise TransportError(f"no free rdma_cm port on {host}", errno=errno.EADDRINUSE)

    def connect(self, *, host: str, port: int, requested: Capability,
                timeout: float | None) -> VerbsEndpoint:
        pv = _pyverbs()
        ce = pv.cm_enums
        what = f"cannot connect to {address_text(host, port)}"
        events = EventChannel(pv)
        cmid = pv.cmid.CMID(creator=events.channel)
        try:
            cmid.resolve_addr(pv.cmid.AddrInfo(dst=host, dst_service=str(port),
                                               port_space=ce.RDMA_PS_TCP), RESOLVE_MS)
            events.wait({ce.RDMA_CM_EVENT_ADDR_RESOLVED}, timeout=timeout,
                        what=what).ack_cm_event()
            cmid.resolve_route(RESOLVE_MS)
            events.wait({ce.RDMA_CM_EVENT_ROUTE_RESOLVED}, timeout=timeout,
                        what=what).ack_cm_event()
            self._check_device(cmid, host)
            cq, qp, recv_mrs, completions = _queue_pair(pv, cmid)
            cmid.connect(_param(pv, qp, PrivateData(flags=int(requested)).encode()))
            event = events.wait({ce.RDMA_CM_EVENT_CONNECT_RESPONSE,
                                 ce.RDMA_CM_EVENT_ESTABLISHED}, timeout=timeout, what=what)
            data = bytes(event.private_data or b"")
            event.ack_cm_event()
            granted = caps.confirm(requested, PrivateData.decode_untrusted(data))
            _move(cmid, qp, pv.enums.IBV_QPS_RTR)
            _move(cmid, qp, pv.enums.IBV_QPS_RTS)
            cmid.establish()
        except pv.pyverbs_error.PyverbsError as exc:
            cmid.close()
            events.close()
            raise _rdma_error(pv, what, exc) from None
        except BaseException:
            cmid.close()
            events.close()
            raise
        return VerbsEndpoint(pv, cmid=cmid, events=events, pd=cmid.pd, cq=cq, qp=qp,
                             recv_mrs=recv_mrs, completions=completions, capabilities=granted)
