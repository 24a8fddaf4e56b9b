//! A mock LLM provider that behaves like the real ones (providers.md §11): their status codes,
//! rate-limit headers and error bodies, per provider profile.
//!
//! Tests script it per request ([`Scenario`]) and read what it received; benchmarks and the
//! demo run it as `fallback-worker mock-provider` with strict sliding-window limits, so a
//! client that sends too fast gets the provider's real 429 and the mock counts it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{any, get};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Which provider the mock imitates (envelopes and headers differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Groq,
    Cerebras,
    Openrouter,
    /// Gemini's OpenAI-compatible endpoint (errors wrapped in a JSON array).
    GeminiOpenai,
    /// Gemini's native `generateContent` API.
    GeminiNative,
    /// Anthropic's Messages API.
    Anthropic,
    Sambanova,
    Huggingface,
    Openai,
}

/// How a scripted 429 says when to come back.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryHint {
    /// The profile's usual way, for a wait of this length.
    Native(Duration),
    /// `retry-after: <seconds>`.
    RetryAfterSeconds(f64),
    /// `retry-after-ms: <ms>`.
    RetryAfterMs(u64),
    /// `retry-after: <HTTP-date>`.
    RetryAfterDate(SystemTime),
    /// `x-ratelimit-remaining-requests: 0` + `x-ratelimit-reset-requests: <Go duration>`.
    ResetHeader(Duration),
    /// OpenRouter's `X-RateLimit-Reset: <epoch ms>` (header and body).
    EpochMs(SystemTime),
    /// Only Google's `RetryInfo.retryDelay` in the body.
    RetryDelay(Duration),
    /// Only the text "Please try again in …" in the message (Groq).
    InMessage(Duration),
    /// No hint at all (Hugging Face passthrough, Gemini's bare form).
    Nothing,
    /// The profile's per-day quota error, resetting at `SystemTime`.
    Daily(SystemTime),
    /// A 429 the provider scopes to the whole account, resetting at `SystemTime`: OpenRouter's
    /// `free-models-per-day` (every `:free` model of the key), Gemini's
    /// `GenerateRequestsPerDayPerProjectPerModel-FreeTier` (the project's quota, both
    /// endpoints). No other provider scopes a 429 to the account in providers.md: the other
    /// profiles answer their per-day error, as with [`RetryHint::Daily`].
    Account(SystemTime),
}

/// What the mock does with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Scenario {
    /// A chat.completion with the profile's success headers.
    Success,
    /// A success after this delay.
    Slow(Duration),
    /// A success whose rate-limit headers say the request budget is now spent for this long.
    SpentBudget(Duration),
    RateLimited(RetryHint),
    /// 5xx with the profile's body (`text=true`: Envoy's plain-text body).
    ServerError {
        status: u16,
        text: bool,
    },
    /// Accept the request and never answer.
    Hang,
    /// 200 with a body that is not JSON.
    Garbage,
    /// Send the headers, then drop the connection.
    CloseConnection,
    /// The profile's bad-key error.
    Unauthorized,
    /// The profile's context-length error.
    ContextTooLong,
    /// Gemini: a 200 whose prompt was blocked for safety (others: a 400 content-policy error).
    SafetyBlock,
    /// The profile's out-of-credits error (402, Anthropic's low-balance 400, OpenAI's 429).
    OutOfCredits,
    /// The profile's answer for a withdrawn or unknown model (providers.md §11 `model_gone`):
    /// Groq's, OpenAI's and Cerebras' 404 `model_not_found`, OpenRouter's 404 "No endpoints
    /// found for …", Gemini's 404 `NOT_FOUND`, Anthropic's 404 `not_found_error`, SambaNova's
    /// 410 `model_deprecated`, the Hugging Face router's 400 `model_not_supported`.
    ModelGone,
    /// OpenRouter's 403 moderation refusal for this request's input, with `metadata.reasons`
    /// and `flagged_input`. Every profile answers with OpenRouter's body: OpenRouter is the one
    /// provider that documents such a 403, and the worker reads it whatever the profile.
    Moderation,
    // Bad answers on purpose (contract §7): each a 200 with the profile's success headers and
    // answer shape, as free tiers send them, for the answer checks to catch.
    /// An answer with no text (whitespace only), finished normally: an empty Gemini answer.
    EmptyAnswer,
    /// An answer stopped by the provider's own output cap: `finish_reason: "length"` (Gemini
    /// `MAX_TOKENS`, Anthropic `max_tokens`), text ending mid-sentence.
    CutOff,
    /// The JSON the job asked for, wrapped in prose and a Markdown code fence, as small models
    /// answer a `response_format` they do not honour.
    ProseAroundJson,
    /// Valid JSON off the schema the tests ask for (`{"echo": string}` required): an object
    /// with a `reply` key and no `echo`.
    OffSchemaJson,
    /// A call of the tool `get_weather` (`{"city": "Paris"}`) instead of a text answer.
    ToolCall,
    /// A normal answer whose text is exactly this (e.g. the JSON a schema asks for).
    Says(String),
}

/// How a mock run from the command line answers every request (`--answers`), so the demo
/// and local runs can show the answer checks at work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Answers {
    /// Normal answers ("mock answer from <model>").
    #[default]
    Good,
    /// [`Scenario::EmptyAnswer`].
    Empty,
    /// [`Scenario::CutOff`].
    CutOff,
    /// [`Scenario::ProseAroundJson`].
    ProseAroundJson,
    /// [`Scenario::OffSchemaJson`].
    OffSchemaJson,
    /// [`Scenario::ToolCall`].
    ToolCall,
}

impl Answers {
    pub fn scenario(self) -> Scenario {
        match self {
            Self::Good => Scenario::Success,
            Self::Empty => Scenario::EmptyAnswer,
            Self::CutOff => Scenario::CutOff,
            Self::ProseAroundJson => Scenario::ProseAroundJson,
            Self::OffSchemaJson => Scenario::OffSchemaJson,
            Self::ToolCall => Scenario::ToolCall,
        }
    }
}

/// What a successful answer carries, before the profile shapes it.
struct Reply {
    /// The text; `None` for a tool call.
    text: Option<String>,
    /// The tool call's name and arguments, when `text` is `None` (default: [`TOOL`]).
    call: Option<(String, Value)>,
    /// Stopped by the output cap rather than finished.
    cut_off: bool,
}

impl Reply {
    fn text(text: impl Into<String>) -> Reply {
        Reply { text: Some(text.into()), call: None, cut_off: false }
    }

    fn call(name: String, arguments: Value) -> Reply {
        Reply { text: None, call: Some((name, arguments)), cut_off: false }
    }
}

/// How many request bodies [`MockStats`] keeps.
pub const MAX_KEPT_BODIES: usize = 1000;

/// A strict limit: never more than `requests` accepted in any window of `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimit {
    pub requests: usize,
    pub per: Duration,
}

/// Settings of one mock provider.
#[derive(Debug, Clone)]
pub struct MockOptions {
    pub profile: Profile,
    /// When set, a request without `Authorization: Bearer <key>` gets the bad-key error.
    pub api_key: Option<String>,
    /// Strict sliding windows; a request over them gets the profile's 429.
    pub limits: Vec<RequestLimit>,
    /// Latency of successful answers.
    pub latency: Duration,
}

impl MockOptions {
    pub fn new(profile: Profile) -> Self {
        Self { profile, api_key: None, limits: Vec::new(), latency: Duration::ZERO }
    }
}

