"""Configuration: one immutable, validated object, read from TOML.

This is the only module that reads configuration files. Every stage receives the part of
:class:`Config` it needs, explicitly. Problems are reported one line each, addressed by their path
in the file, e.g. ``peers[1].ae_title: longer than 16 characters``.

Relative paths (``node.data_dir``, ``analysis.model_dirs``) are resolved against the current
working directory of the process, like the paths given on the command line.

Which file: :func:`find_config` (``--config``, else ``$DICOMNODE_CONFIG``, else ``./dicomnode.toml``).
When there is none the node runs on the embedded default, ``dicomnode/dicomnode.toml`` inside the
package (read with :mod:`importlib.resources`, so it works from any folder and any kind of
install); such a node has no file of its own and refuses edits rather than write into the
installation.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dicomnode.errors import ConfigError
from dicomnode.models.qc_settings import QcSettings

ADMIN_TOKEN_ENV = "DICOMNODE_ADMIN_TOKEN"
CONFIG_ENV = "DICOMNODE_CONFIG"
LOCAL_CONFIG_NAME = "dicomnode.toml"  # looked for in the working directory
EMBEDDED_DEFAULT = "embedded default"  # how messages name the packaged default (it has no path of its own)
_EMBEDDED_RESOURCE = "dicomnode.toml"
# Without a file to edit, the console and `dicomnode peers` say how to get one.
NO_CONFIG_FILE_HINT = (
    f"this node runs on the {EMBEDDED_DEFAULT} config, which is part of the installation and is "
    f"never edited: write a config of your own with `dicomnode init` (./{LOCAL_CONFIG_NAME}) or "
    f"`dicomnode init PATH` plus {CONFIG_ENV}=PATH or --config PATH, then restart the node"
)
LEDGER_URL_ENV = "DICOMNODE_LEDGER_URL"  # overrides [cluster] ledger_url: keeps a password out of the file


def _ae_title(value: str) -> str:
    """PS3.5 6.2: AE is 16 characters at most, no backslash or control characters, not blank."""
    if len(value) > 16:
        raise ValueError("longer than 16 characters")
    if not value.strip():
        raise ValueError("must not be empty or blank")
    if any(c == "\\" or ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError("only printable ASCII without backslash is allowed")
    return value.strip()


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
    return value


AETitle = Annotated[str, AfterValidator(_ae_title)]
Host = Annotated[str, AfterValidator(_host)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Settings):
    """DICOM TLS (PS3.15 B.1 / BCP 195): TLS 1.2 or newer."""

    port: Port = Field(description="port of the TLS listener, beside the plain one")
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = Field(
        default=None, description="CA bundle used to verify client certificates"
    )
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _client_certificates_need_a_ca(self) -> TlsSettings:
        # Without a CA bundle the check would silently turn into CERT_NONE.
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to verify them against")
        return self


def default_receivers() -> int:
    """One receiver process per core, at most 4: beyond that the ledger's single writer and the
    disk's flushes bound the rate, not CPU."""
    return max(1, min(os.cpu_count() or 1, 4))


class NodeSettings(_Settings):
    ae_title: AETitle = "DICOMNODE"
    host: Host = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535, description="0 picks a free port (tests)")
    data_dir: Path = Path("./data")
    max_associations: int = Field(default=16, ge=1, le=1024)
    max_pdu: int = Field(
        default=4_194_304,
        ge=0,
        description="largest P-DATA PDU we accept; 0 means unlimited. Larger PDUs cost fewer "
        "round trips and decode calls per image.",
    )
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    handshake_timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds a new connection has to finish TLS and send its whole A-ASSOCIATE-RQ "
        "(never more than acse_timeout); then it is closed",
    )
    negotiation_slots: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="connections that may be negotiating (connected, no association yet) at once; "
        "more are reset at the door. They never take max_associations slots",
    )
    negotiation_per_host: int = Field(
        default=8,
        ge=1,
        le=4096,
        description="of those, from any one peer address: a flood from one host cannot starve "
        "scanners on other hosts",
    )
    max_instance_mb: int = Field(
        default=256,
        ge=1,
        description="largest data set accepted, in MiB, after inflating Deflated Explicit VR: "
        "one that inflates past it is refused with 0xA700, one streamed past it ends its "
        "association. Raise it for very large multi-frame objects",
    )
    min_free_mb: int = Field(
        default=512,
        ge=0,
        description="refuse new instances (0xA700) while the spool's file system has less free",
    )
    receivers: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="receiver processes sharing the DICOM port(s), so that N associations use N "
        "cores; unset: the number of cores, at most 4. 1: the node process receives itself",
    )
    listen_backlog: int = Field(
        default=128,
        ge=1,
        le=65535,
        description="connections the kernel queues before they are accepted (a burst of scanners)",
    )
    tls: TlsSettings | None = None

    @property
    def receiver_processes(self) -> int:
        """``receivers``, or its default for this machine."""
        return self.receivers if self.receivers is not None else default_receivers()


