//! Micro-benchmarks of the per-request and per-message hot paths: route matching with 1,000
//! routes, a trivial Lua frame policy call, a Lua JSON decode-modify-encode of a 1 KiB message,
//! context access from a frame policy, an `on_upgrade` token check, and framegate's Lua
//! pattern functions against Lua's own C ones.

use std::collections::VecDeque;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use framegate::header_fields::HeaderFields;
use framegate::policy::lua::{test_hooks, Engine};
use framegate::policy::shared::SharedDict;
use framegate::policy::{Data, Direction, Outbound, UpgradeRequest, UpgradeVerdict, Verdict};
use framegate::Config;

fn routes_config() -> Config {
    let mut toml = String::new();
    for i in 0..1000 {
        let path = match i % 4 {
            0 => format!("/api/v{i}/items"),
            1 => format!("/chat{i}/{{room}}"),
            2 => format!("/t{i}/{{a}}/x/{{b}}"),
            _ => format!("/files{i}/{{*rest}}"),
        };
        toml.push_str(&format!(
            "[[route]]\npath = \"{path}\"\nupstream = \"ws://127.0.0.1:9/\"\n"
        ));
    }
    Config::from_toml(&toml, std::path::Path::new("bench.toml")).expect("bench routes are valid")
}

fn route_matching(c: &mut Criterion) {
    let router = framegate::route::Router::new(&routes_config().routes);
    let mut group = c.benchmark_group("route_match_1000_routes");
    group.bench_function("exact", |b| {
        b.iter(|| router.find(None, black_box("/api/v500/items")))
    });
    group.bench_function("template_late", |b| {
        b.iter(|| router.find(None, black_box("/t998/1/x/2")))
    });
    group.bench_function("catch_all_late", |b| {
        b.iter(|| router.find(None, black_box("/files999/a/b/c")))
    });
    group.bench_function("miss", |b| {
        b.iter(|| router.find(None, black_box("/nothing/here")))
    });
    group.finish();
}

/// Writes `source` to a temporary script and returns an engine with it as on_client_frame.
fn engine_with(name: &str, source: &str) -> Engine {
    engine_hooking("on_client_frame", name, source)
}

