//! `[route.jwt]`: upgrades authenticated with JWTs from a real OpenID provider (the npm
//! `oidc-provider`, run by tests/js/oidc.mjs over HTTPS with a CA made here), key rotation,
//! outages, the refusals (expired, wrong audience or issuer, `alg: none`, algorithm
//! confusion, a missing scope), stripping, sessions that follow the token, and what policies
//! see (`req.jwt`, `ctx.jwt`, `gw.jwt.verify`, `conn:expire_at`).

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::SinkExt;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use support::*;
use tokio_tungstenite::tungstenite::{self, Message};

/// A running OpenID provider and the files of its test PKI.
struct Idp {
    process: Option<node::NodeProcess>,
    issuer: String,
    admin: SocketAddr,
    ca: PathBuf,
    /// Holds the PKI files while the provider runs.
    _dir: TempDir,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Starts the provider with a certificate for 127.0.0.1 signed by a fresh test CA. One
/// provider starts at a time (node loads oidc-provider's many modules at start-up, slow on a
/// loaded machine); a start that prints nothing within the event timeout is tried once more
/// (the first process is ended), then fails the test.
async fn idp() -> Idp {
    static STARTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let _one_at_a_time = STARTING.acquire().await.unwrap();
    match tokio::spawn(start_idp()).await {
        Ok(idp) => idp,
        Err(first) => {
            eprintln!("the OpenID provider did not start ({first}); trying once more");
            tokio::spawn(start_idp())
                .await
                .expect("the OpenID provider starts")
        }
    }
}

async fn start_idp() -> Idp {
    let dir = TempDir::new("jwt-idp");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "framegate jwt test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let ca_file = dir.write("ca.pem", &ca.pem());
    let cert = dir.write("cert.pem", &leaf.pem());
    let key = dir.write("key.pem", &leaf_key.serialize_pem());
    let mut process = node::spawn(
        "oidc.mjs",
        &[
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
            ca_file.to_str().unwrap(),
        ],
    );
    let issuer = process
        .line()
        .await
        .expect("the provider prints its issuer");
    let issuer = issuer.strip_prefix("issuer ").unwrap().to_owned();
    let admin = process
        .line()
        .await
        .expect("the provider prints its admin port");
    let admin: u16 = admin.strip_prefix("admin ").unwrap().parse().unwrap();
    Idp {
        process: Some(process),
        issuer,
        admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        ca: ca_file,
        _dir: dir,
    }
}

impl Idp {
    async fn admin_get(&self, target: &str) -> String {
        let (status, _, body) = raw_http(
            self.admin,
            &format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 200, "provider admin {target}: {body}");
        body
    }

    /// An access token from the provider's token endpoint (client-credentials grant).
    async fn token(&self, scope: &str, ttl: u64) -> String {
        self.admin_get(&format!("/token?scope={scope}&ttl={ttl}"))
            .await
    }

    /// A token with these claims signed by the provider's current key (or, with `HS256`,
    /// an HMAC keyed with its public key).
    async fn sign(&self, claims: serde_json::Value, alg: &str, kid: Option<&str>) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("claims", &claims.to_string());
        query.append_pair("alg", alg);
        if let Some(kid) = kid {
            query.append_pair("kid", kid);
        }
        self.admin_get(&format!("/sign?{}", query.finish())).await
    }

    /// Claims the gateway accepts, to vary.
    fn claims(&self) -> serde_json::Value {
        serde_json::json!({
            "iss": self.issuer, "aud": "chat", "sub": "forger", "scope": "chat",
            "iat": now(), "exp": now() + 300,
        })
    }

    async fn fetches(&self) -> u64 {
        self.admin_get("/fetches").await.parse().unwrap()
    }

    /// The `[route.jwt]` table for this provider, with more keys.
    fn table(&self, extra: &str) -> String {
        format!(
            "[route.jwt]\nissuer = \"{}\"\nca_file = {:?}\naudience = [\"chat\"]\n{extra}\n",
            self.issuer,
            self.ca.display().to_string()
        )
    }

