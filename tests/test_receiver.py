"""Receiver: real DCMTK peers store, echo and get rejected; bad input gets the right status."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from conftest import NodeFactory, RunningNode, run_dcmtk, store_successes, storescu
from hostile import raw_c_store
from pki import make_pki
from pydicom.dataset import Dataset
from pydicom.filereader import read_preamble
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification
from synthetic import ct_series, write_series

from dicomnode.receiver import IMPLEMENTATION_CLASS_UID


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file: everything after the File Meta Information."""
    with path.open("rb") as fp:
        read_preamble(fp, False)
        pydicom.filereader._read_file_meta_info(fp)
        return fp.read()


def spool_file(node: RunningNode, sop_uid: str) -> Path:
    row = node.ledger.instance(sop_uid)
    assert row is not None, f"no ledger row for {sop_uid}"
    return node.node.spool.path(row.path)


def test_echo_answers_with_own_implementation_uid(running_node: RunningNode) -> None:
    result = run_dcmtk("echoscu", "-d", "-aet", "ECHOSCU", "-aec", "DICOMNODE", "127.0.0.1",
                       str(running_node.port))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in output
    assert "DICOMNODE_0.1.0" in output


def test_storescu_series_stored_byte_exact_and_indexed(running_node: RunningNode, ct_folder: Path) -> None:
    result = storescu(running_node.port, ct_folder)
    assert store_successes(result) == 12, result.stdout + result.stderr
    sent = sorted(ct_folder.iterdir())
    for path in sent:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = spool_file(running_node, ds.SOPInstanceUID)
        assert dataset_bytes(stored) == dataset_bytes(path)
        row = running_node.ledger.instance(ds.SOPInstanceUID)
        assert row.calling_ae == "STORESCU"
        assert row.peer_host == "127.0.0.1"
        assert row.size == stored.stat().st_size
        assert row.transfer_syntax_uid == ExplicitVRLittleEndian
        assert row.series_instance_uid == ds.SeriesInstanceUID
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.SourceApplicationEntityTitle == "STORESCU"
    series = running_node.ledger.series_row(ds.SeriesInstanceUID)
    assert series.instance_count == 12
    assert series.modality == "CT"
    assert series.body_part == "HEAD"


@pytest.mark.parametrize(
    ("syntax", "flag", "encoder"),
    [
        (RLELossless, "-xr", None),
        (JPEG2000Lossless, "-xv", None),
        (ImplicitVRLittleEndian, "-xi", None),
        ("1.2.840.10008.1.2.4.70", "-xs", ("dcmcjpeg", "+e1")),  # JPEG Lossless SV1
        ("1.2.840.10008.1.2.4.50", "-xy", ("dcmcjpeg", "+eb")),  # JPEG Baseline (8 bit)
        ("1.2.840.10008.1.2.4.80", "-xt", ("dcmcjpls", "+el")),  # JPEG-LS Lossless
    ],
)
def test_compressed_syntaxes_stored_as_received(
    running_node: RunningNode, tmp_path: Path, syntax: str, flag: str, encoder: tuple[str, str] | None
) -> None:
    datasets = ct_series(3, seed=f"ts-{syntax}")
    if syntax == "1.2.840.10008.1.2.4.50":
        for ds in datasets:  # JPEG baseline needs 8-bit samples
            import numpy as np

            pixels = (np.frombuffer(ds.PixelData, np.uint16) >> 4).astype(np.uint8)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = pixels.tobytes()
    if encoder is None:
        files = write_series(datasets, tmp_path / "src", pydicom.uid.UID(syntax))
    else:
        plain = write_series(datasets, tmp_path / "plain")
        (tmp_path / "src").mkdir()
        files = []
        for path in plain:
            out = tmp_path / "src" / path.name
            result = run_dcmtk(encoder[0], encoder[1], str(path), str(out))
            assert result.returncode == 0, result.stderr
            files.append(out)
    result = storescu(running_node.port, tmp_path / "src", extra=(flag,))
    assert store_successes(result) == 3, result.stdout + result.stderr
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        stored = spool_file(running_node, ds.SOPInstanceUID)
        assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        if syntax != ImplicitVRLittleEndian:  # storescu re-encodes explicit files it sends implicit
            assert dataset_bytes(stored) == dataset_bytes(path)
        assert running_node.ledger.instance(ds.SOPInstanceUID).transfer_syntax_uid == syntax


