//! `fallback-worker`: chat-completion jobs from RabbitMQ, run through a fallback chain of LLM
//! providers (free tiers first, a paid model last), with cooldowns shared by every worker in
//! Postgres, and results published to each job's reply queue.
//!
//! A job flows one way — broker → envelope → chain → provider → result → broker — and only the
//! ends touch the outside world:
//!
//! | module | what lives there |
//! | --- | --- |
//! | [`config`] | TOML + environment → validated [`config::Config`]; errors name file, key, problem |
//! | [`job`] | the contract's job and result envelopes; validation → `invalid_request` |
//! | [`chain`] | the fallback engine: pure logic over the provider and state traits |
//! | [`routing`] | leaf types every layer shares: `Attempt`, `AttemptOutcome`, `CooldownReason` |
//! | [`providers`] | one module per API dialect, retry-info and rate-limit-header parsing, the shared HTTP client |
//! | [`state`] | shared provider state and the result ledger: Postgres, or in memory |
//! | [`broker`] | RabbitMQ: topology, confirmed publisher, the reconnecting consumer supervisor |
//! | [`worker`] | the glue for one delivery: decode → ledger → chain → publish → ack |
//! | [`app`] | wiring a worker process from the config |
//! | [`cli`] | user-facing tools: `status` |
//! | [`mock`] | a mock provider speaking each real provider's dialect, for tests, demo and benchmarks |
//! | [`observability`] | Prometheus `/metrics`, `/healthz`, `/readyz`; trace context across the queue |
//! | [`telemetry`] | logging setup; the OTLP span exporter when configured |
//! | [`secrets`] | keeping keys and passwords out of every output |

pub mod app;
pub mod broker;
pub mod calendar;
pub mod chain;
pub mod cli;
pub mod config;
pub mod job;
pub mod mock;
pub mod observability;
pub mod providers;
pub mod routing;
pub mod secrets;
pub mod state;
pub mod telemetry;
pub mod worker;
