#!/usr/bin/env python3
"""Benchmark idtoken-proxy against direct access and nginx as a reverse proxy, in one run.

    python bench/run.py                      full run (a few minutes)
    python bench/run.py --quick              a short smoke run (2 s per case, no extras)
    python bench/run.py --only pinned,100b   a subset (see --help for the names)

What it starts, all on 127.0.0.1 and all stopped by their own pid at the end:

- an nginx upstream serving a 100-byte and a 1 MiB file (and a sparse 1 GiB file
  for the big download),
- nginx as a reverse proxy to it, with keep-alive upstream connections: the
  reference every proxy is compared with,
- idtoken-proxy (``python -m proxy --config ...``) with a static dummy token
  (an unsigned JWT whose ``exp`` is far ahead; the nginx upstream ignores it),
  and again with service-account key credentials (``idtoken-proxy-sa``): a key
  file whose ``token_uri`` is a small local token endpoint (bench/tokenendpoint.py),
  the google-auth code path and memory of users with real credentials,
- the Go peer: a stdlib ``httputil.ReverseProxy`` (bench/goproxy/main.go, built
  here with ``go build``; 100 idle upstream connections per host) that injects
  the same ``Authorization`` header,
- for the 1 GiB upload, a small aiohttp sink (bench/sink.py) behind the proxy,
- for the token-refresh case, a small fake metadata server (bench/metadata.py)
  whose ID tokens live a few seconds, so the proxy refreshes several times while
  it is under load.

Load comes from wrk (2 threads, 64 connections). "pinned" puts wrk and the
upstream nginx on CPU 0 and the proxy under test on CPU 1; "unpinned" lets the
kernel place everything. Each proxy is started fresh for each case, so its peak
RSS (VmHWM) belongs to that case; CPU seconds are read from /proc/PID/stat
around the measured run. Absolute numbers drift between runs and machines; the
ratios within one run are what to compare.

Needs nginx (Debian ``nginx-light``) and wrk: ``apt-get install -y nginx-light wrk``,
and Go for the Go peer: ``apt-get install -y golang-go``.
"""

from __future__ import annotations

import argparse
import base64
import compileall
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INSTALL_HINT = "apt-get install -y nginx-light wrk"
GO_HINT = "apt-get install -y golang-go"
GOPROXY_SRC = ROOT / "bench" / "goproxy"

SIZES = {"100b": 100, "1m": 1 << 20}
MODES = ("pinned", "unpinned")
TARGETS = ("direct", "nginx", "go", "proxy", "proxy-sa")
EXTRAS = ("startup", "c1", "c1000", "refresh", "idleconn", "bigfile")
#: Extras measured under the same pinning as the main table (in the first mode).
MODE_EXTRAS = ("c1", "c1000", "refresh")
#: The targets the one-connection extra measures (latency added over direct's).
C1_TARGETS = ("direct", "nginx", "go", "proxy", "proxy-sa")
LABELS = {
    "direct": "direct",
    "nginx": "nginx-proxy",
    "go": "go-reverseproxy",
    "proxy": "idtoken-proxy",
    "proxy-sa": "idtoken-proxy-sa",
    "proxy-metadata": "idtoken-proxy (metadata)",
    "bare": "bare aiohttp",
}
#: Issue targets, printed beside the measured ratios (the bench never fails on them).
GOALS = {"100b": ">= 1.5 x go-reverseproxy", "1m": ">= 0.9 x nginx-proxy"}

CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK_THREADS = 2
WRK_CONNECTIONS = 64


class BenchError(Exception):
    """Something the benchmark could not do; printed as one line, exit 1."""


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process the benchmark starts, so each can be stopped by its own pid."""

    def __init__(self, taskset: str | None) -> None:
        self.taskset = taskset
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: list[str], log: Path, *, cpu: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        if cpu is not None:
            # taskset execs the command, so the pid we get is the program's own.
            assert self.taskset is not None
            argv = [self.taskset, "-c", cpu, *argv]
        with open(log, "ab") as out:
            # A session of its own: a Ctrl-C at the terminal reaches only us, and we stop the rest.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.running.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running = [r for r in self.running if r[1] is not proc]

    def stop_all(self) -> None:
        for _, proc, _ in reversed(list(self.running)):
            self.stop(proc)

    def log_tail(self, proc: subprocess.Popen[bytes], lines: int = 15) -> str:
        for _, p, log in self.running:
            if p is proc:
                try:
                    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                except OSError:
                    return ""
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, int]:
    """One GET over a fresh connection: (status, body length)."""
    status, body = _get(port, path, timeout)
    return status, len(body)


def http_text(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """One GET over a fresh connection: (status, body as text)."""
    status, body = _get(port, path, timeout)
    return status, body.decode(errors="replace")


def _get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while chunk := s.recv(1 << 20):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    return status, body


def wait_ready(procs: Processes, proc: subprocess.Popen[bytes], port: int, path: str, timeout: float = 20.0) -> float:
    """Poll until ``path`` answers 200; return seconds since the call. Fails if the process exits."""
    start = time.perf_counter()
    last = ""
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise BenchError(f"process {proc.args} exited with {proc.returncode}:\n{procs.log_tail(proc)}")
        try:
            status, _ = http_get(port, path, timeout=2.0)
            if status == 200:
                return time.perf_counter() - start
            last = f"status {status}"
        except OSError as e:
            last = type(e).__name__
        time.sleep(0.002)
    raise BenchError(f"{proc.args} not ready on port {port} after {timeout:g} s ({last}):\n{procs.log_tail(proc)}")


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rpartition(")")[2].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped for a full accept queue (TcpExt ListenOverflows).

    Machine-wide, not per socket: other programs' overflows count too.
    """
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:]))
            return int(fields["ListenOverflows"]) if "ListenOverflows" in fields else None
    return None


class RssSampler:
    """Samples VmRSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, memory_kib(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    rps: float
    requests: int
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    non_2xx: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, text, re.MULTILINE)

    rps = find(r"^Requests/sec:\s+([\d.]+)")
    total = find(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)")
    if not rps or not total:
        raise BenchError(f"cannot read wrk's output:\n{text}")
    p50 = find(r"^\s+50%\s+(\S+)")
    p99 = find(r"^\s+99%\s+(\S+)")
    errors = find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    non2xx = find(r"Non-2xx or 3xx responses: (\d+)")
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        seconds=_ms(total.group(2) + total.group(3)) / 1000,
        p50_ms=_ms(p50.group(1)) if p50 else None,
        p99_ms=_ms(p99.group(1)) if p99 else None,
        errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
    )


# --------------------------------------------------------------------------- configs


def dummy_token(audience: str) -> str:
    """An unsigned JWT with exp ten years ahead: enough for the static identity source."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()

    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": "bench"}
    claims = {"aud": audience, "iss": "https://accounts.google.com", "email": "bench@example.invalid", "iat": now, "exp": now + 10 * 365 * 86400}
    return f"{part(header)}.{part(claims)}.c2lnbmF0dXJl"


