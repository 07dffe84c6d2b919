//! The `broker` command, where the server and the client meet: `serve`, `init`, `proxy`,
//! `log-verify`, and the [`demo`], which starts a broker and drives it through the client
//! crate exactly as its users would. The server (`broker`) and the client (`brokerctl`)
//! crates know nothing of each other; only this crate and the tests use both.
#![forbid(unsafe_code)]

pub mod demo;
