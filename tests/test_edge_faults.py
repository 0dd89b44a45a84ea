"""The DICOM edge under attack: idle sockets, huge PDUs, bombs, a full disk, lying C-STOREs.

Each test reproduces one finding of the fault campaign (issue 9, and issue 10 item 7) against a
running node, with raw sockets on loopback, DCMTK and pynetdicom SCUs. ``127.0.0.2`` plays a
second host.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import NodeFactory, RunningNode, run_dcmtk, store_successes, storescu
from hostile import (
    ATTACKER,
    HALF_OPEN_RQ,
    closed_by_peer,
    connect_from,
    deflate_bomb,
    encode,
    flip_vr,
    pdu_header,
    peak_rss_mb,
    raw_c_store,
    replace_uid_bytes,
    reset_peak_rss,
    rss_mb,
    tls_client_context,
)
from pki import dcmtk_tls_args, make_pki, tls_node_settings
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from synthetic import ct_series, write_series


def _echo(port: int, *extra: str, timeout: float = 60) -> str:
    result = run_dcmtk("echoscu", "-v", "-to", "10", "-ta", "10", "-td", "10", *extra, "-aet", "ECHOSCU",
                       "-aec", "DICOMNODE", "127.0.0.1", str(port), timeout=timeout)
    return result.stdout + result.stderr


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


ECHO_OK = "Received Echo Response (Success)"


# --- 1. idle and half-open sockets ---------------------------------------------------------------


def test_idle_and_half_open_sockets_block_nobody_and_are_closed_by_the_timeouts(
    make_node: NodeFactory,
) -> None:
    """Issue 9.1: 17 sockets that never finish an A-ASSOCIATE-RQ used to make every real
    association fail (local limit exceeded) for as long as they stayed open."""
    acse_timeout = 5
    node = make_node(node={"acse_timeout": acse_timeout, "network_timeout": 8, "max_associations": 4})
    sockets = [connect_from(ATTACKER, node.port) for _ in range(17)]
    try:
        for i, sock in enumerate(sockets):
            if i % 2:
                with contextlib.suppress(OSError):  # those over the per-host cap are reset already
                    sock.sendall(HALF_OPEN_RQ)  # the others stay silent
        time.sleep(0.3)
        assert ECHO_OK in _echo(node.port)
        # The configured timeouts close every one of them (slack for a loaded CI machine).
        deadline = time.monotonic() + acse_timeout + 5
        for sock in sockets:
            assert closed_by_peer(sock, deadline - time.monotonic()), "socket still open after acse_timeout"
    finally:
        for sock in sockets:
            sock.close()
    assert ECHO_OK in _echo(node.port)


def test_a_socket_flood_from_one_host_costs_a_bounded_number_of_threads(make_node: NodeFactory) -> None:
    """Issue 9.1: threads grew from 7 to 151 under idle sockets. Connections over the per-host
    cap are reset by the accept thread itself: no thread, no buffer."""
    node = make_node()
    per_host = node.node.config.node.negotiation_per_host
    before = threading.active_count()
    sockets = [connect_from(ATTACKER, node.port) for _ in range(60)]
    try:
        time.sleep(0.5)
        grown = threading.active_count() - before
        # An admitted connection has an association thread and a DUL reader thread.
        assert grown <= 2 * per_host + 2, f"{grown} threads for 60 idle sockets"
        reset = sum(closed_by_peer(sock, 0.5) for sock in sockets)
        assert reset == 60 - per_host
        assert node.node.receiver.connections()["negotiating"] == per_host
    finally:
        for sock in sockets:
            sock.close()
    assert ECHO_OK in _echo(node.port)


# --- 2. PDUs longer than the negotiated maximum --------------------------------------------------


def _stream_after_header(sock: object, header: bytes, limit: int) -> int:
    """Send ``header`` and then zeros until the node stops us or ``limit`` bytes are out."""
    chunk = bytes(2**20)
    sent = 0
    with contextlib.suppress(OSError):
        sock.sendall(header)  # type: ignore[attr-defined]
        while sent < limit:
            sock.sendall(chunk)  # type: ignore[attr-defined]
            sent += len(chunk)
    return sent


@pytest.mark.parametrize("when", ["before association", "in an association"])
def test_pdu_longer_than_the_maximum_is_refused_without_buffering(make_node: NodeFactory, when: str) -> None:
    """Issue 9.2: a PDU header announcing 0xFFFFFFFF bytes made the node buffer what followed
    (256 MiB took RSS from 114 to 621 MB) and the connection stayed open."""
    node = make_node()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    assoc = None
    if when == "before association":
        sock = connect_from("127.0.0.1", node.port, timeout=10)
        header = pdu_header(0x01, 0xFFFFFFFF)
    else:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert assoc.is_established
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        sock.settimeout(10)
        header = pdu_header(0x04, 0xFFFFFFF0)
    reset_peak_rss()
    before = rss_mb()
    try:
        sent = _stream_after_header(sock, header, 256 * 2**20)
    finally:
        if assoc is not None:
            assoc.abort()
        else:
            sock.close()
    growth = peak_rss_mb() - before
    assert sent < 64 * 2**20, f"the node read {sent // 2**20} MiB of a PDU it should have refused"
    assert growth < 48, f"RSS grew by {growth:.0f} MB"
    assert ECHO_OK in _echo(node.port)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_pdu_stalled_in_an_association_is_ended_by_network_timeout(
    make_node: NodeFactory, pki: dict[str, Path], tls: bool
) -> None:
    """Issue 9.1: pynetdicom's reader blocked in recv() on a PDU that never completed, and the
    association's own network timeout could not end it (kill() waited on that reader)."""
    network_timeout = 3
    tls_port = _free_port()
    node = make_node(node={"network_timeout": network_timeout, "tls": tls_node_settings(pki, tls_port)})
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    tls_args = None
    if tls:
        tls_args = (tls_client_context(str(pki["ca_crt"]), str(pki["client_crt"]), str(pki["client_key"])), "127.0.0.1")
    assoc = ae.associate("127.0.0.1", tls_port if tls else node.port, ae_title="DICOMNODE", tls_args=tls_args)
    assert assoc.is_established
    try:
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        sock.sendall(pdu_header(0x04, 100) + bytes(10))  # 10 of 100 bytes, then silence
        assert _wait_until(lambda: assoc.is_aborted or not assoc.is_alive(), network_timeout + 10), \
            "the node kept the stalled association open"
    finally:
        if assoc.is_established:
            assoc.abort()
    assert ECHO_OK in _echo(node.port)