def refresh_lifetime(duration: int) -> int:
    """ID token lifetime for the refresh case: several refreshes within ``duration`` seconds of load.

    The proxy refreshes a token this short about half way through what is left of
    its usable life: (seconds left - 5) / 2, less up to 10% jitter
    (proxy/tokens.py ``refresh_delay`` and ``MIN_TTL``; the metadata source's
    210 s margin only applies to tokens that live over 420 s). With a lifetime of
    5 + duration / 2, a refresh comes every duration / 4 seconds or a little
    sooner: 4 or 5 in the window. Never below 8 s, so a fresh token always has
    a few seconds more than the 5 s the proxy requires of a token it sends.
    """
    return max(8, round(5 + duration / 2))


NGINX_COMMON = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
{body}
}}
"""

NGINX_UPSTREAM = """\
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tmp}/www;
        location / {{ }}
    }}
"""

# The reference: nginx with a keep-alive pool to the upstream, forwarding the same
# token header. Responses are buffered in memory (64 x 16 KiB per request) and never
# spilled to temp files, as a proxy tuned for this job would be.
NGINX_PROXY = """\
    upstream bench_upstream {{
        server 127.0.0.1:{upstream};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
            proxy_buffers 64 16k;
            proxy_max_temp_file_size 0;
        }}
    }}
"""

PROXY_CONFIG = """\
# Generated by bench/run.py.
listen: {{host: 127.0.0.1, port: {port}}}
credentials: {{source: static, token_env: BENCH_ID_TOKEN}}
routes:
  - upstream: http://127.0.0.1:{upstream}
  - upstream: http://127.0.0.1:{sink}
    prefix: /sink
"""

# The refresh case: the metadata source, pointed at bench/metadata.py through
# GCE_METADATA_HOST / GCE_METADATA_IP in the proxy's environment.
PROXY_METADATA_CONFIG = """\
# Generated by bench/run.py.
listen: {{host: 127.0.0.1, port: {port}}}
credentials: {{source: metadata}}
routes:
  - upstream: http://127.0.0.1:{upstream}
"""

# Service-account key credentials: the key file bench/tokenendpoint.py writes, whose
# token_uri is that endpoint. The route is the static config's main one.
PROXY_SA_CONFIG = """\
# Generated by bench/run.py.
listen: {{host: 127.0.0.1, port: {port}}}
credentials: {{source: service_account, key_file: {key_file}}}
routes:
  - upstream: http://127.0.0.1:{upstream}
"""


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    mode: str
    size: str
    target: str
    connections: int
    wrk: WrkResult
    peak_rss_kib: int | None = None
    cpu_s: float | None = None
    #: ID tokens the identity source handed out during the measured run (refresh case).
    token_fetches: int | None = None

    @property
    def cpu_us_per_req(self) -> float | None:
        if self.cpu_s is None or not self.wrk.requests:
            return None
        return self.cpu_s / self.wrk.requests * 1e6


@dataclass
class Results:
    machine: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def find(self, mode: str, size: str, target: str, connections: int = WRK_CONNECTIONS) -> Row | None:
        for r in self.rows:
            if (r.mode, r.size, r.target, r.connections) == (mode, size, target, connections):
                return r
        return None


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v * 1000:.0f}us" if v < 1 else f"{v:.2f}ms")


def _fmt_mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def ratio_of(res: Results, row: Row) -> tuple[float | None, str]:
    """The issue's ratio for a row: x nginx-proxy for 100 B, x direct otherwise."""
    ref_target = "nginx" if row.size == "100b" else "direct"
    ref = res.find(row.mode, row.size, ref_target, row.connections)
    if ref is None or not ref.wrk.rps:
        return None, LABELS[ref_target]
    return row.wrk.rps / ref.wrk.rps, LABELS[ref_target]


