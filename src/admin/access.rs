//! Who may see the console and who may act from it.
//!
//! Three rules, each against an attack a browser makes possible:
//!
//! - **Host**: the console answers only requests whose `Host` is an IP
//!   address (the one it listens on, or any other: a rebinding attack needs a
//!   name), `localhost`, or a name the operator configured
//!   (`--admin-allowed-hosts`). A page on `evil.example` that re-points its
//!   name at 127.0.0.1 (DNS rebinding) sends `Host: evil.example` and is
//!   refused. The probes and `/metrics` carry no ids and no actions and are
//!   addressed by whatever name the orchestrator or scraper uses, so they
//!   are not held to it.
//! - **Same origin**: a state-changing request (every one is a POST) must
//!   carry the CSRF token of the page it came from: an HMAC, under a key
//!   drawn at start, of a random session id kept in a `SameSite=Strict`,
//!   `HttpOnly` cookie. Another site's page can neither read the token nor
//!   send the cookie. Where the browser says where a request comes from
//!   (`Origin`, `Sec-Fetch-Site`), anything but this origin is refused too.
//!   A client sending `Authorization: Bearer <admin token>` is not a browser
//!   form (no other page can make a browser send that header) and needs no
//!   CSRF token.
//! - **Token**: with `--admin-token` set, every action needs it (the page's
//!   field, or the bearer header), whatever the address. Without one, actions
//!   are open only on a loopback address (`127.0.0.1`, `::1`, and
//!   `::ffff:127.0.0.1`); on any other the console is read-only. There is no
//!   default token, and one shorter than [`MIN_TOKEN_LEN`] is refused at start.

use std::net::{IpAddr, SocketAddr};

use axum::http::{header, HeaderMap, HeaderValue};
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::Sha256;

/// The session cookie the CSRF token is bound to.
pub const SESSION_COOKIE: &str = "transfer_worker_session";
/// The shortest admin token accepted (a guessable token protects nothing).
pub const MIN_TOKEN_LEN: usize = 16;

/// What the console's actions need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Loopback address, no token configured: the CSRF rules only.
    Open,
    /// Actions need this token (and, from a browser form, the CSRF rules).
    Token(String),
    /// Not loopback and no token configured: no actions.
    ReadOnly,
}

/// The console's access rules (see the module docs).
pub struct Access {
    mode: Mode,
    csrf_key: [u8; 32],
    allowed_hosts: Vec<String>,
}

/// Why an action was refused (a 403 with this text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// What an action's form says about who sends it.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// The admin token typed into the page.
    pub token: Option<&'a str>,
    /// The page's CSRF token.
    pub csrf: Option<&'a str>,
}

impl Access {
    pub fn new(addr: SocketAddr, token: Option<String>, allowed_hosts: &[String]) -> Access {
        let mode = match token.filter(|t| !t.is_empty()) {
            Some(t) => Mode::Token(t),
            None if addr.ip().to_canonical().is_loopback() => Mode::Open,
            None => Mode::ReadOnly,
        };
        Access {
            mode,
            csrf_key: rand::thread_rng().gen(),
            allowed_hosts: allowed_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect(),
        }
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Whether the request's `Host` may see the console.
    pub fn host_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let name = host_name(host);
        name.parse::<IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || self.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// The session id in the request's cookie, if it has a well-formed one.
    pub fn session(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == SESSION_COOKIE)
            .map(|(_, value)| value.to_owned())
            .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// A new session id, and the cookie that sets it.
    pub fn new_session() -> (String, HeaderValue) {
        let id = format!("{:032x}", rand::thread_rng().gen::<u128>());
        let cookie = format!("{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict");
        (id, HeaderValue::from_str(&cookie).expect("a cookie of hex digits is a valid header"))
    }

    /// The CSRF token of a session's pages.
    pub fn csrf_token(&self, session: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.csrf_key).expect("HMAC takes any key length");
        mac.update(b"transfer-worker console csrf:");
        mac.update(session.as_bytes());
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether a state-changing request may act (see the module docs).
    pub fn may_act(&self, headers: &HeaderMap, given: &Credentials<'_>) -> Result<(), Refused> {
        let refuse = |why: &str| Err(Refused(why.to_owned()));
        if self.mode == Mode::ReadOnly {
            return refuse(
                "no admin token is configured (--admin-token): the console is read-only on this address; \
                 use `transfer-worker outbox requeue`",
            );
        }
        if !self.host_allowed(headers) {
            return refuse("this Host is not one the console answers (see --admin-allowed-hosts)");
        }
        if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
            if !matches!(site, "same-origin" | "none") {
                return refuse("cross-site request refused: actions come only from the console's own pages");
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
            let own = [format!("http://{host}"), format!("https://{host}")];
            if !own.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
                return refuse("cross-origin request refused: actions come only from the console's own pages");
            }
        }
        let bearer =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if let (Mode::Token(t), Some(b)) = (&self.mode, bearer) {
            return if constant_time_eq(b.as_bytes(), t.as_bytes()) { Ok(()) } else { refuse("wrong admin token") };
        }
        let csrf_ok = match (self.session(headers), given.csrf) {
            (Some(session), Some(csrf)) => constant_time_eq(csrf.as_bytes(), self.csrf_token(&session).as_bytes()),
            _ => false,
        };
        if !csrf_ok {
            return refuse(
                "missing or stale CSRF token: act from the console's page (reload it), \
                 or send Authorization: Bearer <admin token>",
            );
        }
        match &self.mode {
            Mode::Token(t) if !given.token.is_some_and(|g| constant_time_eq(g.as_bytes(), t.as_bytes())) => {
                refuse("the admin token is required (the page's token field, or Authorization: Bearer <token>)")
            }
            _ => Ok(()),
        }
    }
}