def test_deflate_accepted(running_node: RunningNode, tmp_path: Path) -> None:
    ds = ct_series(1, seed="deflate")[0]
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", running_node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    stored = pydicom.dcmread(spool_file(running_node, ds.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert stored.PixelData == ds.PixelData


def test_duplicate_sop_instance_is_success_with_one_row(running_node: RunningNode, ct_folder: Path) -> None:
    one = sorted(ct_folder.iterdir())[0]
    for _ in range(2):
        assert store_successes(storescu(running_node.port, one)) == 1
    sop = pydicom.dcmread(one, stop_before_pixels=True).SOPInstanceUID
    assert running_node.ledger.count_instances() == 1
    assert running_node.ledger.series_row(
        pydicom.dcmread(one, stop_before_pixels=True).SeriesInstanceUID
    ).instance_count == 1
    assert spool_file(running_node, sop).exists()
    events = [r["event"] for r in running_node.node.audit.recent]
    assert events.count("instance.stored") == 1 and events.count("instance.duplicate") == 1


def test_duplicate_under_another_series_keeps_the_first_copy_only(
    running_node: RunningNode, tmp_path: Path
) -> None:
    first = ct_series(1, seed="dup-moved")[0]
    moved = ct_series(1, seed="dup-moved")[0]
    moved.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    paths = write_series([first], tmp_path / "a") + write_series([moved], tmp_path / "b")
    for path in paths:
        assert store_successes(storescu(running_node.port, path)) == 1
    assert running_node.ledger.count_instances() == 1
    row = running_node.ledger.instance(first.SOPInstanceUID)
    assert first.SeriesInstanceUID in row.path
    spooled = sorted(running_node.node.spool.files())
    assert spooled == [row.path]