class Peer(_Settings):
    """A sender we accept: its calling AE title, and the hosts it may call from (empty: any)."""

    ae_title: AETitle
    hosts: list[Host] = Field(default_factory=list)
    description: str = ""


class Destination(_Settings):
    """A Storage SCP that receives our results (usually the PACS), and how our Storage SCU talks
    to it."""

    ae_title: AETitle
    host: Host
    port: Port
    tls: bool = False
    ca_certificates: Path | None = Field(
        default=None, description="CA bundle that verifies the destination's certificate (default: the system's)"
    )
    certificate: Path | None = Field(
        default=None, description="our client certificate (PEM), for destinations that require one"
    )
    private_key: Path | None = Field(default=None, description="the private key of `certificate` (PEM)")
    max_pdu: int = Field(
        default=16382,
        ge=0,
        description="largest P-DATA PDU we accept from the destination (PS3.8 D.1); 0 means unlimited. "
        "What we send is split to the size the destination announces.",
    )
    acse_timeout: float = Field(default=30.0, gt=0, description="seconds to wait for association negotiation")
    dimse_timeout: float = Field(default=120.0, gt=0, description="seconds to wait for a DIMSE response")
    network_timeout: float = Field(default=60.0, gt=0, description="an idle association is closed after this")
    warning_is_success: list[int] = Field(
        # Every warning of PS3.7 C.4 and PS3.4 B.2.3: the object was stored. Remove one to treat it
        # as a failure (dead letter; a replay then sends the object again).
        default_factory=lambda: [0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007],
        description="C-STORE warning statuses counted as delivered",
    )

    @model_validator(mode="after")
    def _client_certificate(self) -> Destination:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: give both or neither")
        if self.certificate is not None and not self.tls:
            raise ValueError("certificate is a TLS client certificate: it needs tls = true")
        return self


class Match(_Settings):
    """Rule conditions; all given conditions must hold. Text patterns are case-insensitive globs,
    or regular expressions when prefixed with ``re:``. A list means "any of"."""

    modality: list[str] = Field(default_factory=list)
    sop_class_uid: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    series_description: list[str] = Field(default_factory=list)
    study_description: list[str] = Field(default_factory=list)
    calling_ae: list[str] = Field(default_factory=list)
    image_type: list[str] = Field(default_factory=list)
    min_instances: int | None = Field(default=None, ge=0)
    max_instances: int | None = Field(default=None, ge=0)

    @field_validator(
        "modality",
        "sop_class_uid",
        "body_part",
        "series_description",
        "study_description",
        "calling_ae",
        "image_type",
        mode="before",
    )
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator(
        "modality",
        "sop_class_uid",
        "body_part",
        "series_description",
        "study_description",
        "calling_ae",
        "image_type",
    )
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            try:
                compile_pattern(pattern)
            except re.error as exc:
                raise ValueError(f"[{i}] invalid regular expression {pattern!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _range(self) -> Match:
        if (
            self.min_instances is not None
            and self.max_instances is not None
            and self.min_instances > self.max_instances
        ):
            raise ValueError("min_instances is greater than max_instances")
        return self


LatePolicy = Literal["reprocess", "ignore"]
NotifyAt = Literal["urgent", "routine"]


class Then(_Settings):
    """What to do with a matching series. ``analyzers``/``destinations`` left out mean the
    embedded default (every matching analyzer / every destination); an empty list means none."""

    analyzers: list[str] | None = None
    destinations: list[str] | None = None
    priority: Literal["stat", "routine"] = "routine"
    quiet_period_s: float | None = Field(default=None, gt=0)
    late_policy: LatePolicy | None = None
    late_window_min: float | None = Field(default=None, ge=0)
    notify: list[str] | None = Field(
        default=None, description="notify channels ([notify.NAME]) told about this series' events; "
        "left out: every channel; an empty list: none")
    notify_at: NotifyAt = Field(
        default="urgent", description="a triage result is critical when its priority reaches this: "
        "'urgent' (the analyzer says STAT) or 'routine' (any finding present)")


class Rule(_Settings):
    name: str = ""
    match: Match = Field(default_factory=Match)
    then: Then = Field(default_factory=Then)


class AssemblySettings(_Settings):
    quiet_period_s: float = Field(
        default=5.0,
        gt=0,
        description="a series is complete after this long without a new instance",
    )
    release_grace_s: float = Field(
        default=1.0,
        ge=0,
        description="after the sender releases the association that carried the series' last "
        "instance, wait this long instead of the full quiet period",
    )
    late_policy: LatePolicy = "reprocess"
    late_window_min: float = Field(
        default=60.0,
        ge=0,
        description="with late_policy='ignore', late instances within this many minutes of "
        "processing still reopen the series",
    )


class JobsSettings(_Settings):
    workers: int = Field(
        default=1, ge=0, le=64,
        description="analysis workers of this process; 0: this process runs no jobs (another process "
        "does: `dicomnode worker`)",
    )
    worker_kind: Literal["process", "thread"] = Field(
        default="process",
        description="process: analyses run in worker processes that die with the node; thread: in "
        "threads of the node process (tests, tiny sites: a crashing analyzer takes the node down)",
    )
    lease_s: float = Field(
        default=900.0, gt=0,
        description="a running job whose owner stopped renewing it (heartbeats) for this long runs again",
    )
    max_attempts: int = Field(
        default=5, ge=1,
        description="attempts after unexpected errors (neither transient nor permanent) or worker deaths",
    )
    retry_for_h: float = Field(
        default=24.0, ge=0,
        description="transient failures (destination down, 0xA7xx) are retried with capped exponential "
        "backoff for this many hours after the first failure, then dead-lettered; 0: never retried",
    )
    backoff_base_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=900.0, gt=0)
    poll_interval_s: float = Field(default=1.0, gt=0)


