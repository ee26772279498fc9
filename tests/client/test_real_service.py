"""The client against the real service: retries through faults still make exactly one job."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

import bocompress
from tests.conftest import LiveServer
from tests.service.test_generic_jobs import BRANIN


class FaultyProxy:
    """A TCP proxy in front of the service that sabotages the first ``POST /api/v1/jobs``.

    ``mode="drop"``: forward it, let the service create the job, then cut the connection before
    the client sees the answer. ``mode="503"``: forward it, then answer the client 503 instead.
    """

    def __init__(self, upstream_port: int, mode: str) -> None:
        self.upstream = upstream_port
        self.mode = mode
        self.armed = True
        self.sabotaged = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        u = socket.create_connection(("127.0.0.1", self.upstream))
        try:
            while True:
                req = self._read_http(c)
                if not req:
                    return
                with self.lock:
                    sabotage = self.armed and req.startswith(b"POST /api/v1/jobs ")
                    if sabotage:
                        self.armed = False
                        self.sabotaged += 1
                u.sendall(req)
                resp = self._read_http(u)
                if sabotage:
                    if self.mode == "503":
                        c.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                  b"content-length: 44\r\nconnection: close\r\n\r\n"
                                  b'{"detail": "try again", "code": "busy"}     ')
                    c.close()
                    return
                c.sendall(resp)
        except OSError:
            return
        finally:
            u.close()
            c.close()

    @staticmethod
    def _read_http(s: socket.socket) -> bytes:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return b""
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", ["drop", "503"])
def test_fault_mid_create_still_makes_exactly_one_job(server: LiveServer, mode: str) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    proxy = FaultyProxy(port, mode)
    try:
        spec = {**BRANIN, "name": f"once-{mode}"}
        with bocompress.Client(f"http://127.0.0.1:{proxy.port}", token=server.admin_token, max_retries=3) as c:
            job = c.create_job(spec)
            assert proxy.sabotaged == 1
            same = [j for j in c.jobs() if j["name"] == f"once-{mode}"]
        assert len(same) == 1 and same[0]["id"] == job.id
    finally:
        proxy.close()


def test_import_bocompress_is_light() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import bocompress"], capture_output=True,
                         text=True, check=True)
    modules = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    for heavy in ("torch", "sqlalchemy", "fastapi", "pandas", "matplotlib", "numpy", "service", "worker"):
        assert heavy not in modules, f"import bocompress pulled in {heavy}"
