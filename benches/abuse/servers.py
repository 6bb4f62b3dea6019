"""The servers of the abuse benchmark: the sandbox token endpoint, two origins (nginx answering
`ok`, and an origin of this script's own for the large bodies that records how each of its
connections ended), and the gateway under test, tokengate or nginx, started per stage with the
stage's bounds."""

import contextlib
import ctypes
import json
import os
import re
import resource
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "release"
GATEWAY_CORE, CLIENT_CORE = "0", "1"
ALLOWED = "127.0.0.1"  # the one client address in allowed_clients
OUTSIDE = "127.0.0.2"  # a loopback address outside it

# The bounds under test, tokengate's `[server]` keys with the value each stage uses when the
# binary knows the key (a binary without it runs with its built-in behaviour). The nginx
# directive that bounds the same thing is written with the same value.
NEW_KEYS = {
    "max_request_head": "32KiB",
    "request_head_timeout": "10s",
    "idle_timeout": "60s",
    "body_timeout": "60s",
    "send_timeout": "60s",
    "max_connections": 12000,
}


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def raise_nofile():
    """This process's open-file limit raised to its hard limit; returns the new soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _child_setup():
    """In a server child before exec: its own session, SIGTERM when this script dies (prctl
    PR_SET_PDEATHSIG), and the open-file limit at its hard limit."""
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    raise_nofile()


def spawn(core, args, **kw):
    return subprocess.Popen(["taskset", "-c", core, *args], preexec_fn=_child_setup, **kw)


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


def rss_kib(pid):
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else 0


def nofile_limit(pid):
    """The soft open-file limit of process `pid` (`ulimit -n` as it runs)."""
    line = next(l for l in Path(f"/proc/{pid}/limits").read_text().splitlines() if l.startswith("Max open files"))
    return int(line.split()[3])


def socket_inodes(pid):
    """Inodes of the sockets process `pid` holds open."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            t = os.readlink(fd)
            if t.startswith("socket:["):
                out.add(int(t[8:-1]))
    return out


