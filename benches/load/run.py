#!/usr/bin/env python3
"""tokengate load benchmark: tokengate vs nginx, HAProxy and a bare pingora pass-through.

Every proxy forwards to the same origin (nginx `return 200`) and adds an Authorization header:
tokengate a real access token it obtained from the sandbox token endpoint (client credentials
grant) and keeps renewing; nginx and HAProxy a static one as long as a real token (fetched once
at start) plus the forwarding fields tokengate adds (X-Forwarded-Host/-Proto/-For, X-Request-Id),
so the origin parses the same request from all three; the bare pingora pass-through a short
static header only.

Pinning (2-core machine): every proxy runs alone on core 0 with one worker thread; the load
generator (wrk/oha), the origin and the token endpoint share core 1. A run whose load-generator
core is saturated (>= 95 % busy) is marked client-bound: its numbers say more about wrk than about
the proxy.

Stages (all on loopback):
  peak     wrk, 64 connections, each proxy in turn, alternating order, --rounds rounds:
           median requests/s, proxy-core CPU us per request, non-2xx count, tokengate's ratio
  latency  oha --latency-correction at 25 % and 50 % of tokengate's peak rate, for tokengate,
           nginx and the origin directly, --rounds rounds: median p50/p99/p99.9 added over the
           direct run of the same round, non-2xx or failed requests; with --latency-breakdown also where it went: the wait
           before oha could send (a free connection of 64, its core) and the time on the wire
  scaling  requests/s at 1, 64, 256, 1024 connections (client-bound cells marked, non-2xx
           counted); resident memory idle and at 1024; tokengate with 1 route vs 1,000 routes
           on the same path (--rounds runs each, medians); writes scaling.svg
  token    60 s at 64 connections with 5-second tokens: token requests seen by the token
           endpoint vs renewals, and non-2xx responses
  fleet    three tokengate gateways (all on core 0, one worker thread each) with the same route
           and 5-second tokens, once with [cluster] sharing one redis-server (own loopback
           port, no persistence) and once alone, alternating over --rounds rounds; one wrk per
           gateway at once (63 connections in all) for --duration s after a 2 s warm-up:
           requests/s per proxy-core second with [cluster] against without (from the three
           gateways' CPU time), and token requests the token endpoint saw per renewal period

--baseline BIN adds another tokengate build (an earlier commit's release binary, same config)
to the peak stage's rotation as `baseline`, so a change is measured before and after in one
run: its proxy-core CPU per request against this build's.

Installs what is missing: cmake (for the release build), nginx-light, haproxy, wrk and (for the
fleet stage) redis-server from Debian packages, oha from crates.io. Binaries are taken from
$CARGO_TARGET_DIR/release when CARGO_TARGET_DIR is set, else target/release.
Results: printed as Markdown, and written to --out (results.json, scaling.svg).
"""

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where `cargo build --release` puts the binaries: CARGO_TARGET_DIR when set (relative to the
# repository, as cargo takes it from there), else target/.
RELEASE = ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "release"
ORIGIN = "127.0.0.1:18000"
PORTS = {"tokengate": 18081, "nginx": 18082, "haproxy": 18083, "pingora": 18084}
ADMIN = "127.0.0.1:18091"
BASELINE_PORT, BASELINE_ADMIN = 18085, "127.0.0.1:18092"
PROXY_CORE, CLIENT_CORE = "0", "1"
# Matches routes[998] of the 1,000-route config (`/svc998/v4`, see Fleet.tokengate_config).
ROUTE_PATH = "/svc998/v4/orders/1"


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, **kw)


def ensure_tools(need_oha=True, need_redis=False):
    # cmake: the release build needs it (pingora's zlib-ng, aws-lc); the rest are the targets,
    # the load generator and the fleet stage's Redis.
    tools = (("cmake", "cmake"), ("nginx-light", "nginx"), ("haproxy", "haproxy"), ("wrk", "wrk"))
    missing = [p for p, b in tools + ((("redis-server", "redis-server"),) if need_redis else ())
               if not shutil.which(b)]
    if missing:
        print(f"installing {' '.join(missing)} …", file=sys.stderr)
        sh("apt-get update -qq")
        sh(["apt-get", "install", "-y", "-qq", *missing], stdout=subprocess.DEVNULL)
    if need_oha and not shutil.which("oha") and not (Path.home() / ".cargo/bin/oha").exists():
        print("installing oha from crates.io …", file=sys.stderr)
        sh(["cargo", "install", "--locked", "oha"])
    os.environ["PATH"] = f"{Path.home() / '.cargo/bin'}:{os.environ['PATH']}"


def build():
    sh(["cargo", "build", "--release", "--bin", "tokengate", "--example", "passthrough",
        "--example", "sandbox_servers"], cwd=ROOT)


def _die_with_parent():
    """In the child before exec: its own session, so a terminal's Ctrl-C reaches only this
    script, which stops the fleet in order; and SIGTERM when the script dies, even by SIGKILL
    (prctl PR_SET_PDEATHSIG), so no server outlives it."""
    import ctypes
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def pinned(core, args, **kw):
    return subprocess.Popen(["taskset", "-c", core, *args], preexec_fn=_die_with_parent, **kw)


def ports_free():
    """Refuses to start when a port the fleet needs already answers (a run still going, or
    servers a killed run left): it would measure those instead, or fail half-way."""
    busy = [a for a in (ORIGIN, ADMIN, *(f"127.0.0.1:{p}" for p in PORTS.values())) if answers(a)]
    if busy:
        sys.exit(f"run.py: {', '.join(busy)} already in use: another run, or servers a killed run left "
                 f"(see `ss -ltnp`); stop them first")