def test_transfer_syntax_preference_never_asks_for_lossy(running_node: RunningNode) -> None:
    """pynetdicom takes the acceptor's order: ours prefers uncompressed explicit VR, then lossless."""
    offers = {
        (JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian): ExplicitVRLittleEndian,
        (JPEGBaseline8Bit, JPEG2000Lossless, ImplicitVRLittleEndian): JPEG2000Lossless,
        (JPEGBaseline8Bit, ImplicitVRLittleEndian): ImplicitVRLittleEndian,
        (JPEGBaseline8Bit,): JPEGBaseline8Bit,
        (JPEGLSNearLossless, RLELossless): RLELossless,
    }
    ae = AE(ae_title="PYNETDICOM")
    for offer in offers:
        ae.add_requested_context(CTImageStorage, list(offer))
    ae.add_requested_context(MRImageStorage, ["1.2.840.10008.1.2.4.204"])  # JPIP HTJ2K Referenced
    assoc = ae.associate("127.0.0.1", running_node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        accepted = {tuple(cx.transfer_syntax): cx for cx in assoc.requestor.requested_contexts}
        results = {cx.context_id: cx for cx in assoc.accepted_contexts + assoc.rejected_contexts}
        for offer, expected in offers.items():
            context = results[accepted[offer].context_id]
            assert context.result == 0x00 and context.transfer_syntax == [expected], offer
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [MRImageStorage]
    finally:
        assoc.release()


# --- association policy --------------------------------------------------------------------------


def _echo(port: int, calling: str, called: str = "DICOMNODE") -> str:
    result = run_dcmtk("echoscu", "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port))
    return result.stdout + result.stderr


def test_unknown_calling_ae_rejected_permanently_reason_3(running_node: RunningNode) -> None:
    output = _echo(running_node.port, "INTRUDER")
    assert "Rejected Permanent" in output and "Calling AE Title Not Recognized" in output, output
    assert "Peer aborted" not in output
    # The node keeps serving.
    assert "Received Echo Response (Success)" in _echo(running_node.port, "ECHOSCU")


def test_known_ae_from_wrong_host_rejected(make_node: NodeFactory) -> None:
    node = make_node(peers=[{"ae_title": "ECHOSCU", "hosts": ["127.0.0.2"]}])
    output = _echo(node.port, "ECHOSCU")
    assert "Rejected Permanent" in output and "Calling AE Title Not Recognized" in output, output
    events = [r for r in node.node.audit.recent if r["event"] == "association.rejected"]
    assert "not allowed from host 127.0.0.1" in events[-1]["reason"]


def test_wrong_called_ae_rejected_reason_7(running_node: RunningNode) -> None:
    output = _echo(running_node.port, "ECHOSCU", called="SOMEONEELSE")
    assert "Rejected Permanent" in output and "Called AE Title Not Recognized" in output, output
    rejected = [r for r in running_node.node.audit.recent if r["event"] == "association.rejected"]
    assert rejected[-1]["reason"] == "called AE title 'SOMEONEELSE' is not 'DICOMNODE'"


def test_rejected_associations_leave_no_state_behind(running_node: RunningNode) -> None:
    for calling, called in [("INTRUDER", "DICOMNODE"), ("ECHOSCU", "SOMEONEELSE")]:
        assert "Rejected Permanent" in _echo(running_node.port, calling, called)
    assert "Received Echo Response (Success)" in _echo(running_node.port, "ECHOSCU")
    receiver = running_node.node.receiver
    deadline = time.monotonic() + 5
    while receiver._association_ids and time.monotonic() < deadline:  # the release event may lag
        time.sleep(0.01)
    assert receiver._association_ids == {} and receiver._stored_by_association == {}


def test_over_max_associations_rejected_transiently(make_node: NodeFactory) -> None:
    node = make_node(node={"max_associations": 1})
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert held.is_established
    try:
        output = _echo(node.port, "ECHOSCU")
        assert "Rejected Transient" in output, output
    finally:
        held.release()
    rejected = [r for r in node.node.audit.recent if r["event"] == "association.rejected"]
    assert rejected[-1]["reason"] == "association limit (1) reached"
    assert "Received Echo Response (Success)" in _echo(node.port, "ECHOSCU")


def test_peer_added_at_runtime_accepted_on_next_association(running_node: RunningNode) -> None:
    from dicomnode.config import Peer

    assert "Rejected Permanent" in _echo(running_node.port, "NEWSCANNER")
    running_node.node.receiver.update_peers([Peer(ae_title="NEWSCANNER")])
    assert "Received Echo Response (Success)" in _echo(running_node.port, "NEWSCANNER")


# --- bad input -----------------------------------------------------------------------------------


def _encode(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buffer, ds)
    return buffer.getvalue()


def test_garbage_dataset_is_cannot_understand(running_node: RunningNode) -> None:
    status = raw_c_store(running_node.port, CTImageStorage, "1.2.3.4", b"\x08\x00\x16\x00garbage" * 10)
    assert 0xC000 <= status.Status <= 0xCFFF
    assert status.ErrorComment
    assert running_node.ledger.count_instances() == 0


def test_truncated_dataset_is_cannot_understand(running_node: RunningNode) -> None:
    ds = ct_series(1, seed="truncated")[0]
    status = raw_c_store(running_node.port, CTImageStorage, ds.SOPInstanceUID, _encode(ds)[:-100])
    assert 0xC000 <= status.Status <= 0xCFFF, status
    assert "truncated" in status.ErrorComment
    assert running_node.ledger.count_instances() == 0


def test_sop_class_mismatch_is_a900(running_node: RunningNode) -> None:
    ds = ct_series(1, seed="mismatch")[0]
    ds.Modality = "MR"
    status = raw_c_store(running_node.port, CTImageStorage, ds.SOPInstanceUID, _encode(ds))
    assert status.Status == 0xA900
    assert "Modality" in status.ErrorComment
    ds = ct_series(1, seed="mismatch2")[0]
    status = raw_c_store(running_node.port, CTImageStorage, "1.2.3.999", _encode(ds))
    assert status.Status == 0xA900 and "SOPInstanceUID" in status.ErrorComment


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [("StudyInstanceUID", None, 0xA900), ("SeriesInstanceUID", None, 0xA900),
     ("SeriesInstanceUID", "../../../etc", 0xC000), ("StudyInstanceUID", "1.2.03", 0xC000)],
)
def test_missing_or_invalid_uids_refused(running_node: RunningNode, keyword: str, value: str | None,
                                         expected: int) -> None:
    ds = ct_series(1, seed=f"uid-{keyword}-{value}")[0]
    if value is None:
        delattr(ds, keyword)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the invalid value is the point of the test
            setattr(ds, keyword, value)
    status = raw_c_store(running_node.port, CTImageStorage, ds.SOPInstanceUID, _encode(ds))
    assert status.Status == expected, status
    assert running_node.ledger.count_instances() == 0
    assert not list((running_node.node.spool.root / "instances").rglob("*.dcm"))


def test_free_space_floor_refuses_with_a700_and_keeps_serving(make_node: NodeFactory, ct_folder: Path) -> None:
    node = make_node(node={"min_free_mb": 10**9})
    result = storescu(node.port, sorted(ct_folder.iterdir())[0])
    output = result.stdout + result.stderr
    assert "Refused: OutOfResources" in output, output
    assert node.ledger.count_instances() == 0
    assert "Received Echo Response (Success)" in _echo(node.port, "ECHOSCU")


def test_full_disk_refuses_with_a700(make_node: NodeFactory, tmp_path: Path, ct_folder: Path) -> None:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], check=True)
    try:
        node = make_node(node={"min_free_mb": 0, "data_dir": str(mount / "data")})
        # Each synthetic slice is ~8 KiB; 400 KiB fills after a few dozen.
        big = write_series(ct_series(4, 256, 256, seed="full"), tmp_path / "big")
        result = storescu(node.port, *big)
        output = result.stdout + result.stderr
        assert "Refused: OutOfResources" in output, output
        assert "Received Echo Response (Success)" in _echo(node.port, "ECHOSCU")
        stored = node.ledger.count_instances()
        assert stored < 4
        assert not list((mount / "data" / "spool" / "incoming").iterdir()), "temp debris left behind"
        node.node.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_garbage_bytes_on_socket_never_kill_the_node(running_node: RunningNode) -> None:
    import random

    rng = random.Random(7)
    payloads = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (1, 10, 100, 5000)]
    # A-ASSOCIATE-RQ type with absurd length, and a P-DATA before association.
    payloads += [b"\x01\x00" + struct.pack(">I", 0xFFFFFFF0) + b"\x00" * 20,
                 b"\x04\x00" + struct.pack(">I", 6) + b"\x00" * 6]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", running_node.port), timeout=5) as sock:
            sock.sendall(payload)
            time.sleep(0.05)
    threads = [threading.Thread(target=_echo, args=(running_node.port, "ECHOSCU")) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "Received Echo Response (Success)" in _echo(running_node.port, "ECHOSCU")


# --- TLS -----------------------------------------------------------------------------------------


def test_tls_echo_and_store_with_client_certificate(make_node: NodeFactory, tmp_path: Path,
                                                    ct_folder: Path) -> None:
    import socket as _socket

    pki = make_pki(tmp_path / "pki")
    with _socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        tls_port = probe.getsockname()[1]
    node = make_node(node={"tls": {"port": tls_port, "certificate": str(pki["server_crt"]),
                                   "private_key": str(pki["server_key"]),
                                   "ca_certificates": str(pki["ca_crt"]),
                                   "require_client_certificate": True}})
    assert tls_port in node.node.receiver.ports
    tls_args = ("+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca_crt"]))
    result = run_dcmtk("echoscu", "-v", *tls_args, "-aet", "ECHOSCU", "-aec", "DICOMNODE", "127.0.0.1",
                       str(tls_port))
    assert "Received Echo Response (Success)" in result.stdout + result.stderr, result.stderr
    result = storescu(tls_port, sorted(ct_folder.iterdir())[0], extra=tls_args)
    assert store_successes(result) == 1, result.stdout + result.stderr
    # Without a client certificate the TLS handshake is refused; the node keeps serving.
    result = run_dcmtk("echoscu", "-v", "+tla", "+cf", str(pki["ca_crt"]), "-aet", "ECHOSCU", "-aec",
                       "DICOMNODE", "127.0.0.1", str(tls_port))
    assert "Received Echo Response (Success)" not in result.stdout + result.stderr
    assert "Received Echo Response (Success)" in _echo(node.port, "ECHOSCU")


