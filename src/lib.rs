//! udpchat: a chat system over UDP.
pub mod wire;
