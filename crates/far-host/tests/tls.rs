//! far-host with TLS and mutual TLS, as flintlockd serves by default: a client that trusts the
//! host's certificate and presents its own is served; one that does not is refused. Only TLS
//! 1.3 is spoken (FAR's policy, `far-tls`, installed as far-host's binary installs it).

use std::time::Duration;

use far_host::provider::sim::{Sim, SimConfig};
use far_host::{Host, HostConfig, Service};
use flintlock_proto::MicroVmClient;
use flintlock_proto::v1alpha1::ListMicroVMsRequest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

struct Pem {
    cert: String,
    key: String,
}

fn self_signed(name: &str) -> Pem {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    Pem {
        cert: certified.cert.pem(),
        key: certified.signing_key.serialize_pem(),
    }
}

async fn serve(server: &Pem, client_ca: Option<&Pem>) -> (String, tempfile::TempDir) {
    far_tls::install();
    let state = tempfile::tempdir().unwrap();
    let host = Host::open(
        HostConfig::default(),
        state.path(),
        Sim::new(SimConfig::default()),
    )
    .await
    .unwrap();
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(&server.cert, &server.key));
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(&ca.cert));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(Service::new(host, None))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("https://localhost:{port}"), state)
}

async fn list(endpoint: &str, trust: &Pem, identity: Option<&Pem>) -> Result<usize, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&trust.cert))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    let channel = Channel::from_shared(endpoint.to_owned())
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = MicroVmClient::new(channel);
    client
        .list_micro_v_ms(ListMicroVMsRequest {
            namespace: "far".into(),
            name: None,
        })
        .await
        .map(|r| r.into_inner().microvm.len())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_client_that_trusts_the_host_is_served_over_tls() {
    let server = self_signed("localhost");
    let (endpoint, _state) = serve(&server, None).await;
    assert_eq!(list(&endpoint, &server, None).await, Ok(0));
    let stranger = self_signed("localhost");
    assert!(
        list(&endpoint, &stranger, None).await.is_err(),
        "a certificate the client does not trust is refused"
    );
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_the_right_certificate() {
    let (server, client, other) = (
        self_signed("localhost"),
        self_signed("far-agent-controller"),
        self_signed("intruder"),
    );
    let (endpoint, _state) = serve(&server, Some(&client)).await;
    assert_eq!(list(&endpoint, &server, Some(&client)).await, Ok(0));
    assert!(
        list(&endpoint, &server, None).await.is_err(),
        "no client certificate"
    );
    assert!(
        list(&endpoint, &server, Some(&other)).await.is_err(),
        "a client certificate from elsewhere"
    );
}

/// What the far-host binary serves: a client that can speak TLS 1.2 only gets no handshake, one
/// that offers 1.3 and 1.2 is served 1.3.
#[tokio::test]
async fn only_tls_1_3_is_served() {
    use std::sync::Arc;
    let server = self_signed("localhost");
    let (endpoint, _state) = serve(&server, None).await;
    let address = endpoint.trim_start_matches("https://").to_owned();
    let handshake = |versions: &'static [&'static rustls::SupportedProtocolVersion]| {
        let (address, cert) = (address.clone(), server.cert.clone());
        async move {
            let mut roots = rustls::RootCertStore::empty();
            let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert.as_bytes()).unwrap();
            roots.add(der).unwrap();
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(
                    rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
                .map(|tls| tls.get_ref().1.protocol_version())
                .map_err(|e| e.to_string())
        }
    };
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static OLD: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
    assert_eq!(
        handshake(&BOTH).await,
        Ok(Some(rustls::ProtocolVersion::TLSv1_3))
    );
    assert!(handshake(&OLD).await.is_err());
}
