//! QUIC endpoints of the gateways, dialing a peer region, and learning which region an accepted
//! peer is.
//!
//! A peer is identified by its certificate only: the TLS handshake has already checked that it
//! chains to the topology's CA, and [`identify`] then requires that it names exactly one region
//! of the topology that has a gateway (`<region>.ferry`). A peer that fails either check is
//! refused: logged at `warn` with its address and the reason, and (after the handshake) closed
//! with one of the `CLOSE_*` application error codes.

use std::net::SocketAddr;

use quinn::{Connection, ConnectionError, Endpoint, EndpointConfig, VarInt};
use rustls::pki_types::CertificateDer;
use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;
use tracing::{info, warn};

use super::certs::{cert_is_for, names_of, region_dns_name};
use crate::limits::{Admitted, Gate};
use crate::topology::Topology;

/// The UDP socket buffers asked for (`SO_RCVBUF`/`SO_SNDBUF`). The kernel caps them at
/// `net.core.rmem_max`/`wmem_max`; with Linux's default of about 208 KiB, roughly 1% of
/// datagrams drop even on loopback.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Closing code: the peer presented no certificate (cannot happen with [`super::tls`]'s
/// configurations, which require one).
pub const CLOSE_NO_CERTIFICATE: VarInt = VarInt::from_u32(0x101);
/// Closing code: the peer's certificate names no region of the topology that has a gateway.
pub const CLOSE_UNKNOWN_REGION: VarInt = VarInt::from_u32(0x102);
/// Closing code: the peer's certificate names more than one region.
pub const CLOSE_AMBIGUOUS_REGION: VarInt = VarInt::from_u32(0x103);

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("cannot bind the QUIC endpoint to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no async runtime for the QUIC endpoint (call from within tokio)")]
    NoRuntime,
    #[error("the QUIC endpoint is closed")]
    EndpointClosed,
    #[error(
        "refused peer {remote}: TLS handshake failed: {source}{}",
        handshake_hint(source)
    )]
    Handshake {
        remote: SocketAddr,
        #[source]
        source: ConnectionError,
    },
    #[error("refused peer {remote}: {reason}")]
    Limit { remote: SocketAddr, reason: String },
    #[error("refused peer {remote}: it presented no certificate")]
    NoPeerCertificate { remote: SocketAddr },
    #[error("refused peer {remote}: its certificate is for {names}, which is no region of {file} with a gateway (known: {known})")]
    UnknownRegion {
        remote: SocketAddr,
        /// The DNS names the certificate presents.
        names: String,
        file: String,
        known: String,
    },
    #[error("refused peer {remote}: its certificate is valid for several regions ({regions})")]
    AmbiguousRegion { remote: SocketAddr, regions: String },
    #[error("{file}: no region `{region}` (regions: {known})")]
    NoRegion {
        file: String,
        region: String,
        known: String,
    },
    #[error("{file}: region `{region}` has no gateway to connect to")]
    NoGateway { file: String, region: String },
    #[error("cannot resolve {host}:{port}, the gateway of region `{region}`: {reason}")]
    Resolve {
        region: String,
        host: String,
        port: u16,
        reason: String,
    },
    #[error("cannot connect to region `{region}` at {addr}: {source}")]
    Connect {
        region: String,
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connection to region `{region}` at {addr} failed: {source}")]
    Connection {
        region: String,
        addr: SocketAddr,
        #[source]
        source: ConnectionError,
    },
}

/// What a failed handshake most likely means, for the message.
fn handshake_hint(e: &ConnectionError) -> &'static str {
    let crypto = |code: u64| (0x100..0x200).contains(&code);
    match e {
        // This side rejected the peer's TLS (usually its certificate).
        ConnectionError::TransportError(t) if crypto(t.code.into()) => {
            " (hint: is its certificate signed by the topology's CA, and still valid?)"
        }
        // The peer rejected ours.
        ConnectionError::ConnectionClosed(c) if crypto(c.error_code.into()) => {
            " (hint: the peer does not accept this gateway's certificate: same CA on both sides?)"
        }
        _ => "",
    }
}

