#!/usr/bin/env python3
"""tokengate abuse benchmark: what a gateway holds and how it answers when clients misbehave.

Runs a tokengate binary (--bin) and, with --nginx, nginx configured to the same bounds, against
abusive and slow clients on loopback. The gateway runs alone on core 0 with one worker thread;
this script, the origins and the sandbox token endpoint on core 1. Each stage starts the gateway
afresh with the stage's bounds. Bounds are tokengate `[server]` keys; the ones the binary knows
(found by `BIN check` on a config with each key) are set, the others left to the binary's
built-in behaviour, and the run prints which were used.

Stages (--stages, comma-separated; all bounded in time):
  idle         10,000 client connections that sent nothing, then 10,000 that each made one
               keep-alive request and went idle: resident memory (VmRSS) before and after,
               KiB per connection. Waits until the gateway reports them all
               (`tokengate_connections`, nginx stub_status) or --accept-wait s.
  slowhead     600 connections from 127.0.0.1 sending `GET /a …` and a field value of up to
               1,040,000 bytes in 64 KiB non-blocking pieces until the socket would block,
               then one byte per 25 s; peak RSS sampled each second for --slowhead-seconds s,
               and how each connection ended (the gateway's answer, closed, reset, open).
               The same with 400 connections from 127.0.0.2, outside allowed_clients.
  limits       single probes, with timing: a 30 KiB head (must be 2xx), a 33 KiB head (431),
               a head trickled 1 byte/s (408 after request_head_timeout), a body that stops
               after 10 of 1,000 bytes (408 after body_timeout), an idle keep-alive connection
               (closed after idle_timeout). Bounds 3 s here; each probe waits --limits-wait s.
  slowclients  at once: an upload of --slow-mb MB at 1 MB/s, a download of --slow-mb MB read at
               1 MB/s (both must answer 200 with every byte), and a download that reads 1 MB and
               stops: when the gateway closed that connection (send_timeout 5 s here; watched
               for --stall-seconds s) and whether its upstream connection was closed too (the
               origin records how each of its connections ended).

Origins: nginx `return 200 "ok"` for /, and this script's own origin for /big/ (uploads read
whole, downloads of any size, each connection's end recorded). Token endpoint: the sandbox
(`examples/sandbox_servers`, --sandbox). Reads the gateway's memory, open-file limit and
sockets from /proc; raises its own open-file limit to the hard limit, and the servers' too.

Output: Markdown on stdout, JSON to --out.
"""

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in the repository
sys.path.insert(0, str(Path(__file__).resolve().parent))
import clients  # noqa: E402
import servers  # noqa: E402
from servers import ALLOWED, OUTSIDE  # noqa: E402

MB = 1_000_000
STAGES = ("idle", "slowhead", "limits", "slowclients")
# Per stage, the bounds set (tokengate key → value) on top of servers.NEW_KEYS' defaults.
STAGE_BOUNDS = {
    "idle": {},
    "slowhead": {},
    "limits": {"request_head_timeout": "3s", "idle_timeout": "3s", "body_timeout": "3s"},
    "slowclients": {"send_timeout": "5s"},
}
GET = b"GET /a HTTP/1.1\r\nHost: gw\r\n\r\n"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def settle(gw, expect, wait):
    """Waits until the gateway reports `expect` client connections (up to `wait` s); returns
    the count it reported last (None when it reports none)."""
    deadline, n, seen = time.time() + wait, None, []
    while time.time() < deadline:
        n = gw.connections()
        seen.append(n)
        # all there, or no change for 3 s (connections the gateway refused or closed)
        if n is None or n >= expect or (len(seen) > 6 and len(set(seen[-7:])) == 1):
            break
        time.sleep(0.5)
    if n is None:
        time.sleep(min(wait, 3))
    return n


