//! # corridor-cli — the `corridor` command
//!
//! * [`devpki`] — development PKI, keys, directory and node configurations
//! * [`demo`] — a local three-node federation walking a referral end to end
//! * [`commands`] — caseworker commands against a node's local API
//! * [`audit`] — verifying nodes' audit logs
//! * [`bench`] — measuring Corridor beside the transport and crypto limits
//! * [`client`] — connecting to the local API with a bearer token
//! * [`terminal`] — output that a closed pipe or a hostile value cannot disturb
//! * [`files`] — reading the files a user names, within a size limit

pub mod audit;
pub mod bench;
pub mod client;
pub mod commands;
pub mod demo;
pub mod devpki;
pub mod files;
pub mod terminal;