impl LinkError {
    /// Whether an accepted peer was refused (bad certificate or unknown region), as opposed to
    /// the endpoint itself failing.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            LinkError::Handshake { .. }
                | LinkError::Limit { .. }
                | LinkError::NoPeerCertificate { .. }
                | LinkError::UnknownRegion { .. }
                | LinkError::AmbiguousRegion { .. }
        )
    }

    /// The application error code a refused connection is closed with (`None` for errors that
    /// leave no connection to close).
    pub fn close_code(&self) -> Option<VarInt> {
        match self {
            LinkError::NoPeerCertificate { .. } => Some(CLOSE_NO_CERTIFICATE),
            LinkError::UnknownRegion { .. } => Some(CLOSE_UNKNOWN_REGION),
            LinkError::AmbiguousRegion { .. } => Some(CLOSE_AMBIGUOUS_REGION),
            _ => None,
        }
    }
}

/// A QUIC endpoint on `bind` that accepts peers with `server` (when given) and dials with
/// `client`. The UDP socket's buffers are raised to [`SOCKET_BUFFER_BYTES`] first (a warning is
/// logged when the kernel grants less). Must be called within a tokio runtime.
pub fn endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
    client: quinn::ClientConfig,
) -> Result<Endpoint, LinkError> {
    let bind_err = |source| LinkError::Bind { addr: bind, source };
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    // Best effort: a smaller buffer works, it just drops more under load.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    match socket.recv_buffer_size() {
        Ok(got) if got < SOCKET_BUFFER_BYTES => warn!(
            %bind,
            requested = SOCKET_BUFFER_BYTES,
            granted = got,
            "UDP receive buffer capped by the kernel; datagrams may drop under load \
             (hint: raise net.core.rmem_max)"
        ),
        _ => {}
    }
    socket.set_nonblocking(true).map_err(bind_err)?;
    socket.bind(&bind.into()).map_err(bind_err)?;
    let runtime = quinn::default_runtime().ok_or(LinkError::NoRuntime)?;
    let mut ep = Endpoint::new(
        EndpointConfig::default(),
        server,
        std::net::UdpSocket::from(socket),
        runtime,
    )
    .map_err(bind_err)?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Wait for the next peer and identify its region. A peer whose handshake fails (its
/// certificate is not signed by the topology's CA, or it has none) or whose certificate names
/// no known region is logged, closed, and returned as an error for which
/// [`LinkError::is_refusal`] holds: the caller logs nothing more and accepts again.
/// [`LinkError::EndpointClosed`] means no more peers will come.
pub async fn accept(
    endpoint: &Endpoint,
    topology: &Topology,
) -> Result<(String, Connection), LinkError> {
    let incoming = endpoint.accept().await.ok_or(LinkError::EndpointClosed)?;
    handshake(incoming, topology).await
}

/// [`accept`] within the connection caps of `gate` (`[limits]`): a peer address past them is
/// refused before its handshake (logged, counted, and an error for which
/// [`LinkError::is_refusal`] holds). The returned [`Admitted`] holds the connection's place:
/// keep it as long as the connection.
pub async fn accept_admitted(
    endpoint: &Endpoint,
    topology: &Topology,
    gate: &std::sync::Arc<Gate>,
) -> Result<(String, Connection, Admitted), LinkError> {
    let incoming = endpoint.accept().await.ok_or(LinkError::EndpointClosed)?;
    let remote = incoming.remote_address();
    let admitted = match gate.admit(remote.ip()) {
        Ok(a) => a,
        Err(why) => {
            incoming.refuse();
            let e = LinkError::Limit {
                remote,
                reason: why.to_string(),
            };
            warn!("{e}");
            return Err(e);
        }
    };
    let (region, conn) = handshake(incoming, topology).await?;
    Ok((region, conn, admitted))
}

async fn handshake(
    incoming: quinn::Incoming,
    topology: &Topology,
) -> Result<(String, Connection), LinkError> {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(c) => c,
        Err(source) => {
            let e = LinkError::Handshake { remote, source };
            warn!("{e}");
            return Err(e);
        }
    };
    match identify(&connection, topology) {
        Ok(region) => {
            info!(%remote, %region, "accepted peer");
            Ok((region, connection))
        }
        Err(e) => {
            warn!("{e}");
            if let Some(code) = e.close_code() {
                let reason = e.to_string();
                // Keep the reason well inside one packet.
                let reason = &reason.as_bytes()[..reason.len().min(512)];
                connection.close(code, reason);
            }
            Err(e)
        }
    }
}