# --- per-association and per-instance costs -------------------------------------------------------


@pytest.mark.parametrize(
    ("syntax", "calling"),
    [(ExplicitVRLittleEndian, "STORESCU"), (ImplicitVRLittleEndian, "A"), (JPEG2000Lossless, ""),
     (DeflatedExplicitVRLittleEndian, "ABCDEFGHIJKLMNOP")],
)
def test_file_meta_bytes_match_pydicom(syntax: str, calling: str) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from dicomnode.receiver import IMPLEMENTATION_VERSION_NAME, file_meta_bytes

    for sop in ("1.2.3.4", "1.2.3.45"):  # odd and even lengths: UI padding
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = syntax
        meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        if calling:
            meta.SourceApplicationEntityTitle = calling
        expected = DicomBytesIO()
        expected.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(expected, meta, enforce_standard=True)
        assert file_meta_bytes(CTImageStorage, sop, syntax, calling) == expected.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless,
                                    DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.2"])
def test_received_header_parse_reads_what_the_full_parse_reads(tmp_path: Path, syntax: str) -> None:
    """The per-C-STORE parse skips unneeded values; routing must see the same header fields."""
    from synthetic import mr_series

    from dicomnode.receiver import check_dataset, parse_header, parse_received, routing_fields

    datasets = [*ct_series(2, seed="hdr", images_in_acquisition=True), *mr_series(1, seed="hdr")]
    datasets[1].SpecificCharacterSet = "ISO_IR 100"
    datasets[1].SeriesDescription = "Sch\u00e4del nativ"
    datasets[1].NumberOfTemporalPositions = 3
    for ds in datasets:
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        elif syntax == "1.2.840.10008.1.2.2":  # Explicit VR Big Endian (retired)
            ds.file_meta.TransferSyntaxUID = syntax
            ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
    if syntax in (DeflatedExplicitVRLittleEndian, "1.2.840.10008.1.2.2"):
        paths = []
        for i, ds in enumerate(datasets):
            paths.append(tmp_path / f"{i}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
    else:
        paths = write_series(datasets, tmp_path, pydicom.uid.UID(syntax))
    for path in paths:
        full = parse_header(path.read_bytes())
        fast = parse_received(dataset_bytes(path), syntax)
        assert routing_fields(fast) == routing_fields(full)
        check_dataset(fast, str(full.SOPClassUID), str(full.SOPInstanceUID))
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            assert fast.get(keyword) == full.get(keyword)


def test_supported_contexts_are_shared_not_copied_per_association() -> None:
    import copy

    from dicomnode.receiver import SharedContexts, storage_sop_classes

    contexts = SharedContexts(AE().supported_contexts)
    copied = copy.deepcopy(contexts)
    assert copied is not contexts and all(a is b for a, b in zip(copied, contexts, strict=True))
    assert len(storage_sop_classes()) > 100  # why it matters: thousands of UIDs per deep copy


def test_accepted_sockets_have_tcp_nodelay(running_node: RunningNode) -> None:
    from pynetdicom import evt

    seen: list[int] = []

    def on_echo(event: evt.Event) -> int:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock is not None
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return 0x0000

    for server in running_node.node.receiver._servers:
        server.bind(evt.EVT_C_ECHO, on_echo)  # intervention event: replaces the receiver's handler
    assert "Received Echo Response (Success)" in _echo(running_node.port, "ECHOSCU")
    assert seen and all(seen)


def _deflated(ds: Dataset) -> bytes:
    """A data set in Deflated Explicit VR Little Endian, as a C-STORE carries it."""
    import zlib

    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(_encode(ds)) + compressor.flush()


def test_deflated_parse_skips_large_pixel_data_and_reads_what_follows() -> None:
    """The inflating reader keeps only a short window: positions must stay exact across a skip of
    several MiB, so that elements after the pixel data and the truncation check still work."""
    from dicomnode.receiver import parse_received

    ds = ct_series(1, 1500, 1500, seed="deflate-big")[0]  # 4.3 MiB of pixel data
    ds.DataSetTrailingPadding = b"\x00" * 1000  # (FFFC,FFFC), after the pixel data
    raw = _deflated(ds)
    parsed = parse_received(raw, DeflatedExplicitVRLittleEndian)
    assert 0x7FE00010 in parsed  # skipped, never inflated into memory
    assert parsed.SeriesInstanceUID == ds.SeriesInstanceUID
    truncated = _deflated(ds)[:-2000]
    with pytest.raises(Exception, match="truncated|inflate"):
        parse_received(truncated, DeflatedExplicitVRLittleEndian)


def test_deflated_parse_stops_inflating_at_the_limit() -> None:
    from dicomnode.errors import OutOfResources
    from dicomnode.receiver import parse_received

    ds = ct_series(1, 1024, 1024, seed="deflate-limit")[0]  # 2 MiB of pixel data
    raw = _deflated(ds)
    size = len(_encode(ds))
    parse_received(raw, DeflatedExplicitVRLittleEndian, max_inflated=size)
    with pytest.raises(OutOfResources, match="max_instance_mb"):
        parse_received(raw, DeflatedExplicitVRLittleEndian, max_inflated=size - 1)


@pytest.mark.parametrize(("sop_class", "sop_instance", "message_id"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1", 1),  # odd lengths: padded
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.12", 65535),  # even lengths
])
def test_hand_encoded_c_store_success_equals_pynetdicoms(sop_class: str, sop_instance: str, message_id: int) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP

    from dicomnode.transport import c_store_success_command

    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(7, 16384))
    expected = b"\x03" + c_store_success_command(sop_class, message_id, sop_instance)
    assert pdata.presentation_data_value_list == [(7, expected)]