def stage_idle(gw, args):
    out = {}
    for kind in ("silent", "after_one_request"):
        used = gw.start(STAGE_BOUNDS["idle"])
        try:
            pid = gw.pid()
            time.sleep(1)
            before = servers.rss_kib(pid)
            n, t0, socks, failed, statuses = args.connections, time.time(), [], 0, {}
            # After one request a tokengate connection holds its upstream connection for 2 s:
            # at most 2,000 requests a second keep client and upstream connections together
            # under the open-file limit (20,000 here).
            step = n if kind == "silent" else 500
            while len(socks) + failed < n and time.time() < t0 + args.accept_wait:
                t_batch = time.time()
                ok, bad = clients.open_many(gw.port, min(step, n - len(socks) - failed), ALLOWED,
                                            timeout=args.accept_wait)
                socks += ok
                failed += bad
                if kind == "after_one_request":
                    for k, v in clients.request_each(ok, GET).items():
                        statuses[k] = statuses.get(k, 0) + v
                    time.sleep(max(0.0, t_batch + 0.25 - time.time()))
            reported = settle(gw, len(socks), args.accept_wait)
            # held upstream connections go back to the pool after 2 s idle: measure after that
            time.sleep(3)
            after = servers.rss_kib(pid)
            out[kind] = {"bounds": used, "nofile_limit": servers.nofile_limit(pid), "connected": len(socks),
                         "failed": failed, "gateway_reported": reported, "statuses": statuses,
                         "rss_before_kib": before, "rss_after_kib": after,
                         "kib_per_connection": round((after - before) / max(1, len(socks)), 2)}
            log(f"{gw.name} idle {kind}: {out[kind]}")
            clients.close_all(socks)
        finally:
            gw.stop()
    return out


