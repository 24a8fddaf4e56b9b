//! Black-box tests through the real RabbitMQ and Postgres, with the project's mock providers.
//! One binary (faster to link); one file per area.

mod support;

mod backlog;
mod chain_flow;
mod delivery;
mod dialects;
mod faults;
mod hostile;
mod observability;
mod outages;
mod poison;
mod provider_faults;
mod quorum;
mod shared_state;
