//! Fuzzing on stable Rust: mutation loops over the committed seed corpus in
//! `tests/fuzz/corpus/<target>/`, for every parser a peer, an operator or a policy author feeds:
//! the client's request head, the upstream's answer, frames in both roles, the config loader
//! and path templates (in-process, through `framegate::fuzzing`), and, through a real gateway on
//! 127.0.0.1, the relay (fuzzed frames from a raw client and from a raw upstream, on a route
//! with and one without frame policies) and the Lua API (every `gw.*`, `conn:*`, `msg`, `req:*`
//! with Lua values of every type).
//!
//! Each input must: not panic, finish within a bound (a watchdog catches a hang), and allocate
//! within a bound (a counting allocator measures the peak). A failing input is written to
//! `target/fuzz-failures/` and named in the failure.
//!
//! `FRAMEGATE_FUZZ_SECS` sets the seconds per target (default 1, so `cargo test` stays fast; CI
//! runs 7 per target, about 60 s in all); `FRAMEGATE_FUZZ_SEED` replays a run (each target
//! prints its seed). A long run by hand:
//! `FRAMEGATE_FUZZ_SECS=300 cargo test --test fuzz -- --nocapture --test-threads 1`.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use support::*;

// ---------------------------------------------------------------------------------------------
// Allocation accounting: live bytes per thread (for the in-process parsers, which run on one
// thread) and for the whole process (for the gateway targets, whose work runs on its workers).

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Signed: a block may be freed on another thread than the one that allocated it.
    static THREAD_LIVE: Cell<isize> = const { Cell::new(0) };
    static THREAD_PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
    let _ = THREAD_LIVE.try_with(|l| {
        let now = l.get() + size as isize;
        l.set(now);
        let _ = THREAD_PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn shrank(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
    let _ = THREAD_LIVE.try_with(|l| l.set(l.get() - size as isize));
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the most bytes this thread had live beyond what it
/// had at the start.
fn thread_peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = THREAD_LIVE.with(Cell::get);
    THREAD_PEAK.with(|p| p.set(start));
    let out = f();
    let peak = THREAD_PEAK.with(Cell::get);
    (out, usize::try_from(peak - start).unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Inputs: a small seeded PRNG (runs replay from their seed) and a mutator over the corpus.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Seconds each target runs.
fn fuzz_secs() -> f64 {
    std::env::var("FRAMEGATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn seed_for(target: &str) -> u64 {
    let seed = std::env::var("FRAMEGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("fuzz {target}: FRAMEGATE_FUZZ_SEED={seed}");
    seed
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Bytes that matter to some parser: delimiters, digits, limits and names.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b": ",
    b":",
    b" ",
    b"\t",
    b",",
    b";",
    b"=",
    b"/",
    b"//",
    b"/../",
    b"%2F",
    b"%2f",
    b"%5C",
    b"%2E",
    b"..",
    b"/./",
    b"..;",
    b"%2e%2e",
    b"%00",
    b"%",
    b"?",
    b"#",
    b"{",
    b"}",
    b"{*",
    b"\\",
    b"\"",
    b"'",
    b"[",
    b"]",
    b"[[route]]\n",
    b"[server]\n",
    b"[route.policies]\n",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2",
    b"GET ",
    b" 101 ",
    b" 200 ",
    b" 100 ",
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"chunked",
    b"Connection",
    b"close",
    b"Upgrade",
    b"websocket",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Accept",
    b"Sec-WebSocket-Protocol",
    b"0",
    b"-1",
    b"18446744073709551616",
    b"9223372036854775807",
    b"4294967296",
    b"65535",
    b"65536",
    b"1e999",
    b"0x10",
    b"\xff",
    b"\x00",
    b"\xc3\xa9",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"ms",
    b"s",
    b"m",
    b"h",
    b"MiB",
    b"KiB",
    b"GiB",
    b"ws://",
    b"wss://",
    b"http://",
    b"127.0.0.1",
    b"[::1]",
    b":0",
    b":65536",
    b"@",
    b"\x7e\xff\xff",
    b"\x7f\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x7f\x00\x00\x00\x00\x01\x00\x00\x00",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        match rng.below(11) {
            0 if len > 0 => {
                let at = rng.below(len);
                data[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                data[at] = rng.byte();
            }
            2 if len > 0 => {
                let at = rng.below(len);
                data[at] = *[
                    0u8, 0xff, 0x7f, 0x80, b'\r', b'\n', b' ', b':', b'{', b'}', b'/',
                ]
                .get(rng.below(11))
                .unwrap();
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                data.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                data.drain(at..at + n);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                let chunk = data[at..at + n].to_vec();
                let times = if rng.chance(8) {
                    1 + rng.below(2000)
                } else {
                    1
                };
                for _ in 0..times {
                    if data.len() + chunk.len() > max_len {
                        break;
                    }
                    data.splice(at..at, chunk.iter().copied());
                }
            }
            6 | 7 => {
                let at = rng.below(len + 1);
                let token = TOKENS[rng.below(TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
            8 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                let at = rng.below(len + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            9 if len > 0 => data.truncate(rng.below(len)),
            _ => {
                // A run of one repeated byte: long lines, long numbers, long names.
                let at = rng.below(len + 1);
                let n = 1 + rng.below(4096);
                let b = if rng.chance(2) { b'a' } else { rng.byte() };
                data.splice(at..at, std::iter::repeat_n(b, n));
            }
        }
    }
    data.truncate(max_len);
    data
}

/// Writes a failing input where it can be replayed from, and says where.
fn save_failure(target: &str, what: &str, input: &[u8]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{target}-{what}-{hash:016x}"));
    let _ = std::fs::write(&path, input);
    let shown: String = String::from_utf8_lossy(&input[..input.len().min(300)]).into();
    format!(
        "{what} on {} ({} bytes): {shown:?}",
        path.display(),
        input.len()
    )
}

// ---------------------------------------------------------------------------------------------
// The in-process loop.

/// Limits for one in-process input.
struct Bounds {
    /// Wall-clock time one input may take (debug build).
    time: Duration,
    /// Bytes one input may have live at once, beyond its own size times `per_byte`.
    alloc: usize,
    per_byte: usize,
}

/// Runs `check` on the seeds, then on mutated inputs for [`fuzz_secs`], on a thread of its own
/// watched for hangs. `check` returns `Err` for a property that does not hold.
fn fuzz_in_process(
    target: &'static str,
    max_len: usize,
    bounds: Bounds,
    check: impl Fn(&[u8]) -> Result<(), String> + Send + 'static,
) {
    let seeds = corpus(target);
    let seed = seed_for(target);
    let deadline = Instant::now() + Duration::from_secs_f64(fuzz_secs());
    let current: Arc<Mutex<(Vec<u8>, Instant)>> =
        Arc::new(Mutex::new((Vec::new(), Instant::now())));
    let done = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let worker = {
        let (current, done, runs) = (current.clone(), done.clone(), runs.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let mut i = 0usize;
            while i < seeds.len() || Instant::now() < deadline {
                let input = match seeds.get(i) {
                    Some(s) => s.clone(),
                    None => mutate(&mut rng, &seeds, max_len),
                };
                i += 1;
                *current.lock().unwrap() = (input.clone(), Instant::now());
                let started = Instant::now();
                let (outcome, peak) = thread_peak(|| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)))
                });
                let took = started.elapsed();
                let failure = match outcome {
                    Err(_) => Some("panic".to_owned()),
                    Ok(Err(e)) => Some(format!("property failed: {e}")),
                    Ok(Ok(())) if took > bounds.time => Some(format!("slow: {took:?}")),
                    Ok(Ok(())) if peak > bounds.alloc + bounds.per_byte * input.len() => {
                        Some(format!("allocated {peak} bytes"))
                    }
                    Ok(Ok(())) => None,
                };
                if let Some(failure) = failure {
                    done.store(true, Ordering::SeqCst);
                    return Err(format!(
                        "{failure}: {}",
                        save_failure(target, "fail", &input)
                    ));
                }
                runs.fetch_add(1, Ordering::Relaxed);
            }
            done.store(true, Ordering::SeqCst);
            Ok(())
        })
    };
    // The watchdog: an input still running after 4 bounds is a hang.
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        let (input, since) = current.lock().unwrap().clone();
        if since.elapsed() > bounds.time * 4 && !done.load(Ordering::SeqCst) {
            panic!(
                "fuzz {target}: hang: {}",
                save_failure(target, "hang", &input)
            );
        }
    }
    if let Err(e) = worker
        .join()
        .expect("the fuzz thread reports, never panics")
    {
        panic!("fuzz {target}: {e}");
    }
    eprintln!(
        "fuzz {target}: {} inputs, no failure",
        runs.load(Ordering::Relaxed)
    );
}

/// An async reader that hands out `data` in reads of at most `chunk` bytes, then ends.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Reads `input` whole, and cut in reads of 1 to 7 bytes (picked by its length), with `read`.
fn read_both_ways<F>(input: &[u8], read: F) -> Result<(), String>
where
    F: for<'a> Fn(&'a mut Chunked<'a>) -> Pin<Box<dyn std::future::Future<Output = String> + 'a>>,
{
    let rt = current_thread();
    let mut whole = Chunked {
        data: input,
        chunk: usize::MAX,
    };
    let first = rt.block_on(read(&mut whole));
    let mut cut = Chunked {
        data: input,
        chunk: 1 + input.len() % 7,
    };
    let second = rt.block_on(read(&mut cut));
    // However the bytes are cut across reads, the parsers must agree on whether there is a
    // head, and on the head: errors may differ (a head cut short is "too large" before its
    // garbage is seen), and so may what arrived with it (`rest`).
    let class = |s: &str| s.starts_with("error") || s == "closed";
    let head = |s: &str| s.split(" rest=").next().unwrap_or("").to_owned();
    let same = class(&first) == class(&second)
        && (class(&first) || first.starts_with("Switching") || head(&first) == head(&second));
    if !same {
        return Err(format!("whole: {first}\ncut: {second}"));
    }
    Ok(())
}

#[test]
fn fuzz_request_head() {
    fuzz_in_process(
        "request_head",
        80 * 1024,
        Bounds {
            time: Duration::from_secs(2),
            alloc: 1 << 20,
            per_byte: 8,
        },
        |input| read_both_ways(input, |io| Box::pin(framegate::fuzzing::read_request(io))),
    );
}

#[test]
fn fuzz_upstream_response() {
    fuzz_in_process(
        "upstream_response",
        160 * 1024,
        Bounds {
            time: Duration::from_secs(2),
            alloc: 1 << 20,
            per_byte: 8,
        },
        |input| {
            read_both_ways(input, |io| {
                Box::pin(framegate::fuzzing::read_upstream_response(io))
            })
        },
    );
}

#[test]
fn fuzz_frame_parser() {
    let check = |input: &[u8], server: bool| {
        for max in [125, 1 << 20] {
            framegate::fuzzing::parse_frames(input, server, max)
                .map(drop)
                .or_else(|e| {
                    // Errors are answers (a close code); only broken round trips are failures.
                    if e.contains("re-encoded") || e.contains("accepted") {
                        Err(e)
                    } else {
                        Ok(())
                    }
                })?;
        }
        Ok(())
    };
    let bounds = || Bounds {
        time: Duration::from_secs(2),
        alloc: 1 << 20,
        per_byte: 4,
    };
    let server = std::thread::spawn(move || {
        fuzz_in_process("frames_server", 256 * 1024, bounds(), move |i| {
            check(i, true)
        })
    });
    fuzz_in_process("frames_client", 256 * 1024, bounds(), move |i| {
        check(i, false)
    });
    server.join().unwrap();
}

#[test]
fn fuzz_config_loader() {
    fuzz_in_process(
        "config",
        64 * 1024,
        Bounds {
            time: Duration::from_secs(2),
            alloc: 16 << 20,
            per_byte: 64,
        },
        |input| {
            let text = String::from_utf8_lossy(input);
            if let Ok(config) = framegate::Config::from_toml(&text, Path::new("fuzz.toml")) {
                route_every_way(&config, &["/", "/echo", "/chat/lobby", "/a/b/c"]);
            }
            Ok(())
        },
    );
}

/// Routes some paths through a loaded config and renders the upstream of each match.
fn route_every_way(config: &framegate::Config, paths: &[&str]) -> usize {
    let router = framegate::route::Router::new(&config.routes);
    let mut rendered = 0;
    for host in [
        None,
        Some("admin.example.com"),
        Some("ADMIN.example.com.:80"),
    ] {
        for path in paths {
            if let Ok(m) = router.find(host, path) {
                rendered += m.route.upstream.render(&m.params).len();
            }
        }
    }
    rendered
}

/// What routing promises about a match (configuration.md, "Request path normalisation" and
/// "What a placeholder may carry"): the matched path has no empty, `.` or `..` segment, and no
/// placeholder value carries a dot segment (whatever separates it), nor an encoded slash or
/// backslash unless the route allows them.
fn check_normal(
    path: &str,
    params: &[(String, String)],
    allow_encoded_slash: bool,
) -> Result<(), String> {
    let inner = path
        .strip_prefix('/')
        .ok_or(format!("matched path {path:?} is not absolute"))?;
    let segments: Vec<&str> = inner.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if *seg == "." || *seg == ".." || (seg.is_empty() && i != last) {
            return Err(format!("matched path {path:?} is not in normal form"));
        }
    }
    for (name, value) in params {
        let lower = value.to_ascii_lowercase();
        if !allow_encoded_slash
            && (lower.contains("%2f") || lower.contains("%5c") || value.contains('\\'))
        {
            return Err(format!("{{{name}}} = {value:?} carries an encoded slash"));
        }
        let unified = lower
            .replace("%2f", "/")
            .replace("%5c", "/")
            .replace('\\', "/")
            .replace("%2e", ".");
        if unified
            .split('/')
            .any(|seg| seg.split(';').next() == Some(".") || seg.split(';').next() == Some(".."))
        {
            return Err(format!("{{{name}}} = {value:?} carries a dot segment"));
        }
    }
    Ok(())
}

/// A TOML basic string holding `s` exactly.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[test]
fn fuzz_path_templates() {
    fuzz_in_process(
        "template",
        16 * 1024,
        Bounds {
            time: Duration::from_secs(2),
            alloc: 4 << 20,
            per_byte: 64,
        },
        |input| {
            // Lines: template, request path, host, upstream template, and anything on a fifth
            // line sets `allow_encoded_slash`.
            let text = String::from_utf8_lossy(input);
            let mut lines = text.split('\n');
            let template = lines.next().unwrap_or("");
            let path = lines.next().unwrap_or("/");
            let host = lines.next().unwrap_or("");
            let upstream = lines.next().unwrap_or("ws://127.0.0.1:1/");
            let allow = lines.next().is_some_and(|l| !l.is_empty());
            if let Ok(t) = framegate::route::PathTemplate::parse(template) {
                let _ = (t.specificity(), t.param_names().count(), t.matches(path));
            }
            let toml = format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\n[[route]]\npath = {}\nupstream = {}\n\
                 allow_encoded_slash = {allow}\n{}",
                toml_string(template),
                toml_string(upstream),
                if host.is_empty() {
                    String::new()
                } else {
                    format!("host = {}\n", toml_string(host))
                },
            );
            if let Ok(config) = framegate::Config::from_toml(&toml, Path::new("fuzz.toml")) {
                route_every_way(&config, &[path, "/", template]);
                let router = framegate::route::Router::new(&config.routes);
                if let Ok(m) = router.find((!host.is_empty()).then_some(host), path) {
                    check_normal(&m.path, &m.params, m.route.allow_encoded_slash)?;
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Through a real gateway.

/// How long a fuzzed connection may take to end after its peer has sent everything and shut
/// its side: the close timeout (1 s here) plus room for a loaded machine.
const END_BOUND: Duration = Duration::from_secs(6);

/// Process-wide allocation a gateway target may add over its run (the gateway's limits:
/// 1 MiB messages, 16 MiB per policy call, a few connections at once).
const GATEWAY_ALLOC: usize = 512 << 20;

/// A random run of frames, well-formed or nearly: fragments, control frames in between,
/// bad UTF-8, wrong masks, reserved bits and opcodes, odd length encodings.
fn frames(rng: &mut Rng, masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(6) {
        let opcode = *[0u8, 1, 1, 2, 2, 8, 9, 10, 3, 0xB]
            .get(rng.below(10))
            .unwrap();
        let fin = !rng.chance(3);
        let rsv = if rng.chance(20) { rng.byte() & 0x70 } else { 0 };
        let len = match rng.below(6) {
            0 => 0,
            1 | 2 => rng.below(126),
            3 => 126 + rng.below(1000),
            4 => rng.below(70_000),
            _ => (1 << 20) - 2 + rng.below(4),
        };
        let payload: Vec<u8> = match rng.below(4) {
            0 => "héllo wörld ✓ ".bytes().cycle().take(len).collect(),
            1 => (0..len).map(|_| rng.byte()).collect(),
            2 if len >= 2 => {
                let mut p = vec![b'x'; len];
                p[..2].copy_from_slice(&(rng.below(5000) as u16).to_be_bytes());
                p
            }
            _ => vec![b'a'; len],
        };
        let mask_bit = masked != rng.chance(40);
        out.push(if fin { 0x80 } else { 0 } | rsv | opcode);
        let m = if mask_bit { 0x80 } else { 0 };
        match (len, rng.chance(15)) {
            (n, false) if n < 126 => out.push(m | n as u8),
            (n, false) if n <= 0xFFFF => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            (n, _) => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [rng.byte(), rng.byte(), rng.byte(), rng.byte()];
        if mask_bit {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(&payload);
        }
    }
    out
}

/// A relay input: generated frames, or a mutated seed, sometimes cut short.
fn relay_input(rng: &mut Rng, seeds: &[Vec<u8>], masked: bool) -> Vec<u8> {
    let mut input = if rng.chance(2) {
        frames(rng, masked)
    } else {
        mutate(rng, seeds, 2 << 20)
    };
    if rng.chance(10) {
        let at = rng.below(input.len() + 1);
        input.truncate(at);
    }
    input
}

/// Frame policies that look at every message, so that the hooked route reassembles.
fn hooked_policies() -> Vec<(&'static str, String)> {
    let forward = script(
        "forward.lua",
        "return function(msg, ctx, conn) local _ = msg.size return nil end",
    );
    vec![
        ("on_client_frame", forward.clone()),
        ("on_server_frame", forward),
    ]
}

fn policies_ref<'a>(p: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    p.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Checks that the gateway still relays for everyone else.
async fn control_echo(addr: SocketAddr, path: &str) {
    let mut ws = connect(addr, path).await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        next_text(&mut ws).await,
        "still here",
        "control echo on {path}"
    );
    ws.close(None).await.unwrap();
}

/// Reads from `stream` until it ends or fails, within `bound`; returns whether it ended.
async fn drain(stream: &mut TcpStream, bound: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Drives `one` on inputs for [`fuzz_secs`], `parallel` at a time, with a control echo every
/// 32 inputs and the process-wide allocation peak checked at the end.
async fn fuzz_gateway<F, Fut>(
    target: &'static str,
    parallel: usize,
    addr: SocketAddr,
    control_path: &str,
    make: impl Fn(&mut Rng, &[Vec<u8>]) -> Vec<u8>,
    one: F,
) where
    F: Fn(u64, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let seeds = corpus(target);
    let mut rng = Rng(seed_for(target));
    let deadline = Instant::now() + Duration::from_secs_f64(fuzz_secs());
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut i = 0u64;
    while (i as usize) < seeds.len() || Instant::now() < deadline {
        let mut batch = Vec::new();
        for _ in 0..parallel {
            let input = match seeds.get(i as usize) {
                Some(s) => s.clone(),
                None => make(&mut rng, &seeds),
            };
            let keep = input.clone();
            batch.push((keep, tokio::spawn(one(i, input))));
            i += 1;
        }
        for (input, task) in batch {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!(
                    "fuzz {target}: {e}: {}",
                    save_failure(target, "fail", &input)
                ),
                Err(e) => panic!(
                    "fuzz {target}: {e}: {}",
                    save_failure(target, "panic", &input)
                ),
            }
        }
        if i % 32 < parallel as u64 {
            control_echo(addr, control_path).await;
        }
    }
    control_echo(addr, control_path).await;
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    assert!(
        peak < GATEWAY_ALLOC,
        "fuzz {target}: the process grew by {peak} bytes at its peak"
    );
    eprintln!(
        "fuzz {target}: {i} inputs, no failure, peak growth {} KiB",
        peak / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_relay_from_client() {
    let up = echo().await;
    let policies = hooked_policies();
    let routes = format!(
        "{}{}",
        route("/plain", up.addr, "", &[]),
        route("/hooked", up.addr, "", &policies_ref(&policies)),
    );
    let gw = gateway_with_server("close_timeout = \"1s\"\nworkers = 2", &routes).await;
    let addr = gw.local_addr();
    fuzz_gateway(
        "frames_server",
        4,
        addr,
        "/hooked",
        |rng, seeds| relay_input(rng, seeds, true),
        move |i, input| async move {
            let path = if i % 2 == 0 { "/plain" } else { "/hooked" };
            let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            s.write_all(upgrade_request(path, "").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let (status, _, _) = read_response(&mut s).await;
            if status != 101 {
                return Err(format!("upgrade answered {status}"));
            }
            // The gateway may stop reading (it closed); a failed write is an answer too.
            let _ = s.write_all(&input).await;
            let _ = s.shutdown().await;
            if drain(&mut s, END_BOUND).await {
                Ok(())
            } else {
                Err(format!(
                    "{path}: connection still open {END_BOUND:?} after the client's FIN"
                ))
            }
        },
    )
    .await;
    gw.shutdown().await;
}

/// A raw upstream: answers each upgrade with a 101, then writes the input named by the
/// request's path (`/<id>`), shuts its side, and reads until the gateway ends.
async fn raw_fuzz_upstream(
    inputs: Arc<Mutex<std::collections::HashMap<u64, Vec<u8>>>>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let inputs = inputs.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let id: u64 = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.trim_start_matches('/').parse().ok())
                    .unwrap_or(u64::MAX);
                let key = text
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| v.trim().to_owned())
                    })
                    .unwrap_or_default();
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                let input = inputs.lock().unwrap().remove(&id).unwrap_or_default();
                let _ = s.write_all(switching_head(&accept).as_bytes()).await;
                let _ = s.write_all(&input).await;
                let _ = s.shutdown().await;
                let _ = drain(&mut s, END_BOUND * 2).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_relay_from_upstream() {
    let inputs = Arc::new(Mutex::new(std::collections::HashMap::new()));
    let raw = raw_fuzz_upstream(inputs.clone()).await;
    let control = echo().await;
    let policies = hooked_policies();
    let raw_url = format!("ws://{raw}/{{id}}");
    let routes = format!(
        "{}{}{}",
        route_to("/plain/{id}", &raw_url, "", &[]),
        route_to("/hooked/{id}", &raw_url, "", &policies_ref(&policies)),
        route("/control", control.addr, "", &[]),
    );
    let gw = gateway_with_server("close_timeout = \"1s\"\nworkers = 2", &routes).await;
    let addr = gw.local_addr();
    // The client never answers a close frame, so each input waits out the close timeout:
    // many at once keep the run fast.
    fuzz_gateway(
        "frames_client",
        16,
        addr,
        "/control",
        |rng, seeds| relay_input(rng, seeds, false),
        move |i, input| {
            let inputs = inputs.clone();
            async move {
                inputs.lock().unwrap().insert(i, input);
                let path = if i % 2 == 0 { "plain" } else { "hooked" };
                let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                s.write_all(upgrade_request(&format!("/{path}/{i}"), "").as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let (status, _, _) = read_response(&mut s).await;
                if status != 101 {
                    return Err(format!("upgrade answered {status}"));
                }
                // The client reads what comes and answers nothing: the gateway must still end
                // the connection once the upstream has (its close handshake is bounded).
                if drain(&mut s, END_BOUND).await {
                    Ok(())
                } else {
                    Err(format!(
                        "/{path}: the client leg still open {END_BOUND:?} after the upstream's FIN"
                    ))
                }
            }
        },
    )
    .await;
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The Lua API with random argument types.

/// Lua values of every type a script can make, built on demand (`V[i](msg, ctx, conn, x)`,
/// where `x` is the phase's own object: `req` or `msg`).
const LUA_VALUES: &str = r#"
local selfref = {} selfref.self = selfref
local deep = {} do local t = deep for _ = 1, 300 do t.x = {} t = t.x end end
local V = {
  function() return nil end, function() return true end, function() return false end,
  function() return 0 end, function() return 1 end, function() return -1 end,
  function() return 200 end, function() return 1000 end, function() return 4999 end,
  function() return 65536 end, function() return 2^53 end, function() return math.maxinteger end,
  function() return math.mininteger end, function() return 0.5 end, function() return -0.0 end,
  function() return 1/0 end, function() return -1/0 end, function() return 0/0 end,
  function() return 1e308 end,
  function() return "" end, function() return "x" end, function() return "Host" end,
  function() return "x-custom" end, function() return "sec-websocket-key" end,
  function() return "a" end, function() return "\0" end, function() return "\255\254" end,
  function() return "bad\r\nheader: injected" end, function() return "12" end,
  function() return "ws://127.0.0.1:1/x" end, function() return "http://h/" end,
  function() return "{\"a\":[1,2,{\"b\":null}]}" end, function() return "[1,2" end,
  function() return string.rep("a", 200) end, function() return string.rep("b", 70000) end,
  function() return {} end, function() return {1, 2, 3} end,
  function() return {a = 1, b = {c = "d"}, [1] = true} end,
  function() return selfref end, function() return deep end,
  function() return {f = print} end,
  function() return setmetatable({}, {__index = function() error("index boom") end}) end,
  function() return setmetatable({}, {__tostring = function() error("tostring boom") end}) end,
  function() return setmetatable({}, {__tostring = function() return {} end}) end,
  function() return setmetatable({}, {__len = function() return -1 end}) end,
  function() return setmetatable({}, {__pairs = function() error("pairs boom") end}) end,
  function() return setmetatable({}, {__tostring = function() while true do end end}) end,
  function() return setmetatable({}, {__index = function(t, k) return t[k] end}) end,
  function() return function() end end, function() return function() error("boom") end end,
  function() return function() while true do end end end,
  function() return setmetatable({}, {__gc = function() while true do end end}) end,
  function() return setmetatable({}, {__gc = function() error("gc boom") end}) end,
  function() return setmetatable({}, {__close = function() while true do end end}) end,
  function() return "(.-)*$" end, function() return string.rep("a", 5000) .. "b" end,
  function() return print end, function() return coroutine.create(function() end) end,
  function() return coroutine.running() end,
  function(msg, ctx, conn, x) return msg end, function(msg, ctx, conn, x) return ctx end,
  function(msg, ctx, conn, x) return conn end, function(msg, ctx, conn, x) return x end,
  function() return gw end, function() return gw.shared end, function() return gw.json.null end,
  function() return gw.json end, function() return gw.log end,
  function(msg, ctx, conn) return conn and conn.state end,
  function(msg, ctx) return ctx and ctx.request end,
  function() return {[{}] = 1, [true] = 2, [1.5] = 3} end,
  function() return {gw.json.null, nil, 3} end,
}
local function args(plan, at, n, msg, ctx, conn, x)
  local a = {}
  for k = 1, n do
    local ok, v = pcall(V[(plan:byte(at + k) or 0) % #V + 1], msg, ctx, conn, x)
    a[k] = ok and v or nil
  end
  return a
end
local function run(plan, CALLS, msg, ctx, conn, x)
  local out, i = {}, 1
  while i <= #plan do
    local f = CALLS[plan:byte(i) % #CALLS + 1]
    local n = (plan:byte(i + 1) or 0) % 4
    local a = args(plan, i + 1, n, msg, ctx, conn, x)
    local ok, err = pcall(f, a, n, msg, ctx, conn, x)
    out[#out + 1] = ok and "ok" or type(err)
    i = i + 2 + n
  end
  return out
end
local U = table.unpack
local COMMON = {
  function(a, n) return gw.log.info(U(a, 1, n)) end,
  function(a, n) return gw.log.error(U(a, 1, n)) end,
  function(a, n) return gw.log.debug(U(a, 1, n)) end,
  function(a, n) return gw.log.warn(U(a, 1, n)) end,
  function(a, n) return gw.json.encode(U(a, 1, n)) end,
  function(a, n) return gw.json.decode(U(a, 1, n)) end,
  function(a, n) return gw.now(U(a, 1, n)) end,
  function(a, n) return gw.shared:get(U(a, 1, n)) end,
  function(a, n) return gw.shared:set(U(a, 1, n)) end,
  function(a, n) return gw.shared:incr(U(a, 1, n)) end,
  function(a, n) return gw.shared:delete(U(a, 1, n)) end,
  function(a, n) return gw.shared.get(U(a, 1, n)) end,
  function(a, n) return gw.shared.set(U(a, 1, n)) end,
  function(a, n) return gw.shared.incr(U(a, 1, n)) end,
  function(a) return gw[a[1]] end,
  function(a) gw[a[1]] = a[2] end,
  function(a, n, msg, ctx) return ctx[a[1]] end,
  function(a, n, msg, ctx) ctx[a[1]] = a[2] end,
  function(a, n, msg, ctx) return ctx.request and ctx.request.headers[a[1]] end,
  function(a, n, msg, ctx) for k, v in pairs(ctx) do local _ = tostring(k) .. tostring(v) end end,
  function(a) return tostring(a[1]) end,
  function(a) return xpcall(a[1], a[2]) end,
  function(a) return pcall(a[1], a[2]) end,
  function(a) return coroutine.wrap(a[1])(a[2]) end,
  function(a) return string.find(a[1], a[2]) end,
  function(a) return string.gsub(a[1], a[2], a[3]) end,
  function(a) return string.rep(a[1], a[2], a[3]) end,
  function(a) return string.format(a[1], a[2], a[3]) end,
  function(a) return table.concat(a[1], a[2]) end,
  function(a) return table.move(a[1], 1, a[2], 1, {}) end,
  function(a) return table.sort(a[1], a[2]) end,
  function(a) return setmetatable(a[1], a[2]) end,
  function(a) local t = a[1] a[1] = nil return t end,
}
local function with_common(calls)
  for _, f in ipairs(COMMON) do calls[#calls + 1] = f end
  return calls
end
"#;

/// The frame policy: the message is the plan (binary), the answer is a reply "done".
const LUA_FRAME: &str = r#"
local FRAME = with_common({
  function(a, n, msg, ctx, conn) return conn:reply(U(a, 1, n)) end,
  function(a, n, msg, ctx, conn) return conn:send_client(U(a, 1, n)) end,
  function(a, n, msg, ctx, conn) return conn:send_server(U(a, 1, n)) end,
  function(a, n, msg, ctx, conn) return conn:close(U(a, 1, n)) end,
  function(a, n, msg, ctx, conn) return conn.reply(U(a, 1, n)) end,
  function(a, n, msg, ctx, conn) return conn.close(U(a, 1, n)) end,
  function(a, n, msg, ctx, conn) return conn[a[1]] end,
  function(a, n, msg, ctx, conn) conn[a[1]] = a[2] end,
  function(a, n, msg, ctx, conn) conn.state[a[1]] = a[2] end,
  function(a, n, msg, ctx, conn) return conn.id, conn.state end,
  function(a, n, msg) return msg[a[1]] end,
  function(a, n, msg) msg[a[1]] = a[2] end,
  function(a, n, msg) return msg.type, msg.data, msg.size, msg.direction, msg.mime end,
  function(a, n, msg) return msg.json, msg.json_error, msg.text end,
  function(a, n, msg) return tostring(msg), #msg end,
})
return function(msg, ctx, conn)
  if msg.direction == "server" or msg.type == "text" then return nil end
  local plan = msg.data
  conn.state.plan = plan
  local out = run(plan, FRAME, msg, ctx, conn, msg)
  pcall(conn.reply, conn, "done " .. #out)
  return false
end
"#;

/// The close policy: runs the connection's last frame plan again, with `info` for `msg`.
const LUA_CLOSE: &str = r#"
local CLOSE = with_common({
  function(a, n, info, ctx, conn) return conn:reply(U(a, 1, n)) end,
  function(a, n, info, ctx, conn) return conn:close(U(a, 1, n)) end,
  function(a, n, info, ctx, conn) return conn:send_server(U(a, 1, n)) end,
  function(a, n, info, ctx, conn) conn.state[a[1]] = a[2] end,
  function(a, n, info) return info[a[1]] end,
  function(a, n, info) info[a[1]] = a[2] end,
  function(a, n, info) return info.code, info.reason, info.by, info.duration, info.undelivered end,
})
return function(ctx, conn, info)
  run(conn.state.plan or "", CLOSE, info, ctx, conn, info)
end
"#;

/// The upgrade policy: the plan comes hex-encoded in `?plan=`; the answer is a 299.
const LUA_UPGRADE: &str = r#"
local REQ = with_common({
  function(a, n, _, ctx, _, req) return req:reject(U(a, 1, n)) end,
  function(a, n, _, ctx, _, req) return req:set_upstream(U(a, 1, n)) end,
  function(a, n, _, ctx, _, req) return req:set_header(U(a, 1, n)) end,
  function(a, n, _, ctx, _, req) return req:select_subprotocol(U(a, 1, n)) end,
  function(a, n, _, ctx, _, req) return req:expire_in(U(a, 1, n)) end,
  function(a, n, _, ctx, _, req) return req:expire_at(U(a, 1, n)) end,
  function(a, n, _, ctx, _, req) return req:header_values(U(a, 1, n)) end,
  function(a, n, _, ctx, _, req) return req.set_header(U(a, 1, n)) end,
  function(a, n, _, ctx, _, req) return req[a[1]] end,
  function(a, n, _, ctx, _, req) req[a[1]] = a[2] end,
  function(a, n, _, ctx, _, req) return req.headers[a[1]], req.query[a[1]], req.params[a[1]] end,
  function(a, n, _, ctx, _, req) return req.subprotocols[a[1]], #req.subprotocols end,
  function(a, n, _, ctx, _, req) req.headers[a[1]] = a[2] end,
  function(a, n, _, ctx, _, req) return req.method, req.path, req.query_string, req.client_ip, req.scheme, req.host end,
  function(a, n, _, ctx, _, req) for k, v in pairs(req.headers) do local _ = k .. v end end,
})
return function(req, ctx)
  local hex = req.query.plan or ""
  local plan = hex:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
  local out = run(plan, REQ, nil, ctx, nil, req)
  return req:reject(299, "done " .. #out)
end
"#;

/// How the Lua plans ended ("done", "closed", 299, 500), to show what the run reached.
static OUTCOMES: Mutex<std::collections::BTreeMap<String, u64>> =
    Mutex::new(std::collections::BTreeMap::new());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_lua_api() {
    let up = echo().await;
    let frame = script("fuzz_frame.lua", &format!("{LUA_VALUES}{LUA_FRAME}"));
    let upgrade = script("fuzz_upgrade.lua", &format!("{LUA_VALUES}{LUA_UPGRADE}"));
    let close = script("fuzz_close.lua", &format!("{LUA_VALUES}{LUA_CLOSE}"));
    let routes = format!(
        "{}{}",
        route(
            "/frame",
            up.addr,
            // 50 ms rather than the default 10: the limit is wall-clock time, and loading the
            // scripts on a loaded machine took longer than 10 ms at times.
            "mime_type = \"application/json\"\npolicy_cpu_limit = \"50ms\"",
            &[
                ("on_client_frame", frame.as_str()),
                ("on_server_frame", frame.as_str()),
                ("on_close", close.as_str()),
            ],
        ),
        route(
            "/upgrade",
            up.addr,
            "policy_cpu_limit = \"50ms\"",
            &[("on_upgrade", upgrade.as_str())],
        ),
    );
    let gw = gateway_with_server("close_timeout = \"1s\"\nworkers = 2", &routes).await;
    let addr = gw.local_addr();
    // Each call may use its whole CPU limit (50 ms) and a plan has at most ~80 calls.
    let bound = Duration::from_secs(8);
    fuzz_gateway(
        "lua",
        4,
        addr,
        "/frame",
        |rng, seeds| {
            let mut plan = mutate(rng, seeds, 160);
            if rng.chance(2) {
                plan = (0..1 + rng.below(60)).map(|_| rng.byte()).collect();
            }
            plan
        },
        move |i, plan| async move {
            if i % 2 == 0 {
                let mut ws = connect(addr, "/frame").await;
                ws.send(Message::binary(plan))
                    .await
                    .map_err(|e| e.to_string())?;
                let end = tokio::time::timeout(bound, async {
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Text(t))) if t.starts_with("done") => return "done",
                            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return "closed",
                            Some(Ok(_)) => {}
                        }
                    }
                })
                .await;
                match end {
                    Ok(how) => {
                        OUTCOMES
                            .lock()
                            .unwrap()
                            .entry(how.to_owned())
                            .and_modify(|n| *n += 1)
                            .or_insert(1);
                        Ok(())
                    }
                    Err(_) => Err(format!("no answer to a frame plan within {bound:?}")),
                }
            } else {
                let hex: String = plan.iter().map(|b| format!("{b:02x}")).collect();
                let request = upgrade_request(
                    &format!("/upgrade?plan={hex}"),
                    "Sec-WebSocket-Protocol: a, b\r\nX-Multi: 1\r\nX-Multi: 2\r\n",
                );
                let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                s.write_all(request.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                match tokio::time::timeout(bound, read_response(&mut s)).await {
                    // 299: the plan ran; 500: the policy failed (a clean, logged error).
                    Ok((status @ (299 | 500), _, _)) => {
                        OUTCOMES
                            .lock()
                            .unwrap()
                            .entry(status.to_string())
                            .and_modify(|n| *n += 1)
                            .or_insert(1);
                        Ok(())
                    }
                    Ok((status, head, _)) => Err(format!("upgrade plan answered {status}: {head}")),
                    Err(_) => Err(format!("no answer to an upgrade plan within {bound:?}")),
                }
            }
        },
    )
    .await;
    eprintln!("fuzz lua: outcomes {:?}", OUTCOMES.lock().unwrap());
    gw.shutdown().await;
}
