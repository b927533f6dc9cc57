//! Who may open Ferry's own doors over TCP, and the TLS configurations those doors use.
//!
//! Ferry has three kinds of door besides the Kafka client protocol, and every one is opened only
//! by a certificate from the topology's CA:
//! - the gateways' QUIC link (peer regions, see [`super::link`]);
//! - the broker's internal requests (MirrorAppend, MirrorAck, FerryControl), served only on a
//!   mutual-TLS connection to the broker's Kafka port (see `kafka::server`) from the region's own
//!   gateway (`<region>.ferry`) or an operator (`<name>.operator.ferry`);
//! - the gateway's admin API (HTTPS), for operators only.
//!
//! Owns: reading the [`Identity`] a verified certificate proves, which identities a [`Door`]
//! admits, and the rustls server and client configurations of every door (TLS 1.3, client
//! certificates required and verified against the topology's CA only; [`super::tls`] adds
//! QUIC's ALPN and transport settings to the same ones). Does not own: loading
//! PEM files ([`super::certs`]), or what is served once a peer is in.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use super::certs::{operator_name_of, RegionMaterial, DNS_SUFFIX};
use super::tls::{provider, TlsError};

/// Who a verified client certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Identity {
    /// A region's gateway (or broker): the certificate names `<region>.ferry`.
    Region(String),
    /// An operator: the certificate names `<name>.operator.ferry`.
    Operator(String),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Region(r) => write!(f, "region {r}"),
            Identity::Operator(o) => write!(f, "operator {o}"),
        }
    }
}

/// A door and what it admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Door {
    /// The internal requests of a broker of `region`: its own gateway and operators.
    BrokerInternal { region: String },
    /// The admin API of a gateway: operators only.
    Admin,
}

impl Door {
    pub fn admits(&self, who: &Identity) -> bool {
        match (self, who) {
            (_, Identity::Operator(_)) => true,
            (Door::BrokerInternal { region }, Identity::Region(r)) => r == region,
            (Door::Admin, Identity::Region(_)) => false,
        }
    }
}

/// The identity a certificate (already verified against the topology's CA) proves: exactly one
/// region or operator name among its DNS names; anything else is refused with the reason.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let leaf = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let mut found: Vec<Identity> = Vec::new();
    for name in leaf.valid_dns_names() {
        let id = if let Some(op) = operator_name_of(name) {
            Identity::Operator(op.to_string())
        } else if let Some(region) = name
            .strip_suffix(DNS_SUFFIX)
            .and_then(|r| r.strip_suffix('.'))
            .filter(|r| !r.is_empty() && !r.contains('.'))
        {
            Identity::Region(region.to_string())
        } else {
            continue;
        };
        if !found.contains(&id) {
            found.push(id);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(
            "the certificate names no region (`R.ferry`) and no operator (`N.operator.ferry`)"
                .into(),
        ),
        many => Err(format!(
            "the certificate names several identities ({})",
            many.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The topology's CA as the only trust anchors.
pub(crate) fn roots(material: &RegionMaterial) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in &material.ca {
        roots.add(ca.clone()).map_err(|source| TlsError::Rustls {
            region: material.region.clone(),
            what: "bad CA certificate",
            source,
        })?;
    }
    Ok(roots)
}

/// A TLS 1.3 server over TCP that presents `material`'s certificate and requires a client
/// certificate chaining to the topology's CA (and to nothing else). Who the client is, is read
/// after the handshake with [`identity_of`].
pub fn tcp_server_config(material: &RegionMaterial) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    Ok(Arc::new(rustls_server(material)?))
}

/// The rustls server configuration every Ferry door uses (TCP here, QUIC in
/// [`super::tls::server_config`] with its ALPN added).
pub(crate) fn rustls_server(material: &RegionMaterial) -> Result<rustls::ServerConfig, TlsError> {
    let region = || material.region.clone();
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(material)?), provider.clone())
            .build()
            .map_err(|source| TlsError::Verifier {
                region: region(),
                source,
            })?;
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            region: region(),
            what: "TLS 1.3 with the ring provider",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            region: region(),
            what: "the certificate and key do not fit together",
            source,
        })?;
    Ok(tls)
}

/// A TLS 1.3 client over TCP that trusts only the topology's CA and presents `material`'s
/// certificate (a region's, or an operator's).
pub fn tcp_client_config(material: &RegionMaterial) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    Ok(Arc::new(rustls_client(material)?))
}

/// The rustls client configuration every Ferry door uses (TCP here, QUIC in
/// [`super::tls::client_config`] with its ALPN added).
pub(crate) fn rustls_client(material: &RegionMaterial) -> Result<rustls::ClientConfig, TlsError> {
    let region = || material.region.clone();
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            region: region(),
            what: "TLS 1.3 with the ring provider",
            source,
        })?
        .with_root_certificates(roots(material)?)
        .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            region: region(),
            what: "the certificate and key do not fit together",
            source,
        })?;
    Ok(tls)
}

