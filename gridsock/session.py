"""Session file, session CA, node certificates, join tokens and TLS contexts.

Theory of operation
-------------------
A *session* is one grid deployment. ``create_session(DIR, "HOST:PORT")`` writes:

``session.toml``
    Handed to every node; holds no private key: the session id (a uuid4), the rendez-vous
    address, the bootstrap stack (``"tls/tcp"``, or ``"tcp"`` as an explicit opt-in for private
    grids), the join token and the session CA certificate, the one trust anchor of the session.
``ca-key.pem`` (0600), ``rendezvous-cert.pem``, ``rendezvous-key.pem`` (0600), ``ca.pem``
    The rendez-vous host's private material, beside ``session.toml``; they never leave it.

Several rendez-vous nodes (a federation, docs/federation.md): ``rendezvous`` in session.toml
may be a list of ``HOST:PORT``; :func:`add_rendezvous` adds one, with its own certificate
(``rendezvous-N-cert.pem``, key ``rendezvous-N-key.pem`` 0600, for the Nth; the first keeps
the files above). Every rendez-vous certificate names the session (``urn:gridsock:rendezvous:``
and the session id), so a leader accepts any of them, and they accept each other;
:func:`rendezvous_name` names them in routing (``rendezvous``, ``rendezvous-2``, ...).

Enrollment: a node makes its own key and a CSR (:func:`new_node_key`), connects to the rendez-vous
over server-authenticated TLS (:func:`client_context` with no identity; the rendez-vous port uses
``require_client_cert=False``), proves it holds the join token (:meth:`Session.check_token` on the
rendez-vous side) and receives a certificate for its uuid (:meth:`CertificateAuthority.sign_node`).
From then on every link is mutual TLS between certificates of the session CA, and each side learns
who the other is from the SAN URI of its certificate (:func:`peer_identity`): host names play no
part, since nodes sit behind NAT and relays.

Clusters: a session may *define* clusters (``create_session(..., clusters=("A",))``,
:func:`add_cluster`). Each has a join token of its own, kept in ``clusters.toml`` (0600) on the
rendez-vous host, and a *cluster session file* ``cluster-<NAME>.toml``: ``session.toml`` with the
cluster's token as its ``join_token`` and ``cluster = "<NAME>"``, handed to that cluster's
nodes only. A node that enrolls with a cluster's token gets a certificate that names the
cluster beside its node id (SAN URI ``urn:gridsock:cluster:<NAME>``; :attr:`Identity.cluster`,
:attr:`PeerIdentity.cluster`), so its cluster is an attested fact, checked on every link
(docs/security.md). Compatibility: a session that defines no cluster works as before (its one
token admits a node to any cluster, declared and bound first come); once it defines one, every
cluster is attested and the main token admits only nodes without a cluster.

State: a node given a state directory (:class:`NodeState`, by default
:func:`default_state_dir`, under ``$XDG_STATE_HOME``) keeps its certificate and key there (0600,
in a 0700 directory of its user's, locked while it runs), so that a restarted node is the same
node: same id, same grid address, same name (docs/security.md).

Certificates: EC P-256 keys, SHA-256, X.509 v3 with the extensions that OpenSSL's strict mode
(``VERIFY_X509_STRICT``, the default from Python 3.13) requires; contexts set that flag on every
Python so all versions accept and reject the same chains.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import ssl
import stat
import sys
import tempfile
import uuid
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from gevent import ssl as gssl

from .errors import AuthError, ConfigError, LocalProtocolError, RemoteProtocolError
from .wire import check_name

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificatePublicKeyTypes,
        PrivateKeyTypes,
        PublicKeyTypes,
    )

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

__all__ = [
    "DEFAULT_RENDEZVOUS_PORT",
    "BOOTSTRAP_STACKS",
    "SESSION_FILE",
    "CA_LIFETIME_S",
    "RENDEZVOUS_CERT_LIFETIME_S",
    "NODE_CERT_LIFETIME_S",
    "CLOCK_SKEW_S",
    "JOIN_TOKEN_BYTES",
    "MAX_CSR_BYTES",
    "RENDEZVOUS_NODE_ID",
    "STATE_KEY_FILE",
    "STATE_CERT_FILE",
    "CLUSTERS_FILE",
    "CLUSTER_URI_PREFIX",
    "cluster_file_name",
    "add_cluster",
    "add_rendezvous",
    "MAX_RENDEZVOUS",
    "rendezvous_name",
    "ClusterTokens",
    "default_state_dir",
    "NodeState",
    "Session",
    "create_session",
    "parse_hostport",
    "format_hostport",
    "CertificateAuthority",
    "new_node_key",
    "Identity",
    "PeerIdentity",
    "server_context",
    "client_context",
    "peer_identity",
]

log = logging.getLogger(__name__)

DEFAULT_RENDEZVOUS_PORT = 7700
BOOTSTRAP_STACKS = ("tls/tcp", "tcp")

SESSION_FILE = "session.toml"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
RENDEZVOUS_CERT_FILE = "rendezvous-cert.pem"
RENDEZVOUS_KEY_FILE = "rendezvous-key.pem"
CLUSTERS_FILE = "clusters.toml"  # the clusters' join tokens (0600): the rendez-vous host's only
CLUSTER_FILE_TEMPLATE = "cluster-{}.toml"  # a cluster's session file, handed to its nodes
MAX_CLUSTERS = 1000  # defined clusters per session; more is surely a mistake (and a big file)

_DAY_S = 24 * 3600
CA_LIFETIME_S = 10 * 365 * _DAY_S  # a session outlives any experiment run on it
RENDEZVOUS_CERT_LIFETIME_S = 10 * 365 * _DAY_S  # capped by the CA's own expiry
NODE_CERT_LIFETIME_S = 30 * _DAY_S  # a node re-enrolls with the join token after that
CLOCK_SKEW_S = 5 * 60  # certificates start this much in the past: grid clocks drift

JOIN_TOKEN_BYTES = 32  # 256 bits; 43 characters of unpadded urlsafe base64
MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR is ~0.5 KiB, an RSA-8192 one ~3 KiB in PEM
MIN_RSA_KEY_BITS = 2048  # weaker keys are breakable
MAX_RSA_KEY_BITS = 8192  # larger keys make every handshake slow: a cheap denial of service
ALLOWED_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what TLS peers all support
MAX_HOSTNAME_CHARS = 253  # RFC 1035
MAX_HOSTNAME_LABEL_CHARS = 63  # RFC 1035

NODE_URI_PREFIX = "urn:gridsock:node:"
RENDEZVOUS_URI_PREFIX = "urn:gridsock:rendezvous:"
CLUSTER_URI_PREFIX = "urn:gridsock:cluster:"  # beside the node URI: the cluster the CA attests
RENDEZVOUS_NODE_ID = "rendezvous"  # Identity.node_id of the rendez-vous certificate
# Rendez-vous nodes one session may list (a federation, docs/federation.md): each links to
# every other, so a few are plenty; more is surely a mistake.
MAX_RENDEZVOUS = 8
RENDEZVOUS_N_CERT_FILE = "rendezvous-{}-cert.pem"  # the second and later rendez-vous nodes' (N >= 2)
RENDEZVOUS_N_KEY_FILE = "rendezvous-{}-key.pem"  # 0600

# A node's state directory (NodeState): under $XDG_STATE_HOME (or ~/.local/state), this subdirectory.
STATE_SUBDIR = "gridsock"
STATE_CERT_FILE = "node-cert.pem"
STATE_KEY_FILE = "node-key.pem"  # 0600, in a 0700 directory
STATE_NODE_ID_FILE = "node-id"  # plain-TCP sessions: the id the node chose for itself
STATE_LOCK_FILE = "lock"  # held (flock) by the running node
STATE_PORTS_FILE = "ports.json"  # the grid ports the node serves (a JSON list), kept for a restart

# What cryptography raises for malformed certificates and CSRs; not all are ValueErrors.
_PARSE_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    CryptographyDeprecationWarning,  # malformed input still accepted, for now: see _strictly()
)
_CSR_PLACEHOLDER_CN = "gridsock node"  # the CA replaces the whole subject
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,%d}(?<!-)\Z" % MAX_HOSTNAME_LABEL_CHARS)


# -- small helpers -----------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _canonical_uuid(text: object) -> str | None:
    """Return ``text`` if it is a uuid in canonical form (lower case, hyphens), else None."""
    if not isinstance(text, str):
        return None
    try:
        canonical = str(uuid.UUID(text))
    except ValueError:
        return None
    return canonical if canonical == text else None


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


_T = TypeVar("_T")


def _strictly(parse: Callable[[], _T]) -> _T:
    """Return ``parse()``, with cryptography's warnings about malformed input raised as errors.

    cryptography still loads some malformed input (a certificate with a negative serial number,
    say) with a CryptographyDeprecationWarning; we refuse it instead. The warnings filter is
    process-wide state, so this must run without yielding (parsing never does) and is not
    thread-safe against code that changes warnings filters concurrently.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        return parse()


