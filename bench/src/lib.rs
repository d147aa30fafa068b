//! weir benchmark harness.
