//! `framegate policy-test`: a frame policy run on one message (or a spec file of cases) without
//! a gateway, printing its decision.

mod support;

use std::path::Path;

use serde_json::{json, Value as Json};
use support::cli::Output;
use support::TempDir;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `framegate args…` in the crate root.
fn framegate(args: &[&str]) -> Output {
    support::cli::framegate(args, Path::new(MANIFEST_DIR))
}

fn json_of(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

#[test]
fn a_valid_message_is_replaced_with_the_sender_added() {
    let out = framegate(&[
        "policy-test",
        "policies/validate.lua",
        "--message",
        r#"{"type":"chat"}"#,
        "--ctx",
        r#"{"user":"ann"}"#,
    ]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.line("decision: "), "replace");
    assert_eq!(
        json_of(out.line("payload: ")),
        json!({"type": "chat", "from": "ann"})
    );
    assert!(!out.stdout.contains("sent to client:"), "{}", out.stdout);
}

#[test]
fn an_invalid_message_is_dropped_with_an_error_to_the_client() {
    let out = framegate(&[
        "policy-test",
        "policies/validate.lua",
        "--message",
        "not json",
    ]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.line("decision: "), "drop");
    assert!(!out.stdout.contains("payload:"), "{}", out.stdout);
    let sent = json_of(out.line("sent to client: "));
    assert_eq!(sent["error"], "invalid message");
    assert!(
        sent["detail"].as_str().unwrap().contains("invalid JSON"),
        "{sent}"
    );
}

#[test]
fn kick_closes_with_1008() {
    let out = framegate(&[
        "policy-test",
        "policies/validate.lua",
        "--message",
        r#"{"type":"kick"}"#,
        "--ctx",
        r#"{"user":"ann"}"#,
    ]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.line("decision: "), "close");
    assert_eq!(out.line("close: "), "1008 not allowed");
}

#[test]
fn direction_server_runs_the_policy_on_a_server_message() {
    let out = framegate(&[
        "policy-test",
        "policies/redact.lua",
        "--direction",
        "server",
        "--message",
        r#"{"text":"hi","email":"a@b.c"}"#,
    ]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.line("decision: "), "replace");
    assert_eq!(
        json_of(out.line("payload: ")),
        json!({"text": "hi", "email": "[redacted]"})
    );

    let out = framegate(&[
        "policy-test",
        "policies/redact.lua",
        "--direction",
        "server",
        "--message",
        "no json here",
    ]);
    assert_eq!(out.line("decision: "), "forward");
    assert_eq!(out.line("payload: "), "no json here");

    // The direction reaches the policy as msg.direction.
    let dir = TempDir::new("direction");
    let script = dir.write(
        "direction.lua",
        "return function(msg, ctx, conn) return msg.direction end\n",
    );
    let script = script.display().to_string();
    for (way, want) in [("server", "server"), ("client", "client")] {
        let out = framegate(&["policy-test", &script, "--direction", way, "--message", "x"]);
        assert_eq!(out.line("payload: "), want, "{}", out.stderr);
    }
}

const SPEC_SCRIPT: &str = r#"
return function(msg, ctx, conn)
  if msg.data == "ping" then conn:reply("pong for " .. ctx.user) return false end
  if msg.data == "tell" then conn:send_server("told") return nil end
  if msg.data == "bye" then conn:close(4000, "bye " .. ctx.user) return false end
  if msg.data == "upper" then return msg.data:upper() end
end
"#;

const SPEC_CASES: &str = r#"
[[case]]
name = "ping is answered"
message = "ping"
ctx = { user = "ann" }
expect = "drop"
sent_to_client = ["pong for ann"]

[[case]]
name = "tell goes to the server too"
message = "tell"
expect = "forward"
payload = "tell"
sent_to_server = ["told"]

[[case]]
name = "bye closes"
message = "bye"
ctx = { user = "bob" }
expect = "close"
close_code = 4000

[[case]]
name = "upper replaces"
message = "upper"
expect = "replace"
payload = "UPPER"

[[case]]
name = "anything else passes"
message = "hello"
expect = "forward"
payload = "hello"
"#;

#[test]
fn a_spec_whose_cases_all_pass_exits_zero() {
    let dir = TempDir::new("spec-pass");
    dir.write("cases.lua", SPEC_SCRIPT);
    // The script path is relative to the spec's folder.
    let spec = dir.write(
        "spec.toml",
        &format!("script = \"cases.lua\"\n{SPEC_CASES}"),
    );
    let out = framegate(&["policy-test", "--spec", &spec.display().to_string()]);
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.stdout.lines().last(), Some("5 passed, 0 failed"));
    for name in [
        "ping is answered",
        "tell goes to the server too",
        "bye closes",
        "upper replaces",
        "anything else passes",
    ] {
        assert!(
            out.stdout.contains(&format!("ok - {name}\n")),
            "{name}: {}",
            out.stdout
        );
    }
}

