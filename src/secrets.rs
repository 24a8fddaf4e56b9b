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
        // A password with an unencoded `/`, `?` or `#` ends the authority early: what stands
        // before the last `@` is then taken for `user:password` (a URL without credentials
        // has no `:` there, or no `@`).
        None => match rest.rsplit_once('@') {
            Some((userinfo, after)) if userinfo.contains(':') => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                format!("{scheme}://{user}:***@{after}")
            }
            _ => url.to_string(),
        },
    }
}

/// Removes the given secret values from `text` (for provider error bodies that echo a key
/// back, e.g. OpenAI's "Incorrect API key provided: sk-…"): every run of at least
/// [`shortest_part`] consecutive characters of a secret, in any ASCII case, as written,
/// percent-encoded or with its `/` escaped as in JSON. A server may echo a key cut short, upper-cased or URL-encoded; each would
/// still give most of it away. Secrets under 8 bytes are left alone (they would hide words).
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 8 && !s.is_ascii()) {
        out = out.replace(secret, "***");
    }
    let mut hidden = vec![false; out.len()];
    for secret in secrets.iter().filter(|s| s.len() >= 8 && s.is_ascii()) {
        // As written, percent-encoded, and with JSON's optional escape of `/` (PHP's and many
        // Java encoders' default), for text that did not parse as JSON.
        for form in [secret.to_string(), percent_encoded(secret), secret.replace('/', "\\/")] {
            mark_parts(out.as_bytes(), form.as_bytes(), shortest_part(secret.len()), &mut hidden);
        }
    }
    hide(&out, &hidden)
}

/// The shortest run of a secret's characters that is hidden: 12, or half of a long secret,
/// never more than the whole secret.
fn shortest_part(secret_len: usize) -> usize {
    (secret_len / 2).max(12).min(secret_len)
}

/// `secret` percent-encoded as the most eager encoders do (every byte but `A-Za-z0-9` as
/// `%XX`; forms that leave `-_.~` as they are match the secret as written there).
fn percent_encoded(secret: &str) -> String {
    let mut out = String::with_capacity(secret.len());
    for byte in secret.bytes() {
        if byte.is_ascii_alphanumeric() {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Marks in `hidden` every run of at least `shortest` bytes of `text` that equals (ignoring
/// ASCII case) a run of the ASCII `secret`. The runs marked are ASCII, so hiding them keeps the
/// text valid UTF-8.
fn mark_parts(text: &[u8], secret: &[u8], shortest: usize, hidden: &mut [bool]) {
    for start in 0..text.len() {
        let rest = text.get(start..).unwrap_or_default();
        let longest =
            (0..secret.len()).map(|from| common_run(rest, secret.get(from..).unwrap_or_default())).max().unwrap_or(0);
        if longest >= shortest {
            hidden.iter_mut().skip(start).take(longest).for_each(|h| *h = true);
        }
    }
}

/// `text` with each run of bytes marked in `hidden` replaced by `***`.
fn hide(text: &str, hidden: &[bool]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_hidden = false;
    for (at, ch) in text.char_indices() {
        if hidden.get(at).copied().unwrap_or(false) {
            if !in_hidden {
                out.push_str("***");
            }
            in_hidden = true;
        } else {
            in_hidden = false;
            out.push(ch);
        }
    }
    out
}

/// How many bytes `a` and `b` share from their starts, ignoring ASCII case.
fn common_run(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x.eq_ignore_ascii_case(y)).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever surrounds it, and whatever case it is echoed in, a key never survives.
        #[test]
        fn no_key_survives_scrubbing(
            before in "\\PC{0,40}",
            after in "\\PC{0,40}",
            key in "[!-~]{8,60}",
            upper in any::<bool>(),
        ) {
            let echoed = if upper { key.to_ascii_uppercase() } else { key.clone() };
            let said = scrub(&format!("{before}{echoed}{after}"), &[&key]);
            prop_assert!(!said.to_ascii_lowercase().contains(&key.to_ascii_lowercase()), "{said}");
        }

        /// A password, whatever it holds but `@` (an unencoded `/`, `?`, `#` or `:` included),
        /// never survives redaction.
        #[test]
        fn no_password_survives_redaction(
            password in "P~[!-?A-~]{4,30}",
            host in "[a-z][a-z0-9.]{0,20}",
            tail in "(/[a-z0-9%]{0,10})?",
        ) {
            let redacted = redact_url(&format!("amqp://guest:{password}@{host}:5672{tail}"));
            prop_assert!(!redacted.contains(&password), "{redacted}");
        }
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(
            redact_url("postgres://u:p@ss@db:5432/x?sslmode=require"),
            "postgres://u:***@db:5432/x?sslmode=require"
        );
        assert_eq!(redact_url("postgres://postgres@127.0.0.1/fallback"), "postgres://postgres:***@127.0.0.1/fallback");
        assert_eq!(redact_url("http://host/path@x"), "http://host/path@x");
        // A password with an unencoded `/` or `#` (the authority seems to end inside it).
        assert_eq!(redact_url("amqp://guest:s3cr/et9@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("amqp://guest:s3c#ret@host/"), "amqp://guest:***@host/");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn keys_never_print() {
        let key = ApiKey::new("gsk_abcdefghijklmnop".into());
        assert_eq!(format!("{key:?}"), "ApiKey(***)");
        assert_eq!(scrub("bad key gsk_abcdefghijklmnop!", &[key.expose()]), "bad key ***!");
    }

    #[test]
    fn a_key_echoed_cut_short_recased_or_url_encoded_is_hidden_too() {
        let key = "gsk-AbCdEfGhIjKlMnOpQrSt";
        for echoed in [
            "gsk-AbCdEfGhIjKlMnOpQrSt",
            "GSK-ABCDEFGHIJKLMNOPQRST",
            "gsk-abcdefghijklmnopqrst",
            "gsk-AbCdEfGhIjKlMnOpQrS",
            "EfGhIjKlMnOpQrSt",
            "gsk%2DAbCdEfGhIjKlMnOpQrSt",
            "gsk%2dabcdefghijklmnopqrst",
        ] {
            let said = scrub(&format!("invalid key «{echoed}» sent"), &[key]);
            assert_eq!(said, "invalid key «***» sent", "{echoed}");
        }
        // A few characters a key shares with ordinary words stay.
        assert_eq!(scrub("the key gsk-Ab is short", &[key]), "the key gsk-Ab is short");
        assert_eq!(scrub("no key here", &["ünïcödé-secret-value"]), "no key here");
        assert_eq!(scrub("x ünïcödé-secret-value y", &["ünïcödé-secret-value"]), "x *** y");
    }
}
