"""Shared fixtures: a real mosquitto broker on a free loopback port (plain, and TLS + passwords).

Integration tests never mock the broker: each fixture writes a mosquitto config into the test's
temporary folder, starts `mosquitto -c` on a free 127.0.0.1 port, waits until it accepts TCP,
and stops it afterwards. `Broker.stop()` / `Broker.start()` simulate an outage on the same port;
persistence is on, so subscribers with a persistent session keep their queued messages.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ci_skips import pytest_runtest_makereport  # noqa: F401  (CI=true: broker skips fail)

# Before torch/OpenVINO load: spinning OpenMP threads starve each other on a busy 2-core box.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"mosquitto did not listen on port {port}")


class Broker:
    """A mosquitto process owned by one test."""

    def __init__(self, folder: Path, port: int, extra: str = "") -> None:
        self.folder = folder
        self.port = port
        self.host = "127.0.0.1"
        self.log = folder / "mosquitto.log"
        self.conf = folder / "mosquitto.conf"
        folder.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"listener {port} 127.0.0.1\n"
            "user root\n"  # tests run as root in CI; do not drop to a user that cannot read tmp
            "persistence true\n"
            f"persistence_location {folder}/\n"
            f"log_dest file {self.log}\n"
            "log_type all\n"
            "max_queued_messages 100000\n" + extra
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_port(self.port)
        except TimeoutError:
            self.proc.kill()
            err = self.proc.communicate()[1].decode(errors="replace")
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"mosquitto failed to start: {err}\n{log[-2000:]}") from None
        return self

    def stop(self) -> None:
        """Clean stop (SIGTERM): mosquitto writes its persistence file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A plain-TCP, anonymous broker on a free loopback port."""
    broker = Broker(tmp_path / "mosquitto", free_port(), "allow_anonymous true\n").start()
    yield broker
    broker.stop()


# ------------------------------------------------------------------ TLS


@dataclass
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path  # a CA the server's certificate does NOT chain to
    password_file: Path
    username: str
    password: str


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _make_ca(cn: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def generate_tls(folder: Path) -> tuple[Path, Path, Path, Path]:
    """CA + server certificate for 127.0.0.1/localhost, and an unrelated second CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca("LineGuard test CA")
    _, other_cert = _make_ca("Some other CA")
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = (folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "other.crt")
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    _write_key(paths[2], key)
    paths[3].write_bytes(other_cert.public_bytes(pem))
    return paths


@pytest.fixture
def mosquitto_tls(tmp_path: Path):
    """A TLS-only broker (CA generated here) that requires a user name and password."""
    folder = tmp_path / "mosquitto-tls"
    ca, cert, key, other = generate_tls(folder / "tls")
    pw_file = folder / "passwd"
    user, password = "edge1", "s3cret-pw"
    subprocess.run(
        [MOSQUITTO_PASSWD, "-c", "-b", str(pw_file), user, password],
        check=True,
        capture_output=True,
    )
    os.chmod(pw_file, 0o600)
    extra = (
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        f"allow_anonymous false\npassword_file {pw_file}\n"
    )
    broker = Broker(folder, free_port(), extra).start()
    broker.tls = TlsFiles(ca, cert, key, other, pw_file, user, password)
    yield broker
    broker.stop()