#[test]
fn a_spec_can_test_the_shipped_examples() {
    let dir = TempDir::new("spec-examples");
    let validate = Path::new(MANIFEST_DIR).join("policies/validate.lua");
    let spec = dir.write(
        "spec.toml",
        &format!(
            "script = {:?}\n\
             [[case]]\nname = \"kick\"\nmessage = '{{\"type\":\"kick\"}}'\nexpect = \"close\"\nclose_code = 1008\n\
             [[case]]\nname = \"valid\"\nmessage = '{{\"type\":\"chat\"}}'\nctx = {{ user = \"ann\" }}\nexpect = \"replace\"\n\
             [[case]]\nname = \"bad\"\nmessage = 'nope'\nexpect = \"drop\"\n",
            validate.display().to_string()
        ),
    );
    let out = framegate(&["policy-test", "--spec", &spec.display().to_string()]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.lines().last(), Some("3 passed, 0 failed"));
}

#[test]
fn a_failing_expectation_is_reported_and_exits_non_zero() {
    let dir = TempDir::new("spec-fail");
    dir.write("cases.lua", SPEC_SCRIPT);
    let spec = dir.write(
        "spec.toml",
        "script = \"cases.lua\"\n\
         [[case]]\nname = \"upper replaces\"\nmessage = \"upper\"\nexpect = \"replace\"\npayload = \"UPPER\"\n\
         [[case]]\nname = \"ping passes\"\nmessage = \"ping\"\nctx = { user = \"ann\" }\nexpect = \"forward\"\n\
         [[case]]\nname = \"wrong reply\"\nmessage = \"ping\"\nctx = { user = \"ann\" }\nexpect = \"drop\"\nsent_to_client = [\"pong for bob\"]\n",
    );
    let out = framegate(&["policy-test", "--spec", &spec.display().to_string()]);
    assert!(
        !out.status.success(),
        "a failing spec exited 0: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ok - upper replaces\n"),
        "{}",
        out.stdout
    );
    let failed = out.line("FAILED - ping passes: ");
    assert!(failed.contains("expected forward, got drop"), "{failed}");
    let failed = out.line("FAILED - wrong reply: ");
    assert!(failed.contains("pong for bob"), "{failed}");
    assert_eq!(out.stdout.lines().last(), Some("1 passed, 2 failed"));
}

#[test]
fn a_spec_json_payload_does_not_depend_on_key_order() {
    // A table a policy returns is re-encoded as JSON; a spec writer cannot know in which order
    // its keys come out, so the same spec must pass on every run.
    let dir = TempDir::new("spec-json-order");
    let validate = Path::new(MANIFEST_DIR).join("policies/validate.lua");
    let spec = dir.write(
        "spec.toml",
        &format!(
            "script = {:?}\n\
             [[case]]\nname = \"stamped\"\nmessage = '{{\"type\":\"chat\",\"text\":\"hi\"}}'\n\
             ctx = {{ user = \"ann\" }}\nexpect = \"replace\"\n\
             payload = '{{\"from\":\"ann\",\"text\":\"hi\",\"type\":\"chat\"}}'\n",
            validate.display().to_string()
        ),
    );
    for run in 1..=6 {
        let out = framegate(&["policy-test", "--spec", &spec.display().to_string()]);
        assert!(
            out.status.success(),
            "run {run}: the same spec failed:\n{}",
            out.stdout
        );
    }
}

