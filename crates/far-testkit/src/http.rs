//! Plain HTTP/1.1 for tests that must see exactly what went over the wire (streams included).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one request over plain HTTP/1.1 and reads the answer until it holds `until` (or the
/// connection closes), within 10 s; empty when nothing listens yet.
pub async fn ask(address: &str, method: &str, path: &str, until: &str) -> String {
    let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
        return String::new();
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 65536];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
            if String::from_utf8_lossy(&answer).contains(until) {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}
