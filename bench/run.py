#!/usr/bin/env python3
"""framegate's benchmark: framegate beside NGINX and HAProxy, in one run, on loopback.

Installs nginx and haproxy if missing (Debian packages), builds the harness in release mode,
starts one echo upstream and every proxy in front of it with a generated config, then
interleaves the runs (direct, nginx, haproxy, framegate, framegate with Lua policies) so that
drift on a shared machine hits all alike, repeats them, and prints one table of medians with
their spread (min-max) and ratios. Everything is bounded in time and count; it stops by itself
and ends only the processes it started.

    python3 bench/run.py                 # the full run (about 15 minutes)
    python3 bench/run.py --quick         # one repetition, short runs (about 3 minutes)
    python3 bench/run.py --baseline OLD  # also runs the framegate binary OLD (say, the previous
                                         # main's release build) as "base" and "base+lua", so a
                                         # change is measured against it in the same run
    python3 bench/run.py --only tls      # just the wss:// part: framegate, NGINX and HAProxy
                                         # terminating TLS 1.3 with the same certificates
    python3 bench/run.py --only pool     # just the [[upstream]] pools part (about a minute)
    python3 bench/run.py --only deflate  # just permessage-deflate (issue 16 section 3; about 2 minutes)
    python3 bench/run.py --only fleet    # just the fleet: gw.shared and gw.limit on a redis-server (issue 17)

The tls part makes a throwaway ECDSA P-256 and RSA 2048 certificate with openssl, starts one more
NGINX, HAProxy and framegate, each terminating TLS 1.3 for both (one port per certificate) in
front of the same echo upstream, and measures full wss:// handshakes per second (no session
resumption) and messages per second at 64 B and 1 KiB. It gets its own table.

The pool part (`--only pool`) starts ten more echo upstreams and its own framegate instances,
each with an admin listener on loopback, and measures [[upstream]] pools: handshakes per second
through a 3-endpoint pool in each balance mode against a single upstream (same gateway, same
run); failover, with 100 new connections per second while one of three endpoints is killed;
and how many `hash` keys move when one of ten endpoints leaves the pool by a reload. It gets
its own table.

The deflate part (`--only deflate`) starts a compressing echo (`fg-echo --deflate`), a plain
one, and three framegate instances (2 workers each) whose only route differs in compression:
`fg+deflate` (`compression = true`, to the compressing echo: both legs compress), `fg-json`
(`compression = false`, to the same echo: nothing is compressed) and `fg+deflate-client`
(`compression = true`, to the plain echo, which declines: the client leg only, a browser in
front of an upstream that does not compress). The same client, `fg-load --deflate` (which
offers permessage-deflate with no context takeover and sends realistic 1 KiB JSON text),
loads all three: messages per second, the gateway's CPU per echoed message, the bytes on the
client's wire per message, and the RSS per idle connection (each having echoed one message)
on a fresh gateway. It gets its own table.

The fleet part (`--only fleet`, issue 17) starts a redis-server (loopback, no persistence), a
proxy that adds 1 ms to each request on its way to it, an echo, and three framegate instances
that differ only in `[shared]`: `fg-local` (the in-process dictionary), `fg-redis` (Redis on
loopback) and `fg-redis+1ms` (Redis through the proxy). It measures handshakes per second on a
route whose on_upgrade does one `gw.shared:incr`, and messages per second through a frame policy
limiting with `gw.limit` (a bucket never empty) against one limiting with a `conn.state` counter,
the local way. It gets its own table.
"""
import argparse, collections, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time
import urllib.parse, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where `cargo build --release` below puts the binaries: CARGO_TARGET_DIR, when set, else target/.
BIN = os.path.join(os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")), "release")
ECHO_PORT = 19000
TARGETS = {  # name -> port
    "direct": ECHO_PORT,
    "nginx": 19001,
    "haproxy": 19002,
    "framegate": 19003,
    "fg+lua": 19004,      # trivial on_client_frame and on_server_frame
    "fg+json": 19005,     # JSON decode-modify-encode on_client_frame
    "fg+auth": 19006,     # on_upgrade token check
    "fg+expiry": 19007,   # on_upgrade sets each connection's lifetime from ?ttl=
    "fg+jwt": 19010,      # [route.jwt]: RS256 with a key file; one token (verified once, then cached); the
                          # handshakes part also runs "fg+jwt-new" on it: a token never seen on each connection
    "fg+schema": 19017,   # [route.validate]: client messages checked against schemas/chat-in.json
    "fg+cap-meta": 19030,  # [route.capture] mode = "metadata": every message recorded, no payload
    "fg+cap-payload": 19031,  # [route.capture] mode = "payload": with its first 4 KiB
}
BASELINE_TARGETS = {  # with --baseline: the same two set-ups on the older binary
    "base": 19008,
    "base+lua": 19009,
}
TLS_TARGETS = {  # name -> (port with the ECDSA P-256 certificate, port with the RSA 2048 one)
    "nginx": (19011, 19012),
    "haproxy": (19013, 19014),
    "framegate": (19015, 19016),
}
TLS_KINDS = (("ecdsa", "ECDSA P-256", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
             ("rsa", "RSA 2048", ["-newkey", "rsa:2048"]))
POOL_ECHO_PORTS = list(range(19100, 19110))  # the pool part's echo upstreams; the 3-endpoint pools use the first three
POOL_SINGLE_PORT = 19110                      # the single upstream: three echo processes sharing the address (SO_REUSEPORT)
POOL_PORT, POOL_ADMIN = 19120, 19130          # the balance modes' gateway and its admin listener
FAILOVER_PORT, FAILOVER_ADMIN = 19121, 19131  # failover
HASH_PORT, HASH_ADMIN = 19122, 19132          # hash key movement
DEFLATE_TARGETS = {  # name -> (gateway port, compression, upstream port)
    "fg-json": (19019, False, 19021),            # nothing compressed: the same client and echo, uncompressed
    "fg+deflate": (19018, True, 19021),          # both legs compress (fg-echo --deflate upstream)
    "fg+deflate-client": (19020, True, 19022),   # the client leg only (plain fg-echo declines)
}
DEFLATE_ECHO_PORT, PLAIN_ECHO_PORT = 19021, 19022
FLEET_REDIS_PORT, FLEET_DELAY_PORT, FLEET_ECHO_PORT = 19140, 19141, 19145
FLEET_TARGETS = {  # name -> (gateway port, [shared] table): issue 17's fleet on a real redis-server
    "fg-local": (19142, ""),
    "fg-redis": (19143, f'[shared]\nbackend = "redis"\nurl = "redis://127.0.0.1:{FLEET_REDIS_PORT}/0"\n'),
    "fg-redis+1ms": (19144, f'[shared]\nbackend = "redis"\nurl = "redis://127.0.0.1:{FLEET_DELAY_PORT}/0"\n'
                            'timeout = "100ms"\n'),  # through a proxy adding 1 ms to each request
}
POOL_TARGETS = ["single", "round_robin", "least_connections", "random_two", "hash"]  # routes of the balance modes' gateway
FAILOVER_RATE = 100  # new connections per second
TOKEN = "bench-token"
JWT = None  # the RS256 token fg+jwt wants, made by jwt_key()
JWT_SIGN = None  # sub -> a new RS256 token, set by jwt_key()
started = []


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def ensure_packages():
    missing = [p for p, exe in (("nginx-light", "nginx"), ("haproxy", "haproxy")) if not shutil.which(exe) and not os.path.exists("/usr/sbin/" + exe)]
    if missing:
        log("installing", " ".join(missing))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sh(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        sh(["apt-get", "install", "-y", "-q"] + missing, env=env, stdout=subprocess.DEVNULL)


def build():
    log("building the harness and framegate (release)")
    sh(["cargo", "build", "--release", "-q", "--bin", "framegate"], cwd=ROOT)
    sh(["cargo", "build", "--release", "-q", "-p", "framegate-bench", "--bins"], cwd=ROOT)


COMMANDS = {}  # name -> (cmd, kw), to start a fresh process for memory runs


def start(cmd, name, **kw):
    COMMANDS[name] = (cmd, kw)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, name + ".log"), "a"), **kw)
    started.append(p)
    return p


