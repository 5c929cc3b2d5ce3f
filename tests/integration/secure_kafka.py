"""A private Apache Kafka broker with a SASL_SSL listener, and the certificates it needs.

In: a work folder. Out: a self-signed CA, a broker certificate for 127.0.0.1 / localhost, a client
certificate with a password-protected key (mutual TLS), all PEM, made with the ``openssl`` command;
and a broker started by ``deploy/kafka/local-kafka.sh`` in SASL_SSL mode on free ports with its own
data folder (SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN for one user, client certificates required),
stopped on exit. Needs the jars ``local-kafka.sh fetch`` caches, ``java`` and ``openssl``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.integration.harness import ROOT, free_port

KAFKA_SCRIPT = ROOT / "deploy" / "kafka" / "local-kafka.sh"


def kafka_home() -> Path:
    version = os.environ.get("SHOPSTREAM_KAFKA_VERSION", "4.1.1")
    default = Path.home() / ".cache" / "shopstream" / f"kafka-{version}"
    return Path(os.environ.get("SHOPSTREAM_KAFKA_HOME", default))


def missing_tools() -> str | None:
    """What stops a private broker from starting here, or None."""
    if not (kafka_home() / "libs" / ".complete").exists():
        return f"Kafka jars not fetched into {kafka_home()} (run `shopstream kafka fetch`)"
    for tool in ("java", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


@dataclass(frozen=True)
class Certs:
    ca: Path
    broker_cert: Path
    broker_key: Path
    client_cert: Path
    client_key: Path  # encrypted with the key password


def _openssl(folder: Path, command: str, *args: str) -> None:
    subprocess.run(["openssl", *command.split(), *args], cwd=folder, check=True, capture_output=True)


def make_certs(folder: Path, key_password: str) -> Certs:
    """A CA (2 days) and the broker and client certificates it signs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.ext").write_text(
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\n"
    )
    leaf = (
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    (folder / "broker.ext").write_text(
        leaf + "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    (folder / "client.ext").write_text(leaf + "extendedKeyUsage=clientAuth\n")
    new_key = "req -new -newkey rsa:2048 -keyout {0}.key -out {0}.csr -subj /CN={0}"
    _openssl(folder, new_key.format("ca"), "-nodes")
    _openssl(folder, "x509 -req -in ca.csr -signkey ca.key -days 2 -extfile ca.ext -out ca.pem")
    sign = "x509 -req -in {0}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile {0}.ext"
    for name, key_args in (("broker", ["-nodes"]), ("client", ["-passout", f"pass:{key_password}"])):
        _openssl(folder, new_key.format(name), *key_args)
        _openssl(folder, sign.format(name), "-out", f"{name}.pem")
    return Certs(
        folder / "ca.pem",
        folder / "broker.pem",
        folder / "broker.key",
        folder / "client.pem",
        folder / "client.key",
    )


@contextmanager
def secure_broker(workdir: Path, user: str, password: str, certs: Certs) -> Iterator[str]:
    """Start the broker, yield its bootstrap address, stop it."""
    port = free_port()
    env = {
        **os.environ,
        "SHOPSTREAM_KAFKA_DATA": str(workdir / "kafka"),
        "SHOPSTREAM_KAFKA_PORT": str(port),
        "SHOPSTREAM_KAFKA_CONTROLLER_PORT": str(free_port()),
        "SHOPSTREAM_KAFKA_HEAP": "-Xms256m -Xmx512m",
        "SHOPSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "SHOPSTREAM_KAFKA_SASL_USERNAME": user,
        "SHOPSTREAM_KAFKA_SASL_PASSWORD": password,
        "SHOPSTREAM_KAFKA_SSL_CAFILE": str(certs.ca),
        "SHOPSTREAM_KAFKA_BROKER_CERTFILE": str(certs.broker_cert),
        "SHOPSTREAM_KAFKA_BROKER_KEYFILE": str(certs.broker_key),
        "SHOPSTREAM_KAFKA_CLIENT_AUTH": "required",
    }
    up = subprocess.run(["bash", str(KAFKA_SCRIPT), "up"], env=env, capture_output=True, text=True)
    try:
        if up.returncode != 0:
            raise RuntimeError(f"the SASL_SSL broker did not start:\n{up.stderr}")
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(KAFKA_SCRIPT), "down"], env=env, capture_output=True)