def fetch_token(endpoint):
    """An access token from the sandbox (client credentials grant, HTTP Basic client
    authentication with form-encoded id and secret, RFC 6749 §2.3.1 and §4.4)."""
    import base64
    import urllib.parse
    import urllib.request
    q = urllib.parse.quote_plus
    basic = base64.b64encode(f"{q('dr/client 7')}:{q('s3cr+t/%41:y=z')}".encode()).decode()
    req = urllib.request.Request(endpoint, data=b"grant_type=client_credentials",
                                 headers={"Authorization": f"Basic {basic}",
                                          "Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["access_token"]


def answers(addr):
    """Whether something accepts TCP connections at `addr` ("ip:port")."""
    import socket
    host, port = addr.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(addr, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if answers(addr):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{addr} did not come up")


@contextlib.contextmanager
def stopped_on_interrupt(p):
    """Kills the load generator `p` if the run is interrupted while it runs, so the load stops
    before the servers do."""
    try:
        yield p
    except BaseException:
        p.kill()
        p.wait()
        raise


def cpu_seconds(pid):
    """utime+stime of a process and all its threads, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else 0


def core_busy(core):
    line = next(l for l in Path("/proc/stat").read_text().splitlines() if l.startswith(f"cpu{core} "))
    v = [int(x) for x in line.split()[1:]]
    idle = v[3] + v[4]
    return sum(v), idle


class Fleet:
    """Origin, token endpoint and the four proxies, started in a scratch directory."""

    def __init__(self, work: Path, token_lifetime=3600, routes=1, same_request=True, baseline=None):
        self.work, self.procs = work, {}
        self.token_lifetime, self.routes = token_lifetime, routes
        # nginx and HAProxy send the origin the request tokengate sends: a static token as long
        # as a real one (fetched once from the sandbox) and the same forwarding fields. With the
        # short static header alone, the origin (on the load generator's core) parsed 116 bytes
        # per request from nginx and 524 from tokengate, and that difference, not the proxy,
        # decided the latency tail at 50 % load. The token stage passes False: there the token
        # endpoint's request count must be tokengate's alone.
        self.same_request = same_request
        # Another tokengate binary to compare against (--baseline), or None.
        self.baseline = baseline

    def start(self):
        w = self.work
        (w / "logs").mkdir(exist_ok=True)
        (w / "origin.conf").write_text(f"""
user root; worker_processes 1; daemon off; pid {w}/origin.pid; error_log {w}/logs/origin.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen {ORIGIN} reuseport backlog=4096; location / {{ return 200 "ok\\n"; }} }} }}
""")
        self.procs["origin"] = pinned(CLIENT_CORE, ["nginx", "-p", str(w), "-c", str(w / "origin.conf")])
        sandbox = pinned(CLIENT_CORE, [str(RELEASE / "examples/sandbox_servers"), str(self.token_lifetime)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs["sandbox"] = sandbox
        self.endpoints = json.loads(sandbox.stdout.readline())
        wait_port(ORIGIN)
        token = (fetch_token(self.endpoints["driftrock_token_endpoint"]) if self.same_request
                 else "static-benchmark-token")
        if self.same_request:
            nginx_extra = ("proxy_set_header X-Forwarded-Host $http_host; proxy_set_header X-Forwarded-Proto $scheme; "
                           "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; "
                           "proxy_set_header X-Request-Id $request_id;")
            haproxy_extra = ("  option forwardfor\n  http-request set-header X-Forwarded-Host %[req.hdr(host)]\n"
                             "  http-request set-header X-Forwarded-Proto http\n"
                             "  http-request set-header X-Request-Id %[uuid]\n")
        else:
            nginx_extra = haproxy_extra = ""

        (w / "tokengate.toml").write_text(self.tokengate_config())
        self.procs["tokengate"] = pinned(PROXY_CORE, [str(RELEASE / "tokengate"), "run", "-c",
                                                      str(w / "tokengate.toml")],
                                         stderr=open(w / "logs/tokengate.err", "w"))
        (w / "nginx.conf").write_text(f"""
user root; worker_processes 1; daemon off; pid {w}/nginx.pid; error_log {w}/logs/nginx.err warn;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream origin {{ server {ORIGIN}; keepalive 256; }}
  server {{ listen 127.0.0.1:{PORTS['nginx']} backlog=4096;
    location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}"; {nginx_extra} }} }} }}
""")
        self.procs["nginx"] = pinned(PROXY_CORE, ["nginx", "-p", str(w), "-c", str(w / "nginx.conf")])
        (w / "haproxy.cfg").write_text(f"""
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:{PORTS['haproxy']}
  http-request set-header Authorization "Bearer {token}"
{haproxy_extra}  default_backend be
backend be
  server origin {ORIGIN}
""")
        self.procs["haproxy"] = pinned(PROXY_CORE, ["haproxy", "-db", "-f", str(w / "haproxy.cfg")],
                                       stderr=open(w / "logs/haproxy.err", "w"))
        self.procs["pingora"] = pinned(PROXY_CORE, [str(RELEASE / "examples/passthrough"),
                                                    f"127.0.0.1:{PORTS['pingora']}", ORIGIN, "1"],
                                       stderr=open(w / "logs/pingora.err", "w"))
        if self.baseline:
            (w / "baseline.toml").write_text(self.tokengate_config(PORTS["baseline"], BASELINE_ADMIN))
            self.procs["baseline"] = pinned(PROXY_CORE, [self.baseline, "run", "-c", str(w / "baseline.toml")],
                                            stderr=open(w / "logs/baseline.err", "w"))
        for name, port in PORTS.items():
            if name in self.procs:
                wait_port(f"127.0.0.1:{port}")
        wait_ready()
        if self.baseline:
            wait_ready(admin=BASELINE_ADMIN)

    def tokengate_config(self, port=None, admin=ADMIN):
        port = port or PORTS["tokengate"]
        ep = self.endpoints["driftrock_token_endpoint"]
        routes = []
        for i in range(self.routes - 1):
            routes.append(f"""
[[routes]]
name = "r{i}"
path_prefix = "/svc{i}/v{i % 7}"
upstream = "http://{ORIGIN}"
[routes.auth]
grant = "client_credentials"
token_endpoint = "{ep}"
client_id = "dr/client 7"
client_secret = "s3cr+t/%41:y=z"
""")
        return f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "{admin}"
threads = 1
grace_period = "1s"
[log]
level = "warn"
[[routes]]
name = "api"
upstream = "http://{ORIGIN}"
[routes.auth]
grant = "client_credentials"
token_endpoint = "{ep}"
client_id = "dr/client 7"
client_secret = "s3cr+t/%41:y=z"
""" + "".join(routes)

    def pid(self, name):
        p = self.procs[name]
        if name in ("nginx", "origin"):
            # the worker process does the work; the master only supervises
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            return int(kids[0]) if kids else p.pid
        return p.pid

    def stop(self):
        return stop_servers(self.procs.values(), self.procs.get("sandbox"))


def stop_servers(procs, sandbox=None):
    """Stops the servers `procs` in order, their children too (nginx workers): a second Ctrl-C
    or a SIGTERM during the stop does not cut it short. Returns the token request counts the
    `sandbox` (one of `procs`, stopped by SIGINT) prints when it stops."""
    counts = {}
    masked = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p is sandbox else signal.SIGTERM)
        for p in procs:
            try:
                if p is sandbox:
                    _, err = p.communicate(timeout=10)
                    counts = next((json.loads(l) for l in err.splitlines() if l.startswith("{")), counts)
                else:
                    p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # its session: whatever is left of it
            p.wait()
    finally:
        for sig, handler in masked.items():
            signal.signal(sig, handler)
    return counts


