//! The I/O half of a provider: one shared reqwest client (connection pooling), the configured
//! timeout, the key from the environment; the dialect module does all the interpreting.

use std::time::{Duration, SystemTime};

use reqwest::Url;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use super::capabilities::{self, Capabilities};
use super::{ChatProvider, Completion, Failure, FailureKind, anthropic, gemini, openai};
use crate::config::{ProviderConfig, ProviderKind};
use crate::job::ChatBody;
use crate::secrets::{ApiKey, scrub};

/// Largest answer we read; a provider sending more is broken (or hostile).
/// 8 MiB keeps a result (the answer plus its envelope) below RabbitMQ 4.x's default
/// `max_message_size` of 16 MiB, which would otherwise refuse it on every try.
const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// The most an answer's buffer is sized to before its bytes arrive.
const PREALLOCATED_BYTES: usize = 64 * 1024;

/// Builds the one HTTP client every provider shares.
///
/// It follows no redirect: reqwest strips only `Authorization` when a redirect leaves the host,
/// so following one would hand `x-api-key` / `x-goog-api-key` (and any configured extra header)
/// to whichever host a provider, a proxy or an attacker names in `Location`. A 3xx is answered
/// as a server failure instead ([`errors::classify`](super::errors::classify)).
pub fn shared_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("fallback-worker/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client's static configuration is valid")
}

/// A configured provider reached over HTTP.
pub struct HttpProvider {
    client: reqwest::Client,
    kind: ProviderKind,
    /// Parsed once: parsing a URL for every call cost about as much as building the request.
    url: Url,
    model: String,
    timeout: Duration,
    /// Auth and extra headers, computed once.
    headers: HeaderMap,
    /// Kept to scrub any echo of it from error messages.
    key: Option<ApiKey>,
    /// What the kind carries, narrowed by the configured `supports`.
    carries: Capabilities,
}

impl HttpProvider {
    /// `key` is `None` for providers that need no auth (local mocks).
    pub fn new(client: reqwest::Client, config: &ProviderConfig, key: Option<ApiKey>) -> Result<Self, String> {
        let name = &config.name;
        let base = config.base_url.trim_end_matches('/');
        let url = match config.kind {
            ProviderKind::Openai => format!("{base}/chat/completions"),
            ProviderKind::Gemini => format!("{base}/models/{}:generateContent", config.model),
            ProviderKind::Anthropic => format!("{base}/messages"),
        };
        let url = Url::parse(&url).map_err(|e| format!("provider `{name}`: `{url}` is not a URL: {e}"))?;
        // Every request body is JSON; a configured `Content-Type` (below) still wins.
        let mut headers = HeaderMap::from_iter([(CONTENT_TYPE, HeaderValue::from_static("application/json"))]);
        if config.kind == ProviderKind::Anthropic {
            headers.insert("anthropic-version", HeaderValue::from_static(anthropic::API_VERSION));
        }
        if let Some(key) = &key {
            let (header, value) = match config.kind {
                ProviderKind::Openai => (AUTHORIZATION, format!("Bearer {}", key.expose())),
                ProviderKind::Gemini => (HeaderName::from_static("x-goog-api-key"), key.expose().to_string()),
                ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), key.expose().to_string()),
            };
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| format!("provider `{name}`: the API key holds characters a header cannot carry"))?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        for (header, value) in &config.headers {
            let header = HeaderName::from_bytes(header.as_bytes())
                .map_err(|e| format!("provider `{name}`: header `{header}`: {e}"))?;
            let value =
                HeaderValue::from_str(value).map_err(|e| format!("provider `{name}`: header `{header}`: {e}"))?;
            headers.insert(header, value);
        }
        Ok(Self {
            client,
            kind: config.kind,
            url,
            model: config.model.clone(),
            timeout: config.timeout,
            headers,
            key,
            carries: Capabilities::configured(config.kind, config.supports.as_deref()),
        })
    }

    /// The request body in this provider's dialect, or what it cannot carry.
    fn payload(&self, body: &ChatBody) -> Result<serde_json::Value, String> {
        match self.kind {
            ProviderKind::Openai => Ok(openai::request_body(body, &self.model)),
            ProviderKind::Gemini => gemini::request_body(body),
            ProviderKind::Anthropic => anthropic::request_body(body, &self.model),
        }
    }

    /// The request body's bytes. The OpenAI dialect sends the job's body as it is (with the
    /// provider's model), serialized straight from it; the others are translated first.
    fn payload_bytes(&self, body: &ChatBody) -> Result<Vec<u8>, String> {
        // Serializing JSON values cannot fail (string keys, no non-finite numbers).
        match self.kind {
            ProviderKind::Openai => {
                Ok(serde_json::to_vec(&openai::RequestBody { body, model: &self.model }).unwrap_or_default())
            }
            _ => self.payload(body).map(|payload| serde_json::to_vec(&payload).unwrap_or_default()),
        }
    }

    /// Reads the answer to `body` (Anthropic's depends on it: JSON may come as a tool's input).
    fn interpret(
        &self,
        body: &ChatBody,
        status: u16,
        headers: &HeaderMap,
        bytes: &[u8],
    ) -> Result<Completion, Failure> {
        let now = SystemTime::now();
        match self.kind {
            ProviderKind::Openai => openai::interpret(status, headers, bytes, now),
            ProviderKind::Gemini => gemini::interpret(status, headers, bytes, &self.model, now),
            ProviderKind::Anthropic => {
                anthropic::interpret(status, headers, bytes, anthropic::Reading::of(body, &self.model), now)
            }
        }
    }

    fn scrubbed(&self, mut failure: Failure) -> Failure {
        if let Some(key) = &self.key {
            failure.message = scrub(&failure.message, &[key.expose()]);
        }
        failure
    }
}

