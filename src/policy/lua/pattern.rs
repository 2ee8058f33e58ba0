//! Lua 5.4's pattern matching (`string.find`, `string.match`, `string.gmatch`, `string.gsub`),
//! ported from lstrlib.c so that a long match stops at the running call's CPU deadline.
//!
//! Lua's C versions never return to the VM while they match, so the instruction hook that
//! enforces `policy_cpu_limit` cannot stop a backtracking pattern. This port counts its steps
//! (each recursive match, and each byte scanned by a repetition, a `%b` or a back-reference) and
//! reads the clock every [`CHECK_EVERY`] steps; past the deadline it fails with the hook's own
//! "CPU limit exceeded" error. Everything else follows lstrlib.c line by line: the same results,
//! captures and positions, the same recursion limit (200, "pattern too complex") and the same
//! error messages, raised as Lua strings by a thin Lua wrapper so that `pcall` sees what it
//! would see with the C functions. `string.find` with `plain` (or a pattern without specials)
//! searches with `memchr::memmem`, in linear time.
//!
//! The functions replace those of the VM's real `string` table before the sandbox copies it, so
//! both `string.find(s, p)` and `s:find(p)` reach them. Matching works on the bytes of the Lua
//! strings in place; captures are ranges until they are returned.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use memchr::{memchr, memmem};
use mlua::{IntoLuaMulti, Lua, LuaString, MultiValue, Table, Value};

use super::Budget;

/// Steps between two reads of the clock: a few microseconds of matching.
const CHECK_EVERY: usize = 1 << 14;
/// Lua's MAXCCALLS: how deep `match` may recurse.
const MAXCCALLS: u32 = 200;
/// Lua's LUA_MAXCAPTURES.
const MAXCAPTURES: usize = 32;
const L_ESC: u8 = b'%';
const SPECIALS: &[u8] = b"^$*+?.([%-";
const CAP_UNFINISHED: isize = -1;
const CAP_POSITION: isize = -2;

/// Why a match stopped early.
enum Fail {
    /// A malformed pattern or capture: Lua raises this message.
    Pattern(String),
    /// The running call is past its CPU deadline.
    Cpu,
}

/// An error of one of the functions, sorted by how it reaches the script.
enum Raise {
    /// Raised as a Lua string by the wrapper, located at the caller's line as `luaL_error`
    /// would locate it.
    Message(String),
    /// Left to mlua (the CPU limit, memory).
    Lua(mlua::Error),
}

impl From<mlua::Error> for Raise {
    fn from(e: mlua::Error) -> Raise {
        Raise::Lua(e)
    }
}

type Outcome<T> = Result<T, Raise>;

/// Reads the CPU budget of the running call (see [`Budget`]), starting its clock if the
/// instruction hook has not yet.
struct Clock {
    budget: Rc<Cell<Budget>>,
}

impl Clock {
    fn past_deadline(&self) -> bool {
        match self.budget.get() {
            Budget::Armed(limit) => {
                self.budget.set(Budget::Running(Instant::now() + limit));
                false
            }
            running => running.is_over(),
        }
    }

    /// The hook's error, located at the line that called the function.
    fn error(lua: &Lua) -> mlua::Error {
        mlua::Error::runtime(match caller(lua) {
            Some(location) => format!("{location}: CPU limit exceeded"),
            None => "CPU limit exceeded".to_owned(),
        })
    }
}

/// `file:line` of the Lua code that called the running function, skipping the wrappers, as
/// `luaL_where` gives it (`None` when the caller is not a Lua function).
///
/// A wrapper that was tail-called (`return s:find(p)`) has replaced its caller's frame, so the
/// line is then that of the caller's caller, as for any Lua function's `error(message, 2)`.
fn caller(lua: &Lua) -> Option<String> {
    (1..16)
        .map_while(|level| {
            lua.inspect_stack(level, |d| {
                let source = d.source();
                if source.source.as_deref() == Some(CHUNK) {
                    return None;
                }
                // A C caller (pcall) gives no position.
                let src = source.short_src.as_deref().unwrap_or("?");
                Some(d.current_line().map(|line| format!("{src}:{line}")))
            })
        })
        .flatten()
        .next()
        .flatten()
}

