//! The I/O half of a provider: one shared reqwest client (connection pooling), the configured
//! timeout, the key from the environment; the dialect module does all the interpreting.

use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

use super::{ChatProvider, Completion, Failure, FailureKind, anthropic, gemini, openai};
use crate::config::{ProviderConfig, ProviderKind};
use crate::job::ChatBody;
use crate::secrets::{ApiKey, scrub};

/// Largest answer we read; a provider sending more is broken (or hostile).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Builds the one HTTP client every provider shares.
pub fn shared_client() -> reqwest::Client {
    reqwest::Client::builder()
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
    url: String,
    model: String,
    timeout: Duration,
    /// Auth and extra headers, computed once.
    headers: HeaderMap,
    /// Kept to scrub any echo of it from error messages.
    key: Option<ApiKey>,
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
        let mut headers = HeaderMap::new();
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
        Ok(Self { client, kind: config.kind, url, model: config.model.clone(), timeout: config.timeout, headers, key })
    }

    /// The request body in this provider's dialect, or what it cannot carry.
    fn payload(&self, body: &ChatBody) -> Result<serde_json::Value, String> {
        match self.kind {
            ProviderKind::Openai => Ok(openai::request_body(body, &self.model)),
            ProviderKind::Gemini => gemini::request_body(body),
            ProviderKind::Anthropic => anthropic::request_body(body, &self.model),
        }
    }

    fn interpret(&self, status: u16, headers: &HeaderMap, bytes: &[u8]) -> Result<Completion, Failure> {
        let now = SystemTime::now();
        match self.kind {
            ProviderKind::Openai => openai::interpret(status, headers, bytes, now),
            ProviderKind::Gemini => gemini::interpret(status, headers, bytes, &self.model, now),
            ProviderKind::Anthropic => anthropic::interpret(status, headers, bytes, now),
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
    async fn complete(&self, body: &ChatBody) -> Result<Completion, Failure> {
        let payload = self.payload(body).map_err(|what| {
            Failure::new(FailureKind::Client, None, format!("not sent: the {} kind cannot carry {what} yet", self.kind))
        })?;
        let request = self.client.post(&self.url).headers(self.headers.clone()).timeout(self.timeout).json(&payload);
        let result = async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let bytes = read_limited(response).await?;
            Ok::<_, reqwest::Error>((status, headers, bytes))
        }
        .await;
        match result {
            Ok((status, headers, Some(bytes))) => {
                self.interpret(status, &headers, &bytes).map_err(|f| self.scrubbed(f))
            }
            Ok((status, _, None)) => Err(Failure::new(FailureKind::Server, Some(status), "the answer exceeded 16 MiB")),
            Err(e) => Err(transport_failure(&e)),
        }
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
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