def _check_parsed(cert: x509.Certificate) -> x509.Certificate:
    """Return ``cert`` after parsing what cryptography parses lazily (extensions, public key).

    Raises one of _PARSE_ERRORS if they are malformed, so that it happens here and not later.
    """
    cert.extensions
    cert.public_key()
    return cert


def _load_key_and_cert(cert_pem: bytes, key_pem: bytes, what: str):
    """Parse a PEM certificate and its PEM private key; ConfigError unless they match."""
    try:
        cert = _strictly(lambda: _check_parsed(x509.load_pem_x509_certificate(bytes(cert_pem))))
        cert_public_key = cert.public_key()
    except _PARSE_ERRORS as exc:
        raise ConfigError(f"{what}: certificate does not parse: {exc}") from exc
    try:
        key = _strictly(lambda: serialization.load_pem_private_key(bytes(key_pem), password=None))
    except _PARSE_ERRORS as exc:
        raise ConfigError(f"{what}: private key does not parse: {exc}") from exc
    if _spki(key.public_key()) != _spki(cert_public_key):
        raise ConfigError(f"{what}: the private key does not match the certificate")
    return cert, key


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _valid_cluster_name(name: object) -> bool:
    """True if ``name`` is a valid cluster name (the wire's names: wire.check_name)."""
    try:
        check_name(name, "cluster name")
    except ValueError:
        return False
    return True


def _identity_from_uris(uris) -> PeerIdentity | None:
    """The one gridsock identity among SAN URIs; None if there is not exactly one valid one.

    A node identity may carry one cluster URI besides (the cluster the CA attests); a second
    one, a malformed one, or one on a rendez-vous identity makes the whole identity invalid.
    """
    found = []
    clusters = []
    for uri in uris:
        if not isinstance(uri, str):
            continue
        for kind, prefix in (("node", NODE_URI_PREFIX), ("rendezvous", RENDEZVOUS_URI_PREFIX)):
            if uri.startswith(prefix):
                ident = _canonical_uuid(uri[len(prefix):])
                if ident is None:
                    return None
                found.append(PeerIdentity(kind, ident))
        if uri.startswith(CLUSTER_URI_PREFIX):
            cluster = uri[len(CLUSTER_URI_PREFIX):]
            if not _valid_cluster_name(cluster):
                return None
            clusters.append(cluster)
    if len(found) != 1 or len(clusters) > 1 or (clusters and found[0].kind != "node"):
        return None
    return PeerIdentity(found[0].kind, found[0].id, clusters[0]) if clusters else found[0]


