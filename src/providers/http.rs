//! The I/O half of a provider: one shared reqwest client (connection pooling), the configured
//! timeout, the key from the environment; the dialect module does all the interpreting.

use std::time::{Duration, SystemTime};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

use super::{ChatProvider, Completion, Failure, FailureKind, openai};
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
        if config.kind != ProviderKind::Openai {
            return Err(format!("provider `{}`: kind `{}` is not supported by this build", config.name, config.kind));
        }
        let mut headers = HeaderMap::new();
        if let Some(key) = &key {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
                format!("provider `{}`: the API key holds characters a header cannot carry", config.name)
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("provider `{}`: header `{name}`: {e}", config.name))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| format!("provider `{}`: header `{name}`: {e}", config.name))?;
            headers.insert(name, value);
        }
        Ok(Self {
            client,
            url: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            model: config.model.clone(),
            timeout: config.timeout,
            headers,
            key,
        })
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
        let request = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .timeout(self.timeout)
            .json(&openai::request_body(body, &self.model));
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
                openai::interpret(status, &headers, &bytes, SystemTime::now()).map_err(|f| self.scrubbed(f))
            }
            Ok((status, _, None)) => Err(Failure::new(FailureKind::Server, Some(status), "the answer exceeded 16 MiB")),
            Err(e) => Err(transport_failure(&e)),
        }
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
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
