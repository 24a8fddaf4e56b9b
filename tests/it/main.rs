//! Black-box tests through the real RabbitMQ and Postgres, with the project's mock providers.
//! One binary (faster to link); one file per area.

mod support;

mod admission_review;
mod answer_checks;
mod backlog;
mod batched_admission;
mod chain_flow;
mod credits;
mod delivery;
mod deploy;
mod dialects;
mod faults;
mod hostile;
mod ledger_batching;
mod observability;
mod observe_batch;
mod outages;
mod poison;
mod pool_workers;
mod pools;
mod provider_faults;
mod quorum;
mod review4;
mod review4_probe;
mod review5;
mod review5_probe;
mod review_0009;
mod review_0009b;
mod review_0009d;
mod review_0010;
mod review_0011;
mod review_credits;
mod review_credits2;
mod review_credits3;
mod review_finish;
mod review_fresh;
mod review_leases;
mod review_outage;
mod review_probe;
mod review_probe2;
mod review_refusal;
mod shared_state;
mod slow_answers;
mod tools;
mod trace_context;