_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_QUEUE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _node_id(value: str) -> str:
    if value and not _NODE_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a node id (letters, digits, '.', '_', '-'; at most 100)")
    return value


def _queue_name(value: str) -> str:
    if value and not _QUEUE_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a queue name (lower-case letters, digits, '.', '_', '-')")
    return value


QueueName = Annotated[str, AfterValidator(_queue_name)]


class QueueNames(_Settings):
    """The Procrastinate queue of each job kind. Workers choose queues with ``--queues``."""

    analyze: QueueName = "analyze-cpu"
    analyze_gpu: QueueName = Field(
        default="",
        description="queue for analyzers whose manifest asks for a GPU (`gpu = true`); empty: they "
        "stay on the analyze queue",
    )
    deliver: QueueName = "deliver"
    notify: QueueName = Field(
        default="notify",
        description="notifications ([notify.NAME] channels); a queue of their own so that a backlog "
        "of deliveries never holds back an urgent finding",
    )

    @model_validator(mode="after")
    def _required(self) -> QueueNames:
        for name in ("analyze", "deliver", "notify"):
            if not getattr(self, name):
                raise ValueError(f"{name}: must not be empty")
        return self

    def all(self) -> list[str]:
        names = [getattr(self, field) for field in type(self).model_fields]
        return sorted({n for n in names if n})


