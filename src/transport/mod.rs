//! The gateways' transport: QUIC between regions with mutual TLS over the topology's own CA.
//!
//! Owns: certificates ([`certs`]: creating a CA and one certificate per region for
//! `ferry certs init`, loading a region's PEM material with errors naming the file), TLS and
//! QUIC configurations ([`tls`]: TLS 1.3 on rustls' `ring` provider, client certificates
//! required and verified against the topology's CA only, windows, stream limits, keep-alive,
//! Cubic), and endpoints and peer identity ([`link`]: binding with raised UDP buffers, dialing a
//! region's advertised gateway address, accepting a peer and deciding which region it is, or
//! refusing it). Does not own: the mirroring protocol, its frames, cursors and
//! acknowledgements, reconnecting with backoff, or what runs over a connection's streams;
//! those come in `mirror`.
//!
//! Invariants: a region's certificate names `<region>.ferry` ([`certs::region_dns_name`]) and
//! is signed by the CA named in the topology's `[tls]`; a connection returned by
//! [`link::accept`] or [`link::connect`] has completed a mutually authenticated handshake in
//! which both certificates chain to that CA, and an accepted peer names exactly one region of
//! the topology that has a gateway. Nothing consults system trust roots or a process-wide
//! crypto provider.

pub mod certs;
pub mod link;
pub mod tls;
pub mod trust;

pub use certs::{load_region, region_dns_name, RegionMaterial};
pub use link::{accept, connect, endpoint, LinkError};
pub use tls::{client_config, server_config, TransportSettings};