def tcp_inode(local_port, remote_port):
    """The inode of the IPv4 TCP socket from local port `local_port` to remote port
    `remote_port` (/proc/net/tcp), or None: 0 once its process closed it."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == local_port and int(f[2].split(":")[1], 16) == remote_port:
            return int(f[9])
    return None


class Sandbox:
    """The sandbox token endpoint (`examples/sandbox_servers`), for tokengate's routes."""

    def __init__(self, binary):
        self.proc = spawn(CLIENT_CORE, [str(binary), "3600"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
        self.token_endpoint = json.loads(self.proc.stdout.readline())["driftrock_token_endpoint"]

    def stop(self):
        stop(self.proc, signal.SIGINT)


class NginxOrigin:
    """nginx answering `ok` to every request on /, with head buffers large enough for the 30 KiB
    head the gateway should pass on."""

    def __init__(self, work: Path):
        self.port = free_port()
        conf = work / "origin.conf"
        conf.write_text(f"""
user root; worker_processes 1; daemon off; pid {work}/origin.pid; error_log {work}/origin.err warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 19000; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  large_client_header_buffers 4 64k;
  server {{ listen 127.0.0.1:{self.port} backlog=4096; location / {{ return 200 "ok\\n"; }} }} }}
""")
        self.proc = spawn(CLIENT_CORE, ["nginx", "-p", str(work), "-c", str(conf)])
        wait_port(self.port)

    def stop(self):
        stop(self.proc)


class BodyOrigin:
    """An HTTP/1.1 origin in this process for the large bodies: `POST …/upload` reads the whole
    body (Content-Length or chunked) and answers 200 `received=N`; `GET …/download?bytes=N`
    sends N bytes. Each request is recorded with how its connection ended (all sent, peer
    closed or reset, timeout), when and after how many bytes, so the origin side of a stalled
    download can be read off: whether the gateway closed its upstream connection too."""

    CHUNK = b"\0" * (1 << 20)

    def __init__(self, timeout):
        self.events, self.lock = [], threading.Lock()
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(timeout)
                with contextlib.suppress(OSError, ValueError):
                    origin._serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _serve(self, conn):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data or len(buf) > 1 << 20:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            fields = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
            ev = {"method": method, "target": target, "start": time.time(), "bytes": 0, "outcome": "open"}
            with self.lock:
                self.events.append(ev)
            try:
                if method == "POST":
                    buf = self._read_body(conn, buf, fields, ev)
                    body = f"received={ev['bytes']}\n".encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                else:
                    n = int(re.search(r"bytes=(\d+)", target).group(1))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: %d\r\n\r\n" % n)
                    while ev["bytes"] < n:
                        ev["bytes"] += conn.send(memoryview(self.CHUNK)[:min(len(self.CHUNK), n - ev["bytes"])])
                ev["outcome"] = "complete"
            except socket.timeout:
                ev["outcome"] = "origin timeout"
                raise
            except (ConnectionResetError, BrokenPipeError) as e:
                ev["outcome"] = "reset by gateway" if isinstance(e, ConnectionResetError) else "closed by gateway"
                raise
            except EOFError:
                ev["outcome"] = "closed by gateway"
                return
            finally:
                ev["end"] = time.time()

    @staticmethod
    def _read_body(conn, buf, fields, ev):
        def more():
            data = conn.recv(1 << 20)
            if not data:
                raise EOFError
            return data

        if "chunked" in fields.get("transfer-encoding", "").lower():
            while True:
                while b"\r\n" not in buf:
                    buf += more()
                size_line, buf = buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(buf) < size + 2:
                    buf += more()
                ev["bytes"] += size
                buf = buf[size + 2:]
                if size == 0:
                    return buf  # no trailers expected
        left = int(fields.get("content-length", "0"))
        take = min(left, len(buf))
        ev["bytes"], buf, left = take, buf[take:], left - take
        while left:
            data = more()
            ev["bytes"] += min(len(data), left)
            buf, left = data[left:], max(0, left - len(data))
        return buf

    def events_for(self, marker):
        with self.lock:
            return [dict(e) for e in self.events if marker in e["target"]]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def tokengate_config(port, admin, origin_port, body_port, token_endpoint, keys):
    server_keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    auth = f"""[routes.auth]
grant = "client_credentials"
token_endpoint = "{token_endpoint}"
client_id = "dr/client 7"
client_secret = "s3cr+t/%41:y=z"
"""
    return f"""[server]
listen = "127.0.0.1:{port}"
admin_listen = "{admin}"
allowed_clients = ["{ALLOWED}/32"]
threads = 1
grace_period = "1s"
{server_keys}
[log]
level = "error"

[[routes]]
name = "body"
path_prefix = "/big"
upstream = "http://127.0.0.1:{body_port}"
{auth}
[[routes]]
name = "api"
upstream = "http://127.0.0.1:{origin_port}"
{auth}"""


def supported_keys(binary, work: Path, token_endpoint):
    """The NEW_KEYS that `binary check` accepts, each tried alone in an otherwise valid config."""
    conf = work / "check.toml"
    conf.write_text(tokengate_config(1, "127.0.0.1:2", 3, 4, token_endpoint, {}))
    r = subprocess.run([str(binary), "check", "-c", str(conf)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{binary} check rejects the base config {conf}: {r.stderr.strip()}")
    out = []
    for key, value in NEW_KEYS.items():
        conf = work / f"check-{key}.toml"
        conf.write_text(tokengate_config(1, "127.0.0.1:2", 3, 4, token_endpoint, {key: value}))
        r = subprocess.run([str(binary), "check", "-c", str(conf)], capture_output=True, text=True)
        if r.returncode == 0:
            out.append(key)
    return out


class Tokengate:
    """tokengate under test, one worker thread pinned alone to the gateway core."""

    def __init__(self, binary, work: Path, sandbox, origin, body_origin, supported):
        self.binary, self.work, self.sandbox = binary, work, sandbox
        self.origin, self.body_origin, self.supported = origin, body_origin, supported
        self.name = f"tokengate ({Path(binary).name})"
        self.proc = None

    def start(self, bounds):
        """Starts it with `bounds` (key → value) applied where supported; returns those used."""
        used = {k: v for k, v in {**NEW_KEYS, **bounds}.items() if k in self.supported}
        self.port, admin_port = free_port(), free_port()
        self.admin = f"127.0.0.1:{admin_port}"
        conf = self.work / "tokengate.toml"
        conf.write_text(tokengate_config(self.port, self.admin, self.origin.port, self.body_origin.port,
                                         self.sandbox.token_endpoint, used))
        self.proc = spawn(GATEWAY_CORE, [str(self.binary), "run", "-c", str(conf)],
                          stderr=open(self.work / "tokengate.err", "a"))
        deadline = time.time() + 30
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://{self.admin}/readyz", timeout=1).status == 200:
                    break
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not become ready (see {self.work}/tokengate.err)")
            time.sleep(0.1)
        return used

    def pid(self):
        return self.proc.pid

    def connections(self):
        """`tokengate_connections` from the admin listener's /metrics (None if it has no such gauge)."""
        text = urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5).read().decode()
        m = re.search(r"^tokengate_connections (\S+)$", text, re.M)
        return int(float(m.group(1))) if m else None

    def stop(self):
        """SIGKILL: a graceful stop would wait out the shutdown delay, and nothing here needs it."""
        if self.proc:
            stop(self.proc, signal.SIGKILL)
            self.proc = None


# tokengate key → the nginx directive bounding the same thing.
NGINX_DIRECTIVES = {
    "request_head_timeout": "client_header_timeout",
    "idle_timeout": "keepalive_timeout",
    "body_timeout": "client_body_timeout",
    "send_timeout": "send_timeout",
}


class Nginx:
    """nginx as the gateway for comparison: one worker pinned to the gateway core, a static
    Authorization field, `allow 127.0.0.1; deny all;`, the stage's bounds as the directives
    in NGINX_DIRECTIVES, heads up to 32 KiB (`large_client_header_buffers 4 32k`: a longer
    field line is 400), an upstream keep-alive pool of 256, default proxy buffering."""

    name = "nginx"

    def __init__(self, work: Path, origin, body_origin):
        self.work, self.origin, self.body_origin = work, origin, body_origin
        self.proc = None

    def start(self, bounds):
        b = {**NEW_KEYS, **bounds}
        used = {NGINX_DIRECTIVES[k]: b[k] for k in NGINX_DIRECTIVES}
        used["large_client_header_buffers"] = "4 32k"
        used["worker_connections"] = b["max_connections"]
        self.port, self.status_port = free_port(), free_port()
        w = self.work
        direct = " ".join(f"{k} {v};" for k, v in used.items() if k != "worker_connections")
        auth = 'proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Authorization "Bearer static";'
        (w / "nginx.conf").write_text(f"""
user root; worker_processes 1; daemon off; pid {w}/nginx.pid; error_log {w}/nginx.err error;
worker_rlimit_nofile 20000;
events {{ worker_connections {used['worker_connections']}; }}
http {{ access_log off; {direct} client_max_body_size 0;
  upstream origin {{ server 127.0.0.1:{self.origin.port}; keepalive 256; }}
  upstream body {{ server 127.0.0.1:{self.body_origin.port}; keepalive 16; }}
  server {{ listen 127.0.0.1:{self.port} backlog=4096; allow {ALLOWED}; deny all;
    location /big/ {{ proxy_pass http://body; {auth} }}
    location / {{ proxy_pass http://origin; {auth} }} }}
  server {{ listen 127.0.0.1:{self.status_port}; location / {{ stub_status; }} }} }}
""")
        self.proc = spawn(GATEWAY_CORE, ["nginx", "-p", str(w), "-c", str(w / "nginx.conf")])
        wait_port(self.port)
        return used

    def pid(self):
        """The worker process: it holds the connections; the master only supervises."""
        for _ in range(50):
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if kids:
                return int(kids[0])
            time.sleep(0.1)
        return self.proc.pid

    def connections(self):
        """Active client connections from stub_status, less the status request itself."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/", timeout=5).read().decode()
        return int(re.search(r"Active connections:\s*(\d+)", text).group(1)) - 1

    def stop(self):
        if self.proc:
            stop(self.proc)
            self.proc = None
