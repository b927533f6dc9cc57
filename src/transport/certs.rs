//! Certificates for the gateways' mutual TLS: creating a CA and one certificate per region
//! (`ferry certs init`), and loading a region's material from PEM files.
//!
//! Every region's certificate carries the DNS name [`region_dns_name`] (`<region>.ferry`) in its
//! subject alternative names, is signed directly by the topology's CA, and is valid for both
//! client and server authentication: a gateway dials and accepts with the same certificate.
//! Keys are Ed25519 (PKCS#8 PEM), whose signatures have a fixed size.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName, UnixTime};
use thiserror::Error;
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::topology::{self, RegionTls, Tls, Topology, TopologyError};

/// The DNS suffix of region names in certificates.
pub const DNS_SUFFIX: &str = "ferry";

/// How long generated certificates are valid (from a day before their creation, to tolerate
/// clock skew between regions).
pub const VALIDITY_DAYS: i64 = 3650;

/// The name a region's certificate is issued for and checked against: `<region>.ferry`.
pub fn region_dns_name(region: &str) -> String {
    format!("{region}.{DNS_SUFFIX}")
}

/// The DNS suffix of operators' certificates: `<name>.operator.ferry`. Region names have no
/// dots, so no region's name (`<region>.ferry`) can be an operator's.
pub const OPERATOR_SUFFIX: &str = "operator.ferry";

/// The name an operator's certificate is issued for: `<name>.operator.ferry`.
pub fn operator_dns_name(name: &str) -> String {
    format!("{name}.{OPERATOR_SUFFIX}")
}

/// The operator certificate's default name (`ferry certs init` issues it).
pub const DEFAULT_OPERATOR: &str = "admin";

/// Where an operator's certificate and key are looked for by default: `operator.pem` and
/// `operator.key` beside the CA certificate.
pub fn default_operator_paths(ca_cert: &Path) -> (PathBuf, PathBuf) {
    let dir = ca_cert.parent().unwrap_or(Path::new("."));
    (dir.join("operator.pem"), dir.join("operator.key"))
}

#[derive(Debug, Error)]
pub enum CertError {
    #[error("cannot generate {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing to overwrite existing {}: {} (hint: pass --force to replace them)",
        if paths.len() == 1 { "file" } else { "files" },
        display_paths(paths)
    )]
    Exists { paths: Vec<PathBuf> },
    #[error("{}: named twice (as {first} and as {second})", path.display())]
    DuplicatePath {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("{file}: no region has a gateway, so no certificate is needed")]
    NoGatewayRegions { file: String },
    #[error("{file}: no [tls] section (hint: `ferry certs init --topology {file}` creates the files and prints the section)")]
    NoTls { file: String },
    #[error("{file}: [tls] has no certificate for region `{region}` (regions with one: {known})")]
    NoRegionTls {
        file: String,
        region: String,
        known: String,
    },
    #[error("{}: {what}: {source}", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate in the file (expected `-----BEGIN CERTIFICATE-----`)", path.display())]
    NoCertificates { path: PathBuf },
    #[error("{}: no private key in the file (expected `-----BEGIN PRIVATE KEY-----`)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: not a usable certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error(
        "{}: the certificate is for {found}, not {expected} (region `{region}`)",
        path.display()
    )]
    WrongName {
        path: PathBuf,
        region: String,
        expected: String,
        found: String,
    },
    #[error("{}: the certificate is for {found}, not an operator (`NAME.{OPERATOR_SUFFIX}`; hint: `ferry certs operator` issues one)", path.display())]
    NotOperator { path: PathBuf, found: String },
    #[error("{}: the certificate is not signed by the CA in {}: {reason}", cert.display(), ca.display())]
    NotSignedByCa {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Generating
// ---------------------------------------------------------------------------------------------

/// A certificate authority held in memory: its self-signed certificate and its signing key.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - TimeDuration::days(1);
    params.not_after = now + TimeDuration::days(VALIDITY_DAYS);
}