# --- 3. slots: connect-and-close, and only live associations count -------------------------------


def test_connect_and_close_frees_its_slot_at_once(make_node: NodeFactory) -> None:
    """Issue 9.3: 17 connections opened and closed at once made every association fail for the
    whole ACSE timeout (28 s of 30 s with the shipped defaults)."""
    node = make_node()  # shipped defaults: 16 associations, acse_timeout 30 s
    for sock in [connect_from(ATTACKER, node.port) for _ in range(17)]:
        sock.close()
    time.sleep(0.2)
    assert ECHO_OK in _echo(node.port)
    receiver = node.node.receiver
    assert _wait_until(lambda: receiver.connections()["negotiating"] == 0, 5), receiver.connections()


def test_association_limit_counts_live_associations_only(make_node: NodeFactory) -> None:
    """Issue 9.3: with a limit of 8, only 3-7 of 20 simultaneous callers got in, because
    rejected associations that had not closed yet still counted."""
    limit, callers = 8, 20
    node = make_node(node={"max_associations": limit, "negotiation_per_host": callers})
    start = threading.Barrier(callers)
    finished = threading.Barrier(callers + 1)
    outcomes: list[str] = []
    lock = threading.Lock()

    def call() -> None:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(Verification)
        start.wait()
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        with lock:
            if assoc.is_established:
                outcomes.append("established")
            elif assoc.is_rejected:
                rsd = assoc.acceptor.primitive
                outcomes.append(f"rejected {rsd.result:02x}/{rsd.result_source:02x}/{rsd.diagnostic:02x}")
            else:
                outcomes.append("failed")
        finished.wait()  # hold the association until every caller has its answer
        if assoc.is_established:
            assoc.release()

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    finished.wait(timeout=60)
    for thread in threads:
        thread.join(30)
    assert outcomes.count("established") == limit, outcomes
    # The others: A-ASSOCIATE-RJ transient, presentation-related, local limit exceeded.
    assert outcomes.count("rejected 02/03/02") == callers - limit, outcomes