/// What the mock has seen so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MockStats {
    pub requests: usize,
    pub successes: usize,
    pub rate_limited: usize,
    /// Bodies of the first requests received, in order (at most [`MAX_KEPT_BODIES`], so a mock
    /// serving a long benchmark or demo does not grow without bound).
    pub bodies: Vec<Value>,
}

struct Shared {
    options: MockOptions,
    script: Mutex<VecDeque<Scenario>>,
    fallback: Mutex<Scenario>,
    stats: Mutex<MockStats>,
    accepted: Mutex<VecDeque<Instant>>,
    /// Every accepted request's instant, once [`MockProvider::log_arrivals`] asked for it.
    arrival_log: Mutex<Option<Vec<Instant>>>,
    arrived: Notify,
    stop: CancellationToken,
}

/// A running mock; stops when dropped.
pub struct MockProvider {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl MockProvider {
    /// Starts on `127.0.0.1` at a free port.
    pub async fn start(options: MockOptions) -> std::io::Result<MockProvider> {
        Self::start_on("127.0.0.1:0".parse().expect("valid address"), options).await
    }

    pub async fn start_on(addr: SocketAddr, options: MockOptions) -> std::io::Result<MockProvider> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            options,
            script: Mutex::default(),
            fallback: Mutex::new(Scenario::Success),
            stats: Mutex::default(),
            accepted: Mutex::default(),
            arrival_log: Mutex::default(),
            arrived: Notify::new(),
            stop: CancellationToken::new(),
        });
        let app = Router::new()
            .route("/{*path}", any(chat))
            .route("/v1/tcp_warming", get(|| async { StatusCode::OK }))
            .with_state(shared.clone());
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
        Ok(MockProvider { addr, shared })
    }

    /// The `base_url` to configure (the worker appends `/chat/completions`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues scenarios for the next requests, in order.
    pub fn script(&self, scenarios: impl IntoIterator<Item = Scenario>) {
        self.shared.script.lock().unwrap().extend(scenarios);
    }

    /// What every request gets once the script is used up (default: success).
    pub fn set_fallback(&self, scenario: Scenario) {
        *self.shared.fallback.lock().unwrap() = scenario;
    }

    /// From now on, keeps the instant of every request its limits accept (a benchmark's view of
    /// how soon each slot is used again); only a mock with limits keeps any.
    pub fn log_arrivals(&self) {
        self.shared.arrival_log.lock().unwrap().get_or_insert_with(Vec::new);
    }

    /// The instants kept since [`log_arrivals`](Self::log_arrivals), in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.shared.arrival_log.lock().unwrap().clone().unwrap_or_default()
    }

    pub fn stats(&self) -> MockStats {
        self.shared.stats.lock().unwrap().clone()
    }

    pub fn requests(&self) -> usize {
        self.shared.stats.lock().unwrap().requests
    }

    /// Waits until at least `n` requests have arrived, for at most `limit`.
    pub async fn wait_for_requests(&self, n: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.arrived.notified();
            if self.requests() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.requests() >= n;
            }
        }
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn chat(State(shared): State<Arc<Shared>>, uri: axum::http::Uri, headers: HeaderMap, body: Bytes) -> Response {
    let profile = shared.options.profile;
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    // Gemini names the model in the path: `/v1beta/models/{model}:generateContent`.
    let from_path = uri
        .path()
        .rsplit_once("/models/")
        .and_then(|(_, rest)| rest.split_once(':'))
        .map(|(model, _)| model.to_string());
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or(from_path)
        .unwrap_or_else(|| "mock-model".into());
    let (scenario, standings) = next_scenario(&shared, &headers);
    {
        let mut stats = shared.stats.lock().unwrap();
        stats.requests += 1;
        if stats.bodies.len() < MAX_KEPT_BODIES {
            stats.bodies.push(json.clone());
        }
        match &scenario {
            Scenario::Success
            | Scenario::Slow(_)
            | Scenario::SpentBudget(_)
            | Scenario::EmptyAnswer
            | Scenario::CutOff
            | Scenario::ProseAroundJson
            | Scenario::OffSchemaJson
            | Scenario::ToolCall
            | Scenario::Says(_) => stats.successes += 1,
            Scenario::RateLimited(_) => stats.rate_limited += 1,
            _ => {}
        }
    }
    shared.arrived.notify_waiters();
    let mut response = respond_to(&shared, scenario, profile, &model, &json).await;
    if response.status() == StatusCode::OK {
        standing_headers(profile, &standings, SystemTime::now(), response.headers_mut());
    }
    response
}

/// The answer `scenario` calls for.
async fn respond_to(shared: &Shared, scenario: Scenario, profile: Profile, model: &str, json: &Value) -> Response {
    let model = model.to_string();
    match scenario {
        Scenario::Success => {
            tokio::time::sleep(shared.options.latency).await;
            success(profile, &model, json)
        }
        Scenario::Slow(delay) => {
            tokio::select! {
                () = tokio::time::sleep(delay) => success(profile, &model, json),
                () = shared.stop.cancelled() => plain(503, "mock stopped"),
            }
        }
        Scenario::SpentBudget(reset) => {
            let mut response = success(profile, &model, json);
            let headers = response.headers_mut();
            headers.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("0"));
            headers.insert(
                "x-ratelimit-reset-requests",
                HeaderValue::from_str(&go_duration(reset)).expect("valid header"),
            );
            response
        }
        Scenario::RateLimited(hint) => rate_limited(profile, &model, &hint),
        Scenario::ServerError { status, text } => server_error(profile, status, text),
        Scenario::Hang => {
            shared.stop.cancelled().await;
            plain(503, "mock stopped")
        }
        Scenario::Garbage => respond(200, &[], "text/html", "<html><body>Bad gateway... or is it?</body>".into()),
        Scenario::CloseConnection => {
            let failing =
                futures_lite::stream::once(Err::<Bytes, _>(std::io::Error::other("connection closed by mock")));
            let mut response = Response::new(Body::from_stream(failing));
            response.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
            response
        }
        Scenario::Unauthorized => unauthorized(profile),
        Scenario::ContextTooLong => context_too_long(profile),
        Scenario::SafetyBlock => match profile {
            Profile::GeminiNative => json_response(
                200,
                &[],
                json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}}),
            ),
            _ => json_response(
                400,
                &[],
                envelope(
                    profile,
                    400,
                    "Your request was rejected as a result of our safety system.",
                    "invalid_request_error",
                    json!("content_policy_violation"),
                ),
            ),
        },
        Scenario::OutOfCredits => out_of_credits(profile),
        Scenario::ModelGone => model_gone(profile, &model),
        Scenario::Moderation => moderation(&model),
        Scenario::EmptyAnswer => answer(profile, &model, Reply::text(" \n")),
        Scenario::CutOff => answer(
            profile,
            &model,
            Reply { text: Some("There are three reasons. First, the free tier's".into()), call: None, cut_off: true },
        ),
        Scenario::ProseAroundJson => answer(
            profile,
            &model,
            Reply::text(format!(
                "Sure! Here is the JSON you asked for:\n```json\n{{\"echo\": \"mock answer from {model}\"}}\n```\nLet me know if you need anything else."
            )),
        ),
        Scenario::OffSchemaJson => {
            answer(profile, &model, Reply::text(json!({"reply": format!("mock answer from {model}")}).to_string()))
        }
        Scenario::ToolCall => answer(profile, &model, Reply { text: None, call: None, cut_off: false }),
        Scenario::Says(text) => answer(profile, &model, Reply::text(text)),
    }
}

