//! rustls configurations for SPIFFE mutual TLS: certificates come from the
//! current SVID (so rotation applies to new connections), peers are verified
//! by chaining to the trust bundle and checking their SPIFFE ID. Host names
//! are never checked: SVIDs may carry only a URI SAN.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::spiffe::{Role, SpiffeId, validate_trust_domain};
use super::svid::{SvidSource, Trust, anchors};
use super::trust::TrustRoots;
use super::{Error, Result};

const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The ring crypto provider every configuration in this module uses.
pub(super) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn parse_cert<'a>(cert: &'a CertificateDer<'_>, context: &str) -> Result<X509Certificate<'a>> {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, parsed)| parsed)
        .map_err(|e| Error::BadCertificate {
            context: context.to_string(),
            reason: e.to_string(),
        })
}

/// The certificate's one URI SAN, as a SPIFFE ID. X509-SVID §2: exactly one URI SAN, and
/// validators must reject more than one, whatever their scheme (other SAN types may be there).
fn uri_san_id(parsed: &X509Certificate<'_>, context: &str) -> Result<SpiffeId> {
    let ident_err = |reason: String| Error::CertificateIdentity {
        context: context.to_string(),
        reason,
    };
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| ident_err(format!("malformed subjectAltName extension: {e}")))?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(ident_err("no spiffe:// URI SAN (not an X.509 SVID)".into())),
        [one] => SpiffeId::parse(one).map_err(|e| ident_err(e.to_string())),
        many => Err(ident_err(format!(
            "{} URI SANs; an X509-SVID must have exactly one, its SPIFFE ID",
            many.len()
        ))),
    }
}

/// A certificate breaking the X509-SVID rules for its place in the chain.
fn not_svid(context: &str, what: &str, reason: &str) -> Error {
    Error::BadCertificate {
        context: context.to_string(),
        reason: format!("not a valid X509-SVID {what}: {reason}"),
    }
}

/// The SPIFFE ID of a leaf X509-SVID, checked against the leaf rules of the SPIFFE X509-SVID
/// standard (§3.1, §4.1, §4.3, §5.2), for peers and for our own SVID alike:
///
/// - exactly one URI SAN, and it is a SPIFFE ID;
/// - the ID has a path: an ID with none names a trust domain, never a workload;
/// - basicConstraints cA is false (or the extension is absent);
/// - keyUsage is present, includes digitalSignature and includes neither keyCertSign nor
///   cRLSign.
///
/// `context` names the certificate in errors.
pub(super) fn peer_spiffe_id_in(cert: &CertificateDer<'_>, context: &str) -> Result<SpiffeId> {
    let parsed = parse_cert(cert, context)?;
    let id = uri_san_id(&parsed, context)?;
    if id.path().is_empty() {
        return Err(Error::CertificateIdentity {
            context: context.to_string(),
            reason: format!(
                "{id} has no path: it names a trust domain, not a workload (an X509-SVID leaf's \
                 SPIFFE ID must have a path)"
            ),
        });
    }
    let leaf = |reason: &str| not_svid(context, "leaf", reason);
    match parsed.basic_constraints() {
        Err(e) => return Err(leaf(&format!("malformed basicConstraints: {e}"))),
        Ok(Some(bc)) if bc.value.ca => {
            return Err(leaf("it is a CA certificate (basicConstraints cA is true)"));
        }
        Ok(_) => {}
    }
    let ku = match parsed.key_usage() {
        Err(e) => return Err(leaf(&format!("malformed keyUsage: {e}"))),
        Ok(None) => return Err(leaf("it has no keyUsage extension")),
        Ok(Some(ku)) => ku.value,
    };
    if ku.key_cert_sign() || ku.crl_sign() {
        return Err(leaf(
            "its keyUsage allows signing certificates or CRLs (keyCertSign or cRLSign)",
        ));
    }
    if !ku.digital_signature() {
        return Err(leaf("its keyUsage lacks digitalSignature"));
    }
    Ok(id)
}

/// Checks a signing certificate of an SVID chain (an intermediate), X509-SVID §3.2, §4.1,
/// §4.3: basicConstraints cA is true and keyUsage includes keyCertSign.
pub(super) fn check_signing_cert(cert: &CertificateDer<'_>, context: &str) -> Result<()> {
    let parsed = parse_cert(cert, context)?;
    let signing = |reason: &str| not_svid(context, "signing certificate", reason);
    match parsed.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err(signing("it is not a CA (basicConstraints cA is not true)")),
        Err(e) => return Err(signing(&format!("malformed basicConstraints: {e}"))),
    }
    match parsed.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => Ok(()),
        Ok(Some(_)) => Err(signing("its keyUsage lacks keyCertSign")),
        Ok(None) => Err(signing("it has no keyUsage extension")),
        Err(e) => Err(signing(&format!("malformed keyUsage: {e}"))),
    }
}