#[async_trait::async_trait]
impl ChatProvider for HttpProvider {
    /// Translates the request once more than strictly needed (here, then in `complete`): a
    /// translation is microseconds against a call's hundreds of milliseconds, and it keeps the
    /// check exactly as strict as the request that would be sent.
    fn can_carry(&self, body: &ChatBody) -> Result<(), String> {
        if let Some(missing) = capabilities::refusal(self.kind, self.carries, body) {
            return Err(missing);
        }
        match self.kind {
            // Sent as it is: no translation that could refuse it (and no copy to find that out).
            ProviderKind::Openai => Ok(()),
            _ => self.payload(body).map(drop).map_err(|what| format!("the {} kind cannot carry {what}", self.kind)),
        }
    }

    async fn complete(&self, body: &ChatBody) -> Result<Completion, Failure> {
        // The chain asked `can_carry` first; this only guards callers that did not.
        let payload = self.payload_bytes(body).map_err(|what| {
            Failure::new(FailureKind::Client, None, format!("not sent: the {} kind cannot carry {what}", self.kind))
        })?;
        let request =
            self.client.post(self.url.clone()).headers(self.headers.clone()).timeout(self.timeout).body(payload);
        let result = async {
            let mut response = request.send().await?;
            let status = response.status().as_u16();
            let headers = std::mem::take(response.headers_mut());
            let bytes = read_limited(response).await?;
            Ok::<_, reqwest::Error>((status, headers, bytes))
        }
        .await;
        match result {
            Ok((status, headers, Some(bytes))) => {
                self.interpret(body, status, &headers, &bytes).map_err(|f| self.scrubbed(f))
            }
            Ok((status, _, None)) => Err(Failure::new(FailureKind::Server, Some(status), "the answer exceeded 8 MiB")),
            Err(e) => Err(transport_failure(&e)),
        }
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    // Sized from the announced length, within reason: the provider's word only picks the start.
    let announced = response.content_length().and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
    let mut body = Vec::with_capacity(announced.min(PREALLOCATED_BYTES));
    while let Some(chunk) = response.chunk().await? {
        if body.len().saturating_add(chunk.len()) > MAX_RESPONSE_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Classifies errors below HTTP; the message never includes the URL (it could carry a key).
fn transport_failure(error: &reqwest::Error) -> Failure {
    if error.is_timeout() {
        return Failure::new(FailureKind::Timeout, None, "no answer within the provider's timeout");
    }
    let message = if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "the connection closed while the answer was read"
    } else {
        "the connection failed"
    };
    Failure::new(FailureKind::Connect, None, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{MockOptions, MockProvider, Profile};
    use crate::providers::test_support::body;

    /// A server that answers every request with `status` and `Location: location`.
    async fn redirector(status: u16, location: String) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = axum::http::StatusCode::from_u16(status).unwrap();
        let app = axum::Router::new().fallback(move || {
            let location = location.clone();
            async move { (status, [(axum::http::header::LOCATION, location)]) }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn configured(kind: &str, extra: &str) -> HttpProvider {
        let config: ProviderConfig = toml::from_str(&format!(
            "name = \"p\"\nkind = \"{kind}\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\n{extra}"
        ))
        .unwrap();
        HttpProvider::new(shared_client(), &config, None).unwrap()
    }

    #[test]
    fn can_carry_answers_from_supports_and_from_the_translation() {
        let tools = body(serde_json::json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}]}));
        for kind in ["openai", "gemini", "anthropic"] {
            assert_eq!(configured(kind, "").can_carry(&tools), Ok(()), "{kind} carries tools by default");
            let narrowed = configured(kind, "supports = [\"images\"]").can_carry(&tools).unwrap_err();
            assert_eq!(narrowed, "the job needs tools, which this provider's `supports` leaves out");
        }
        let one_of = body(serde_json::json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object",
                "properties": {"v": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}}}}));
        assert_eq!(configured("openai", "").can_carry(&one_of), Ok(()), "OpenAI takes the schema as it is");
        assert_eq!(configured("anthropic", "").can_carry(&one_of), Ok(()), "a tool's input_schema is JSON Schema");
        let refused = configured("gemini", "").can_carry(&one_of).unwrap_err();
        assert!(
            refused.starts_with("the gemini kind cannot carry a `json_schema` with `oneOf` at `/properties/v`"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_so_the_key_never_reaches_another_host() {
        let cases = [
            (ProviderKind::Openai, Profile::Openai, 302),
            (ProviderKind::Gemini, Profile::GeminiNative, 307),
            (ProviderKind::Anthropic, Profile::Anthropic, 308),
        ];
        for (kind, profile, status) in cases {
            // The other host would answer anything with a success, so a followed redirect
            // would turn this call into an `Ok` and count a request there.
            let elsewhere = MockProvider::start(MockOptions::new(profile)).await.unwrap();
            let redirect = redirector(status, format!("{}/chat/completions", elsewhere.base_url())).await;
            let config: ProviderConfig = toml::from_str(&format!(
                "name = \"p\"\nkind = \"{kind}\"\nbase_url = \"http://{redirect}/v1\"\nmodel = \"m\"\ntimeout = \"5s\""
            ))
            .unwrap();
            let key = ApiKey::new("sk-test-0123456789".into());
            let provider = HttpProvider::new(shared_client(), &config, Some(key)).unwrap();
            let job = body(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}));

            let failure = provider.complete(&job).await.unwrap_err();

            assert_eq!((failure.kind, failure.status), (FailureKind::Server, Some(status)), "{kind}");
            assert_eq!(failure.message, format!("the provider answered a redirect (HTTP {status}), not followed"));
            assert_eq!(elsewhere.requests(), 0, "{kind}: the redirect target got a request");
        }
    }
}