/// The region of an established connection's peer: the one region of the topology with a
/// gateway whose name (`<region>.ferry`) the peer's certificate is valid for.
pub fn identify(connection: &Connection, topology: &Topology) -> Result<String, LinkError> {
    let remote = connection.remote_address();
    let certs = connection
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(LinkError::NoPeerCertificate { remote })?;
    let leaf = certs
        .first()
        .ok_or(LinkError::NoPeerCertificate { remote })?;
    region_of_certificate(leaf, topology).map_err(|e| match e {
        CertRegion::Unknown { names, known } => LinkError::UnknownRegion {
            remote,
            names,
            file: topology.file.display().to_string(),
            known,
        },
        CertRegion::Ambiguous(regions) => LinkError::AmbiguousRegion { remote, regions },
        CertRegion::Unparsable => LinkError::NoPeerCertificate { remote },
    })
}

enum CertRegion {
    Unparsable,
    Unknown { names: String, known: String },
    Ambiguous(String),
}

fn region_of_certificate(
    cert: &CertificateDer<'_>,
    topology: &Topology,
) -> Result<String, CertRegion> {
    let leaf = webpki::EndEntityCert::try_from(cert).map_err(|_| CertRegion::Unparsable)?;
    let gateways: Vec<&str> = topology
        .regions
        .iter()
        .filter(|r| r.gateway.is_some())
        .map(|r| r.name.as_str())
        .collect();
    let matches: Vec<&str> = gateways
        .iter()
        .copied()
        .filter(|r| cert_is_for(&leaf, &region_dns_name(r)))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(CertRegion::Unknown {
            names: names_of(&leaf),
            known: gateways.join(", "),
        }),
        many => Err(CertRegion::Ambiguous(many.join(", "))),
    }
}

/// Dial `peer_region`'s gateway (its advertised address) and verify that the server presents a
/// certificate for `<peer_region>.ferry` signed by the topology's CA; this side presents the
/// certificate of the endpoint's client configuration.
pub async fn connect(
    endpoint: &Endpoint,
    topology: &Topology,
    peer_region: &str,
) -> Result<Connection, LinkError> {
    let file = topology.file.display().to_string();
    let region = topology
        .region(peer_region)
        .ok_or_else(|| LinkError::NoRegion {
            file: file.clone(),
            region: peer_region.to_string(),
            known: topology
                .regions
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let gateway = region
        .gateway
        .as_ref()
        .ok_or_else(|| LinkError::NoGateway {
            file,
            region: peer_region.to_string(),
        })?;
    let (host, port) = &gateway.advertised;
    let addr = resolve(endpoint, peer_region, host, *port).await?;
    let connecting = endpoint
        .connect(addr, &region_dns_name(peer_region))
        .map_err(|source| LinkError::Connect {
            region: peer_region.to_string(),
            addr,
            source,
        })?;
    let connection = connecting.await.map_err(|source| LinkError::Connection {
        region: peer_region.to_string(),
        addr,
        source,
    })?;
    info!(region = %peer_region, %addr, "connected to peer");
    Ok(connection)
}

/// The first address of `host` in the endpoint's address family (an IPv6 endpoint takes any).
async fn resolve(
    endpoint: &Endpoint,
    region: &str,
    host: &str,
    port: u16,
) -> Result<SocketAddr, LinkError> {
    let err = |reason: String| LinkError::Resolve {
        region: region.to_string(),
        host: host.to_string(),
        port,
        reason,
    };
    let local_v4 = endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(true);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| err(e.to_string()))?
        .collect();
    addrs
        .iter()
        .copied()
        .find(|a| !local_v4 || a.is_ipv4())
        .ok_or_else(|| {
            err(format!(
                "no IPv4 address for this IPv4 endpoint (found: {addrs:?})"
            ))
        })
}
