use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A server whose config comes from the process default (as tonic's and far-host's do), and
/// a client offering only `versions`; `Ok` with the protocol agreed on.
async fn handshake(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ProtocolVersion, String> {
    install();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            let _ = tls.write_all(b"ok").await;
            let _ = tls.shutdown().await;
        }
    });

    // The client brings the full ring provider: what it may speak is `versions`.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(answer, b"ok");
    Ok(tls.get_ref().1.protocol_version().unwrap())
}

#[tokio::test]
async fn tls_1_3_is_served_and_a_tls_1_2_only_peer_gets_no_handshake() {
    assert_eq!(
        handshake(&[&rustls::version::TLS13, &rustls::version::TLS12]).await,
        Ok(rustls::ProtocolVersion::TLSv1_3)
    );
    let refused = handshake(&[&rustls::version::TLS12]).await.unwrap_err();
    assert_eq!(refused, "received fatal alert: ProtocolVersion");
}

#[test]
fn the_provider_has_only_tls_1_3_suites() {
    let suites = provider().cipher_suites;
    assert!(!suites.is_empty());
    assert!(
        suites
            .iter()
            .all(|s| s.version() == &rustls::version::TLS13)
    );
}