/// Writes `source` to a temporary script and returns an engine with it bound as `hook`.
fn engine_hooking(hook: &str, name: &str, source: &str) -> Engine {
    let dir = std::env::temp_dir().join(format!("framegate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, source).expect("write script");
    let toml = format!(
        "[[route]]\npath = \"/b\"\nupstream = \"ws://127.0.0.1:9/\"\n[route.policies]\n{hook} = {:?}\n",
        path.display().to_string()
    );
    let config = Config::from_toml(&toml, std::path::Path::new("bench.toml")).expect("valid");
    Engine::new(&config, Arc::new(SharedDict::default())).expect("script compiles")
}

fn call(hooks: &mut dyn framegate::policy::FrameHooks, message: &Data) -> Verdict {
    let (mut to_client, mut to_upstream) = (VecDeque::new(), VecDeque::new());
    let mut expire_at = None;
    hooks.on_message(
        Direction::ClientToUpstream,
        message.clone(),
        Outbound {
            to_client: &mut to_client,
            to_upstream: &mut to_upstream,
            room_to_client: usize::MAX,
            room_to_upstream: usize::MAX,
            expire_at: &mut expire_at,
        },
    )
}

fn lua_policies(c: &mut Criterion) {
    let mut group = c.benchmark_group("lua_frame_policy");
    let small = Data::text(r#"{"type":"chat","text":"hello"}"#);

    let engine = engine_with(
        "trivial.lua",
        "return function(msg, ctx, conn) return nil end",
    );
    let mut hooks = test_hooks(&engine, 0, Some(r#"{"user":"ann"}"#)).expect("hooks");
    group.bench_function("trivial_call", |b| b.iter(|| call(hooks.as_mut(), &small)));

    let engine = engine_with(
        "ctx.lua",
        "return function(msg, ctx, conn) if ctx.user == 'ann' and ctx.claims.role == 'admin' then return nil end return false end",
    );
    let mut hooks = test_hooks(
        &engine,
        0,
        Some(r#"{"user":"ann","claims":{"role":"admin"}}"#),
    )
    .expect("hooks");
    group.bench_function("context_access", |b| {
        b.iter(|| call(hooks.as_mut(), &small))
    });

    let engine = engine_with(
        "json.lua",
        "return function(msg, ctx, conn) local m = msg.json m.from = ctx.user return m end",
    );
    let mut hooks = test_hooks(&engine, 0, Some(r#"{"user":"ann"}"#)).expect("hooks");
    let mut body = String::from(r#"{"type":"chat","seq":12345,"tags":["a","b","c"],"text":""#);
    while body.len() < 1000 {
        body.push_str("lorem ipsum ");
    }
    body.push_str(r#""}"#);
    let kib = Data::text(body);
    group.bench_function("json_decode_modify_encode_1kib", |b| {
        b.iter(|| call(hooks.as_mut(), &kib))
    });
    group.finish();
}

/// The `on_upgrade` token check of `bench/run.py`'s `fg+auth` gateway, on the headers
/// `fg-load` sends.
fn lua_upgrade_policy(c: &mut Criterion) {
    let engine = engine_hooking(
        "on_upgrade",
        "auth.lua",
        r#"return function(req, ctx)
  if req.headers["authorization"] ~= "Bearer bench-token" then return req:reject(401, "no") end
  ctx.user = "bench"
end"#,
    );
    let config = Config::from_toml(
        "[[route]]\npath = \"/b\"\nupstream = \"ws://127.0.0.1:9/\"\n",
        std::path::Path::new("bench.toml"),
    )
    .expect("valid");
    let policy = engine.route_policy(&config.routes[0]).expect("a policy");
    let headers = HeaderFields::from_pairs([
        ("host", "127.0.0.1:19006"),
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("authorization", "Bearer bench-token"),
    ]);
    let request = UpgradeRequest {
        metrics: None,
        id: 1,
        method: "GET",
        upgrade: true,
        path: "/b",
        query: "",
        headers: &headers,
        params: &[],
        client_ip: "127.0.0.1".parse().expect("an IP"),
        scheme: "ws",
        host: Some("127.0.0.1:19006"),
        jwt: None,
    };
    let mut group = c.benchmark_group("lua_upgrade_policy");
    group.bench_function("token_check", |b| {
        b.iter(|| match policy.on_upgrade(black_box(&request)) {
            UpgradeVerdict::Continue { .. } => {}
            _ => panic!("the token is valid"),
        })
    });
    group.finish();
}

/// framegate's `string.find`/`gsub`/`match` (src/policy/lua/pattern.rs) against Lua's C
/// functions in a plain VM: each iteration runs the operation 100 times on a 1 KiB message.
fn lua_patterns(c: &mut Criterion) {
    let mut group = c.benchmark_group("lua_patterns");
    let data = format!("{}x", "abcdefghij ".repeat(93));
    let message = Data::text(data.clone());
    for (name, op) in [
        ("find_char", r#"d:find("x")"#),
        ("find_plain", r#"d:find("j x", 1, true)"#),
        ("find_class", r#"d:find("%d")"#),
        ("match_short", r#"("key=value"):match("^(%w+)=(%w+)$")"#),
        ("gsub_spaces", r#"d:gsub("%s+", "")"#),
        ("gsub_char", r#"d:gsub("a", "A")"#),
    ] {
        let body = format!("local d = msg.data for i = 1, 100 do local a = {op} end return nil");
        let engine = engine_with(
            &format!("{name}.lua"),
            &format!("return function(msg, ctx, conn) {body} end"),
        );
        let mut hooks = test_hooks(&engine, 0, None).expect("hooks");
        group.bench_function(format!("{name}_x100_framegate"), |b| {
            b.iter(|| call(hooks.as_mut(), &message))
        });
        // Lua's C functions in a VM with a count hook like framegate's, as before the port.
        let lua = mlua::Lua::new();
        lua.set_global_hook(
            mlua::HookTriggers::new().every_nth_instruction(1000),
            |_, _| Ok(mlua::VmState::Continue),
        )
        .expect("hook");
        let f: mlua::Function = lua
            .load(format!("return function(msg) {body} end"))
            .eval()
            .expect("compiles");
        let msg = lua.create_table().expect("table");
        msg.set("data", data.as_str()).expect("set");
        group.bench_function(format!("{name}_x100_lua_c"), |b| {
            b.iter(|| f.call::<()>(&msg).expect("runs"))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    route_matching,
    lua_policies,
    lua_upgrade_policy,
    lua_patterns
);
criterion_main!(benches);
