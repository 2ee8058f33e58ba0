//! The `[route.jwt]` table: where the keys come from, what a token must hold, where it is
//! found. Key files are read and parsed here, so `framegate check` reports an unreadable or
//! unusable key at its `file:line:column`. The verification itself is `src/jwt/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use toml::Spanned;

use super::{units, ConfigError};

/// `route.jwt.leeway` when absent.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The shortest HMAC secret `secret_file` may hold (RFC 7518 §3.2: at least the hash size).
const MIN_SECRET: usize = 32;

/// serde mirror of `[route.jwt]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    issuer: Option<Spanned<String>>,
    jwks_url: Option<Spanned<String>>,
    public_key_file: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    audience: Option<Spanned<OneOrMany>>,
    algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    from: Option<Spanned<Vec<Spanned<String>>>>,
    leeway: Option<Spanned<String>>,
    required: Option<BTreeMap<String, Spanned<OneOrMany>>>,
    expire_with_token: Option<bool>,
    strip: Option<bool>,
    ca_file: Option<Spanned<String>>,
}

/// A string, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A validated `[route.jwt]`.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Where the verification keys come from.
    pub keys: JwtKeys,
    /// Accepted `aud` values (a token's `aud` must name one); empty: `aud` is not checked.
    pub audience: Vec<String>,
    /// Accepted `alg` values; never `none`, HMAC only with `secret_file`.
    pub algorithms: Vec<Algorithm>,
    /// Where the token is looked for, in order; the first found is used.
    pub from: Vec<TokenSource>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Claims that must hold these values (each value listed must be present).
    pub required: Vec<(String, Vec<String>)>,
    /// Close the connection (1008 "token expired") when the token expires.
    pub expire_with_token: bool,
    /// Remove the token from the upstream request.
    pub strip: bool,
    /// Extra PEM roots for the IdP's HTTPS (besides the built-in web roots).
    pub ca_file: Option<PathBuf>,
}

/// Where a route's verification keys come from.
#[derive(Debug, Clone)]
pub enum JwtKeys {
    /// OIDC discovery: `<issuer>/.well-known/openid-configuration` names `jwks_uri`; the
    /// token's `iss` must be this issuer.
    Issuer(String),
    /// A JWKS document at this HTTPS URL.
    JwksUrl(String),
    /// One public key (PEM), read at load time.
    PublicKey(KeyMaterial),
    /// One HMAC secret (the file's bytes, without a final line break), read at load time.
    Secret(KeyMaterial),
}

/// Key bytes read from a file; `Debug` does not show them.
#[derive(Clone)]
pub struct KeyMaterial {
    /// The file, as configured (resolved).
    pub path: PathBuf,
    /// What it holds.
    pub bytes: Arc<[u8]>,
    /// The key's algorithm family.
    pub family: AlgorithmFamily,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyMaterial({}, {:?})", self.path.display(), self.family)
    }
}

impl KeyMaterial {
    /// The key for verification. Validation has parsed it once, so this does not fail.
    pub fn decoding_key(&self) -> Option<DecodingKey> {
        match self.family {
            AlgorithmFamily::Hmac => Some(DecodingKey::from_secret(&self.bytes)),
            AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&self.bytes).ok(),
            AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&self.bytes).ok(),
            AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&self.bytes).ok(),
        }
    }
}

/// Where to look for the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A request header (lower-case name). `Authorization` must say `Bearer <token>`; other
    /// headers may hold the token alone.
    Header(String),
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
}

