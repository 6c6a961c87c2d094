//! TLS for node-to-node QUIC: a self-signed certificate for the node key, and a verifier that
//! accepts exactly the node the dialler expected.
//!
//! No certificate authority is involved. The server presents a self-signed X.509 certificate for
//! its Ed25519 node key (made with rcgen). The client does not trust what the certificate says:
//! it checks the TLS 1.3 `CertificateVerify` signature against the *expected* node id's key
//! directly (rustls' raw-key verification), so a peer can only complete the handshake by holding
//! the secret key of the node id we dialled. The certificate's own contents are checked only to
//! give a clear error when the wrong node answers.
//!
//! TLS 1.3 only, Ed25519 only, ring as the crypto provider, ALPN [`crate::wire::ALPN`]. Clients
//! present their own self-signed certificate too, and the server checks the handshake signature
//! against the key in it ([`AnyNodeVerifier`]): that proves which node dialled (any node may),
//! so a parent can name its children to others by proven id and supernodes can take each
//! other's gossip from connections in either direction ([`peer_node`] reads the proven id).

use std::sync::Arc;

use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::keys::{NodeId, NodeKey};
use crate::wire::ALPN;

/// The DNS name put in certificates and sent as SNI; identity is the node id, not a name.
pub const SERVER_NAME: &str = "gridcast.node";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate could not be generated from the node key.
    #[error("self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("quic crypto configuration: {0}")]
    Quic(String),
}

/// ring's provider with AES-128-GCM first: node-to-node connections use it (both ends are
/// ours, and a client's order decides). It is QUIC's mandatory suite, and its encryption does
/// 10 AES rounds per block where ring's default first choice, AES-256-GCM, does 14: a relay
/// encrypts every byte once per subscriber. The other suites stay acceptable.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn spki(node: &NodeId) -> Vec<u8> {
    let mut out = ED25519_SPKI_PREFIX.to_vec();
    out.extend_from_slice(node.as_bytes());
    out
}

/// A node's own certificate and key, made once and presented in every handshake (as the
/// server, and as the client since dialled nodes check who dials them).
#[derive(Debug)]
pub struct Identity {
    cert: CertificateDer<'static>,
    pkcs8: Vec<u8>,
}

impl Identity {
    /// Self-signs a certificate for `key`.
    pub fn new(key: &NodeKey) -> Result<Self, TlsError> {
        let pair = rcgen::KeyPair::try_from(key.pkcs8_der())?;
        let cert =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?.self_signed(&pair)?;
        Ok(Self {
            cert: cert.der().clone(),
            pkcs8: key.pkcs8_der().to_vec(),
        })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }
}