def restart(name, proc, port):
    """Stops `proc` and starts the same command again: memory runs need a fresh heap, or a
    second run reuses what the first one grew and shows almost nothing."""
    end(proc)
    while True:  # until the port is free again
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            time.sleep(0.05)
        except OSError:
            break
    cmd, kw = COMMANDS[name]
    fresh = start(cmd, name, **kw)
    wait_port(port)
    return fresh


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def write(name, text):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def nginx_conf():
    return write("nginx.conf", f"""
worker_processes 2;
worker_rlimit_nofile 20000;
pid {WORK}/nginx.pid;
error_log {WORK}/nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {WORK}/nginx-body;
  proxy_temp_path {WORK}/nginx-proxy;
  upstream echo {{ server 127.0.0.1:{ECHO_PORT}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{TARGETS['nginx']} backlog=4096;
    location / {{
      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }}
  }}
}}
""")


def haproxy_conf():
    return write("haproxy.cfg", f"""
global
  maxconn 9900
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend ws
  bind 127.0.0.1:{TARGETS['haproxy']}
  default_backend echo
backend echo
  server s1 127.0.0.1:{ECHO_PORT}
""")


def framegate_conf(name, port, policies="", routes=""):
    return write(name + ".toml", f"""
[server]
listen = ["127.0.0.1:{port}"]
max_connections = 20000
{routes}
[[route]]
path = "/{{*rest}}"
upstream = "ws://127.0.0.1:{ECHO_PORT}/"
max_message_size = "16MiB"
{policies}
""")


def scripts():
    trivial = write("trivial.lua", "return function(msg, ctx, conn) return nil end\n")
    json = write("json.lua", "return function(msg, ctx, conn) local m = msg.json if m then m.seen = true return m end end\n")
    auth = write("auth.lua", f"""return function(req, ctx)
  if req.headers["authorization"] ~= "Bearer {TOKEN}" then return req:reject(401, "no") end
  ctx.user = "bench"
end
""")
    expiry = write("expiry.lua", "return function(req, ctx) req:expire_in(tonumber(req.query.ttl)) end\n")
    return trivial, json, auth, expiry