# --- 4. TLS handshakes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("edge") / "pki")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_silent_tls_connection_blocks_no_tls_client(make_node: NodeFactory, pki: dict[str, Path]) -> None:
    """Issue 9.4: the TLS handshake ran with no timeout in the single accept thread, so one
    silent TCP connection to the TLS port blocked every TLS client."""
    tls_port = _free_port()
    node = make_node(node={"acse_timeout": 5, "tls": tls_node_settings(pki, tls_port)})
    silent = connect_from(ATTACKER, tls_port)
    try:
        time.sleep(0.2)
        try:
            output = _echo(tls_port, *dcmtk_tls_args(pki), timeout=30)
        except subprocess.TimeoutExpired:
            output = "echoscu hung for 30 s"
        assert ECHO_OK in output, output
        assert closed_by_peer(silent, 5 + 5), "the silent TLS connection is still open after acse_timeout"
    finally:
        silent.close()
    assert ECHO_OK in _echo(node.port)


# --- 5. deflate bomb -----------------------------------------------------------------------------


def test_deflate_bomb_is_refused_without_inflating_it(make_node: NodeFactory) -> None:
    """Issue 9.5: 512 KiB of Deflated Explicit VR inflating to 512 MiB took RSS from 116 to
    1,152 MB and was answered Success."""
    node = make_node()
    sop_instance = "1.2.826.0.1.3680043.8.498.9001"
    bomb = deflate_bomb(512, sop_instance)
    assert len(bomb) < 2**20
    reset_peak_rss()
    before = rss_mb()
    status = raw_c_store(node.port, CTImageStorage, sop_instance, bomb, syntax=DeflatedExplicitVRLittleEndian)
    growth = peak_rss_mb() - before
    assert status.Status == 0xA700, status
    assert "max_instance_mb" in status.ErrorComment
    assert growth < 64, f"RSS grew by {growth:.0f} MB"
    assert node.ledger.count_instances() == 0


# --- 6. full disk --------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path, *appending: Path) -> None:
    """Write until the file system has not one byte left, then top up the last page of each file
    in ``appending`` (tmpfs allocates whole pages: a short append to a file whose last page has
    room would still succeed). Blank lines keep a JSON-lines file readable."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (2**16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(size))
    finally:
        os.close(fd)
    for path in appending:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\n")
        finally:
            os.close(fd)
    assert os.statvfs(folder).f_bavail == 0


def test_full_disk_refuses_with_a700_even_when_the_audit_line_cannot_be_written(
    make_node: NodeFactory, tmp_path: Path, ct_folder: Path
) -> None:
    """Issue 9.6: with 0 bytes free the audit line written before the refusal raised "no space
    left", the handler failed and the sender got 0xC211 (permanent) instead of 0xA700."""
    with _tmpfs(tmp_path / "tiny", "2m") as mount:
        node = make_node(node={"min_free_mb": 0, "data_dir": str(mount / "data")})
        _fill(mount, mount / "data" / "audit.jsonl")
        result = storescu(node.port, sorted(ct_folder.iterdir())[0])
        output = result.stdout + result.stderr
        assert "Refused: OutOfResources" in output, output
        assert ECHO_OK in _echo(node.port)
        node.node.stop()


