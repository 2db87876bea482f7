//! Mutual TLS for the federation: who a peer is, decided once per connection.
//!
//! The server side accepts a client only if its certificate chains to the federation CA,
//! carries exactly one `urn:corridor:org:<id>` URI naming a directory member, and its
//! SHA-256 fingerprint equals the one the directory lists for that member. The result —
//! the peer's org id — is attached to the connection ([`PeerInfo`]) and read by handlers
//! from the request extensions, so no certificate is parsed per request.
//!
//! The client side (delivery) checks the server the same way against the org it means to
//! reach, so an envelope header is never shown to anyone else.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use corridor::{Directory, OrgId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::keys::read_secret_file;

/// The authenticated peer of a federation connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub org: OrgId,
    pub remote: SocketAddr,
}

/// Why a peer certificate does not identify a member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("certificate cannot be parsed")]
    Unparseable,
    #[error("certificate carries no urn:corridor:org URI")]
    NoOrgUri,
    #[error("certificate carries more than one urn:corridor:org URI")]
    SeveralOrgUris,
    #[error("certificate org URI is malformed")]
    BadOrgUri,
    #[error("org {0} is not a member of the federation")]
    NotAMember(OrgId),
    #[error("certificate of {0} does not match the directory's fingerprint")]
    FingerprintMismatch(OrgId),
    #[error("certificate names {found}, expected {expected}")]
    WrongOrg { found: OrgId, expected: OrgId },
}

/// The org id a certificate claims, from its subjectAltName URIs.
pub fn org_of_certificate(cert: &CertificateDer<'_>) -> Result<OrgId, PeerError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| PeerError::Unparseable)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| PeerError::Unparseable)?
        .ok_or(PeerError::NoOrgUri)?;
    let mut orgs = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(corridor::org::ORG_URI_PREFIX) => Some(*uri),
            _ => None,
        });
    let first = orgs.next().ok_or(PeerError::NoOrgUri)?;
    if orgs.next().is_some() {
        return Err(PeerError::SeveralOrgUris);
    }
    OrgId::from_uri(first).map_err(|_| PeerError::BadOrgUri)
}

/// The member a certificate identifies: org URI names a member and the fingerprint matches.
pub fn member_of_certificate(
    directory: &Directory,
    cert: &CertificateDer<'_>,
) -> Result<OrgId, PeerError> {
    let org = org_of_certificate(cert)?;
    let member = directory
        .get(&org)
        .ok_or_else(|| PeerError::NotAMember(org.clone()))?;
    if corridor::canonical::sha256(cert.as_ref()) != member.cert_sha256 {
        return Err(PeerError::FingerprintMismatch(org));
    }
    Ok(org)
}

fn refused(error: PeerError) -> rustls::Error {
    tracing::warn!(reason = %error, "refused peer certificate");
    rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
}

/// Chain validation by webpki, then directory membership and fingerprint.
#[derive(Debug)]
struct MemberClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    directory: Arc<Directory>,
}

impl ClientCertVerifier for MemberClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        member_of_certificate(&self.directory, end_entity).map_err(refused)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Chain validation by webpki, then the expected org and its directory fingerprint.
#[derive(Debug)]
pub struct MemberServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    directory: Arc<Directory>,
    expected: OrgId,
}

impl ServerCertVerifier for MemberServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let org = member_of_certificate(&self.directory, end_entity).map_err(refused)?;
        if org != self.expected {
            return Err(refused(PeerError::WrongOrg {
                found: org,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("TLS configuration is invalid: {0}")]
    Rustls(String),
}

/// The TLS material every federation connection uses, loaded once at start.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub roots: Arc<RootCertStore>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub chain: Vec<CertificateDer<'static>>,
}

impl TlsMaterial {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsSetupError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| TlsSetupError::Read {
                path: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let ca_pem = read(ca)?;
        let cert_pem = read(cert)?;
        let key_pem = read_secret_file(key).map_err(|e| TlsSetupError::Read {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.map_err(|e| TlsSetupError::Read {
                path: ca.display().to_string(),
                reason: e.to_string(),
            })?;
            roots
                .add(c)
                .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsSetupError::Read {
                path: ca.display().to_string(),
                reason: "no certificate in file".into(),
            });
        }
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsSetupError::Read {
                path: cert.display().to_string(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsSetupError::Read {
                path: cert.display().to_string(),
                reason: "no certificate in file".into(),
            });
        }
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsSetupError::Read {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            ca_pem,
            roots: Arc::new(roots),
            cert_pem,
            key_pem,
            chain,
        })
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
        PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))
    }

    /// The rustls server configuration of the federation listener.
    pub fn server_config(
        &self,
        directory: Arc<Directory>,
    ) -> Result<rustls::ServerConfig, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        let verifier = Arc::new(MemberClientVerifier { inner, directory });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key()?)
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// A server verifier that accepts only `expected`'s certificate.
    pub fn server_verifier(
        &self,
        directory: Arc<Directory>,
        expected: OrgId,
    ) -> Result<Arc<MemberServerVerifier>, TlsSetupError> {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        Ok(Arc::new(MemberServerVerifier {
            inner,
            directory,
            expected,
        }))
    }
}