    /// Ends the provider (by its PID).
    fn stop(&mut self) {
        drop(self.process.take());
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The status, `WWW-Authenticate` and body of a refused upgrade.
async fn refused(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    match connect_with(addr, path, headers).await {
        Err(tungstenite::Error::Http(response)) => {
            let challenge = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body =
                String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[])).into_owned();
            (response.status().as_u16(), challenge, body)
        }
        Ok(_) => panic!("upgrade to {path} succeeded, a refusal was expected"),
        Err(e) => panic!("upgrade to {path}: {e}"),
    }
}

async fn echo_once(ws: &mut Client) {
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(ws).await, "ping");
}

#[tokio::test]
async fn a_provider_token_opens_the_websocket_from_the_header_the_query_or_a_cookie() {
    let idp = idp().await;
    let mut up = echo().await;
    let gw = gateway(&route(
        "/chat",
        up.addr,
        &idp.table(
            "from = [\"header:Authorization\", \"query:access_token\", \"cookie:access_token\"]\nstrip = true",
        ),
        &[],
    ))
    .await;
    let addr = gw.local_addr();
    let token = idp.token("chat", 60).await;

    let (mut ws, _) = connect_with(addr, "/chat", &[("Authorization", &bearer(&token))])
        .await
        .expect("a valid token in the header opens the WebSocket");
    echo_once(&mut ws).await;
    let seen = up.requests.recv().await.unwrap();
    assert!(!seen.headers.contains_key("authorization"), "stripped");

    let (mut ws, _) = connect_with(addr, &format!("/chat?room=1&access_token={token}&x=2"), &[])
        .await
        .expect("a valid token in the query");
    echo_once(&mut ws).await;
    let seen = up.requests.recv().await.unwrap();
    assert!(
        !seen.uri.contains("access_token"),
        "the query token reached the upstream: {}",
        seen.uri
    );
    assert!(seen.uri.ends_with("?room=1&x=2"), "{}", seen.uri);

    let cookie = format!("theme=dark; access_token={token}; lang=fr");
    let (mut ws, _) = connect_with(addr, "/chat", &[("Cookie", &cookie)])
        .await
        .expect("a valid token in a cookie");
    echo_once(&mut ws).await;
    let seen = up.requests.recv().await.unwrap();
    assert_eq!(seen.headers["cookie"], "theme=dark; lang=fr");

    // Without a token, nothing reaches the upstream.
    let (status, challenge, body) = refused(addr, "/chat", &[]).await;
    assert_eq!(status, 401);
    assert_eq!(
        challenge,
        "Bearer error=\"invalid_token\", error_description=\"no token\""
    );
    assert_eq!(body, "unauthorized: no token\n");
    assert!(up.requests.try_recv().is_err());
    gw.shutdown().await;
}