/// A private key as PEM, in the PKCS#8 v1 form (`PRIVATE KEY` holding only the Ed25519 seed)
/// that OpenSSL 3.0 (curl, Python's `ssl`) reads as well as rustls; the v2 form with the public
/// key, which ring writes, is refused by OpenSSL 3.0 ("unsupported").
fn key_pem(key: &KeyPair) -> String {
    const V2_PREFIX: [u8; 16] = [
        0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    const V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let der = key.serialize_der();
    if der.len() >= 48 && der[..16] == V2_PREFIX {
        let mut v1 = V1_PREFIX.to_vec();
        v1.extend_from_slice(&der[16..48]);
        let lf = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
        return pem::encode_config(&pem::Pem::new("PRIVATE KEY", v1), lf);
    }
    key.serialize_pem()
}

fn ed25519_key(what: &str) -> Result<KeyPair, CertError> {
    KeyPair::generate_for(&PKCS_ED25519).map_err(|source| CertError::Generate {
        what: format!("the {what} key"),
        source,
    })
}

impl Ca {
    /// A new self-signed CA named `common_name` with an Ed25519 key; it may sign end-entity
    /// certificates only (path length 0).
    pub fn generate(common_name: &str) -> Result<Ca, CertError> {
        let gen_err = |source| CertError::Generate {
            what: "the CA certificate".into(),
            source,
        };
        let key = ed25519_key("CA")?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Ferry");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key_pem(&key),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key (needed only to issue more certificates; the gateways never read it).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for `region` (SAN and common name `<region>.ferry`, client and server
    /// authentication) with a fresh Ed25519 key, signed by this CA.
    pub fn issue(&self, region: &str) -> Result<Issued, CertError> {
        self.issue_leaf(
            &region_dns_name(region),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// An end-entity certificate for the DNS name `name` (also its common name) with a fresh
    /// Ed25519 key and the given extended key usages, signed by this CA.
    fn issue_leaf(
        &self,
        name: &str,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Issued, CertError> {
        let gen_err = |source| CertError::Generate {
            what: format!("the certificate for {name}"),
            source,
        };
        let key = ed25519_key(name)?;
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(gen_err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Ferry");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key_pem(&key),
        })
    }
}

impl Ca {
    /// Load a CA from its certificate and private key (PEM), to issue more certificates.
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, CertError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CertError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let bad = |p: &Path, e: rcgen::Error| CertError::BadCertificate {
            path: p.to_path_buf(),
            reason: e.to_string(),
        };
        let pair = KeyPair::from_pem(&key_pem).map_err(|e| bad(key, e))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, pair).map_err(|e| bad(cert, e))?;
        Ok(Ca {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// A certificate for the operator `name` (SAN `<name>.operator.ferry`, client
    /// authentication only) with a fresh Ed25519 key, signed by this CA. It opens the admin API
    /// and the brokers' internal requests of every region of the topology.
    pub fn issue_operator(&self, name: &str) -> Result<Issued, CertError> {
        self.issue_leaf(
            &operator_dns_name(name),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )
    }
}

/// Valid operator names: what a region name may be (`[a-z][a-z0-9_-]*`, at most 64).
pub fn valid_operator_name(name: &str) -> bool {
    let mut c = name.chars();
    matches!(c.next(), Some('a'..='z'))
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 64
}

/// Write one operator's certificate and key (`ferry certs operator`), refusing to overwrite
/// unless `force`.
pub fn write_operator(
    ca: &Ca,
    name: &str,
    cert: &Path,
    key: &Path,
    force: bool,
) -> Result<(), CertError> {
    if !force {
        let existing: Vec<PathBuf> = [cert, key]
            .iter()
            .filter(|p| p.exists())
            .map(|p| p.to_path_buf())
            .collect();
        if !existing.is_empty() {
            return Err(CertError::Exists { paths: existing });
        }
    }
    let issued = ca.issue_operator(name)?;
    write_file(cert, issued.cert_pem.as_bytes(), false, force)?;
    write_file(key, issued.key_pem.as_bytes(), true, force)
}

/// One file written by [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    pub path: PathBuf,
    /// e.g. `CA certificate`, `certificate for east (east.ferry)`.
    pub what: String,
}

/// What [`init`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// In writing order: CA certificate, CA key, the operator's certificate and key, then each
    /// region's certificate and key.
    pub written: Vec<WrittenFile>,
    /// The CA's private key (not named by `[tls]`: written beside the CA certificate).
    pub ca_key: PathBuf,
    /// When the topology has no `[tls]` section: the section to paste into it, with paths
    /// relative to the topology file's directory.
    pub tls_section: Option<String>,
}

/// Create a CA and, per region, a certificate and key signed by it, as PEM files.
///
/// When the topology has `[tls]`, exactly the files it names are written (each region listed
/// there), plus the CA key beside the CA certificate (`ca.pem` -> `ca.key`). Without `[tls]`,
/// `out_dir` receives `ca.pem`, `ca.key`, `<region>.pem` and `<region>.key` for every region
/// with a gateway, and [`InitReport::tls_section`] is the section to add to the topology.
/// Existing files are refused (all of them listed, nothing written) unless `force`.
pub fn init(topology: &Topology, out_dir: &Path, force: bool) -> Result<InitReport, CertError> {
    let file = topology.file.display().to_string();
    let (ca_cert, regions): (PathBuf, Vec<RegionTls>) = match &topology.tls {
        Some(tls) => (tls.ca.clone(), tls.regions.clone()),
        None => {
            let regions: Vec<RegionTls> = topology
                .regions
                .iter()
                .filter(|r| r.gateway.is_some())
                .map(|r| RegionTls {
                    region: r.name.clone(),
                    cert: out_dir.join(format!("{}.pem", r.name)),
                    key: out_dir.join(format!("{}.key", r.name)),
                })
                .collect();
            if regions.is_empty() {
                return Err(CertError::NoGatewayRegions { file });
            }
            (out_dir.join("ca.pem"), regions)
        }
    };
    let ca_key = ca_key_path(&ca_cert);
    let (op_cert, op_key) = default_operator_paths(&ca_cert);

    // The plan: every path once.
    let mut plan: Vec<(PathBuf, String)> = vec![
        (ca_cert.clone(), "CA certificate".into()),
        (ca_key.clone(), "CA private key".into()),
        (
            op_cert.clone(),
            format!(
                "operator certificate ({})",
                operator_dns_name(DEFAULT_OPERATOR)
            ),
        ),
        (op_key.clone(), "operator private key".into()),
    ];
    for r in &regions {
        let name = region_dns_name(&r.region);
        plan.push((
            r.cert.clone(),
            format!("certificate for {} ({name})", r.region),
        ));
        plan.push((r.key.clone(), format!("private key for {}", r.region)));
    }
    for (i, (p, what)) in plan.iter().enumerate() {
        if let Some((_, first)) = plan[..i].iter().find(|(q, _)| same_path(p, q)) {
            return Err(CertError::DuplicatePath {
                path: p.clone(),
                first: first.clone(),
                second: what.clone(),
            });
        }
    }
    if !force {
        let existing: Vec<PathBuf> = plan
            .iter()
            .filter(|(p, _)| p.exists())
            .map(|(p, _)| p.clone())
            .collect();
        if !existing.is_empty() {
            return Err(CertError::Exists { paths: existing });
        }
    }

    // Generate everything before writing anything.
    let ca = Ca::generate("Ferry gateway CA")?;
    let operator = ca.issue_operator(DEFAULT_OPERATOR)?;
    let mut contents: Vec<(String, bool)> = vec![
        (ca.cert_pem().to_string(), false),
        (ca.key_pem().to_string(), true),
        (operator.cert_pem, false),
        (operator.key_pem, true),
    ];
    for r in &regions {
        let issued = ca.issue(&r.region)?;
        contents.push((issued.cert_pem, false));
        contents.push((issued.key_pem, true));
    }

    let mut written = Vec::new();
    for ((path, what), (text, secret)) in plan.into_iter().zip(contents) {
        write_file(&path, text.as_bytes(), secret, force)?;
        written.push(WrittenFile { path, what });
    }

    let tls_section = topology.tls.is_none().then(|| {
        let base = topology_dir(&topology.file);
        let rel = |p: &Path| toml::Value::String(relative_to(p, &base)).to_string();
        let mut s = String::from("[tls]\n");
        s.push_str(&format!("ca = {}\n", rel(&ca_cert)));
        for r in &regions {
            s.push_str(&format!("\n[tls.regions.{}]\n", r.region));
            s.push_str(&format!("cert = {}\n", rel(&r.cert)));
            s.push_str(&format!("key = {}\n", rel(&r.key)));
        }
        s
    });
    Ok(InitReport {
        written,
        ca_key,
        tls_section,
    })
}

/// `ca.pem` -> `ca.key`; a CA certificate already named `*.key` gets `.key` appended.
fn ca_key_path(ca_cert: &Path) -> PathBuf {
    if ca_cert.extension().is_some_and(|e| e == "key") {
        let mut s: OsString = ca_cert.as_os_str().to_owned();
        s.push(".key");
        PathBuf::from(s)
    } else {
        ca_cert.with_extension("key")
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    normalize(&absolute(a)) == normalize(&absolute(b))
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

/// Drop `.` and resolve `..` lexically.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn topology_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `target` relative to `base` (both resolved through the file system where they exist), with
/// `/` separators; absolute when they share nothing but the root.
fn relative_to(target: &Path, base: &Path) -> String {
    let canon = |p: &Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| {
            // The file itself may not exist; its directory does once it is written.
            match (p.parent(), p.file_name()) {
                (Some(d), Some(f)) => std::fs::canonicalize(d)
                    .map(|d| d.join(f))
                    .unwrap_or_else(|_| normalize(&absolute(p))),
                _ => normalize(&absolute(p)),
            }
        })
    };
    let t = canon(target);
    let b = canon(base);
    let tc: Vec<Component> = t.components().collect();
    let bc: Vec<Component> = b.components().collect();
    let common = tc.iter().zip(&bc).take_while(|(x, y)| x == y).count();
    if common <= 1 {
        return t.display().to_string();
    }
    let mut parts: Vec<String> = Vec::new();
    parts.extend(std::iter::repeat_n("..".to_string(), bc.len() - common));
    parts.extend(
        tc[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

fn write_file(path: &Path, data: &[u8], secret: bool, force: bool) -> Result<(), CertError> {
    let io_err = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            CertError::Exists {
                paths: vec![path.to_path_buf()],
            }
        } else {
            io_err(e)
        }
    })?;
    #[cfg(unix)]
    if secret && force {
        // An existing file keeps its mode on open: tighten it.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err)?;
    }
    f.write_all(data).map_err(io_err)?;
    f.sync_all().map_err(io_err)
}

/// Read a topology for `ferry certs init`: like [`topology::load`], except that files named by
/// `[tls]` may be missing (they are what `init` creates). Every other error is returned as is.
pub fn load_topology_for_init(path: &Path) -> Result<Topology, Vec<TopologyError>> {
    let errors = match topology::load(path) {
        Ok(t) => return Ok(t),
        Err(errors) => errors,
    };
    let missing_file =
        |e: &TopologyError| e.field.starts_with("tls.") && e.message.ends_with("not found");
    if !errors.iter().all(missing_file) {
        return Err(errors);
    }
    // Only missing [tls] files: check everything else without the section, then read the
    // (already validated) paths from it.
    let text = std::fs::read_to_string(path).map_err(|_| errors.clone())?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|_| errors.clone())?;
    let tls = table.remove("tls");
    let stripped = toml::to_string(&table).map_err(|_| errors.clone())?;
    let base = topology_dir(path);
    let name = path.display().to_string();
    let mut t = topology::parse(&stripped, &name, &base)?;
    t.file = path.to_path_buf();
    let tls = tls.as_ref().and_then(|v| v.as_table());
    let ca = tls
        .and_then(|t| t.get("ca"))
        .and_then(|v| v.as_str())
        .ok_or_else(|| errors.clone())?;
    let mut regions = Vec::new();
    if let Some(rs) = tls
        .and_then(|t| t.get("regions"))
        .and_then(|v| v.as_table())
    {
        for (region, v) in rs {
            let get = |k: &str| v.get(k).and_then(|v| v.as_str()).map(|s| base.join(s));
            match (get("cert"), get("key")) {
                (Some(cert), Some(key)) => regions.push(RegionTls {
                    region: region.clone(),
                    cert,
                    key,
                }),
                _ => return Err(errors),
            }
        }
    }
    // Keep file order (toml::Table may sort keys).
    regions.sort_by_key(|r| t.regions.iter().position(|x| x.name == r.region));
    t.tls = Some(Tls {
        ca: base.join(ca),
        regions,
    });
    Ok(t)
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// What a region's gateway needs for mutual TLS.
pub struct RegionMaterial {
    pub region: String,
    /// The CA certificates peers are verified against (the topology's CA).
    pub ca: Vec<CertificateDer<'static>>,
    /// The region's certificate first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for RegionMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionMaterial")
            .field("region", &self.region)
            .field("ca", &self.ca.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Clone for RegionMaterial {
    fn clone(&self) -> Self {
        RegionMaterial {
            region: self.region.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The material of `region` from the files the topology's `[tls]` names.
pub fn load_region(topology: &Topology, region: &str) -> Result<RegionMaterial, CertError> {
    let file = topology.file.display().to_string();
    let tls = topology
        .tls
        .as_ref()
        .ok_or(CertError::NoTls { file: file.clone() })?;
    let r = tls.region(region).ok_or_else(|| CertError::NoRegionTls {
        file,
        region: region.to_string(),
        known: tls
            .regions
            .iter()
            .map(|r| r.region.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    load_material(region, &tls.ca, &r.cert, &r.key)
}

/// Read a region's CA certificate(s), certificate chain and private key from PEM files, and
/// check that the certificate is for `<region>.ferry`, is signed by the CA, and is valid now.
pub fn load_material(
    region: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<RegionMaterial, CertError> {
    load_checked(region, ca, cert, key, |leaf| {
        let expected = region_dns_name(region);
        if cert_is_for(leaf, &expected) {
            Ok(())
        } else {
            Err(CertError::WrongName {
                path: cert.to_path_buf(),
                region: region.to_string(),
                expected,
                found: names_of(leaf),
            })
        }
    })
}

/// An operator's material (`ferry failover`, `drill`, `status`, `quarantine` present it): the
/// certificate must be an operator's (`<name>.operator.ferry`) and signed by the CA. The
/// material's `region` field holds the operator's DNS name.
pub fn load_operator(ca: &Path, cert: &Path, key: &Path) -> Result<RegionMaterial, CertError> {
    let mut name = String::new();
    let mut m = load_checked("operator", ca, cert, key, |leaf| {
        match leaf
            .valid_dns_names()
            .find(|n| operator_name_of(n).is_some())
        {
            Some(n) => {
                name = n.to_string();
                Ok(())
            }
            None => Err(CertError::NotOperator {
                path: cert.to_path_buf(),
                found: names_of(leaf),
            }),
        }
    })?;
    m.region = name;
    Ok(m)
}

/// `alice` for `alice.operator.ferry`; `None` for any other name.
pub fn operator_name_of(dns: &str) -> Option<&str> {
    let name = dns.strip_suffix(OPERATOR_SUFFIX)?.strip_suffix('.')?;
    valid_operator_name(name).then_some(name)
}

fn load_checked(
    region: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    mut check_name: impl FnMut(&webpki::EndEntityCert<'_>) -> Result<(), CertError>,
) -> Result<RegionMaterial, CertError> {
    let ca_certs = read_certs(ca, "CA certificate")?;
    let chain = read_certs(cert, "certificate")?;
    let key_der = match PrivateKeyDer::from_pem_file(key) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(CertError::NoKey {
                path: key.to_path_buf(),
            })
        }
        Err(rustls::pki_types::pem::Error::Io(source)) => {
            return Err(CertError::Io {
                path: key.to_path_buf(),
                source,
            })
        }
        Err(source) => {
            return Err(CertError::Pem {
                path: key.to_path_buf(),
                what: "private key",
                source,
            })
        }
    };

    let leaf =
        webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| CertError::BadCertificate {
            path: cert.to_path_buf(),
            reason: e.to_string(),
        })?;
    check_name(&leaf)?;
    let anchors = ca_certs
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c).map_err(|e| CertError::BadCertificate {
                path: ca.to_path_buf(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    leaf.verify_for_usage(
        algs,
        &anchors,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| CertError::NotSignedByCa {
        cert: cert.to_path_buf(),
        ca: ca.to_path_buf(),
        reason: e.to_string(),
    })?;

    Ok(RegionMaterial {
        region: region.to_string(),
        ca: ca_certs,
        chain,
        key: key_der,
    })
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(source) => CertError::Io {
            path: path.to_path_buf(),
            source,
        },
        source => CertError::Pem {
            path: path.to_path_buf(),
            what,
            source,
        },
    })?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            path: path.to_path_buf(),
            what,
            source,
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Whether the certificate is valid for the DNS name `name` (webpki's matching rules).
pub(crate) fn cert_is_for(cert: &webpki::EndEntityCert<'_>, name: &str) -> bool {
    match DnsName::try_from(name.to_string()) {
        Ok(dns) => cert
            .verify_is_valid_for_subject_name(&ServerName::DnsName(dns))
            .is_ok(),
        Err(_) => false,
    }
}

/// The DNS names a certificate presents, for messages (`(none)` when it has none).
pub(crate) fn names_of(cert: &webpki::EndEntityCert<'_>) -> String {
    let names: BTreeSet<&str> = cert.valid_dns_names().collect();
    if names.is_empty() {
        "(no DNS name)".into()
    } else {
        names.into_iter().collect::<Vec<_>>().join(", ")
    }
}
