//! Poison messages (contract §4): an `invalid_request` result, the message dead-lettered with
//! its reason, never requeued in a loop; and refused `reply_to`s.

use fallback_worker::job::ErrorCode;
use fallback_worker::mock::{MockOptions, MockProvider, Profile};
use lapin::BasicProperties;

use crate::support::*;

#[tokio::test]
async fn each_kind_of_poison_is_answered_and_dead_lettered() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let mut config =
        env.config(&format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], "")));
    config.amqp.max_message_bytes = 2000;
    let worker = env.spawn_worker(config, "w1").await;
    let oversized =
        format!(r#"{{"custom_id":"big","body":{{"messages":[{{"role":"user","content":"{}"}}]}}}}"#, "x".repeat(3000));
    let cases: Vec<(&str, String, &str)> = vec![
        ("not-json", "this is not json".into(), "not a JSON object"),
        ("no-custom-id", r#"{"body":{"messages":[{"role":"user","content":"x"}]}}"#.into(), "custom_id"),
        (
            "stream",
            r#"{"custom_id":"s","body":{"messages":[{"role":"user","content":"x"}],"stream":true}}"#.into(),
            "stream",
        ),
        (
            "bad-url",
            r#"{"custom_id":"u","url":"/v1/embeddings","body":{"messages":[{"role":"user","content":"x"}]}}"#.into(),
            "url",
        ),
        ("no-messages", r#"{"custom_id":"m","body":{"messages":[]}}"#.into(), "messages"),
        (
            "unknown-chain",
            r#"{"custom_id":"c","chain":"nope","body":{"messages":[{"role":"user","content":"x"}]}}"#.into(),
            "unknown chain",
        ),
        ("oversized", oversized, "max_message_bytes"),
    ];
    for (name, body, _) in &cases {
        env.publish(body, BasicProperties::default().with_correlation_id((*name).into())).await;
    }
    for _ in &cases {
        let (result, properties) = env.next_result(&env.results).await;
        let correlation = properties.correlation_id().as_ref().map(|c| c.to_string()).unwrap();
        let error = result.error.as_ref().unwrap_or_else(|| panic!("{correlation}: {result:?}"));
        assert_eq!(error.code, ErrorCode::InvalidRequest, "{correlation}");
        assert!(result.response.is_none());
        let expected = cases.iter().find(|(n, _, _)| *n == correlation).map(|(_, _, n)| *n).unwrap();
        assert!(error.message.contains(expected), "{correlation}: {}", error.message);
    }
    for _ in &cases {
        let (_, properties) = env.client.next_message(&env.dead_queue(), PATIENCE).await.expect("dead-lettered");
        let reason = header(&properties, "fallback-reason").expect("the reason is in a header");
        assert!(!reason.is_empty());
    }
    assert_eq!(mock.requests(), 0, "poison never reaches a provider");
    assert_eq!(env.client.depth(&env.jobs).await, 0, "nothing is requeued");
    worker.stop().await;
}

#[tokio::test]
async fn a_refused_reply_to_is_poison_and_its_error_goes_to_the_results_queue() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let mut config =
        env.config(&format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], "")));
    config.amqp.reply_to_allow = vec!["replies.*".into()];
    let worker = env.spawn_worker(config, "w1").await;
    let inject = env.jobs.clone();
    let dead = env.dead_queue();
    for reply_to in [inject.as_str(), dead.as_str(), "elsewhere"] {
        env.publish(
            &job("r"),
            BasicProperties::default().with_reply_to(reply_to.into()).with_correlation_id(reply_to.into()),
        )
        .await;
        let (result, properties) = env.next_result(&env.results).await;
        assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some(reply_to));
        let error = result.error.expect("refused");
        assert_eq!(error.code, ErrorCode::InvalidRequest);
        assert!(error.message.contains("reply_to"), "{}", error.message);
        let (_, dead_props) = env.client.next_message(&env.dead_queue(), PATIENCE).await.expect("dead-lettered");
        assert!(header(&dead_props, "fallback-reason").unwrap().contains("reply_to"));
    }
    assert_eq!(mock.requests(), 0);
    worker.stop().await;
}

#[tokio::test]
async fn a_missing_reply_queue_does_not_lose_the_result() {
    let env = TestEnv::new().await;
    let mock = MockProvider::start(MockOptions::new(Profile::Groq)).await.unwrap();
    let config = env.config(&format!("{}{}", provider("p", &mock.base_url(), true, ""), chain("default", &["p"], "")));
    let worker = env.spawn_worker(config, "w1").await;
    let gone = format!("fwtest.{}.no-such-queue", env.id);
    env.publish(&job("lost?"), BasicProperties::default().with_reply_to(gone.as_str().into())).await;
    let (result, properties) = env.next_result(&env.results).await;
    assert!(result.is_success());
    assert_eq!(header(&properties, "fallback-undeliverable-reply-to").as_deref(), Some(gone.as_str()));
    worker.stop().await;
}
