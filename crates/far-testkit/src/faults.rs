//! Faults injected into one client's writes to FarAgents, the same way against the fake API
//! server and a real one: the client is wrapped, the server is untouched.
//!
//! A fault hits the n-th write (POST, PUT, PATCH or DELETE, main resource or `/status`) the
//! wrapped client makes to one named FarAgent. It models what a controller meets on a real
//! cluster: a refusal (the write does not land), a lost answer (the write lands and the client
//! sees an error: a timeout, a dropped connection), or no answer at all (the process dies with
//! the request in flight).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use serde_json::json;

/// What happens to the write a rule hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Not sent; answered with this HTTP code and a Status as the API server words one.
    Refuse(u16),
    /// Sent, so the write lands; the client is answered 500 as if its connection dropped.
    Lost,
    /// Not sent and never answered: the test stops the client's process (see [`Faults::hung`]).
    Hang,
}

#[derive(Debug)]
struct Rule {
    nth: u32,
    fault: Fault,
    seen: u32,
}

/// The rules for one client, and what they have done.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<HashMap<String, Rule>>,
    fired: Mutex<Vec<(String, u32, Fault)>>,
    hung: tokio::sync::Notify,
}

impl Faults {
    /// The `nth` write (from 1) to the FarAgent `agent` meets `fault`.
    pub fn at(&self, agent: &str, nth: u32, fault: Fault) {
        self.lock_rules().insert(
            agent.to_owned(),
            Rule {
                nth,
                fault,
                seen: 0,
            },
        );
    }

    /// The faults that fired: agent, which write, what.
    pub fn fired(&self) -> Vec<(String, u32, Fault)> {
        self.fired.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until a [`Fault::Hang`] has fired.
    pub async fn hung(&self) {
        self.hung.notified().await;
    }

    /// `client`, with these faults in its way.
    pub fn wrap(self: &Arc<Self>, client: kube::Client) -> kube::Client {
        let namespace = client.default_namespace().to_owned();
        let faults = Arc::clone(self);
        let service = tower::service_fn(move |request: Request<Body>| {
            let client = client.clone();
            let faults = Arc::clone(&faults);
            async move {
                let fault = faults.hit(&request);
                match fault {
                    None => client.send(request).await,
                    Some(Fault::Refuse(code)) => Ok(refusal(code)),
                    Some(Fault::Lost) => {
                        client.send(request).await?;
                        Ok(refusal(500))
                    }
                    Some(Fault::Hang) => {
                        faults.hung.notify_waiters();
                        faults.hung.notify_one();
                        std::future::pending().await
                    }
                }
            }
        });
        kube::Client::new(service, namespace)
    }

    /// Counts a write and answers the fault it meets, if any.
    fn hit(&self, request: &Request<Body>) -> Option<Fault> {
        if request.method() == http::Method::GET {
            return None;
        }
        let agent = agent_of(request.uri().path())?;
        let mut rules = self.lock_rules();
        let rule = rules.get_mut(agent)?;
        rule.seen += 1;
        (rule.seen == rule.nth).then(|| {
            self.fired.lock().unwrap_or_else(|e| e.into_inner()).push((
                agent.to_owned(),
                rule.nth,
                rule.fault,
            ));
            rule.fault
        })
    }

    fn lock_rules(&self) -> std::sync::MutexGuard<'_, HashMap<String, Rule>> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The FarAgent a request path names (`.../faragents/NAME[/status]`).
fn agent_of(path: &str) -> Option<&str> {
    let mut segments = path.split('/');
    segments.find(|s| *s == "faragents")?;
    segments.next().filter(|name| !name.is_empty())
}

/// A Status as kube-apiserver words a failure of this code.
fn refusal(code: u16) -> Response<Body> {
    let (reason, message) = match code {
        409 => (
            "Conflict",
            "the object has been modified; please apply your changes to the latest version and try again",
        ),
        422 => ("Invalid", "injected: the request is invalid"),
        500 => ("InternalError", "injected: the connection was lost"),
        _ => ("", "injected failure"),
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    let mut response = Response::new(Body::from(body.to_string().into_bytes()));
    *response.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_told_apart_by_the_agent_they_name() {
        assert_eq!(
            agent_of("/apis/tiffany.dev/v1/namespaces/ns/faragents/a/status"),
            Some("a")
        );
        assert_eq!(
            agent_of("/apis/tiffany.dev/v1/namespaces/ns/faragents/b"),
            Some("b")
        );
        assert_eq!(
            agent_of("/apis/tiffany.dev/v1/namespaces/ns/faragents"),
            None
        );
        assert_eq!(agent_of("/api/v1/namespaces/ns/events"), None);
    }
}