/// A TLS connection from an authenticated member.
pub struct FederationConn {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
    _permit: OwnedSemaphorePermit,
    _member_permit: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for FederationConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for FederationConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for FederationConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// TLS handshakes in progress at once, and from one address. A client that has not
/// proved it is a member holds no connection slot, and one address cannot take every
/// handshake: otherwise anyone able to open TCP connections could keep members out by
/// opening connections and never finishing their handshakes.
const MAX_HANDSHAKES: usize = 256;
const MAX_HANDSHAKES_PER_ADDRESS: usize = 32;
/// Connections one member may hold open at once. A node sends over one connection per
/// member and opens a few more for witnesses and auditors; a member holding more is
/// refused, so that no member can take every slot of `max_connections` from the others.
pub const MAX_CONNECTIONS_PER_MEMBER: usize = 16;

/// Handshakes in progress, in all and per address.
struct Handshakes {
    all: Arc<Semaphore>,
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One handshake's place; given back when dropped.
struct HandshakeSlot {
    _all: OwnedSemaphorePermit,
    address: IpAddr,
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Handshakes {
    fn new() -> Self {
        Self {
            all: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            by_address: Default::default(),
        }
    }

    /// A place for a handshake from `address`, if there is one.
    fn enter(&self, address: IpAddr) -> Option<HandshakeSlot> {
        let address = handshake_source(address);
        let all = self.all.clone().try_acquire_owned().ok()?;
        let mut by_address = self.by_address.lock().ok()?;
        let count = by_address.entry(address).or_insert(0);
        if *count >= MAX_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(HandshakeSlot {
            _all: all,
            address,
            by_address: self.by_address.clone(),
        })
    }
}

/// The source a handshake counts against: an IPv4 address, or an IPv6 address's /64, which
/// one client is commonly given whole (counted by address, it could take every place).
fn handshake_source(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if let Ok(mut by_address) = self.by_address.lock()
            && let Some(count) = by_address.get_mut(&self.address)
        {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

/// Accepts TCP connections, runs each TLS handshake in its own task with a timeout, and
/// yields the connections of authenticated members. At most `max_connections` members'
/// connections are open at once, [`MAX_CONNECTIONS_PER_MEMBER`] of them one member's; a
/// handshake takes a slot only once it has succeeded,
/// and at most [`MAX_HANDSHAKES`] (from one address, or IPv6 /64,
/// [`MAX_HANDSHAKES_PER_ADDRESS`]) run at
/// once. A connection that finds no place is closed at once; members retry.
pub fn accept_members(
    listener: TcpListener,
    config: rustls::ServerConfig,
    directory: Arc<Directory>,
    handshake_timeout: Duration,
    max_connections: usize,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<FederationConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let limit = Arc::new(Semaphore::new(max_connections));
    let per_member: Arc<HashMap<OrgId, Arc<Semaphore>>> = Arc::new(
        directory
            .members()
            .map(|m| {
                let slots = Semaphore::new(MAX_CONNECTIONS_PER_MEMBER);
                (m.id.clone(), Arc::new(slots))
            })
            .collect(),
    );
    let handshakes = Handshakes::new();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = handshakes.enter(remote.ip()) else {
                tracing::info!(%remote, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, directory, tx, limit, per_member) = (
                acceptor.clone(),
                directory.clone(),
                tx.clone(),
                limit.clone(),
                per_member.clone(),
            );
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::info!(%remote, %error, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                drop(slot);
                let org = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .ok_or(PeerError::NoOrgUri)
                    .and_then(|cert| member_of_certificate(&directory, cert));
                let org = match org {
                    Ok(org) => org,
                    Err(error) => {
                        tracing::warn!(%remote, %error, "connection without member identity");
                        return;
                    }
                };
                if !directory.is_current(crate::node::now_ms()) {
                    // Members keep trying: say so once a minute, not at every attempt.
                    if expired_warning_due() {
                        tracing::warn!(%remote, peer = %org, "the federation directory has expired: connections are closed until a newer one is installed");
                    }
                    return;
                }
                let Some(member_permit) = per_member
                    .get(&org)
                    .and_then(|slots| slots.clone().try_acquire_owned().ok())
                else {
                    tracing::warn!(%remote, peer = %org, limit = MAX_CONNECTIONS_PER_MEMBER, "member holds as many federation connections as it may; connection closed");
                    return;
                };
                let Ok(permit) = limit.try_acquire_owned() else {
                    tracing::warn!(%remote, peer = %org, "federation connection limit reached; connection closed");
                    return;
                };
                tracing::debug!(%remote, peer = %org, "member connected");
                let conn = FederationConn {
                    stream,
                    info: PeerInfo { org, remote },
                    _permit: permit,
                    _member_permit: member_permit,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether the warning that the directory has expired is due: at most once a minute.
fn expired_warning_due() -> bool {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST_MS: AtomicI64 = AtomicI64::new(i64::MIN);
    let now = crate::node::now_ms();
    let last = LAST_MS.load(Ordering::Relaxed);
    now.saturating_sub(last) >= 60_000
        && LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One IPv6 /64 has as many handshake places as one IPv4 address; another /64, and
    /// an IPv4 address mapped into IPv6, count on their own.
    #[test]
    fn handshakes_from_one_ipv6_prefix_count_together() {
        let handshakes = Handshakes::new();
        let mut held = Vec::new();
        for n in 0..MAX_HANDSHAKES_PER_ADDRESS as u16 {
            let address: IpAddr = format!("2001:db8:1:2::{:x}", n + 1).parse().unwrap();
            held.push(handshakes.enter(address).expect("a place"));
        }
        let same_prefix: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert!(
            handshakes.enter(same_prefix).is_none(),
            "the /64 has no place left"
        );
        let other_prefix: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(handshakes.enter(other_prefix).is_some());
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(
            handshake_source(mapped),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        held.pop();
        assert!(
            handshakes.enter(same_prefix).is_some(),
            "a place given back"
        );
    }
}
