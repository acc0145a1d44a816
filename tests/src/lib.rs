//! Test support: a nats-server harness and helpers to find the built plugins.