def test_full_audit_disk_never_turns_success_into_failure(
    make_node: NodeFactory, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 9.6: audit writes must never change a C-STORE status, and the release handler must
    still hand the release to assembly when the audit line cannot be written."""
    data = tmp_path / "data"
    data.mkdir()
    audit = data / "audit.jsonl"
    audit.touch()
    with _tmpfs(tmp_path / "auditfs", "64k") as fs:
        (fs / "audit.jsonl").touch()
        subprocess.run(["mount", "--bind", str(fs / "audit.jsonl"), str(audit)], check=True)
        try:
            node = make_node(node={"data_dir": str(data)}, assembly={"quiet_period_s": 120})
            _fill(fs, fs / "audit.jsonl")
            series = write_series(ct_series(3, seed="audit-full"), tmp_path_factory.mktemp("audit-full"))
            result = storescu(node.port, *series)
            assert store_successes(result) == 3, result.stdout + result.stderr
            import pydicom

            uid = pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID
            assert _wait_until(lambda: node.ledger.series_row(uid).released_at is not None, 10)
            node.node.stop()
        finally:
            subprocess.run(["umount", "-l", str(audit)], check=False)


# --- 7. SOP class against the presentation context -----------------------------------------------


@pytest.mark.parametrize("context_for", [Verification, MRImageStorage])
def test_c_store_on_another_sop_class_context_is_refused(running_node: RunningNode, context_for: str) -> None:
    """Issue 9.7: CT instances sent on the Verification context or on an MR Image Storage context
    got Success and were stored as CT."""
    ds = ct_series(1, seed=f"wrong-context-{context_for}")[0]
    status = raw_c_store(running_node.port, CTImageStorage, ds.SOPInstanceUID, encode(ds),
                         context_for=context_for)
    assert status.Status == 0x0122, status  # Refused: SOP Class not supported (on this context)
    assert running_node.ledger.count_instances() == 0
    assert not list((running_node.node.spool.root / "instances").rglob("*.dcm"))


# --- 8. invalid UIDs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "value"),
    [(0x00080018, b" {sop}"), (0x0020000D, b" 1.2.3"), (0x0020000E, b"1.2.3 4"), (0x0020000E, b"1.2.3\x00\x00"),
     (0x0020000D, b"1.2.3  ")],
    ids=["sop-leading-space", "study-leading-space", "series-inner-space", "series-two-nulls",
         "study-two-spaces"],
)
def test_invalid_uid_bytes_are_refused(running_node: RunningNode, tag: int, value: bytes) -> None:
    """Issue 9.8: a UID with a leading space (" 1.2.3") was accepted and indexed as 1.2.3."""
    ds = ct_series(1, seed=f"uid-bytes-{tag}-{value!r}")[0]
    raw = replace_uid_bytes(encode(ds), tag, value.replace(b"{sop}", ds.SOPInstanceUID.encode()))
    status = raw_c_store(running_node.port, CTImageStorage, ds.SOPInstanceUID, raw)
    assert status.Status == 0xC000, status
    assert "UID" in status.ErrorComment
    assert running_node.ledger.count_instances() == 0


def test_uid_padding_allowed_by_the_standard_is_accepted(running_node: RunningNode) -> None:
    ds = ct_series(1, seed="uid-padding")[0]
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.12345"  # odd length: one trailing NULL pad
    status = raw_c_store(running_node.port, CTImageStorage, ds.SOPInstanceUID, encode(ds))
    assert status.Status == 0x0000, status
    assert running_node.ledger.instance(ds.SOPInstanceUID).study_instance_uid == ds.StudyInstanceUID


# --- issue 10.7: a header that does not parse ----------------------------------------------------


def test_unknown_vr_is_refused_at_the_door(running_node: RunningNode, tmp_path: Path) -> None:
    """Issue 10.7: one instance whose Image Orientation (Patient) VR reads DW (one bit from DS)
    got Success and later wiped out the series' results. It must be refused with 0xC000."""
    datasets = ct_series(11, seed="vr-flip")
    result = storescu(running_node.port, *write_series(datasets[:10], tmp_path / "good"))
    assert store_successes(result) == 10
    bad = datasets[10]
    raw = flip_vr(encode(bad), 0x00200037, b"DW")
    status = raw_c_store(running_node.port, CTImageStorage, bad.SOPInstanceUID, raw)
    assert status.Status == 0xC000, status
    assert "DW" in status.ErrorComment
    assert running_node.ledger.count_instances() == 10
    assert running_node.ledger.instance(bad.SOPInstanceUID) is None


def test_known_but_unusual_vrs_still_pass(running_node: RunningNode) -> None:
    """The VR check knows every VR of PS3.5 6.2, including the 64-bit ones and UN."""
    ds = ct_series(1, seed="vr-unusual")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.add_new(0x00091010, "UN", b"\x01\x02")
        ds.add_new(0x00091011, "OV", b"\x00" * 8)
        ds.add_new(0x00091012, "UV", 7)
        ds.add_new(0x00091013, "SV", -7)
        ds.add_new(0x00091014, "UC", "x" * 70)
        ds.add_new(0x00091015, "UR", "http://example.org")
        ds.add_new(0x00090010, "LO", "PRIVATE TEST")
    status = raw_c_store(running_node.port, CTImageStorage, ds.SOPInstanceUID, encode(ds))
    assert status.Status == 0x0000, status
