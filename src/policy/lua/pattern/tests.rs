//! Differential tests: every case runs in a plain Lua VM (Lua's own C functions) and in one
//! with this module installed, and both must give the same results, captures, positions and
//! error messages.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::Lua;

use super::super::Budget;
use super::install;

/// Runs `return <expr>` under `pcall` and describes what came back, on one line.
const HARNESS: &str = r##"
local function describe(v)
  local t = type(v)
  if t == "string" then return "s:" .. string.format("%q", v) end
  if t == "number" then return math.type(v) .. ":" .. tostring(v) end
  if t == "table" or t == "function" or t == "userdata" then return t end
  return t .. ":" .. tostring(v)
end
local function pack(ok, ...)
  local parts = { tostring(ok), tostring(select("#", ...)) }
  for i = 1, select("#", ...) do parts[#parts + 1] = describe((select(i, ...))) end
  return table.concat(parts, " | ")
end
-- All matches of gmatch, each described like a call's results.
function GM(s, p, init)
  local out, n = {}, 0
  for a, b, c, d in string.gmatch(s, p, init) do
    n = n + 1
    out[#out + 1] = pack(true, a, b, c, d)
    if n > 300 then break end
  end
  return table.concat(out, " ; ")
end
local t = {}
for i = 0, 255 do t[#t + 1] = string.char(i) end
ALL = table.concat(t)
function run(source)
  -- Not a tail call: the functions' errors carry the position of this line.
  local f = assert(load("return (function(...) return ... end)(" .. source .. ")", "=case"))
  return pack(pcall(f))
end
"##;

fn vm(ours: bool) -> Lua {
    let lua = Lua::new();
    if ours {
        install(&lua, Rc::new(Cell::new(Budget::Idle))).expect("install");
    }
    lua.load(HARNESS).exec().expect("harness");
    lua
}

fn run(lua: &Lua, source: &str) -> String {
    let run: mlua::Function = lua.globals().get("run").unwrap();
    run.call::<String>(source)
        .unwrap_or_else(|e| format!("harness error: {e}"))
}

/// Hand-written cases for every feature and error of lstrlib.c's matcher.
const CASES: &[&str] = &[
    // find: plain, init, negative init, past the end, numbers as strings
    r#"string.find("hello world", "o w")"#,
    r#"string.find("hello world", "o", 6)"#,
    r#"("hello"):find("l", -2)"#,
    r#"("hello"):find("l", -100)"#,
    r#"("hello"):find("", 10)"#,
    r#"("hello"):find("", 6)"#,
    r#"("hello"):find("", 5)"#,
    r#"("hello"):find("")"#,
    r#"("hello"):find("l", 0)"#,
    r#"("a.b"):find(".", 1, true)"#,
    r#"("a+b"):find("+", 1, true)"#,
    r#"("a+b"):find("a+", 1, 1)"#,
    r#"("a+b"):find("a+")"#,
    r#"("a+b"):find("a+", nil, false)"#,
    r#"("aaa"):find("aa", 2)"#,
    r#"("abcabc"):find("cab")"#,
    r#"("abc"):find("abcd")"#,
    r#"string.find("abc", "b", 1.0)"#,
    r#"string.find("abc", "b", "2")"#,
    r#"string.find("abc", "b", " 0x2 ")"#,
    r#"string.find("abc", "b", 1.5)"#,
    r#"string.find("abc", "b", "1.5")"#,
    r#"string.find("abc", "b", "x")"#,
    r#"string.find("abc", "b", {})"#,
    r#"string.find("abc", "b", true)"#,
    r#"string.find(nil, "x")"#,
    r#"string.find("x", nil)"#,
    r#"string.find({}, "x")"#,
    r#"("x"):find({})"#,
    r#"("x"):match(true)"#,
    r#"string.gsub("x", "x", true)"#,
    r#"("x"):gsub("x", nil)"#,
    r#"string.gsub("x", "x", "y", {})"#,
    r#"string.gmatch(nil, "x")"#,
    r#"string.find(12345, 34)"#,
    r#"string.find(1.5, "%.")"#,
    r#"string.match(2^63, "%d+")"#,
    r#"string.gsub(12345, 3, 9)"#,
    r#"string.gsub("x", "x", 1.5)"#,
    r#"(function() local f = string.find; local r = f(nil, "x"); return r end)()"#,
    r#"pcall(string.find, nil, "x")"#,
    r#"pcall(string.find, "a", "%")"#,
    r##"select("#", string.find("abc", "z"))"##,
    r##"select("#", string.match("abc", "z"))"##,
    r##"select("#", string.gsub("abc", "z", ""))"##,
    // classes, each over every byte
    r#"ALL:gsub("%a", "")"#,
    r#"ALL:gsub("%c", "")"#,
    r#"ALL:gsub("%d", "")"#,
    r#"ALL:gsub("%g", "")"#,
    r#"ALL:gsub("%l", "")"#,
    r#"ALL:gsub("%p", "")"#,
    r#"ALL:gsub("%s", "")"#,
    r#"ALL:gsub("%u", "")"#,
    r#"ALL:gsub("%w", "")"#,
    r#"ALL:gsub("%x", "")"#,
    r#"ALL:gsub("%z", "")"#,
    r#"ALL:gsub("%A", "")"#,
    r#"ALL:gsub("%C", "")"#,
    r#"ALL:gsub("%D", "")"#,
    r#"ALL:gsub("%G", "")"#,
    r#"ALL:gsub("%L", "")"#,
    r#"ALL:gsub("%P", "")"#,
    r#"ALL:gsub("%S", "")"#,
    r#"ALL:gsub("%U", "")"#,
    r#"ALL:gsub("%W", "")"#,
    r#"ALL:gsub("%X", "")"#,
    r#"ALL:gsub("%Z", "")"#,
    r#"ALL:gsub("[%a%d]", "")"#,
    r#"ALL:gsub("[^%a%d]", "")"#,
    r#"ALL:gsub("[\1-\31\127-\255]", "")"#,
    r#"ALL:gsub("%.", "")"#,
    r#"ALL:gsub("%%", "")"#,
    r#"ALL:gsub(".", "")"#,
    // sets
    r#"("hello World_42"):gsub("[a-z]", "*")"#,
    r#"("hello World_42"):gsub("[^a-z]", "*")"#,
    r#"("hello World_42"):gsub("[%a_]", "*")"#,
    r#"("a]b"):gsub("[]]", "*")"#,
    r#"("a]b"):gsub("[^]]", "*")"#,
    r#"("a-b"):gsub("[a-]", "*")"#,
    r#"("a-b"):gsub("[-a]", "*")"#,
    r#"("a]b"):gsub("[%]]", "*")"#,
    r#"("a-z"):gsub("[a%-z]", "*")"#,
    r#"("azm"):gsub("[z-a]", "*")"#,
    r#"("a^b"):gsub("[%^]", "*")"#,
    r#"("a^b"):gsub("[b^]", "*")"#,
    r#"("x"):find("[")"#,
    r#"("x"):find("[^")"#,
    r#"("x"):find("[a")"#,
    r#"("x"):find("[%")"#,
    r#"("x"):find("[%]")"#,
    r#"("x"):find("[]")"#,
    r#"("x"):find("[^]")"#,
    r#"("]"):find("[]]")"#,
    r#"("\0"):find("[\0]")"#,
    r#"("a\0b"):find("[%z]")"#,
    // quantifiers
    r#"("aaab"):match("a*")"#,
    r#"("aaab"):match("a+")"#,
    r#"("aaab"):match("a-")"#,
    r#"("aaab"):match("a-b")"#,
    r#"("aaab"):match("a?")"#,
    r#"("aaab"):match("a?a?a?a?b")"#,
    r#"("b"):match("a+")"#,
    r#"("<<a>><<b>>"):match("<<(.-)>>")"#,
    r#"("<<a>><<b>>"):match("<<(.*)>>")"#,
    r#"("  trim me  "):match("^%s*(.-)%s*$")"#,
    r#"("key = value"):match("^(%w+)%s*=%s*(%w+)$")"#,
    r#"("abc"):match(".-")"#,
    r#"("abc"):match(".-$")"#,
    r#"("a*b"):match("a*%*b")"#,
    r#"("ab"):match("a**")"#,
    r#"("ab"):match("*")"#,
    r#"("+a"):match("+a")"#,
    r#"("-a"):match("-a")"#,
    r#"("?a"):match("?a")"#,
    // anchors
    r#"("aaa"):find("^a")"#,
    r#"("baa"):find("^a")"#,
    r#"("baa"):find("a$")"#,
    r#"("baa"):find("$")"#,
    r#"(""):find("^$")"#,
    r#"("a$b"):find("a$b")"#,
    r#"("a$"):find("$$")"#,
    r#"("aaa"):gsub("^a", "b")"#,
    r#"("aaa"):gsub("a$", "b")"#,
    r#"("aaa"):gsub("^", "b")"#,
    r#"("aaa"):gsub("$", "b")"#,
    r#"GM("a^a", "^a")"#,
    r#"("^a"):match("^^a")"#,
    r#"("abc"):find("^b", 2)"#,
    r#"("abc"):match("^(b)", 2)"#,
    // captures
    r#"("ab"):match("(a)(b)")"#,
    r#"("ab"):find("(a)(b)")"#,
    r#"("ab"):find("()a()")"#,
    r#"("abc"):match("(a(b)c)")"#,
    r#"("abc"):match("()")"#,
    r#"("abc"):match("()", 3)"#,
    r#"("abc"):match("()", 4)"#,
    r#"("abc"):match("()", 5)"#,
    r#"("aa"):match("(a)%1")"#,
    r#"("hello hello world"):match("(%a+) %1")"#,
    r#"("hello there world"):match("(%a+) %1")"#,
    r#"("xyzxyz"):match("(x(y)z)%1")"#,
    r#"("xyzxyz"):match("(x(y)z)%2")"#,
    r#"("aa"):match("()a%1")"#,
    r#"("aa"):match("(a)%0")"#,
    r#"("aa"):match("(a)%2")"#,
    r#"("aa"):match("(a%1)")"#,
    r#"("aa"):match("%1")"#,
    r#"("aa"):match("(a")"#,
    r#"("aa"):find("(a")"#,
    r#"("aa"):gsub("(a", "x")"#,
    r#"("aa"):gsub("(a", "%1")"#,
    r#"("aa"):gsub("(a", {})"#,
    r#"("aa"):match("a)")"#,
    r#"("aa"):match("(()")"#,
    r#"("aa"):match("((a)(a))")"#,
    r#"("a"):match(string.rep("()", 32))"#,
    r#"("a"):match(string.rep("()", 33))"#,
    r#"("a"):match(string.rep("(", 33))"#,
    r##"select("#", ("a"):match(string.rep("()", 32)))"##,
    // %b
    r#"("f(a(b)c) d"):match("%b()")"#,
    r#"("f(a(b)c d"):match("%b()")"#,
    r#"("x"):match("%b(")"#,
    r#"("x"):match("%b")"#,
    r#"("x"):match("a%b")"#,
    r#"("[[x]][y]"):gsub("%b[]", "<>")"#,
    r#"('a"b"c'):match('%b""')"#,
    r#"("(("):match("%b()")"#,
    r#"("()"):match("%b()$")"#,
    r#"(""):match("%b()")"#,
    r#"("a\0b\0"):match("%b\0\0")"#,
    // %f
    r#"("THE (quick) fox"):find("%f[%a]%a+")"#,
    r#"("THE (quick) fox"):gsub("%f[%w]%w+", "W")"#,
    r#"("hello"):find("%f[%z]")"#,
    r#"("hello"):find("%f[%Z]")"#,
    r#"("hello"):find("%f[^%z]")"#,
    r#"("aXb"):gsub("%f[%u]", "|")"#,
    r#"("aXb"):gsub("%f[%U]", "|")"#,
    r#"("x"):find("%fa")"#,
    r#"("x"):find("%f")"#,
    r#"("x"):find("%f[a")"#,
    r#"GM("the cat sat", "%f[%a]%a+")"#,
    // malformed and limits
    r#"("x"):find("%")"#,
    r#"("x"):find("a%")"#,
    r#"("x"):match("[a%")"#,
    r#"("x"):gsub("%", "")"#,
    r#"GM("x", "%")"#,
    r#"("a"):find(string.rep("a?", 198) .. "b")"#,
    r#"("a"):find(string.rep("a?", 199) .. "b")"#,
    r#"string.rep("a", 300):find(string.rep("a?", 300))"#,
    r#"string.rep("a", 300):find(string.rep("a?", 300) .. "$")"#,
    r#"string.rep("a", 300):find(string.rep("(a)", 250))"#,
    r#"string.rep("a", 300):find(string.rep("a", 250))"#,
    r#"string.rep("a", 300):find(".-" .. string.rep("a", 250) .. "$")"#,
    r#"string.rep("x", 100):match(string.rep("x?", 150) .. "$")"#,
    // escapes of non-class characters
    r#"("a.b"):find("%.")"#,
    r#"("a(b"):find("%(")"#,
    r#"("a%b"):find("%%")"#,
    r#"("a]b"):find("%]")"#,
    r#"("a\200b"):find("%\200")"#,
    // bytes above 127 and NULs
    r#"("\200\201x"):find("[\200-\255]+")"#,
    r#"("a\0b"):find("\0")"#,
    r#"("a\0b"):find("%z")"#,
    r#"("a\0b"):find("a\0b")"#,
    r#"("a\0b"):find("a%zb")"#,
    r#"("a\0b"):find(".b")"#,
    r#"("a\0b\0"):gsub("\0", "0")"#,
    r#"("a\0b"):match("^(.-)%z")"#,
    // gmatch
    r#"GM("hello world from Lua", "%a+")"#,
    r#"GM("hello world from Lua", "%a+", 7)"#,
    r#"GM("hello world from Lua", "%a+", -3)"#,
    r#"GM("hello world from Lua", "%a+", 100)"#,
    r#"GM("hello", "", 6)"#,
    r#"GM("hello", "", 7)"#,
    r#"GM("hello", "", -100)"#,
    r#"GM("key=val, k2=v2", "(%w+)=(%w+)")"#,
    r#"GM("abc", "()")"#,
    r#"GM("abc", "x*")"#,
    r#"GM("abc", "")"#,
    r#"GM("aaa", "a-")"#,
    r#"GM("a,b,,c", "([^,]*)")"#,
    r#"GM("abc", "(a")"#,
    r#"GM("abc", "%1")"#,
    r#"GM(123, 2)"#,
    r#"GM("abc", "b", 1.5)"#,
    // gsub: string replacements
    r#"("hello world"):gsub("(%w+)", "<%1>")"#,
    r#"("hello world"):gsub("%w+", "%0 %0", 1)"#,
    r#"("hello world"):gsub("(%w+) (%w+)", "%2 %1")"#,
    r#"("abc"):gsub("%w", "%1")"#,
    r#"("abc"):gsub("%w", "%2")"#,
    r#"("abc"):gsub("(%w)", "%2")"#,
    r#"("abc"):gsub("%w", "%%")"#,
    r#"("abc"):gsub("%w", "%")"#,
    r#"("abc"):gsub("%w", "%x")"#,
    r#"("abc"):gsub("%w", "a%")"#,
    r#"("abc"):gsub("()", "%1")"#,
    r#"("abc"):gsub("()(b)", "%1%2")"#,
    r#"("abc"):gsub("", "-")"#,
    r#"("abc"):gsub("x*", "-")"#,
    r#"("abc"):gsub("b*", "-")"#,
    r#"("abc"):gsub(".", "x", 0)"#,
    r#"("abc"):gsub(".", "x", -1)"#,
    r#"("abc"):gsub(".", "x", 2)"#,
    r#"("abc"):gsub(".", "x", "2")"#,
    r#"("abc"):gsub(".", "x", 2.0)"#,
    r#"("abc"):gsub(".", "x", 2.5)"#,
    r#"("abc"):gsub(".", "x", math.maxinteger)"#,
    r#"("abc"):gsub(".", "x", math.mininteger)"#,
    r#"(""):gsub("", "x")"#,
    r#"(""):gsub(".", "x")"#,
    r#"("abc"):gsub("b", "")"#,
    r#"("a.b.c"):gsub("%.", "%%")"#,
    r#"("abc"):gsub("b", 5)"#,
    // gsub: tables
    r#"("$name is $age"):gsub("%$(%w+)", { name = "Ann", age = 7 })"#,
    r#"("$name is $x"):gsub("%$(%w+)", { name = "Ann" })"#,
    r#"("$name"):gsub("%$(%w+)", { name = false })"#,
    r#"("$name"):gsub("%$(%w+)", { name = true })"#,
    r#"("$name"):gsub("%$(%w+)", { name = {} })"#,
    r#"("$name"):gsub("%$(%w+)", { name = 1.5 })"#,
    r#"("$name"):gsub("%$(%w+)", { name = 2^53 })"#,
    r#"("abc"):gsub("%w", { a = 1, c = 3 })"#,
    r#"("abc"):gsub("()", { [1] = "one", [3] = "three" })"#,
    r#"("abc"):gsub("%w", setmetatable({}, { __index = function(t, k) return k:upper() end }))"#,
    r#"("abc"):gsub("%w", setmetatable({}, { __index = function(t, k) error("no " .. k) end }))"#,
    r#"("abc"):gsub("%w", setmetatable({}, { __index = function(t, k) error({ k }) end }))"#,
    r#"("abc"):gsub("%w", setmetatable({}, { __index = { b = "B" } }))"#,
    // gsub: functions
    r#"("hello world"):gsub("%w+", string.upper)"#,
    r#"("hello world"):gsub("%w+", function(w) return #w end)"#,
    r#"("hello world"):gsub("%w+", function(w) return #w / 2 end)"#,
    r#"("hello world"):gsub("%w+", function(w) if w == "world" then return "there" end end)"#,
    r#"("hello world"):gsub("%w+", function(w) return false end)"#,
    r#"("hello world"):gsub("%w+", function(w) return {} end)"#,
    r#"("hello world"):gsub("%w+", function(w) return print end)"#,
    r#"("k=v, a=b"):gsub("(%w+)=(%w+)", function(k, v) return v .. "=" .. k end)"#,
    r#"("abc"):gsub("()(%w)()", function(a, b, c) return a .. b .. c end)"#,
    r##"("abc"):gsub("%w", function(...) return select("#", ...) end)"##,
    r#"("abc"):gsub("%w", function() error("boom") end)"#,
    r#"("abc"):gsub("%w", function() error("boom", 0) end)"#,
    r#"("abc"):gsub("%w", function() error({ code = 1 }) end)"#,
    r#"("abc"):gsub("%w", function() error() end)"#,
    r#"("abc"):gsub("%w", function() return ("x"):gsub("x", "%") end)"#,
    r#"("abc"):gsub("(%w", function() return "x" end)"#,
    r#"("abc"):gsub("%w", function() return "a", "b" end)"#,
    r#"(function() local n = 0; ("abcdef"):gsub(".", function() n = n + 1 end, 4); return n end)()"#,
    // errors located at the caller's line
    "(function()\n\n  local r = string.find('x', '%')\n  return r\nend)()",
    "(function()\n  local s = 'x'\n  local r = s:gsub('x', '%2')\n  return r\nend)()",
    "(function()\n  for w in ('x'):gmatch('(') do end\nend)()",
    "(function()\n  local r = ('x'):gsub('x', {x = {}})\n  return r\nend)()",
    "(function()\n  local r = ('x'):gsub('x', function() return {} end)\n  return r\nend)()",
    "(function()\n  local r = ('x'):gsub('x', function() error('inner') end)\n  return r\nend)()",
];

fn compare(plain: &Lua, ours: &Lua, case: &str) -> Option<String> {
    let expected = run(plain, case);
    let actual = run(ours, case);
    (expected != actual).then(|| format!("{case}\n   lua:  {expected}\n   ours: {actual}"))
}

#[test]
fn hand_written_cases_match_lua() {
    let (plain, ours) = (vm(false), vm(true));
    let failures: Vec<String> = CASES
        .iter()
        .filter_map(|case| compare(&plain, &ours, case))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

/// A small xorshift generator: the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Pattern items over a small alphabet, with every special (some malformed on purpose).
const ITEMS: &[&str] = &[
    "a", "b", "x", " ", ".", "%a", "%d", "%s", "%w", "%A", "%(", "%.", "%%", "[ab]", "[^a]",
    "[a-c]", "[%a(]", "[]]", "(", ")", "()", "%1", "%2", "%0", "%b()", "%bab", "%f[a]", "%f[^a]",
    "%f[%s]", "$", "^", "[", "%", "]", "-", "*", "+", "?",
];
const SUFFIXES: &[&str] = &["", "", "", "*", "+", "-", "?"];
const SUBJECT: &[&str] = &["a", "a", "b", "x", " ", "(", ")", "1", ".", "%", "ab"];
const REPLACEMENTS: &[&str] = &["<%0>", "%1", "%2-%1", "%%", "", "x%", "()"];

fn random_case(rng: &mut Rng) -> (Vec<u8>, Vec<u8>, String) {
    let mut pattern = String::new();
    if rng.below(5) == 0 {
        pattern.push('^');
    }
    for _ in 0..1 + rng.below(6) {
        pattern.push_str(rng.pick(ITEMS));
        pattern.push_str(rng.pick(SUFFIXES));
    }
    if rng.below(6) == 0 {
        pattern.push('$');
    }
    let subject: String = (0..rng.below(14)).map(|_| rng.pick(SUBJECT)).collect();
    let call = match rng.below(6) {
        0 => "string.find(S, P)".to_owned(),
        1 => format!("string.find(S, P, {})", rng.below(8) as i64 - 3),
        2 => "string.match(S, P)".to_owned(),
        3 => format!("GM(S, P, {})", rng.below(6) as i64 - 1),
        4 => format!("string.gsub(S, P, {:?})", rng.pick(REPLACEMENTS)),
        _ => format!(
            "string.gsub(S, P, function(...) return select('#', ...) .. tostring((...)) end, {})",
            rng.below(4)
        ),
    };
    (subject.into_bytes(), pattern.into_bytes(), call)
}

#[test]
fn random_patterns_match_lua() {
    let (plain, ours) = (vm(false), vm(true));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut failures = Vec::new();
    let cases = 5000;
    let (mut errors, mut matches) = (0, 0);
    for _ in 0..cases {
        let (subject, pattern, call) = random_case(&mut rng);
        for lua in [&plain, &ours] {
            lua.globals()
                .set("S", lua.create_string(&subject).unwrap())
                .unwrap();
            lua.globals()
                .set("P", lua.create_string(&pattern).unwrap())
                .unwrap();
        }
        let expected = run(&plain, &call);
        if expected.starts_with("false") {
            errors += 1;
        } else if !expected.starts_with("true | 1 | nil") && !expected.ends_with("| int:0") {
            matches += 1;
        }
        if let Some(diff) = compare(&plain, &ours, &call) {
            failures.push(format!(
                "S={:?} P={:?}: {diff}",
                String::from_utf8_lossy(&subject),
                String::from_utf8_lossy(&pattern)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases differ:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    // The generator reaches both the matcher's errors and its successes.
    assert!(
        errors > cases / 20 && matches > cases / 5,
        "{errors} errors and {matches} matches in {cases} cases"
    );
    println!("{errors} errors and {matches} matches in {cases} cases");
}

#[test]
fn replacement_functions_that_recurse_without_end_fail_cleanly() {
    // Lua's C gsub ends this with "C stack overflow"; the replacement runs outside any Rust
    // frame here, so it ends at Lua's own stack limit instead, and the worker's stack is safe.
    let lua = vm(true);
    let result = run(
        &lua,
        r#"(function() local f; f = function(s) return (s:gsub(".", f)) end; return pcall(f, "ab") end)()"#,
    );
    assert!(result.contains("stack overflow"), "{result}");
}

/// A VM with this module and an armed budget, as a policy call has.
fn guarded(limit: Duration) -> (Lua, Rc<Cell<Budget>>) {
    let lua = Lua::new();
    let budget = Rc::new(Cell::new(Budget::Idle));
    install(&lua, budget.clone()).unwrap();
    budget.set(Budget::Armed(limit));
    (lua, budget)
}

#[test]
fn a_backtracking_pattern_stops_at_the_cpu_limit() {
    for source in [
        r#"string.find(string.rep("a", 30000), ".-.-.-.-b")"#,
        r#"string.gsub(string.rep("a", 30000), ".-.-.-b", "x")"#,
        r#"string.match(string.rep("a", 25), string.rep("a*", 25) .. "b")"#,
        r#"(function() for w in string.gmatch(string.rep("a", 30000), ".-.-b") do end end)()"#,
        r#"string.rep("a", 50000):find("(.-)%1b")"#,
        r#"string.rep("(", 100000):find("%b()")"#,
        r#"(function() local s = string.rep("a", 1 << 22) for i = 1, 100 do s:find(".*b") end end)()"#,
    ] {
        let (lua, _budget) = guarded(Duration::from_millis(10));
        let started = Instant::now();
        let err = lua
            .load(source)
            .set_name("=policy.lua")
            .exec()
            .expect_err(source);
        let elapsed = started.elapsed();
        let message = err.to_string();
        assert!(
            message.contains("policy.lua:1: CPU limit exceeded"),
            "{source}: {message}"
        );
        assert!(
            elapsed < Duration::from_millis(300),
            "{source}: {elapsed:?}"
        );
    }
}

#[test]
fn pcall_sees_the_cpu_limit_error_of_the_hook() {
    let (lua, _budget) = guarded(Duration::from_millis(5));
    let (ok, message): (bool, String) = lua
        .load(
            r#"local ok, e = pcall(string.find, string.rep("a", 30000), ".-.-.-.-b")
               return ok, tostring(e)"#,
        )
        .eval()
        .unwrap();
    assert!(!ok);
    assert!(message.contains("CPU limit exceeded"), "{message}");
}

#[test]
fn gsub_output_is_held_to_the_memory_limit() {
    let lua = Lua::new();
    install(&lua, Rc::new(Cell::new(Budget::Idle))).unwrap();
    let big: mlua::LuaString = lua.load(r#"string.rep("y", 1 << 20)"#).eval().unwrap();
    lua.globals().set("BIG", big).unwrap();
    lua.set_memory_limit(lua.used_memory() + (4 << 20)).unwrap();
    let err = lua
        .load(r#"return string.gsub(string.rep("a", 64), "a", BIG)"#)
        .exec()
        .expect_err("64 MiB of output under a 4 MiB limit");
    assert!(
        matches!(err, mlua::Error::MemoryError(_)) || err.to_string().contains("memory"),
        "{err}"
    );
    lua.set_memory_limit(0).unwrap();
}

/// Debug-build timings of common calls, ours against Lua's C functions (run with
/// `cargo test --lib pattern::tests::timings -- --ignored --nocapture`).
#[test]
#[ignore = "a measurement, not a check"]
fn timings() {
    let bench = r#"
      local data = string.rep("abcdefghij ", 93) .. "x"
      local find, gsub = string.find, string.gsub
      local t = os.clock()
      for i = 1, N do local a = data:find("x") end
      local plain = os.clock() - t
      t = os.clock()
      for i = 1, N do local a = data:find("x", 1, true) end
      local plain_true = os.clock() - t
      t = os.clock()
      for i = 1, N do local a = data:find("j x") end
      local short = os.clock() - t
      t = os.clock()
      for i = 1, N do local a = data:find("%d") end
      local class = os.clock() - t
      t = os.clock()
      for i = 1, N // 10 do local a = data:gsub("%s+", "") end
      local gsub_s = os.clock() - t
      t = os.clock()
      for i = 1, N // 10 do local a = data:gsub("a", "A") end
      local gsub_a = os.clock() - t
      t = os.clock()
      for i = 1, N do local a = ("key=value"):match("^(%w+)=(%w+)$") end
      local match = os.clock() - t
      return plain, plain_true, short, class, gsub_s, gsub_a, match
    "#;
    let n = 20_000;
    let names = [
        "data:find(\"x\") 1 KiB",
        "data:find(\"x\", 1, true)",
        "data:find(\"j x\")",
        "data:find(\"%d\") (no match)",
        "data:gsub(\"%s+\", \"\")",
        "data:gsub(\"a\", \"A\")",
        "(\"key=value\"):match(...)",
    ];
    let mut results = Vec::new();
    for ours in [false, true] {
        let lua = Lua::new();
        if ours {
            install(&lua, Rc::new(Cell::new(Budget::Idle))).unwrap();
        }
        lua.globals().set("N", n).unwrap();
        let r: (f64, f64, f64, f64, f64, f64, f64) = lua.load(bench).eval().unwrap();
        results.push([r.0, r.1, r.2, r.3, r.4 * 10.0, r.5 * 10.0, r.6]);
    }
    for (i, name) in names.iter().enumerate() {
        let (c, o) = (results[0][i], results[1][i]);
        println!(
            "{name:32} lua {:8.0} ns  ours {:8.0} ns  ratio {:.2}",
            c / n as f64 * 1e9,
            o / n as f64 * 1e9,
            o / c
        );
    }
}

#[test]
fn a_replacement_function_may_yield() {
    // Lua's C gsub refuses ("attempt to yield across a C-call boundary"); here the
    // replacement runs as plain Lua, so a coroutine can yield from it and resume the gsub.
    let lua = vm(true);
    let result = run(
        &lua,
        r#"(function()
          local co = coroutine.wrap(function()
            return ("ab"):gsub(".", function(c) coroutine.yield(c) return c:upper() end)
          end)
          return co(), co(), co()
        end)()"#,
    );
    assert_eq!(result, r#"true | 4 | s:"a" | s:"b" | s:"AB" | integer:2"#);
}