/// What to do with this request, and where the mock's limits stand once it is accepted (empty
/// when it has none, or did not count the request).
fn next_scenario(shared: &Shared, headers: &HeaderMap) -> (Scenario, Vec<Standing>) {
    if let Some(key) = &shared.options.api_key {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let authorized = match shared.options.profile {
            Profile::GeminiNative => header("x-goog-api-key") == Some(key.as_str()),
            Profile::Anthropic => header("x-api-key") == Some(key.as_str()) && header("anthropic-version").is_some(),
            _ => header("authorization") == Some(format!("Bearer {key}").as_str()),
        };
        if !authorized {
            return (Scenario::Unauthorized, Vec::new());
        }
    }
    let standings = match admit(shared) {
        Ok(standings) => standings,
        Err(wait) => return (Scenario::RateLimited(RetryHint::Native(wait)), Vec::new()),
    };
    let scripted = shared.script.lock().unwrap().pop_front();
    (scripted.unwrap_or_else(|| shared.fallback.lock().unwrap().clone()), standings)
}

/// Where one of the mock's strict limits stands once a request is accepted: what its success
/// headers say, so that a client learning from them learns the truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Standing {
    limit: RequestLimit,
    /// Requests the window still takes now.
    remaining: usize,
    /// Until the window holds none of the requests it holds now ("fully replenished", as
    /// OpenAI and Anthropic define their reset): one `per`, since this request just entered.
    replenished_in: Duration,
}

/// Admits the request against the strict windows and says where each stands, or returns how
/// long until it would fit.
fn admit(shared: &Shared) -> Result<Vec<Standing>, Duration> {
    let limits = &shared.options.limits;
    if limits.is_empty() {
        return Ok(Vec::new());
    }
    let now = Instant::now();
    let mut accepted = shared.accepted.lock().unwrap();
    let longest = limits.iter().map(|l| l.per).max().unwrap_or_default();
    while accepted.front().is_some_and(|t| now.duration_since(*t) >= longest) {
        accepted.pop_front();
    }
    let mut wait = None;
    for limit in limits {
        let in_window: Vec<&Instant> = accepted.iter().filter(|t| now.duration_since(**t) < limit.per).collect();
        // The request that must leave the window before another fits; a limit of 0 (which
        // `--limit 0/1s` can ask for) has none, and is retried after `per`.
        if let Some(oldest_that_matters) = in_window.len().checked_sub(limit.requests) {
            let free_at = in_window.get(oldest_that_matters).map_or(now, |t| **t) + limit.per;
            let w = free_at.duration_since(now);
            wait = Some(wait.map_or(w, |x: Duration| x.max(w)));
        }
    }
    if let Some(wait) = wait {
        return Err(wait);
    }
    accepted.push_back(now);
    if let Some(log) = shared.arrival_log.lock().unwrap().as_mut() {
        log.push(now);
    }
    let standing = |limit: &RequestLimit| {
        let used = accepted.iter().filter(|t| now.duration_since(**t) < limit.per).count();
        Standing { limit: *limit, remaining: limit.requests.saturating_sub(used), replenished_in: limit.per }
    };
    Ok(limits.iter().map(standing).collect())
}

/// The limit a client is closest to: fewest requests left, then the longest to replenish.
fn binding(standings: &[Standing]) -> Option<&Standing> {
    standings.iter().min_by_key(|s| (s.remaining, std::cmp::Reverse(s.replenished_in)))
}

/// Adds the profile's rate-limit headers for where the mock's limits stand, in the profile's
/// own names and formats (providers.md §11): one unsuffixed request set for the binding limit
/// (Groq, OpenAI, SambaNova: Go durations, SambaNova an epoch), Anthropic's set with an RFC
/// 3339 reset, and Cerebras' `-minute`/`-hour`/`-day` sets for the limits whose window is one
/// of those. OpenRouter, Gemini and the Hugging Face router send none on a success. A header
/// the scenario already set (a spent budget) is kept.
fn standing_headers(profile: Profile, standings: &[Standing], now: SystemTime, map: &mut HeaderMap) {
    let mut headers = Vec::new();
    let binding = binding(standings);
    match (profile, binding) {
        (Profile::Groq | Profile::Openai, Some(b)) => {
            headers.push(h("x-ratelimit-limit-requests", b.limit.requests));
            headers.push(h("x-ratelimit-remaining-requests", b.remaining));
            headers.push(h("x-ratelimit-reset-requests", go_duration(b.replenished_in)));
        }
        (Profile::Sambanova, Some(b)) => {
            headers.push(h("x-ratelimit-limit-requests", b.limit.requests));
            headers.push(h("x-ratelimit-remaining-requests", b.remaining));
            headers.push(h("x-ratelimit-reset-requests", epoch_ms(now + b.replenished_in).div_ceil(1000)));
        }
        (Profile::Anthropic, Some(b)) => {
            let reset = now + b.replenished_in + Duration::from_millis(999);
            headers.push(h("anthropic-ratelimit-requests-limit", b.limit.requests));
            headers.push(h("anthropic-ratelimit-requests-remaining", b.remaining));
            headers.push(h("anthropic-ratelimit-requests-reset", humantime::format_rfc3339_seconds(reset)));
        }
        (Profile::Cerebras, Some(_)) => {
            for standing in standings {
                let suffix = match standing.limit.per.as_secs() {
                    60 if standing.limit.per.subsec_nanos() == 0 => "minute",
                    3600 if standing.limit.per.subsec_nanos() == 0 => "hour",
                    86_400 if standing.limit.per.subsec_nanos() == 0 => "day",
                    _ => continue,
                };
                headers.push(h(&format!("x-ratelimit-limit-requests-{suffix}"), standing.limit.requests));
                headers.push(h(&format!("x-ratelimit-remaining-requests-{suffix}"), standing.remaining));
                let reset = format!("{:.3}", standing.replenished_in.as_secs_f64());
                headers.push(h(&format!("x-ratelimit-reset-requests-{suffix}"), reset));
            }
        }
        _ => {}
    }
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) =
            (axum::http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value))
        {
            map.entry(name).or_insert(value);
        }
    }
}

fn respond(status: u16, headers: &[(String, String)], content_type: &str, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let map = response.headers_mut();
    map.insert("content-type", HeaderValue::from_str(content_type).expect("valid content type"));
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) =
            (axum::http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value))
        {
            map.insert(name, value);
        }
    }
    response
}

fn json_response(status: u16, headers: &[(String, String)], body: Value) -> Response {
    respond(status, headers, "application/json", body.to_string())
}

fn plain(status: u16, text: &str) -> Response {
    respond(status, &[], "text/plain", text.to_string())
}

fn h(name: &str, value: impl ToString) -> (String, String) {
    (name.to_string(), value.to_string())
}

fn request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What a request asks of the model beyond text, read in the profile's own dialect.
#[derive(Debug, Clone, PartialEq)]
enum Asked {
    Text,
    /// Call this function; its arguments follow this (JSON or Gemini) schema.
    Call {
        name: String,
        schema: Value,
    },
    /// Answer JSON, following this schema when there is one.
    Json(Option<Value>),
}

