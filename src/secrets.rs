//! Keeping secrets out of logs, results and error messages.
//!
//! API keys live in [`ApiKey`], whose `Debug`/`Display` never show the value; URLs that may carry
//! a password are printed through [`redact_url`].

use std::fmt;

/// A provider API key, read from the environment variable the config names.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The raw value, for the one place that needs it: the outgoing request header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// `scheme://user:password@host/...` → `scheme://user:***@host/...`; other URLs unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// Removes every occurrence of the given secret values from `text` (for provider error bodies
/// that echo part of a key back, e.g. OpenAI's "Incorrect API key provided: sk-…").
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        out = out.replace(secret, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(
            redact_url("postgres://u:p@ss@db:5432/x?sslmode=require"),
            "postgres://u:***@db:5432/x?sslmode=require"
        );
        assert_eq!(redact_url("postgres://postgres@127.0.0.1/fallback"), "postgres://postgres:***@127.0.0.1/fallback");
        assert_eq!(redact_url("http://host/path@x"), "http://host/path@x");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn keys_never_print() {
        let key = ApiKey::new("gsk_abcdefghijklmnop".into());
        assert_eq!(format!("{key:?}"), "ApiKey(***)");
        assert_eq!(scrub("bad key gsk_abcdefghijklmnop!", &[key.expose()]), "bad key ***!");
    }
}