/// A connection through a TLS door: the stream, and who the client is if the door admits it
/// (`Err` holds why not: no identity, or one the door does not let in).
pub type Entered = (
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Result<Identity, String>,
);

/// Take a TCP connection through `door`: the TLS handshake within `timeout`, then the identity
/// its certificate proves and whether the door admits it. Every refusal is counted
/// (`ferry_connections_refused_total{listener}`) and logged with the peer's address. `Err`: no
/// TLS connection (handshake failed or too slow); `Ok` with an `Err` identity: a TLS
/// connection the door does not admit (the caller closes it, or answers it with a refusal).
pub async fn enter(
    tls: Arc<rustls::ServerConfig>,
    stream: tokio::net::TcpStream,
    door: &Door,
    timeout: std::time::Duration,
    listener: &'static str,
) -> Result<Entered, String> {
    use crate::limits::refused;
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
    let tls = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            refused(listener, "tls_handshake");
            tracing::warn!(%peer, listener, error = %e,
                "refused a TLS connection: handshake failed (no certificate from the topology's CA?)");
            return Err(format!("TLS handshake failed: {e}"));
        }
        Err(_) => {
            refused(listener, "request_read_timeout");
            tracing::warn!(%peer, listener, "refused a TLS connection: handshake not finished in time");
            return Err("TLS handshake not finished in time".into());
        }
    };
    let who = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| "no client certificate".to_string())
        .and_then(identity_of)
        .and_then(|w| {
            if door.admits(&w) {
                Ok(w)
            } else {
                Err(match door {
                    Door::BrokerInternal { region } => format!(
                        "{w} is not admitted: only region {region}'s gateway and operators may make internal requests"
                    ),
                    Door::Admin => format!(
                        "{w} is not an operator: the admin API takes operator certificates only"
                    ),
                })
            }
        });
    if let Err(reason) = &who {
        refused(listener, "not_admitted");
        tracing::warn!(%peer, listener, %reason, "refused a TLS connection");
    }
    Ok((tls, who))
}

/// How to reach one of a region's TLS doors: the client configuration and the name the server
/// must prove (`<region>.ferry`).
#[derive(Clone)]
pub struct TlsTarget {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTarget")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsTarget {
    /// Connect to a door of `region` with `config`.
    pub fn new(config: Arc<rustls::ClientConfig>, region: &str) -> TlsTarget {
        let server_name = ServerName::try_from(super::certs::region_dns_name(region))
            .expect("region names are valid DNS labels");
        TlsTarget {
            config,
            server_name,
        }
    }

    /// Open a TLS connection over `tcp`.
    pub async fn connect(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::certs::Ca;

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_loaded_ca_issues_operator_certificates_that_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test").unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        std::fs::write(&cert, ca.cert_pem()).unwrap();
        std::fs::write(&key, ca.key_pem()).unwrap();
        let loaded = Ca::load(&cert, &key).unwrap();
        let (oc, ok) = (dir.path().join("bob.pem"), dir.path().join("bob.key"));
        crate::transport::certs::write_operator(&loaded, "bob", &oc, &ok, false).unwrap();
        let m = crate::transport::certs::load_operator(&cert, &oc, &ok).unwrap();
        assert_eq!(m.region, "bob.operator.ferry");
        tcp_client_config(&m).expect("rustls takes the PKCS#8 v1 key");
        assert!(
            std::fs::read_to_string(&ok)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAw"),
            "PKCS#8 v1, which OpenSSL 3.0 reads"
        );
        // Not twice without --force.
        assert!(crate::transport::certs::write_operator(&loaded, "bob", &oc, &ok, false).is_err());
    }

    #[test]
    fn identities_and_doors() {
        let ca = Ca::generate("test").unwrap();
        let east = identity_of(&der(&ca.issue("east").unwrap().cert_pem)).unwrap();
        let west = identity_of(&der(&ca.issue("west").unwrap().cert_pem)).unwrap();
        let op = identity_of(&der(&ca.issue_operator("alice").unwrap().cert_pem)).unwrap();
        assert_eq!(east, Identity::Region("east".into()));
        assert_eq!(op, Identity::Operator("alice".into()));
        let door = Door::BrokerInternal {
            region: "east".into(),
        };
        assert!(door.admits(&east));
        assert!(
            !door.admits(&west),
            "another region's gateway is not let in"
        );
        assert!(door.admits(&op));
        assert!(Door::Admin.admits(&op));
        assert!(!Door::Admin.admits(&east));
    }
}