/// Checks `[route.jwt]`, reporting errors at the offending value. `base` anchors relative paths.
pub(super) fn check(
    raw: Spanned<RawJwt>,
    at: &dyn Fn(std::ops::Range<usize>, String, &str) -> ConfigError,
    base: &Path,
) -> Result<JwtConfig, ConfigError> {
    let table = raw.span();
    let raw = raw.into_inner();
    let err = |span: std::ops::Range<usize>, message: String, hint: &str| at(span, message, hint);
    let file = |v: &Spanned<String>, what: &str| -> Result<(PathBuf, Vec<u8>), ConfigError> {
        let path = base.join(v.get_ref());
        std::fs::read(&path)
            .map(|b| (path.clone(), b))
            .map_err(|e| {
                err(
                    v.span(),
                    format!(
                        "route.jwt.{what} {:?}: cannot read {}: {e}",
                        v.get_ref(),
                        path.display()
                    ),
                    "paths are relative to the folder of the configuration file",
                )
            })
    };
    let sources = [
        ("issuer", &raw.issuer),
        ("jwks_url", &raw.jwks_url),
        ("public_key_file", &raw.public_key_file),
        ("secret_file", &raw.secret_file),
    ];
    let given: Vec<_> = sources.iter().filter(|(_, v)| v.is_some()).collect();
    let one_hint = "give exactly one of issuer, jwks_url, public_key_file, secret_file";
    if given.is_empty() {
        return Err(err(table, "route.jwt needs a key source".into(), one_hint));
    }
    if let Some((second, Some(v))) = given.get(1) {
        return Err(err(
            v.span(),
            format!(
                "route.jwt.{second} cannot be combined with route.jwt.{}",
                given[0].0
            ),
            one_hint,
        ));
    }
    let https = |v: &Spanned<String>, key: &str| -> Result<String, ConfigError> {
        let text = v.get_ref().trim_end_matches('/').to_owned();
        let ok = text
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty()));
        match ok {
            Some(_) => Ok(text),
            None => Err(err(
                v.span(),
                format!("route.jwt.{key} {:?} is not an https:// URL", v.get_ref()),
                "the keys are fetched over HTTPS only",
            )),
        }
    };
    let keys = if let Some(v) = &raw.issuer {
        JwtKeys::Issuer(https(v, "issuer")?)
    } else if let Some(v) = &raw.jwks_url {
        JwtKeys::JwksUrl(https(v, "jwks_url")?.clone()).with_exact(v.get_ref())
    } else if let Some(v) = &raw.public_key_file {
        let (path, bytes) = file(v, "public_key_file")?;
        if bytes.windows(11).any(|w| w == b"PRIVATE KEY") {
            return Err(err(
                v.span(),
                format!(
                    "route.jwt.public_key_file {:?} holds a private key",
                    v.get_ref()
                ),
                "give the public key only: `openssl pkey -in key.pem -pubout`",
            ));
        }
        let family = if DecodingKey::from_rsa_pem(&bytes).is_ok() {
            AlgorithmFamily::Rsa
        } else if DecodingKey::from_ec_pem(&bytes).is_ok() {
            AlgorithmFamily::Ec
        } else if DecodingKey::from_ed_pem(&bytes).is_ok() {
            AlgorithmFamily::Ed
        } else {
            return Err(err(
                v.span(),
                format!(
                    "route.jwt.public_key_file {:?} holds no RSA, EC or Ed25519 public key in PEM",
                    v.get_ref()
                ),
                "export it with e.g. `openssl pkey -pubout`",
            ));
        };
        JwtKeys::PublicKey(KeyMaterial {
            path,
            bytes: bytes.into(),
            family,
        })
    } else if let Some(v) = &raw.secret_file {
        let (path, mut bytes) = file(v, "secret_file")?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.len() < MIN_SECRET {
            return Err(err(
                v.span(),
                format!("route.jwt.secret_file {:?} holds {} bytes; an HMAC secret needs at least {MIN_SECRET}", v.get_ref(), bytes.len()),
                "generate one with `openssl rand -base64 48`",
            ));
        }
        JwtKeys::Secret(KeyMaterial {
            path,
            bytes: bytes.into(),
            family: AlgorithmFamily::Hmac,
        })
    } else {
        unreachable!("one source is given")
    };
    let family = match &keys {
        JwtKeys::PublicKey(k) | JwtKeys::Secret(k) => Some(k.family),
        _ => None,
    };
    let algorithms = match &raw.algorithms {
        None => match family {
            Some(f) => vec![f.algorithms()[0]],
            None => vec![Algorithm::RS256],
        },
        Some(list) => {
            if list.get_ref().is_empty() {
                return Err(err(
                    list.span(),
                    "route.jwt.algorithms is empty".into(),
                    "leave it out for the default, or list e.g. [\"RS256\"]",
                ));
            }
            let mut out = Vec::new();
            for a in list.get_ref() {
                let alg: Algorithm = a.get_ref().parse().map_err(|_| {
                    err(
                        a.span(),
                        format!("route.jwt.algorithms: unknown algorithm {:?}", a.get_ref()),
                        "one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512 (\"none\" is never accepted)",
                    )
                })?;
                let hmac = AlgorithmFamily::Hmac.algorithms().contains(&alg);
                let fits = match family {
                    Some(f) => f.algorithms().contains(&alg),
                    None => !hmac,
                };
                if !fits {
                    let why = match (&keys, hmac) {
                        (JwtKeys::Secret(_), _) => "secret_file verifies HS256, HS384 or HS512 only".to_owned(),
                        (_, true) => "HMAC algorithms need secret_file: never accepted against a public key (algorithm confusion)".to_owned(),
                        (_, false) => format!("public_key_file holds a {:?} key", family.expect("a file source")),
                    };
                    return Err(err(
                        a.span(),
                        format!("route.jwt.algorithms: {alg:?} does not fit the key source"),
                        &why,
                    ));
                }
                out.push(alg);
            }
            out
        }
    };
    let from = match &raw.from {
        None => vec![TokenSource::Header("authorization".into())],
        Some(list) => {
            if list.get_ref().is_empty() {
                return Err(err(
                    list.span(),
                    "route.jwt.from is empty".into(),
                    "leave it out for [\"header:Authorization\"]",
                ));
            }
            let mut out = Vec::new();
            for s in list.get_ref() {
                let parsed = match s.get_ref().split_once(':') {
                    Some(("header", n)) if http::HeaderName::from_bytes(n.as_bytes()).is_ok() => {
                        Some(TokenSource::Header(n.to_ascii_lowercase()))
                    }
                    Some(("query", n)) if !n.is_empty() => Some(TokenSource::Query(n.to_owned())),
                    Some(("cookie", n)) if !n.is_empty() && !n.contains([';', '=', ' ']) => {
                        Some(TokenSource::Cookie(n.to_owned()))
                    }
                    _ => None,
                };
                match parsed {
                    Some(p) => out.push(p),
                    None => {
                        return Err(err(
                            s.span(),
                            format!("route.jwt.from: {:?} is not a token source", s.get_ref()),
                            "write \"header:Authorization\", \"query:access_token\" or \"cookie:access_token\"",
                        ))
                    }
                }
            }
            out
        }
    };
    let leeway = match &raw.leeway {
        None => DEFAULT_LEEWAY,
        Some(v) => units::parse_duration(v.get_ref()).map_err(|e| {
            err(
                v.span(),
                format!("route.jwt.leeway: {e}"),
                "write a duration like \"30s\"",
            )
        })?,
    };
    let audience = raw
        .audience
        .map(|a| a.into_inner().into_vec())
        .unwrap_or_default();
    let required = raw
        .required
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_inner().into_vec()))
        .collect();
    let ca_file = match &raw.ca_file {
        None => None,
        Some(v) => {
            if family.is_some() {
                return Err(err(
                    v.span(),
                    "route.jwt.ca_file is for issuer or jwks_url".into(),
                    "a key file needs no HTTPS: remove ca_file",
                ));
            }
            let (path, _) = file(v, "ca_file")?;
            Some(path)
        }
    };
    Ok(JwtConfig {
        keys,
        audience,
        algorithms,
        from,
        leeway,
        required,
        expire_with_token: raw.expire_with_token.unwrap_or(false),
        strip: raw.strip.unwrap_or(false),
        ca_file,
    })
}

impl JwtKeys {
    /// A `jwks_url` keeps the URL exactly as written (a trailing slash may matter there).
    fn with_exact(self, written: &str) -> Self {
        match self {
            JwtKeys::JwksUrl(_) => JwtKeys::JwksUrl(written.to_owned()),
            other => other,
        }
    }
}