def print_tables(res: Results, args: argparse.Namespace) -> None:
    for mode in dict.fromkeys(r.mode for r in res.rows):
        where = "wrk + upstream nginx on CPU 0, proxy under test on CPU 1" if mode == "pinned" else "no pinning"
        print(f"\n== {mode} ({where}); wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{args.duration}s --latency")
        head = f"{'target':<18} {'size':<5} {'conns':>5} {'req/s':>10} {'p50':>9} {'p99':>9} {'ratio':>22} {'peak RSS':>10} {'CPU s':>6} {'us/req':>7}  notes"
        print(head)
        print("-" * len(head))
        for r in (r for r in res.rows if r.mode == mode):
            ratio, ref = ratio_of(res, r)
            notes = []
            if r.wrk.errors:
                notes.append(f"{r.wrk.errors} socket errors")
            if r.wrk.non_2xx:
                notes.append(f"{r.wrk.non_2xx} non-2xx!")
            print(
                f"{LABELS.get(r.target, r.target):<18} {r.size:<5} {r.connections:>5} {r.wrk.rps:>10.0f} {_fmt_ms(r.wrk.p50_ms):>9} "
                f"{_fmt_ms(r.wrk.p99_ms):>9} {(f'{ratio:.3f} x {ref}' if ratio is not None else '-'):>22} "
                f"{_fmt_mib(r.peak_rss_kib):>10} {('-' if r.cpu_s is None else f'{r.cpu_s:.2f}'):>6} "
                f"{('-' if r.cpu_us_per_req is None else f'{r.cpu_us_per_req:.0f}'):>7}  {', '.join(notes)}"
            )

    e = res.extras
    if e:
        print("\n== extras")
    if "startup" in e:
        s = e["startup"]
        print(
            f"startup: process start to first proxied 200: median {s['median_s']:.3f} s "
            f"(runs {', '.join(f'{t:.3f}' for t in s['runs_s'])}; issue target <= 0.6 s); "
            f"idle RSS 1 s after: {_fmt_mib(s['idle_rss_kib'])} (target <= 30 MiB)"
        )
        if s.get("idle_rss_sa_kib"):
            print(
                f"startup with the service-account key: {s['sa_startup_s']:.3f} s to the first proxied 200; "
                f"idle RSS 1 s after: {_fmt_mib(s['idle_rss_sa_kib'])} (target <= 40 MiB)"
            )
        if s.get("floor_rss_kib") and s.get("idle_rss_kib"):
            print(
                f"idle RSS floor: a bare aiohttp server on uvloop (bench/sink.py --uvloop), measured the same way: "
                f"{_fmt_mib(s['floor_rss_kib'])}; the proxy adds {(s['idle_rss_kib'] - s['floor_rss_kib']) / 1024:.1f} MiB"
            )
    if "idleconn" in e:
        s = e["idleconn"]
        print(
            f"idle keep-alive connections: {s['connections']} open after one request each: RSS {_fmt_mib(s['before_kib'])} -> "
            f"{_fmt_mib(s['after_kib'])}, {s['per_connection_kib']:.1f} KiB per idle connection"
        )
    for key in ("c1000",):
        for s in e.get(key, []):
            overflows = s.get("listen_overflows")
            print(
                f"{s['connections']} vs {WRK_CONNECTIONS} connections ({s['mode']}, 100b): {s['label']} {s['rps']:.0f} vs {s['rps_64']:.0f} req/s "
                f"= {s['ratio']:.3f} (issue: >= 0.90 for idtoken-proxy); p99 {_fmt_ms(s['p99_ms'])} vs {_fmt_ms(s['p99_64_ms'])}; "
                f"peak RSS {_fmt_mib(s['peak_rss_kib'])}"
                + (f"; CPU per request {s['cpu_us']:.0f} vs {s['cpu_us_64']:.0f} us" if s.get("cpu_us") and s.get("cpu_us_64") else "")
                + (f"; listen queue overflows {overflows} (whole machine)" if overflows is not None else "")
            )
    if "refresh" in e:
        s = e["refresh"]
        print(
            f"token refresh under load ({s['mode']}, 100b, {WRK_CONNECTIONS} connections): static token vs the metadata source "
            f"with tokens that live {s['lifetime_s']} s"
        )
        static = s["rows"][0]
        for r in s["rows"]:
            notes = [f"{r['token_fetches']} token fetches"] if r["token_fetches"] is not None else []
            if r["errors"]:
                notes.append(f"{r['errors']} socket errors")
            if r["non_2xx"]:
                notes.append(f"{r['non_2xx']} non-2xx!")
            rel = r["rps"] / static["rps"] if static["rps"] else 0.0
            print(
                f"  {r['label']:<26} {r['rps']:>8.0f} req/s ({rel:.3f} x static)  p50 {_fmt_ms(r['p50_ms']):>8}  p99 {_fmt_ms(r['p99_ms']):>8}"
                + (f"  {', '.join(notes)}" if notes else "")
            )
        p99_ratio = f"{s['p99_ratio']:.2f}" if s["p99_ratio"] is not None else "n/a"
        print(
            f"refresh: p99 with refreshes {_fmt_ms(s['rows'][1]['p99_ms'])} vs static {_fmt_ms(static['p99_ms'])} (ratio {p99_ratio}); "
            f"{s['fetches_in_window']} token fetches during the window ({s['fetches_total']} in all)"
        )
    for s in e.get("bigfile", []):
        print(
            f"{s['what']} {s['bytes'] / (1 << 30):.2f} GiB via {s['via']}: {'intact' if s['ok'] else 'BROKEN: ' + s['problem']}, "
            f"{s['mib_s']:.0f} MiB/s"
            + (f", proxy RSS {_fmt_mib(s['rss_before_kib'])} before, peak {_fmt_mib(s['rss_peak_kib'])} during (VmHWM {_fmt_mib(s['hwm_kib'])})" if s["via"] != "direct" else "")
        )

    if res.rows:
        print("\n== ratios (issue targets in brackets; ratios within one run are what to compare)")
    for r in res.rows:
        if r.target == "direct" or r.connections != WRK_CONNECTIONS:
            continue
        if r.size == "100b" and r.target == "nginx":
            continue
        ratio, ref = ratio_of(res, r)
        goal = f" [{GOALS[r.size]}]" if r.target in ("proxy", "proxy-sa") else ""
        value = f"{ratio:.3f}" if ratio is not None else f"n/a ({ref} not measured)"
        go = res.find(r.mode, r.size, "go")
        versus_go = f"; {r.wrk.rps / go.wrk.rps:.3f} x go-reverseproxy" if go is not None and go.wrk.rps and r.target != "go" else ""
        nginx = res.find(r.mode, r.size, "nginx")
        versus_nginx = f"; {r.wrk.rps / nginx.wrk.rps:.3f} x nginx-proxy" if r.size != "100b" and nginx is not None and nginx.wrk.rps and r.target != "nginx" else ""
        print(f"ratio {r.mode} {r.size} {LABELS.get(r.target, r.target)} = {value} x {ref}{versus_nginx}{versus_go}{goal}")
    print_goals(res)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT MET")