def _c_store_rq_command(**fields: object) -> bytes:
    """A C-STORE-RQ command set as pynetdicom encodes it."""
    from pynetdicom.dimse_messages import C_STORE_RQ

    primitive = C_STORE()
    for name, value in fields.items():
        setattr(primitive, name, value)
    primitive.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdvs = [pdv for pdata in message.encode_msg(1, 16384) for pdv in pdata.presentation_data_value_list]
    assert pdvs[0][1][0] == 0x03  # the command, whole in one fragment
    return bytes(pdvs[0][1][1:])


@pytest.mark.parametrize(("sop_class", "sop_instance", "message_id", "priority"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1", 1, 2),  # odd lengths: padded
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.12", 65535, 1),  # even lengths
    ("1.2.840.10008.5.1.4.1.1.7", "2.25.0", 0, 0),
])
def test_hand_decoded_c_store_request_equals_pynetdicoms(
    sop_class: str, sop_instance: str, message_id: int, priority: int
) -> None:
    from pydicom.filebase import DicomBytesIO
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dsutils import decode

    from dicomnode.transport import decode_c_store_request

    command = _c_store_rq_command(MessageID=message_id, Priority=priority, AffectedSOPClassUID=sop_class,
                                  AffectedSOPInstanceUID=sop_instance)
    ours = decode_c_store_request(command)
    message = C_STORE_RQ()
    message.command_set = decode(DicomBytesIO(command), True, True)
    theirs = message.message_to_primitive()
    assert ours is not None
    for field in ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                  "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert type(ours.AffectedSOPInstanceUID) is type(theirs.AffectedSOPInstanceUID)


