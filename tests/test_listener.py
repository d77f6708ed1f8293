"""``rdmamig listen`` attacked as a network service: a real listener process, hostile
clients on raw sockets speaking the TCP backend's framing, and after every attack a
real migration into the same listener that must verify."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from hostile import HOST, RawPeer, Service, assert_serves, real_migration, service
from rdmamig import wire
from rdmamig.auth import PreSharedKey
from rdmamig.caps import SOURCE_DEFAULTS, Capability
from rdmamig.control import Role
from rdmamig.engine import stream
from rdmamig.errors import PeerAbortedError, TransportError
from rdmamig.memory import content_digest
from rdmamig.session import ControlSession
from rdmamig.transport import RemoteWrite
from rdmamig_tcp import TcpBackend, TcpEndpoint
from rdmamig_tcp.frames import MAGIC, Kind, header

MiB = 1 << 20
KEY = b"k" * 32


def send_stream(peer: RawPeer, data: bytes) -> None:
    """``data`` as the QEMU FILE stream, one 32 KiB piece per READY."""
    for at in range(0, len(data), wire.QEMU_FILE_PIECE):
        assert isinstance(peer.recv(), wire.Ready)
        peer.send(wire.QemuFile(data=data[at:at + wire.QEMU_FILE_PIECE]))


def declare(peer: RawPeer, blocks: list[tuple[str, int]]) -> None:
    """Start an rdmamig stream declaring ``blocks``."""
    payload = stream.encode_blocks(blocks)
    send_stream(peer, stream.MAGIC + stream.RECORD.pack(stream.Tag.BLOCKS, len(payload))
                + payload)


def refused_layout(listener: Service, blocks: list[tuple[str, int]], reason: str) -> None:
    """A raw source declaring ``blocks`` is refused with ``reason``; nothing is made."""
    peer = RawPeer(listener.port)
    peer.hello()
    declare(peer, blocks)
    assert peer.is_closed_by_peer(30)
    peer.close()
    log = listener.wait_for_log("failed")
    assert reason in log, log
    assert list(listener.images.iterdir()) == []


# ---------------------------------------------------------------- strangers


def test_a_stranger_that_connects_and_closes_does_not_end_the_listener(tmp_path: Path) -> None:
    with service(tmp_path / "images") as listener:
        socket.create_connection((HOST, listener.port)).close()
        with socket.create_connection((HOST, listener.port)) as garbage:
            garbage.sendall(os.urandom(100))
        assert_serves(listener)
        assert "dropped" in listener.log.read_text() or "refused" in listener.log.read_text()


def test_silent_strangers_are_dropped_after_the_handshake_deadline(tmp_path: Path) -> None:
    with service(tmp_path / "images", "--handshake-timeout", "2") as listener:
        # Twelve of them: served one after the other, they would hold a source up for
        # 24 s, longer than it waits (20 s). Each handshake runs on its own.
        silent = [RawPeer(listener.port, timeout=60) for _ in range(12)]
        assert_serves(listener)  # while the strangers hold their connections
        assert all(peer.is_closed_by_peer(60) for peer in silent)
        assert "timed out" in listener.wait_for_log("dropped")


def test_a_handshake_dripped_a_byte_a_second_is_held_to_its_deadline(tmp_path: Path) -> None:
    body = header(Kind.CONNECT, length=16) + MAGIC + bytes(8)
    with service(tmp_path / "images", "--handshake-timeout", "2") as listener:
        dripper = RawPeer(listener.port, timeout=60)
        stop = threading.Event()

        def drip() -> None:
            for byte in body:
                if stop.wait(1.0):
                    return
                try:
                    dripper.sock.send(bytes([byte]))
                except OSError:
                    return

        thread = threading.Thread(target=drip)
        thread.start()
        assert_serves(listener)
        started = time.monotonic()
        assert dripper.is_closed_by_peer(60)
        stop.set()
        thread.join()
        # 44 bytes at one a second would take 44 s: the deadline (2 s) ended it.
        assert time.monotonic() - started < 30
        assert "timed out" in listener.wait_for_log("dropped")


def test_strangers_while_a_four_lane_source_joins_do_not_break_it(tmp_path: Path) -> None:
    with service(tmp_path / "images") as listener:
        strangers = [RawPeer(listener.port) for _ in range(4)]
        joiners = []
        for lanes in range(2):  # strangers that claim to join someone's lanes
            peer = RawPeer(listener.port)
            peer.sock.sendall(header(Kind.JOIN, rkey=lanes + 1, wr_id=12345))
            joiners.append(peer)
        result, error, _block = real_migration(listener.port, channels=4)
        assert error is None and result.verified and result.committed
        for peer in joiners:
            kind, reason = peer.frame()
            assert kind == Kind.REJECT and b"unknown join token" in reason
        for peer in strangers + joiners:
            peer.close()
        assert_serves(listener)


def test_four_migrations_at_once_each_get_their_own_image(tmp_path: Path) -> None:
    with service(tmp_path / "images") as listener:
        results: list[tuple[object, str | None, object]] = []
        threads = [threading.Thread(target=lambda seed=seed: results.append(
            real_migration(listener.port, seed=seed))) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert [error for _result, error, _block in results] == [None] * 4
        digests = {block.digest() for _result, _error, block in results}  # type: ignore[attr-defined]
        images = listener.images_made()
        assert len(images) == 4
        assert {image.block(0).digest() for image in images} == digests


# ---------------------------------------------------------------- authentication


def test_with_a_key_a_source_without_it_is_refused_before_anything_is_made(
        tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    with service(tmp_path / "images", "--psk-file", str(key_file)) as listener:
        # No AUTH asked for: refused at the handshake.
        peer = RawPeer(listener.port)
        with pytest.raises(AssertionError, match="requires AUTH"):
            peer.hello()
        peer.close()
        # AUTH asked for, then a stream instead of the proof: refused, nothing made.
        peer = RawPeer(listener.port)
        granted = peer.hello(SOURCE_DEFAULTS | Capability.AUTH)
        assert granted & Capability.AUTH
        assert isinstance(peer.recv(granted), wire.Ready)
        peer.send(wire.QemuFile(data=stream.MAGIC))
        assert peer.is_closed_by_peer(30)
        assert "expected AUTH HELLO" in listener.wait_for_log("failed")
        # A wrong key: the source finds out first, and says so.
        _result, error, _block = real_migration(listener.port,
                                                key=PreSharedKey(b"w" * 32))
        assert error is not None and "could not prove the pre-shared key" in error
        assert list(listener.images.iterdir()) == []
        assert_serves(listener, key=PreSharedKey(KEY))


def test_strangers_that_ask_for_auth_and_stay_silent_keep_no_source_out(
        tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    with service(tmp_path / "images", "--psk-file", str(key_file), "--max-sessions", "2",
                 "--max-pending", "8") as listener:
        # Twenty: more than the slots and the pending places together. They prove
        # nothing, so they hold no slot, and the oldest make room for newcomers.
        strangers = []
        for _ in range(20):
            peer = RawPeer(listener.port, timeout=60)
            assert peer.hello(SOURCE_DEFAULTS | Capability.AUTH) & Capability.AUTH
            strangers.append(peer)
        assert_serves(listener, key=PreSharedKey(KEY))
        assert "wait to authenticate (--max-pending): closed the oldest" in (
            listener.wait_for_log("--max-pending"))
        assert sum(peer.is_closed_by_peer(30) for peer in strangers[:12]) == 12
        for peer in strangers:
            peer.close()


def test_authentication_has_a_deadline_of_its_own(tmp_path: Path) -> None:
    with service(tmp_path / "images", "--timeout", "120", "--auth-timeout", "1",
                 env={"RDMAMIG_PSK": KEY.decode()}) as listener:
        peer = RawPeer(listener.port, timeout=60)
        peer.hello(SOURCE_DEFAULTS | Capability.AUTH)
        started = time.monotonic()
        assert peer.is_closed_by_peer(60)
        assert time.monotonic() - started < 30  # not --timeout's 120 s
        peer.close()
        listener.wait_for_log("failed")
        assert_serves(listener, key=PreSharedKey(KEY))


def test_a_proof_replayed_from_another_connection_is_refused(tmp_path: Path) -> None:
    with service(tmp_path / "images", env={"RDMAMIG_PSK": KEY.decode()}) as listener:
        # The destination's proof for a nonce of our choosing is of no use as the
        # source's: the role is in the proof, and its nonce is fresh every time.
        caps = SOURCE_DEFAULTS | Capability.AUTH
        first = RawPeer(listener.port)
        granted = first.hello(caps)
        assert isinstance(first.recv(granted), wire.Ready)
        first.send(wire.AuthHello(nonce=bytes(32)))
        challenge = first.recv(granted)
        assert isinstance(challenge, wire.AuthChallenge)
        assert isinstance(first.recv(granted), wire.Ready)
        first.send(wire.AuthProof(proof=challenge.proof))
        assert first.is_closed_by_peer(30)
        assert "could not prove the pre-shared key" in listener.wait_for_log("failed")
        assert_serves(listener, key=PreSharedKey(KEY))


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize(("blocks", "reason"), [
    ([("mem", MiB), ("mem", MiB)], "the name is listed twice"),
    ([("x\0y", MiB)], "printable characters"),
    ([("x\ny", MiB)], "printable characters"),
    ([("\x1b[31mred", MiB)], "'\\x1b[31mred'"),  # printed escaped
    ([("", MiB)], "printable characters"),
    ([("n" * 256, MiB)], "1 to 255 bytes"),
    ([("mem", 4097)], "length=4097 is not a positive multiple of 4096"),
    ([("mem", 0)], "length=0 is not a positive multiple"),
    ([("mem", 2**63)], "this destination takes at most"),
    ([("mem", 1 << 40)], "this destination takes at most"),
    ([(f"b{i}", 4096) for i in range(70_000)], "70000 RAM blocks"),
])
def test_a_layout_over_the_limits_is_refused_and_makes_nothing(
        tmp_path: Path, blocks: list[tuple[str, int]], reason: str) -> None:
    with service(tmp_path / "images", "--max-ram", "1G") as listener:
        refused_layout(listener, blocks, reason)
        assert_serves(listener)


def test_ram_that_does_not_fit_the_free_space_is_refused(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with service(tmp_path / "images", "--max-ram", str(4 * free)) as listener:
        refused_layout(listener, [("mem", (2 * free) // 4096 * 4096)], "bytes free in")
        assert_serves(listener)


def test_a_full_disk_fails_its_migrations_and_never_the_listener(small_disk: Path) -> None:
    with service(small_disk / "images", "--max-ram", "1G") as listener:
        session, remote, endpoint = _hand_source(listener.port, [("mem", 20 * MiB)])
        with endpoint:
            # Alone it would fit; beside the first one's 20 MiB it does not.
            peer = RawPeer(listener.port)
            peer.hello()
            declare(peer, [("mem", 20 * MiB)])
            assert peer.is_closed_by_peer(30)
            peer.close()
            assert ("beside the 20971520 bytes other migrations into it may fill"
                    in listener.wait_for_log("failed"))
            # Something else fills the disk under the first one: its stores find no
            # room, which is its failure (a store into a mapped file with no room
            # would be a SIGBUS: the end of the listener and of every migration).
            (small_disk / "filler").write_bytes(b"x" * 16 * MiB)
            with pytest.raises(PeerAbortedError, match="no room for"):
                session.exchange_send(wire.Compress(entries=(wire.CompressRange(
                    value=1, block_idx=0, offset=remote[0].offset, length=20 * MiB),)))
                session.exchange_send(wire.RegisterFinished())
        assert "No space left on device" in listener.wait_for_log("no room for")
        # The same for a registration: the room for the peer's writes is made first.
        session, remote, endpoint = _hand_source(listener.port, [("mem", 12 * MiB)])
        with endpoint:
            (small_disk / "filler2").write_bytes(b"x" * 8 * MiB)
            with pytest.raises(PeerAbortedError, match="no room for 12582912 bytes"):
                session.exchange_send(wire.RegisterRequest(entries=(wire.Register.covering(
                    key=remote[0].offset, current_index=0, count=12),)),
                    reply=wire.Command.REGISTER_RESULT)
        assert listener.process.poll() is None
        for filler in ("filler", "filler2"):
            (small_disk / filler).unlink()
        assert_serves(listener)


def test_a_service_keeps_no_more_images_or_bytes_than_its_quotas(tmp_path: Path) -> None:
    # A listener without a key takes images from anyone: quotas bound what it keeps.
    with service(tmp_path / "images", "--max-images", "2") as listener:
        for _ in range(2):
            assert_serves(listener)
        _result, error, _block = real_migration(listener.port)
        assert error is not None and "keeps at most 2 images (--max-images)" in error
        assert len(listener.images_made()) == 2
    with service(tmp_path / "more", "--max-bytes", "6M") as listener:
        assert_serves(listener)  # 4 MiB of random bytes: 4 MiB allocated
        _result, error, _block = real_migration(listener.port)
        assert error is not None and "at most 6291456 bytes of images (--max-bytes)" in error
        assert_serves(listener, size=MiB)


def test_names_that_look_like_the_images_own_files_change_nothing_of_it(
        tmp_path: Path) -> None:
    with service(tmp_path / "images") as listener:
        names = ["state.bin", "manifest.json", "../escape", ".", "..", "a/b", "a_b"]
        for index, name in enumerate(names):
            result, error, _block = real_migration(listener.port, name=name, seed=index)
            assert error is None and result.committed, error
        images = listener.images_made()
        assert sorted(image.manifest.blocks[0].name for image in images) == sorted(names)
        for image in images:
            assert image.verify() == []
            assert sorted(os.listdir(image.path)) == ["blocks", "manifest.json", "state.bin"]
        assert not (tmp_path / "escape").exists()


# ---------------------------------------------------------------- registrations


def _hand_source(port: int, blocks: list[tuple[str, int]]
                 ) -> tuple[ControlSession, list[wire.DestBlock], TcpEndpoint]:
    """A source driven a message at a time over a real TCP endpoint."""
    endpoint = TcpBackend().connect(host=HOST, port=port, requested=SOURCE_DEFAULTS,
                                    timeout=20)
    session = ControlSession(endpoint, role=Role.SOURCE, capabilities=endpoint.capabilities,
                             timeout=20)
    payload = stream.encode_blocks(blocks)
    data = stream.MAGIC + stream.RECORD.pack(stream.Tag.BLOCKS, len(payload)) + payload
    session.exchange_send(wire.QemuFile(data=data))
    reply = session.exchange_send(wire.RamBlocksRequest(),
                                  reply=wire.Command.RAM_BLOCKS_RESULT)
    assert isinstance(reply, wire.RamBlocksResult)
    return session, list(reply.blocks), endpoint


def test_pins_over_the_destinations_cap_are_refused(tmp_path: Path) -> None:
    with service(tmp_path / "images", "--max-pinned", "2M") as listener:
        session, remote, endpoint = _hand_source(listener.port, [("mem", 8 * MiB)])
        with endpoint:
            session.exchange_send(wire.RegisterRequest(entries=(wire.Register.covering(
                key=remote[0].offset, current_index=0, count=2),)),
                reply=wire.Command.REGISTER_RESULT)
            with pytest.raises(PeerAbortedError, match=r"allows 2097152 \(--max-pinned\)"):
                session.exchange_send(wire.RegisterRequest(entries=(wire.Register.covering(
                    key=remote[0].offset + 2 * MiB, current_index=0, count=1),)),
                    reply=wire.Command.REGISTER_RESULT)
        assert "this destination allows 2097152 (--max-pinned)" in listener.wait_for_log(
            "failed")
        assert listener.status("VmLck") == 0
        _result, error, _block = real_migration(listener.port)  # pins 4 MiB
        assert error is not None and "this destination allows 2097152" in error
        assert_serves(listener, size=2 * MiB)


def test_a_registration_overlapping_another_is_refused(tmp_path: Path) -> None:
    with service(tmp_path / "images") as listener:
        session, remote, endpoint = _hand_source(listener.port, [("mem", 8 * MiB)])
        with endpoint:
            session.exchange_send(wire.RegisterRequest(entries=(wire.Register.covering(
                key=remote[0].offset, current_index=0, count=2),)),
                reply=wire.Command.REGISTER_RESULT)
            # Inside the first: the same region again, nothing pinned twice.
            inner = session.exchange_send(wire.RegisterRequest(entries=(wire.Register.covering(
                key=remote[0].offset + MiB, current_index=0, count=1),)),
                reply=wire.Command.REGISTER_RESULT)
            assert isinstance(inner, wire.RegisterResult)
            with pytest.raises(PeerAbortedError, match="overlap a registration"):
                session.exchange_send(wire.RegisterRequest(entries=(wire.Register.covering(
                    key=remote[0].offset + MiB, current_index=0, count=2),)),
                    reply=wire.Command.REGISTER_RESULT)
        assert "overlap a registration" in listener.wait_for_log("failed")
        assert_serves(listener)


# ---------------------------------------------------------------- stalls and floods


def test_a_write_that_stops_halfway_ends_its_migration_and_unpins(tmp_path: Path) -> None:
    with service(tmp_path / "images", "--timeout", "3") as listener:
        peer = RawPeer(listener.port)
        peer.hello()
        declare(peer, [("mem", 4 * MiB)])
        assert isinstance(peer.recv(), wire.Ready)
        peer.send(wire.RamBlocksRequest())
        blocks = peer.recv()
        assert isinstance(blocks, wire.RamBlocksResult)
        assert isinstance(peer.recv(), wire.Ready)
        peer.send(wire.RegisterRequest(entries=(wire.Register.covering(
            key=blocks.blocks[0].offset, current_index=0, count=1),)))
        keys = peer.recv()
        assert isinstance(keys, wire.RegisterResult)
        assert listener.status("VmLck") >= MiB
        # A 1 MiB write of which 10 bytes come, then a message that waits for it.
        peer.sock.sendall(header(Kind.WRITE, length=MiB, rkey=keys.entries[0].rkey,
                                 remote_addr=keys.entries[0].host_addr, flags=1) + b"x" * 10)
        assert peer.is_closed_by_peer(60)
        assert listener.wait_for_log("failed")
        assert listener.status("VmLck") == 0
        assert listener.leftovers() == []
        assert_serves(listener)


def test_sends_that_never_wait_for_ready_are_refused(tmp_path: Path) -> None:
    with service(tmp_path / "images") as listener:
        peer = RawPeer(listener.port)
        peer.hello()
        rss = listener.status("VmRSS")
        peer.posted_writes = 1  # every SEND waits for a write that never comes
        big = wire.encode(wire.QemuFile(data=bytes(wire.MAX_DATA)))
        try:
            for _ in range(600):
                peer.send(big)
        except OSError:
            pass  # the listener broke the connection: the point of the test
        assert peer.is_closed_by_peer(30)
        assert "does not wait for READY" in listener.wait_for_log("failed")
        # 600 messages of 512 KiB would be 300 MiB; the listener held 16 at most.
        assert listener.status("VmRSS") - rss < 64 * MiB
        assert_serves(listener)


# ---------------------------------------------------------------- the end


def test_a_write_after_the_hashes_changes_nothing_exposed(tmp_path: Path) -> None:
    with service(tmp_path / "images") as listener:
        size = 2 * MiB
        session, remote, endpoint = _hand_source(listener.port, [("mem", size)])
        with endpoint:
            reply = session.exchange_send(wire.RegisterRequest(entries=(wire.Register.covering(
                key=remote[0].offset, current_index=0, count=2),)),
                reply=wire.Command.REGISTER_RESULT)
            assert isinstance(reply, wire.RegisterResult)
            key = reply.entries[0]
            local = bytearray(b"\x07" * size)
            region = endpoint.register(buffer=memoryview(local), remote_write=False)
            ticket = endpoint.post_writes(writes=[RemoteWrite(
                region=region, offset=0, length=size, remote_addr=key.host_addr,
                rkey=key.rkey)])
            endpoint.wait_writes(ticket=ticket, timeout=20)
            session.exchange_send(wire.RegisterFinished())
            end = stream.RECORD.pack(stream.Tag.END, 0)
            session.exchange_send(wire.QemuFile(data=end))
            session.wait_ready()  # everything before END is in place
            digest = content_digest(local)
            verdict = session.send_request(wire.BlockHashes(entries=(
                wire.BlockHash(block_idx=0, digest=digest),)), reply=wire.Command.VERIFY_RESULT)
            assert isinstance(verdict, wire.VerifyResult) and verdict.mismatched == 0
            # Verified: the keys are gone, a write with them is a remote access error
            # (or, when the listener drops the broken session first, a closed
            # connection: either way the write is refused).
            local[:] = b"\x66" * size
            ticket = endpoint.post_writes(writes=[RemoteWrite(
                region=region, offset=0, length=size, remote_addr=key.host_addr,
                rkey=key.rkey)])
            with pytest.raises(TransportError,
                               match=r"remote access error|peer closed the connection"):
                endpoint.wait_writes(ticket=ticket, timeout=20)
        log = listener.wait_for_log("migration 1")
        assert "failed" in log  # no COMMIT came: nothing is kept
        assert listener.images_made() == []
        assert_serves(listener)


def test_an_image_path_planted_beforehand_is_left_alone(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("mine")
    with service(images) as listener:
        # The next image's name, for the seconds to come, is a link elsewhere.
        now = time.time()
        for second in range(30):
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + second))
            (images / f"{stamp}-0001").symlink_to(target)
        _result, error, _block = real_migration(listener.port)
        assert error is not None
        assert "exists; an image is never written over anything" in listener.wait_for_log(
            "failed")
        assert os.listdir(target) == ["precious"]
        for link in images.iterdir():
            link.unlink()
        assert_serves(listener)


def test_a_low_open_file_limit_is_raised_for_blocks_that_keep_a_descriptor(
        tmp_path: Path) -> None:
    # 256 blocks (the most a source may declare), each a mapping with a descriptor,
    # under a soft limit of 200.
    with service(tmp_path / "images", wrapper=("prlimit", "--nofile=200:4096")) as listener:
        result, error, _block = real_migration(listener.port, size=MiB, blocks=256)
        assert error is None and result.committed, listener.log.read_text()