def wait_ready(timeout=20, admin=ADMIN):
    import urllib.request
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://{admin}/readyz", timeout=1).status == 200:
                return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("tokengate not ready")


def metric(name_prefix, admin=ADMIN, only=""):
    """The sum of the samples whose line starts with `name_prefix` (and contains `only`)."""
    import urllib.request
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=2).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name_prefix) and only in l)


def wrk(url, connections, duration, fleet=None, proxy=None):
    busy0 = core_busy(CLIENT_CORE)
    cpu0 = cpu_seconds(fleet.pid(proxy)) if proxy else None
    rss_peak = 0
    p = pinned(CLIENT_CORE, ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", url],
               stdout=subprocess.PIPE, text=True)
    with stopped_on_interrupt(p):
        while p.poll() is None:
            if proxy:
                rss_peak = max(rss_peak, rss_kib(fleet.pid(proxy)))
            time.sleep(0.25)
    out = p.stdout.read()
    busy1 = core_busy(CLIENT_CORE)
    cpu = cpu_seconds(fleet.pid(proxy)) - cpu0 if proxy else None
    w = parse_wrk(out)
    rps, total, non2xx, errors = w["rps"], w["requests"], w["non2xx"], w["socket_errors"]
    client_busy = 1 - (busy1[1] - busy0[1]) / max(1, busy1[0] - busy0[0])
    return {"rps": rps, "requests": total, "non2xx": non2xx, "socket_errors": errors,
            "cpu_us_per_req": (cpu * 1e6 / total) if cpu is not None and total else None,
            "client_core_busy": client_busy, "client_bound": client_busy >= 0.95, "rss_peak_kib": rss_peak}


def routes_runs(fleet, args):
    """tokengate on ROUTE_PATH, --rounds runs of --duration: medians of req/s and CPU µs per
    request. One run is not enough: runs of the same build differ by up to 30 % on a shared VM."""
    rs = [wrk(f"http://127.0.0.1:{PORTS['tokengate']}{ROUTE_PATH}", 64, args.duration, fleet, "tokengate")
          for _ in range(args.rounds)]
    return {"rps_median": statistics.median(r["rps"] for r in rs),
            "cpu_us_per_req_median": statistics.median(r["cpu_us_per_req"] for r in rs),
            "rps_runs": [r["rps"] for r in rs], "non2xx": sum(r["non2xx"] + r["socket_errors"] for r in rs)}