def _check_host(host: str, what: str) -> None:
    """ConfigError unless ``host`` is an IP address or a plausible DNS name."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not host or len(host) > MAX_HOSTNAME_CHARS or not host.isascii():
        raise ConfigError(
            f"{what}: {host!r} is neither an IP address nor a host name"
            " (internationalized names must be written in punycode)"
        )
    if not all(_LABEL_RE.match(label) for label in host.split(".")):
        raise ConfigError(f"{what}: {host!r} is neither an IP address nor a host name")


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[ipv6]:port"`` into ``(host, port)``.

    The port may be left out (``"host"``, ``"[ipv6]"``) when ``default_port`` is given. The host
    must be an IP address or a host name; IPv6 addresses come back without brackets. Ports run
    from 1 to 65535. Raises ConfigError for anything else, including a bare IPv6 address, which
    is ambiguous (``::1:7700``).
    """
    if not isinstance(text, str):
        raise ConfigError(f"expected HOST:PORT as a string, got {type(text).__name__}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"{text!r}: missing ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ConfigError(f"{text!r}: write IPv6 addresses in brackets, as in [::1]:7700")
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if not host:
            raise ConfigError(f"{text!r}: missing host before ':'")
        _check_host(host, repr(text))
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"{text!r}: missing ':PORT'")
        return host, default_port
    if not _PORT_RE.match(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{text!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport`: brackets around IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- a tiny TOML writer ------------------------------------------------------------------------

_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_escape(text: str, keep_newlines: bool) -> str:
    out = []
    for ch in text:
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _toml_value(value: str | int | list) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"cannot write {type(value).__name__} to TOML")
    if isinstance(value, int):
        return str(value)
    if "\n" in value:
        # The newline right after the opening quotes is dropped by TOML readers, so the value
        # round-trips even when it starts with a newline of its own.
        return '"""\n' + _toml_escape(value, keep_newlines=True) + '"""'
    return '"' + _toml_escape(value, keep_newlines=False) + '"'


def _dump_toml(tables: dict[str, dict[str, str | int | list]], header: str = "") -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, table in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, created with ``mode`` (private files: 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- identities ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerIdentity:
    """Who the other end of a TLS link is, from its certificate.

    ``kind`` is ``"node"`` or ``"rendezvous"``; ``id`` is the node uuid, or the session id for
    the rendez-vous. ``cluster`` is the cluster the session CA attests for a node (its
    certificate names it), None when it names none.
    """

    kind: str
    id: str
    cluster: str | None = None


class Identity:
    """A private key and its certificate; node_id is the uuid from the cert (or "rendezvous").

    ``subject`` is the :class:`PeerIdentity` the other end of a link sees for this identity,
    and ``not_valid_after`` the certificate's expiry (an aware UTC datetime).
    Raises ConfigError if the certificate or key does not parse, they do not match, or the
    certificate carries no gridsock identity.
    """

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        cert, _ = _load_key_and_cert(cert_pem, key_pem, "identity")
        subject = _identity_from_uris(_san_uris(cert))
        if subject is None:
            raise ConfigError(
                "identity: the certificate carries no gridsock node or rendez-vous URI"
            )
        self.cert_pem = bytes(cert_pem)
        self.key_pem = bytes(key_pem)
        self.subject = subject
        self.node_id = subject.id if subject.kind == "node" else RENDEZVOUS_NODE_ID
        self.cluster = subject.cluster  # attested by the session CA (None: the certificate names none)
        self.not_valid_after = cert.not_valid_after_utc
        self._files: tuple[str, str] | None = None

    def __repr__(self) -> str:
        return f"<Identity {self.subject.kind} {self.subject.id}>"

    def cert_files(self) -> tuple[str, str]:
        """Return ``(cert_path, key_path)``, files for a program that needs the identity on disk.

        They are written once into a private temporary directory (0700, files 0600) that is
        removed when this object is collected, but stays behind if the process is killed: to
        build a TLS context in this process, use :meth:`load_into`, which writes no file.
        """
        if self._files is None:
            directory = tempfile.mkdtemp(prefix="gridsock-identity-")  # created 0700
            weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
            cert_path = os.path.join(directory, "cert.pem")
            key_path = os.path.join(directory, "key.pem")
            _write_new(Path(cert_path), self.cert_pem, 0o600)
            _write_new(Path(key_path), self.key_pem, 0o600)
            self._files = (cert_path, key_path)
        return self._files

    def load_into(self, context: ssl.SSLContext) -> None:
        """Load this identity (certificate and private key) into ``context``, writing the key
        to no file system.

        ``SSLContext.load_cert_chain`` reads only files. On Linux it reads two anonymous memory
        files (``memfd_create``, mode 0600, closed on exec) through ``/proc/self/fd/N``, closed
        as soon as it returns: the key is then in this process's memory only (the context's),
        and vanishes with it however it ends, SIGKILL included. Where memory files are not
        available (no ``memfd_create`` or no ``/proc``), a private temporary directory (0700,
        files 0600) removed as soon as it returns. Raises ssl.SSLError if OpenSSL refuses them.
        """
        with _identity_paths(self) as (cert_path, key_path):
            context.load_cert_chain(cert_path, key_path)


# A memory file's name (it shows in /proc/PID/fd, on no file system).
_MEMFD_PREFIX = "gridsock-identity-"


@contextlib.contextmanager
def _identity_paths(identity: Identity) -> Iterator[tuple[str, str]]:
    """Paths of the identity's certificate and key, valid in this process until the block ends
    (memory files, or else a private temporary directory: see :meth:`Identity.load_into`)."""
    fds: list[int] = []
    try:
        try:
            for what, data in (("cert", identity.cert_pem), ("key", identity.key_pem)):
                fd = os.memfd_create(_MEMFD_PREFIX + what, os.MFD_CLOEXEC)
                fds.append(fd)
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.stat(f"/proc/self/fd/{fd}")  # FileNotFoundError without /proc
        except (AttributeError, OSError) as exc:  # AttributeError: no memfd_create here
            log.debug("no memory files for the identity (%s): a temporary directory", exc)
        else:
            yield (f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
            return
    finally:
        for fd in fds:
            os.close(fd)
    directory = tempfile.mkdtemp(prefix="gridsock-identity-")  # created 0700
    try:
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        _write_new(Path(cert_path), identity.cert_pem, 0o600)
        _write_new(Path(key_path), identity.key_pem, 0o600)
        yield (cert_path, key_path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def new_node_key() -> tuple[bytes, bytes]:
    """Make a node's private key and a CSR for it; return ``(key_pem, csr_pem)``.

    The CSR subject is a placeholder: the CA sets the real name and SAN.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CSR_PLACEHOLDER_CN)]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def _parse_csr(csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, bool, CertificatePublicKeyTypes]:
    """Return ``(csr, signature_ok, public_key)``; raises one of _PARSE_ERRORS."""
    csr = x509.load_pem_x509_csr(csr_pem)
    return csr, csr.is_signature_valid, csr.public_key()


# -- the certificate authority -----------------------------------------------------------------


class CertificateAuthority:
    """The session CA: signs the rendez-vous certificate and node certificates.

    Raises ConfigError if the certificate or key does not parse, they do not match, or the
    certificate is not a CA certificate.
    """

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        cert, key = _load_key_and_cert(cert_pem, key_pem, "session CA")
        if not _is_ca(cert):
            raise ConfigError("session CA: the certificate is not a CA certificate")
        self.cert_pem = bytes(cert_pem)
        self.key_pem = bytes(key_pem)
        self._cert = cert
        self._key = key

    @classmethod
    def create(cls, session_id: str) -> CertificateAuthority:
        """Make a new self-signed CA for ``session_id`` and return it."""
        key = ec.generate_private_key(ec.SECP256R1())
        common_name = f"gridsock session {session_id}"
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_S))
            .not_valid_after(now + datetime.timedelta(seconds=CA_LIFETIME_S))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(_cert_pem(cert), _key_pem(key))

    def _issue(self, public_key, common_name: str, san: list, lifetime_s: int) -> bytes:
        """Sign a leaf certificate; it expires with the CA at the latest (ConfigError if gone)."""
        try:
            ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        now = _now()
        ca_expiry = self._cert.not_valid_after_utc
        if ca_expiry <= now:
            raise ConfigError(f"session CA expired on {ca_expiry:%Y-%m-%d}: create a new session")
        not_after = min(now + datetime.timedelta(seconds=lifetime_s), ca_expiry)
        rsa_key = isinstance(public_key, rsa.RSAPublicKey)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_S))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # RSA certificates may also be used for RSA key transport in TLS 1.2.
                    key_encipherment=rsa_key,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki, critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return _cert_pem(cert)

    def sign_node(self, csr_pem: object, node_id: str, *, cluster: str | None = None) -> bytes:
        """Sign a node's CSR for ``node_id`` (a canonical uuid string); return the cert PEM.

        The certificate gets CN = node_id and SAN URI ``urn:gridsock:node:<node_id>``, and with
        ``cluster`` a second one, ``urn:gridsock:cluster:<cluster>`` (the rendez-vous node
        passes the cluster whose join token the node proved), whatever the CSR asked for; only
        its public key is used. The CSR comes from the enrolling peer, so
        ``csr_pem`` may be anything: PEM bytes (or a str, encoded as ASCII) are parsed, any other
        type raises RemoteProtocolError, and so does a CSR that does not parse, is larger than
        MAX_CSR_BYTES, has a bad signature or a key that is neither RSA of 2048 to 8192 bits nor
        EC on P-256/384/521. The rendez-vous picks node_id, so one that is not a uuid in
        canonical form is our bug: LocalProtocolError, and so is a bad cluster name. ConfigError
        if the CA itself has expired.
        """
        if _canonical_uuid(node_id) is None:
            raise LocalProtocolError(f"node id {node_id!r} is not a uuid in canonical form")
        if cluster is not None and not _valid_cluster_name(cluster):
            raise LocalProtocolError(f"cluster {cluster!r} is not a valid cluster name")
        if isinstance(csr_pem, str):
            csr_pem = csr_pem.encode("ascii", "replace")
        if not isinstance(csr_pem, (bytes, bytearray, memoryview)):
            raise RemoteProtocolError(f"CSR must be bytes, not {type(csr_pem).__name__}")
        if len(csr_pem) > MAX_CSR_BYTES:
            raise RemoteProtocolError(f"CSR of {len(csr_pem)} bytes exceeds {MAX_CSR_BYTES}")
        try:
            csr, signature_ok, public_key = _strictly(lambda: _parse_csr(bytes(csr_pem)))
        except _PARSE_ERRORS as exc:
            raise RemoteProtocolError(f"CSR does not parse: {exc}") from exc
        if not signature_ok:
            raise RemoteProtocolError("CSR signature is not valid")
        if isinstance(public_key, rsa.RSAPublicKey):
            if not MIN_RSA_KEY_BITS <= public_key.key_size <= MAX_RSA_KEY_BITS:
                raise RemoteProtocolError(
                    f"CSR RSA key of {public_key.key_size} bits: must be"
                    f" {MIN_RSA_KEY_BITS} to {MAX_RSA_KEY_BITS}"
                )
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, ALLOWED_EC_CURVES):
                raise RemoteProtocolError(
                    f"CSR EC key on unsupported curve {public_key.curve.name}"
                )
        else:
            raise RemoteProtocolError(f"CSR key type {type(public_key).__name__} is not RSA or EC")
        san: list = [x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id)]
        if cluster is not None:
            san.append(x509.UniformResourceIdentifier(CLUSTER_URI_PREFIX + cluster))
        cert_pem = self._issue(public_key, node_id, san, NODE_CERT_LIFETIME_S)
        log.info("issued a certificate for node %s%s", node_id, f" of cluster {cluster}" if cluster else "")
        return cert_pem

    def issue_rendezvous(self, session_id: str, host: str) -> Identity:
        """Make the rendez-vous key and certificate; return them as an :class:`Identity`.

        The SAN holds ``urn:gridsock:rendezvous:<session_id>`` and ``host`` as an IP address or
        DNS name. Raises ConfigError for a session id that is not a uuid or a bad host.
        """
        if _canonical_uuid(session_id) is None:
            raise ConfigError(f"session id {session_id!r} is not a uuid in canonical form")
        _check_host(host, "rendez-vous host")
        host_name: x509.GeneralName
        try:
            host_name = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            host_name = x509.DNSName(host)
        key = ec.generate_private_key(ec.SECP256R1())
        cert_pem = self._issue(
            key.public_key(),
            f"gridsock rendezvous {session_id}",
            [x509.UniformResourceIdentifier(RENDEZVOUS_URI_PREFIX + session_id), host_name],
            RENDEZVOUS_CERT_LIFETIME_S,
        )
        return Identity(cert_pem, _key_pem(key))


# -- the session -------------------------------------------------------------------------------


def _parse_ca_cert(text: str) -> bytes:
    """The single CA certificate in ``text``, re-encoded; ValueError with the reason if not."""
    try:
        data = text.encode("ascii")
        certs = _strictly(
            lambda: [_check_parsed(cert) for cert in x509.load_pem_x509_certificates(data)]
        )
    except (UnicodeEncodeError, *_PARSE_ERRORS) as exc:
        raise ValueError(f"not a PEM certificate ({exc})") from exc
    if len(certs) != 1:
        raise ValueError(f"expected one certificate, found {len(certs)}")
    if not _is_ca(certs[0]):
        raise ValueError("the certificate is not a CA certificate")
    # Re-encoded, so that only this certificate ever becomes a trust anchor.
    return _cert_pem(certs[0])


@dataclass(frozen=True)
class Session:
    """A grid deployment, as described by its session.toml (see the module docstring)."""

    session_id: str
    rendezvous_host: str
    rendezvous_port: int
    bootstrap: str
    join_token: str = field(repr=False)  # a secret: keep it out of logs and tracebacks
    ca_cert_pem: bytes = field(repr=False)
    path: Path | None = None
    # The cluster whose join token this file holds (a cluster session file, see add_cluster);
    # None for the session's own session.toml.
    cluster: str | None = None
    # Every rendez-vous node of the session, in order, as (host, port): the first is
    # (rendezvous_host, rendezvous_port). Empty: that one alone (see rendezvous_addresses).
    rendezvous_list: tuple = ()

    @property
    def rendezvous_addresses(self) -> tuple:
        """The session's rendez-vous nodes in order, as ``(host, port)`` pairs: the list of
        session.toml, or the one ``rendezvous_host``/``rendezvous_port`` name when that one is
        not in it (a node told another rendez-vous address on its command line)."""
        first = (self.rendezvous_host, self.rendezvous_port)
        if first in self.rendezvous_list:
            return tuple(self.rendezvous_list)
        return (first,)

    def _rendezvous_field(self) -> str | list:
        """What session.toml's ``rendezvous`` holds: one HOST:PORT, or a list of them."""
        addrs = self.rendezvous_addresses
        if len(addrs) == 1:
            return self.rendezvous
        return [format_hostport(h, p) for h, p in addrs]

    @property
    def tls(self) -> bool:
        """True unless the bootstrap stack is plain TCP."""
        return self.bootstrap != "tcp"

    @property
    def rendezvous(self) -> str:
        """The rendez-vous address as ``"HOST:PORT"`` (IPv6 hosts in brackets)."""
        return format_hostport(self.rendezvous_host, self.rendezvous_port)

    @classmethod
    def load(cls, path) -> Session:
        """Read a session file (or the session.toml of a directory) and return the Session.

        Raises ConfigError naming the file and the field for a missing file, bad TOML, a missing
        or ill-typed field, a bad HOST:PORT (the port defaults to DEFAULT_RENDEZVOUS_PORT), an
        unknown bootstrap stack, a malformed join token, or a CA certificate that does not parse.
        """
        path = Path(path)
        if path.is_dir():
            path = path / SESSION_FILE
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: session file not found") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the session file: {exc}") from exc
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        table = doc.get("session")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: missing [session] table")

        def string(name: str) -> str:
            if name not in table:
                raise ConfigError(f"{path}: [session] {name}: missing")
            value = table[name]
            if not isinstance(value, str):
                raise ConfigError(
                    f"{path}: [session] {name}: expected a string, got {type(value).__name__}"
                )
            return value

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{path}: [session] {name}: {why}")

        session_id = string("id")
        if _canonical_uuid(session_id) is None:
            raise bad("id", f"{session_id!r} is not a uuid in canonical form")
        listed = table.get("rendezvous")
        if isinstance(listed, list):
            if not listed or len(listed) > MAX_RENDEZVOUS:
                raise bad("rendezvous", f"a list of 1 to {MAX_RENDEZVOUS} HOST:PORT, not {len(listed)}")
            odd = [item for item in listed if not isinstance(item, str)]
            if odd:
                raise bad("rendezvous", f"expected a string HOST:PORT (or a list of them), got a list holding"
                                        f" {type(odd[0]).__name__}")
        else:
            listed = [string("rendezvous")]
        addrs = []
        for item in listed:
            try:
                addrs.append(parse_hostport(item, DEFAULT_RENDEZVOUS_PORT))
            except ConfigError as exc:
                raise bad("rendezvous", str(exc)) from exc
        if len(set(addrs)) != len(addrs):
            raise bad("rendezvous", "each rendez-vous address once")
        host, port = addrs[0]
        bootstrap = string("bootstrap")
        if bootstrap not in BOOTSTRAP_STACKS:
            raise bad("bootstrap", f"{bootstrap!r} is not one of {', '.join(BOOTSTRAP_STACKS)}")
        join_token = string("join_token")
        if not _valid_token(join_token):
            raise bad(
                "join_token",
                f"expected {JOIN_TOKEN_BYTES} bytes as unpadded urlsafe base64"
                f" ({_token_chars()} characters)",
            )
        try:
            ca_cert_pem = _parse_ca_cert(string("ca_cert"))
        except ValueError as exc:
            raise bad("ca_cert", str(exc)) from exc
        cluster = None
        if "cluster" in table:
            cluster = string("cluster")
            if not _valid_cluster_name(cluster):
                raise bad("cluster", f"{cluster!r} is not a valid cluster name")
            if bootstrap == "tcp":
                raise bad("cluster", "a plain-TCP session has no certificates to attest a cluster")
        unknown = sorted(set(table) - {"id", "rendezvous", "bootstrap", "join_token", "ca_cert", "cluster"})
        if unknown:
            log.warning("%s: ignoring unknown [session] keys: %s", path, ", ".join(unknown))
        return cls(session_id, host, port, bootstrap, join_token, ca_cert_pem, path, cluster,
                   tuple(addrs) if len(addrs) > 1 else ())

    def check_token(self, token: object) -> bool:
        """True if ``token`` is this session's join token (constant time); False for non-str."""
        if not isinstance(token, str):
            return False
        try:
            given = token.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            return False
        return hmac.compare_digest(given, self.join_token.encode("utf-8"))

    def for_cluster(self, cluster: str) -> Session:
        """The session file of cluster ``cluster`` (``cluster-<NAME>.toml`` beside this file,
        written by :func:`add_cluster`), loaded. Raises ConfigError if there is none."""
        if not _valid_cluster_name(cluster):
            raise ConfigError(f"{cluster!r} is not a valid cluster name")
        path = self._beside(cluster_file_name(cluster))
        if not path.exists():
            raise ConfigError(f"cluster {cluster!r} is not defined in session {self.session_id}: no {path}"
                              f" (gridsock session cluster {path.parent} {cluster} defines it)")
        return Session.load(path)

    def _beside(self, name: str) -> Path:
        if self.path is None:
            raise ConfigError("this session was not loaded from a file: no private material")
        return self.path.parent / name

    def _read_private(self, name: str) -> bytes:
        path = self._beside(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"this host is not the rendez-vous host: {name} missing beside {self.path}"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from exc

    def certificate_authority(self) -> CertificateAuthority:
        """Load the session CA from ca-key.pem beside the session file.

        Raises ConfigError if the key is absent (this is not the rendez-vous host), does not
        parse, or does not match the session's CA certificate.
        """
        key_pem = self._read_private(CA_KEY_FILE)
        try:
            return CertificateAuthority(self.ca_cert_pem, key_pem)
        except ConfigError as exc:
            raise ConfigError(f"{self._beside(CA_KEY_FILE)}: {exc}") from exc

    def rendezvous_identity(self, index: int = 0) -> Identity:
        """Load the identity of rendez-vous node ``index`` (0: the first, from rendezvous-cert.pem
        and rendezvous-key.pem; N-1: the Nth, from rendezvous-N-cert.pem and rendezvous-N-key.pem).

        Raises ConfigError if they are absent (this is not the rendez-vous host), do not parse or
        match, or the certificate is not this session's rendez-vous certificate.
        """
        cert_file, key_file = _rendezvous_files(index)
        cert_pem = self._read_private(cert_file)
        key_pem = self._read_private(key_file)
        where = self._beside(cert_file)
        try:
            identity = Identity(cert_pem, key_pem)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if identity.subject != PeerIdentity("rendezvous", self.session_id):
            raise ConfigError(
                f"{where}: not the rendez-vous certificate of session {self.session_id}"
            )
        try:
            ca = x509.load_pem_x509_certificate(self.ca_cert_pem)
            x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(ca)
        except (*_PARSE_ERRORS, InvalidSignature) as exc:
            raise ConfigError(f"{where}: not issued by the session CA: {exc}") from exc
        return identity


def _token_chars() -> int:
    return len(base64.urlsafe_b64encode(bytes(JOIN_TOKEN_BYTES)).rstrip(b"="))


def _valid_token(token: str) -> bool:
    if len(token) != _token_chars() or not re.fullmatch(r"[A-Za-z0-9_-]+", token):
        return False
    try:
        return len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) == JOIN_TOKEN_BYTES
    except (binascii.Error, ValueError):
        return False


def create_session(directory, rendezvous, *, bootstrap: str = "tls/tcp", clusters=()) -> Session:
    """Create a new session in ``directory`` (made if missing) and return it.

    Writes session.toml, ca.pem, ca-key.pem (0600), rendezvous-cert.pem and rendezvous-key.pem
    (0600), and for each name in ``clusters`` what :func:`add_cluster` writes (the session then
    attests its clusters). ``rendezvous`` is ``HOST:PORT``, the address nodes dial (the port
    defaults to DEFAULT_RENDEZVOUS_PORT), or a list of them: a federation of rendez-vous nodes,
    the first one's files as above, each other's written by :func:`add_rendezvous`
    (docs/federation.md). Raises ConfigError for a bad address, bootstrap stack
    or cluster name, clusters in a plain-TCP session, or if any of these files already exists;
    on failure, nothing is left behind.
    """
    if bootstrap not in BOOTSTRAP_STACKS:
        raise ConfigError(f"bootstrap {bootstrap!r} is not one of {', '.join(BOOTSTRAP_STACKS)}")
    clusters = list(clusters)
    for cluster in clusters:
        if not _valid_cluster_name(cluster):
            raise ConfigError(f"{cluster!r} is not a valid cluster name")
    if len(set(clusters)) != len(clusters):
        raise ConfigError(f"clusters {clusters}: each cluster once")
    if clusters and bootstrap == "tcp":
        raise ConfigError("a plain-TCP session has no certificates: its clusters cannot be attested")
    more: list = []
    if not isinstance(rendezvous, str):
        listed = list(rendezvous)
        if not listed or len(listed) > MAX_RENDEZVOUS or not all(isinstance(r, str) for r in listed):
            raise ConfigError(f"rendez-vous: one HOST:PORT, or a list of 1 to {MAX_RENDEZVOUS} of them")
        rendezvous, more = listed[0], listed[1:]
        for other in more:
            _check_dialable(parse_hostport(other, DEFAULT_RENDEZVOUS_PORT)[0], other)
    host, port = parse_hostport(rendezvous, DEFAULT_RENDEZVOUS_PORT)
    _check_dialable(host, rendezvous)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot create the session directory: {exc}") from exc
    names = (SESSION_FILE, CA_CERT_FILE, CA_KEY_FILE, RENDEZVOUS_CERT_FILE, RENDEZVOUS_KEY_FILE, CLUSTERS_FILE,
             *(cluster_file_name(c) for c in clusters))
    for name in names:
        if (directory / name).exists():
            raise ConfigError(
                f"{directory / name} already exists: refusing to overwrite a session"
            )

    session_id = str(uuid.uuid4())
    join_token = secrets.token_urlsafe(JOIN_TOKEN_BYTES)
    ca = CertificateAuthority.create(session_id)
    rendezvous_identity = ca.issue_rendezvous(session_id, host)
    session_path = directory / SESSION_FILE
    text = _dump_toml(
        {
            "session": {
                "id": session_id,
                "rendezvous": format_hostport(host, port),
                "bootstrap": bootstrap,
                "join_token": join_token,
                "ca_cert": ca.cert_pem.decode("ascii"),
            }
        },
        header=(
            "gridsock session file: hand it to every node of the session.\n"
            "It holds no private key, but its join_token lets a host join:"
            " keep it within the grid."
        ),
    )
    contents = (
        # The private files first, session.toml last: it is what marks the session as complete.
        (CA_KEY_FILE, ca.key_pem, 0o600),
        (RENDEZVOUS_KEY_FILE, rendezvous_identity.key_pem, 0o600),
        (RENDEZVOUS_CERT_FILE, rendezvous_identity.cert_pem, 0o644),
        (CA_CERT_FILE, ca.cert_pem, 0o644),
        (SESSION_FILE, text.encode("utf-8"), 0o600),  # holds the join token: a secret
    )
    written = []
    try:
        for name, data, mode in contents:
            _write_new(directory / name, data, mode)
            written.append(directory / name)
    except FileExistsError as exc:
        _remove(written)
        raise ConfigError(
            f"{exc.filename} already exists: refusing to overwrite a session"
        ) from exc
    except OSError as exc:
        _remove(written)
        raise ConfigError(f"{directory}: cannot write the session files: {exc}") from exc
    except BaseException:
        _remove(written)
        raise
    log.info("created session %s in %s (rendez-vous %s)", session_id, directory, rendezvous)
    session = Session(session_id, host, port, bootstrap, join_token, ca.cert_pem, session_path)
    try:
        for other in more:
            session, _ = add_rendezvous(session, other)
        for cluster in clusters:
            add_cluster(session, cluster)
    except BaseException:
        _remove(written + [directory / CLUSTERS_FILE] + [directory / cluster_file_name(c) for c in clusters]
                + [directory / f for i in range(1, len(more) + 1) for f in _rendezvous_files(i)])
        raise
    return session


def cluster_file_name(cluster: str) -> str:
    """The name of cluster ``cluster``'s session file, beside session.toml."""
    return CLUSTER_FILE_TEMPLATE.format(cluster)


def _read_cluster_tokens(path: Path) -> dict[str, str]:
    """The ``[clusters]`` table of clusters.toml at ``path``: cluster name -> join token.
    Raises FileNotFoundError if there is none, ConfigError if it is malformed."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        table = tomllib.loads(text).get("clusters", {})
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    if not isinstance(table, dict) or len(table) > MAX_CLUSTERS:
        raise ConfigError(f"{path}: [clusters] must be a table of at most {MAX_CLUSTERS} NAME = TOKEN lines")
    for name, token in table.items():
        if not _valid_cluster_name(name):
            raise ConfigError(f"{path}: [clusters] {name!r} is not a valid cluster name")
        if not isinstance(token, str) or not _valid_token(token):
            raise ConfigError(f"{path}: [clusters] {name}: not a join token")
    return dict(table)


def _write_cluster_tokens(path: Path, tokens: dict[str, str]) -> None:
    """Replace clusters.toml at ``path`` atomically (written 0600 beside, then renamed)."""
    lines = ["# gridsock: the join tokens of this session's clusters. The rendez-vous host's only:",
             "# each cluster's nodes get theirs in cluster-<NAME>.toml.", "", "[clusters]"]
    lines += [f"{_toml_value(name) if not re.fullmatch(r'[A-Za-z0-9_-]+', name) else name} = {_toml_value(token)}"
              for name, token in tokens.items()]
    temporary = path.with_name(path.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    _write_new(temporary, ("\n".join(lines) + "\n").encode("utf-8"), 0o600)
    os.replace(temporary, path)


def add_cluster(session, cluster: str) -> Session:
    """Define cluster ``cluster`` in a session; return the cluster's session (its file loaded).

    ``session`` is the session's own :class:`Session` (loaded from its session.toml on the
    rendez-vous host), or the path of that file or of its directory. Makes the cluster's join
    token, adds it to ``clusters.toml`` (0600, beside session.toml, rewritten atomically) and
    writes the cluster session file ``cluster-<NAME>.toml`` (0600): session.toml with the
    cluster's token as its join token and ``cluster = "<NAME>"``. Hand that file to the
    cluster's nodes, and to nobody else: its token admits a node to the cluster. From then on
    the session attests its clusters (see the module docstring). A running rendez-vous node
    admits the new cluster at once (it reads clusters.toml again when it changes).

    Raises ConfigError for a bad cluster name, a cluster already defined, a plain-TCP session,
    a cluster's session file given instead of the session's own, or a host that is not the
    rendez-vous host (no CA key beside the file).
    """
    if not isinstance(session, Session):
        session = Session.load(session)
    if not _valid_cluster_name(cluster):
        raise ConfigError(f"{cluster!r} is not a valid cluster name: letters, digits, '.', '_', '-',"
                          " starting with a letter or digit")
    if not session.tls:
        raise ConfigError("a plain-TCP session has no certificates: its clusters cannot be attested")
    if session.cluster is not None:
        raise ConfigError(f"{session.path} is cluster {session.cluster}'s session file: give the session's own"
                          f" {SESSION_FILE}")
    session.certificate_authority()  # (ConfigError if this is not the rendez-vous host)
    tokens_path = session._beside(CLUSTERS_FILE)
    try:
        tokens = _read_cluster_tokens(tokens_path)
    except FileNotFoundError:
        tokens = {}
    cluster_path = session._beside(cluster_file_name(cluster))
    if cluster in tokens or cluster_path.exists():
        raise ConfigError(f"cluster {cluster!r} is already defined in session {session.session_id} ({cluster_path})")
    if len(tokens) >= MAX_CLUSTERS:
        raise ConfigError(f"session {session.session_id} defines {len(tokens)} clusters already, its most")
    token = secrets.token_urlsafe(JOIN_TOKEN_BYTES)
    text = _dump_toml(
        {
            "session": {
                "id": session.session_id,
                "rendezvous": session._rendezvous_field(),
                "bootstrap": session.bootstrap,
                "join_token": token,
                "ca_cert": session.ca_cert_pem.decode("ascii"),
                "cluster": cluster,
            }
        },
        header=(
            f"gridsock session file of cluster {cluster}: hand it to the nodes of cluster {cluster} only.\n"
            f"Its join_token admits a host to cluster {cluster}: keep it within that cluster."
        ),
    )
    try:
        _write_new(cluster_path, text.encode("utf-8"), 0o600)
    except OSError as exc:
        raise ConfigError(f"{cluster_path}: cannot write the cluster's session file: {exc}") from exc
    try:
        _write_cluster_tokens(tokens_path, {**tokens, cluster: token})
    except BaseException as exc:
        _remove([cluster_path])
        if isinstance(exc, OSError):
            raise ConfigError(f"{tokens_path}: cannot write: {exc}") from exc
        raise
    log.info("session %s: defined cluster %s (%s)", session.session_id, cluster, cluster_path)
    return Session.load(cluster_path)


class ClusterTokens:
    """The join tokens of a session's clusters, as the rendez-vous node sees them.

    Read from ``clusters.toml`` beside the session's own file, and again whenever that file
    changes, so that a cluster defined while the rendez-vous node runs is admitted at once (a
    file that has turned bad is logged, and the tokens read before are kept). Raises ConfigError
    at construction for a bad file, or a cluster's session file given instead of the session's
    own (its join token is a cluster's: it must not admit nodes without a cluster).
    """

    def __init__(self, session: Session) -> None:
        if session.cluster is not None:
            raise ConfigError(f"{session.path} is cluster {session.cluster}'s session file: the rendez-vous node"
                              f" runs with the session's own {SESSION_FILE}")
        self.session = session
        self._stamp: tuple | None = None
        self._tokens: dict[str, str] = {}
        self._reload()

    def _reload(self) -> None:
        if self.session.path is None:
            return
        path = self.session._beside(CLUSTERS_FILE)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._stamp, self._tokens = None, {}
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            tokens = _read_cluster_tokens(path)
        except FileNotFoundError:
            tokens = {}
        self._stamp, self._tokens = stamp, tokens

    def current(self) -> dict[str, str]:
        """The defined clusters and their tokens, now (empty: the session defines none)."""
        try:
            self._reload()
        except ConfigError as exc:
            log.warning("%s; keeping the %d cluster(s) read before", exc, len(self._tokens))
        return dict(self._tokens)

    def admit(self, token: object) -> tuple[bool, str | None]:
        """What ``token`` admits: ``(True, None)`` for the session's own join token (a node
        without a cluster, or, in a session that defines no cluster, in any cluster),
        ``(True, NAME)`` for cluster NAME's token, ``(False, None)`` for anything else. Every
        token is compared, in constant time each."""
        found = None
        for name, expected in self.current().items():
            if _same_secret(token, expected):
                found = name
        main = self.session.check_token(token)
        if found is not None:
            return True, found
        return main, None


def _same_secret(given: object, expected: str) -> bool:
    """True if ``given`` is the str ``expected``, compared in constant time."""
    if not isinstance(given, str):
        return False
    try:
        data = given.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return hmac.compare_digest(data, expected.encode("utf-8"))


def _remove(paths) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


# -- several rendez-vous nodes (docs/federation.md) ---------------------------------------------


def rendezvous_name(index: int) -> str:
    """The name of the session's rendez-vous node ``index`` (0-based) in routing and status:
    ``rendezvous`` for the first (as a session with one always had), ``rendezvous-N`` for the
    Nth after it."""
    return RENDEZVOUS_NODE_ID if index == 0 else f"{RENDEZVOUS_NODE_ID}-{index + 1}"


def _rendezvous_files(index: int) -> tuple[str, str]:
    if index == 0:
        return RENDEZVOUS_CERT_FILE, RENDEZVOUS_KEY_FILE
    return RENDEZVOUS_N_CERT_FILE.format(index + 1), RENDEZVOUS_N_KEY_FILE.format(index + 1)


def add_rendezvous(session, rendezvous: str) -> tuple[Session, int]:
    """Add a rendez-vous node at ``rendezvous`` (``HOST:PORT``) to a session; return the session
    (its file loaded again) and the new node's index.

    ``session`` is the session's own :class:`Session` (on the host that holds the CA key) or
    the path of its session.toml or directory. Issues the new node's certificate
    (``rendezvous-N-cert.pem``, key ``rendezvous-N-key.pem``, 0600) and rewrites session.toml,
    and every cluster session file beside it, with ``rendezvous`` as a list. Hand the new files
    to every node again (a node with the old file knows only the rendez-vous nodes it lists),
    and the CA key, the rendez-vous files and clusters.toml to the new rendez-vous host, which
    enrolls nodes too. Raises ConfigError for a bad or unspecified address, one already listed,
    more than MAX_RENDEZVOUS, a cluster's session file, or a host without the CA key.
    """
    if not isinstance(session, Session):
        session = Session.load(session)
    if session.cluster is not None:
        raise ConfigError(f"{session.path} is cluster {session.cluster}'s session file: give the session's own"
                          f" {SESSION_FILE}")
    host, port = parse_hostport(rendezvous, DEFAULT_RENDEZVOUS_PORT)
    _check_dialable(host, rendezvous)
    addrs = list(session.rendezvous_addresses)
    if (host, port) in addrs:
        raise ConfigError(f"rendez-vous {rendezvous!r} is already in session {session.session_id}")
    if len(addrs) >= MAX_RENDEZVOUS:
        raise ConfigError(f"session {session.session_id} lists {len(addrs)} rendez-vous nodes already, its most")
    ca = session.certificate_authority()  # (ConfigError if this host has no CA key)
    index = len(addrs)
    cert_file, key_file = _rendezvous_files(index)
    for name in (cert_file, key_file):
        if session._beside(name).exists():
            raise ConfigError(f"{session._beside(name)} already exists: refusing to overwrite it")
    identity = ca.issue_rendezvous(session.session_id, host)
    written: list = []
    try:
        _write_new(session._beside(key_file), identity.key_pem, 0o600)
        written.append(session._beside(key_file))
        _write_new(session._beside(cert_file), identity.cert_pem, 0o644)
        written.append(session._beside(cert_file))
    except OSError as exc:
        _remove(written)
        raise ConfigError(f"{session._beside(cert_file)}: cannot write: {exc}") from exc
    updated = replace(session, rendezvous_list=tuple(addrs + [(host, port)]))
    paths = [session.path] + sorted(session._beside(SESSION_FILE).parent.glob(CLUSTER_FILE_TEMPLATE.format("*")))
    for path in paths:
        if path is None:
            continue
        _rewrite_rendezvous(Path(path), updated._rendezvous_field())
    log.info("session %s: added rendez-vous node %d at %s", session.session_id, index + 1, rendezvous)
    return Session.load(session.path), index


def _check_dialable(host: str, given: str) -> None:
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False  # a host name
    if unspecified:
        raise ConfigError(
            f"rendez-vous {given!r}: nodes dial this address, so it cannot be"
            " 0.0.0.0 or ::; give the rendez-vous host's reachable address or name"
        )


def _rewrite_rendezvous(path: Path, value: str | list) -> None:
    """Rewrite the ``rendezvous`` key of the session file ``path`` (atomically, mode kept)."""
    text = path.read_text("utf-8")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"rendezvous\s*=", line):
            lines[i] = f"rendezvous = {_toml_value(value)}"
            break
    else:
        raise ConfigError(f"{path}: no rendezvous key to rewrite")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IMODE(path.stat().st_mode))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


# -- a node's state directory --------------------------------------------------------------


def default_state_dir(session_id: str, name: str) -> str:
    """Where node ``name`` of session ``session_id`` keeps its identity by default:
    ``$XDG_STATE_HOME/gridsock/<session>/<name>`` (``~/.local/state`` when ``$XDG_STATE_HOME``
    is unset or not an absolute path, as the XDG base directory specification says). State
    outlives reboots, unlike the run directory (a tmpfs). Returns a path; creates nothing."""
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, STATE_SUBDIR, session_id, name)


class NodeState:
    """A node's state directory: what makes it the same node after a restart.

    It holds the node's certificate (``node-cert.pem``) and private key (``node-key.pem``,
    0600) in a TLS session, its self-chosen node id (``node-id``) in a plain-TCP one, and a
    ``lock`` file that one running node holds (``flock``; the kernel drops it when the process
    dies, SIGKILL included). The directory is created 0700 and refused, like the run directory
    (:func:`gridsock.names.check_private_dir`), when it is a symbolic link, another user's or
    writable by others; a key file readable by others is refused too. Files are replaced
    atomically (written beside, then renamed), so a node killed while saving leaves the old
    identity or the new one, never half of one.

    :meth:`open` it (takes the lock), then :meth:`load_identity` / :meth:`save_identity`
    (or the ``node_id`` pair); :meth:`close` when the node stops.
    """

    def __init__(self, path: str | os.PathLike[str], session: Session) -> None:
        self.path = Path(path)
        self.session = session
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"<NodeState {self.path}>"

    def open(self) -> NodeState:
        """Create (0700) and check the directory, take its lock; return self.

        Raises LocalTrustError (a PermissionError) for a directory that is not private to this
        user, ConfigError if another running node holds it, OSError if it cannot be made.
        """
        import fcntl

        from .names import make_private_dir

        make_private_dir(str(self.path))
        fd = os.open(self.path / STATE_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"{self.path}: the state directory is in use by another running node"
                              " (one identity runs once; give this node another --state-dir)") from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        return self

    def close(self) -> None:
        """Release the lock (idempotent); the files stay."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # (closing the descriptor releases the flock)

    def _read(self, name: str, *, secret: bool = False) -> bytes | None:
        path = self.path / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if secret and (st.st_mode & 0o077 or st.st_uid != os.geteuid()):
            raise ConfigError(f"{path}: a private key must be this user's and private to it (mode 0600,"
                              f" not {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from exc

    def _write(self, name: str, data: bytes) -> None:
        path = self.path / name
        temporary = self.path / (name + ".new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)  # left by a node killed while saving
        _write_new(temporary, data, 0o600)
        os.replace(temporary, path)

    def load_identity(self) -> Identity | None:
        """The identity saved here, or None if there is none yet or its certificate expired
        (the node enrolls again: a new id). Raises ConfigError for files that do not parse or
        match, a certificate of another session's CA, or a key file that is not private."""
        cert_pem = self._read(STATE_CERT_FILE)
        key_pem = self._read(STATE_KEY_FILE, secret=True)
        if cert_pem is None or key_pem is None:
            return None
        try:
            identity = Identity(cert_pem, key_pem)
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: {exc}") from exc
        try:
            ca = x509.load_pem_x509_certificate(self.session.ca_cert_pem)
            x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(ca)
        except (*_PARSE_ERRORS, InvalidSignature) as exc:
            raise ConfigError(f"{self.path}: the identity there belongs to another session (its certificate is"
                              f" not issued by the CA of session {self.session.session_id}); give this node"
                              " another --state-dir, or remove that directory") from exc
        if identity.subject.kind != "node":
            raise ConfigError(f"{self.path}: not a node identity")
        if identity.not_valid_after <= _now():
            log.warning("%s: the certificate of node %s expired on %s: enrolling again (a new id)", self.path,
                        identity.node_id, f"{identity.not_valid_after:%Y-%m-%d}")
            return None
        return identity

    def save_identity(self, identity: Identity) -> None:
        """Keep ``identity`` here (key file 0600). Raises OSError if it cannot be written."""
        self._write(STATE_KEY_FILE, identity.key_pem)
        self._write(STATE_CERT_FILE, identity.cert_pem)

    def load_node_id(self) -> str | None:
        """The node id saved here (plain-TCP sessions), or None. ConfigError if it is not a uuid."""
        data = self._read(STATE_NODE_ID_FILE)
        if data is None:
            return None
        node_id = _canonical_uuid(data.decode("ascii", "replace").strip())
        if node_id is None:
            raise ConfigError(f"{self.path / STATE_NODE_ID_FILE}: not a node id")
        return node_id

    def save_node_id(self, node_id: str) -> None:
        """Keep ``node_id`` here. Raises OSError if it cannot be written."""
        self._write(STATE_NODE_ID_FILE, (node_id + "\n").encode("ascii"))

    def load_ports(self) -> list[int]:
        """The grid ports the node served when it stopped (see :func:`load_ports`)."""
        return load_ports(self.path / STATE_PORTS_FILE)

    def save_ports(self, ports: list[int]) -> None:
        """Keep the grid ports the node serves, for its restart. Raises OSError if it cannot."""
        self._write(STATE_PORTS_FILE, json.dumps(ports).encode("ascii"))


def load_ports(path: Path) -> list[int]:
    """The grid ports saved at ``path`` (a state directory's STATE_PORTS_FILE); [] if none, or
    if the file does not hold a list of ports (logged: it is rewritten at the next change)."""
    try:
        ports = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("%s: not a list of ports (%s); ignored", path, exc)
        return []
    if not isinstance(ports, list) or not all(type(p) is int and 0 < p < 65536 for p in ports):
        log.warning("%s: not a list of ports; ignored", path)
        return []
    return ports[:65535]


# -- TLS ---------------------------------------------------------------------------------------


def _context(protocol: int, session: Session) -> ssl.SSLContext:
    context = gssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # identity comes from the SAN URI: see peer_identity()
    context.load_verify_locations(cadata=session.ca_cert_pem.decode("ascii"))
    # Python 3.13 sets this by default; set it everywhere so every version agrees.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def server_context(
    session: Session, identity: Identity, *, require_client_cert: bool
) -> ssl.SSLContext:
    """A gevent TLS server context presenting ``identity`` and trusting only the session CA.

    With ``require_client_cert=False`` clients without a certificate are accepted (enrollment
    with the join token); a client that does present one must still chain to the session CA.
    """
    context = _context(gssl.PROTOCOL_TLS_SERVER, session)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    identity.load_into(context)
    return context


def client_context(session: Session, identity: Identity | None) -> ssl.SSLContext:
    """A gevent TLS client context trusting only the session CA, presenting ``identity`` if any.

    The server's certificate is always required; host names are not checked (use
    :func:`peer_identity` to learn whom the link reached).
    """
    context = _context(gssl.PROTOCOL_TLS_CLIENT, session)
    context.verify_mode = ssl.CERT_REQUIRED
    if identity is not None:
        identity.load_into(context)
    return context


def peer_identity(ssl_sock) -> PeerIdentity | None:
    """Who is at the other end of a TLS socket whose handshake is done.

    Returns the PeerIdentity from the SAN URI of the peer's verified certificate, or None when
    the peer sent no certificate. Raises AuthError if the certificate carries no single valid
    gridsock URI (gridsock never issues such a certificate), and ValueError if the handshake is
    not done.
    """
    cert = ssl_sock.getpeercert()
    if not cert:  # None: no certificate; {}: one that was not verified
        return None
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    identity = _identity_from_uris(uris)
    if identity is None:
        raise AuthError("peer certificate carries no valid gridsock identity URI")
    return identity