def print_goals(res: Results) -> None:
    """Each goal of the performance issue with its figure and whether it is met (never a failure)."""
    if not res.rows and not res.extras:
        return
    modes = [m for m in MODES if any(r.mode == m for r in res.rows)]
    mode = modes[0] if modes else "pinned"
    print(f"\n== goals (engine issue; {mode} where a load case is involved; idtoken-proxy-sa is the service-account key run)")

    def line(goal: str, figures: list[str], ok: bool | None, wanted: str) -> None:
        print(f"goal {goal}: {'; '.join(figures) if figures else '-'} [{wanted}] {_verdict(ok)}")

    def find(size: str, target: str, conns: int = WRK_CONNECTIONS) -> Row | None:
        return res.find(mode, size, target, conns)

    proxies = [t for t in ("proxy-sa", "proxy") if find("100b", t) or find("1m", t) or find("100b", t, 1)]

    def all_ok(oks: list[bool]) -> bool | None:
        return all(oks) if oks else None

    # 100 B at 64 connections against the Go peer.
    go, figures, oks = find("100b", "go"), [], []
    for t in proxies:
        row = find("100b", t)
        if go is not None and row is not None and go.wrk.rps:
            ratio = row.wrk.rps / go.wrk.rps
            figures.append(f"{LABELS[t]} {ratio:.2f} x go-reverseproxy ({row.wrk.rps:.0f} vs {go.wrk.rps:.0f} req/s)")
            oks.append(ratio >= 1.5)
    line("100 B, 64 connections", figures, all_ok(oks), ">= 1.5 x the Go peer's req/s")

    # CPU per 100 B request against nginx-proxy's.
    nginx, figures, oks = find("100b", "nginx"), [], []
    for t in proxies:
        row = find("100b", t)
        if nginx is not None and row is not None and nginx.cpu_us_per_req and row.cpu_us_per_req is not None:
            ratio = row.cpu_us_per_req / nginx.cpu_us_per_req
            figures.append(f"{LABELS[t]} {ratio:.2f} x nginx-proxy's ({row.cpu_us_per_req:.0f} vs {nginx.cpu_us_per_req:.0f} us)")
            oks.append(ratio <= 2.5)
    line("CPU per 100 B request", figures, all_ok(oks), "<= 2.5 x nginx-proxy's")

    # One connection: latency added over direct, against the Go peer's.
    direct1, go1, figures, oks = find("100b", "direct", 1), find("100b", "go", 1), [], []
    if direct1 is not None and go1 is not None and direct1.wrk.p50_ms is not None and go1.wrk.p50_ms is not None:
        go_added = go1.wrk.p50_ms - direct1.wrk.p50_ms
        for t in proxies:
            row = find("100b", t, 1)
            if row is not None and row.wrk.p50_ms is not None:
                added = row.wrk.p50_ms - direct1.wrk.p50_ms
                figures.append(f"{LABELS[t]} adds {added * 1000:.0f} us vs the Go peer's {go_added * 1000:.0f} us (p50 over direct's {direct1.wrk.p50_ms * 1000:.0f} us)")
                oks.append(added <= go_added)
    line("1 connection, p50 minus direct's p50", figures, all_ok(oks), "<= the Go peer's")

    # 1 MiB against nginx-proxy.
    nginx1m, figures, oks = find("1m", "nginx"), [], []
    for t in proxies:
        row = find("1m", t)
        if nginx1m is not None and row is not None and nginx1m.wrk.rps:
            ratio = row.wrk.rps / nginx1m.wrk.rps
            figures.append(f"{LABELS[t]} {ratio:.2f} x nginx-proxy ({row.wrk.rps:.0f} vs {nginx1m.wrk.rps:.0f} req/s)")
            oks.append(ratio >= 0.9)
    line("1 MiB", figures, all_ok(oks), ">= 0.9 x nginx-proxy's req/s")

    # Memory.
    st = res.extras.get("startup", {})
    idle = st.get("idle_rss_kib")
    line("RSS, static token", [f"{_fmt_mib(idle)} idle"] if idle else [], None if not idle else idle <= 30 * 1024, "<= 30 MiB idle")
    idle_sa = st.get("idle_rss_sa_kib")
    sa1m = find("1m", "proxy-sa")
    figures, oks = [], []
    if idle_sa:
        figures.append(f"{_fmt_mib(idle_sa)} idle")
        oks.append(idle_sa <= 40 * 1024)
        if sa1m is not None and sa1m.peak_rss_kib:
            figures.append(f"peak {_fmt_mib(sa1m.peak_rss_kib)} under the 1 MiB load (idle + {(sa1m.peak_rss_kib - idle_sa) / 1024:.1f} MiB)")
            oks.append(sa1m.peak_rss_kib <= idle_sa + 10 * 1024)
    line("RSS, service-account key", figures, all_ok(oks) if idle_sa and sa1m is not None else None, "<= 40 MiB idle; peak under the 1 MiB load <= idle + 10 MiB")

    # Many connections.
    figures, oks = [], []
    ic = res.extras.get("idleconn")
    if ic:
        figures.append(f"{ic['per_connection_kib']:.1f} KiB per idle connection")
        oks.append(ic["per_connection_kib"] <= 8)
    c1000 = {s["label"]: s for s in res.extras.get("c1000", [])}
    ours, theirs = c1000.get(LABELS["proxy"]), c1000.get(LABELS["nginx"])
    if ours and theirs:
        figures.append(f"throughput ratio {ours['ratio']:.2f} vs nginx-proxy's {theirs['ratio']:.2f}")
        oks.append(ours["ratio"] >= theirs["ratio"])
    line("1,000 keep-alive connections", figures, all_ok(oks) if ic and ours and theirs else None, "<= 8 KiB each; ratio to 64 connections >= nginx-proxy's")


