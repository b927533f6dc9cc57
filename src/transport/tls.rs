//! quinn server and client configurations for one region: TLS 1.3 with mutual authentication
//! against the topology's CA only (no system roots, no platform verifier), on rustls' `ring`
//! provider, plus the transport settings a long, fat gateway link needs.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::server::VerifierBuilderError;
use thiserror::Error;

use super::certs::RegionMaterial;

/// The ALPN protocol of the gateway link; both sides offer only this.
pub const ALPN: &[u8] = b"ferry-mirror/1";

/// QUIC transport settings of a gateway link.
///
/// The defaults suit a link of about 1 Gbit/s × 100 ms: one stream can have 16 MiB in flight
/// (`stream_window / RTT` bounds a stream's throughput), all streams together 64 MiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSettings {
    /// Bytes a peer may send on one stream beyond what has been read (per-stream flow control).
    pub stream_window: u64,
    /// Bytes a peer may send on all streams together beyond what has been read.
    pub connection_window: u64,
    /// Bytes this side buffers unacknowledged across all streams.
    pub send_window: u64,
    /// Concurrent streams the peer may open, in each direction and of each kind (bidirectional
    /// and unidirectional): one stream per mirrored partition.
    pub max_streams: u32,
    /// How often an idle connection is pinged; below `idle_timeout`.
    pub keep_alive: Duration,
    /// A connection with no traffic (keep-alives count) for this long is closed.
    pub idle_timeout: Duration,
    /// Congestion controller of the links.
    pub congestion: Congestion,
}

/// QUIC congestion control. Loss-based Cubic halves its window at every lost packet, which on a
/// WAN with random loss (1 % at 40 ms RTT) holds a link to about 1 MiB/s; BBR paces to the
/// measured bottleneck bandwidth and round trip instead, as the TCP stacks of the WAN lab do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    Bbr,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            send_window: 64 << 20,
            max_streams: 4096,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            congestion: Congestion::Bbr,
        }
    }
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("region {region}: {what}: {source}")]
    Rustls {
        region: String,
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("region {region}: cannot build the client certificate verifier: {source}")]
    Verifier {
        region: String,
        #[source]
        source: VerifierBuilderError,
    },
    #[error("region {region}: the TLS configuration has no cipher suite QUIC can use: {source}")]
    Quic {
        region: String,
        #[source]
        source: NoInitialCipherSuite,
    },
    #[error("transport setting {name} = {value}: {problem}")]
    Setting {
        name: &'static str,
        value: String,
        problem: &'static str,
    },
}

/// The rustls crypto provider of the gateway link: `ring`, passed explicitly (no process-wide
/// default is installed or consulted).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn varint(name: &'static str, value: u64) -> Result<VarInt, TlsError> {
    VarInt::from_u64(value).map_err(|_| TlsError::Setting {
        name,
        value: value.to_string(),
        problem: "above the QUIC maximum of 2^62 - 1",
    })
}

/// The quinn transport configuration for `settings`: windows, stream limits, keep-alive below
/// the idle timeout, Cubic congestion control.
pub fn transport_config(settings: &TransportSettings) -> Result<TransportConfig, TlsError> {
    if settings.keep_alive.is_zero() || settings.keep_alive >= settings.idle_timeout {
        return Err(TlsError::Setting {
            name: "keep_alive",
            value: format!("{:?}", settings.keep_alive),
            problem: "must be non-zero and below idle_timeout",
        });
    }
    if settings.stream_window == 0 || settings.connection_window == 0 {
        return Err(TlsError::Setting {
            name: "stream_window/connection_window",
            value: format!("{}/{}", settings.stream_window, settings.connection_window),
            problem: "windows must be non-zero",
        });
    }
    let idle = IdleTimeout::try_from(settings.idle_timeout).map_err(|_| TlsError::Setting {
        name: "idle_timeout",
        value: format!("{:?}", settings.idle_timeout),
        problem: "too large for QUIC",
    })?;
    let mut t = TransportConfig::default();
    t.stream_receive_window(varint("stream_window", settings.stream_window)?)
        .receive_window(varint("connection_window", settings.connection_window)?)
        .send_window(settings.send_window)
        .max_concurrent_bidi_streams(settings.max_streams.into())
        .max_concurrent_uni_streams(settings.max_streams.into())
        .keep_alive_interval(Some(settings.keep_alive))
        // FEC shards (`wire_fec`) travel as datagrams: room for a few frames' worth each way.
        .datagram_receive_buffer_size(Some(16 << 20))
        .datagram_send_buffer_size(16 << 20)
        .max_idle_timeout(Some(idle));
    match settings.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
    };
    Ok(t)
}

/// The server side of a region's gateway: TLS 1.3 only, presents the region's certificate and
/// requires a client certificate that chains to the topology's CA (and to nothing else).
/// Which region the client is, is decided after the handshake (see
/// [`super::link::accept`]).
pub fn server_config(
    material: &RegionMaterial,
    settings: &TransportSettings,
) -> Result<quinn::ServerConfig, TlsError> {
    let region = || material.region.clone();
    let mut tls = super::trust::rustls_server(material)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|source| TlsError::Quic {
        region: region(),
        source,
    })?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(settings)?));
    Ok(cfg)
}

/// The client side of a region's gateway: TLS 1.3 only, verifies the server against the
/// topology's CA only (the server name, `<peer>.ferry`, is given per connection: see
/// [`super::link::connect`]) and presents the region's certificate.
pub fn client_config(
    material: &RegionMaterial,
    settings: &TransportSettings,
) -> Result<quinn::ClientConfig, TlsError> {
    let region = || material.region.clone();
    let mut tls = super::trust::rustls_client(material)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|source| TlsError::Quic {
        region: region(),
        source,
    })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(settings)?));
    Ok(cfg)
}