#[derive(Clone, Copy)]
struct Capture {
    init: usize,
    /// A length, or [`CAP_UNFINISHED`] or [`CAP_POSITION`].
    len: isize,
}

/// One capture's value: a range of the subject or a position (1-based).
enum Cap {
    Range(usize, usize),
    Position(usize),
}

/// lstrlib.c's MatchState, plus the step counter.
struct Matcher<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    depth: u32,
    level: usize,
    capture: [Capture; MAXCAPTURES],
    /// Steps left before the next read of the clock.
    left: usize,
    clock: &'a Clock,
}

impl<'a> Matcher<'a> {
    fn new(src: &'a [u8], pat: &'a [u8], clock: &'a Clock) -> Matcher<'a> {
        Matcher {
            src,
            pat,
            depth: MAXCCALLS,
            level: 0,
            capture: [Capture { init: 0, len: 0 }; MAXCAPTURES],
            left: CHECK_EVERY,
            clock,
        }
    }

    fn reprep(&mut self) {
        self.depth = MAXCCALLS;
        self.level = 0;
    }

    /// Counts `n` steps; reads the clock when a batch of steps is used up.
    #[inline]
    fn charge(&mut self, n: usize) -> Result<(), Fail> {
        if n < self.left {
            self.left -= n;
            Ok(())
        } else {
            self.left = CHECK_EVERY;
            if self.clock.past_deadline() {
                Err(Fail::Cpu)
            } else {
                Ok(())
            }
        }
    }

    /// The pattern byte at `i`; the terminating NUL of a Lua string past its end.
    #[inline]
    fn pc(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    /// The subject byte at `i`; the terminating NUL at its end.
    #[inline]
    fn sc(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn check_capture(&self, l: u8) -> Result<usize, Fail> {
        let l = i32::from(l) - i32::from(b'1');
        if l < 0 || l as usize >= self.level || self.capture[l as usize].len == CAP_UNFINISHED {
            return Err(pattern_error(format!("invalid capture index %{}", l + 1)));
        }
        Ok(l as usize)
    }

    fn capture_to_close(&self) -> Result<usize, Fail> {
        (0..self.level)
            .rev()
            .find(|&l| self.capture[l].len == CAP_UNFINISHED)
            .ok_or_else(|| pattern_error("invalid pattern capture"))
    }

    fn classend(&self, p: usize) -> Result<usize, Fail> {
        let c = self.pc(p);
        let mut p = p + 1;
        match c {
            L_ESC => {
                if p == self.pat.len() {
                    return Err(pattern_error("malformed pattern (ends with '%')"));
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.pc(p) == b'^' {
                    p += 1;
                }
                loop {
                    if p == self.pat.len() {
                        return Err(pattern_error("malformed pattern (missing ']')"));
                    }
                    let c = self.pc(p);
                    p += 1;
                    if c == L_ESC && p < self.pat.len() {
                        p += 1;
                    }
                    if self.pc(p) == b']' {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    /// `p` is the `[` of a set and `ec` its `]`.
    fn matchbracketclass(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.pc(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !sig;
            }
            let pc = self.pc(p);
            if pc == L_ESC {
                p += 1;
                if match_class(c, self.pc(p)) {
                    return sig;
                }
            } else if self.pc(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.pc(p - 2) <= c && c <= self.pc(p) {
                    return sig;
                }
            } else if pc == c {
                return sig;
            }
        }
    }

    #[inline]
    fn singlematch(&self, s: usize, p: usize, ep: usize) -> bool {
        let Some(&c) = self.src.get(s) else {
            return false;
        };
        match self.pc(p) {
            b'.' => true,
            L_ESC => match_class(c, self.pc(p + 1)),
            b'[' => self.matchbracketclass(c, p, ep - 1),
            pc => pc == c,
        }
    }

    fn matchbalance(&mut self, s: usize, p: usize) -> Result<Option<usize>, Fail> {
        if p + 1 >= self.pat.len() {
            return Err(pattern_error(
                "malformed pattern (missing arguments to '%b')",
            ));
        }
        if self.sc(s) != self.pat[p] {
            return Ok(None);
        }
        let (b, e) = (self.pat[p], self.pat[p + 1]);
        let mut cont = 1usize;
        for i in s + 1..self.src.len() {
            let c = self.src[i];
            if c == e {
                cont -= 1;
                if cont == 0 {
                    self.charge((i - s) % CHECK_EVERY)?;
                    return Ok(Some(i + 1));
                }
            } else if c == b {
                cont += 1;
            }
            if (i - s) % CHECK_EVERY == 0 {
                self.charge(CHECK_EVERY)?;
            }
        }
        Ok(None)
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Result<Option<usize>, Fail> {
        let mut i = 0;
        while self.singlematch(s + i, p, ep) {
            i += 1;
            if i % CHECK_EVERY == 0 {
                self.charge(CHECK_EVERY)?;
            }
        }
        self.charge(i % CHECK_EVERY)?;
        loop {
            if let Some(res) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(res));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Result<Option<usize>, Fail> {
        loop {
            if let Some(res) = self.do_match(s, ep + 1)? {
                return Ok(Some(res));
            }
            if self.singlematch(s, p, ep) {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: isize) -> Result<Option<usize>, Fail> {
        let level = self.level;
        if level >= MAXCAPTURES {
            return Err(pattern_error("too many captures"));
        }
        self.capture[level] = Capture { init: s, len: what };
        self.level = level + 1;
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.level -= 1;
        }
        Ok(res)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Result<Option<usize>, Fail> {
        let l = self.capture_to_close()?;
        self.capture[l].len = (s - self.capture[l].init) as isize;
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.capture[l].len = CAP_UNFINISHED;
        }
        Ok(res)
    }

    fn match_capture(&mut self, s: usize, l: u8) -> Result<Option<usize>, Fail> {
        let l = self.check_capture(l)?;
        let Capture { init, len } = self.capture[l];
        // A position capture has no text: C compares it as a huge size_t, which never fits.
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        self.charge(len)?;
        if self.src.len() - s >= len && self.src[init..init + len] == self.src[s..s + len] {
            Ok(Some(s + len))
        } else {
            Ok(None)
        }
    }

    /// lstrlib.c's `match`: where the match of `pat[p..]` at `s` ends, if it matches.
    fn do_match(&mut self, mut s: usize, mut p: usize) -> Result<Option<usize>, Fail> {
        if self.depth == 0 {
            return Err(pattern_error("pattern too complex"));
        }
        self.depth -= 1;
        self.charge(1)?;
        // Each `continue` is C's `goto init` (a tail call); each `break` returns its value.
        let res = loop {
            if p == self.pat.len() {
                break Some(s);
            }
            match self.pat[p] {
                b'(' => {
                    break if self.pc(p + 1) == b')' {
                        self.start_capture(s, p + 2, CAP_POSITION)?
                    } else {
                        self.start_capture(s, p + 1, CAP_UNFINISHED)?
                    };
                }
                b')' => break self.end_capture(s, p + 1)?,
                b'$' if p + 1 == self.pat.len() => break (s == self.src.len()).then_some(s),
                L_ESC if self.pc(p + 1) == b'b' => match self.matchbalance(s, p + 2)? {
                    Some(e) => {
                        s = e;
                        p += 4;
                    }
                    None => break None,
                },
                L_ESC if self.pc(p + 1) == b'f' => {
                    p += 2;
                    if self.pc(p) != b'[' {
                        return Err(pattern_error("missing '[' after '%f' in pattern"));
                    }
                    let ep = self.classend(p)?;
                    let previous = if s == 0 { 0 } else { self.src[s - 1] };
                    if !self.matchbracketclass(previous, p, ep - 1)
                        && self.matchbracketclass(self.sc(s), p, ep - 1)
                    {
                        p = ep;
                    } else {
                        break None;
                    }
                }
                L_ESC if self.pc(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.pc(p + 1))? {
                        Some(e) => {
                            s = e;
                            p += 2;
                        }
                        None => break None,
                    }
                }
                _ => {
                    let ep = self.classend(p)?;
                    let suffix = self.pc(ep);
                    if !self.singlematch(s, p, ep) {
                        if matches!(suffix, b'*' | b'?' | b'-') {
                            p = ep + 1;
                            continue;
                        }
                        break None;
                    }
                    match suffix {
                        b'?' => {
                            if let Some(res) = self.do_match(s + 1, ep + 1)? {
                                break Some(res);
                            }
                            p = ep + 1;
                        }
                        b'+' => break self.max_expand(s + 1, p, ep)?,
                        b'*' => break self.max_expand(s, p, ep)?,
                        b'-' => break self.min_expand(s, p, ep)?,
                        _ => {
                            s += 1;
                            p = ep;
                        }
                    }
                }
            }
        };
        self.depth += 1;
        Ok(res)
    }

    /// Capture `i` of the match `s..e` (the whole match when there are no captures).
    fn get_capture(&self, i: usize, s: usize, e: usize) -> Result<Cap, Fail> {
        if i >= self.level {
            if i != 0 {
                return Err(pattern_error(format!("invalid capture index %{}", i + 1)));
            }
            return Ok(Cap::Range(s, e));
        }
        let Capture { init, len } = self.capture[i];
        match len {
            CAP_UNFINISHED => Err(pattern_error("unfinished capture")),
            CAP_POSITION => Ok(Cap::Position(init + 1)),
            len => Ok(Cap::Range(init, init + len as usize)),
        }
    }

    fn capture_value(&self, lua: &Lua, i: usize, s: usize, e: usize) -> Outcome<Value> {
        Ok(
            match self.get_capture(i, s, e).map_err(|f| raise(lua, f))? {
                Cap::Range(a, b) => Value::String(lua.create_string(&self.src[a..b])?),
                Cap::Position(at) => Value::Integer(at as i64),
            },
        )
    }

    /// Appends the captures to `out`: the whole match `s..e` when there are none and `whole`.
    fn push_captures(
        &self,
        lua: &Lua,
        out: &mut MultiValue,
        whole: Option<(usize, usize)>,
    ) -> Outcome<()> {
        let (s, e) = whole.unwrap_or((0, 0));
        let n = if self.level == 0 && whole.is_some() {
            1
        } else {
            self.level
        };
        for i in 0..n {
            out.push_back(self.capture_value(lua, i, s, e)?);
        }
        Ok(())
    }
}

fn pattern_error(message: impl Into<String>) -> Fail {
    Fail::Pattern(message.into())
}

fn raise(lua: &Lua, fail: Fail) -> Raise {
    match fail {
        Fail::Pattern(message) => Raise::Message(message),
        Fail::Cpu => Raise::Lua(Clock::error(lua)),
    }
}

/// C's ctype classes in the "C" locale, as `match_class` uses them.
fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c < 0x20 || c == 0x7f,
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0,
        _ => return cl == c,
    };
    if cl.is_ascii_lowercase() {
        res
    } else {
        !res
    }
}

/// lstrlib.c's `posrelatI`: a 1-based start position from an argument that may be negative.
fn posrelat(pos: i64, len: usize) -> usize {
    if pos > 0 {
        pos as usize
    } else if pos == 0 || pos.unsigned_abs() > len as u64 {
        1
    } else {
        len - pos.unsigned_abs() as usize + 1
    }
}

/// The functions' names, for argument errors.
#[derive(Clone, Copy)]
enum Name {
    Find,
    Match,
    Gmatch,
    Gsub,
}

impl Name {
    fn short(self) -> &'static str {
        match self {
            Name::Find => "find",
            Name::Match => "match",
            Name::Gmatch => "gmatch",
            Name::Gsub => "gsub",
        }
    }
}

/// `luaL_argerror`, for a function called through its Lua wrapper (stack level 1).
fn arg_error(lua: &Lua, name: Name, arg: usize, extra: &str) -> Raise {
    let (called, what) = lua
        .inspect_stack(1, |d| {
            let names = d.names();
            (names.name.map(|n| n.into_owned()), names.name_what)
        })
        .unwrap_or((None, None));
    let mut arg = arg;
    if what == Some("method") {
        arg -= 1;
        if arg == 0 {
            return Raise::Message(format!(
                "calling '{}' on bad self ({extra})",
                called.as_deref().unwrap_or("?")
            ));
        }
    }
    let called = called.unwrap_or_else(|| format!("string.{}", name.short()));
    Raise::Message(format!("bad argument #{arg} to '{called}' ({extra})"))
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::LightUserData(_) => "light userdata",
        Value::Error(_) => "userdata",
        other => other.type_name(),
    }
}

/// `luaL_checklstring`: a string, or a number as Lua writes it.
fn check_string(lua: &Lua, value: Value, name: Name, arg: usize) -> Outcome<LuaString> {
    match value {
        Value::String(s) => Ok(s),
        v @ (Value::Integer(_) | Value::Number(_)) => Ok(lua
            .coerce_string(v)?
            .expect("a number converts to a string")),
        other => Err(arg_error(
            lua,
            name,
            arg,
            &format!("string expected, got {}", type_name(&other)),
        )),
    }
}

/// `luaL_optinteger`.
fn opt_integer(lua: &Lua, value: Value, default: i64, name: Name, arg: usize) -> Outcome<i64> {
    match value {
        Value::Nil => Ok(default),
        Value::Integer(i) => Ok(i),
        Value::Boolean(_)
        | Value::Table(_)
        | Value::Function(_)
        | Value::Thread(_)
        | Value::UserData(_)
        | Value::LightUserData(_) => Err(arg_error(
            lua,
            name,
            arg,
            &format!("number expected, got {}", type_name(&value)),
        )),
        other => {
            if let Some(i) = lua.coerce_integer(other.clone())? {
                return Ok(i);
            }
            let extra = if lua.coerce_number(other.clone())?.is_some() {
                "number has no integer representation".to_owned()
            } else {
                format!("number expected, got {}", type_name(&other))
            };
            Err(arg_error(lua, name, arg, &extra))
        }
    }
}

/// What a function gives its wrapper: its results, or `false` and the message to raise.
fn deliver(lua: &Lua, outcome: Outcome<MultiValue>) -> mlua::Result<MultiValue> {
    match outcome {
        Ok(values) => Ok(values),
        Err(Raise::Message(message)) => {
            let message = match caller(lua) {
                Some(location) => format!("{location}: {message}"),
                None => message,
            };
            (false, message).into_lua_multi(lua)
        }
        Err(Raise::Lua(e)) => Err(e),
    }
}

/// `str_find_aux`.
fn find_aux(
    lua: &Lua,
    clock: &Clock,
    (s, p, init, plain): (Value, Value, Value, Value),
    find: bool,
) -> Outcome<MultiValue> {
    let name = if find { Name::Find } else { Name::Match };
    let s = check_string(lua, s, name, 1)?;
    let p = check_string(lua, p, name, 2)?;
    let (s, p) = (s.as_bytes(), p.as_bytes());
    let (s, p): (&[u8], &[u8]) = (&s, &p);
    let init = posrelat(opt_integer(lua, init, 1, name, 3)?, s.len()) - 1;
    let mut out = MultiValue::with_capacity(2);
    if init > s.len() {
        out.push_back(Value::Nil);
        return Ok(out);
    }
    let plain = !matches!(plain, Value::Nil | Value::Boolean(false));
    if find && (plain || !p.iter().any(|c| SPECIALS.contains(c))) {
        let found = match p.len() {
            0 => Some(0),
            1 => memchr(p[0], &s[init..]),
            _ => memmem::find(&s[init..], p),
        };
        match found {
            Some(at) => {
                out.push_back(Value::Integer((init + at + 1) as i64));
                out.push_back(Value::Integer((init + at + p.len()) as i64));
            }
            None => out.push_back(Value::Nil),
        }
        return Ok(out);
    }
    let anchor = p.first() == Some(&b'^');
    let p = if anchor { &p[1..] } else { p };
    let mut m = Matcher::new(s, p, clock);
    let mut s1 = init;
    loop {
        m.reprep();
        if let Some(e) = m.do_match(s1, 0).map_err(|f| raise(lua, f))? {
            if find {
                out.push_back(Value::Integer(s1 as i64 + 1));
                out.push_back(Value::Integer(e as i64));
                m.push_captures(lua, &mut out, None)?;
            } else {
                m.push_captures(lua, &mut out, Some((s1, e)))?;
            }
            return Ok(out);
        }
        s1 += 1;
        if s1 > s.len() || anchor {
            break;
        }
    }
    out.push_back(Value::Nil);
    Ok(out)
}

/// `gmatch`: an iterator over the matches, from `init`.
fn gmatch(
    lua: &Lua,
    clock: &Rc<Clock>,
    (s, p, init): (Value, Value, Value),
) -> Outcome<MultiValue> {
    let s = check_string(lua, s, Name::Gmatch, 1)?;
    let p = check_string(lua, p, Name::Gmatch, 2)?;
    let len = s.as_bytes().len();
    let init = posrelat(opt_integer(lua, init, 1, Name::Gmatch, 3)?, len) - 1;
    // Where the next search starts, and where the last match ended.
    let next = Cell::new(init.min(len + 1));
    let last: Cell<Option<usize>> = Cell::new(None);
    let clock = clock.clone();
    let iterator = lua.create_function(move |lua, ()| {
        let outcome = (|| {
            let (src, pat) = (s.as_bytes(), p.as_bytes());
            let mut m = Matcher::new(&src, &pat, &clock);
            let mut out = MultiValue::new();
            let mut at = next.get();
            while at <= src.len() {
                m.reprep();
                if let Some(e) = m.do_match(at, 0).map_err(|f| raise(lua, f))? {
                    if Some(e) != last.get() {
                        next.set(e);
                        last.set(Some(e));
                        m.push_captures(lua, &mut out, Some((at, e)))?;
                        return Ok(out);
                    }
                }
                at += 1;
            }
            next.set(at);
            Ok(out)
        })();
        deliver(lua, outcome)
    })?;
    Ok(MultiValue::from_vec(vec![Value::Function(iterator)]))
}

/// `str_gsub`'s state. With a string replacement it runs to the end in one call; with a table
/// or a function it stops at each match and hands the captures to the Lua wrapper, which
/// computes the replacement value and resumes it. So Lua code called for a replacement never
/// runs under a Rust frame: it is not limited by (nor can it exhaust) the worker's stack, and its
/// errors reach the caller as they were raised.
struct Gsub {
    subject: LuaString,
    pattern: LuaString,
    /// The replacement string, if it is one (or a number).
    text: Option<LuaString>,
    /// A table replacement is indexed with the first capture only.
    table: bool,
    anchor: bool,
    max: i64,
    /// Where the next match is tried.
    at: usize,
    /// The subject from `copied` to `at` is unchanged and not yet in `out`.
    copied: usize,
    last: Option<usize>,
    n: i64,
    changed: bool,
    out: Output,
    /// The match whose replacement value the wrapper is computing.
    pending: Option<(usize, usize)>,
}

/// `str_gsub`, up to the checks of its arguments.
fn gsub(
    lua: &Lua,
    clock: &Rc<Clock>,
    (s, p, repl, max): (Value, Value, Value, Value),
) -> Outcome<MultiValue> {
    let subject = check_string(lua, s, Name::Gsub, 1)?;
    let pattern = check_string(lua, p, Name::Gsub, 2)?;
    let len = subject.as_bytes().len();
    let max = opt_integer(lua, max, len as i64 + 1, Name::Gsub, 4)?;
    let (text, table) = match repl {
        v @ (Value::String(_) | Value::Integer(_) | Value::Number(_)) => (
            Some(lua.coerce_string(v)?.expect("a string or number converts")),
            false,
        ),
        Value::Table(_) => (None, true),
        Value::Function(_) => (None, false),
        other => {
            return Err(arg_error(
                lua,
                Name::Gsub,
                3,
                &format!("string/function/table expected, got {}", type_name(&other)),
            ))
        }
    };
    let anchor = pattern.as_bytes().first() == Some(&b'^');
    let mut state = Gsub {
        subject,
        pattern,
        text,
        table,
        anchor,
        max,
        at: 0,
        copied: 0,
        last: None,
        n: 0,
        changed: false,
        out: Output::new(),
        pending: None,
    };
    if state.text.is_some() {
        return state.run(lua, clock, Value::Nil);
    }
    let state = RefCell::new(state);
    let clock = clock.clone();
    let step = lua.create_function(move |lua, value: Value| {
        let outcome = state.borrow_mut().run(lua, &clock, value);
        deliver(lua, outcome)
    })?;
    Ok(MultiValue::from_vec(vec![
        Value::Boolean(true),
        Value::Function(step),
        Value::Boolean(table),
    ]))
}

impl Gsub {
    /// Takes `value`, the replacement of the pending match, and runs to the next match that
    /// needs one (`true, captures...`) or to the end (`result, n`).
    fn run(&mut self, lua: &Lua, clock: &Clock, value: Value) -> Outcome<MultiValue> {
        let (subject, pattern) = (self.subject.as_bytes(), self.pattern.as_bytes());
        let src: &[u8] = &subject;
        let pat = &pattern[usize::from(self.anchor)..];
        let mut m = Matcher::new(src, pat, clock);
        let text = self.text.as_ref().map(LuaString::as_bytes);
        let resumed = match self.pending.take() {
            Some((s, e)) => {
                match value {
                    Value::Nil | Value::Boolean(false) => self.out.extend(lua, &src[s..e])?,
                    v @ (Value::String(_) | Value::Integer(_) | Value::Number(_)) => {
                        let text = lua.coerce_string(v)?.expect("a string or number converts");
                        self.out.extend(lua, &text.as_bytes())?;
                        self.changed = true;
                    }
                    other => {
                        return Err(Raise::Message(format!(
                            "invalid replacement value (a {})",
                            type_name(&other)
                        )))
                    }
                }
                true
            }
            None => false,
        };
        if !(resumed && self.anchor) {
            while self.n < self.max {
                m.reprep();
                let at = self.at;
                match m.do_match(at, 0).map_err(|f| raise(lua, f))? {
                    Some(e) if Some(e) != self.last => {
                        self.n += 1;
                        self.out.extend(lua, &src[self.copied..at])?;
                        self.at = e;
                        self.copied = e;
                        self.last = Some(e);
                        match &text {
                            Some(text) => {
                                add_s(lua, &m, &mut self.out, at, e, text)?;
                                self.changed = true;
                            }
                            None => {
                                self.pending = Some((at, e));
                                let mut out = MultiValue::with_capacity(m.level.max(1) + 1);
                                out.push_back(Value::Boolean(true));
                                if self.table {
                                    out.push_back(m.capture_value(lua, 0, at, e)?);
                                } else {
                                    m.push_captures(lua, &mut out, Some((at, e)))?;
                                }
                                return Ok(out);
                            }
                        }
                    }
                    _ if at < src.len() => self.at += 1,
                    _ => break,
                }
                if self.anchor {
                    break;
                }
            }
        }
        let result = if self.changed {
            self.out.extend(lua, &src[self.copied..])?;
            Value::String(lua.create_string(&self.out.bytes)?)
        } else {
            Value::String(self.subject.clone())
        };
        Ok(MultiValue::from_vec(vec![result, Value::Integer(self.n)]))
    }
}

/// `gsub`'s result as it is built. It lives outside Lua's heap, so it is held to what the
/// running call may still allocate there.
struct Output {
    bytes: Vec<u8>,
    /// How long `bytes` may grow before the call's memory headroom is read again.
    allowed: usize,
}

impl Output {
    fn new() -> Output {
        Output {
            bytes: Vec::new(),
            allowed: 64 * 1024,
        }
    }

    fn extend(&mut self, lua: &Lua, more: &[u8]) -> Outcome<()> {
        let wanted = self.bytes.len() + more.len();
        if wanted > self.allowed {
            // 0 means no limit (no call is running).
            let limit = lua.set_memory_limit(0)?;
            lua.set_memory_limit(limit)?;
            self.allowed = if limit == 0 {
                usize::MAX
            } else {
                limit.saturating_sub(lua.used_memory())
            };
            if wanted > self.allowed {
                return Err(Raise::Lua(mlua::Error::MemoryError(
                    "not enough memory".to_owned(),
                )));
            }
        }
        self.bytes.extend_from_slice(more);
        Ok(())
    }
}

/// `add_s`: a replacement string with `%0`-`%9` and `%%`.
fn add_s(lua: &Lua, m: &Matcher, out: &mut Output, s: usize, e: usize, news: &[u8]) -> Outcome<()> {
    let mut rest = news;
    while let Some(k) = memchr(L_ESC, rest) {
        out.extend(lua, &rest[..k])?;
        let c = rest.get(k + 1).copied().unwrap_or(0);
        if c == L_ESC {
            out.extend(lua, b"%")?;
        } else if c == b'0' {
            out.extend(lua, &m.src[s..e])?;
        } else if c.is_ascii_digit() {
            match m
                .get_capture(usize::from(c - b'1'), s, e)
                .map_err(|f| raise(lua, f))?
            {
                Cap::Range(a, b) => out.extend(lua, &m.src[a..b])?,
                Cap::Position(at) => out.extend(lua, at.to_string().as_bytes())?,
            }
        } else {
            return Err(Raise::Message(
                "invalid use of '%' in replacement string".to_owned(),
            ));
        }
        rest = &rest[k + 2..];
    }
    out.extend(lua, rest)
}

/// The Lua side: raises what the functions return as `false, message` (the message located
/// already), and computes `gsub`'s table and function replacements.
const WRAPPERS: &str = r#"
local string, find, match, gmatch, gsub = ...
local error = error
local function check(ok, ...)
  if ok == false then error((...), 0) end
  return ok, ...
end
local function by_function(step, f, ok, ...)
  if ok ~= true then return ok, ... end
  return by_function(step, f, step((f(...))))
end
local function by_table(step, t, ok, key)
  if ok ~= true then return ok, key end
  return by_table(step, t, step(t[key]))
end
string.find = function(...) return check(find(...)) end
string.match = function(...) return check(match(...)) end
string.gmatch = function(...)
  local iterator, message = gmatch(...)
  if iterator == false then error(message, 0) end
  return function() return check(iterator()) end
end
string.gsub = function(...)
  local result, n, table = gsub(...)
  if result == true then
    local _, _, replacement = ...
    if table then return check(by_table(n, replacement, n())) end
    return check(by_function(n, replacement, n()))
  end
  if result == false then error(n, 0) end
  return result, n
end
"#;

/// The name of the wrapper chunk, which stack walks skip.
const CHUNK: &str = "=framegate patterns";

/// Replaces the pattern functions of `lua`'s `string` table with this module's. `budget` is
/// the running call's CPU budget, shared with the instruction hook.
pub(super) fn install(lua: &Lua, budget: Rc<Cell<Budget>>) -> mlua::Result<()> {
    let clock = Rc::new(Clock { budget });
    let c = clock.clone();
    let find = lua.create_function(move |lua, args: (Value, Value, Value, Value)| {
        deliver(lua, find_aux(lua, &c, args, true))
    })?;
    let c = clock.clone();
    let match_ = lua.create_function(move |lua, args: (Value, Value, Value, Value)| {
        deliver(lua, find_aux(lua, &c, args, false))
    })?;
    let c = clock.clone();
    let gmatch = lua.create_function(move |lua, args: (Value, Value, Value)| {
        deliver(lua, gmatch(lua, &c, args))
    })?;
    let gsub = lua.create_function(move |lua, args: (Value, Value, Value, Value)| {
        deliver(lua, gsub(lua, &clock, args))
    })?;
    let string: Table = lua.globals().get("string")?;
    lua.load(WRAPPERS)
        .set_name(CHUNK)
        .call::<()>((string, find, match_, gmatch, gsub))
}

#[cfg(test)]
mod tests;