#[test]
fn a_broken_script_is_an_error_with_its_path_and_line() {
    let dir = TempDir::new("broken");
    let script = dir.write("broken.lua", "return function(msg)\n  return (\nend\n");
    let shown = script.display().to_string();
    let out = framegate(&["policy-test", &shown, "--message", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!("{shown}:3:")),
        "stderr: {}",
        out.stderr
    );
}

#[test]
fn binary_messages_and_other_mime_types() {
    let out = framegate(&[
        "policy-test",
        "policies/validate.lua",
        "--binary",
        "--message",
        r#"{"type":"chat"}"#,
    ]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.line("decision: "),
        "drop",
        "binary messages are never decoded"
    );
    assert_eq!(
        json_of(out.line("sent to client: ")),
        json!({"error": "invalid message", "detail": "binary message"})
    );

    let out = framegate(&[
        "policy-test",
        "policies/validate.lua",
        "--mime",
        "text/plain",
        "--message",
        r#"{"type":"chat"}"#,
    ]);
    assert_eq!(out.line("decision: "), "close", "{}", out.stderr);
    assert_eq!(
        out.line("close: "),
        "1011 policy error",
        "conn:reply with a table fails on text/plain"
    );

    let dir = TempDir::new("binary");
    let script = dir.write(
        "bytes.lua",
        "return function(msg) return msg.type .. \" \" .. msg.size end\n",
    );
    let out = framegate(&[
        "policy-test",
        &script.display().to_string(),
        "--binary",
        "--message",
        "abc",
    ]);
    assert_eq!(out.line("decision: "), "replace");
    assert_eq!(out.line("payload: "), "<binary 8 bytes: binary 3>");
}