def _ledger_url(value: str) -> str:
    """A SQLAlchemy URL of a PostgreSQL database reached through psycopg 3."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"not a database URL: {exc}") from None
    if url.drivername not in ("postgresql+psycopg", "postgresql"):
        raise ValueError(f"{url.drivername!r} is not supported: use postgresql+psycopg://user@host/db "
                         "(or ...@/db?host=/run/postgresql for a Unix socket)")
    if not url.database:
        raise ValueError("names no database")
    if not url.host and not url.query.get("host"):
        raise ValueError("names no host: add @host or ?host=/path/of/the/socket/folder")
    if url.drivername == "postgresql":  # the psycopg 3 driver, whatever SQLAlchemy's default is
        return "postgresql+psycopg" + value.strip()[len("postgresql"):]
    return value.strip()


class ClusterSettings(_Settings):
    """Cluster mode: a shared PostgreSQL ledger, a shared spool, Procrastinate workers."""

    ledger_url: Annotated[str, AfterValidator(_ledger_url)] = Field(
        description="SQLAlchemy URL of the shared ledger, e.g. "
        f"postgresql+psycopg://dicomnode@/dicomnode?host=/run/postgresql; {LEDGER_URL_ENV} overrides it"
    )
    spool_root: Path = Field(description="the shared spool, mounted at the same path on every host")
    node_id: Annotated[str, AfterValidator(_node_id)] = Field(
        default="", description="names this receiver or worker; default: host name and DICOM port"
    )
    heartbeat_s: float = Field(default=5.0, gt=0, le=300)
    dead_after_s: float = Field(
        default=30.0, gt=0,
        description="a process without a heartbeat for this long counts as dead: its open associations "
        "count as closed and its jobs run again",
    )
    queues: QueueNames = Field(default_factory=QueueNames)

    @model_validator(mode="before")
    @classmethod
    def _ledger_url_from_environment(cls, data: Any) -> Any:
        url = os.environ.get(LEDGER_URL_ENV)
        if url and isinstance(data, dict):
            return {**data, "ledger_url": url}
        return data

    @model_validator(mode="after")
    def _heartbeats_fit(self) -> ClusterSettings:
        if self.dead_after_s <= 2 * self.heartbeat_s:
            raise ValueError("dead_after_s must be more than twice heartbeat_s")
        return self


class AnalysisSettings(_Settings):
    shipped_models: bool = Field(default=True, description="register the models shipped with dicomnode")
    model_dirs: list[Path] = Field(
        default_factory=list,
        description="extra model folders (manifest.toml + a torch.export .pt2 or a TorchScript file)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    qc: QcSettings = Field(default_factory=QcSettings)


# Generated UIDs are the root plus digits of a hash of the result's identity, 64 characters in all
# (PS3.5 9.1): a root of at most 40 characters leaves at least 23 digits of hash.
UID_ROOT_MAX_LENGTH = 40


def _uid_root(value: str) -> str:
    """A UID root (PS3.5 9.1) for generated UIDs, returned with its trailing dot."""
    root = value.strip().removesuffix(".")
    if not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", root):
        raise ValueError(f"{value!r} is not a UID root: digits separated by dots, no leading zeros (PS3.5 9.1)")
    if root.split(".")[0] not in ("0", "1", "2"):
        raise ValueError(f"{value!r} is not a UID root: the first component is 0, 1 or 2 (ISO/IEC 8824)")
    if root == "2.25" or root.startswith("2.25."):
        raise ValueError("2.25 is for UUID-derived UIDs (PS3.5 B.2); use a root registered to your organisation")
    if len(root) > UID_ROOT_MAX_LENGTH:
        raise ValueError(f"longer than {UID_ROOT_MAX_LENGTH} characters ({len(root)})")
    return root + "."


class ResultsSettings(_Settings):
    uid_root: Annotated[str, AfterValidator(_uid_root)] | None = Field(
        default=None,
        description="UID root for every UID of our result objects (SR, SEG, tracking UIDs); "
        "default: pydicom's root",
    )


def _token(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty or blank; leave the key out to run without a token")
    return value


class AdminSettings(_Settings):
    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 8080
    token: Annotated[str | None, AfterValidator(_token)] = Field(
        default=None,
        description=f"bearer token for the console and API; the {ADMIN_TOKEN_ENV} environment "
        "variable overrides it. Without a token the console listens on loopback only.",
    )


class AuditSettings(_Settings):
    enabled: bool = True
    include_patient_names: bool = False


# --- notify channels ([notify.NAME]) ---------------------------------------------------------------

EventType = Literal["finding.critical", "finding.updated", "finding.retracted", "analysis.failed"]
EVENT_TYPES: tuple[EventType, ...] = ("finding.critical", "finding.updated", "finding.retracted",
                                      "analysis.failed")
KOS_EVENT_TYPES: tuple[EventType, ...] = ("finding.critical", "finding.updated")


def _events(value: list[EventType]) -> list[EventType]:
    if not value:
        raise ValueError("must name at least one event type (leave the key out for all of them)")
    return value


class _Channel(_Settings):
    events: Annotated[list[EventType], AfterValidator(_events)] = Field(
        default_factory=lambda: list(EVENT_TYPES), description="event types this channel receives")
    timeout_s: float = Field(default=10.0, gt=0, le=300,
                             description="connect, send and wait for the answer, each at most this long")


class Hl7Channel(_Channel):
    """HL7 v2.5.1 ORU^R01 (and optionally OMI^O23) over MLLP to a RIS or interface engine."""

    kind: Literal["hl7"]
    host: Host
    port: Port
    tls: bool = False
    ca_certificates: Path | None = Field(default=None, description="CA bundle to verify the server (TLS)")
    certificate: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    private_key: Path | None = None
    sending_application: str = Field(default="", max_length=227, description="MSH-3; default: the node's AE title")
    sending_facility: str = Field(default="", max_length=227)
    receiving_application: str = Field(default="", max_length=227)
    receiving_facility: str = Field(default="", max_length=227)
    request_priority: bool = Field(
        default=False, description="also send OMI^O23 (ORC-1 XO, TQ1-9 S) asking the RIS to raise the "
        "order's priority, for finding.critical")

    @model_validator(mode="after")
    def _tls_files(self) -> Hl7Channel:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if not self.tls and (self.certificate or self.ca_certificates):
            raise ValueError("certificate files are given but tls is false")
        return self


def _loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class WebhookChannel(_Channel):
    """CloudEvents JSON POST, signed with HMAC-SHA256 of the timestamp and the body."""

    kind: Literal["webhook"]
    url: str = Field(description="http:// or https:// URL the events are POSTed to")
    secret: str = Field(min_length=16, description="shared secret of the HMAC-SHA256 signature")
    include_phi: bool = Field(default=False, description="add patient name, ID, birth date and sex")
    ca_certificates: Path | None = Field(default=None, description="CA bundle to verify an https server")
    source: str = Field(default="", description="CloudEvents source; default: dicomnode://<node AE title>")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if not parts.hostname:
            raise ValueError(f"{value!r} has no host")
        _host(parts.hostname)
        if port == 0:
            raise ValueError(f"{value!r} has port 0")
        if parts.fragment or parts.username or parts.password:
            raise ValueError(f"{value!r}: no fragment or credentials in the URL (the signature authenticates)")
        return value

    @model_validator(mode="after")
    def _phi_needs_tls(self) -> WebhookChannel:
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        if self.include_phi and parts.scheme != "https" and not _loopback_host(parts.hostname or ""):
            raise ValueError("include_phi needs an https:// URL (patient data would cross the network in clear)")
        return self


class KosChannel(_Channel):
    """A DICOM Key Object Selection ("Of Interest") sent to one of ``[destinations]``."""

    kind: Literal["kos"]
    destination: str
    events: Annotated[list[EventType], AfterValidator(_events)] = Field(
        default_factory=lambda: list(KOS_EVENT_TYPES),
        description="a Key Object flags images: only events with a critical verdict produce one")


NotifyChannel = Annotated[Hl7Channel | WebhookChannel | KosChannel, Field(discriminator="kind")]
_CHANNEL_KINDS = ("hl7", "kos", "webhook")
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


class Config(_Settings):
    node: NodeSettings = Field(default_factory=NodeSettings)
    peers: list[Peer] = Field(default_factory=list)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    rules: list[Rule] = Field(default_factory=list)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    cluster: ClusterSettings | None = None
    notify: dict[str, NotifyChannel] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems = reference_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def peer(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    @property
    def ledger_url(self) -> str:
        """The shared ledger in cluster mode, else the embedded SQLite file in ``node.data_dir``."""
        if self.cluster is not None:
            return self.cluster.ledger_url
        return f"sqlite:///{self.node.data_dir.resolve() / 'ledger.sqlite3'}"

    @property
    def admin_token(self) -> str | None:
        """The console's token: the environment's, else the file's; None when neither is set. A
        blank environment variable counts as unset (the file's blank token is a config error)."""
        from_environment = os.environ.get(ADMIN_TOKEN_ENV, "")
        token = from_environment if from_environment.strip() else self.admin.token
        return token if token and token.strip() else None


def reference_problems(config: Config, analyzer_names: list[str] | None = None) -> list[str]:
    """Cross-references that a field validator cannot see: names used in rules must exist.

    ``analyzer_names`` is checked only when given (the registry is built outside this module).
    """
    problems: list[str] = []
    known_dest = sorted(config.destinations)
    seen_peers: dict[str, int] = {}
    for i, peer in enumerate(config.peers):
        if peer.ae_title in seen_peers:
            problems.append(
                f"peers[{i}].ae_title: {peer.ae_title!r} is already peers[{seen_peers[peer.ae_title]}]"
            )
        seen_peers.setdefault(peer.ae_title, i)
    for i, rule in enumerate(config.rules):
        for j, dest in enumerate(rule.then.destinations or []):
            if dest not in config.destinations:
                problems.append(
                    f"rules[{i}].then.destinations[{j}]: unknown destination {dest!r} "
                    f"(known: {', '.join(known_dest) or 'none'})"
                )
        if analyzer_names is not None:
            for j, name in enumerate(rule.then.analyzers or []):
                if name not in analyzer_names:
                    problems.append(
                        f"rules[{i}].then.analyzers[{j}]: unknown analyzer {name!r} "
                        f"(known: {', '.join(sorted(analyzer_names)) or 'none'})"
                    )
    problems.extend(_notify_problems(config))
    tls = config.node.tls
    if tls is not None and tls.port == config.node.port:
        problems.append("node.tls.port: must differ from node.port")
    return problems


def _notify_problems(config: Config) -> list[str]:
    """Channel names, a KOS channel's destination and the channels rules name must exist."""
    problems: list[str] = []
    known_dest = ", ".join(sorted(config.destinations)) or "none"
    for name, channel in config.notify.items():
        if not _CHANNEL_NAME.fullmatch(name):
            problems.append(f"notify.{name}: a channel name is 1-32 letters, digits, '_', '-' or '.'")
        if isinstance(channel, KosChannel) and channel.destination not in config.destinations:
            problems.append(f"notify.{name}.destination: unknown destination {channel.destination!r} "
                            f"(known: {known_dest})")
        if isinstance(channel, KosChannel):
            for j, event in enumerate(channel.events):
                if event not in KOS_EVENT_TYPES:
                    problems.append(f"notify.{name}.events[{j}]: a Key Object flags images of a critical "
                                    f"finding; {event!r} has none")
    known = ", ".join(sorted(config.notify)) or "none"
    for i, rule in enumerate(config.rules):
        for j, name in enumerate(rule.then.notify or []):
            if name not in config.notify:
                problems.append(f"rules[{i}].then.notify[{j}]: unknown notify channel {name!r} (known: {known})")
    return problems


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A rule text pattern: ``re:`` prefix for a regular expression, else a glob; both ignore case."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:], re.IGNORECASE)
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE)


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for depth, part in enumerate(loc):
        if depth == 2 and loc[0] == "notify" and part in _CHANNEL_KINDS:
            continue  # the tag pydantic adds for the discriminated union: not a key in the file
        if isinstance(part, int):
            text += f"[{part}]"
        elif str(part).startswith("function-") or part in ("function-after", "function-before"):
            continue
        else:
            text += ("." if text else "") + str(part)
    return text


