//! Record pull loop (in progress).
