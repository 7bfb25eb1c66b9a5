//! A headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`,
//! installed by `scripts/install-deps`), for tests that use a page as a person would: load it,
//! type, press keys, click, read what it shows, save screenshots.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Keys, as WebDriver sends them.
pub mod keys {
    /// Tab.
    pub const TAB: &str = "\u{E004}";
    /// Enter.
    pub const ENTER: &str = "\u{E007}";
    /// Escape.
    pub const ESCAPE: &str = "\u{E00C}";
    /// Arrow down.
    pub const DOWN: &str = "\u{E015}";
}

/// One browser session.
pub struct Browser {
    driver: Child,
    client: reqwest::Client,
    base: String,
}

impl Browser {
    /// Starts `chromedriver` and a headless Chromium with a 1280x900 window.
    ///
    /// # Panics
    /// When either is missing or does not come up.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/install-deps installs it)");
        let client = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if client.get(format!("{root}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut browser = Self {
            driver,
            client,
            base: root,
        };
        let session = browser
            .call(
                reqwest::Method::POST,
                "session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1280,900"]}}}}),
            )
            .await;
        let id = session["sessionId"]
            .as_str()
            .expect("a WebDriver session id")
            .to_owned();
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    /// One WebDriver command; its `value`.
    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = if path.is_empty() {
            self.base.clone()
        } else {
            format!("{}/{path}", self.base)
        };
        let mut request = self.client.request(method.clone(), &url);
        if method != reqwest::Method::GET && method != reqwest::Method::DELETE {
            request = request.json(&body);
        }
        let answer: Value = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let value = answer["value"].clone();
        if let Some(error) = value.get("error") {
            panic!("WebDriver {method} {path}: {error}: {}", value["message"]);
        }
        value
    }

    /// Loads a page.
    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "url", json!({"url": url}))
            .await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; what it returns.
    pub async fn run(&self, script: &str, args: Vec<Value>) -> Value {
        self.call(
            reqwest::Method::POST,
            "execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// Runs `script` until it returns something truthy, for at most `within`; that value.
    ///
    /// # Panics
    /// When it never does, naming `what` and the last value.
    pub async fn wait_for(&self, what: &str, script: &str, within: Duration) -> Value {
        let until = tokio::time::Instant::now() + within;
        loop {
            let value = self.run(script, vec![]).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{what}: not within {within:?} (last: {value})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found[ELEMENT].as_str().expect("an element id").to_owned()
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("element/{id}/click"),
            json!({}),
        )
        .await;
    }

    /// Types `text` (or [`keys`]) into the element `css` selects, as a person would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    /// Presses `keys` (see [`keys`]) on whatever has the focus.
    pub async fn press(&self, keys: &str) {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|c| {
                let c = c.to_string();
                [
                    json!({"type": "keyDown", "value": c}),
                    json!({"type": "keyUp", "value": c}),
                ]
            })
            .collect();
        self.call(
            reqwest::Method::POST,
            "actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
        )
        .await;
    }

    /// Saves a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
        let png = self
            .call(reqwest::Method::GET, "screenshot", Value::Null)
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .expect("a base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot's directory");
        }
        std::fs::write(path, bytes).expect("the screenshot written");
    }

    /// Ends the session (Chromium exits) and the driver.
    pub async fn close(self) {
        // Dropped: the session ends, then the driver.
        drop(self);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // After a failed test (no `close`): the session is ended first, so the driver quits
        // Chromium (killed, the driver would leave it running), then the driver goes.
        use std::io::Write as _;
        if let Some(rest) = self.base.strip_prefix("http://")
            && let Some((address, path)) = rest.split_once('/')
            && let Ok(mut stream) = std::net::TcpStream::connect(address)
        {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                stream,
                "DELETE /{path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 1024]);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