/// Reads a request the way the real provider would decide between text, a tool call and JSON:
/// declared tools not switched off and no tool result to answer yet mean a call (the forced or
/// allowed one when named, else the first); a JSON response format means JSON.
fn asked(profile: Profile, request: &Value) -> Asked {
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    let (tools, forced, off, answering) = match profile {
        Profile::GeminiNative => {
            let declarations: Vec<Value> = request
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| t.get("functionDeclarations").and_then(Value::as_array))
                .flatten()
                .map(|d| json!({"name": d.get("name"), "schema": d.get("parameters")}))
                .collect();
            let config = request.pointer("/toolConfig/functionCallingConfig");
            let forced =
                config.and_then(|c| c.pointer("/allowedFunctionNames/0")).and_then(Value::as_str).map(str::to_string);
            let off = config.and_then(|c| c.get("mode")).and_then(Value::as_str) == Some("NONE");
            let last = request.get("contents").and_then(Value::as_array).and_then(|c| c.last());
            let answering = last.and_then(|c| c.get("parts")).and_then(Value::as_array).is_some_and(|parts| {
                parts.iter().any(|p| p.get("functionResponse").is_some() || p.get("function_response").is_some())
            });
            (declarations, forced, off, answering)
        }
        Profile::Anthropic => {
            let tools: Vec<Value> = request
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|t| json!({"name": t.get("name"), "schema": t.get("input_schema")}))
                .collect();
            let choice = request.get("tool_choice");
            let forced =
                choice.filter(|c| c.get("type").and_then(Value::as_str) == Some("tool")).and_then(|c| text(c, "name"));
            let off = choice.and_then(|c| c.get("type")).and_then(Value::as_str) == Some("none");
            let last = request.get("messages").and_then(Value::as_array).and_then(|m| m.last());
            let answering = last.and_then(|m| m.get("content")).and_then(Value::as_array).is_some_and(|blocks| {
                blocks.iter().any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            });
            (tools, forced, off, answering)
        }
        _ => {
            let tools: Vec<Value> = request
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| t.get("function"))
                .map(|f| json!({"name": f.get("name"), "schema": f.get("parameters")}))
                .collect();
            let choice = request.get("tool_choice");
            let forced = choice.and_then(|c| c.pointer("/function/name")).and_then(Value::as_str).map(str::to_string);
            let off = choice.and_then(Value::as_str) == Some("none");
            let last = request.get("messages").and_then(Value::as_array).and_then(|m| m.last());
            let answering = last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("tool");
            (tools, forced, off, answering)
        }
    };
    if !tools.is_empty() && !off && !answering {
        let chosen = forced
            .as_deref()
            .and_then(|name| tools.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(name)))
            .or(tools.first());
        if let Some(tool) = chosen {
            let name = tool.get("name").and_then(Value::as_str).unwrap_or("tool").to_string();
            return Asked::Call { name, schema: tool.get("schema").cloned().unwrap_or(Value::Null) };
        }
    }
    let json_mode = match profile {
        Profile::GeminiNative => {
            let config = request.get("generationConfig");
            (config.and_then(|c| c.get("responseMimeType")).and_then(Value::as_str) == Some("application/json"))
                .then(|| config.and_then(|c| c.get("responseSchema")).cloned())
        }
        Profile::Anthropic => None,
        _ => match request.pointer("/response_format/type").and_then(Value::as_str) {
            Some("json_object") => Some(None),
            Some("json_schema") => Some(request.pointer("/response_format/json_schema/schema").cloned()),
            _ => None,
        },
    };
    json_mode.map_or(Asked::Text, Asked::Json)
}

/// A small document that follows `schema` (JSON Schema or Gemini's upper-case types): every
/// listed property, the first enum value, the smallest allowed array.
fn sample(schema: &Value, depth: usize) -> Value {
    if depth > 8 {
        return Value::Null;
    }
    if let Some(first) = schema.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    if let Some(first) = schema.get("anyOf").and_then(|a| a.get(0)) {
        return sample(first, depth + 1);
    }
    let kind = schema.get("type").and_then(Value::as_str).map(str::to_ascii_lowercase);
    let kind = kind.as_deref().or_else(|| schema.get("properties").map(|_| "object"));
    match kind {
        Some("string") => json!("mock"),
        Some("integer") => schema.get("minimum").filter(|m| m.is_i64() || m.is_u64()).cloned().unwrap_or(json!(1)),
        Some("number") => schema.get("minimum").cloned().unwrap_or(json!(1.5)),
        Some("boolean") => json!(true),
        Some("null") => Value::Null,
        Some("array") => {
            let wanted = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0).min(3);
            let item = sample(schema.get("items").unwrap_or(&Value::Null), depth + 1);
            Value::Array((0..wanted).map(|_| item.clone()).collect())
        }
        _ => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let fields = properties.into_iter().flatten().map(|(k, v)| (k.clone(), sample(v, depth + 1))).collect();
            Value::Object(fields)
        }
    }
}

/// A success in the profile's own shape: text, a tool call, or JSON, as the request asked.
fn success(profile: Profile, model: &str, request: &Value) -> Response {
    let reply = match asked(profile, request) {
        Asked::Json(Some(schema)) => Reply::text(sample(&schema, 0).to_string()),
        Asked::Json(None) => Reply::text(json!({"answer": format!("mock answer from {model}")}).to_string()),
        Asked::Text => Reply::text(format!("mock answer from {model}")),
        Asked::Call { name, schema } => Reply::call(name, sample(&schema, 0)),
    };
    answer(profile, model, reply)
}

/// The tool call every [`Scenario::ToolCall`] makes.
const TOOL: &str = "get_weather";

/// A 200 carrying `reply` in the profile's answer shape, with its success headers.
fn answer(profile: Profile, model: &str, reply: Reply) -> Response {
    let id = request_id();
    let (tool, tool_args) = reply.call.clone().unwrap_or_else(|| (TOOL.to_string(), json!({"city": "Paris"})));
    match profile {
        Profile::GeminiNative => {
            let (part, finish) = match &reply.text {
                Some(text) => (json!({"text": text}), if reply.cut_off { "MAX_TOKENS" } else { "STOP" }),
                None => (json!({"functionCall": {"name": tool, "args": tool_args}}), "STOP"),
            };
            let body = json!({"candidates": [{"content": {"parts": [part], "role": "model"}, "finishReason": finish, "index": 0}],
                "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 8, "totalTokenCount": 20}, "modelVersion": model, "responseId": id});
            return respond(200, &[], "application/json; charset=UTF-8", body.to_string());
        }
        Profile::Anthropic => {
            let (block, stop_reason) = match &reply.text {
                Some(text) => {
                    (json!({"type": "text", "text": text}), if reply.cut_off { "max_tokens" } else { "end_turn" })
                }
                None => (
                    json!({"type": "tool_use", "id": format!("toolu_{id}"), "name": tool, "input": tool_args}),
                    "tool_use",
                ),
            };
            let headers = vec![h("request-id", format!("req_011{id}"))];
            let body = json!({"id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": model,
                "content": [block], "stop_reason": stop_reason, "stop_sequence": null,
                "usage": {"input_tokens": 12, "output_tokens": 8}});
            return json_response(200, &headers, body);
        }
        _ => {}
    }
    let (message, finish_reason) = match &reply.text {
        Some(text) => (json!({"role": "assistant", "content": text}), if reply.cut_off { "length" } else { "stop" }),
        None => (
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": format!("call_{id}"), "type": "function",
                "function": {"name": tool, "arguments": tool_args.to_string()}}]}),
            "tool_calls",
        ),
    };
    let body = json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}
    });
    // Rate-limit headers are added by `standing_headers` from the mock's own limits: fixed
    // numbers would tell a client that learns from them something untrue.
    let headers = match profile {
        Profile::Groq => vec![h("x-request-id", format!("req_{id}")), h("x-groq-region", "us-west-1")],
        Profile::Openrouter => vec![h("x-generation-id", format!("gen-{id}"))],
        Profile::Huggingface => vec![h("x-request-id", format!("Root=1-{id}"))],
        Profile::Openai => vec![h("x-request-id", format!("req_{id}"))],
        Profile::Cerebras | Profile::Sambanova | Profile::GeminiOpenai | Profile::GeminiNative | Profile::Anthropic => {
            vec![]
        }
    };
    json_response(200, &headers, body)
}