/// The name or address of a `Host` header, without its port.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn loopback_in_every_spelling_is_loopback() {
        for addr in ["127.0.0.1:9187", "[::1]:9187", "[::ffff:127.0.0.1]:9187"] {
            assert_eq!(Access::new(addr.parse().unwrap(), None, &[]).mode(), &Mode::Open, "{addr}");
        }
        assert_eq!(Access::new("0.0.0.0:9187".parse().unwrap(), None, &[]).mode(), &Mode::ReadOnly);
        assert_eq!(Access::new("0.0.0.0:9187".parse().unwrap(), Some(String::new()), &[]).mode(), &Mode::ReadOnly);
    }

    #[test]
    fn the_console_answers_ip_hosts_localhost_and_configured_names_only() {
        let a = Access::new("127.0.0.1:9187".parse().unwrap(), None, &["worker.internal".into()]);
        for ok in ["127.0.0.1:9187", "10.1.2.3", "[::1]:9187", "localhost:9187", "LOCALHOST", "worker.internal:9187"] {
            assert!(a.host_allowed(&headers(&[("host", ok)])), "{ok}");
        }
        for bad in ["evil.example", "evil.example:9187", "localhost.evil.example", "127.0.0.1.nip.io"] {
            assert!(!a.host_allowed(&headers(&[("host", bad)])), "{bad}");
        }
        assert!(!a.host_allowed(&HeaderMap::new()), "no Host at all");
    }

    #[test]
    fn an_action_needs_the_pages_csrf_token_and_its_own_origin() {
        let a = Access::new("127.0.0.1:9187".parse().unwrap(), None, &[]);
        let session = "0123456789abcdef0123456789abcdef";
        let csrf = a.csrf_token(session);
        let cookie = format!("{SESSION_COOKIE}={session}");
        let good = headers(&[("host", "127.0.0.1:9187"), ("cookie", &cookie), ("origin", "http://127.0.0.1:9187")]);
        let with = |csrf| Credentials { token: None, csrf };
        assert_eq!(a.may_act(&good, &with(Some(&csrf))), Ok(()));
        assert!(a.may_act(&good, &with(None)).is_err(), "no token");
        assert!(a.may_act(&good, &with(Some("00"))).is_err(), "wrong token");
        let other_session = headers(&[
            ("host", "127.0.0.1:9187"),
            ("cookie", "transfer_worker_session=ffffffffffffffffffffffffffffffff"),
        ]);
        assert!(a.may_act(&other_session, &with(Some(&csrf))).is_err(), "another session's token");
        let evil = headers(&[("host", "127.0.0.1:9187"), ("cookie", &cookie), ("origin", "https://evil.example")]);
        assert!(a.may_act(&evil, &with(Some(&csrf))).is_err(), "foreign origin");
        let cross = headers(&[("host", "127.0.0.1:9187"), ("cookie", &cookie), ("sec-fetch-site", "cross-site")]);
        assert!(a.may_act(&cross, &with(Some(&csrf))).is_err(), "cross-site");
        let rebound = headers(&[("host", "evil.example"), ("cookie", &cookie)]);
        assert!(a.may_act(&rebound, &with(Some(&csrf))).is_err(), "foreign host");
    }

    #[test]
    fn with_a_token_every_action_needs_it_and_a_bearer_needs_no_csrf() {
        let token = "s3cret-s3cret-s3cret";
        let a = Access::new("127.0.0.1:9187".parse().unwrap(), Some(token.into()), &[]);
        let bearer = format!("Bearer {token}");
        assert_eq!(
            a.may_act(&headers(&[("host", "127.0.0.1"), ("authorization", &bearer)]), &Credentials::default()),
            Ok(())
        );
        let wrong = headers(&[("host", "127.0.0.1"), ("authorization", "Bearer nope")]);
        assert!(a.may_act(&wrong, &Credentials::default()).is_err());
        let session = "0123456789abcdef0123456789abcdef";
        let cookie = format!("{SESSION_COOKIE}={session}");
        let form = headers(&[("host", "127.0.0.1"), ("cookie", &cookie)]);
        let csrf = a.csrf_token(session);
        assert!(a.may_act(&form, &Credentials { token: None, csrf: Some(&csrf) }).is_err(), "the token too");
        assert_eq!(a.may_act(&form, &Credentials { token: Some(token), csrf: Some(&csrf) }), Ok(()));
        let ro = Access::new("0.0.0.0:9187".parse().unwrap(), None, &[]);
        assert!(ro.may_act(&form, &Credentials { token: Some(token), csrf: Some(&csrf) }).is_err(), "read-only");
    }
}
