//! Workspace integration tests live in `tests/*.rs` beside this file.