def oha(url, rate, duration, breakdown=False):
    db = Path(tempfile.mkdtemp()) / "requests.db" if breakdown else None
    p = pinned(CLIENT_CORE, ["oha", "--no-tui", "--output-format", "json", "--latency-correction", "-q", str(int(rate)),
                             "-z", f"{duration}s", "-c", "64", *(["--db-url", str(db)] if db else []), url],
               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        with stopped_on_interrupt(p):
            out, _ = p.communicate()
    except BaseException:
        if db:
            shutil.rmtree(db.parent, ignore_errors=True)
        raise
    j = json.loads(out)
    pct = j.get("latencyPercentiles") or j.get("latency_percentiles") or {}
    # seconds → ms; oha names the keys p50, p99, p99.9 (older versions: p99_9)
    res = {k: pct.get(k, pct.get(k.replace(".", "_"), float("nan"))) * 1e3 for k in ("p50", "p99", "p99.9")}
    # Responses other than 2xx, and requests that failed (not the ones in flight when -z ended)
    codes = j.get("statusCodeDistribution") or {}
    errors = j.get("errorDistribution") or {}
    res["failed"] = (sum(v for k, v in codes.items() if not str(k).startswith("2"))
                     + sum(v for k, v in errors.items() if "deadline" not in k))
    if db:
        res["breakdown"] = latency_breakdown(db)
        shutil.rmtree(db.parent, ignore_errors=True)
    return res


def latency_breakdown(db):
    """Splits each request's corrected latency (end - scheduled start) into the wait before oha
    could send it (scheduled start -> sent: no free connection among the 64, or the load
    generator's core busy) and the time on the wire (sent -> response: proxy, origin, and oha
    reading the response). ms; `queued_over_10ms` is the share of requests that waited > 10 ms
    to be sent, the mark of an episode where the offered rate outran 64 connections."""
    import sqlite3
    con = sqlite3.connect(db)
    rows = con.execute("select start_latency_correction, start, end from oha").fetchall()
    con.close()
    if not rows:
        return {}
    wait = sorted(st - s for s, st, _ in rows)
    wire = sorted(e - st for _, st, e in rows)
    at = lambda a, q: a[min(len(a) - 1, int(q * len(a)))] * 1e3
    return {"send_wait_p50": at(wait, .5), "send_wait_p99": at(wait, .99),
            "on_wire_p50": at(wire, .5), "on_wire_p90": at(wire, .9), "on_wire_p99": at(wire, .99),
            "queued_over_10ms": sum(w > 0.010 for w in wait) / len(wait)}


def svg_chart(series, path):
    """requests/s against connections, one line per proxy (plain SVG, no dependencies)."""
    W, H, L, B = 640, 400, 70, 50
    conns = sorted({c for s in series.values() for c in s})
    top = max(v for s in series.values() for v in s.values()) * 1.1
    colors = {"tokengate": "#d62728", "nginx": "#2ca02c", "haproxy": "#1f77b4", "pingora": "#9467bd"}
    x = lambda c: L + (W - L - 20) * conns.index(c) / max(1, len(conns) - 1)
    y = lambda v: H - B - (H - B - 20) * v / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{L}" y1="{H-B}" x2="{W-20}" y2="{H-B}" stroke="black"/>',
             f'<line x1="{L}" y1="20" x2="{L}" y2="{H-B}" stroke="black"/>',
             f'<text x="{W/2}" y="{H-12}" text-anchor="middle">connections</text>',
             f'<text x="14" y="{H/2}" transform="rotate(-90 14 {H/2})" text-anchor="middle">requests/s</text>']
    for c in conns:
        parts.append(f'<text x="{x(c)}" y="{H-B+16}" text-anchor="middle">{c}</text>')
    for i in range(5):
        v = top * i / 4
        parts.append(f'<text x="{L-6}" y="{y(v)+4}" text-anchor="end">{v/1000:.0f}k</text>')
    for n, (name, s) in enumerate(series.items()):
        pts = " ".join(f"{x(c)},{y(s[c])}" for c in conns if c in s)
        col = colors.get(name, "gray")
        parts.append(f'<polyline fill="none" stroke="{col}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{W-150}" y="{30+16*n}" fill="{col}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


# The fleet stage: three gateways, 5-second tokens (renewed every 3.6–4 s at the default
# refresh_ratio), 63 connections in all (21 per gateway).
FLEET_SIZE, FLEET_TOKEN_LIFETIME, FLEET_CONNECTIONS = 3, 5, 63


def free_ports(n):
    """`n` distinct loopback ports nothing listens on (all bound at once, so none repeats)."""
    import socket
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_wrk(out):
    """wrk's summary: requests/s, requests, non-2xx responses, socket errors."""
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "non2xx": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
            "socket_errors": sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))}