/// The SPIFFE ID of a CA certificate, which names a trust domain (no path needed).
pub(super) fn ca_spiffe_id(cert: &CertificateDer<'_>, context: &str) -> Result<SpiffeId> {
    check_signing_cert(cert, context)?;
    uri_san_id(&parse_cert(cert, context)?, context)
}

/// The SPIFFE ID of a peer, from the leaf (first) certificate of its chain,
/// e.g. `conn.peer_certificates()`.
pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Result<SpiffeId> {
    match certs.first() {
        Some(leaf) => peer_spiffe_id_in(leaf, "peer certificate"),
        None => Err(Error::CertificateIdentity {
            context: "peer certificate".into(),
            reason: "the peer presented no certificate".into(),
        }),
    }
}

/// What a server demands of client certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A verified client certificate whose SPIFFE ID has one of these roles is
    /// required at the handshake; anything else fails the handshake (Keeper).
    Require(Vec<Role>),
    /// Ask for a client certificate and verify it if presented, but let
    /// connections without one through; authorization happens per request
    /// (Nexus).
    Optional,
}

/// What a client demands of the server's SPIFFE ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// The server must have this role in the trust domain.
    Role(Role),
    /// Any SPIFFE ID in the trust domain.
    Any,
}

/// Carries an [`Error`] inside a rustls error; its `Debug` is the readable
/// message, because rustls displays the inner error with `{:?}`.
struct Reason(Error);

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Reason {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn other_error(e: Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Reason(e)))))
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let ce = match e {
        W::BadDer | W::BadDerTime | W::TrailingData(_) => CertificateError::BadEncoding,
        W::CertExpired { .. } | W::InvalidCertValidity => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// Verifies a peer's SVID: reads its SPIFFE ID (X509-SVID leaf rules included), checks the
/// chain against the CAs `anchors_for` gives for that ID's trust domain (so a federated CA
/// cannot vouch for another trust domain's IDs) and the signing-certificate rules on its
/// intermediates, then finds its role under `trust`. An ID whose trust domain no
/// `SPIKE_TRUST_ROOT*` list names is refused. The server's client verifier and the client's
/// server verifier both call it.
fn verify_svid<'a>(
    anchors_for: impl Fn(&str) -> &'a [TrustAnchor<'static>],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
    trust: &TrustRoots,
) -> std::result::Result<(SpiffeId, Role), rustls::Error> {
    let id = peer_spiffe_id_in(end_entity, "peer certificate").map_err(other_error)?;
    let roots = anchors_for(id.trust_domain());
    if roots.is_empty() {
        return Err(other_error(Error::NoBundleFor {
            id: id.to_string(),
            trust_domain: id.trust_domain().to_string(),
        }));
    }
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    let path = cert
        .verify_for_usage(
            algorithms().all,
            roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
    // webpki checks the path (RFC 5280) but not key usage; the X509-SVID rules add it.
    for ca in path.intermediate_certificates() {
        check_signing_cert(&ca.der(), "peer intermediate certificate").map_err(other_error)?;
    }
    match trust.role_of(&id) {
        Some(role) => Ok((id, role)),
        None => Err(other_error(Error::ForeignTrustDomain {
            id: id.to_string(),
            expected: trust.all_domains().join(" or "),
        })),
    }
}

fn role_error(id: &SpiffeId, trust: &TrustRoots, allowed: &[Role]) -> rustls::Error {
    other_error(Error::PeerNotAllowed {
        id: id.to_string(),
        reason: trust.explain_refusal(id, allowed),
    })
}

#[derive(Debug)]
struct ServerResolver(Arc<SvidSource>);

impl ResolvesServerCert for ServerResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(self.0.current().certified_key()))
    }
}

#[derive(Debug)]
struct ClientResolver(Arc<SvidSource>);