/// The profile's error envelope around an OpenAI-style (message, type, code).
fn envelope(profile: Profile, status: u16, message: &str, kind: &str, code: Value) -> Value {
    match profile {
        Profile::GeminiNative => {
            json!({"error": {"code": status, "message": message, "status": google_status(status)}})
        }
        Profile::Anthropic => {
            json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": format!("req_011{}", request_id())})
        }
        Profile::Cerebras => json!({"message": message, "type": kind, "param": null, "code": code}),
        Profile::Openrouter => {
            json!({"error": {"message": message, "code": status}, "user_id": "user_mock"})
        }
        Profile::GeminiOpenai => {
            json!([{"error": {"code": status, "message": message, "status": google_status(status)}}])
        }
        Profile::Huggingface if status != 400 => json!({"error": message}),
        Profile::Sambanova => {
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}, "request_id": request_id()})
        }
        _ => json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    }
}

fn google_status(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        429 => "RESOURCE_EXHAUSTED",
        500 => "INTERNAL",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 { format!("{ms}ms") } else { format!("{}s", d.as_secs_f64()) }
}

fn rate_limited(profile: Profile, model: &str, hint: &RetryHint) -> Response {
    let now = SystemTime::now();
    let mut headers = Vec::new();
    let mut wait = Duration::ZERO;
    match hint {
        RetryHint::Native(w) => {
            wait = *w;
            headers.extend(native_rate_headers(profile, *w, now));
        }
        RetryHint::RetryAfterSeconds(s) => headers.push(h("retry-after", s)),
        RetryHint::RetryAfterMs(ms) => headers.push(h("retry-after-ms", ms)),
        RetryHint::RetryAfterDate(at) => headers.push(h("retry-after", httpdate::fmt_http_date(*at))),
        RetryHint::ResetHeader(w) => {
            headers.push(h("x-ratelimit-remaining-requests", 0));
            headers.push(h("x-ratelimit-reset-requests", go_duration(*w)));
        }
        RetryHint::EpochMs(at) => {
            headers.push(h("X-RateLimit-Remaining", 0));
            headers.push(h("X-RateLimit-Reset", epoch_ms(*at)));
        }
        RetryHint::RetryDelay(w) => {
            let body = json!([{"error": {"code": 429, "message": "You exceeded your current quota", "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "quotaValue": "5"}]},
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{}s", w.as_secs_f64())}]}}]);
            return json_response(429, &[], body);
        }
        RetryHint::InMessage(w) => wait = *w,
        RetryHint::Nothing => {}
        RetryHint::Daily(reset) | RetryHint::Account(reset) => return daily_limit(profile, model, *reset),
    }
    let body = match profile {
        Profile::GeminiNative => {
            let delay = format!("{}s", wait.as_secs_f64().max(1.0).ceil());
            json!({"error": {"code": 429, "message": format!("You exceeded your current quota, please check your plan and billing details. \n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 5, model: {model}\nPlease retry in {delay}."), "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "quotaValue": "5"}]},
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]}})
        }
        Profile::Anthropic => envelope(
            profile,
            429,
            "This request would exceed your account's rate limit. Please try again later.",
            "rate_limit_error",
            Value::Null,
        ),
        Profile::Groq => envelope(
            profile,
            429,
            &format!(
                "Rate limit reached for model `{model}` in organization `org_01mock` service tier `on_demand` on requests per minute (RPM): Limit 30, Used 30, Requested 1. Please try again in {}. Need more tokens? Upgrade to Dev Tier today at https://console.groq.com/settings/billing",
                go_duration(wait)
            ),
            "requests",
            json!("rate_limit_exceeded"),
        ),
        Profile::Cerebras => envelope(
            profile,
            429,
            "Requests per minute limit exceeded - too many requests sent.",
            "too_many_requests_error",
            json!("request_quota_exceeded"),
        ),
        Profile::Openrouter => {
            let reset = epoch_ms(now + wait);
            json!({"error": {"message": "Rate limit exceeded: free-models-per-min. ", "code": 429,
                "metadata": {"headers": {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset.to_string()}}}, "user_id": "user_mock"})
        }
        Profile::GeminiOpenai => {
            envelope(profile, 429, "Resource has been exhausted (e.g. check quota).", "", Value::Null)
        }
        Profile::Sambanova => envelope(
            profile,
            429,
            "Request would exceed rate limit\nViolated duration_s: 60, current usage: 20, limit: 20",
            "rate_limit_error",
            json!("insufficient_quota"),
        ),
        Profile::Huggingface => {
            json!({"error": {"message": "Rate limit reached for requests per minute (RPM)", "type": "requests", "code": "rate_limit_exceeded"}})
        }
        Profile::Openai => envelope(
            profile,
            429,
            &format!(
                "Rate limit reached for {model} in organization org-mock on requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in {}. Visit https://platform.openai.com/account/rate-limits to learn more.",
                go_duration(wait)
            ),
            "requests",
            json!("rate_limit_exceeded"),
        ),
    };
    json_response(429, &headers, body)
}

/// The headers a profile sends with its own 429 for a wait of `wait`.
fn native_rate_headers(profile: Profile, wait: Duration, now: SystemTime) -> Vec<(String, String)> {
    let seconds_up = wait.as_secs_f64().ceil().max(1.0) as u64;
    match profile {
        Profile::Groq => vec![
            h("retry-after", seconds_up),
            h("x-ratelimit-remaining-requests", 0),
            h("x-ratelimit-reset-requests", go_duration(wait)),
        ],
        Profile::Cerebras => vec![
            h("x-ratelimit-remaining-requests-minute", 0),
            h("x-ratelimit-reset-requests-minute", format!("{:.3}", wait.as_secs_f64())),
        ],
        Profile::Openrouter => vec![
            h("X-RateLimit-Limit", 20),
            h("X-RateLimit-Remaining", 0),
            h("X-RateLimit-Reset", epoch_ms(now + wait)),
        ],
        Profile::Sambanova => vec![
            h("x-ratelimit-remaining-requests", 0),
            h("x-ratelimit-reset-requests", (epoch_ms(now + wait) / 1000) + 1),
        ],
        Profile::Openai => vec![
            h("retry-after-ms", wait.as_millis()),
            h("x-ratelimit-remaining-requests", 0),
            h("x-ratelimit-reset-requests", go_duration(wait)),
        ],
        Profile::Anthropic => vec![
            h("retry-after", seconds_up),
            h("anthropic-ratelimit-requests-remaining", 0),
            h(
                "anthropic-ratelimit-requests-reset",
                humantime::format_rfc3339_seconds(now + Duration::from_secs(seconds_up)),
            ),
        ],
        // Gemini and the Hugging Face router give no hint in headers.
        Profile::GeminiOpenai | Profile::GeminiNative | Profile::Huggingface => vec![],
    }
}

fn daily_limit(profile: Profile, model: &str, reset: SystemTime) -> Response {
    let wait = reset.duration_since(SystemTime::now()).unwrap_or_default();
    match profile {
        Profile::Openrouter => {
            let reset = epoch_ms(reset).to_string();
            let body = json!({"error": {"message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model requests per day", "code": 429,
                "metadata": {"headers": {"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}, "limit_source": "openrouter_free_tier_daily"}}, "user_id": "user_mock"});
            json_response(
                429,
                &[h("X-RateLimit-Limit", 50), h("X-RateLimit-Remaining", 0), h("X-RateLimit-Reset", reset)],
                body,
            )
        }
        Profile::Cerebras => json_response(
            429,
            &[
                h("x-ratelimit-remaining-tokens-day", 0),
                h("x-ratelimit-reset-tokens-day", format!("{:.3}", wait.as_secs_f64())),
            ],
            envelope(
                profile,
                429,
                "Tokens per day limit exceeded - too many tokens processed.",
                "too_many_tokens_error",
                json!("token_quota_exceeded"),
            ),
        ),
        // The project's daily quota (providers.md §4.1, 2025 form), with the misleading
        // `retryDelay` the real one carries; the OpenAI-compatible endpoint wraps it in an array.
        Profile::GeminiOpenai | Profile::GeminiNative => {
            let error = json!({"error": {"code": 429, "message": "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.", "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "quotaDimensions": {"location": "global", "model": model}, "quotaValue": "20"}]},
                            {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "22s"}]}});
            let body = if profile == Profile::GeminiOpenai { json!([error]) } else { error };
            respond(429, &[], "application/json; charset=UTF-8", body.to_string())
        }
        Profile::Sambanova => json_response(
            429,
            &[],
            envelope(
                profile,
                429,
                "Request would exceed rate limit\nViolated duration_s: 86400, current usage: 196279, limit: 200000",
                "rate_limit_error",
                json!("insufficient_quota"),
            ),
        ),
        _ => json_response(
            429,
            &[h("retry-after", wait.as_secs().max(1)), h("x-ratelimit-remaining-tokens", 6000)],
            envelope(
                profile,
                429,
                &format!(
                    "Rate limit reached for model `{model}` in organization `org_01mock` service tier `on_demand` on tokens per day (TPD): Limit 100000, Used 97050, Requested 3619. Please try again in {}. Need more tokens?",
                    go_duration(wait)
                ),
                "tokens",
                json!("rate_limit_exceeded"),
            ),
        ),
    }
}

fn server_error(profile: Profile, status: u16, text: bool) -> Response {
    if text {
        return plain(status, "upstream connect error or disconnect/reset before headers. reset reason: overflow");
    }
    let body = match profile {
        Profile::GeminiNative => {
            envelope(profile, status, "The model is overloaded. Please try again later.", "", Value::Null)
        }
        Profile::Anthropic if status == 529 => envelope(profile, status, "Overloaded", "overloaded_error", Value::Null),
        Profile::Anthropic => envelope(profile, status, "Internal server error", "api_error", Value::Null),
        Profile::Openrouter => {
            json!({"error": {"message": "Provider returned error", "code": status, "metadata": {"raw": "{\"error\":{\"code\":500,\"status\":\"INTERNAL\"}}", "provider_name": "Google AI Studio"}}, "user_id": "user_mock"})
        }
        Profile::GeminiOpenai => {
            envelope(profile, status, "The model is overloaded. Please try again later.", "", Value::Null)
        }
        Profile::Huggingface => json!({"error": "Service Unavailable"}),
        Profile::Openai => {
            json!({"error": {"message": "The server had an error while processing your request. Sorry about that!", "type": "server_error", "param": null, "code": null}})
        }
        _ => envelope(profile, status, "Internal Server Error", "internal_server_error", Value::Null),
    };
    json_response(status, &[], body)
}

fn unauthorized(profile: Profile) -> Response {
    match profile {
        Profile::GeminiNative => json_response(
            400,
            &[],
            json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}),
        ),
        Profile::Anthropic => {
            json_response(401, &[], envelope(profile, 401, "invalid x-api-key", "authentication_error", Value::Null))
        }
        Profile::Groq => json_response(
            401,
            &[],
            json!({"error": {"message": "Invalid API Key", "type": "invalid_request_error", "code": "invalid_api_key"}}),
        ),
        Profile::Cerebras => json_response(
            401,
            &[],
            envelope(profile, 401, "Wrong API Key", "invalid_request_error", json!("wrong_api_key")),
        ),
        Profile::Openrouter => json_response(401, &[], json!({"error": {"message": "User not found.", "code": 401}})),
        Profile::GeminiOpenai => json_response(
            400,
            &[],
            json!([{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}]),
        ),
        Profile::Sambanova => json_response(
            401,
            &[],
            envelope(
                profile,
                401,
                "Invalid authentication credentials",
                "invalid_request_error",
                json!("invalid_authentication"),
            ),
        ),
        Profile::Huggingface => json_response(401, &[], json!({"error": "Invalid username or password."})),
        Profile::Openai => json_response(
            401,
            &[],
            json!({"error": {"message": "Incorrect API key provided: sk-mock****. You can find your API key at https://platform.openai.com/account/api-keys.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}),
        ),
    }
}

fn context_too_long(profile: Profile) -> Response {
    let body = match profile {
        Profile::GeminiNative => envelope(
            profile,
            400,
            "The input token count (1091639) exceeds the maximum number of tokens allowed (1048576).",
            "",
            Value::Null,
        ),
        Profile::Anthropic => envelope(
            profile,
            400,
            "prompt is too long: 208310 tokens > 200000 maximum",
            "invalid_request_error",
            Value::Null,
        ),
        Profile::Cerebras => envelope(
            profile,
            400,
            "Please reduce the length of the messages or completion. Current length is 42328 while limit is 40000",
            "invalid_request_error",
            json!("context_length_exceeded"),
        ),
        Profile::Openrouter => {
            json!({"error": {"message": "This endpoint's maximum context length is 131072 tokens. However, you requested about 138956 tokens (7884 of text input, 131072 in the output). Please reduce the length of either one, or use the \"middle-out\" transform to compress your prompt automatically.", "code": 400, "metadata": {"provider_name": null}}, "user_id": "user_mock"})
        }
        Profile::GeminiOpenai => envelope(
            profile,
            400,
            "The input token count (1091639) exceeds the maximum number of tokens allowed (1048576).",
            "",
            Value::Null,
        ),
        _ => envelope(
            profile,
            400,
            "Please reduce the length of the messages or completion.",
            "invalid_request_error",
            json!("context_length_exceeded"),
        ),
    };
    json_response(400, &[], body)
}

fn out_of_credits(profile: Profile) -> Response {
    match profile {
        Profile::Anthropic => json_response(
            400,
            &[],
            envelope(
                profile,
                400,
                "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
                "invalid_request_error",
                Value::Null,
            ),
        ),
        Profile::Openai => json_response(
            429,
            &[],
            json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}),
        ),
        Profile::Openrouter => json_response(
            402,
            &[],
            json!({"error": {"message": "This request requires more credits, or fewer max_tokens. You requested up to 32000 tokens, but can only afford 27342.", "code": 402, "metadata": {"provider_name": null}}, "user_id": "user_mock"}),
        ),
        Profile::Huggingface => json_response(
            402,
            &[],
            json!({"error": "You have exceeded your monthly included credits for Inference Providers. Subscribe to PRO to get 20x more monthly included credits."}),
        ),
        Profile::GeminiNative | Profile::GeminiOpenai => {
            json_response(402, &[], envelope(profile, 402, "Your prepaid credit balance is depleted.", "", Value::Null))
        }
        _ => json_response(
            402,
            &[],
            envelope(profile, 402, "Insufficient credits", "insufficient_quota", json!("insufficient_quota")),
        ),
    }
}

fn model_gone(profile: Profile, model: &str) -> Response {
    let does_not_exist = format!("The model `{model}` does not exist or you do not have access to it.");
    match profile {
        Profile::Groq => json_response(
            404,
            &[],
            json!({"error": {"message": does_not_exist, "type": "invalid_request_error", "code": "model_not_found"}}),
        ),
        Profile::Openai => json_response(
            404,
            &[],
            json!({"error": {"message": does_not_exist, "type": "invalid_request_error", "param": null, "code": "model_not_found"}}),
        ),
        Profile::Cerebras => json_response(
            404,
            &[],
            json!({"message": format!("Model {model} does not exist or you do not have access to it."), "type": "not_found_error", "param": "model", "code": "model_not_found"}),
        ),
        Profile::Openrouter => json_response(
            404,
            &[],
            json!({"error": {"message": format!("No endpoints found for {model}."), "code": 404}}),
        ),
        Profile::GeminiNative | Profile::GeminiOpenai => {
            let error = json!({"error": {"code": 404, "message": format!("models/{model} is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods."), "status": "NOT_FOUND"}});
            let body = if profile == Profile::GeminiOpenai { json!([error]) } else { error };
            respond(404, &[], "application/json; charset=UTF-8", body.to_string())
        }
        Profile::Anthropic => {
            json_response(404, &[], envelope(profile, 404, &format!("model: {model}"), "not_found_error", Value::Null))
        }
        Profile::Sambanova => json_response(
            410,
            &[],
            envelope(
                profile,
                410,
                &format!("Model {model} has been deprecated"),
                "invalid_request_error",
                json!("model_deprecated"),
            ),
        ),
        Profile::Huggingface => json_response(
            400,
            &[],
            json!({"error": {"message": format!("The requested model '{model}' is not supported by any provider you have enabled."), "type": "invalid_request_error", "param": "model", "code": "model_not_supported"}}),
        ),
    }
}

/// OpenRouter's documented moderation error (`ModerationErrorMetadata`): providers.md names the
/// 403 but holds no captured body.
fn moderation(model: &str) -> Response {
    json_response(
        403,
        &[],
        json!({"error": {"code": 403, "message": format!("{model} requires moderation on OpenRouter. Your input was flagged for \"violence\""),
            "metadata": {"reasons": ["violence"], "flagged_input": "(the flagged part of the input)", "provider_name": "OpenAI", "model_slug": model}},
            "user_id": "user_mock"}),
    )
}

fn epoch_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// Parses `"10/2s"` (10 requests per 2 seconds) for the command line.
pub fn parse_limit(text: &str) -> Result<RequestLimit, String> {
    let (requests, per) = text.split_once('/').ok_or_else(|| format!("`{text}` is not a limit like \"10/2s\""))?;
    let requests = requests.trim().parse().map_err(|_| format!("`{requests}` is not a number of requests"))?;
    let per = crate::config::parse_duration(per)?;
    Ok(RequestLimit { requests, per })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{Failure, FailureKind, anthropic, gemini, openai};

    const ALL: [Profile; 9] = [
        Profile::Groq,
        Profile::Cerebras,
        Profile::Openrouter,
        Profile::GeminiOpenai,
        Profile::GeminiNative,
        Profile::Anthropic,
        Profile::Sambanova,
        Profile::Huggingface,
        Profile::Openai,
    ];

    /// What the worker's dialect for `profile` makes of a mock answer.
    async fn interpret(profile: Profile, response: Response) -> Result<crate::providers::Completion, Failure> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let now = SystemTime::now();
        match profile {
            Profile::GeminiNative => gemini::interpret(status, &headers, &body, "m", now),
            Profile::Anthropic => anthropic::interpret(status, &headers, &body, anthropic::Reading::text("m"), now),
            _ => openai::interpret(status, &headers, &body, now),
        }
    }

    /// The failure the worker's dialect for `profile` reads from a mock error.
    async fn read(profile: Profile, response: Response) -> Failure {
        interpret(profile, response).await.unwrap_err()
    }

    /// The completion the worker's dialect for `profile` reads from a mock success.
    async fn completion(profile: Profile, response: Response) -> crate::providers::Completion {
        interpret(profile, response).await.unwrap()
    }

    #[tokio::test]
    async fn every_profile_answers_badly_in_the_ways_the_answer_checks_catch() {
        use crate::chain::checks::{Accept, Expectation, RejectReason};
        let plain = Expectation::for_job(Accept::default(), &serde_json::Map::new()).unwrap();
        let schema = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "echo",
            "schema": {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}}}});
        let echo = Expectation::for_job(Accept::default(), schema.as_object().unwrap()).unwrap();
        for profile in ALL {
            let verdict = |expect: &Expectation, answer: crate::providers::Completion| {
                expect.check(&answer.body).map_err(|r| (r.reason, r.message))
            };
            let empty = completion(profile, answer(profile, "m", Reply::text(" \n"))).await;
            assert_eq!(verdict(&plain, empty), Err((RejectReason::Empty, "empty content".into())), "{profile:?}");
            let cut =
                completion(profile, answer(profile, "m", Reply { text: Some("It".into()), call: None, cut_off: true }))
                    .await;
            assert_eq!(verdict(&plain, cut).unwrap_err().0, RejectReason::CutOff, "{profile:?}");
            let prose = Reply::text("Sure:\n```json\n{\"echo\": \"x\"}\n```");
            let prose = completion(profile, answer(profile, "m", prose)).await;
            assert_eq!(verdict(&echo, prose).unwrap_err().0, RejectReason::NotJson, "{profile:?}");
            let off = completion(profile, answer(profile, "m", Reply::text(r#"{"reply": "x"}"#))).await;
            assert_eq!(
                verdict(&echo, off),
                Err((RejectReason::Schema, "schema: /echo is required".into())),
                "{profile:?}"
            );
            let good = completion(profile, answer(profile, "m", Reply::text(r#"{"echo": "x"}"#))).await;
            assert_eq!(verdict(&echo, good), Ok(()), "{profile:?}");
        }
        // Tool calls in the OpenAI shape pass as they are (for a job that offered the tool); the
        // Gemini and Anthropic shapes depend on their dialects translating them back.
        let offered = json!({"tools": [{"type": "function", "function": {"name": TOOL}}]});
        let plain = Expectation::for_job(Accept::default(), offered.as_object().unwrap()).unwrap();
        for profile in [Profile::Groq, Profile::Cerebras, Profile::Openrouter, Profile::Openai] {
            let call =
                completion(profile, answer(profile, "m", Reply { text: None, call: None, cut_off: false })).await;
            assert_eq!(call.body["choices"][0]["message"]["tool_calls"][0]["function"]["name"], TOOL);
            assert_eq!(call.body["choices"][0]["finish_reason"], "tool_calls");
            assert_eq!(plain.check(&call.body), Ok(()), "{profile:?}");
        }
    }

    #[tokio::test]
    async fn every_profile_withdraws_a_model_the_way_the_worker_recognises() {
        for profile in ALL {
            let failure = read(profile, model_gone(profile, "old-model")).await;
            assert_eq!(failure.kind, FailureKind::ModelUnavailable, "{profile:?}: {}", failure.message);
        }
    }

    #[tokio::test]
    async fn moderation_is_a_client_error_for_every_profile() {
        for profile in ALL {
            let failure = read(profile, moderation("some/model")).await;
            assert_eq!((failure.kind, failure.status), (FailureKind::Client, Some(403)), "{profile:?}");
            assert!(failure.message.contains("requires moderation"), "{}", failure.message);
        }
    }

    /// What the worker's dialect for `profile` makes of the mock's answer to the OpenAI `job`,
    /// sent the way that dialect sends it.
    async fn answer_to(profile: Profile, job: &Value) -> Value {
        let job: crate::job::ChatBody = serde_json::from_value(job.clone()).unwrap();
        let request = match profile {
            Profile::GeminiNative => gemini::request_body(&job).unwrap(),
            Profile::Anthropic => anthropic::request_body(&job, "m").unwrap(),
            _ => openai::request_body(&job, "m"),
        };
        let response = success(profile, "m", &request);
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let now = SystemTime::now();
        let done = match profile {
            Profile::GeminiNative => gemini::interpret(status, &headers, &body, "m", now),
            Profile::Anthropic => anthropic::interpret(status, &headers, &body, anthropic::Reading::of(&job, "m"), now),
            _ => openai::interpret(status, &headers, &body, now),
        };
        done.unwrap().body
    }

    #[tokio::test]
    async fn every_profile_answers_tools_with_a_call_in_its_own_dialect() {
        let weather = json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}});
        let clock = json!({"type": "function", "function": {"name": "now"}});
        for profile in ALL {
            let job = json!({"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [clock, weather],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
            let body = answer_to(profile, &job).await;
            let choice = &body["choices"][0];
            assert_eq!(choice["finish_reason"], "tool_calls", "{profile:?}: {body}");
            let call = &choice["message"]["tool_calls"][0];
            assert_eq!(call["function"]["name"], "get_weather", "{profile:?}: the forced tool");
            let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(arguments, json!({"city": "mock", "unit": "celsius"}), "{profile:?}");

            // With the tool's result in the conversation, the model answers in text.
            let mut answered = job.clone();
            answered["messages"] = json!([{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]);
            let body = answer_to(profile, &answered).await;
            assert_eq!(body["choices"][0]["finish_reason"], "stop", "{profile:?}: {body}");
            assert_eq!(body["choices"][0]["message"]["content"], "mock answer from m");
        }
    }

    #[tokio::test]
    async fn every_profile_answers_a_json_schema_with_a_document_that_follows_it() {
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
            "required": ["name", "tags"]});
        for profile in ALL {
            let job = json!({"messages": [{"role": "user", "content": "Describe"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}});
            let body = answer_to(profile, &job).await;
            assert_eq!(body["choices"][0]["finish_reason"], "stop", "{profile:?}: {body}");
            let content: Value =
                serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
            assert_eq!(content, json!({"name": "mock", "tags": ["mock"]}), "{profile:?}");
        }
    }

    /// What the worker reads from one request to a running mock: its classified answer.
    async fn call(mock: &MockProvider, profile: Profile) -> Result<crate::providers::Completion, Failure> {
        let url = format!("{}/chat/completions", mock.base_url());
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let response = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        match profile {
            Profile::Anthropic => {
                anthropic::interpret(status, &headers, &bytes, anthropic::Reading::text("m"), SystemTime::now())
            }
            _ => openai::interpret(status, &headers, &bytes, SystemTime::now()),
        }
    }

    #[tokio::test]
    async fn success_headers_tell_where_the_mocks_own_limits_stand() {
        use crate::routing::QuotaMeasure;
        for profile in [Profile::Groq, Profile::Openai, Profile::Sambanova, Profile::Anthropic] {
            let mut options = MockOptions::new(profile);
            options.limits = vec![
                RequestLimit { requests: 3, per: Duration::from_secs(60) },
                RequestLimit { requests: 100, per: Duration::from_secs(86_400) },
            ];
            let mock = MockProvider::start(options).await.unwrap();
            for left in [2, 1, 0] {
                let done = call(&mock, profile).await.unwrap();
                let seen = done.quota.first().copied().unwrap_or_else(|| panic!("{profile:?}: no observation"));
                assert_eq!(
                    (done.quota.len(), seen.measure, seen.remaining, seen.limit),
                    (1, QuotaMeasure::Requests, left, Some(3)),
                    "{profile:?}"
                );
                let resets_in = seen.resets_at.unwrap().duration_since(SystemTime::now()).unwrap_or_default();
                assert!(resets_in > Duration::from_secs(55) && resets_in <= Duration::from_secs(62), "{resets_in:?}");
                // The last slot spent: the worker cools the provider rather than collect a 429.
                assert_eq!(done.exhausted_until.is_some(), left == 0, "{profile:?}");
            }
            let refused = call(&mock, profile).await.unwrap_err();
            assert_eq!(refused.kind, FailureKind::RateLimited, "{profile:?}");
        }
        // Cerebras names each window it can: the minute and the day, not a 2 s window.
        let mut options = MockOptions::new(Profile::Cerebras);
        options.limits = vec![
            RequestLimit { requests: 30, per: Duration::from_secs(60) },
            RequestLimit { requests: 5, per: Duration::from_secs(2) },
            RequestLimit { requests: 14_400, per: Duration::from_secs(86_400) },
        ];
        let mock = MockProvider::start(options).await.unwrap();
        let done = call(&mock, Profile::Cerebras).await.unwrap();
        let seen: Vec<_> = done.quota.iter().map(|o| (o.remaining, o.limit, o.window.map(|w| w.as_secs()))).collect();
        assert_eq!(seen, vec![(29, Some(30), Some(60)), (14_399, Some(14_400), Some(86_400))]);
    }

    #[tokio::test]
    async fn without_limits_a_success_claims_no_budget() {
        for profile in [Profile::Groq, Profile::Cerebras, Profile::Openai, Profile::Sambanova, Profile::Anthropic] {
            let mock = MockProvider::start(MockOptions::new(profile)).await.unwrap();
            let done = call(&mock, profile).await.unwrap();
            assert_eq!((done.quota.len(), done.exhausted_until), (0, None), "{profile:?}");
        }
    }

    #[tokio::test]
    async fn account_scoped_429s_read_as_the_accounts() {
        use crate::routing::LimitScope;
        let reset = SystemTime::now() + Duration::from_secs(3600);
        for profile in [Profile::Openrouter, Profile::GeminiOpenai, Profile::GeminiNative] {
            let failure = read(profile, rate_limited(profile, "m", &RetryHint::Account(reset))).await;
            assert_eq!(
                (failure.kind, failure.scope, failure.daily),
                (FailureKind::RateLimited, LimitScope::Account, true),
                "{profile:?}: {}",
                failure.message
            );
        }
        // Providers that scope nothing to the account answer their daily error, the model's.
        for profile in [Profile::Groq, Profile::Cerebras, Profile::Anthropic] {
            let failure = read(profile, rate_limited(profile, "m", &RetryHint::Account(reset))).await;
            assert_eq!((failure.kind, failure.scope), (FailureKind::RateLimited, LimitScope::Model), "{profile:?}");
        }
    }

    #[tokio::test]
    async fn a_limit_of_zero_refuses_every_request_instead_of_panicking() {
        let mut options = MockOptions::new(Profile::Groq);
        options.limits = vec![RequestLimit { requests: 0, per: Duration::from_secs(1) }];
        let mock = MockProvider::start(options).await.unwrap();
        let url = format!("{}/chat/completions", mock.base_url());
        let response = reqwest::Client::new().post(url).body("{}").send().await.unwrap();
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(mock.stats().rate_limited, 1);
    }
}