def stage_slowhead(gw, args):
    out = {}
    prefix = b"GET /a HTTP/1.1\r\nHost: gw\r\nX-Big: "
    for src, n in ((ALLOWED, args.slowhead_connections), (OUTSIDE, args.outside_connections)):
        used = gw.start(STAGE_BOUNDS["slowhead"])
        try:
            pid = gw.pid()
            time.sleep(1)
            before = servers.rss_kib(pid)
            samples = []

            def sample():
                samples.append(servers.rss_kib(pid))

            socks, failed = clients.open_many(gw.port, n, src, sndbuf=65536)
            sent, watched, t0 = clients.slow_heads(socks, prefix, 1_040_000, args.slowhead_seconds, 25.0, sample)
            took = sorted(sent.values()) or [0]
            key = "allowed" if src == ALLOWED else "outside_allowed_clients"
            out[key] = {"bounds": used, "source": src, "connections": len(socks), "failed": failed,
                        "seconds": args.slowhead_seconds, "rss_before_kib": before,
                        "rss_peak_kib": max(samples or [before]), "rss_end_kib": servers.rss_kib(pid),
                        "bytes_taken_median": took[len(took) // 2], "bytes_taken_total": sum(took),
                        "outcomes": watched.outcomes(t0)}
            log(f"{gw.name} slowhead {key}: {out[key]}")
            clients.close_all(socks)
        finally:
            gw.stop()
    return out


def stage_limits(gw, args):
    used = gw.start(STAGE_BOUNDS["limits"])
    try:
        def head(size):
            start = b"GET /a HTTP/1.1\r\nHost: gw\r\nX-Big: "
            return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"

        wait = args.limits_wait
        trickle = [bytes([c]) for c in b"GET /a HTTP/1.1\r\nHost: gw\r\nX-Slow: " + b"a" * (int(wait) + 5)]
        probes = {
            "head_30KiB": lambda: clients.probe(gw.port, [head(30 * 1024)], wait=wait),
            "head_33KiB": lambda: clients.probe(gw.port, [head(33 * 1024)], wait=wait),
            "head_trickled_1_byte_per_s": lambda: clients.probe(gw.port, trickle, interval=1.0, wait=wait),
            "body_stalled_after_10_of_1000_bytes": lambda: clients.probe(
                gw.port, [b"POST /big/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10],
                wait=wait),
            "idle_keepalive_after_one_request": lambda: clients.probe(gw.port, [GET], wait=wait, after_answer=True),
        }
        out = {"bounds": used, "wait_s": wait}
        threads = []
        for name, fn in probes.items():
            def run(name=name, fn=fn):
                try:
                    out[name] = fn()
                except OSError as e:
                    out[name] = {"error": f"{type(e).__name__}: {e}"}
            threads.append(threading.Thread(target=run))
            threads[-1].start()
        for t in threads:
            t.join(wait + 30)
        log(f"{gw.name} limits: {out}")
        return out
    finally:
        gw.stop()


def stage_slowclients(gw, args, body_origin):
    used = gw.start(STAGE_BOUNDS["slowclients"])
    try:
        pid, total, rate = gw.pid(), args.slow_mb * MB, 1 * MB
        timeout = total / rate * 2 + 60
        tag = f"stall{int(time.time())}"
        out = {"bounds": used, "mb": args.slow_mb}

        def watch(s, t0):
            """After the reader stops: when the gateway let go of this connection (its socket no
            longer among the gateway's open files), watched for --stall-seconds s."""
            local = s.getsockname()[1]
            inode = servers.tcp_inode(gw.port, local)
            t_stop, closed_at, deadline = time.time(), None, time.time() + args.stall_seconds
            while time.time() < deadline:
                if inode not in servers.socket_inodes(pid):
                    closed_at = time.time()
                    break
                time.sleep(0.25)
            seen = {"client_tcp_state": clients.tcp_state(s),
                    "gateway_closed_after_s": round(closed_at - t_stop, 1) if closed_at else None,
                    "watched_s": args.stall_seconds}
            time.sleep(2)  # the upstream side's close, if any, a moment to show at the origin
            ev = body_origin.events_for(tag)
            if ev:
                e = ev[0]
                seen["origin"] = {"outcome": e["outcome"], "bytes_sent": e["bytes"],
                                  "ended_after_stop_s": round(e["end"] - t_stop, 1) if "end" in e else None}
            return seen

        jobs = {
            "upload": lambda: clients.upload(gw.port, "/big/upload", total, rate, timeout),
            "download": lambda: clients.download(gw.port, f"/big/download?bytes={total}", rate, timeout),
            "stalled_reader": lambda: clients.download(gw.port, f"/big/download?bytes={100 * MB}&{tag}", rate,
                                                       timeout, stop_after=1 * MB, on_stop=watch),
        }
        threads = []
        for name, fn in jobs.items():
            def run(name=name, fn=fn):
                try:
                    out[name] = fn()
                except OSError as e:
                    out[name] = {"error": f"{type(e).__name__}: {e}"}
            threads.append(threading.Thread(target=run))
            threads[-1].start()
        for t in threads:
            t.join(timeout + args.stall_seconds + 30)
        out["upload"]["ok"] = out["upload"].get("status") == 200 and out["upload"].get("answer") == f"received={total}"
        out["download"]["ok"] = out["download"].get("status") == 200 and out["download"].get("body_bytes") == total
        log(f"{gw.name} slowclients: {out}")
        return out
    finally:
        gw.stop()


def fmt_outcomes(o):
    return "; ".join(f"{k}: {v['count']}" + (f" (median {v['median_s']} s)" if v["median_s"] is not None else "")
                     for k, v in o.items())


def fmt_probe(p):
    if "error" in p:
        return p["error"]
    status = p["status"] if p["status"] else "no answer"
    return f"{status}, {p['ended']}, {p['seconds']} s"


def fmt_origin(r):
    o = r["origin"]
    if o["ended_after_stop_s"] is None:
        return f"still open {r['watched_s']} s after the reader stopped, {o['bytes_sent']} bytes sent"
    return f"{o['outcome']} {o['ended_after_stop_s']} s after the reader stopped, {o['bytes_sent']} bytes sent"


def report(res):
    lines = ["# Abuse bounds", ""]
    for name, r in res["targets"].items():
        lines.append(f"- **{name}**: {r.get('binary', '')} keys supported: "
                     f"{(', '.join(r['supported']) or 'none') if r.get('supported') is not None else 'n/a (nginx)'}")
    names = list(res["targets"])

    def table(title, rows):
        if not any(title in r for r in res["targets"].values()):
            return
        lines.extend(["", f"## {title}", "", "| | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)])
        for label, fn in rows:
            cells = []
            for n in names:
                try:
                    cells.append(str(fn(res["targets"][n])))
                except (KeyError, TypeError):
                    cells.append("–")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    table("idle", [
        ("bounds", lambda r: json.dumps(r["idle"]["silent"]["bounds"])),
        ("gateway open-file limit", lambda r: r["idle"]["silent"]["nofile_limit"]),
        ("silent: connected / reported by gateway", lambda r: f"{r['idle']['silent']['connected']} / {r['idle']['silent']['gateway_reported']}"),
        ("silent: RSS before → after (KiB)", lambda r: f"{r['idle']['silent']['rss_before_kib']} → {r['idle']['silent']['rss_after_kib']}"),
        ("silent: **KiB per connection**", lambda r: r["idle"]["silent"]["kib_per_connection"]),
        ("after one request: connected / statuses", lambda r: f"{r['idle']['after_one_request']['connected']} / {r['idle']['after_one_request']['statuses']}"),
        ("after one request: RSS before → after (KiB)", lambda r: f"{r['idle']['after_one_request']['rss_before_kib']} → {r['idle']['after_one_request']['rss_after_kib']}"),
        ("after one request: **KiB per connection**", lambda r: r["idle"]["after_one_request"]["kib_per_connection"]),
    ])
    rows = [("bounds", lambda r: json.dumps(r["slowhead"]["allowed"]["bounds"]))]
    for key in ("allowed", "outside_allowed_clients"):
        rows += [
            (f"{key}: connections, bytes taken (median)", lambda r, k=key: f"{r['slowhead'][k]['connections']}, {r['slowhead'][k]['bytes_taken_median']}"),
            (f"{key}: RSS before → **peak** (KiB)", lambda r, k=key: f"{r['slowhead'][k]['rss_before_kib']} → **{r['slowhead'][k]['rss_peak_kib']}**"),
            (f"{key}: ended (after {res['args']['slowhead_seconds']} s)", lambda r, k=key: fmt_outcomes(r["slowhead"][k]["outcomes"])),
        ]
    table("slowhead", rows)
    table("limits", [("bounds", lambda r: json.dumps(r["limits"]["bounds"]))] + [
        (p.replace("_", " "), lambda r, p=p: fmt_probe(r["limits"][p]))
        for p in ("head_30KiB", "head_33KiB", "head_trickled_1_byte_per_s",
                  "body_stalled_after_10_of_1000_bytes", "idle_keepalive_after_one_request")])
    table("slowclients", [
        ("bounds", lambda r: json.dumps(r["slowclients"]["bounds"])),
        ("upload at 1 MB/s", lambda r: f"{'ok' if r['slowclients']['upload']['ok'] else 'FAILED'}: {r['slowclients']['upload'].get('status')}, {r['slowclients']['upload'].get('answer', r['slowclients']['upload'].get('error'))}, {r['slowclients']['upload']['seconds']} s"),
        ("download read at 1 MB/s", lambda r: f"{'ok' if r['slowclients']['download']['ok'] else 'FAILED'}: {r['slowclients']['download'].get('status')}, {r['slowclients']['download']['body_bytes']} bytes, {r['slowclients']['download']['seconds']} s"),
        ("stalled reader: gateway closed it after", lambda r: (f"{r['slowclients']['stalled_reader']['gateway_closed_after_s']} s" if r['slowclients']['stalled_reader']['gateway_closed_after_s'] is not None else f"open after {r['slowclients']['stalled_reader']['watched_s']} s") + f" (client TCP state {r['slowclients']['stalled_reader']['client_tcp_state']})"),
        ("stalled reader: upstream (origin side)", lambda r: fmt_origin(r["slowclients"]["stalled_reader"])),
    ])
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(servers.RELEASE / "tokengate"), help="tokengate binary (default: the release build)")
    ap.add_argument("--sandbox", default=str(servers.RELEASE / "examples/sandbox_servers"),
                    help="sandbox token endpoint binary (default: the release build's examples/sandbox_servers)")
    ap.add_argument("--nginx", action="store_true", help="also run nginx as the gateway, for comparison")
    ap.add_argument("--no-tokengate", action="store_true", help="run nginx only")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)} (default: all)")
    ap.add_argument("--connections", type=int, default=10000, help="idle: connections (default 10000)")
    ap.add_argument("--accept-wait", type=float, default=60, help="idle: seconds to wait for the gateway to take them (default 60)")
    ap.add_argument("--slowhead-connections", type=int, default=600, help="slowhead: connections from 127.0.0.1 (default 600)")
    ap.add_argument("--outside-connections", type=int, default=400, help="slowhead: connections from 127.0.0.2 (default 400)")
    ap.add_argument("--slowhead-seconds", type=int, default=30, help="slowhead: seconds to watch (default 30)")
    ap.add_argument("--limits-wait", type=float, default=75, help="limits: seconds each probe waits for an answer or close (default 75)")
    ap.add_argument("--slow-mb", type=int, default=100, help="slowclients: MB uploaded and downloaded (default 100)")
    ap.add_argument("--stall-seconds", type=float, default=90, help="slowclients: seconds the stalled reader is watched (default 90)")
    ap.add_argument("--out", default=str(servers.ROOT / "target/abuse/results.json"),
                    help="JSON results file (default target/abuse/results.json)")
    args = ap.parse_args()
    stages = [s for s in STAGES if s in {x.strip() for x in args.stages.split(",")}]
    if not stages or {x.strip() for x in args.stages.split(",")} - set(STAGES):
        ap.error(f"--stages: name one or more of {', '.join(STAGES)}")
    for path, what in ((args.bin, "--bin"), (args.sandbox, "--sandbox")):
        if not args.no_tokengate and not Path(path).is_file():
            ap.error(f"{what}: {path}: no such file (build it with cargo build --release --bin tokengate --example sandbox_servers)")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    nofile = servers.raise_nofile()
    log(f"open-file limit of this script and the servers: {nofile}")
    work = Path(tempfile.mkdtemp(prefix="tokengate-abuse-"))
    res = {"args": vars(args), "targets": {}, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    sandbox = origin = body_origin = None
    try:
        sandbox = servers.Sandbox(args.sandbox) if not args.no_tokengate else None
        origin = servers.NginxOrigin(work)
        body_origin = servers.BodyOrigin(timeout=args.stall_seconds + 2 * args.slow_mb + 120)
        gateways = []
        if not args.no_tokengate:
            supported = servers.supported_keys(args.bin, work, sandbox.token_endpoint)
            log(f"{args.bin}: keys supported: {', '.join(supported) or 'none of ' + ', '.join(servers.NEW_KEYS)}")
            gw = servers.Tokengate(Path(args.bin).resolve(), work, sandbox, origin, body_origin, supported)
            res["targets"][gw.name] = {"binary": str(Path(args.bin).resolve()), "supported": supported}
            gateways.append(gw)
        if args.nginx:
            gateways.append(servers.Nginx(work, origin, body_origin))
            res["targets"]["nginx"] = {"binary": "/usr/sbin/nginx", "supported": None}
        for gw in gateways:
            for stage in stages:
                log(f"{gw.name}: {stage}")
                r = res["targets"][gw.name]
                if stage == "idle":
                    r["idle"] = stage_idle(gw, args)
                elif stage == "slowhead":
                    r["slowhead"] = stage_slowhead(gw, args)
                elif stage == "limits":
                    r["limits"] = stage_limits(gw, args)
                else:
                    r["slowclients"] = stage_slowclients(gw, args, body_origin)
                Path(args.out).write_text(json.dumps(res, indent=2))
    finally:
        for s in (body_origin, origin, sandbox):
            if s:
                s.stop()
    Path(args.out).write_text(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(report(res))


if __name__ == "__main__":
    main()