def test_anything_but_a_plain_c_store_request_is_left_to_pynetdicom() -> None:
    from dicomnode.transport import decode_c_store_request

    plain = dict(MessageID=3, Priority=2, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                 AffectedSOPInstanceUID="1.2.3.4")
    assert decode_c_store_request(_c_store_rq_command(**plain)) is not None
    moved = _c_store_rq_command(**plain, MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=9)
    assert decode_c_store_request(moved) is None  # Move Originator fields: pynetdicom's path
    command = _c_store_rq_command(**plain)

    def patched(old: bytes, new: bytes) -> bytes:
        assert old in command
        body = command[12:].replace(old, new)
        return command[:8] + struct.pack("<I", len(body)) + body

    assert decode_c_store_request(patched(b"1.2.3.4\x00", b"1.02.3.4")) is None  # not a valid UID
    assert decode_c_store_request(patched(b"1.2.3.4\x00", b"1.2..3.\x00")) is None

    def us(element: int, value: int) -> bytes:
        return struct.pack("<HHIH", 0x0000, element, 2, value)

    assert decode_c_store_request(patched(us(0x0700, 2), us(0x0700, 7))) is None  # priority 7
    assert decode_c_store_request(patched(us(0x0800, 1), us(0x0800, 0x0101))) is None  # no data set
    assert decode_c_store_request(command[:-3]) is None  # truncated
    assert decode_c_store_request(command[:8] + b"\x00\x00\x00\x00" + command[12:]) is None  # group length
    echo = patched(us(0x0100, 0x0001), us(0x0100, 0x0030))
    assert decode_c_store_request(echo) is None  # C-ECHO-RQ command field
