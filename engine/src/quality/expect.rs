//! Expectations (placeholder).
