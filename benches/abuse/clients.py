"""The abusive and slow clients of the abuse benchmark: many connections at once (non-blocking,
one selector), single probes with timing, and rate-limited transfers. Every loop is bounded by a
deadline."""

import selectors
import socket
import struct
import time

IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect, not at bind
TCP_STATES = {1: "ESTABLISHED", 7: "CLOSE", 8: "CLOSE_WAIT", 11: "CLOSING"}


def new_socket(src, sndbuf=None):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST, no TIME_WAIT
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    if sndbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    s.bind((src, 0))
    return s


def open_many(port, n, src, timeout=60.0, batch=512, sndbuf=None):
    """`n` connected non-blocking sockets from `src` (connects `batch` at a time), and how many
    failed or did not connect within `timeout`."""
    sel = selectors.DefaultSelector()
    ok, failed, started, deadline = [], 0, 0, time.time() + timeout
    while len(ok) + failed < n and time.time() < deadline:
        while started < n and started - len(ok) - failed < batch:
            s = new_socket(src, sndbuf)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            sel.register(s, selectors.EVENT_WRITE)
            started += 1
        for key, _ in sel.select(0.5):
            s = key.fileobj
            sel.unregister(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                failed += 1
                s.close()
            else:
                ok.append(s)
    for key in list(sel.get_map().values()):
        key.fileobj.close()
        failed += 1
    sel.close()
    return ok, failed + (n - started)


def drain(s):
    """Whatever the non-blocking socket `s` still has to read (b"" on an error)."""
    out = b""
    while len(out) < 65536:
        try:
            data = s.recv(65536)
        except OSError:
            break
        if not data:
            break
        out += data
    return out


def close_all(socks):
    for s in socks:
        s.close()


def parse_response(buf):
    """(status, complete) for the bytes `buf` received so far: status None until a status line
    has arrived; complete once the head and a Content-Length body are in."""
    if not buf.startswith(b"HTTP/"):
        return None, False
    status = int(buf[9:12]) if len(buf) >= 12 else None
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return status, False
    length = 0
    for line in buf[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, len(buf) >= end + 4 + length


def request_each(socks, request, timeout=30.0):
    """Sends `request` on every socket at once and reads each response; returns the count of
    statuses (None: no complete response within `timeout`)."""
    sel = selectors.DefaultSelector()
    bufs = {}
    for s in socks:
        s.sendall(request)  # small: fits the socket buffer
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = b""
    counts, deadline = {}, time.time() + timeout
    while bufs and time.time() < deadline:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            bufs[s] += data
            status, done = parse_response(bufs[s])
            if done or not data:
                counts[status if done else None] = counts.get(status if done else None, 0) + 1
                sel.unregister(s)
                del bufs[s]
    counts[None] = counts.get(None, 0) + len(bufs)
    sel.close()
    return {str(k): v for k, v in counts.items() if v}


class Watched:
    """Connections whose answers are read as they arrive: how each ended and when."""

    def __init__(self, socks):
        self.sel = selectors.DefaultSelector()
        self.state = {}
        for s in socks:
            self.sel.register(s, selectors.EVENT_READ)
            self.state[s] = {"buf": b"", "end": None, "t": None}

    def poll(self, wait):
        for key, _ in self.sel.select(wait):
            s = key.fileobj
            st = self.state[s]
            try:
                data = s.recv(65536)
                if data:
                    st["buf"] = (st["buf"] + data)[:4096]
                    if st["t"] is None and parse_response(st["buf"])[0]:
                        st["t"] = time.time()
                    continue
                st["end"] = "closed"
            except ConnectionResetError:
                st["end"] = "reset"
            except BlockingIOError:
                continue
            st["t"] = st["t"] or time.time()
            self.sel.unregister(s)

    def mark_ended(self, s, how):
        """A send failed: what the gateway answered before it closed is still read."""
        st = self.state[s]
        if st["end"] is None:
            st["buf"] = (st["buf"] + drain(s))[:4096]
            st["end"], st["t"] = how, st["t"] or time.time()
            self.sel.unregister(s)

    def outcomes(self, t0):
        """{"431 answer, closed": {"count": n, "median_s": s}, …}: the answer's status, if any,
        and then closed / reset / open; with the median seconds from `t0` to the answer or end."""
        groups = {}
        for st in self.state.values():
            status = parse_response(st["buf"])[0]
            how = st["end"] or "open"
            key = f"{status} answer, {how}" if status else how
            groups.setdefault(key, []).append(st["t"] - t0 if st["t"] else None)
        out = {}
        for key, ts in sorted(groups.items()):
            known = sorted(t for t in ts if t is not None)
            out[key] = {"count": len(ts), "median_s": round(known[len(known) // 2], 1) if known else None}
        return out


def slow_heads(socks, prefix, total, seconds, trickle_every, sample, piece=65536, stall=2.0):
    """On every socket: `prefix`, then up to `total` bytes of one field value in `piece`-sized
    non-blocking sends for as long as the gateway takes them (a socket that would block is
    tried again until it has not taken a byte for `stall` s, or is closed); then one byte per
    `trickle_every` seconds. Answers are read all along. `sample()` is called once a second
    for `seconds` seconds. Returns (bytes each socket took, Watched, t0)."""
    t0 = time.time()
    w = Watched(socks)
    filler = memoryview(b"a" * total)
    sent = {s: 0 for s in socks}
    progress = {}
    for s in socks:
        try:
            s.send(prefix)
            progress[s] = t0
        except OSError:
            w.mark_ended(s, "reset")
    next_sample, next_trickle, end = t0, t0 + trickle_every, t0 + seconds
    while time.time() < end:
        moved, now = False, time.time()
        for s, last in list(progress.items()):
            if w.state[s]["end"] or sent[s] >= total or now - last > stall:
                del progress[s]
                continue
            try:
                sent[s] += s.send(filler[sent[s]:sent[s] + piece])
                progress[s], moved = now, True
            except BlockingIOError:
                pass
            except OSError:
                w.mark_ended(s, "reset")
        w.poll(0 if moved else 0.05)
        now = time.time()
        if now >= next_sample:
            sample()
            next_sample += 1.0
        if now >= next_trickle:
            for s, st in w.state.items():
                if st["end"] is None:
                    try:
                        s.send(b"a")
                    except BlockingIOError:
                        pass
                    except OSError:
                        w.mark_ended(s, "reset")
            next_trickle += trickle_every
    w.poll(0)
    return sent, w, t0


def probe(port, chunks, interval=0.0, wait=20.0, src="127.0.0.1", after_answer=False):
    """One connection: sends each of `chunks` (`interval` s apart) until an answer or a close
    arrives, then waits for one for up to `wait` s from the start. With `after_answer`, a
    first complete answer starts the clock again and the probe waits for the close after it.
    Returns {status, ended (closed/reset/open), seconds} (seconds from the start, or from the
    first answer with `after_answer`)."""
    s = new_socket(src)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.setblocking(False)
    t0 = time.time()
    buf, ended, t_end, i, next_send = b"", None, None, 0, t0
    answered = None
    deadline = t0 + wait
    while time.time() < deadline and ended is None:
        if i < len(chunks) and time.time() >= next_send:
            try:
                _send_all(s, chunks[i], deadline)
            except OSError:
                ended, t_end = "reset", time.time()
                buf += drain(s)
                break
            i += 1
            next_send += interval
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ)
        ready = sel.select(min(0.1, max(0.0, deadline - time.time())))
        sel.close()
        if not ready:
            continue
        try:
            data = s.recv(65536)
            if not data:
                ended = "closed"
            buf += data
        except ConnectionResetError:
            ended = "reset"
        except BlockingIOError:
            continue
        status, complete = parse_response(buf)
        if complete and answered is None:
            answered = time.time()
            if after_answer:
                deadline = answered + wait
            elif ended is None:
                # the answer is in: give a close right after it a moment to arrive
                deadline = min(deadline, answered + 0.5)
        if ended:
            t_end = time.time()
    s.close()
    status = parse_response(buf)[0]
    start = answered if (after_answer and answered) else t0
    t = t_end if (after_answer or not answered) else answered
    return {"status": status, "ended": ended or "open",
            "seconds": round((t or time.time()) - start, 2)}


def _send_all(s, data, deadline):
    view, off = memoryview(data), 0
    while off < len(data) and time.time() < deadline:
        try:
            off += s.send(view[off:off + 65536])
        except BlockingIOError:
            time.sleep(0.01)


def tcp_state(s):
    """The kernel's TCP state of socket `s` (TCP_INFO's first byte), by name."""
    st = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    return TCP_STATES.get(st, str(st))


def upload(port, path, total, rate, timeout):
    """POST of `total` bytes at `rate` bytes/s; returns {status, body, seconds}."""
    s = new_socket("127.0.0.1")
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    t0 = time.time()
    s.sendall(b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Length: %d\r\n\r\n" % (path.encode(), total))
    chunk, sent = b"\0" * 65536, 0
    try:
        while sent < total and time.time() < t0 + timeout:
            n = min(len(chunk), total - sent)
            s.sendall(chunk[:n])
            sent += n
            lag = t0 + sent / rate - time.time()
            if lag > 0:
                time.sleep(lag)
        buf = b""
        while not parse_response(buf)[1] and time.time() < t0 + timeout:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    except OSError as e:
        return {"status": None, "sent": sent, "error": type(e).__name__, "seconds": round(time.time() - t0, 1)}
    finally:
        s.close()
    status, _ = parse_response(buf)
    return {"status": status, "sent": sent, "answer": buf.split(b"\r\n\r\n", 1)[-1].decode("latin-1").strip(),
            "seconds": round(time.time() - t0, 1)}


def download(port, path, rate, timeout, stop_after=None, on_stop=None):
    """GET `path` read at `rate` bytes/s; returns {status, body_bytes, seconds}. With
    `stop_after`, reading stops after that many bytes and `on_stop(sock, t0)` is called (it
    watches the connection and returns what it saw)."""
    s = new_socket("127.0.0.1")
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    t0 = time.time()
    s.sendall(b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % path.encode())
    buf, got, status, length, body = b"", 0, None, None, 0
    try:
        while time.time() < t0 + timeout:
            if stop_after is not None and got >= stop_after:
                return {"status": status, "body_bytes": body, "read_s": round(time.time() - t0, 1),
                        **on_stop(s, t0)}
            data = s.recv(min(65536, int(rate / 10)))
            if not data:
                break
            got += len(data)
            if length is None:
                buf += data
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    status = parse_response(buf)[0]
                    for line in buf[:end].split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    length = length if length is not None else -1
                    body = len(buf) - end - 4
                    buf = b""
            else:
                body += len(data)
            if length is not None and length >= 0 and body >= length:
                break
            lag = t0 + got / rate - time.time()
            if lag > 0:
                time.sleep(lag)
    except OSError as e:
        return {"status": status, "body_bytes": body, "error": type(e).__name__,
                "seconds": round(time.time() - t0, 1)}
    finally:
        s.close()
    return {"status": status, "body_bytes": body, "seconds": round(time.time() - t0, 1)}
