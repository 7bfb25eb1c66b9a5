//! The stream every open page follows: one look at the source per tick, its change from the look
//! before computed and serialized once, and the same bytes sent to every page. A page that
//! missed a look (it was slow, and the `watch` channel keeps the newest only) gets the change
//! from the last look it saw, computed for it alone.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::Event;
use futures::Stream;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::view::{self, View};

/// One look at the source, as every page receives it.
#[derive(Clone, Default)]
pub(super) struct Frame {
    /// Counts the looks that changed something.
    seq: u64,
    view: Arc<View>,
    /// The `delta` event's data: the change from look `seq - 1` to this one.
    delta: Arc<str>,
    /// When the source was last seen to look like `view`.
    taken: Option<Instant>,
}

/// Whether the newest frame was taken less than `age` ago.
pub(super) fn fresh(frames: &watch::Sender<Arc<Frame>>, age: Duration) -> bool {
    frames.borrow().taken.is_some_and(|t| t.elapsed() < age)
}

/// Sends `view` to every page, unless nothing changed since the last look (then the newest
/// frame only learns it is still true).
pub(super) fn publish(frames: &watch::Sender<Arc<Frame>>, view: View, now: &str) {
    let taken = Some(Instant::now());
    let last = Arc::clone(&frames.borrow());
    let Some(delta) = delta(&last.view, &view, now) else {
        frames.send_if_modified(|newest| {
            *newest = Arc::new(Frame {
                taken,
                ..Frame::clone(newest)
            });
            false
        });
        return;
    };
    frames.send_replace(Arc::new(Frame {
        seq: last.seq + 1,
        view: Arc::new(view),
        delta: delta.into(),
        taken,
    }));
}

/// The `delta` event's data from `before` to `after`, or `None` when nothing changed.
fn delta(before: &View, after: &View, now: &str) -> Option<String> {
    let delta = view::diff(before, after);
    if delta.is_empty() {
        return None;
    }
    let mut data = serde_json::to_value(&delta).unwrap_or_default();
    data["now"] = Value::String(now.to_owned());
    Some(data.to_string())
}

/// One page's events: a `snapshot` of the newest look (the caller makes sure it is recent),
/// then each change after it.
pub(super) fn follow(
    mut frames: watch::Receiver<Arc<Frame>>,
    leading: bool,
    now: &str,
) -> impl Stream<Item = Result<Event, Infallible>> + use<> {
    let first = Arc::clone(&frames.borrow_and_update());
    let snapshot = json!({
        "now": now,
        "leading": leading,
        "agents": first.view.agents.values().collect::<Vec<_>>(),
        "hosts": first.view.hosts,
        "pools": first.view.pools,
    })
    .to_string();
    let head =
        futures::stream::once(async move { Ok(Event::default().event("snapshot").data(snapshot)) });
    let tail = futures::stream::unfold((frames, first), |(mut frames, seen)| async move {
        loop {
            frames.changed().await.ok()?;
            let next = Arc::clone(&frames.borrow_and_update());
            let data = if next.seq == seen.seq + 1 {
                Some(Arc::clone(&next.delta))
            } else {
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                delta(&seen.view, &next.view, &now).map(Arc::from)
            };
            if let Some(data) = data {
                let event = Event::default().event("delta").data(&*data);
                return Some((Ok(event), (frames, next)));
            }
        }
    });
    futures::StreamExt::chain(head, tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn view(phases: &[(&str, &str)]) -> View {
        View {
            agents: phases
                .iter()
                .map(|(name, phase)| {
                    let row = view::AgentRow {
                        key: format!("team/{name}"),
                        namespace: "team".into(),
                        name: (*name).into(),
                        phase: (*phase).into(),
                        reason: String::new(),
                        host: None,
                        heartbeat: None,
                        exit_code: None,
                        created: None,
                    };
                    (row.key.clone(), row)
                })
                .collect(),
            ..View::default()
        }
    }

    /// Event's text on the wire.
    async fn text(event: Event) -> String {
        use axum::response::IntoResponse;
        let body =
            axum::response::sse::Sse::new(futures::stream::iter([Ok::<_, Infallible>(event)]))
                .into_response()
                .into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn pages_share_each_change_and_a_page_that_missed_one_catches_up_from_what_it_saw() {
        let (frames, _) = watch::channel(Arc::<Frame>::default());
        publish(&frames, view(&[("a", "Pending")]), "t1");
        let mut page = Box::pin(follow(frames.subscribe(), true, "t1"));
        let snapshot = text(page.next().await.unwrap().unwrap()).await;
        assert!(snapshot.starts_with("event: snapshot\n"), "{snapshot}");
        assert!(snapshot.contains(r#""phase":"Pending""#), "{snapshot}");

        // Nothing changed: no frame, so no page wakes.
        publish(&frames, view(&[("a", "Pending")]), "t2");
        assert_eq!(frames.borrow().seq, 1);

        // One change, serialized once: the page sends the frame's own bytes.
        publish(&frames, view(&[("a", "Running")]), "t3");
        let shared = Arc::clone(&frames.borrow().delta);
        let sent = text(page.next().await.unwrap().unwrap()).await;
        assert_eq!(sent, format!("event: delta\ndata: {shared}\n\n"));
        assert!(shared.contains(r#""phase":"Running""#) && shared.contains(r#""now":"t3""#));

        // Two changes before the page looks: it gets both at once, from what it last saw.
        publish(&frames, view(&[("a", "Completed"), ("b", "Pending")]), "t4");
        publish(&frames, view(&[("b", "Pending")]), "t5");
        let caught_up = text(page.next().await.unwrap().unwrap()).await;
        assert!(caught_up.contains(r#""remove":["team/a"]"#), "{caught_up}");
        assert!(caught_up.contains(r#""key":"team/b""#), "{caught_up}");
        assert!(!caught_up.contains("Completed"), "{caught_up}");
    }
}