impl ResolvesClientCert for ClientResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(self.0.current().certified_key()))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client SVIDs against the current trust bundles and SPIFFE ID policy.
#[derive(Debug)]
struct SpiffeClientVerifier {
    source: Arc<SvidSource>,
    trust: TrustRoots,
    auth: ClientAuth,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        matches!(self.auth, ClientAuth::Require(_))
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let svid = self.source.current();
        let (id, role) = verify_svid(
            |td| svid.trust_anchors_for(td),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            &self.trust,
        )?;
        if let ClientAuth::Require(roles) = &self.auth
            && !roles.contains(&role)
        {
            return Err(role_error(&id, &self.trust, roles));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Where the server verifier gets its trust anchors.
enum Roots {
    /// The current SVID's bundles.
    Source(Arc<SvidSource>),
    /// A bundle given explicitly, for every configured trust domain.
    Fixed(Trust),
}

/// Verifies server SVIDs: chain to the bundle of the server's trust domain +
/// SPIFFE ID policy; the server name the client connected to is deliberately
/// ignored.
struct SpiffeServerVerifier {
    roots: Roots,
    trust: TrustRoots,
    expected: ExpectedPeer,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("trust", &self.trust)
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let usage = webpki::KeyUsage::server_auth();
        let (id, role) = match &self.roots {
            Roots::Source(source) => {
                let svid = source.current();
                verify_svid(
                    |td| svid.trust_anchors_for(td),
                    end_entity,
                    intermediates,
                    now,
                    usage,
                    &self.trust,
                )?
            }
            Roots::Fixed(roots) => verify_svid(
                |td| roots.anchors_for(td),
                end_entity,
                intermediates,
                now,
                usage,
                &self.trust,
            )?,
        };
        if let ExpectedPeer::Role(want) = self.expected
            && role != want
        {
            return Err(role_error(&id, &self.trust, &[want]));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// A server configuration presenting the current SVID and verifying clients
/// per `auth`, all roles in `trust_domain`. TLS 1.3 and 1.2, ALPN `http/1.1`,
/// ring provider.
pub fn server_config(
    source: &Arc<SvidSource>,
    trust_domain: &str,
    auth: ClientAuth,
) -> Result<Arc<ServerConfig>> {
    validate_trust_domain(trust_domain)?;
    server_config_for(source, &TrustRoots::single(trust_domain)?, auth)
}

/// [`server_config`] with each role's trust domains from `trust`: a client
/// is accepted if its chain verifies against the bundle of its own trust
/// domain and `trust` gives it a role (`Require`: one of the listed roles).
pub fn server_config_for(
    source: &Arc<SvidSource>,
    trust: &TrustRoots,
    auth: ClientAuth,
) -> Result<Arc<ServerConfig>> {
    let verifier = Arc::new(SpiffeClientVerifier {
        source: Arc::clone(source),
        trust: trust.clone(),
        auth,
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ServerResolver(Arc::clone(source))));
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration presenting the current SVID (none if `source` is
/// `None`) and verifying the server against `bundle_override` if given, else
/// the SVID's current trust bundles. The server's SPIFFE ID must be in
/// `trust_domain` and match `expected`. The server name is not checked.
pub fn client_config(
    source: Option<&Arc<SvidSource>>,
    bundle_override: Option<Vec<CertificateDer<'static>>>,
    trust_domain: &str,
    expected: ExpectedPeer,
) -> Result<Arc<ClientConfig>> {
    validate_trust_domain(trust_domain)?;
    client_config_for(
        source,
        bundle_override,
        &TrustRoots::single(trust_domain)?,
        expected,
    )
}

/// [`client_config`] with each role's trust domains from `trust`: the server
/// must hold the expected role under `trust` (`ExpectedPeer::Role(Nexus)`:
/// a trust domain of `SPIKE_TRUST_ROOT_NEXUS`). A `bundle_override` is
/// trusted for every configured trust domain.
pub fn client_config_for(
    source: Option<&Arc<SvidSource>>,
    bundle_override: Option<Vec<CertificateDer<'static>>>,
    trust: &TrustRoots,
    expected: ExpectedPeer,
) -> Result<Arc<ClientConfig>> {
    let roots = match (bundle_override, source) {
        (Some(bundle), _) => {
            if bundle.is_empty() {
                return Err(Error::NoTrustBundle);
            }
            Roots::Fixed(Trust::Shared(anchors(&bundle, "trust bundle")?))
        }
        (None, Some(source)) => Roots::Source(Arc::clone(source)),
        (None, None) => return Err(Error::NoTrustBundle),
    };
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        trust: trust.clone(),
        expected,
    });
    // `dangerous()` is just rustls's name for "custom verifier": this one does
    // full chain verification plus the SPIFFE ID check.
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match source {
        Some(source) => {
            builder.with_client_cert_resolver(Arc::new(ClientResolver(Arc::clone(source))))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
pub(super) mod tests {
    use super::super::pki;
    use super::super::svid::SvidPaths;
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const TD: &str = "spike.ist";

    /// Test PKI: a CA for spike.ist, plus helpers to mint SVIDs.
    struct Pki {
        tmp: tempfile::TempDir,
        ca: PathBuf,
    }

    impl Pki {
        fn new(td: &str) -> Pki {
            let tmp = tempfile::tempdir().unwrap();
            let ca = tmp.path().join("ca");
            pki::init(&ca, td).unwrap();
            Pki { tmp, ca }
        }

        fn dir(&self, name: &str) -> PathBuf {
            self.tmp.path().join(name.replace(['/', ':'], "_"))
        }

        fn svid(&self, id: &str) -> Arc<SvidSource> {
            let out = self.dir(id);
            pki::issue(&self.ca, &SpiffeId::parse(id).unwrap(), &out, &[], &[]).unwrap();
            SvidSource::load(SvidPaths::resolve(Some(out), None, None, None).unwrap()).unwrap()
        }

        fn expired_svid(&self, id: &str) -> Arc<SvidSource> {
            let out = self.dir(id);
            let now = SystemTime::now();
            pki::issue_with_validity(
                &self.ca,
                &SpiffeId::parse(id).unwrap(),
                &out,
                &[],
                &[],
                now - Duration::from_secs(2 * 86_400),
                now - Duration::from_secs(86_400),
            )
            .unwrap();
            SvidSource::load(SvidPaths::resolve(Some(out), None, None, None).unwrap()).unwrap()
        }

        fn ca_pem(&self) -> Vec<u8> {
            std::fs::read(self.ca.join("ca.pem")).unwrap()
        }
    }

    pub(crate) type ServerResult = std::result::Result<Option<SpiffeId>, String>;

    /// Runs a server accepting one connection and a client connecting to it;
    /// returns what the server saw (peer ID) and whether the client got a reply.
    pub(crate) async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> (ServerResult, std::result::Result<(), String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_HTTP1));
            let peer = match tls.get_ref().1.peer_certificates() {
                Some(certs) => Some(peer_spiffe_id(certs).map_err(|e| e.to_string())?),
                None => None,
            };
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            tls.write_all(b"k").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(peer)
        };
        let server_name = ServerName::try_from(name.to_string()).unwrap();
        let client_task = async move {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(server_name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            assert_eq!(&b, b"k");
            Ok(())
        };
        let limit = Duration::from_secs(10);
        let (s, c) = tokio::join!(
            tokio::time::timeout(limit, server_task),
            tokio::time::timeout(limit, client_task)
        );
        (s.expect("server timed out"), c.expect("client timed out"))
    }

    fn client(source: Option<&Arc<SvidSource>>, bundle: Option<&Pki>) -> Arc<ClientConfig> {
        let bundle = bundle.map(|p| {
            CertificateDer::pem_slice_iter(&p.ca_pem())
                .collect::<std::result::Result<Vec<_>, _>>()
                .unwrap()
        });
        client_config(source, bundle, TD, ExpectedPeer::Any).unwrap()
    }

    use rustls::pki_types::pem::PemObject;

    #[tokio::test]
    async fn require_accepts_allowed_role() {
        let pki = Pki::new(TD);
        let keeper = pki.svid("spiffe://spike.ist/spike/keeper/1");
        let nexus = pki.svid("spiffe://spike.ist/spike/nexus");
        let server = server_config(&keeper, TD, ClientAuth::Require(vec![Role::Nexus])).unwrap();
        let client =
            client_config(Some(&nexus), None, TD, ExpectedPeer::Role(Role::Keeper)).unwrap();
        let (s, c) = handshake(server, client, "127.0.0.1").await;
        assert_eq!(
            s.unwrap().unwrap().as_str(),
            "spiffe://spike.ist/spike/nexus"
        );
        c.unwrap();
    }

    async fn assert_refused(server: Arc<ServerConfig>, client: Arc<ClientConfig>, want: &str) {
        let (s, c) = handshake(server, client, "localhost").await;
        let err = s.expect_err("server should refuse");
        assert!(
            err.contains(want),
            "server error {err:?} should contain {want:?}"
        );
        assert!(c.is_err(), "client should fail too");
    }

    #[tokio::test]
    async fn require_refuses_other_roles_and_missing_cert() {
        let pki = Pki::new(TD);
        let keeper = pki.svid("spiffe://spike.ist/spike/keeper");
        let server = server_config(&keeper, TD, ClientAuth::Require(vec![Role::Nexus])).unwrap();
        for id in [
            "spiffe://spike.ist/app/web",
            "spiffe://spike.ist/spike/keeper/2",
            "spiffe://spike.ist/spike/nexusx",
        ] {
            let src = pki.svid(id);
            assert_refused(server.clone(), client(Some(&src), None), "not allowed").await;
        }
        // No client certificate at all.
        assert_refused(
            server.clone(),
            client(None, Some(&pki)),
            "peer sent no certificates",
        )
        .await;
    }

    #[tokio::test]
    async fn require_refuses_foreign_ca_and_expired() {
        let pki = Pki::new(TD);
        let keeper = pki.svid("spiffe://spike.ist/spike/keeper");
        let server = server_config(&keeper, TD, ClientAuth::Require(vec![Role::Nexus])).unwrap();

        // A CA for another trust domain.
        let other = Pki::new("other.org");
        let foreign = other.svid("spiffe://other.org/spike/nexus");
        let c = client_config(
            Some(&foreign),
            Some(pki_bundle(&pki)),
            TD,
            ExpectedPeer::Any,
        )
        .unwrap();
        assert_refused(server.clone(), c, "UnknownIssuer").await;

        // Another CA claiming the same trust domain.
        let impostor = Pki::new(TD);
        let fake = impostor.svid("spiffe://spike.ist/spike/nexus");
        let c = client_config(Some(&fake), Some(pki_bundle(&pki)), TD, ExpectedPeer::Any).unwrap();
        // Same issuer name, different key: webpki reports the bad signature.
        assert_refused(server.clone(), c, "BadSignature").await;

        // An expired certificate from the right CA.
        let expired = pki.expired_svid("spiffe://spike.ist/spike/nexus");
        assert_refused(server, client(Some(&expired), None), "Expired").await;
    }

    fn pki_bundle(p: &Pki) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(&p.ca_pem())
            .collect::<std::result::Result<Vec<_>, _>>()
            .unwrap()
    }

    #[tokio::test]
    async fn foreign_trust_domain_refused_even_if_ca_trusted() {
        // The server trusts both CAs, but still only accepts its trust domain.
        let pki = Pki::new(TD);
        let other = Pki::new("other.org");
        let out = pki.dir("nexus-server");
        pki::issue(
            &pki.ca,
            &SpiffeId::parse("spiffe://spike.ist/spike/nexus").unwrap(),
            &out,
            &[],
            &[],
        )
        .unwrap();
        let both = pki.dir("both.pem");
        std::fs::write(&both, [pki.ca_pem(), other.ca_pem()].concat()).unwrap();
        let nexus =
            SvidSource::load(SvidPaths::resolve(Some(out), None, None, Some(both)).unwrap())
                .unwrap();
        assert_eq!(nexus.current().bundle().len(), 2);
        let server = server_config(&nexus, TD, ClientAuth::Optional).unwrap();
        let foreign = other.svid("spiffe://other.org/app");
        let c = client_config(
            Some(&foreign),
            Some(pki_bundle(&pki)),
            "other.org",
            ExpectedPeer::Any,
        )
        .unwrap();
        // The client accepts nothing from spike.ist when it expects other.org.
        let (s, cr) = handshake(server.clone(), c, "localhost").await;
        assert!(s.is_err() && cr.is_err());
        let c = client_config(
            Some(&foreign),
            Some(pki_bundle(&pki)),
            TD,
            ExpectedPeer::Any,
        )
        .unwrap();
        assert_refused(server, c, "not in trust domain spike.ist").await;
    }

    #[tokio::test]
    async fn optional_accepts_no_cert_and_reports_peer() {
        let pki = Pki::new(TD);
        let nexus = pki.svid("spiffe://spike.ist/spike/nexus");
        let server = server_config(&nexus, TD, ClientAuth::Optional).unwrap();

        let (s, c) = handshake(server.clone(), client(None, Some(&pki)), "localhost").await;
        assert_eq!(s.unwrap(), None);
        c.unwrap();

        let pilot = pki.svid("spiffe://spike.ist/spike/pilot/role/superuser");
        let cfg = client_config(Some(&pilot), None, TD, ExpectedPeer::Role(Role::Nexus)).unwrap();
        let (s, c) = handshake(server.clone(), cfg, "127.0.0.1").await;
        let peer = s.unwrap().unwrap();
        assert_eq!(Role::of(&peer, TD), Some(Role::Superuser));
        c.unwrap();

        // A presented certificate is still verified.
        let expired = pki.expired_svid("spiffe://spike.ist/app");
        assert_refused(server, client(Some(&expired), None), "Expired").await;
    }

    #[tokio::test]
    async fn client_checks_server_role() {
        let pki = Pki::new(TD);
        let nexus = pki.svid("spiffe://spike.ist/spike/nexus");
        let server = server_config(&nexus, TD, ClientAuth::Optional).unwrap();
        let me = pki.svid("spiffe://spike.ist/spike/nexus/2");
        let cfg = client_config(Some(&me), None, TD, ExpectedPeer::Role(Role::Keeper)).unwrap();
        let (s, c) = handshake(server.clone(), cfg, "127.0.0.1").await;
        let err = c.unwrap_err();
        assert!(err.contains("not allowed"), "{err}");
        assert!(s.is_err());

        // The server certificate has no DNS SAN; any server name works.
        for name in ["localhost", "127.0.0.1", "nexus.example"] {
            let cfg = client_config(Some(&me), None, TD, ExpectedPeer::Role(Role::Nexus)).unwrap();
            let (s, c) = handshake(server.clone(), cfg, name).await;
            s.unwrap();
            c.unwrap();
        }

        // Server from a CA the client does not trust.
        let other = Pki::new(TD);
        let fake = other.svid("spiffe://spike.ist/spike/nexus");
        let server = server_config(&fake, TD, ClientAuth::Optional).unwrap();
        let (_, c) = handshake(server, client(None, Some(&pki)), "localhost").await;
        let err = c.unwrap_err();
        assert!(err.contains("BadSignature"), "{err}");
    }

    #[tokio::test]
    async fn rotation_applies_to_new_connections() {
        let pki = Pki::new(TD);
        let server_src = pki.svid("spiffe://spike.ist/spike/keeper");
        let server = server_config(&server_src, TD, ClientAuth::Optional).unwrap();
        let cfg = client_config(
            None,
            Some(pki_bundle(&pki)),
            TD,
            ExpectedPeer::Role(Role::Nexus),
        )
        .unwrap();
        let (_, c) = handshake(server.clone(), cfg.clone(), "localhost").await;
        assert!(c.is_err());
        let dir = server_src
            .paths()
            .unwrap()
            .cert
            .parent()
            .unwrap()
            .to_path_buf();
        pki::issue(
            &pki.ca,
            &SpiffeId::parse("spiffe://spike.ist/spike/nexus").unwrap(),
            &dir,
            &[],
            &[],
        )
        .unwrap();
        assert!(server_src.reload_if_changed().unwrap());
        let (s, c) = handshake(server, cfg, "localhost").await;
        s.unwrap();
        c.unwrap();
    }

    #[test]
    fn config_errors() {
        let e = client_config(None, None, TD, ExpectedPeer::Any).unwrap_err();
        assert!(matches!(e, Error::NoTrustBundle), "{e}");
        let e = client_config(None, Some(vec![]), TD, ExpectedPeer::Any).unwrap_err();
        assert!(matches!(e, Error::NoTrustBundle), "{e}");
        let pki = Pki::new(TD);
        let e = client_config(None, Some(pki_bundle(&pki)), "Bad", ExpectedPeer::Any).unwrap_err();
        assert!(matches!(e, Error::InvalidTrustDomain { .. }), "{e}");
        let e = peer_spiffe_id(&[]).unwrap_err().to_string();
        assert!(e.contains("no certificate"), "{e}");
    }

    /// What the minted certificates below break, one X509-SVID rule each.
    #[derive(Clone, Copy, Debug)]
    enum Flaw {
        /// A well-formed leaf: the control every rule test starts from.
        None,
        TwoSpiffeUris,
        SpiffeAndOtherUri,
        NoPath,
        IsCa,
        KeyCertSign,
        CrlSign,
        NoDigitalSignature,
        NoKeyUsage,
    }

    /// The CA of `pki` as an rcgen issuer (its key and subject).
    fn ca_issuer(pki: &Pki) -> rcgen::Issuer<'static, rcgen::KeyPair> {
        let key = std::fs::read_to_string(pki.ca.join(pki::CA_KEY_FILE)).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("spike dev CA {TD}"));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        rcgen::Issuer::new(params, rcgen::KeyPair::from_pem(&key).unwrap())
    }

    /// Leaf parameters for `id` with `flaw`, otherwise as `spike pki issue` mints them.
    fn leaf_params(id: &str, flaw: Flaw) -> rcgen::CertificateParams {
        use rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku, SanType};
        let uri = |u: &str| SanType::URI(u.to_string().try_into().unwrap());
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "SPIKE");
        p.subject_alt_names = vec![uri(id)];
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![Ku::DigitalSignature];
        p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        match flaw {
            Flaw::None => {}
            Flaw::TwoSpiffeUris => p
                .subject_alt_names
                .push(uri("spiffe://spike.ist/app/other")),
            Flaw::SpiffeAndOtherUri => p.subject_alt_names.push(uri("https://example.org/x")),
            Flaw::NoPath => p.subject_alt_names = vec![uri("spiffe://spike.ist")],
            Flaw::IsCa => p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
            Flaw::KeyCertSign => p.key_usages.push(Ku::KeyCertSign),
            Flaw::CrlSign => p.key_usages.push(Ku::CrlSign),
            Flaw::NoDigitalSignature => p.key_usages = vec![Ku::KeyAgreement],
            Flaw::NoKeyUsage => p.key_usages.clear(),
        }
        p
    }

