//! crm-mailsync: server-side email synchronization for CRM systems.
//!
//! The mail flows through the modules in this order:
//! [`config`] → [`scheduler`] → [`connector`] → [`parse`] → [`filter`] →
//! [`correlate`] → [`store`] → [`alerts`]; [`pipeline`] strings the middle
//! stages together and [`admin`] shows it all over HTTP.

// Non-negotiable: no unwrap/expect outside tests and provably infallible spots.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod alerts;
pub mod config;
pub mod connector;
pub mod correlate;
pub mod crm;
pub mod daemon;
pub mod deployment;
pub mod entra;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod filter;
pub mod jobs;
pub mod model;
pub mod net;
pub mod outgoing;
pub mod parse;
pub mod pipeline;
pub mod private_fs;
pub mod quarantine;
pub mod replay;
pub mod scheduler;
pub mod store;
pub mod telemetry;
pub mod testenable;