def jwt_key():
    """An RSA key pair made with openssl, and RS256 tokens signed with it (valid for a day):
    returns the public key's path for `public_key_file`; sets JWT (one token, which the
    gateway verifies once and then finds in its route's cache of verified tokens) and
    JWT_SIGN, which makes more (see jwt_tokens)."""
    global JWT, JWT_SIGN
    import base64, hashlib, json, re
    key, pub = os.path.join(WORK, "jwt.key"), os.path.join(WORK, "jwt.pem")
    sh(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key], stderr=subprocess.DEVNULL)
    sh(["openssl", "pkey", "-in", key, "-pubout", "-out", pub])
    text = sh(["openssl", "rsa", "-in", key, "-noout", "-text"], capture_output=True).stdout.decode()
    num = lambda name: int(re.search(name + r":\s*((?:\s*[0-9a-f]{2}:?)+)", text).group(1).replace(":", "").replace(" ", "").replace("\n", ""), 16)
    n, p_, q, dp, dq, qinv = (num(x) for x in ("modulus", "prime1", "prime2", "exponent1", "exponent2", "coefficient"))
    k = (n.bit_length() + 7) // 8
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420")  # PKCS#1 v1.5, SHA-256

    def sign(data):
        t = digest_info + hashlib.sha256(data).digest()
        m = int.from_bytes(b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t, "big")
        m1, m2 = pow(m, dp, p_), pow(m, dq, q)
        return (m2 + q * ((qinv * (m1 - m2)) % p_)).to_bytes(k, "big")

    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())

    def token(sub):
        claims = {"sub": sub, "aud": "bench", "exp": int(time.time()) + 86400}
        signing_input = head + "." + b64(json.dumps(claims).encode())
        return signing_input + "." + b64(sign(signing_input.encode()))

    JWT, JWT_SIGN = token("bench"), token
    # The hand-made signatures must verify (openssl exits non-zero otherwise).
    with open(os.path.join(WORK, "jwt-check.sig"), "wb") as f:
        f.write(sign(b"check"))
    sh(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", f.name], input=b"check", capture_output=True)
    return pub


def jwt_tokens(rep, count):
    """A file of `count` tokens no earlier repetition used, each for another `sub`: the
    gateway verifies each in full (its cache of verified tokens has never seen them)."""
    path = os.path.join(WORK, f"jwt-{rep}.txt")
    with open(path, "w") as f:
        f.writelines(JWT_SIGN(f"user-{rep}-{i}") + "\n" for i in range(count))
    return path


def start_all(baseline=None):
    ulimit = ["prlimit", "--nofile=20000:20000", "--"]
    start(ulimit + [os.path.join(BIN, "fg-echo"), "--listen", f"127.0.0.1:{ECHO_PORT}", "--threads", "1"], "echo")
    os.makedirs(os.path.join(WORK, "nginx-body"), exist_ok=True)
    procs = {}
    procs["nginx"] = start(ulimit + ["nginx", "-c", nginx_conf(), "-g", "daemon off;"], "nginx")
    procs["haproxy"] = start(ulimit + ["haproxy", "-f", haproxy_conf(), "-db"], "haproxy")
    trivial, json, auth, expiry = scripts()
    jwt_pub = jwt_key()
    env = dict(os.environ, FRAMEGATE_LOG="warn")
    fg = os.path.join(BIN, "framegate")
    # The HTTP pass-through part's route, on "framegate" only (an older --baseline binary may
    # not know `http`).
    http_route = f'[[route]]\npath = "/http"\nupstream = "ws://127.0.0.1:{ECHO_PORT}/http"\nhttp = "proxy"\n'
    procs["framegate"] = start(ulimit + [fg, "--config", framegate_conf("framegate", TARGETS["framegate"], "", http_route)], "framegate", env=env)
    for name, pol in (
        ("fg+lua", f'[route.policies]\non_client_frame = "{trivial}"\non_server_frame = "{trivial}"'),
        ("fg+json", f'[route.policies]\non_client_frame = "{json}"'),
        ("fg+auth", f'[route.policies]\non_upgrade = "{auth}"'),
        ("fg+expiry", f'expire = "1h"\n[route.policies]\non_upgrade = "{expiry}"'),
        ("fg+jwt", f'[route.jwt]\npublic_key_file = "{jwt_pub}"\naudience = "bench"'),
        ("fg+schema", f'[route.validate]\nclient = "{os.path.join(ROOT, "schemas", "chat-in.json")}"'),
        ("fg+cap-meta", '[route.capture]\nmode = "metadata"'),
        ("fg+cap-payload", '[route.capture]\nmode = "payload"'),
    ):
        procs[name] = start(ulimit + [fg, "--config", framegate_conf(name, TARGETS[name], pol)], name, env=env)
    if baseline:
        TARGETS.update(BASELINE_TARGETS)
        for name, pol in (
            ("base", ""),
            ("base+lua", f'[route.policies]\non_client_frame = "{trivial}"\non_server_frame = "{trivial}"'),
        ):
            procs[name] = start(ulimit + [baseline, "--config", framegate_conf(name, TARGETS[name], pol)], name, env=env)
    for port in TARGETS.values():
        wait_port(port)
    return procs


def fg_load_cmd(target, bearer_file=None):
    """The load generator's command line for `target` (with the token `fg+auth` or `fg+jwt`
    wants; with `bearer_file`, a token of that file on each connection instead)."""
    url = f"ws://127.0.0.1:{TARGETS[target]}/"
    cmd = ["prlimit", "--nofile=20000:20000", "--", os.path.join(BIN, "fg-load"), "--url", url]
    if target == "fg+auth":
        cmd += ["--header", f"authorization: Bearer {TOKEN}"]
    if bearer_file:
        cmd += ["--bearer-file", bearer_file]
    elif target == "fg+jwt":
        cmd += ["--header", f"authorization: Bearer {JWT}"]
    return cmd


def load(target, *args, timeout=120, cmd=None):
    out = subprocess.run((cmd or fg_load_cmd(target)) + list(args), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        log(f"  {target}: {out.stderr.strip()}")
        return None
    return dict(kv.split("=") for kv in out.stdout.split() if "=" in kv)


def process_tree(pid):
    """pid and all its descendants (NGINX's workers)."""
    todo = [pid]
    while todo:
        p = todo.pop()
        yield p
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass


def rss_kb(pid):
    """Resident set size of pid, in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def cpu_seconds(pid):
    """User + system CPU time of pid, in seconds (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_rss_kb(pid):
    return sum(rss_kb(p) for p in process_tree(pid))


def process_tree_cpu_seconds(pid):
    return sum(cpu_seconds(p) for p in process_tree(pid))


def with_open_connections(target, count, while_open, settle, cmd=None, extra=()):
    """Opens `count` connections through `target` (64 at a time; `cmd`: another load command,
    such as a wss:// one; `extra`: more options of the `connections` mode), calls
    `while_open()` once the last one is answered, then closes them and waits `settle` seconds
    for the proxy to let go. Returns (handshakes/s or None, what `while_open` returned)."""
    p = subprocess.Popen((cmd or fg_load_cmd(target)) + ["connections", "--count", str(count), "--concurrency", "64", "--hold", "60s", *extra],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    started.append(p)
    result, deadline = {}, time.time() + 90
    for line in p.stdout:
        if line.strip() == "READY" or time.time() > deadline:
            break
        result.update(kv.split("=") for kv in line.split() if "=" in kv)
    measured = while_open()
    p.stdin.close()
    p.wait(timeout=30)
    time.sleep(settle)
    return (float(result["handshakes_per_sec"]) if "handshakes_per_sec" in result else None), measured


def idle_run(target, proc, count, cmd=None):
    """Opens `count` idle connections through `target` (or with the load command `cmd`); returns
    (handshakes/s, RSS KB per connection)."""
    before = process_tree_rss_kb(proc.pid)

    def settled_rss():
        time.sleep(1.0)  # let the proxy settle; RSS is read while every connection is open
        return process_tree_rss_kb(proc.pid)

    hs, after = with_open_connections(target, count, settled_rss, settle=1.0, cmd=cmd)
    return hs, (after - before) * 1024 / count / 1000 if hs is not None else None


def handshake_run(target, proc, count, cmd=None):
    """Opens `count` connections through `target` (or with the load command `cmd`), then closes
    them. Returns the handshakes per second and the proxy's CPU time per handshake in µs, counted
    from the first connection to the last one answered (closing is not counted)."""
    before = process_tree_cpu_seconds(proc.pid)
    hs, after = with_open_connections(target, count, lambda: process_tree_cpu_seconds(proc.pid), settle=0.5, cmd=cmd)
    return hs, (after - before) * 1e6 / count if hs is not None else None


def expiry_run(proc, count):
    """`count` connections with lifetimes spread over 10 s: lateness of each close, and the
    gateway's CPU use while it waits for the deadlines."""
    cmd = fg_load_cmd("fg+expiry") + ["expiry", "--count", str(count), "--base", "5s", "--spread", "10s"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    started.append(p)
    result = {}
    cpu_start = wall_start = None
    for line in p.stdout:
        if line.strip() == "READY":
            cpu_start, wall_start = cpu_seconds(proc.pid), time.time()
            continue
        result.update(kv.split("=") for kv in line.split() if "=" in kv)
    p.wait(timeout=60)
    if cpu_start is not None:
        result["cpu_pct_while_waiting"] = 100 * (cpu_seconds(proc.pid) - cpu_start) / (time.time() - wall_start)
    return result


def tls_certificates():
    """A throwaway certificate of each kind in TLS_KINDS: kind -> (cert file, key file, both in
    one file for HAProxy)."""
    certs = {}
    for kind, _, newkey in TLS_KINDS:
        cert, key = os.path.join(WORK, kind + ".pem"), os.path.join(WORK, kind + ".key")
        sh(["openssl", "req", "-x509", *newkey, "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        with open(cert) as c, open(key) as k:
            both = write(kind + ".both.pem", c.read() + k.read())
        certs[kind] = (cert, key, both)
    return certs


def nginx_tls_conf(certs):
    servers = "".join(f"""
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_certificate {certs[kind][0]};
    ssl_certificate_key {certs[kind][1]};
    ssl_protocols TLSv1.3;
    ssl_session_tickets off;
    location / {{
      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }}
  }}""" for (kind, _, _), port in zip(TLS_KINDS, TLS_TARGETS["nginx"]))
    return write("nginx-tls.conf", f"""
worker_processes 2;
worker_rlimit_nofile 20000;
pid {WORK}/nginx-tls.pid;
error_log {WORK}/nginx-tls-error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {WORK}/nginx-tls-body;
  proxy_temp_path {WORK}/nginx-tls-proxy;
  upstream echo {{ server 127.0.0.1:{ECHO_PORT}; keepalive 16; }}
{servers}
}}
""")


def haproxy_tls_conf(certs):
    frontends = "".join(f"""
frontend wss_{kind}
  bind 127.0.0.1:{port} ssl crt {certs[kind][2]} alpn http/1.1 ssl-min-ver TLSv1.3 no-tls-tickets
  default_backend echo
""" for (kind, _, _), port in zip(TLS_KINDS, TLS_TARGETS["haproxy"]))
    return write("haproxy-tls.cfg", f"""
global
  maxconn 9900
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
{frontends}
backend echo
  server s1 127.0.0.1:{ECHO_PORT}
""")


def framegate_tls_conf(certs):
    listeners = "".join(f"""
[[server.tls]]
listen = "127.0.0.1:{port}"
cert_file = "{certs[kind][0]}"
key_file = "{certs[kind][1]}"
min_version = "1.3"
""" for (kind, _, _), port in zip(TLS_KINDS, TLS_TARGETS["framegate"]))
    return write("framegate-tls.toml", f"""
[server]
listen = []
max_connections = 20000
{listeners}
[[route]]
path = "/{{*rest}}"
upstream = "ws://127.0.0.1:{ECHO_PORT}/"
max_message_size = "16MiB"
""")


def start_tls():
    """NGINX, HAProxy and framegate terminating TLS 1.3 in front of the echo upstream (which
    start_all started); returns name -> process."""
    certs = tls_certificates()
    os.makedirs(os.path.join(WORK, "nginx-tls-body"), exist_ok=True)
    ulimit = ["prlimit", "--nofile=20000:20000", "--"]
    env = dict(os.environ, FRAMEGATE_LOG="warn")
    procs = {
        "nginx": start(ulimit + ["nginx", "-c", nginx_tls_conf(certs), "-g", "daemon off;"], "nginx-tls"),
        "haproxy": start(ulimit + ["haproxy", "-f", haproxy_tls_conf(certs), "-db"], "haproxy-tls"),
        "framegate": start(ulimit + [os.path.join(BIN, "framegate"), "--config", framegate_tls_conf(certs)],
                           "framegate-tls", env=env),
    }
    for ports in TLS_TARGETS.values():
        for port in ports:
            wait_port(port)
    return procs


def tls_load_cmd(port):
    return ["prlimit", "--nofile=20000:20000", "--", os.path.join(BIN, "fg-load"), "--url", f"wss://127.0.0.1:{port}/"]


def tls_part(args):
    """The wss:// part: (metric, proxy) -> [values]. Skipped, with a log line, if a proxy cannot
    terminate TLS here (say, an NGINX built without its SSL module)."""
    results = {}
    try:
        procs = start_tls()
    except (subprocess.SubprocessError, OSError, SystemExit) as e:
        log(f"tls part skipped: {e}")
        return results
    names = list(TLS_TARGETS)
    count = 3000 if not args.quick else 1000
    # Memory first, on fresh processes: idle wss:// connections (ECDSA certificate).
    for t in names:
        _, rss = idle_run(t, procs[t], args.idle, cmd=tls_load_cmd(TLS_TARGETS[t][0]))
        results.setdefault((f"RSS KB/idle wss conn ({args.idle}, fresh process)", t), []).append(rss)
    for rep in range(args.reps):
        log(f"tls repetition {rep + 1}/{args.reps}")
        order = names[rep % len(names):] + names[:rep % len(names)]
        for i, (_, title, _) in enumerate(TLS_KINDS):
            for t in order:
                hs, cpu = handshake_run(t, procs[t], count, cmd=tls_load_cmd(TLS_TARGETS[t][i]))
                results.setdefault((f"wss handshakes/s, TLS 1.3 {title}", t), []).append(hs)
                results.setdefault((f"proxy CPU us/wss handshake, {title}", t), []).append(cpu)
        for size in (64, 1024):
            for t in order:
                r = load(t, "throughput", "--size", str(size), "--duration", args.duration, "--connections", "4",
                         "--inflight", "32", cmd=tls_load_cmd(TLS_TARGETS[t][0]))
                results.setdefault((f"wss msg/s {size}B", t), []).append(float(r["msgs_per_sec"]) if r else None)
    return results


def report_tls(results, args):
    metrics = list(dict.fromkeys(m for m, _ in results))
    targets = list(TLS_TARGETS)
    print(f"\nwss:// (each proxy terminating TLS 1.3, same certificates, full handshakes): medians of {args.reps}, spread min-max\n")
    print("| metric | " + " | ".join(targets) + " | framegate/nginx | framegate/haproxy |")
    print("|" + "---|" * (len(targets) + 3))
    for m in metrics:
        cells, med = [], {}
        for t in targets:
            med[t], lo, hi = summary(results.get((m, t), []))
            cells.append("" if med[t] is None else f"{fmt(med[t])} [{fmt(lo)}-{fmt(hi)}]")
        for peer in ("nginx", "haproxy"):
            cells.append(f"{med['framegate'] / med[peer]:.2f}x" if med.get("framegate") and med.get(peer) else "")
        print(f"| {m} | " + " | ".join(cells) + " |")


def admin(port, path, method="GET"):
    """One request to a framegate admin listener on loopback (no token there): the body, as text.
    No proxy from the environment is asked."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method), timeout=10) as r:
        return r.read().decode()


def upstream_metrics(port, pool):
    """The pool's series on the gateway's /metrics: ({endpoint port: {"up", "open", "failures"
    (all kinds)}}, retries)."""
    endpoints, retries = {}, 0
    for line in admin(port, "/metrics").splitlines():
        if not line.startswith("framegate_upstream_") or f'pool="{pool}"' not in line:
            continue
        series, value = line.rsplit(" ", 1)
        if series.startswith("framegate_upstream_retries_total"):
            retries = int(float(value))
            continue
        url = series.split('endpoint="', 1)[1].split('"', 1)[0]
        e = endpoints.setdefault(urllib.parse.urlsplit(url).port, {"up": 0, "open": 0, "failures": 0})
        if series.startswith("framegate_upstream_endpoint_up"):
            e["up"] = int(float(value))
        elif series.startswith("framegate_upstream_connections_open"):
            e["open"] = int(float(value))
        elif series.startswith("framegate_upstream_failures_total"):
            e["failures"] += int(float(value))
    return endpoints, retries


def pool_table(name, ports, balance, more=""):
    """An [[upstream]] pool of `ws://127.0.0.1:PORT` endpoints (`hash` keys on `?k=`), with
    `more` (keys and sub-tables) after it."""
    endpoints = ", ".join(f'"ws://127.0.0.1:{p}"' for p in ports)
    hash_key = 'hash_key = "query:k"\n' if balance == "hash" else ""
    return f'\n[[upstream]]\nname = "{name}"\nendpoints = [{endpoints}]\nbalance = "{balance}"\n{hash_key}{more}'


def pool_conf(name, port, admin_port, pools, routes):
    """A framegate config with an admin listener (loopback, no token), `pools` and `routes`."""
    return write(name + ".toml", f"""
[server]
listen = ["127.0.0.1:{port}"]
max_connections = 20000

[admin]
listen = "127.0.0.1:{admin_port}"
{pools}
{routes}
""")


def pool_route(path, upstream):
    return f'\n[[route]]\npath = "/{path}"\nupstream = "{upstream}"\n'


def start_framegate(name, conf, port):
    fg = ["prlimit", "--nofile=20000:20000", "--", os.path.join(BIN, "framegate"), "--config", conf]
    proc = start(fg, name, env=dict(os.environ, FRAMEGATE_LOG="warn"))
    wait_port(port)
    return proc


def end(proc):
    """Ends one process this script started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pool_load_cmd(port, path):
    return ["prlimit", "--nofile=20000:20000", "--", os.path.join(BIN, "fg-load"), "--url", f"ws://127.0.0.1:{port}/{path}"]


def pool_handshake_run(target, proc, count):
    """Opens `count` connections on the route `/target` of the balance modes' gateway, each with
    its own `?k=` (the `hash` pool's key; the other routes ignore it), then closes them. Returns
    the handshakes per second, the gateway's CPU time per handshake in µs, and the connections
    open on each endpoint while all are open (by port; empty for the single upstream)."""
    before = process_tree_cpu_seconds(proc.pid)

    def while_open():
        cpu = process_tree_cpu_seconds(proc.pid)
        endpoints, _ = upstream_metrics(POOL_ADMIN, target)
        return cpu, {port: e["open"] for port, e in endpoints.items()}

    hs, (after, spread) = with_open_connections(target, count, while_open, settle=0.5, cmd=pool_load_cmd(POOL_PORT, target),
                                                extra=["--query-key", "k"])
    return hs, (after - before) * 1e6 / count if hs is not None else None, spread


def key_endpoints(keys, snapshot=None):
    """Holds `keys` connections open on the hash gateway's route, connection i with `?k=i`, and
    reads from /admin/connections (of `snapshot`, when given) the endpoint each key went to:
    {key: endpoint port}. Returns once every connection has closed again."""
    query = f"/admin/connections?limit={keys}" + (f"&snapshot={snapshot}" if snapshot is not None else "")
    _, listed = with_open_connections("hash", keys, lambda: json.loads(admin(HASH_ADMIN, query))["connections"], settle=0,
                                      cmd=pool_load_cmd(HASH_PORT, "h"), extra=["--query-key", "k"])
    deadline = time.time() + 30
    while json.loads(admin(HASH_ADMIN, "/admin/connections?limit=1"))["matched"] and time.time() < deadline:
        time.sleep(0.1)
    found = {}
    for c in listed:
        url = urllib.parse.urlsplit(c["upstream"])
        key = urllib.parse.parse_qs(url.query).get("k")
        if key:
            found[int(key[0])] = url.port
    return found


def hash_movement(keys):
    """`hash` over the ten echo upstreams, `keys` keys placed, then one endpoint taken out of the
    pool by rewriting the config and POST /admin/reload, and the keys placed again: how many
    moved, and how many moved between endpoints that stayed (which none should)."""
    removed = POOL_ECHO_PORTS[3]

    def conf(ports):
        return pool_conf("fg-hash", HASH_PORT, HASH_ADMIN, pool_table("h", ports, "hash"), pool_route("h", "h"))

    proc = start_framegate("fg-hash", conf(POOL_ECHO_PORTS), HASH_PORT)
    try:
        before = key_endpoints(keys)
        conf([p for p in POOL_ECHO_PORTS if p != removed])
        snapshot = json.loads(admin(HASH_ADMIN, "/admin/reload", method="POST"))["snapshot"]
        after = key_endpoints(keys, snapshot)
    finally:
        end(proc)
    both = before.keys() & after.keys()
    if not both:
        return {"keys": keys, "placed": 0}
    moved = [k for k in both if before[k] != after[k]]
    return {
        "keys": keys,
        "placed": len(both),
        "endpoints_before": len(set(before.values())),
        "endpoints_after": len(set(after.values())),
        "on_removed_pct": 100 * sum(before[k] == removed for k in both) / len(both),
        "moved_pct": 100 * len(moved) / len(both),
        "moved_between_kept": sum(before[k] != removed for k in moved),
        "still_on_removed": sum(after[k] == removed for k in both),
    }


def failover(echoes, seconds):
    """100 new connections per second for `seconds` through a round_robin pool of three echo
    upstreams with `retries = 2` and `[upstream.health] fails = 3`; the third endpoint is killed
    (SIGKILL, by PID) 1 s in. /metrics is read every 50 ms meanwhile. Returns fg-load's
    figures, and when the dead endpoint was marked down and last tried, in ms after the kill."""
    ports = POOL_ECHO_PORTS[:3]
    victim = ports[-1]
    health = '[upstream.health]\ninterval = "2s"\nfails = 3\npasses = 2\n'
    conf = pool_conf("fg-failover", FAILOVER_PORT, FAILOVER_ADMIN, pool_table("f", ports, "round_robin", "retries = 2\n" + health),
                     pool_route("f", "f"))
    proc = start_framegate("fg-failover", conf, FAILOVER_PORT)
    count = FAILOVER_RATE * seconds
    load_log = open(os.path.join(WORK, "fg-load-failover.log"), "w")
    p = subprocess.Popen(pool_load_cmd(FAILOVER_PORT, "f") + ["rate", "--rate", str(FAILOVER_RATE), "--count", str(count), "--timeout", "5s"],
                         stdout=subprocess.PIPE, stderr=load_log, text=True)
    started.append(p)
    samples, killed_at = [], None  # (time, the victim's {"up", "open", "failures"}, retries)
    try:
        p.stdout.readline()  # START: the first connection is due
        t0, deadline = time.time(), time.time() + seconds + 10
        while p.poll() is None and time.time() < deadline:
            if killed_at is None and time.time() - t0 >= 1.0:
                echoes[victim].kill()
                echoes[victim].wait()
                killed_at = time.time()
            endpoints, retries = upstream_metrics(FAILOVER_ADMIN, "f")
            samples.append((time.time(), endpoints.get(victim), retries))
            time.sleep(0.05)
        end(p)
        out = p.stdout.read()
    finally:
        end(proc)
    result = dict(kv.split("=") for kv in out.split() if "=" in kv)
    if killed_at is None or "sent" not in result:
        log(f"  failover: no result (see {load_log.name})")
        return result
    after = [(t, e, r) for t, e, r in samples if t >= killed_at and e]
    at_kill = next((e for t, e, r in reversed(samples) if t < killed_at and e), {"failures": 0})
    retries_at_kill = next((r for t, e, r in reversed(samples) if t < killed_at), 0)
    down = next((t for t, e, r in after if not e["up"]), None)
    last_failure, seen = None, at_kill["failures"]
    for t, e, r in after:
        if e["failures"] > seen:
            last_failure, seen = t, e["failures"]
    result.update({
        "dead_endpoint_attempts": seen - at_kill["failures"],
        "retries": (after[-1][2] if after else 0) - retries_at_kill,
        "marked_down_ms": None if down is None else 1000 * (down - killed_at),
        "last_tried_ms": None if last_failure is None else 1000 * (last_failure - killed_at),
        "observed_ms": 1000 * (samples[-1][0] - killed_at),
    })
    return result


def pool_part(args):
    """The `pool` part: ((metric, target) -> [values], last connections per endpoint by target,
    hash key movement, failover). At most 3 repetitions."""
    echo = ["prlimit", "--nofile=20000:20000", "--", os.path.join(BIN, "fg-echo"), "--threads", "1", "--listen"]
    echoes = {port: start(echo + [f"127.0.0.1:{port}"], f"echo-{port}") for port in POOL_ECHO_PORTS}
    # The single upstream has the pool's capacity: as many one-thread processes, behind one address.
    for i in range(3):
        start(echo + [f"127.0.0.1:{POOL_SINGLE_PORT}", "--reuse-port"], f"echo-{POOL_SINGLE_PORT}-{i}")
    for port in POOL_ECHO_PORTS + [POOL_SINGLE_PORT]:
        wait_port(port)
    three = POOL_ECHO_PORTS[:3]
    pools = "".join(pool_table(mode, three, mode) for mode in POOL_TARGETS[1:])
    routes = pool_route("single", f"ws://127.0.0.1:{POOL_SINGLE_PORT}/") + "".join(pool_route(mode, mode) for mode in POOL_TARGETS[1:])
    proc = start_framegate("fg-pool", pool_conf("fg-pool", POOL_PORT, POOL_ADMIN, pools, routes), POOL_PORT)
    results, spreads = {}, {}
    reps = min(args.reps, 3)
    count = 3000 if not args.quick else 1000
    try:
        # Untimed: a fresh gateway grows its heap on its first connections, which would charge
        # whichever route comes first.
        pool_handshake_run("single", proc, count)
        for rep in range(reps):
            log(f"pool repetition {rep + 1}/{reps}")
            for t in POOL_TARGETS[rep % len(POOL_TARGETS):] + POOL_TARGETS[:rep % len(POOL_TARGETS)]:
                hs, cpu, spreads[t] = pool_handshake_run(t, proc, count)
                results.setdefault(("handshakes/s", t), []).append(hs)
                results.setdefault(("gateway CPU us/handshake", t), []).append(cpu)
    finally:
        end(proc)
    log("pool: hash key movement")
    moved = hash_movement(5000 if not args.quick else 2000)
    log("pool: failover")
    failed_over = failover(echoes, 6 if not args.quick else 4)
    return results, spreads, moved, failed_over


def report_pool(results, spreads, moved, failed_over, args):
    print(f"\n[[upstream]] pools: handshakes/s through a 3-endpoint pool per balance mode and a single upstream, same gateway "
          f"(2 workers), medians of {min(args.reps, 3)}, spread min-max\n")
    print("| metric | " + " | ".join(POOL_TARGETS) + " |")
    print("|" + "---|" * (len(POOL_TARGETS) + 1))
    medians = {}
    for m in list(dict.fromkeys(m for m, _ in results)):
        cells = []
        for t in POOL_TARGETS:
            medians[m, t], lo, hi = summary(results.get((m, t), []))
            cells.append("" if medians[m, t] is None else f"{fmt(medians[m, t])} [{fmt(lo)}-{fmt(hi)}]")
        print(f"| {m} | " + " | ".join(cells) + " |")
    for m, title in (("handshakes/s", "pool/single handshakes/s (target at least 95%)"), ("gateway CPU us/handshake", "pool/single CPU per handshake")):
        single = medians.get((m, "single"))
        print(f"| {title} | | " + " | ".join(
            f"{100 * medians[m, t] / single:.0f}%" if single and medians.get((m, t)) else "-" for t in POOL_TARGETS[1:]) + " |")
    print("| connections per endpoint, last run | | " + " | ".join(
        "/".join(str(n) for _, n in sorted(spreads.get(t, {}).items())) for t in POOL_TARGETS[1:]) + " |")
    r = failed_over
    print(f"\nfailover: {FAILOVER_RATE} new connections/s (handshake, one echo, close), round_robin over 3 endpoints, retries = 2, "
          "[upstream.health] fails = 3 (interval 2s, passes 2); one endpoint killed (SIGKILL) 1 s in; /metrics read every 50 ms")
    if "sent" in r:
        print(f"  failed handshakes: {r['failed_handshake']} of {r['sent']} (target: 0); failed after the 101: {r['failed_after_101']}")
        print(f"  handshake ms p50 {r['handshake_p50_ms']}, p99 {r['handshake_p99_ms']}, max {r['handshake_max_ms']}; "
              f"succeeded per second: {r['ok_per_sec']}")
        ms = lambda v: "never" if v is None else f"{v:.0f} ms"
        print(f"  dead endpoint: {r['dead_endpoint_attempts']} failed attempts ({r['retries']} retries), marked down "
              f"{ms(r['marked_down_ms'])} after the kill, last tried {ms(r['last_tried_ms'])} after it "
              f"(watched for {r['observed_ms']:.0f} ms)")
    else:
        print("  no result")
    m = moved
    print(f"\nhash key movement: {m['keys']} keys (query:k) over 10 endpoints, one removed by POST /admin/reload")
    if m.get("placed"):
        print(f"  keys moved: {m['moved_pct']:.1f}% (target: within 2 points of 10%; the removed endpoint held "
              f"{m['on_removed_pct']:.1f}%); moved between endpoints that stayed: {m['moved_between_kept']} (must be 0); "
              f"still on the removed one: {m['still_on_removed']}; endpoints used {m['endpoints_before']} then {m['endpoints_after']}; "
              f"keys placed both times: {m['placed']}")
    else:
        print("  no keys placed")


def deflate_conf(name, port, compression, upstream_port):
    return write(name + ".toml", f"""
[server]
listen = ["127.0.0.1:{port}"]
max_connections = 20000

[[route]]
path = "/{{*rest}}"
upstream = "ws://127.0.0.1:{upstream_port}/"
max_message_size = "16MiB"
compression = {"true" if compression else "false"}
""")


def deflate_load_cmd(target):
    return ["prlimit", "--nofile=20000:20000", "--", os.path.join(BIN, "fg-load"), "--url",
            f"ws://127.0.0.1:{DEFLATE_TARGETS[target][0]}/", "--deflate"]


def deflate_throughput(target, proc, args):
    """`fg-load --deflate throughput` at 1 KiB JSON through `target`: its figures, and the
    gateway's CPU time per echoed message (one message each way through it), counted over the
    same window as the messages (from fg-load's COUNTING to its result)."""
    cmd = deflate_load_cmd(target) + ["throughput", "--size", "1024", "--duration", args.duration,
                                      "--connections", "4", "--inflight", "32"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started.append(p)
    result, cpu = {}, []
    for line in p.stdout:
        if line.strip() == "COUNTING" or "msgs_per_sec=" in line:
            cpu.append(process_tree_cpu_seconds(proc.pid))
        result.update(kv.split("=") for kv in line.split() if "=" in kv)
    err = p.stderr.read()
    p.wait(timeout=60)
    if p.returncode != 0 or len(cpu) != 2 or "messages" not in result:
        log(f"  {target}: {err.strip()}")
        return None
    result["cpu_us_per_msg"] = (cpu[1] - cpu[0]) * 1e6 / max(1, int(result["messages"]))
    expected = "1" if DEFLATE_TARGETS[target][1] else "0"
    if result.get("compressed") != expected:
        log(f"  {target}: compressed={result.get('compressed')} on the client leg, expected {expected}")
    return result


def deflate_part(args):
    """The `deflate` part: (metric, target) -> [values]."""
    echo = ["prlimit", "--nofile=20000:20000", "--", os.path.join(BIN, "fg-echo"), "--threads", "1", "--listen"]
    start(echo + [f"127.0.0.1:{DEFLATE_ECHO_PORT}", "--deflate"], "echo-deflate")
    start(echo + [f"127.0.0.1:{PLAIN_ECHO_PORT}"], "echo-plain")
    procs = {t: start_framegate(t, deflate_conf(t, port, compression, upstream), port)
             for t, (port, compression, upstream) in DEFLATE_TARGETS.items()}
    for port in (DEFLATE_ECHO_PORT, PLAIN_ECHO_PORT):
        wait_port(port)
    names, results = list(DEFLATE_TARGETS), {}
    for rep in range(args.reps):
        log(f"deflate repetition {rep + 1}/{args.reps}")
        for t in names[rep % len(names):] + names[:rep % len(names)]:
            r = deflate_throughput(t, procs[t], args)
            for key, metric in (("msgs_per_sec", "msg/s 1 KiB JSON"), ("cpu_us_per_msg", "gateway CPU us/echoed msg"),
                                ("wire_out_per_msg", "client->gateway bytes/msg on the wire"),
                                ("wire_in_per_msg", "gateway->client bytes/msg on the wire")):
                results.setdefault((metric, t), []).append(float(r[key]) if r else None)
    for rep in range(max(1, args.reps // 2)):
        for t in names:
            procs[t] = restart(t, procs[t], DEFLATE_TARGETS[t][0])
            hs, rss = idle_run(t, procs[t], args.idle, cmd=deflate_load_cmd(t))
            results.setdefault((f"RSS KB/idle conn ({args.idle}, one message echoed each)", t), []).append(rss)
    return results


def report_deflate(results, args):
    names = list(DEFLATE_TARGETS)
    print(f"\npermessage-deflate: the same client (fg-load --deflate, 1 KiB JSON text, no context takeover), 4 connections x 32 "
          f"in flight; medians of {args.reps} (idle: {max(1, args.reps // 2)}), spread min-max\n")
    ratio_table(results, names)


def ratio_table(results, names):
    """A table of medians with their spread, one column per target in `names`, then each
    later target's ratio to the first."""
    base = names[0]
    print("| metric | " + " | ".join(names) + " | " + " | ".join(f"{t}/{base}" for t in names[1:]) + " |")
    print("|" + "---|" * (2 * len(names)))
    for m in list(dict.fromkeys(m for m, _ in results)):
        cells, med = [], {}
        for t in names:
            med[t], lo, hi = summary(results.get((m, t), []))
            cells.append("" if med[t] is None else f"{fmt(med[t])} [{fmt(lo)}-{fmt(hi)}]")
        for t in names[1:]:
            cells.append(f"{med[t] / med[base]:.2f}x" if med.get(t) and med.get(base) else "")
        print(f"| {m} | " + " | ".join(cells) + " |")


DELAY_PROXY = r"""
import asyncio, sys, time
listen, target, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

async def pipe(reader, writer, delayed):
    queue = asyncio.Queue()
    async def send():
        while True:
            at, data = await queue.get()
            if data is None:
                writer.close()
                return
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
    sender = asyncio.ensure_future(send())
    while True:
        data = await reader.read(65536)
        await queue.put((time.monotonic() + (delay if delayed else 0), data or None))
        if not data:
            break
    await sender

async def handle(client_r, client_w):
    redis_r, redis_w = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pipe(client_r, redis_w, True), pipe(redis_r, client_w, False), return_exceptions=True)

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def fleet_conf(name, port, shared):
    """The fleet part's gateway: `/hs` counts each upgrade with gw.shared:incr, `/state`
    limits messages with a conn.state counter (policies/ratelimit.lua's way, a limit never
    reached), `/limit` with gw.limit (a bucket never empty)."""
    hs = write("fleet-hs.lua", 'return function(req, ctx) gw.shared:incr("bench:hs", 1) end\n')
    state = write("fleet-state.lua", """return function(msg, ctx, conn)
  local s = conn.state
  local second = math.floor(gw.now())
  if s.second ~= second then s.second, s.count = second, 0 end
  s.count = s.count + 1
  if s.count > 1000000000 then return false end
end
""")
    limit = write("fleet-limit.lua", 'return function(msg, ctx, conn)\n  if not gw.limit("bench", 1e9, 1e9) then return false end\nend\n')
    routes = "".join(f"""
[[route]]
path = "/{path}"
upstream = "ws://127.0.0.1:{FLEET_ECHO_PORT}/"
[route.policies]
{hook} = "{script}"
""" for path, hook, script in (("hs", "on_upgrade", hs), ("state", "on_client_frame", state), ("limit", "on_client_frame", limit)))
    return write(name + ".toml", f"""{shared}
[server]
listen = ["127.0.0.1:{port}"]
max_connections = 20000
{routes}""")


def fleet_load_cmd(target, path):
    return ["prlimit", "--nofile=20000:20000", "--", os.path.join(BIN, "fg-load"), "--url",
            f"ws://127.0.0.1:{FLEET_TARGETS[target][0]}/{path}"]


def fleet_part(args):
    """The `fleet` part (issue 17): handshakes/s with one gw.shared:incr in on_upgrade, local
    against Redis on loopback and Redis 1 ms away; msg/s through a gw.limit frame policy
    against a conn.state one. (metric, target) -> [values]."""
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(redis, os.X_OK):
        raise SystemExit("missing: redis-server (apt-get install redis-server)")
    start([redis, "--port", str(FLEET_REDIS_PORT), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--protected-mode", "no"], "redis")
    start([sys.executable, write("delay_proxy.py", DELAY_PROXY), str(FLEET_DELAY_PORT), str(FLEET_REDIS_PORT), "0.001"],
          "delay-proxy")
    start(["prlimit", "--nofile=20000:20000", "--", os.path.join(BIN, "fg-echo"), "--threads", "1", "--listen",
           f"127.0.0.1:{FLEET_ECHO_PORT}"], "fleet-echo")
    for port in (FLEET_REDIS_PORT, FLEET_DELAY_PORT, FLEET_ECHO_PORT):
        wait_port(port)
    procs = {t: start_framegate(t, fleet_conf(t, port, shared), port) for t, (port, shared) in FLEET_TARGETS.items()}
    names, results = list(FLEET_TARGETS), {}
    count = 3000 if not args.quick else 1000
    for rep in range(args.reps):
        log(f"fleet repetition {rep + 1}/{args.reps}")
        for t in names[rep % len(names):] + names[:rep % len(names)]:
            hs, cpu = handshake_run(t, procs[t], count, cmd=fleet_load_cmd(t, "hs"))
            results.setdefault(("handshakes/s, on_upgrade gw.shared:incr", t), []).append(hs)
            results.setdefault(("gateway CPU us/handshake", t), []).append(cpu)
        runs = [("fg-local", "state", "msg/s 1 KiB, conn.state rate limit"), ("fg-local", "limit", "msg/s 1 KiB, gw.limit"),
                ("fg-redis", "limit", "msg/s 1 KiB, gw.limit")]
        for t, path, metric in runs[rep % 3:] + runs[:rep % 3]:
            r = load(t, "throughput", "--size", "1024", "--duration", args.duration, "--connections", "4", "--inflight", "32",
                     cmd=fleet_load_cmd(t, path))
            results.setdefault((metric, t), []).append(float(r["msgs_per_sec"]) if r else None)
    return results


def report_fleet(results, args):
    names = list(FLEET_TARGETS)
    print(f"\nfleet ([shared] backend = 'redis', redis-server on loopback; fg-redis+1ms through a proxy adding 1 ms to each "
          f"request): medians of {args.reps}, spread min-max\n")
    ratio_table(results, names)
    state = summary(results.get(("msg/s 1 KiB, conn.state rate limit", "fg-local"), []))[0]
    limit = summary(results.get(("msg/s 1 KiB, gw.limit", "fg-redis"), []))[0]
    if state and limit:
        print(f"\ngw.limit on Redis / the local conn.state rate limit: {limit / state:.2f}x (target: at least 0.80x)")


def quantile(counts, q):
    """The value at quantile q of a histogram given as {value: count}, as HdrHistogram reads it."""
    total = sum(counts.values())
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= q * total:
            return float(value)
    return None


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def fmt(v, unit=""):
    if v is None:
        return "-"
    if v >= 10000:
        return f"{v/1000:.0f}k{unit}"
    if v >= 100:
        return f"{v:.0f}{unit}"
    return f"{v:.1f}{unit}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", default="3s")
    ap.add_argument("--idle", type=int, default=9000, help="idle connections per memory run")
    ap.add_argument("--quick", action="store_true", help="1 repetition, 1s runs, 2000 idle connections")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--baseline", metavar="BIN", help="an older framegate binary to run beside this one")
    ap.add_argument("--only", default="throughput,latency,handshakes,idle,expiry,tls,http,pool,deflate,fleet",
                    help="comma-separated parts to run: throughput, latency, handshakes, idle, expiry, tls, http, pool, deflate, fleet")
    args = ap.parse_args()
    args.only = set(args.only.split(","))
    if args.quick:
        args.reps, args.duration, args.idle = 1, "1s", 2000
    ensure_packages()
    if not args.skip_build:
        build()
    missing = [b for b in ("framegate", "fg-load", "fg-echo") if not os.access(os.path.join(BIN, b), os.X_OK)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not in {BIN}: run without --skip-build, or set CARGO_TARGET_DIR to where they were built")
    if args.baseline and not os.access(args.baseline, os.X_OK):
        raise SystemExit(f"--baseline {args.baseline}: not an executable file")
    # The pool and deflate parts start what they need themselves.
    procs = start_all(args.baseline and os.path.abspath(args.baseline)) if args.only - {"pool", "deflate", "fleet"} else {}
    proxies = ["direct", "nginx", "haproxy", "framegate", "fg+lua"] + (list(BASELINE_TARGETS) if args.baseline else [])
    results = {}  # (metric, target) -> [values]
    pooled = {}  # target -> Counter of round-trip microseconds (latency histograms, merged)
    rot = 0
    for rep in range(args.reps if args.only & {"throughput", "latency"} else 0):
        log(f"repetition {rep + 1}/{args.reps}")
        for size in (64, 1024, 65536) if "throughput" in args.only else ():
            order = proxies + (["fg+json"] if size == 1024 else [])
            order = order[rot % len(order):] + order[:rot % len(order)]
            rot += 1
            for t in order:
                r = load(t, "throughput", "--size", str(size), "--duration", args.duration, "--connections", "4", "--inflight", "32")
                results.setdefault((f"msg/s {size}B", t), []).append(float(r["msgs_per_sec"]) if r else None)
            # [route.validate]: JSON text messages, checked against a schema, against the same
            # messages through the plain route.
            for t in (("framegate", "fg+schema") if rot % 2 else ("fg+schema", "framegate")) if size == 1024 else ():
                r = load(t, "throughput", "--size", str(size), "--json", "--duration", args.duration, "--connections", "4", "--inflight", "32")
                results.setdefault((f"msg/s {size}B JSON", t), []).append(float(r["msgs_per_sec"]) if r else None)
            # [route.capture]: the traffic console recording every message, against the plain
            # route, on the same JSON messages (masking looks at text).
            capture = ["framegate", "fg+cap-meta", "fg+cap-payload"]
            for t in capture[rot % 3:] + capture[:rot % 3] if size == 1024 else ():
                r = load(t, "throughput", "--size", str(size), "--json", "--duration", args.duration, "--connections", "4", "--inflight", "32")
                results.setdefault((f"msg/s {size}B JSON, capture", t), []).append(float(r["msgs_per_sec"]) if r else None)
        lat_order = proxies[rep % len(proxies):] + proxies[:rep % len(proxies)]
        for t in lat_order if "latency" in args.only else ():
            r = load(t, "latency", "--rate", "2000", "--duration", "5s" if not args.quick else "2s")
            for q in ("p50_us", "p99_us", "p999_us"):
                results.setdefault((f"rtt {q[:-3]} us @2k/s", t), []).append(float(r[q]) if r else None)
            for bucket in (r or {}).get("histogram", "").split(","):
                if bucket:
                    value, count = bucket.split(":")
                    pooled.setdefault(t, collections.Counter())[int(value)] += int(count)
    # Percentiles of every repetition's samples together: each proxy's p99 then rests on
    # reps x 10,000 round trips spread over the whole run, not on one 5 s window.
    for t, counts in pooled.items():
        for q, name in ((0.5, "p50"), (0.99, "p99"), (0.999, "p999")):
            results.setdefault((f"rtt {name} us @2k/s, pooled", t), []).append(quantile(counts, q))
    peers = ["nginx", "haproxy", "framegate", "fg+auth", "fg+jwt", "fg+jwt-new"] + (["base"] if args.baseline else [])
    for rep in range(args.reps if "handshakes" in args.only else 0):
        for t in peers[rep % len(peers):] + peers[:rep % len(peers)]:
            count = 3000 if not args.quick else 1000
            if t == "fg+jwt-new":  # the fg+jwt gateway, a new token on every connection
                cmd = fg_load_cmd("fg+jwt", bearer_file=jwt_tokens(rep, count))
                hs, cpu = handshake_run(t, procs["fg+jwt"], count, cmd=cmd)
            else:
                hs, cpu = handshake_run(t, procs[t], count)
            results.setdefault(("handshakes/s", t), []).append(hs)
            results.setdefault(("proxy CPU us/handshake", t), []).append(cpu)
    # HTTP pass-through (route.http = "proxy"): small GETs on kept-alive connections.
    http_peers = ["direct", "nginx", "haproxy", "framegate"]
    for rep in range(args.reps if "http" in args.only else 0):
        for t in http_peers[rep % len(http_peers):] + http_peers[:rep % len(http_peers)]:
            r = load(t, "http", "--connections", "4", "--duration", args.duration)
            results.setdefault(("HTTP req/s (small GET, keep-alive)", t), []).append(float(r["reqs_per_sec"]) if r else None)
    idle_reps = max(1, args.reps // 2)
    for rep in range(idle_reps if "idle" in args.only else 0):
        for t in peers:
            procs[t] = restart(t, procs[t], TARGETS[t])
            hs, rss = idle_run(t, procs[t], args.idle)
            results.setdefault((f"handshakes/s ({args.idle}, fresh process)", t), []).append(hs)
            results.setdefault((f"RSS KB/idle conn ({args.idle})", t), []).append(rss)
    expiry = expiry_run(procs["fg+expiry"], args.idle) if "expiry" in args.only else {}
    tls = tls_part(args) if "tls" in args.only else {}
    pool = pool_part(args) if "pool" in args.only else None
    deflate = deflate_part(args) if "deflate" in args.only else None
    fleet = fleet_part(args) if "fleet" in args.only else None
    stop_all()
    if results:
        report(results, args)
    if tls:
        report_tls(tls, args)
    if pool:
        report_pool(*pool, args)
    if deflate:
        report_deflate(deflate, args)
    if fleet:
        report_fleet(fleet, args)
    if expiry:
        print(f"\nexpiry: {args.idle} connections, lifetimes spread over 5-15 s (on_upgrade req:expire_in):")
        print("  " + " ".join(f"{k}={float(v):.1f}" if k != "missing" and k != "closed" else f"{k}={v}" for k, v in expiry.items()))


def report(results, args):
    metrics = list(dict.fromkeys(m for m, _ in results))
    targets = [t for t in TARGETS if t != "fg+expiry"]
    if any(t == "fg+jwt-new" for _, t in results):
        targets.insert(targets.index("fg+jwt") + 1, "fg+jwt-new")
    print(f"\nframegate benchmark: medians of {args.reps} (idle runs: {max(1, args.reps // 2)}), spread min-max in brackets; one run, same machine\n")
    header = "| metric | " + " | ".join(targets) + " |"
    print(header)
    print("|" + "---|" * (len(targets) + 1))
    for m in metrics:
        cells = []
        for t in targets:
            med, lo, hi = summary(results.get((m, t), []))
            cells.append("" if med is None else f"{fmt(med)} [{fmt(lo)}-{fmt(hi)}]")
        print(f"| {m} | " + " | ".join(cells) + " |")
    medians = {m: {t: summary(results.get((m, t), []))[0] for t in targets} for m in metrics}

    def table(title, columns):
        print(title + "\n")
        print("| metric | " + " | ".join(f"{a}/{b}" for a, b in columns) + " |")
        print("|" + "---|" * (len(columns) + 1))
        for m in metrics:
            med = medians[m]
            cells = (f"{med[a] / med[b]:.2f}x" if med.get(a) and med.get(b) else "" for a, b in columns)
            print(f"| {m} | " + " | ".join(cells) + " |")

    table("\nratios of medians (framegate / peer; for latency, RSS and CPU lower is better)",
          [("framegate", "direct"), ("framegate", "nginx"), ("framegate", "haproxy"), ("fg+lua", "framegate"),
           ("fg+json", "framegate"), ("fg+auth", "framegate"), ("fg+auth", "haproxy"), ("fg+jwt", "framegate"),
           ("fg+jwt-new", "framegate"), ("fg+schema", "framegate"), ("fg+cap-meta", "framegate"),
           ("fg+cap-payload", "framegate")])
    if "base" in TARGETS:
        table("\nagainst the baseline binary (--baseline), same run: this / baseline",
              [("framegate", "base"), ("fg+lua", "base+lua")])


def stop_all():
    for p in reversed(started):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in started:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def interrupted(signum, _frame):
    # Raised in the main thread, so the `finally` below ends every process started.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    # SIGTERM ends Python without running `finally`, and a run started in the background by a
    # non-interactive shell ignores SIGINT: handle both, so no proxy outlives the run.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    WORK = tempfile.mkdtemp(prefix="framegate-bench-")
    try:
        main()
    finally:
        stop_all()