/// QUIC server crypto presenting `identity`'s certificate, and learning the dialler's.
pub fn server_crypto(identity: &Identity) -> Result<Arc<QuicServerConfig>, TlsError> {
    let quic = QuicServerConfig::try_from(server_config(identity)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// QUIC client crypto that completes a handshake only with the holder of `expected`'s key,
/// presenting `identity`'s certificate.
pub fn client_crypto(
    expected: NodeId,
    identity: &Identity,
) -> Result<Arc<QuicClientConfig>, TlsError> {
    let quic = QuicClientConfig::try_from(client_config(expected, identity)?)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// The node id a peer's certificate chain (as quinn-proto's `peer_identity` gives it) proved
/// in the handshake: the key its `CertificateVerify` was checked against.
pub fn peer_node(chain: &[CertificateDer<'_>]) -> Option<NodeId> {
    chain.first().and_then(|c| key_in(c.as_ref()))
}

/// The Ed25519 key in a certificate's SubjectPublicKeyInfo.
fn key_in(der: &[u8]) -> Option<NodeId> {
    let at = der
        .windows(ED25519_SPKI_PREFIX.len())
        .position(|w| w == ED25519_SPKI_PREFIX)?;
    let key = der.get(at + ED25519_SPKI_PREFIX.len()..at + ED25519_SPKI_PREFIX.len() + 32)?;
    Some(NodeId::from_bytes(key.try_into().ok()?))
}

fn server_config(identity: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(AnyNodeVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

fn client_config(expected: NodeId, identity: &Identity) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(NodeIdVerifier {
        expected,
        spki: spki(&expected),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Accepts any dialler that proves possession of the key in its certificate: which node it
/// is, not whether it may connect (that is the engine's business).
#[derive(Debug)]
struct AnyNodeVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyNodeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // An old or foreign client without a certificate is still served; it is just not
        // known by id.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The proof is the handshake signature below, against the key found here.
        match key_in(end_entity.as_ref()) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(rustls::Error::General(
                "the dialling node's certificate has no Ed25519 key".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "gridcast speaks TLS 1.3 only".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let node = key_in(cert.as_ref()).ok_or_else(|| {
            rustls::Error::General("the dialling node's certificate has no Ed25519 key".into())
        })?;
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(spki(&node).as_slice()),
            dss,
            &self.algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Accepts the server only if it proves possession of the expected node key.
#[derive(Debug)]
struct NodeIdVerifier {
    expected: NodeId,
    spki: Vec<u8>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NodeIdVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Only for a clear error: the real proof is the handshake signature below, checked
        // against the expected key whatever this certificate claims.
        let presented = end_entity.as_ref();
        if presented.windows(self.spki.len()).any(|w| w == self.spki) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the node that answered is not {}",
                self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "gridcast speaks TLS 1.3 only".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        _cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(self.spki.as_slice()),
            dss,
            &self.algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::quic::{ClientConnection, Connection, ServerConnection, Version};

    /// Runs a QUIC-style TLS handshake in memory between a client expecting `expected` and a
    /// server holding `key`; the client's connection when it completes.
    fn handshake(key: &NodeKey, expected: NodeId) -> Result<ClientConnection, rustls::Error> {
        handshake_as(&NodeKey::from_seed(&[3; 32]), key, expected).map(|(c, _)| c)
    }

    /// [`handshake`] with the dialler holding `dialler`; also the node id the server proved
    /// for the dialler.
    fn handshake_as(
        dialler: &NodeKey,
        key: &NodeKey,
        expected: NodeId,
    ) -> Result<(ClientConnection, Option<NodeId>), rustls::Error> {
        let name = ServerName::try_from(SERVER_NAME).expect("valid name");
        let mine = Identity::new(dialler).expect("identity");
        let theirs = Identity::new(key).expect("identity");
        let mut client = Connection::Client(ClientConnection::new(
            Arc::new(client_config(expected, &mine).expect("client config")),
            Version::V1,
            name,
            b"client params".to_vec(),
        )?);
        let mut server = Connection::Server(ServerConnection::new(
            Arc::new(server_config(&theirs).expect("server config")),
            Version::V1,
            b"server params".to_vec(),
        )?);
        // A `write_hs` call writes one encryption level's messages; each goes to the other
        // side on its own, as QUIC carries each level in its own packets.
        fn flight(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
            for _ in 0..4 {
                let mut bytes = Vec::new();
                let _ = from.write_hs(&mut bytes);
                if bytes.is_empty() {
                    break;
                }
                to.read_hs(&bytes)?;
            }
            Ok(())
        }
        for _ in 0..10 {
            flight(&mut client, &mut server)?;
            flight(&mut server, &mut client)?;
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        let proven = match &server {
            Connection::Server(s) => s.peer_certificates().and_then(peer_node),
            Connection::Client(_) => None,
        };
        match client {
            Connection::Client(c) if !c.is_handshaking() => Ok((c, proven)),
            _ => Err(rustls::Error::General("handshake did not finish".into())),
        }
    }

    #[test]
    fn the_server_learns_which_node_dialled() {
        let dialler = NodeKey::from_seed(&[11; 32]);
        let key = NodeKey::from_seed(&[9; 32]);
        let (_, proven) = handshake_as(&dialler, &key, key.node_id()).expect("handshake");
        assert_eq!(proven, Some(dialler.node_id()));
    }

    #[test]
    fn nodes_agree_on_aes_128_gcm_with_the_expected_node() {
        let key = NodeKey::from_seed(&[9; 32]);
        let client = handshake(&key, key.node_id()).expect("handshake with the expected node");
        let suite = client.negotiated_cipher_suite().expect("a suite").suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(client.alpn_protocol(), Some(ALPN));
    }

    #[test]
    fn a_node_other_than_the_expected_one_is_refused() {
        let key = NodeKey::from_seed(&[9; 32]);
        let other = NodeKey::from_seed(&[10; 32]).node_id();
        let err = handshake(&key, other).expect_err("the wrong node must not pass");
        assert!(err.to_string().contains("is not"), "{err}");
    }
}
