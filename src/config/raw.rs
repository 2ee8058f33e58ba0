//! serde mirror of `config.toml`. Every value keeps its span so validation can point at it.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub server: Option<Server>,
    #[serde(default)]
    pub route: Vec<Route>,
    pub shared: Option<super::shared::RawShared>,
    pub admin: Option<super::admin::RawAdmin>,
    #[serde(default)]
    pub upstream: Vec<super::pool::RawPool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Server {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub close_timeout: Option<Spanned<String>>,
    pub workers: Option<Spanned<i64>>,
    pub watchdog_timeout: Option<Spanned<String>>,
    pub max_pending_handshakes: Option<Spanned<i64>>,
    pub queue_timeout: Option<Spanned<String>>,
    pub keepalive_timeout: Option<Spanned<String>>,
    pub keepalive_requests: Option<Spanned<i64>>,
    pub watch: Option<bool>,
    pub drain_old: Option<Spanned<String>>,
    pub tls: Option<Vec<TlsListener>>,
}

/// One `[[server.tls]]` table: a `wss://` listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsListener {
    pub listen: Spanned<String>,
    pub cert_file: Spanned<String>,
    pub key_file: Spanned<String>,
    #[serde(default)]
    pub sni: Vec<CertificatePair>,
    pub min_version: Option<Spanned<String>>,
}

/// An entry of `sni`: one more certificate and its key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CertificatePair {
    pub cert_file: Spanned<String>,
    pub key_file: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Route {
    pub path: Spanned<String>,
    pub host: Option<Spanned<String>>,
    pub upstream: Spanned<String>,
    pub upstream_path: Option<Spanned<String>>,
    pub mime_type: Option<Spanned<String>>,
    pub expire: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub ping_interval: Option<Spanned<String>>,
    pub ping_timeout: Option<Spanned<String>>,
    pub max_queued_bytes: Option<Spanned<String>>,
    pub max_message_size: Option<Spanned<String>>,
    pub handshake_timeout: Option<Spanned<String>>,
    pub policies: Option<Policies>,
    pub on_policy_error: Option<Spanned<String>>,
    pub policy_cpu_limit: Option<Spanned<String>>,
    pub policy_memory_limit: Option<Spanned<String>>,
    pub policy_state_limit: Option<Spanned<String>>,
    pub upstream_tls: Option<UpstreamTls>,
    pub allow_encoded_slash: Option<bool>,
    pub origins: Option<Spanned<Vec<Spanned<String>>>>,
    pub allow_missing_origin: Option<Spanned<bool>>,
    pub http: Option<Spanned<String>>,
    pub max_body_size: Option<Spanned<String>>,
    pub jwt: Option<Spanned<super::jwt::RawJwt>>,
    pub validate: Option<Spanned<super::validate::RawValidate>>,
    pub capture: Option<super::capture::RawCapture>,
    pub compression: Option<bool>,
    pub compression_context_takeover: Option<bool>,
    pub compression_window_bits: Option<Spanned<i64>>,
    pub compression_level: Option<Spanned<i64>>,
    pub compression_threshold: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Policies {
    pub on_upgrade: Option<Spanned<String>>,
    pub on_client_frame: Option<Spanned<String>>,
    pub on_server_frame: Option<Spanned<String>>,
    pub on_close: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamTls {
    pub ca_file: Option<Spanned<String>>,
    pub insecure_skip_verify: Option<bool>,
}
