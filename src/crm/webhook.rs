//! Webhook adapter (in progress).