def _problems(error: ValidationError) -> list[str]:
    lines: list[str] = []
    for item in error.errors():
        message = str(item["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
        loc = _location(tuple(item["loc"]))
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "union_tag_invalid":
            loc += ".kind"
            message = f"unknown kind {item['input'].get('kind')!r} (known: {', '.join(_CHANNEL_KINDS)})"
        elif item["type"] == "union_tag_not_found":
            loc += ".kind"
            message = f"required: one of {', '.join(_CHANNEL_KINDS)}"
        for line in message.splitlines():
            # A nested validator may address a sub-item itself ("[0] invalid ...").
            if line.startswith("[") and loc:
                index, _, rest = line.partition(" ")
                lines.append(f"{loc}{index}: {rest}")
            elif loc and line.split(":", 1)[0].replace("[", ".").split(".")[0] not in Config.model_fields:
                lines.append(f"{loc}: {line}")
            else:
                lines.append(line)
    return lines


def parse_config(data: dict[str, Any], source: str = "") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc), source) from None


def embedded_config_text() -> str:
    """The embedded default config, as shipped inside the package (comments included)."""
    return importlib.resources.files("dicomnode").joinpath(_EMBEDDED_RESOURCE).read_text(encoding="utf-8")


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to use: ``explicit`` (``--config``), else ``$DICOMNODE_CONFIG``, else
    ``./dicomnode.toml`` when it exists; None means the embedded default.

    A path named explicitly or by the environment is returned even if it does not exist, so that
    loading it reports ``cannot read`` rather than silently falling back to the defaults.
    """
    if explicit is not None:
        return Path(explicit)
    from_environment = os.environ.get(CONFIG_ENV, "").strip()
    if from_environment:
        return Path(from_environment)
    local = Path(LOCAL_CONFIG_NAME)
    return local if local.is_file() else None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a TOML config; ``None`` reads the embedded default (no lookup: see
    :func:`find_config`)."""
    if path is None:
        return _parse_text(embedded_config_text(), EMBEDDED_DEFAULT)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], str(file)) from None
    return _parse_text(text, str(file))


def _parse_text(text: str, source: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], source) from None
    return parse_config(data, source)