    /// A leaf (chain, key) for `id` with `flaw`, signed by the CA of `pki`.
    fn mint(
        pki: &Pki,
        id: &str,
        flaw: Flaw,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = leaf_params(id, flaw)
            .signed_by(&key, &ca_issuer(pki))
            .unwrap();
        let der = PrivatePkcs8KeyDer::from(key.serialize_der());
        (vec![cert.der().clone()], der.into())
    }

    /// A client presenting `chain`/`key` as it is, verifying the server with our verifier.
    fn raw_client(
        source: &Arc<SvidSource>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Arc<ClientConfig> {
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: Roots::Source(Arc::clone(source)),
            trust: TrustRoots::single(TD).unwrap(),
            expected: ExpectedPeer::Any,
        });
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Arc::new(cfg)
    }

    /// A server presenting `chain`/`key` as it is, asking for no client certificate.
    fn raw_server(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Arc<ServerConfig> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Arc::new(cfg)
    }

    fn write_svid(
        dir: &std::path::Path,
        pki: &Pki,
        chain: &[CertificateDer<'_>],
        key: &PrivateKeyDer<'_>,
    ) {
        std::fs::create_dir_all(dir).unwrap();
        let pem = |label: &str, der: &[u8]| {
            let b64 = base64_lines(der);
            format!("-----BEGIN {label}-----\n{b64}-----END {label}-----\n")
        };
        let certs: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
        std::fs::write(dir.join("svid.pem"), certs).unwrap();
        std::fs::write(
            dir.join("svid_key.pem"),
            pem("PRIVATE KEY", key.secret_der()),
        )
        .unwrap();
        std::fs::write(dir.join("svid_bundle.pem"), pki.ca_pem()).unwrap();
    }

    fn base64_lines(der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        b64.as_bytes()
            .chunks(64)
            .map(|l| format!("{}\n", String::from_utf8_lossy(l)))
            .collect()
    }

    /// Checks one rule everywhere it applies: the leaf check itself, the server's client
    /// verifier, the client's server verifier, and loading our own SVID. `want` is what each
    /// refusal says; `handshake_want` what a handshake refusal says, where webpki refuses first.
    async fn rule_enforced(flaw: Flaw, want: &str, handshake_want: &str) {
        let pki = Pki::new(TD);
        let id = "spiffe://spike.ist/spike/nexus";
        // The control: the same minting without the flaw is accepted everywhere.
        for (f, ok) in [(Flaw::None, true), (flaw, false)] {
            let (chain, key) = mint(&pki, id, f);
            let direct = peer_spiffe_id_in(&chain[0], "minted");
            // Our verifier on the server side: a client presenting the certificate.
            let server_svid = pki.svid("spiffe://spike.ist/spike/keeper");
            let server = server_config(&server_svid, TD, ClientAuth::Optional).unwrap();
            let (as_client, _) = handshake(
                server,
                raw_client(&server_svid, chain.clone(), key.clone_key()),
                "localhost",
            )
            .await;
            // Our verifier on the client side: a server presenting it.
            let (_, as_server) = handshake(
                raw_server(chain.clone(), key.clone_key()),
                client(None, Some(&pki)),
                "localhost",
            )
            .await;
            // Our own SVID.
            let dir = pki.dir(&format!("own-{f:?}"));
            write_svid(&dir, &pki, &chain, &key);
            let own = SvidSource::load(SvidPaths::resolve(Some(dir), None, None, None).unwrap());
            if ok {
                assert_eq!(direct.unwrap().as_str(), id);
                assert_eq!(as_client.unwrap().unwrap().as_str(), id);
                as_server.unwrap();
                own.unwrap();
                continue;
            }
            let direct = direct.unwrap_err().to_string();
            assert!(direct.contains(want), "{flaw:?}: {direct}");
            let e = as_client.expect_err("the server must refuse the client certificate");
            assert!(e.contains(handshake_want), "{flaw:?} as client: {e}");
            let e = as_server.expect_err("the client must refuse the server certificate");
            assert!(e.contains(handshake_want), "{flaw:?} as server: {e}");
            let e = own.expect_err("our own SVID must be refused").to_string();
            assert!(
                e.contains(want) && e.contains("svid.pem"),
                "{flaw:?} own: {e}"
            );
        }
    }

    #[tokio::test]
    async fn svid_rule_exactly_one_uri_san() {
        rule_enforced(Flaw::TwoSpiffeUris, "2 URI SANs", "2 URI SANs").await;
        rule_enforced(Flaw::SpiffeAndOtherUri, "2 URI SANs", "2 URI SANs").await;
    }

    #[tokio::test]
    async fn svid_rule_leaf_id_has_a_path() {
        rule_enforced(Flaw::NoPath, "has no path", "has no path").await;
    }

    #[tokio::test]
    async fn svid_rule_leaf_is_not_a_ca() {
        // The verifier reads the peer's ID (and with it the leaf rules) first, to pick its
        // trust domain's bundle, so our rule refuses a CA before webpki would.
        rule_enforced(Flaw::IsCa, "CA certificate", "CA certificate").await;
    }

    #[tokio::test]
    async fn svid_rule_leaf_key_usage_cannot_sign_certificates_or_crls() {
        let want = "keyCertSign or cRLSign";
        rule_enforced(Flaw::KeyCertSign, want, want).await;
        rule_enforced(Flaw::CrlSign, want, want).await;
    }

    #[tokio::test]
    async fn svid_rule_leaf_key_usage_has_digital_signature() {
        let want = "lacks digitalSignature";
        rule_enforced(Flaw::NoDigitalSignature, want, want).await;
        rule_enforced(Flaw::NoKeyUsage, "no keyUsage", "no keyUsage").await;
    }

    #[tokio::test]
    async fn svid_rule_intermediates_are_signing_certificates() {
        use rcgen::KeyUsagePurpose as Ku;
        let pki = Pki::new(TD);
        let root = ca_issuer(&pki);
        let id = "spiffe://spike.ist/spike/nexus";
        for (usages, ok) in [
            (vec![Ku::KeyCertSign, Ku::CrlSign], true),
            (vec![Ku::DigitalSignature], false),
        ] {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "spike intermediate");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = usages.clone();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let ca = p.signed_by(&ca_key, &root).unwrap();
            let issuer = rcgen::Issuer::new(p, ca_key);
            let key = rcgen::KeyPair::generate().unwrap();
            let leaf = leaf_params(id, Flaw::None)
                .signed_by(&key, &issuer)
                .unwrap();
            let chain = vec![leaf.der().clone(), ca.der().clone()];
            let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));

            let server_svid = pki.svid("spiffe://spike.ist/spike/keeper");
            let server = server_config(&server_svid, TD, ClientAuth::Optional).unwrap();
            let (as_client, _) = handshake(
                server,
                raw_client(&server_svid, chain.clone(), key.clone_key()),
                "localhost",
            )
            .await;
            let (_, as_server) = handshake(
                raw_server(chain.clone(), key.clone_key()),
                client(None, Some(&pki)),
                "localhost",
            )
            .await;
            let dir = pki.dir(&format!("own-{ok}"));
            write_svid(&dir, &pki, &chain, &key);
            let own = SvidSource::load(SvidPaths::resolve(Some(dir), None, None, None).unwrap());
            if ok {
                assert_eq!(as_client.unwrap().unwrap().as_str(), id);
                as_server.unwrap();
                own.unwrap();
            } else {
                let want = "lacks keyCertSign";
                let e = as_client.unwrap_err();
                assert!(e.contains(want), "{e}");
                let e = as_server.unwrap_err();
                assert!(e.contains(want), "{e}");
                let e = own.unwrap_err().to_string();
                assert!(e.contains(want) && e.contains("intermediate"), "{e}");
            }
        }
    }

    #[test]
    fn ca_certificates_are_not_leaves() {
        let pki = Pki::new(TD);
        let ca = pki_bundle(&pki).remove(0);
        assert_eq!(
            ca_spiffe_id(&ca, "ca").unwrap().as_str(),
            "spiffe://spike.ist"
        );
        let e = peer_spiffe_id_in(&ca, "ca").unwrap_err().to_string();
        assert!(e.contains("has no path"), "{e}");
        // A leaf is no signing certificate.
        let (chain, _) = mint(&pki, "spiffe://spike.ist/x", Flaw::None);
        let e = ca_spiffe_id(&chain[0], "leaf").unwrap_err().to_string();
        assert!(e.contains("not a CA"), "{e}");
    }

    #[tokio::test]
    async fn mutual_tls12_works() {
        let pki = Pki::new(TD);
        let keeper = pki.svid("spiffe://spike.ist/spike/keeper");
        let nexus = pki.svid("spiffe://spike.ist/spike/nexus");
        let server = server_config(&keeper, TD, ClientAuth::Require(vec![Role::Nexus])).unwrap();
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: Roots::Source(Arc::clone(&nexus)),
            trust: TrustRoots::single(TD).unwrap(),
            expected: ExpectedPeer::Role(Role::Keeper),
        });
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(ClientResolver(Arc::clone(&nexus))));
        cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        let (s, c) = handshake(server.clone(), Arc::new(cfg), "127.0.0.1").await;
        assert_eq!(
            s.unwrap().unwrap().as_str(),
            "spiffe://spike.ist/spike/nexus"
        );
        c.unwrap();
    }
}