#[tokio::test]
async fn invalid_tokens_get_401_and_never_reach_the_upstream() {
    let idp = idp().await;
    let mut up = echo().await;
    let gw = gateway(&route("/chat", up.addr, &idp.table("leeway = \"5s\""), &[])).await;
    let addr = gw.local_addr();
    // The provider's own token works, which also caches its keys.
    let token = idp.token("chat", 60).await;
    connect_with(addr, "/chat", &[("Authorization", &bearer(&token))])
        .await
        .expect("the provider's token is accepted");
    up.requests.recv().await.unwrap();

    let mut expired = idp.claims();
    expired["exp"] = (now() - 60).into();
    let mut audience = idp.claims();
    audience["aud"] = "billing".into();
    let mut issuer = idp.claims();
    issuer["iss"] = "https://evil.example".into();
    let mut no_exp = idp.claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    let none = format!(
        "{}.{}.",
        base64_url(r#"{"alg":"none","typ":"JWT"}"#),
        base64_url(&idp.claims().to_string())
    );
    let tampered = format!("{}AAAAAAAAAA", &token[..token.len() - 10]);
    let cases = [
        (idp.sign(expired, "RS256", None).await, "token expired"),
        (idp.sign(audience, "RS256", None).await, "wrong audience"),
        (idp.sign(issuer, "RS256", None).await, "wrong issuer"),
        (
            idp.sign(no_exp, "RS256", None).await,
            "a required claim is missing",
        ),
        (none, "malformed token or unsupported algorithm"),
        // HS256 with the RSA public key as the secret: HS256 is not in `algorithms`.
        (
            idp.sign(idp.claims(), "HS256", None).await,
            "algorithm not accepted",
        ),
        (tampered, "bad signature"),
        (
            "not-a-jwt".to_owned(),
            "malformed token or unsupported algorithm",
        ),
    ];
    for (token, reason) in cases {
        let (status, challenge, body) =
            refused(addr, "/chat", &[("Authorization", &bearer(&token))]).await;
        assert_eq!(status, 401, "{reason}");
        assert_eq!(
            challenge,
            format!("Bearer error=\"invalid_token\", error_description=\"{reason}\"")
        );
        assert_eq!(body, format!("unauthorized: {reason}\n"));
    }
    // A forged but well-signed token is accepted: the test's signing is the provider's.
    let good = idp.sign(idp.claims(), "RS256", None).await;
    connect_with(addr, "/chat", &[("Authorization", &bearer(&good))])
        .await
        .expect("a token signed by the provider's key");
    up.requests.recv().await.unwrap();
    assert!(
        up.requests.try_recv().is_err(),
        "no refused upgrade reached the upstream"
    );
    gw.shutdown().await;
}

/// base64url without padding, for hand-made tokens.
fn base64_url(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn key_rotation_needs_no_reload_and_unknown_key_ids_are_rate_limited() {
    let idp = idp().await;
    let up = echo().await;
    let gw = gateway(&route("/chat", up.addr, &idp.table(""), &[])).await;
    let addr = gw.local_addr();
    let old = idp.token("chat", 300).await;
    connect_with(addr, "/chat", &[("Authorization", &bearer(&old))])
        .await
        .expect("a token of the first key");
    assert_eq!(idp.fetches().await, 1);

    let kid = idp.admin_get("/rotate").await;
    assert_eq!(kid, "key-2");
    let new = idp.token("chat", 300).await;
    let (mut ws, _) = connect_with(addr, "/chat", &[("Authorization", &bearer(&new))])
        .await
        .expect("a token of the new key: its unknown kid makes the gateway fetch the keys again");
    echo_once(&mut ws).await;
    assert_eq!(idp.fetches().await, 2);
    connect_with(addr, "/chat", &[("Authorization", &bearer(&old))])
        .await
        .expect("the old key's tokens stay valid until they expire");

    // Another unknown kid within 10 s of that fetch: refused without fetching again.
    let bogus = idp.sign(idp.claims(), "RS256", Some("made-up")).await;
    let (status, _, body) = refused(addr, "/chat", &[("Authorization", &bearer(&bogus))]).await;
    assert_eq!(
        (status, body.as_str()),
        (401, "unauthorized: unknown key id\n")
    );
    assert_eq!(idp.fetches().await, 2);
    gw.shutdown().await;
}

/// Each route remembers the tokens it verified (keyed by their SHA-256); a remembered token
/// whose key has left the JWKS is refused as it would be without that cache.
#[tokio::test]
async fn a_verified_token_is_refused_once_its_key_leaves_the_jwks() {
    let idp = idp().await;
    let up = echo().await;
    let gw = gateway(&route("/chat", up.addr, &idp.table(""), &[])).await;
    let addr = gw.local_addr();
    let old = idp.token("chat", 300).await;
    for _ in 0..2 {
        connect_with(addr, "/chat", &[("Authorization", &bearer(&old))])
            .await
            .expect("a token of the first key, verified then remembered");
    }
    assert_eq!(idp.admin_get("/rotate?retire=1").await, "key-2");
    let new = idp.token("chat", 300).await;
    connect_with(addr, "/chat", &[("Authorization", &bearer(&new))])
        .await
        .expect("the new key, fetched for its unknown kid");
    assert_eq!(idp.fetches().await, 2);
    let (status, _, body) = refused(addr, "/chat", &[("Authorization", &bearer(&old))]).await;
    assert_eq!(
        (status, body.as_str()),
        (401, "unauthorized: unknown key id\n"),
        "the remembered token's key is no longer published"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn cached_keys_outlive_the_provider_and_no_keys_at_all_is_503() {
    let mut idp = idp().await;
    let up = echo().await;
    let gw = gateway(&route("/chat", up.addr, &idp.table(""), &[])).await;
    let addr = gw.local_addr();
    let token = idp.token("chat", 300).await;
    connect_with(addr, "/chat", &[("Authorization", &bearer(&token))])
        .await
        .expect("keys fetched");
    idp.stop();
    let (mut ws, _) = connect_with(addr, "/chat", &[("Authorization", &bearer(&token))])
        .await
        .expect("the cached keys still verify with the provider gone");
    echo_once(&mut ws).await;
    gw.shutdown().await;

    // A gateway that never reached the provider has no keys: 503, and no challenge.
    let gone = format!("https://127.0.0.1:{}", closed_port().await.port());
    let table = idp.table("").replace(&idp.issuer, &gone);
    let gw = gateway(&route("/chat", up.addr, &table, &[])).await;
    let (status, challenge, body) = refused(
        gw.local_addr(),
        "/chat",
        &[("Authorization", &bearer(&token))],
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(challenge, "");
    assert_eq!(
        body,
        "unauthorized: no verification keys (the identity provider is unreachable)\n"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_required_scope_must_be_granted() {
    let idp = idp().await;
    let up = echo().await;
    let gw = gateway(&route(
        "/chat",
        up.addr,
        &idp.table("required = { scope = \"chat\" }"),
        &[],
    ))
    .await;
    let addr = gw.local_addr();
    let other = idp.token("other", 60).await;
    let (status, _, body) = refused(addr, "/chat", &[("Authorization", &bearer(&other))]).await;
    assert_eq!(
        (status, body.as_str()),
        (401, "unauthorized: a required claim is missing\n")
    );
    let both = idp.token("chat%20other", 60).await;
    connect_with(addr, "/chat", &[("Authorization", &bearer(&both))])
        .await
        .expect("scope \"chat other\" holds the word chat");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_session_closes_with_1008_when_its_token_expires() {
    let idp = idp().await;
    let (up, mut upstreams) = captured().await;
    let gw = gateway(&route(
        "/chat",
        up.addr,
        &format!(
            "expire = \"1h\"\n{}",
            idp.table("leeway = \"0s\"\nexpire_with_token = true")
        ),
        &[],
    ))
    .await;
    let token = idp.token("chat", 2).await;
    let (mut ws, _) = connect_with(
        gw.local_addr(),
        "/chat",
        &[("Authorization", &bearer(&token))],
    )
    .await
    .expect("a fresh token");
    let mut upstream = upstreams.recv().await.unwrap();
    let frame = expect_close(&mut ws).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1008, "token expired")
    );
    let frame = expect_close(&mut upstream).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1008, "token expired")
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_refreshed_token_sent_in_band_extends_the_session_up_to_the_route_expire() {
    let idp = idp().await;
    let up = echo().await;
    // The cookbook's refresh policy, as shipped.
    let policy = format!(
        "{:?}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/policies/jwt_refresh.lua")
    );
    let table = idp.table("leeway = \"0s\"\nexpire_with_token = true");
    let gw = gateway(&format!(
        "{}{}",
        route(
            "/chat",
            up.addr,
            &format!("expire = \"1h\"\n{table}"),
            &[("on_client_frame", &policy)]
        ),
        route(
            "/short",
            up.addr,
            &format!("expire = \"3s\"\n{table}"),
            &[("on_client_frame", &policy)]
        ),
    ))
    .await;
    let addr = gw.local_addr();
    let first = idp.token("chat", 2).await;
    let (mut ws, _) = connect_with(addr, "/chat", &[("Authorization", &bearer(&first))])
        .await
        .expect("a fresh token");
    // A bad refresh is answered, and changes nothing.
    ws.send(Message::text(r#"{"type":"refresh","token":"nope"}"#))
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(answer["error"], "malformed token or unsupported algorithm");
    let second = idp.token("chat", 5).await;
    ws.send(Message::text(format!(
        r#"{{"type":"refresh","token":"{second}"}}"#
    )))
    .await
    .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    let exp = answer["exp"].as_u64().expect("the new expiry");
    let frame = expect_close(&mut ws).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1008, "token expired")
    );
    assert!(
        now() + 1 >= exp,
        "closed at the refreshed token's expiry, not the first one's"
    );

    // Never past the route's expire: a one-minute token on a 3 s route.
    let third = idp.token("chat", 2).await;
    let (mut ws, _) = connect_with(addr, "/short", &[("Authorization", &bearer(&third))])
        .await
        .expect("a fresh token");
    let long = idp.token("chat", 60).await;
    let opened = std::time::Instant::now();
    ws.send(Message::text(format!(
        r#"{{"type":"refresh","token":"{long}"}}"#
    )))
    .await
    .unwrap();
    next_text(&mut ws).await;
    let frame = expect_close(&mut ws).await;
    assert_eq!(
        (u16::from(frame.code), frame.reason.as_str()),
        (1001, "connection lifetime expired")
    );
    assert!(opened.elapsed() < Duration::from_secs(4));
    gw.shutdown().await;
}

#[tokio::test]
async fn policies_see_the_claims_as_req_jwt_and_ctx_jwt() {
    let idp = idp().await;
    let mut up = echo().await;
    let on_upgrade = script(
        "claims_upgrade.lua",
        r#"return function(req, ctx)
             req:set_header("x-subject", req.jwt.sub)
             req:tag("client", req.jwt.client_id)
           end"#,
    );
    let on_frame = script(
        "claims_frame.lua",
        r#"return function(msg, ctx, conn)
             local ok = pcall(function() ctx.jwt.scope = "admin" end)
             return ctx.jwt.scope .. " " .. ctx.jwt.aud .. " " .. tostring(ok)
           end"#,
    );
    let gw = gateway(&route(
        "/chat",
        up.addr,
        &idp.table(""),
        &[("on_upgrade", &on_upgrade), ("on_client_frame", &on_frame)],
    ))
    .await;
    let token = idp.token("chat", 60).await;
    let (mut ws, _) = connect_with(
        gw.local_addr(),
        "/chat",
        &[("Authorization", &bearer(&token))],
    )
    .await
    .expect("upgrade");
    let seen = up.requests.recv().await.unwrap();
    assert_eq!(seen.headers["x-subject"], "framegate-test");
    ws.send(Message::text("what")).await.unwrap();
    assert_eq!(
        next_text(&mut ws).await,
        "chat chat false",
        "ctx.jwt is read-only"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn key_files_verify_without_a_provider_and_refuse_algorithm_confusion() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let dir = TempDir::new("jwt-keys");
    let ec = KeyPair::generate().unwrap();
    let public = dir.write("ec.pem", &ec.public_key_pem());
    let secret = "a-shared-secret-of-at-least-thirty-two-bytes";
    let secret_file = dir.write("hs.secret", &format!("{secret}\n"));
    let up = echo().await;
    let gw = gateway(&format!(
        "{}{}",
        route(
            "/ec",
            up.addr,
            &format!("[route.jwt]\npublic_key_file = {:?}\nalgorithms = [\"ES256\"]\naudience = \"chat\"", public.display().to_string()),
            &[]
        ),
        route(
            "/hs",
            up.addr,
            &format!("[route.jwt]\nsecret_file = {:?}\nfrom = [\"header:X-Token\"]", secret_file.display().to_string()),
            &[]
        ),
    ))
    .await;
    let addr = gw.local_addr();
    let claims = serde_json::json!({ "sub": "a", "aud": "chat", "exp": now() + 60 });
    let es = encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    connect_with(addr, "/ec", &[("Authorization", &bearer(&es))])
        .await
        .expect("ES256 with public_key_file");
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    connect_with(addr, "/hs", &[("X-Token", &hs)])
        .await
        .expect("HS256 with secret_file, the token alone in a header");
    // HS256 keyed with the public key's PEM, against the EC key.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(ec.public_key_pem().as_bytes()),
    )
    .unwrap();
    let (status, _, body) = refused(addr, "/ec", &[("Authorization", &bearer(&forged))]).await;
    assert_eq!(
        (status, body.as_str()),
        (401, "unauthorized: algorithm not accepted\n")
    );
    gw.shutdown().await;
}

#[test]
fn configuration_errors_point_at_the_key() {
    let dir = TempDir::new("jwt-config");
    let origin = dir.0.join("gw.toml");
    let secret = dir.write("short.secret", "short");
    let pem = dir.write("ec.pem", &KeyPair::generate().unwrap().public_key_pem());
    let head = "[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\n[route.jwt]\n";
    let cases = [
        ("", "gw.toml:4:1: route.jwt needs a key source"),
        (
            "issuer = \"https://idp\"\njwks_url = \"https://idp/certs\"\n",
            "gw.toml:6:12: route.jwt.jwks_url cannot be combined with route.jwt.issuer",
        ),
        (
            "issuer = \"http://idp\"\n",
            "gw.toml:5:10: route.jwt.issuer \"http://idp\" is not an https:// URL",
        ),
        (
            "jwks_url = \"https://idp/certs\"\nalgorithms = [\"RS256\", \"HS256\"]\n",
            "gw.toml:6:24: route.jwt.algorithms: HS256 does not fit the key source",
        ),
        (
            "jwks_url = \"https://idp/certs\"\nalgorithms = [\"none\"]\n",
            "gw.toml:6:15: route.jwt.algorithms: unknown algorithm \"none\"",
        ),
        (
            "public_key_file = \"missing.pem\"\n",
            "gw.toml:5:19: route.jwt.public_key_file \"missing.pem\": cannot read",
        ),
        (
            "public_key_file = \"ec.pem\"\nalgorithms = [\"RS256\"]\n",
            "gw.toml:6:15: route.jwt.algorithms: RS256 does not fit the key source",
        ),
        (
            "public_key_file = \"private.pem\"\n",
            "gw.toml:5:19: route.jwt.public_key_file \"private.pem\" holds a private key",
        ),
        (
            "secret_file = \"short.secret\"\n",
            "gw.toml:5:15: route.jwt.secret_file \"short.secret\" holds 5 bytes",
        ),
        (
            "jwks_url = \"https://idp/certs\"\nfrom = [\"body:token\"]\n",
            "gw.toml:6:9: route.jwt.from: \"body:token\" is not a token source",
        ),
        (
            "jwks_url = \"https://idp/certs\"\nleeway = \"soon\"\n",
            "gw.toml:6:10: route.jwt.leeway: invalid duration",
        ),
        (
            "jwks_url = \"https://idp/certs\"\naudiences = [\"chat\"]\n",
            "gw.toml:6:1: unknown field `audiences`",
        ),
    ];
    let private = dir.write("private.pem", &KeyPair::generate().unwrap().serialize_pem());
    let _ = (secret, pem, private);
    for (table, want) in cases {
        let source = format!("{head}{table}");
        let error = framegate::Config::from_toml(&source, &origin)
            .err()
            .unwrap_or_else(|| panic!("{table:?} was accepted"))
            .to_string();
        let error = error.replace(&format!("{}/", dir.0.display()), "");
        assert!(
            error.starts_with(want),
            "for {table:?}: got {error:?}, want {want:?}"
        );
    }
}

#[tokio::test]
async fn a_reload_that_keeps_the_key_url_keeps_the_cached_keys() {
    let mut idp = idp().await;
    let up = echo().await;
    let dir = TempDir::new("jwt-reload");
    let table = idp.table("");
    let config = |expire: &str| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{}",
            route(
                "/chat",
                up.addr,
                &format!("expire = \"{expire}\"\n{table}"),
                &[]
            )
        )
    };
    let path = dir.write("config.toml", &config("1h"));
    let gw = framegate::Gateway::new(framegate::Config::load(&path).unwrap())
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = gw.local_addr();
    let token = idp.token("chat", 300).await;
    connect_with(addr, "/chat", &[("Authorization", &bearer(&token))])
        .await
        .expect("keys fetched");
    assert_eq!(idp.fetches().await, 1);
    idp.stop();
    dir.write("config.toml", &config("2h"));
    gw.reload().await.expect("the reload succeeds");
    let (mut ws, _) = connect_with(addr, "/chat", &[("Authorization", &bearer(&token))])
        .await
        .expect("the new configuration uses the keys fetched before the reload");
    echo_once(&mut ws).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_provider_that_never_answers_holds_the_handshake_only_for_its_timeout() {
    // Takes TCP connections (the kernel's backlog) and never says a word of TLS.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("https://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let up = echo().await;
    let gw = gateway(&route(
        "/chat",
        up.addr,
        &format!("handshake_timeout = \"1s\"\n[route.jwt]\nissuer = \"{issuer}\""),
        &[],
    ))
    .await;
    let started = std::time::Instant::now();
    let (status, _, _) = refused(
        gw.local_addr(),
        "/chat",
        &[("Authorization", "Bearer a.b.c")],
    )
    .await;
    assert_eq!(status, 401, "a malformed token is refused before any fetch");
    let token = format!(
        "{}.{}.sig",
        base64_url(r#"{"alg":"RS256","kid":"k"}"#),
        base64_url(r#"{"exp":9999999999}"#)
    );
    let (status, _, _) = refused(
        gw.local_addr(),
        "/chat",
        &[("Authorization", &bearer(&token))],
    )
    .await;
    assert_eq!(status, 503);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "the handshake waited {waited:?} for the keys, its handshake_timeout is 1s"
    );
    drop(silent);
    gw.shutdown().await;
}

/// `[route.jwt]` guards the plain HTTP requests of an `http = "proxy"` route as it guards its
/// upgrades: no token, 401 and the upstream never asked; a valid one, the request goes on with
/// the claims in `req.jwt`, and `strip` keeps the token from the upstream.
#[tokio::test]
async fn http_requests_on_a_jwt_route_need_the_token_too() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use tokio::io::AsyncWriteExt;
    let dir = TempDir::new("jwt-http");
    let secret = "a-shared-secret-of-at-least-thirty-two-bytes";
    let secret_file = dir.write("hs.secret", secret);
    // An HTTP upstream that answers each request with its own head.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                let _ = seen_tx.send(head.clone());
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}",
                    head.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    let policy = script(
        "jwt_http.lua",
        "return function(req) if not req.upgrade then req:set_header(\"x-user\", req.jwt.sub) end end\n",
    );
    let gw = gateway(&route_to(
        "/api",
        &format!("ws://{up}/api"),
        &format!(
            "http = \"proxy\"\n[route.jwt]\nsecret_file = {:?}\nfrom = [\"query:access_token\"]\nstrip = true",
            secret_file.display().to_string()
        ),
        &[("on_upgrade", &policy)],
    ))
    .await;
    let addr = gw.local_addr();
    let (status, head, _) = raw_http(addr, "GET /api?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(status, 401, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: bearer error=\"invalid_token\""),
        "{head}"
    );
    assert!(
        seen.try_recv().is_err(),
        "a refused request reached the upstream"
    );
    let claims = serde_json::json!({ "sub": "ann", "exp": now() + 60 });
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let (status, head, body) = raw_http(
        addr,
        &format!(
            "GET /api?x=1&access_token={token} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let upstream_head = within("the upstream request", seen.recv()).await.unwrap();
    assert!(
        upstream_head.starts_with("GET /api?x=1 HTTP/1.1"),
        "{upstream_head}"
    );
    assert!(
        !upstream_head.contains(&token),
        "the token reached the upstream"
    );
    assert!(
        upstream_head.to_ascii_lowercase().contains("x-user: ann"),
        "{upstream_head}"
    );
    assert!(body.contains("x-user"), "{body}");
    gw.shutdown().await;
}