class Replicas:
    """One run of the fleet stage: a sandbox token endpoint issuing 5-second tokens and three
    tokengate gateways with the same route in front of the origin, each pinned to the proxy core
    with one worker thread; with `[cluster]` naming `redis` (a URL) when given, else alone."""

    def __init__(self, work: Path, redis=None, key_prefix="tokengate"):
        self.work, self.redis, self.key_prefix = work, redis, key_prefix
        self.sandbox, self.gateways = None, []

    def start(self):
        w = self.work
        (w / "logs").mkdir(exist_ok=True)
        self.sandbox = pinned(CLIENT_CORE, [str(RELEASE / "examples/sandbox_servers"), str(FLEET_TOKEN_LIFETIME)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ep = json.loads(self.sandbox.stdout.readline())["driftrock_token_endpoint"]
        cluster = ""
        if self.redis:
            key = w / "cluster.key"
            if not key.exists():
                import base64
                key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
            cluster = (f'[cluster]\nredis = "{self.redis}"\nkey_prefix = "{self.key_prefix}"\n'
                       f'encryption_key_file = "{key}"\n')
        ports = free_ports(2 * FLEET_SIZE)
        for i in range(FLEET_SIZE):
            port, admin = ports[2 * i], f"127.0.0.1:{ports[2 * i + 1]}"
            conf = w / f"gateway{i}.toml"
            conf.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "{admin}"
threads = 1
grace_period = "1s"
shutdown_delay = "0s"
[log]
level = "warn"
{cluster}
[[routes]]
name = "api"
upstream = "http://{ORIGIN}"
[routes.auth]
grant = "client_credentials"
token_endpoint = "{ep}"
client_id = "dr/client 7"
client_secret = "s3cr+t/%41:y=z"
""")
            p = pinned(PROXY_CORE, [str(RELEASE / "tokengate"), "run", "-c", str(conf)],
                       stderr=open(w / f"logs/gateway{i}.err", "w"))
            self.gateways.append({"proc": p, "port": port, "admin": admin})
        for i, g in enumerate(self.gateways):
            try:
                wait_port(f"127.0.0.1:{g['port']}")
                wait_ready(admin=g["admin"])
            except RuntimeError as e:
                log = (w / f"logs/gateway{i}.err").read_text()[-2000:]
                raise RuntimeError(f"gateway {i}: {e}; its log ends:\n{log}") from None

    def token_status(self):
        """Per gateway: the route's token generation (tokens it has held: obtained or adopted,
        `/status`), where the current one came from, and its own token requests (metrics)."""
        import urllib.request
        out = []
        for g in self.gateways:
            st = json.load(urllib.request.urlopen(f"http://{g['admin']}/status", timeout=2))
            route = st["routes"][0]
            out.append({"generation": route["token"]["generation"],
                        "token_from": route.get("fleet", {}).get("token_from"),
                        "token_requests": metric("tokengate_token_requests_total", g["admin"]),
                        "cluster_errors": metric("tokengate_cluster_operations_total{", g["admin"],
                                                 only='outcome="error"')})
        return out

    def stop(self):
        """Stops the sandbox first (its token request count is final then), then the gateways.
        Returns the sandbox's counts."""
        return stop_servers(([self.sandbox] if self.sandbox else []) + [g["proc"] for g in self.gateways],
                            self.sandbox)


def wrk_fleet(reps, duration):
    """One wrk per gateway at once (FLEET_CONNECTIONS split between them, all on the load
    generator's core): the requests of all three, and the CPU time all three gateways spent on
    the proxy core, per request."""
    pids = [g["proc"].pid for g in reps.gateways]
    busy0 = core_busy(CLIENT_CORE)
    cpu0 = [cpu_seconds(p) for p in pids]
    per = FLEET_CONNECTIONS // len(pids)
    ps = [pinned(CLIENT_CORE, ["wrk", "-t1", f"-c{per}", f"-d{duration}s", f"http://127.0.0.1:{g['port']}/"],
                 stdout=subprocess.PIPE, text=True) for g in reps.gateways]
    try:
        outs = [p.communicate()[0] for p in ps]
    except BaseException:
        for p in ps:
            p.kill()
            p.wait()
        raise
    busy1 = core_busy(CLIENT_CORE)
    cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
    each = [parse_wrk(o) for o in outs]
    total = sum(e["requests"] for e in each)
    client_busy = 1 - (busy1[1] - busy0[1]) / max(1, busy1[0] - busy0[0])
    return {"rps": sum(e["rps"] for e in each), "requests": total,
            "non2xx": sum(e["non2xx"] + e["socket_errors"] for e in each),
            "cpu_us_per_req": sum(cpu) * 1e6 / total if total else None,
            "gateway_rps": [e["rps"] for e in each], "gateway_cpu_s": cpu,
            "client_core_busy": client_busy, "client_bound": client_busy >= 0.95}


def fleet_stage(args):
    """--rounds rounds, alternating which goes first: three gateways with `[cluster]` sharing one
    Redis, and the same three alone. Each run starts its own sandbox (5-second tokens) and
    gateways, warms up 2 s, then measures --duration s; token requests the sandbox saw over the
    run's whole life are divided by the renewal periods it spanned (the highest token
    generation among the three gateways: every token a gateway held, obtained or adopted)."""
    runs = {"cluster": [], "alone": []}
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        (w / "logs").mkdir()
        (w / "origin.conf").write_text(f"""
user root; worker_processes 1; daemon off; pid {w}/origin.pid; error_log {w}/logs/origin.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen {ORIGIN} reuseport backlog=4096; location / {{ return 200 "ok\\n"; }} }} }}
""")
        redis_port = free_ports(1)[0]
        servers = [pinned(CLIENT_CORE, ["nginx", "-p", str(w), "-c", str(w / "origin.conf")]),
                   pinned(CLIENT_CORE, ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                        "--save", "", "--appendonly", "no", "--logfile", str(w / "logs/redis.log")],
                          stdout=subprocess.DEVNULL)]
        try:
            wait_port(ORIGIN)
            wait_port(f"127.0.0.1:{redis_port}")
            for r in range(args.rounds):
                for mode in (("cluster", "alone") if r % 2 == 0 else ("alone", "cluster")):
                    run_dir = w / f"{mode}{r}"
                    run_dir.mkdir()
                    reps = Replicas(run_dir, redis=f"redis://127.0.0.1:{redis_port}/0" if mode == "cluster" else None,
                                    key_prefix=f"bench{r}")  # each run's fleet starts with an empty store
                    counts = {}
                    try:
                        started = time.monotonic()
                        reps.start()
                        wrk_fleet(reps, 2)  # warm-up: connection pools
                        m = wrk_fleet(reps, args.duration)
                        m["tokens"] = reps.token_status()
                        m["lifetime_s"] = time.monotonic() - started
                    finally:
                        counts = reps.stop()
                    m["token_endpoint_requests"] = counts.get("driftrock_token_requests")
                    m["renewal_periods"] = max(t["generation"] for t in m["tokens"])
                    runs[mode].append(m)
        finally:
            stop_servers(servers)
    res = {"gateways": FLEET_SIZE, "token_lifetime_s": FLEET_TOKEN_LIFETIME, "connections": FLEET_CONNECTIONS}
    for mode, rs in runs.items():
        cpu = statistics.median(r["cpu_us_per_req"] for r in rs)
        seen = sum(r["token_endpoint_requests"] or 0 for r in rs)
        periods = sum(r["renewal_periods"] for r in rs)
        res[mode] = {"rps_median": statistics.median(r["rps"] for r in rs), "cpu_us_per_req_median": cpu,
                     "core_capacity_rps": 1e6 / cpu, "non2xx": sum(r["non2xx"] for r in rs),
                     "client_bound_runs": sum(r["client_bound"] for r in rs),
                     "token_endpoint_requests": seen, "renewal_periods": periods,
                     "token_requests_per_renewal": seen / periods if periods else None,
                     "cluster_errors": sum(t["cluster_errors"] for r in rs for t in r["tokens"]), "runs": rs}
    res["core_ratio"] = res["cluster"]["core_capacity_rps"] / res["alone"]["core_capacity_rps"]
    # Paired by round: the runs of one round are back to back, so a slow stretch of the host
    # that spans a round weighs on both.
    res["core_ratio_per_round"] = [a["cpu_us_per_req"] / c["cpu_us_per_req"]
                                   for c, a in zip(runs["cluster"], runs["alone"])]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the peak, latency and fleet stages (default 3)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk or oha run (default 10; the scaling stage uses half, at least 5; "
                         "the token stage always runs 60 s)")
    ap.add_argument("--stages", default="peak,latency,scaling,token,fleet",
                    help="comma-separated subset of peak, latency, scaling, token, fleet (default: all)")
    ap.add_argument("--skip-build", action="store_true", help="use the existing release build")
    ap.add_argument("--latency-breakdown", action="store_true",
                    help="latency stage: keep oha's per-request records and report, per run, the wait before "
                         "sending and the time on the wire (medians of the rounds)")
    ap.add_argument("--out", default=str(ROOT / "target/load"), help="results directory (default: target/load)")
    ap.add_argument("--baseline", metavar="BIN",
                    help="peak stage: also run this tokengate binary (an earlier build) in the rotation, "
                         "and report this build's proxy-core CPU per request against it")
    args = ap.parse_args()
    known = ("peak", "latency", "scaling", "token", "fleet")
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if not stages or not stages <= set(known):
        ap.error(f"--stages: {args.stages!r}: name one or more of {', '.join(known)}, comma-separated")
    if args.rounds < 1:
        ap.error(f"--rounds: {args.rounds}: at least 1")
    if args.duration < 1:
        ap.error(f"--duration: {args.duration}: at least 1 second")
    if args.baseline:
        if not os.access(args.baseline, os.X_OK):
            ap.error(f"--baseline: {args.baseline}: not an executable file")
        args.baseline = str(Path(args.baseline).resolve())
        PORTS["baseline"] = BASELINE_PORT
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        ap.error(f"--out: {args.out}: not a directory")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ports_free()  # before the install and the build: fail fast
    out.mkdir(parents=True, exist_ok=True)
    ensure_tools(need_oha="latency" in stages, need_redis="fleet" in stages)
    if not args.skip_build:
        build()
    results = {"machine": {"cpus": os.cpu_count(), "proxy_core": PROXY_CORE, "client_core": CLIENT_CORE}}
    names = list(PORTS)

    # The token and fleet stages start servers of their own.
    if stages & {"peak", "latency", "scaling"}:
        with tempfile.TemporaryDirectory() as tmp:
            fleet = Fleet(Path(tmp), baseline=args.baseline)
            try:
                fleet.start()
                for n in names:  # warm-up: connection pools, token, page cache
                    wrk(f"http://127.0.0.1:{PORTS[n]}/", 64, 2)
                if "peak" in stages:
                    runs = {n: [] for n in names}
                    for r in range(args.rounds):
                        order = names[r % len(names):] + names[:r % len(names)]
                        for n in order:
                            runs[n].append(wrk(f"http://127.0.0.1:{PORTS[n]}/", 64, args.duration, fleet, n))
                    peak = {}
                    for n, rs in runs.items():
                        peak[n] = {"rps_median": statistics.median(r["rps"] for r in rs),
                                   "cpu_us_per_req_median": statistics.median(r["cpu_us_per_req"] for r in rs),
                                   "non2xx": sum(r["non2xx"] + r["socket_errors"] for r in rs),
                                   "client_bound_runs": sum(r["client_bound"] for r in rs), "runs": rs}
                    for n in names:
                        peak[n]["tokengate_ratio"] = peak["tokengate"]["rps_median"] / peak[n]["rps_median"]
                        # Requests one second of the pinned proxy core serves: the per-core rate,
                        # which stays a measure of the proxy when the load generator is the limit.
                        peak[n]["core_capacity_rps"] = 1e6 / peak[n]["cpu_us_per_req_median"]
                    for n in names:
                        peak[n]["tokengate_core_ratio"] = (peak["tokengate"]["core_capacity_rps"]
                                                           / peak[n]["core_capacity_rps"])
                    results["peak"] = peak
                    (out / "results.json").write_text(json.dumps(results, indent=2))
                if "latency" in stages:
                    top = results.get("peak", {}).get("tokengate", {}).get("rps_median") or \
                        wrk(f"http://127.0.0.1:{PORTS['tokengate']}/", 64, args.duration)["rps"]
                    lat = {}
                    for frac in (0.25, 0.5):
                        rate = top * frac
                        # The tail of one 10 s run on a VM swings by tens of ms either way: --rounds
                        # rounds of (direct, tokengate, nginx), each proxy's added latency taken against
                        # the direct run of its round, medians reported.
                        added = {"tokengate": [], "nginx": []}
                        directs, breakdown, failed = [], {}, {"direct": 0, "tokengate": 0, "nginx": 0}
                        for r in range(args.rounds):
                            direct = oha(f"http://{ORIGIN}/", rate, args.duration, args.latency_breakdown)
                            failed["direct"] += direct.pop("failed")
                            directs.append(direct)
                            if "breakdown" in direct:
                                breakdown.setdefault("direct", []).append(direct.pop("breakdown"))
                            order = ("tokengate", "nginx") if r % 2 == 0 else ("nginx", "tokengate")
                            for n in order:
                                m = oha(f"http://127.0.0.1:{PORTS[n]}/", rate, args.duration, args.latency_breakdown)
                                if "breakdown" in m:
                                    breakdown.setdefault(n, []).append(m.pop("breakdown"))
                                failed[n] += m.pop("failed")
                                added[n].append({k: m[k] - direct[k] for k in m})
                        row = {"rate": rate, "direct_ms": directs, "rounds": added, "non2xx_or_failed": failed}
                        if breakdown:
                            row["breakdown_ms"] = breakdown
                        for n, runs in added.items():
                            row[n] = {k: statistics.median(a[k] for a in runs) for k in runs[0]}
                        # Paired: tokengate's p99 minus nginx's in the same round, back to back, so a
                        # slow stretch of the host that spans a round does not count against one proxy.
                        row["p99_tokengate_minus_nginx"] = [t["p99"] - g["p99"] for t, g in
                                                            zip(added["tokengate"], added["nginx"])]
                        lat[f"{int(frac * 100)}%"] = row
                    results["latency_added_ms"] = lat
                    (out / "results.json").write_text(json.dumps(results, indent=2))
                if "scaling" in stages:
                    names = [n for n in names if n != "baseline"]  # peak stage only
                    scale = {n: {} for n in names}
                    cells = {n: {} for n in names}
                    rss = {n: {"idle_kib": rss_kib(fleet.pid(n))} for n in names}
                    for c in (1, 64, 256, 1024):
                        for n in names:
                            r = wrk(f"http://127.0.0.1:{PORTS[n]}/", c, max(5, args.duration // 2), fleet, n)
                            scale[n][c] = r["rps"]
                            cells[n][c] = {"client_bound": r["client_bound"], "non2xx": r["non2xx"] + r["socket_errors"]}
                            if c == 1024:
                                rss[n]["at_1024_kib"] = r["rss_peak_kib"]
                    results["scaling_rps"] = scale
                    results["scaling_runs"] = cells
                    # The route-table comparison, measured the same way on both tables: this path
                    # matches the catch-all route here and the deepest of the 1,000 routes below.
                    results["routes_1"] = routes_runs(fleet, args)
                    results["routes_1_rps"] = results["routes_1"]["rps_median"]
                    results["rss"] = rss
                    svg_chart(scale, out / "scaling.svg")
                    (out / "results.json").write_text(json.dumps(results, indent=2))
            finally:
                fleet.stop()

    if "scaling" in stages:
        with tempfile.TemporaryDirectory() as tmp:
            big = Fleet(Path(tmp), routes=1000)
            try:
                big.start()
                wrk(f"http://127.0.0.1:{PORTS['tokengate']}{ROUTE_PATH}", 64, 2)
                results["routes_1000"] = routes_runs(big, args)
                results["routes_1000_rps"] = results["routes_1000"]["rps_median"]
            finally:
                big.stop()

    if "token" in stages:
        with tempfile.TemporaryDirectory() as tmp:
            tf = Fleet(Path(tmp), token_lifetime=5, same_request=False)
            try:
                tf.start()
                before = metric('tokengate_token_requests_total{outcome="success"')
                r = wrk(f"http://127.0.0.1:{PORTS['tokengate']}/", 64, 60, tf, "tokengate")
                after = metric('tokengate_token_requests_total{outcome="success"')
                failed = metric("tokengate_token_requests_total") - after
            finally:
                counts = tf.stop()
            seen = counts.get("driftrock_token_requests")
            results["token_path"] = {"duration_s": 60, "token_lifetime_s": 5,
                                     "renewals_during_run": after - before,
                                     "token_endpoint_requests_total": seen,
                                     "gateway_token_requests_total": after + failed,
                                     "failed_token_requests": failed,
                                     "non2xx": r["non2xx"] + r["socket_errors"], "rps": r["rps"]}

    if "fleet" in stages:
        results["fleet"] = fleet_stage(args)

    (out / "results.json").write_text(json.dumps(results, indent=2))
    report(results, out)


def medians(n, what):
    return f"medians of {n} {what}s" if n != 1 else f"one {what}"


def report(res, out):
    print("\n## Load benchmark results\n")
    print(f"Machine: {res['machine']['cpus']} cores; proxies pinned to core {PROXY_CORE}, load generator, origin "
          f"and token endpoint on core {CLIENT_CORE}.\n")
    if "peak" in res:
        print("| proxy | median req/s | tokengate ÷ this (req/s) | CPU µs/req (proxy core) | req/s per proxy-core second "
              "| tokengate ÷ this (per core) | non-2xx | client-bound runs |")
        print("|---|---|---|---|---|---|---|---|")
        for n, p in res["peak"].items():
            print(f"| {n} | {p['rps_median']:.0f} | {p['tokengate_ratio']:.3f} | {p['cpu_us_per_req_median']:.1f} | "
                  f"{p['core_capacity_rps']:.0f} | {p['tokengate_core_ratio']:.3f} | "
                  f"{p['non2xx']} | {p['client_bound_runs']}/{len(p['runs'])} |")
        tg, ng = res["peak"].get("tokengate"), res["peak"].get("nginx")
        if tg and ng:
            bound = tg["client_bound_runs"] + ng["client_bound_runs"]
            rps, core = ng["tokengate_ratio"], ng["tokengate_core_ratio"]
            if rps >= 1.0:
                verdict = "met"
            elif tg["client_bound_runs"] and core >= 1.0:
                verdict = ("not decided: tokengate's runs were client-bound, so their req/s is the load generator's "
                           "limit; per proxy-core second it is ahead")
            else:
                verdict = "not met"
            print(f"\nGoal, tokengate >= 1.0x nginx requests/s on the pinned core: {rps:.3f}x in req/s, "
                  f"{core:.3f}x per proxy-core second ({medians(len(tg['runs']), 'round')}): {verdict}"
                  + (f"\n({bound} of the {len(tg['runs']) + len(ng['runs'])} runs client-bound: req/s there is the "
                     "load generator's limit, the per-core figure is the proxy's)" if bound else ""))
    bl, tg = res.get("peak", {}).get("baseline"), res.get("peak", {}).get("tokengate")
    if bl and tg:
        change = tg["cpu_us_per_req_median"] / bl["cpu_us_per_req_median"] - 1
        print(f"\nAgainst the baseline build ({medians(len(tg['runs']), 'round')}): proxy-core CPU "
              f"{tg['cpu_us_per_req_median']:.2f} µs/req vs {bl['cpu_us_per_req_median']:.2f} ({change * 100:+.1f} %); "
              f"per round: " + ", ".join(f"{a['cpu_us_per_req']:.2f}/{b['cpu_us_per_req']:.2f}"
                                         for a, b in zip(tg["runs"], bl["runs"])))
    if "latency_added_ms" in res:
        print("\n| load | proxy | added p50 ms | added p99 ms | added p99.9 ms | added p99 per round ms | direct p99 per round ms |"
              "\n|---|---|---|---|---|---|---|")
        for load, row in res["latency_added_ms"].items():
            # Every round, not only the median: on a shared VM the tail moves by tens of ms
            # between rounds, and the direct run's own p99 says how much.
            direct = ", ".join(f"{d['p99']:.1f}" for d in row.get("direct_ms", []))
            for n in ("tokengate", "nginx"):
                m = row[n]
                each = ", ".join(f"{r['p99']:+.1f}" for r in row.get("rounds", {}).get(n, []))
                print(f"| {load} ({row['rate']:.0f}/s) | {n} | {m['p50']:.3f} | {m['p99']:.3f} | {m['p99.9']:.3f} "
                      f"| {each} | {direct} |")
            failed = row.get("non2xx_or_failed")
            if failed:
                print(f"| {load} | non-2xx or failed requests (all rounds) | direct {failed['direct']}, "
                      f"tokengate {failed['tokengate']}, nginx {failed['nginx']} | | | | |")
        half = res["latency_added_ms"].get("50%")
        if half:
            tg, ng = half["tokengate"]["p99"], half["nginx"]["p99"]
            rounds = len(half.get("rounds", {}).get("tokengate", [])) or 1
            print(f"\nGoal, added p99 at 50 % load no worse than nginx's: tokengate {tg:+.3f} ms, nginx {ng:+.3f} ms "
                  f"({medians(rounds, 'round')}): {'met' if tg <= ng else 'not met'}")
            paired = half.get("p99_tokengate_minus_nginx")
            if paired:
                better = sum(d <= 0 for d in paired)
                print(f"Paired by round, tokengate p99 minus nginx p99: median {statistics.median(paired):+.3f} ms; "
                      f"tokengate at or below nginx in {better} of {len(paired)} rounds "
                      f"({', '.join(f'{d:+.1f}' for d in paired)})")
        for load, row in res["latency_added_ms"].items():
            if "breakdown_ms" not in row:
                continue
            print(f"\nWhere the latency went at {load} (medians of the rounds, ms):\n\n| run | wait to send p50 / p99 "
                  "| on the wire p50 / p90 / p99 | requests that waited > 10 ms |\n|---|---|---|---|")
            for n, runs in row["breakdown_ms"].items():
                med = lambda k: statistics.median(b[k] for b in runs if b)
                print(f"| {n} | {med('send_wait_p50'):.2f} / {med('send_wait_p99'):.2f} | {med('on_wire_p50'):.2f} / "
                      f"{med('on_wire_p90'):.2f} / {med('on_wire_p99'):.2f} | {med('queued_over_10ms'):.1%} |")
    if "scaling_rps" in res:
        print("\n| proxy | 1 conn | 64 | 256 | 1024 | non-2xx | RSS idle MiB | RSS @1024 MiB |"
              "\n|---|---|---|---|---|---|---|---|")
        runs = res.get("scaling_runs", {})
        for n, s in res["scaling_rps"].items():
            r = res["rss"][n]
            cell = lambda c: f"{s[c]:.0f}" + ("*" if runs.get(n, {}).get(c, {}).get("client_bound") else "")
            bad = sum(x["non2xx"] for x in runs.get(n, {}).values())
            print(f"| {n} | {cell(1)} | {cell(64)} | {cell(256)} | {cell(1024)} | {bad} | {r['idle_kib']/1024:.1f} | "
                  f"{r.get('at_1024_kib', 0)/1024:.1f} |")
        print("\n\\* client-bound: the load generator's core was >= 95 % busy, so that figure is its limit")
        one, big = res.get("routes_1"), res.get("routes_1000")
        if one and big:
            runs = lambda x: ", ".join(f"{v:.0f}" for v in x["rps_runs"])
            print(f"\ntokengate on {ROUTE_PATH}, {medians(len(one['rps_runs']), 'run')}: 1 route (the catch-all "
                  f"matches) {one['rps_median']:.0f} req/s at {one['cpu_us_per_req_median']:.1f} µs CPU/req "
                  f"({runs(one)}); 1,000 routes (the deepest matches) {big['rps_median']:.0f} req/s at "
                  f"{big['cpu_us_per_req_median']:.1f} µs CPU/req ({runs(big)}); non-2xx {one['non2xx'] + big['non2xx']}")
        print(f"Chart: {out / 'scaling.svg'}")
    if "token_path" in res:
        t = res["token_path"]
        print(f"\nToken path, 60 s with 5 s tokens: {t['renewals_during_run']:.0f} renewals during the run, "
              f"token endpoint saw {t['token_endpoint_requests_total']} requests in all "
              f"(gateway made {t['gateway_token_requests_total']:.0f}, {t['failed_token_requests']:.0f} failed); "
              f"non-2xx responses: {t['non2xx']}")
    if "fleet" in res:
        f = res["fleet"]
        n = len(f["cluster"]["runs"])
        print(f"\nFleet: {f['gateways']} gateways on core {PROXY_CORE} (one worker thread each), {f['connections']} "
              f"connections split between them, {f['token_lifetime_s']} s tokens, {medians(n, 'round')}:\n\n"
              "| mode | req/s (all three) | CPU µs/req (proxy core) | req/s per proxy-core second | non-2xx "
              "| client-bound runs | token endpoint requests / renewal periods | per renewal |\n"
              "|---|---|---|---|---|---|---|---|")
        for mode in ("cluster", "alone"):
            m = f[mode]
            per = m["token_requests_per_renewal"]
            per = f"{per:.2f}" if per is not None else "–"
            print(f"| {'[cluster]' if mode == 'cluster' else 'without'} | {m['rps_median']:.0f} | "
                  f"{m['cpu_us_per_req_median']:.2f} | {m['core_capacity_rps']:.0f} | {m['non2xx']} | "
                  f"{m['client_bound_runs']}/{len(m['runs'])} | {m['token_endpoint_requests']} / {m['renewal_periods']} | "
                  f"{per} |")
        ratio = f["core_ratio"]
        print(f"\nGoal, requests/s per proxy core with [cluster] within 3 % of without: {ratio:.3f}× "
              f"({(ratio - 1) * 100:+.1f} %): {'met' if ratio >= 0.97 else 'not met'}; paired by round "
              + ", ".join(f"{x:.3f}" for x in f["core_ratio_per_round"])
              + f" (median {statistics.median(f['core_ratio_per_round']):.3f})"
              + f". Redis errors seen by the gateways: {f['cluster']['cluster_errors']:.0f}")
    print(f"\nRaw data: {out / 'results.json'}")


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    # SIGTERM (kill, timeout, a cancelled job) and SIGHUP stop the run as Ctrl-C does: the
    # servers are stopped and the scratch directory removed.
    # SIGINT too, explicitly: a shell without job control starts background jobs with it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        main()
    except KeyboardInterrupt:
        print("run.py: interrupted; the servers it started are stopped", file=sys.stderr)
        sys.exit(130)