#[test]
fn bad_input_exits_with_status_1() {
    let out = framegate(&[
        "policy-test",
        "policies/validate.lua",
        "--message",
        "x",
        "--ctx",
        "{not json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("--ctx"), "{}", out.stderr);

    let dir = TempDir::new("bad-spec");
    dir.write("cases.lua", SPEC_SCRIPT);
    let spec = dir.write(
        "direction.toml",
        "script = \"cases.lua\"\n[[case]]\nname = \"n\"\nmessage = \"m\"\ndirection = \"sideways\"\nexpect = \"forward\"\n",
    );
    let out = framegate(&["policy-test", "--spec", &spec.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("sideways"), "{}", out.stderr);

    let spec = dir.write(
        "unknown.toml",
        "script = \"cases.lua\"\n[[case]]\nname = \"n\"\nmessage = \"m\"\nexpect = \"forward\"\nexpected_payload = \"m\"\n",
    );
    let out = framegate(&["policy-test", "--spec", &spec.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("expected_payload"), "{}", out.stderr);
}

/// `--schema`: the message is validated first, as `[route.validate]` does, and the verdict is
/// printed before the decision.
#[test]
fn schema_validates_the_message_before_the_policy() {
    let dir = TempDir::new("schema");
    let schema = dir.write(
        "chat.json",
        r#"{"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}"#,
    );
    let schema = schema.display().to_string();

    // Without a script: the schema alone.
    let out = framegate(&[
        "policy-test",
        "--schema",
        &schema,
        "--message",
        r#"{"type":"chat"}"#,
    ]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert_eq!(out.line("schema: "), "valid");
    assert_eq!(out.line("decision: "), "forward");
    assert_eq!(out.line("payload: "), r#"{"type":"chat"}"#);

    let out = framegate(&["policy-test", "--schema", &schema, "--message", "{}"]);
    assert_eq!(
        out.line("schema: "),
        r#"invalid: "type" is a required property"#
    );
    assert_eq!(out.line("decision: "), "close");
    assert_eq!(out.line("close: "), r#"1007 "type" is a required property"#);

    // A valid message goes on to the policy; an invalid one never reaches it.
    let valid = framegate(&[
        "policy-test",
        "policies/validate.lua",
        "--schema",
        &schema,
        "--message",
        r#"{"type":"chat"}"#,
        "--ctx",
        r#"{"user":"ann"}"#,
    ]);
    assert_eq!(valid.line("schema: "), "valid");
    assert_eq!(valid.line("decision: "), "replace");
    assert_eq!(
        json_of(valid.line("payload: ")),
        json!({"type": "chat", "from": "ann"})
    );
    let out = framegate(&[
        "policy-test",
        "policies/validate.lua",
        "--schema",
        &schema,
        "--on-invalid",
        "reply",
        "--message",
        r#"{"type":"kick","n":[}"#,
    ]);
    assert!(
        out.line("schema: ").starts_with("invalid: invalid JSON: "),
        "{}",
        out.stdout
    );
    assert_eq!(out.line("decision: "), "drop");
    let sent = json_of(out.line("sent to client: "));
    assert_eq!(sent["error"], "invalid message");
    let out = framegate(&[
        "policy-test",
        "--schema",
        &schema,
        "--on-invalid",
        "drop",
        "--direction",
        "server",
        "--message",
        "[]",
    ]);
    assert_eq!(out.line("decision: "), "drop");
    assert!(!out.stdout.contains("sent to"), "{}", out.stdout);

    // Binary messages are not checked.
    let out = framegate(&[
        "policy-test",
        "--schema",
        &schema,
        "--binary",
        "--message",
        "x",
    ]);
    assert_eq!(out.line("schema: "), "not checked (binary message)");
    assert_eq!(out.line("decision: "), "forward");
}

#[test]
fn a_broken_schema_is_an_error_with_its_file_and_place() {
    let dir = TempDir::new("schema-broken");
    let bad = dir.write("bad.json", "{\n  \"type\": \"object\",,\n}\n");
    let bad = bad.display().to_string();
    let out = framegate(&["policy-test", "--schema", &bad, "--message", "{}"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr
            .contains(&format!("{bad}:2:20: not JSON: key must be a string")),
        "{}",
        out.stderr
    );
    let invalid = dir.write("invalid.json", r#"{"type": "strng"}"#);
    let invalid = invalid.display().to_string();
    let out = framegate(&["policy-test", "--schema", &invalid, "--message", "{}"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(
        out.stderr
            .contains(&format!("{invalid}:1:10: invalid JSON Schema at /type: ")),
        "{}",
        out.stderr
    );
    let out = framegate(&[
        "policy-test",
        "--schema",
        &invalid,
        "--mime",
        "text/plain",
        "--message",
        "{}",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(out.stderr.contains("--mime must be"), "{}", out.stderr);
}

/// A spec file may name a schema (and `on_invalid`) besides, or instead of, a script.
#[test]
fn a_spec_can_validate_with_a_schema() {
    let dir = TempDir::new("spec-schema");
    dir.write("chat.json", r#"{"type": "object", "required": ["type"]}"#);
    let spec = dir.write(
        "spec.toml",
        r#"schema = "chat.json"
on_invalid = "reply"

[[case]]
name = "a chat message passes"
message = '{"type":"chat"}'
expect = "forward"

[[case]]
name = "a message without a type is refused with a reply"
message = '{"text":"hi"}'
expect = "drop"
sent_to_client = ['{"error":"invalid message","detail":"\"type\" is a required property"}']
"#,
    );
    let out = framegate(&["policy-test", "--spec", &spec.display().to_string()]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("2 passed, 0 failed"), "{}", out.stdout);
}

/// `framegate policy-test … | head -1`: a reader that has gone is not an error (a panic
/// before). The pipe's reading end is closed before the binary starts, so every write fails.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let script = r#"
import os, subprocess, sys
r, w = os.pipe()
os.close(r)
p = subprocess.run(sys.argv[1:], stdout=w, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=20)
sys.stdout.write("%d\n%s" % (p.returncode, p.stderr.decode()))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, env!("CARGO_BIN_EXE_framegate")])
        .args([
            "policy-test",
            "policies/validate.lua",
            "--message",
            r#"{"type":"chat"}"#,
        ])
        .current_dir(MANIFEST_DIR)
        .env("FRAMEGATE_LOG", "warn")
        .output()
        .expect("python3 runs (apt-get install python3)");
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, stderr) = text.split_once('\n').unwrap_or((&text, ""));
    assert_eq!(status, "0", "exit status; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