# --------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args: argparse.Namespace, tools: dict[str, str | None], tmp: Path) -> None:
        self.args, self.tools, self.tmp = args, tools, tmp
        self.procs = Processes(tools["taskset"])
        self.token = ""
        self.ports = {name: free_port() for name in ("upstream", "nginx", "proxy", "sink", "metadata", "go", "token")}
        #: The Go peer's binary, built by prepare() when a case needs it.
        self.goproxy: Path | None = None
        #: bench/tokenendpoint.py, started on first use by an idtoken-proxy-sa case.
        self.token_endpoint: subprocess.Popen[bytes] | None = None
        self.results = Results(machine=machine_info(tools))
        #: Lifetime of the fake metadata server's ID tokens (refresh extra).
        self.lifetime = args.token_lifetime or refresh_lifetime(args.duration)
        self._logn = 0

    # ---- setup

    def prepare(self, need_big: bool, need_go: bool = False) -> None:
        www = self.tmp / "www"
        www.mkdir()
        (www / "100b").write_bytes(b"x" * 99 + b"\n")
        (www / "1m").write_bytes(bytes(range(256)) * 4096)
        if need_big:
            # Sparse: no disk space taken, and nginx sends it with sendfile.
            with open(www / "big", "wb") as f:
                f.truncate(self.args.big_mib << 20)
            # Read it once, so the first download does not pay for filling the page cache.
            with open(www / "big", "rb") as f:
                while f.read(8 << 20):
                    pass
        self.token = dummy_token(f"http://127.0.0.1:{self.ports['upstream']}")
        self._nginx_conf("upstream", NGINX_UPSTREAM.format(port=self.ports["upstream"], tmp=self.tmp))
        self._nginx_conf("nginx", NGINX_PROXY.format(port=self.ports["nginx"], upstream=self.ports["upstream"], token=self.token))
        (self.tmp / "proxy.yaml").write_text(
            PROXY_CONFIG.format(port=self.ports["proxy"], upstream=self.ports["upstream"], sink=self.ports["sink"])
        )
        (self.tmp / "proxy-metadata.yaml").write_text(PROXY_METADATA_CONFIG.format(port=self.ports["proxy"], upstream=self.ports["upstream"]))
        (self.tmp / "proxy-sa.yaml").write_text(
            PROXY_SA_CONFIG.format(port=self.ports["proxy"], upstream=self.ports["upstream"], key_file=self.tmp / "sa-key.json")
        )
        if need_go:
            self.goproxy = build_goproxy(self.tools, self.tmp)

    def start_token_endpoint(self) -> None:
        """bench/tokenendpoint.py (writes tmp/sa-key.json, then serves /token), once per run."""
        if self.token_endpoint is not None and self.token_endpoint.poll() is None:
            return
        argv = [sys.executable, str(ROOT / "bench" / "tokenendpoint.py"), str(self.ports["token"]), str(self.tmp / "sa-key.json")]
        self.token_endpoint = self.procs.start("token endpoint", argv, self._log("token-endpoint"))
        self._listening(self.token_endpoint, self.ports["token"], "the token endpoint")

    def _nginx_conf(self, name: str, body: str) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.tmp / f"{name}-{sub}").mkdir(exist_ok=True)
        (self.tmp / f"{name}.conf").write_text(NGINX_COMMON.format(tmp=self.tmp, name=name, body=body))

    def _log(self, name: str) -> Path:
        self._logn += 1
        return self.tmp / f"{self._logn:02d}-{name}.log"

    def proxy_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith(("IDTOKEN_PROXY_", "GOOGLE_"))}
        env.update(
            BENCH_ID_TOKEN=self.token,
            # Nothing of the user's gcloud or ADC setup is read or touched.
            HOME=str(self.tmp),
            CLOUDSDK_CONFIG=str(self.tmp / "gcloud"),
            NO_PROXY="127.0.0.1,localhost",
            PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        return env

    # ---- process starters

    def start_upstream(self, cpu: str | None) -> subprocess.Popen[bytes]:
        nginx = self.tools["nginx"]
        assert nginx is not None
        argv = [nginx, "-p", str(self.tmp), "-e", str(self.tmp / "upstream-error.log"), "-c", str(self.tmp / "upstream.conf")]
        proc = self.procs.start("upstream nginx", argv, self._log("upstream"), cpu=cpu)
        wait_ready(self.procs, proc, self.ports["upstream"], "/100b")
        return proc

    def start_sink(self) -> subprocess.Popen[bytes]:
        proc = self.procs.start("sink", [sys.executable, str(ROOT / "bench" / "sink.py"), str(self.ports["sink"])], self._log("sink"))
        self._listening(proc, self.ports["sink"], "the upload sink")
        return proc

    def start_metadata(self, lifetime: int, cpu: str | None) -> subprocess.Popen[bytes]:
        """bench/metadata.py: ID tokens that expire ``lifetime`` seconds after each fetch (``_listening`` waits for it)."""
        argv = [sys.executable, str(ROOT / "bench" / "metadata.py"), str(self.ports["metadata"]), str(lifetime)]
        return self.procs.start("fake metadata server", argv, self._log("metadata"), cpu=cpu)

    def _listening(self, proc: subprocess.Popen[bytes], port: int, what: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{what} exited:\n{self.procs.log_tail(proc)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        self.procs.stop(proc)
        raise BenchError(f"{what} did not start")

    def metadata_fetches(self) -> int:
        """Identity tokens the fake metadata server has served so far."""
        status, body = http_text(self.ports["metadata"], "/bench/fetches")
        if status != 200:
            raise BenchError(f"the fake metadata server answered {status} to /bench/fetches")
        return int(body)

    def metadata_env(self) -> dict[str, str]:
        """The proxy's environment for the refresh case: google-auth finds the fake metadata server."""
        env = {k: v for k, v in self.proxy_env().items() if not k.startswith("GCE_")}
        # google-auth reads GCE_METADATA_HOST for /computeMetadata/v1/... and GCE_METADATA_IP for the ping.
        env.update(GCE_METADATA_HOST=f"127.0.0.1:{self.ports['metadata']}", GCE_METADATA_IP=f"127.0.0.1:{self.ports['metadata']}")
        return env

    def start_target(self, target: str, cpu: str | None) -> tuple[subprocess.Popen[bytes] | None, int, float]:
        """Start a fresh proxy under test: (process, port, seconds to its first 200)."""
        if target == "direct":
            return None, self.ports["upstream"], 0.0
        if target == "nginx":
            nginx = self.tools["nginx"]
            assert nginx is not None
            argv = [nginx, "-p", str(self.tmp), "-e", str(self.tmp / "nginx-error.log"), "-c", str(self.tmp / "nginx.conf")]
            proc = self.procs.start("nginx proxy", argv, self._log("nginx-proxy"), cpu=cpu)
            return proc, self.ports["nginx"], self._ready(proc, self.ports["nginx"])
        if target == "go":
            assert self.goproxy is not None, "prepare(need_go=True) builds the Go peer"
            argv = [str(self.goproxy), "-listen", f"127.0.0.1:{self.ports['go']}", "-upstream", f"http://127.0.0.1:{self.ports['upstream']}"]
            proc = self.procs.start(LABELS[target], argv, self._log(target), cpu=cpu, env=self.proxy_env())
            return proc, self.ports["go"], self._ready(proc, self.ports["go"])
        if target in ("proxy", "proxy-metadata", "proxy-sa"):
            if target == "proxy-sa":
                self.start_token_endpoint()
            config_name, env = {
                "proxy": ("proxy.yaml", self.proxy_env()),
                "proxy-metadata": ("proxy-metadata.yaml", self.metadata_env()),
                "proxy-sa": ("proxy-sa.yaml", self.proxy_env()),
            }[target]
            argv = [sys.executable, "-m", "proxy", "--config", str(self.tmp / config_name), *self.args.proxy_arg]
            proc = self.procs.start(LABELS[target], argv, self._log(target), cpu=cpu, env=env)
            return proc, self.ports["proxy"], self._ready(proc, self.ports["proxy"])
        if target == "bare":
            # A bare aiohttp server on uvloop answering by itself: what the stack costs.
            port = free_port()
            argv = [sys.executable, str(ROOT / "bench" / "sink.py"), str(port), "--uvloop"]
            proc = self.procs.start(LABELS[target], argv, self._log(target), cpu=cpu)
            return proc, port, self._ready(proc, port)
        # --compare NAME=COMMAND: another proxy, for side-by-side figures.
        command = dict(self.args.compare)[target]
        port = free_port()
        config = self.tmp / f"{target}.yaml"
        config.write_text(PROXY_CONFIG.format(port=port, upstream=self.ports["upstream"], sink=self.ports["sink"]))
        argv = shlex.split(
            command.format(port=port, upstream=f"http://127.0.0.1:{self.ports['upstream']}", python=sys.executable, config=config)
        )
        proc = self.procs.start(target, argv, self._log(target), cpu=cpu, env=self.proxy_env())
        return proc, port, self._ready(proc, port)

    def _ready(self, proc: subprocess.Popen[bytes], port: int) -> float:
        try:
            return wait_ready(self.procs, proc, port, "/100b")
        except BenchError:
            self.procs.stop(proc)
            raise

    # ---- measurements

    def wrk(self, port: int, path: str, duration: int, connections: int, cpu: str | None) -> WrkResult:
        wrk = self.tools["wrk"]
        assert wrk is not None
        # wrk wants at least one connection per thread.
        argv = [wrk, f"-t{min(WRK_THREADS, connections)}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s", f"http://127.0.0.1:{port}/{path}"]
        if cpu is not None:
            argv = [str(self.tools["taskset"]), "-c", cpu, *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
        if done.returncode != 0:
            raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return parse_wrk(done.stdout)

    def measure(
        self,
        mode: str,
        size: str,
        target: str,
        connections: int = WRK_CONNECTIONS,
        *,
        record: bool = True,
        fetches: Callable[[], int] | None = None,
    ) -> Row:
        """One case: a fresh proxy, a warm-up, the measured wrk run.

        ``record``: add the row to the main table. ``fetches``: a counter read
        right before and after the measured run (the token fetches in the window).
        """
        load_cpu, proxy_cpu = ("0", "1") if mode == "pinned" else (None, None)
        proc, port, _ = self.start_target(target, proxy_cpu)
        try:
            status, length = http_get(port, f"/{size}")
            if status != 200 or length != SIZES[size]:
                raise BenchError(f"{LABELS.get(target, target)}: GET /{size} gave {status} with {length} bytes, wanted 200 with {SIZES[size]}")
            if self.args.warmup:
                self.wrk(port, size, self.args.warmup, connections, load_cpu)
            cpu0 = cpu_seconds(proc.pid) if proc else None
            fetched0 = fetches() if fetches else None
            result = self.wrk(port, size, self.args.duration, connections, load_cpu)
            row = Row(mode=mode, size=size, target=target, connections=connections, wrk=result)
            if fetches is not None and fetched0 is not None:
                row.token_fetches = fetches() - fetched0
            if proc is not None:
                assert cpu0 is not None
                row.cpu_s = cpu_seconds(proc.pid) - cpu0
                row.peak_rss_kib = memory_kib(proc.pid)["VmHWM"]
        finally:
            if proc is not None:
                self.procs.stop(proc)
        if record:
            self.results.rows.append(row)
        print(
            f"  {mode:<8} {size:<5} {LABELS.get(target, target):<16} c{connections:<4} {row.wrk.rps:>9.0f} req/s"
            f"  p50 {_fmt_ms(row.wrk.p50_ms)} p99 {_fmt_ms(row.wrk.p99_ms)}"
            + (f"  peak RSS {_fmt_mib(row.peak_rss_kib)}" if row.peak_rss_kib else "")
            + (f"  {row.token_fetches} token fetches" if row.token_fetches is not None else ""),
            flush=True,
        )
        return row

    def startup(self, runs: int = 3) -> None:
        times, idle = [], None
        for i in range(runs):
            proc, _, elapsed = self.start_target("proxy", None)
            assert proc is not None
            try:
                if i == 0:
                    time.sleep(1.0)
                    idle = memory_kib(proc.pid)["VmRSS"]
            finally:
                self.procs.stop(proc)
            times.append(elapsed)
        # The same with service-account key credentials (google-auth's key-file flow loaded).
        proc, _, sa_elapsed = self.start_target("proxy-sa", None)
        assert proc is not None
        try:
            time.sleep(1.0)
            idle_sa = memory_kib(proc.pid)["VmRSS"]
        finally:
            self.procs.stop(proc)
        floor = self.idle_floor()
        self.results.extras["startup"] = {
            "runs_s": times,
            "median_s": statistics.median(times),
            "idle_rss_kib": idle,
            "sa_startup_s": sa_elapsed,
            "idle_rss_sa_kib": idle_sa,
            "floor_rss_kib": floor,
        }
        print(
            f"  startup {statistics.median(times):.3f} s, idle RSS {_fmt_mib(idle)}; with the SA key {sa_elapsed:.3f} s, "
            f"idle RSS {_fmt_mib(idle_sa)} (bare aiohttp on uvloop {_fmt_mib(floor)})",
            flush=True,
        )

    def idle_floor(self) -> int:
        """Idle RSS of a bare aiohttp server on uvloop (bench/sink.py --uvloop), measured as the proxy's is.

        The floor for the proxy's idle figure: the stack it is built on, with
        no config, routes, identity, logging or metrics.
        """
        proc, _, _ = self.start_target("bare", None)
        assert proc is not None
        try:
            time.sleep(1.0)
            return memory_kib(proc.pid)["VmRSS"]
        finally:
            self.procs.stop(proc)

    def idle_connections(self, count: int) -> None:
        proc, port, _ = self.start_target("proxy", None)
        assert proc is not None
        socks: list[socket.socket] = []
        try:
            time.sleep(0.5)
            before = memory_kib(proc.pid)["VmRSS"]
            request = f"GET /100b HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                socks.append(s)
                s.sendall(request)
            for s in socks:
                _read_response(s)
            time.sleep(0.5)
            after = memory_kib(proc.pid)["VmRSS"]
        finally:
            for s in socks:
                s.close()
            self.procs.stop(proc)
        per = (after - before) / count
        self.results.extras["idleconn"] = {"connections": count, "before_kib": before, "after_kib": after, "per_connection_kib": per}
        print(f"  {count} idle connections: {per:.1f} KiB each", flush=True)

    def one_connection(self, mode: str) -> None:
        """100 B at one connection: the developer's curl or test suite. Rows of the main table."""
        for target in C1_TARGETS:
            if target == "go" and self.goproxy is None:
                continue
            if self.results.find(mode, "100b", target, 1) is None:
                self.measure(mode, "100b", target, 1)

    def many_connections(self, mode: str, connections: int) -> None:
        out = []
        # nginx-proxy and a bare aiohttp server: how much of the loss is the machine's and the stack's.
        for target in ("nginx", "bare", "proxy"):
            record = target != "bare"  # a reference for this extra only, not a row of the main table
            base = self.results.find(mode, "100b", target) or self.measure(mode, "100b", target, record=record)
            overflows0 = listen_overflows()
            row = self.measure(mode, "100b", target, connections, record=record)
            overflows1 = listen_overflows()
            out.append(
                {
                    "mode": mode,
                    "label": LABELS[target],
                    "connections": connections,
                    "rps": row.wrk.rps,
                    "rps_64": base.wrk.rps,
                    "ratio": row.wrk.rps / base.wrk.rps if base.wrk.rps else 0.0,
                    "p99_ms": row.wrk.p99_ms,
                    "p99_64_ms": base.wrk.p99_ms,
                    "peak_rss_kib": row.peak_rss_kib,
                    "cpu_us": row.cpu_us_per_req,
                    "cpu_us_64": base.cpu_us_per_req,
                    "listen_overflows": None if overflows0 is None or overflows1 is None else overflows1 - overflows0,
                }
            )
        self.results.extras["c1000"] = out

    def token_refresh(self, mode: str) -> None:
        """idtoken-proxy with a static token vs with metadata tokens that are refreshed during the run.

        The static figure is the main table's for this mode when this run measured
        it (as c1000 does), else it is measured right before. Same pinning for both;
        the fake metadata server shares CPU 0 with wrk and the upstream, so CPU 1
        carries only the proxy (its event loop and the worker thread google-auth
        fetches in).
        """
        static = self.results.find(mode, "100b", "proxy") or self.measure(mode, "100b", "proxy", record=False)
        metadata = self.start_metadata(self.lifetime, "0" if mode == "pinned" else None)
        try:
            self._listening(metadata, self.ports["metadata"], "the fake metadata server")
            refreshing = self.measure(mode, "100b", "proxy-metadata", record=False, fetches=self.metadata_fetches)
            total = self.metadata_fetches()
        finally:
            self.procs.stop(metadata)
        rows = []
        for row in (static, refreshing):
            w = row.wrk
            rows.append(
                {
                    "label": "static token" if row is static else "metadata, refreshing",
                    "rps": w.rps,
                    "p50_ms": w.p50_ms,
                    "p99_ms": w.p99_ms,
                    "requests": w.requests,
                    "errors": w.errors,
                    "non_2xx": w.non_2xx,
                    "token_fetches": row.token_fetches,
                }
            )
        p99_static, p99_refresh = static.wrk.p99_ms, refreshing.wrk.p99_ms
        self.results.extras["refresh"] = {
            "mode": mode,
            "lifetime_s": self.lifetime,
            "rows": rows,
            "p99_ratio": p99_refresh / p99_static if p99_static and p99_refresh is not None else None,
            "fetches_in_window": refreshing.token_fetches,
            "fetches_total": total,
        }

    def big_transfers(self) -> None:
        size = self.args.big_mib << 20
        out = []
        for via in ("direct", "proxy"):
            for what in ("download", "upload"):
                if via == "direct":
                    proc, port = None, self.ports["upstream" if what == "download" else "sink"]
                    path = "/big" if what == "download" else "/upload"
                else:
                    proc, port, _ = self.start_target("proxy", None)
                    path = "/big" if what == "download" else "/sink/upload"
                try:
                    before = memory_kib(proc.pid)["VmRSS"] if proc else None
                    sampler = RssSampler(proc.pid) if proc else None
                    if proc is None:
                        # The direct figures are only a throughput reference, and the first transfer
                        # after a long run is sometimes several times slower: run it once unmeasured.
                        (_download if what == "download" else _upload)(port, path, size)
                    start = time.perf_counter()
                    if sampler:
                        sampler.__enter__()
                    try:
                        ok, problem = (_download if what == "download" else _upload)(port, path, size)
                    finally:
                        if sampler:
                            sampler.__exit__()
                    elapsed = time.perf_counter() - start
                    entry: dict[str, Any] = {
                        "what": what,
                        "via": via,
                        "bytes": size,
                        "ok": ok,
                        "problem": problem,
                        "mib_s": size / (1 << 20) / elapsed,
                    }
                    if proc is not None and sampler is not None:
                        entry.update(rss_before_kib=before, rss_peak_kib=sampler.peak, hwm_kib=memory_kib(proc.pid)["VmHWM"])
                finally:
                    if proc is not None:
                        self.procs.stop(proc)
                out.append(entry)
                print(f"  {what} via {via}: {'ok' if ok else problem}, {entry['mib_s']:.0f} MiB/s", flush=True)
        self.results.extras["bigfile"] = out

    # ---- plan

    def run(self, modes: list[str], sizes: list[str], targets: list[str], extras: list[str]) -> None:
        self.prepare(need_big="bigfile" in extras, need_go="go" in targets or "c1" in extras)
        for mode in modes:
            wanted = bool(sizes and targets) or (any(x in extras for x in MODE_EXTRAS) and mode == modes[0])
            if not wanted:
                continue
            load_cpu = "0" if mode == "pinned" else None
            upstream = self.start_upstream(load_cpu)
            try:
                for size in sizes:
                    for target in targets:
                        try:
                            self.measure(mode, size, target)
                        except BenchError as e:
                            # One broken case should not cost the figures of the others.
                            self.results.failures.append(f"{mode} {size} {LABELS.get(target, target)}: {e}")
                            print(f"  {mode:<8} {size:<5} {LABELS.get(target, target):<14} FAILED: {e}", flush=True)
                if "c1" in extras and mode == modes[0]:
                    self.one_connection(mode)
                # Compared with the 64-connection figure of the same mode, so in the first mode only.
                if "c1000" in extras and mode == modes[0]:
                    self.many_connections(mode, self.args.many)
                # Compared with the static-token figure of the same mode, in the first mode too.
                if "refresh" in extras and mode == modes[0]:
                    self.token_refresh(mode)
            finally:
                self.procs.stop(upstream)
        rest = [e for e in extras if e not in MODE_EXTRAS]
        if rest:
            upstream = self.start_upstream(None)
            sink = self.start_sink() if "bigfile" in rest else None
            try:
                if "startup" in rest:
                    self.startup()
                if "idleconn" in rest:
                    self.idle_connections(self.args.many)
                if "bigfile" in rest:
                    self.big_transfers()
            finally:
                if sink is not None:
                    self.procs.stop(sink)
                self.procs.stop(upstream)


def _read_response(s: socket.socket) -> tuple[int, int]:
    """Read one response with a Content-Length from a blocking socket: (status, body bytes)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise BenchError("connection closed before the response head")
        buf += chunk
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(m.group(1)) if m else 0
    got = len(body)
    while got < length:
        chunk = s.recv(min(1 << 20, length - got))
        if not chunk:
            break
        got += len(chunk)
    return status, got


def _download(port: int, path: str, size: int) -> tuple[bool, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        status, got = _read_response(s)
    if status != 200 or got != size:
        return False, f"status {status}, {got} of {size} bytes"
    return True, ""


def _upload(port: int, path: str, size: int) -> tuple[bool, str]:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n".encode())
        left = size
        view = memoryview(chunk)
        while left:
            n = min(left, len(chunk))
            s.sendall(view[:n])
            left -= n
        buf = bytearray()
        while chunk_in := s.recv(65536):
            buf += chunk_in
            head, sep, body = bytes(buf).partition(b"\r\n\r\n")
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and m and len(body) >= int(m.group(1)):
                break
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    if status != 200 or body.strip() != str(size).encode():
        return False, f"status {status}, sink counted {body.strip()[:40]!r} of {size} bytes"
    return True, ""


# --------------------------------------------------------------------------- main


def find_tools(env: dict[str, str] | None = None) -> dict[str, str | None]:
    """nginx, wrk, taskset and go: from BENCH_NGINX / BENCH_WRK / BENCH_TASKSET / BENCH_GO if set, else from PATH."""
    env = dict(os.environ) if env is None else env
    tools: dict[str, str | None] = {}
    for name in ("nginx", "wrk", "taskset", "go"):
        given = env.get(f"BENCH_{name.upper()}")
        if given is not None:
            tools[name] = given if os.path.isfile(given) and os.access(given, os.X_OK) else None
            continue
        found = shutil.which(name)
        if found is None and name == "nginx":
            # Debian puts it in sbin, which is often not on a user's PATH.
            found = next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
        if found is None and name == "go":
            # Debian's golang-go links /usr/bin/go; upstream tarballs live here.
            found = next((p for p in ("/usr/lib/go/bin/go", "/usr/local/go/bin/go") if os.access(p, os.X_OK)), None)
        tools[name] = found
    return tools


def build_goproxy(tools: dict[str, str | None], out_dir: Path) -> Path:
    """``go build`` bench/goproxy (stdlib only, no network) into ``out_dir``; the binary's path."""
    go = tools.get("go")
    if not go:
        raise BenchError(f"go not found; install with: {GO_HINT}")
    binary = out_dir / "goproxy"
    env = {
        **os.environ,
        # No module downloads (there are no requirements), no toolchain switch, no telemetry.
        "GOPROXY": "off",
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
        "GOTELEMETRY": "off",
        # The build cache outlives the run (a rebuild takes a second), in the temp dir, not in HOME.
        "GOCACHE": os.environ.get("GOCACHE") or str(Path(tempfile.gettempdir()) / "idtoken-bench-gocache"),
        "GOPATH": str(out_dir / "gopath"),
    }
    done = subprocess.run([go, "build", "-o", str(binary), "."], cwd=GOPROXY_SRC, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise BenchError(f"go build of {GOPROXY_SRC} failed ({done.returncode}):\n{done.stderr.strip()}")
    return binary


def machine_info(tools: dict[str, str | None]) -> dict[str, str]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for name in ("aiohttp", "uvloop", "multidict", "yarl"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing package just leaves its version out
            versions[name] = "-"
    nginx_v = subprocess.run([str(tools["nginx"]), "-v"], capture_output=True, text=True).stderr.strip().rpartition("/")[2] if tools["nginx"] else "-"
    wrk_v = subprocess.run([str(tools["wrk"]), "-v"], capture_output=True, text=True).stdout.split("\n")[0].split(" [")[0] if tools["wrk"] else "-"
    go_v = subprocess.run([str(tools["go"]), "version"], capture_output=True, text=True).stdout.split()[2:3] if tools.get("go") else []
    return {
        "cpu": model or platform.machine(),
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
        "nginx": nginx_v,
        "wrk": wrk_v,
        "go": go_v[0] if go_v else "-",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _name_command(value: str) -> tuple[str, str]:
    name, sep, command = value.partition("=")
    if not sep or not name or not command or not re.fullmatch(r"[a-z0-9_-]+", name):
        raise argparse.ArgumentTypeError(f"use NAME=COMMAND with a lower-case NAME, got {value!r}")
    return name, command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = ", ".join((*MODES, *SIZES, *TARGETS, *EXTRAS))
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Measure idtoken-proxy against direct access and nginx as a reverse proxy, and print the ratios.",
        epilog=(
            f"--only takes names from: {names}. Within each group (modes, sizes, targets) naming none means all; "
            "extras run only when named (or when --only is not given at all; --quick skips them). "
            f"Needs nginx and wrk: {INSTALL_HINT}."
        ),
    )
    p.add_argument("--quick", action="store_true", help="short smoke run: 2 s per case, no warm-up, no extras unless named")
    p.add_argument("--duration", type=int, help="seconds of load per case (default 10, --quick 2)")
    p.add_argument("--warmup", type=int, help="seconds of unmeasured load before each case (default 1, --quick 0)")
    p.add_argument("--only", default="", help="comma-separated subset, e.g. unpinned,100b,nginx,proxy")
    p.add_argument("--many", type=int, default=1000, help="connections for the c1000 and idleconn extras (default 1000)")
    p.add_argument(
        "--token-lifetime",
        type=int,
        metavar="SECONDS",
        help="lifetime of the fake metadata server's ID tokens in the refresh extra (default 5 + duration/2, at least 8)",
    )
    p.add_argument("--big-mib", type=int, default=1024, help="size of the bigfile upload and download in MiB (default 1024)")
    p.add_argument("--proxy-arg", action="append", default=[], metavar="ARG", help="extra argument for idtoken-proxy (repeatable), e.g. --proxy-arg=--log-level=warning")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        type=_name_command,
        help=(
            "another proxy to measure beside the others (repeatable); COMMAND may use {port}, {upstream}, {python} "
            "and {config} (an idtoken-proxy config for {port} with the static token)"
        ),
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs and logs)")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 2 if args.quick else 10
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.duration < 1:
        p.error("--duration must be at least 1 (wrk takes whole seconds)")
    if args.token_lifetime is not None and args.token_lifetime < 7:
        p.error("--token-lifetime must be at least 7 (the proxy never sends a token with 5 s or less left)")
    only = [x.strip().lower() for x in args.only.split(",") if x.strip()]
    known = {*MODES, *SIZES, *TARGETS, *EXTRAS, *(name for name, _ in args.compare)}
    unknown = [x for x in only if x not in known]
    if unknown:
        p.error(f"--only: unknown name(s) {', '.join(unknown)}; choose from {names}")
    args.only = only
    return args


def plan(args: argparse.Namespace) -> tuple[list[str], list[str], list[str], list[str]]:
    only = args.only
    compare = [name for name, _ in args.compare]

    def pick(group: tuple[str, ...] | list[str]) -> list[str]:
        chosen = [x for x in group if x in only]
        return chosen or list(group)

    modes, sizes = pick(MODES), pick(SIZES)
    targets = pick([*TARGETS, *compare])
    if only or args.quick:
        extras = [x for x in EXTRAS if x in only]
    else:
        extras = list(EXTRAS)
    if only and not any(x in only for x in (*MODES, *SIZES, *TARGETS, *compare)):
        # Only extras named: no main table (c1000 still needs a mode to run in).
        sizes, targets = [], []
    return modes, sizes, targets, extras


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes, sizes, targets, extras = plan(args)
    tools = find_tools()
    missing = [name for name in ("nginx", "wrk") if not tools[name]]
    if missing:
        print(f"bench: {' and '.join(missing)} not found; install with: {INSTALL_HINT}", file=sys.stderr)
        return 3
    if ("go" in targets or "c1" in extras) and not tools["go"]:
        print(f"bench: go not found (for the Go peer); install with: {GO_HINT}", file=sys.stderr)
        return 3
    if "pinned" in modes and (not tools["taskset"] or (os.cpu_count() or 1) < 2):
        print("bench: pinned mode needs taskset (util-linux) and two CPUs; skipping it", file=sys.stderr)
        modes = [m for m in modes if m != "pinned"]

    # SIGTERM ends us like Ctrl-C does, so the finally below stops every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Byte-compile the package first, as installing it does: with PYTHONDONTWRITEBYTECODE
    # set (CI images, containers) every start would compile it again, inflating startup
    # time and idle RSS with work an installed proxy never does.
    compileall.compile_dir(str(ROOT / "proxy"), quiet=1)
    tmp = Path(tempfile.mkdtemp(prefix="idtoken-bench-"))
    bench = Bench(args, tools, tmp)
    m = bench.results.machine
    print(f"machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}; Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}; nginx {m['nginx']}; {m['wrk']}; {m['go']}")
    print(f"plan: modes {','.join(modes) or '-'}; sizes {','.join(sizes)}; targets {','.join(targets)}; extras {','.join(extras) or '-'}; {args.duration} s per case")
    try:
        bench.run(modes, sizes, targets, extras)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        bench.procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_tables(bench.results, args)
    if args.json:
        data = {
            "machine": bench.results.machine,
            "rows": [asdict(r) | {"cpu_us_per_req": r.cpu_us_per_req} for r in bench.results.rows],
            "extras": bench.results.extras,
            "failures": bench.results.failures,
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.keep:
        print(f"\nconfigs and logs kept in {tmp}")
    if bench.results.failures:
        print("\n== failed cases", file=sys.stderr)
        for line in bench.results.failures:
            print(f"bench: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
