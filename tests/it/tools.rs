//! Tools, JSON output and images through every dialect, and providers that cannot carry them,
//! through the real queue and database: a Gemini-kind and an Anthropic-kind provider answer a
//! tools job with OpenAI `tool_calls`; a provider whose `supports` leaves tools out is
//! `skipped_capability` without a request and without spending its quota.

use fallback_worker::mock::{MockOptions, MockProvider, Profile};
use fallback_worker::providers::shape::chat_completion_problems;
use fallback_worker::routing::AttemptOutcome;
use lapin::BasicProperties;
use serde_json::{Value, json};

use crate::support::*;

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

fn tools_job(custom_id: &str, chain: &str) -> String {
    json!({"custom_id": custom_id, "chain": chain, "body": {"messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": weather_tools(), "tool_choice": "auto", "max_tokens": 64}})
    .to_string()
}

/// The answer of a successful result, after checking it loads as the OpenAI SDK's ChatCompletion.
fn answer(result: &fallback_worker::job::JobResult) -> Value {
    assert!(result.is_success(), "{result:?}");
    let body = result.response.as_ref().unwrap().body.clone();
    assert_eq!(chat_completion_problems(&body), Vec::<String>::new(), "{body}");
    body
}

#[tokio::test]
async fn a_tools_job_through_gemini_and_anthropic_comes_back_as_openai_tool_calls() {
    let env = TestEnv::new().await;
    let gemini = MockProvider::start(MockOptions::new(Profile::GeminiNative)).await.unwrap();
    let claude = MockProvider::start(MockOptions::new(Profile::Anthropic)).await.unwrap();
    let config = env.config(&format!(
        "{}{}{}{}",
        provider("gemini", &gemini.base_url(), true, "kind = \"gemini\""),
        provider("claude", &claude.base_url(), true, "kind = \"anthropic\""),
        chain("default", &["gemini"], ""),
        chain("claude", &["claude"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;

    for chain_name in ["default", "claude"] {
        env.publish(&tools_job(&format!("tools-{chain_name}"), chain_name), BasicProperties::default()).await;
        let (result, _) = env.next_result(&env.results).await;
        let body = answer(&result);
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{chain_name}: {body}");
        assert_eq!(choice["message"]["content"], Value::Null, "{chain_name}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()), "{chain_name}: {call}");
        assert_eq!(call["function"]["name"], "get_weather");
        let arguments = call["function"]["arguments"].as_str().expect("arguments are a JSON string");
        assert_eq!(serde_json::from_str::<Value>(arguments).unwrap(), json!({"city": "mock"}));
    }

    // Each provider got the tools in its own dialect.
    let sent = &gemini.stats().bodies[0];
    let declaration = &sent["tools"][0]["functionDeclarations"][0];
    assert_eq!(declaration["name"], "get_weather");
    assert_eq!(declaration["parameters"]["properties"]["city"]["type"], "STRING");
    assert_eq!(sent["toolConfig"]["functionCallingConfig"]["mode"], "AUTO");
    let sent = &claude.stats().bodies[0];
    assert_eq!(sent["tools"][0]["name"], "get_weather");
    assert_eq!(sent["tools"][0]["input_schema"], weather_tools()[0]["function"]["parameters"]);
    assert_eq!(sent["tool_choice"], json!({"type": "auto"}));
    worker.stop().await;
}

#[tokio::test]
async fn a_provider_that_cannot_carry_tools_is_skipped_without_a_request_or_its_quota() {
    let env = TestEnv::new().await;
    let plain = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let gemini = MockProvider::start(MockOptions::new(Profile::GeminiNative)).await.unwrap();
    let config = env.config(&format!(
        "{}{}{}",
        provider("plain", &plain.base_url(), true, "supports = []\nlimits = [{ requests = 1, per = \"1h\" }]"),
        provider("gemini", &gemini.base_url(), true, "kind = \"gemini\""),
        chain("default", &["plain", "gemini"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;

    env.publish(&tools_job("tools-1", "default"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    answer(&result);
    let attempts: Vec<_> = result
        .routing
        .attempts
        .iter()
        .map(|a| (a.provider.as_str(), a.outcome, a.status, a.message.as_deref()))
        .collect();
    assert_eq!(
        attempts,
        vec![
            (
                "plain",
                AttemptOutcome::SkippedCapability,
                None,
                Some("the job needs tools, which this provider's `supports` leaves out")
            ),
            ("gemini", AttemptOutcome::Ok, Some(200), None),
        ]
    );
    assert_eq!(plain.requests(), 0, "the provider that cannot carry tools got no request");

    // Its one request of the hour is still there for a job it can carry…
    env.publish(&job("plain-1"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    assert_eq!(result.routing.provider.as_deref(), Some("plain"), "{:?}", result.routing.attempts);
    assert_eq!(plain.requests(), 1);
    // …and then spent: the limit holds, so the slot above was the only one.
    env.publish(&job("plain-2"), BasicProperties::default()).await;
    let (result, _) = env.next_result(&env.results).await;
    let first = &result.routing.attempts[0];
    assert_eq!((first.provider.as_str(), first.outcome), ("plain", AttemptOutcome::SkippedQuota));
    assert_eq!(plain.requests(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn json_schemas_and_images_reach_each_dialect() {
    let env = TestEnv::new().await;
    let gemini = MockProvider::start(MockOptions::new(Profile::GeminiNative)).await.unwrap();
    let claude = MockProvider::start(MockOptions::new(Profile::Anthropic)).await.unwrap();
    let config = env.config(&format!(
        "{}{}{}{}",
        provider("gemini", &gemini.base_url(), true, "kind = \"gemini\""),
        provider(
            "claude",
            &claude.base_url(),
            true,
            "kind = \"anthropic\"\nsupports = [\"tools\", \"json_schema\", \"images\"]"
        ),
        chain("default", &["gemini"], ""),
        chain("claude", &["claude"], "")
    ));
    let worker = env.spawn_worker(config, "w1").await;
    let schema = json!({"type": "object", "properties": {"animal": {"type": "string"}, "legs": {"type": "integer"}},
        "required": ["animal", "legs"], "additionalProperties": false});

    for chain_name in ["default", "claude"] {
        let line = json!({"custom_id": format!("json-{chain_name}"), "chain": chain_name, "body": {
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in the picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "animal", "strict": true, "schema": schema}}}});
        env.publish(&line.to_string(), BasicProperties::default()).await;
        let (result, _) = env.next_result(&env.results).await;
        let body = answer(&result);
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{chain_name}: {body}");
        assert_eq!(body["choices"][0]["message"].get("tool_calls"), None, "{chain_name}: JSON is content");
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(serde_json::from_str::<Value>(content).unwrap(), json!({"animal": "mock", "legs": 1}));
    }

    let sent = &gemini.stats().bodies[0];
    assert_eq!(sent["generationConfig"]["responseMimeType"], "application/json");
    assert_eq!(sent["generationConfig"]["responseSchema"]["properties"]["legs"]["type"], "INTEGER");
    assert_eq!(
        sent["contents"][0]["parts"][1],
        json!({"inline_data": {"mime_type": "image/png", "data": "iVBORw0KGgo="}})
    );
    let sent = &claude.stats().bodies[0];
    assert_eq!(sent["tool_choice"], json!({"type": "tool", "name": "json_answer"}));
    assert_eq!(sent["tools"][0]["input_schema"], schema);
    assert_eq!(
        sent["messages"][0]["content"][1],
        json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}})
    );
    worker.stop().await;
}
