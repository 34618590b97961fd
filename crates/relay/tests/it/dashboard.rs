//! The dashboard at `/` on the admin port, in a real browser: Debian's
//! Chromium, headless, driven over WebDriver (chromedriver) against the real
//! relay, writer, MongoDB (or its stand-in) and the Pub/Sub emulator.
//!
//! `scripts/test.sh` installs Chromium and chromedriver when they are
//! missing; where it cannot, this test says SKIPPED with the reason.
//! With `DASHBOARD_SCREENSHOTS=DIR` it saves the README's screenshots.

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::e2e::{Process, eventually, free_port, start_stack};

/// chromedriver's `/session/{id}/se/log`: the browser's console, read and
/// cleared.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

/// Console entries at level SEVERE or WARNING since the last call.
async fn console_problems(browser: &Client) -> Vec<String> {
    let entries = browser.issue_cmd(BrowserLog).await.unwrap();
    entries
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| matches!(e["level"].as_str(), Some("SEVERE" | "WARNING")))
        .map(|e| format!("{}: {}", e["level"], e["message"]))
        .collect()
}

/// chromedriver and the Chromium binary, or why there are none.
fn browser_binaries() -> Result<(PathBuf, Option<PathBuf>), String> {
    let on_path = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|path| path.is_file())
        })
    };
    let driver = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| on_path("chromedriver"))
        .ok_or_else(|| {
            std::env::var("BROWSER_UNAVAILABLE").unwrap_or_else(|_| {
                "no chromedriver on PATH (scripts/test.sh installs Debian's chromium-driver)"
                    .to_owned()
            })
        })?;
    // Debian's /usr/bin/chromium is a shell wrapper; the driver wants the binary.
    let chromium = std::env::var_os("CHROMIUM").map(PathBuf::from).or_else(|| {
        let debian = PathBuf::from("/usr/lib/chromium/chromium");
        debian.is_file().then_some(debian)
    });
    Ok((driver, chromium))
}

async fn start_browser(driver: PathBuf, chromium: Option<PathBuf>) -> (Process, Client) {
    let port = free_port();
    let process = Process::spawn_args("chromedriver", driver, &[format!("--port={port}")], &[]);
    let mut options = json!({
        "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-extensions", "--no-first-run",
            "--disable-default-apps", "--disable-sync", "--window-size=1280,1000",
        ],
    });
    if let Some(chromium) = chromium {
        options["binary"] = json!(chromium);
    }
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": options,
        "goog:loggingPrefs": {"browser": "ALL"},
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(capabilities.clone())
            .connect(&url)
            .await
        {
            Ok(client) => return (process, client),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no browser session after 60 s: {e}\n{}",
                    process.tail()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The text of the element with `id`, hidden or not.
async fn text(browser: &Client, id: &str) -> String {
    let script =
        "const e = document.getElementById(arguments[0]); return e ? e.textContent : null;";
    match browser.execute(script, vec![json!(id)]).await.unwrap() {
        Value::String(text) => text,
        other => panic!("no element #{id}: {other}"),
    }
}

/// Waits until the element's text satisfies `check`.
async fn until(browser: &Client, id: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = text(browser, id).await;
        if check(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "#{id} never showed {what} in 60 s; it shows {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const TOKEN: &str = "s3cret-admin-token-0123456789abcdef";

async fn clear_token(browser: &Client) {
    let field = browser.find(Locator::Id("token")).await.unwrap();
    field.clear().await.unwrap();
}

/// Types the token and presses Enter (the page takes it then).
async fn type_token(browser: &Client, token: &str) {
    let field = browser.find(Locator::Id("token")).await.unwrap();
    field.send_keys(&format!("{token}\u{E007}")).await.unwrap();
}

async fn aria_label(browser: &Client, id: &str) -> String {
    let element = browser.find(Locator::Id(id)).await.unwrap();
    element
        .attr("aria-label")
        .await
        .unwrap()
        .expect("an aria-label")
}

async fn click(browser: &Client, css: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn screenshot(browser: &Client, name: &str) {
    let Some(dir) = std::env::var_os("DASHBOARD_SCREENSHOTS") else {
        return;
    };
    let png = browser.screenshot().await.unwrap();
    std::fs::write(PathBuf::from(dir).join(name), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_relay_live_and_its_buttons_pause_resume_and_retry() {
    let (driver, chromium) = match browser_binaries() {
        Ok(found) => found,
        Err(reason) => {
            eprintln!("SKIPPED the_dashboard_shows_the_relay_live_*: {reason}");
            return;
        }
    };
    let stack = start_stack().await;
    let relay_vars = [
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
        ("ADMIN_TOKEN", TOKEN),
        ("OUTBOX_BATCH_SIZE", "100"),
    ];
    let (relay, admin) = stack.relay("relay-dash", &relay_vars);
    stack.admin_ready(&admin).await;
    let (_driver, browser) = start_browser(driver, chromium).await;

    // The page asks for the token before it reads anything (every /api
    // route needs it), then loads, offline-capable and quiet, and shows
    // this replica leading.
    browser.goto(&format!("{admin}/")).await.unwrap();
    until(&browser, "offline", "the token asked for", |t| {
        t.contains("needs its token")
    })
    .await;
    type_token(&browser, TOKEN).await;
    until(&browser, "role", "leader", |t| t == "leader of default").await;
    assert_eq!(text(&browser, "relay-id").await, "relay-dash");
    until(&browser, "holder", "the lease holder", |t| {
        t == "relay-dash"
    })
    .await;
    assert!(text(&browser, "epoch").await.parse::<u64>().is_ok());
    until(&browser, "state", "running", |t| t == "running").await;
    let problems = console_problems(&browser).await;
    assert!(problems.is_empty(), "console: {problems:?}");

    // Every control has a name a screen reader can say.
    let unnamed = browser
        .execute(
            "return [...document.querySelectorAll('input, button, progress')]
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                    && !e.getAttribute('aria-labelledby') && !e.textContent.trim())
                .map(e => e.outerHTML);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(unnamed, json!([]), "controls without a name");

    // Pause with a wrong token: the server's 401 is shown; with the right
    // one, paused.
    clear_token(&browser).await;
    type_token(&browser, "wrong-token").await;
    click(&browser, "#pause").await;
    until(&browser, "answer", "the 401", |t| {
        t.contains("401") && t.contains("unauthorized")
    })
    .await;
    clear_token(&browser).await;
    type_token(&browser, TOKEN).await;
    click(&browser, "#pause").await;
    until(&browser, "answer", "paused", |t| {
        t == "Stream default paused on every replica."
    })
    .await;
    until(&browser, "state", "paused", |t| t == "paused").await;

    // Two batches while paused: 3,000 items, then one with an item over
    // Pub/Sub's 10 MB limit that halts the relay (OUTBOX_ON_POISON=halt).
    let big: Vec<Value> = (0..3000)
        .map(|i| json!({"request_id": format!("d{i}")}))
        .collect();
    let poison = json!([
        {"request_id": "p1"}, {"request_id": "p2"},
        {"request_id": "huge", "blob": "x".repeat(11_000_000)},
        {"request_id": "p4"},
    ]);
    // The writer refuses the item over Pub/Sub's limit now; a batch stored
    // before it did is what halts the relay.
    stack.post_batch(&json!(big)).await;
    stack.store_unchecked(poison.as_array().unwrap()).await;
    until(&browser, "pending-count", "two pending batches", |t| {
        t == "2"
    })
    .await;
    until(&browser, "pending", "both batches listed", |t| {
        t.contains("3,000") && t.contains("pending")
    })
    .await;

    // Resume: the first batch drains (published count and drain rate move),
    // the second halts, and shows up with how far it got and a Retry button.
    click(&browser, "#resume").await;
    until(&browser, "answer", "resumed", |t| {
        t == "Stream default resumed."
    })
    .await;
    until(&browser, "published", "3,002 published", |t| t == "3,002").await;
    until(&browser, "state", "halted", |t| t == "halted on batch 2").await;
    until(&browser, "failed", "the halted batch", |t| {
        t.contains("Batch 2") && t.contains("2 of 4 items sent")
    })
    .await;
    let rate = aria_label(&browser, "rate-chart").await;
    assert!(rate.starts_with("Drain rate, last five minutes:"), "{rate}");
    assert!(
        !rate.contains("peak 0 items/s"),
        "the drain shows in the chart: {rate}"
    );
    until(&browser, "errors", "the publish error", |t| !t.is_empty()).await;
    until(&browser, "pending-count", "one pending batch", |t| t == "1").await;
    browser.set_window_size(390, 844).await.unwrap();
    let overflow = browser
        .execute(
            "return document.documentElement.scrollWidth - window.innerWidth;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the page is wider than a phone: {overflow}"
    );
    screenshot(&browser, "dashboard-phone.png").await;
    browser.set_window_size(1280, 1000).await.unwrap();
    let problems = console_problems(&browser).await;
    assert!(
        problems.iter().all(|p| p.contains("status of 401")),
        "console, beyond the 401 asked for: {problems:?}"
    );

    // A page opened now draws the drain from the replica's own history:
    // its live polls all read 3,002, a rate of 0.
    let history = format!("{admin}/api/v1/outbox/history");
    eventually(Duration::from_secs(60), "a sample after the drain", || {
        let request = stack.http.get(&history).bearer_auth(TOKEN).send();
        async move {
            let Ok(response) = request.await else {
                return false;
            };
            let body: Value = response.json().await.unwrap_or_default();
            body["samples"]
                .as_array()
                .and_then(|s| s.last())
                .is_some_and(|s| s["published_total"] == 3002)
        }
    })
    .await;
    browser.refresh().await.unwrap();
    until(&browser, "published", "the page again", |t| t == "3,002").await;
    let rate = aria_label(&browser, "rate-chart").await;
    assert!(
        !rate.contains("peak 0 items/s"),
        "the drain is in the history: {rate}"
    );

    // Retry through the button, on a relay that dead-letters the item.
    drop(relay);
    let dead_letter = [
        ("OUTBOX_POLL_INTERVAL_SECONDS", "0.2"),
        ("ADMIN_TOKEN", TOKEN),
        ("OUTBOX_ON_POISON", "dead-letter"),
    ];
    let (relay, admin) = stack.relay("relay-dash-2", &dead_letter);
    stack.admin_ready(&admin).await;
    browser.goto(&format!("{admin}/")).await.unwrap();
    console_problems(&browser).await; // what the old page met while its relay was gone
    type_token(&browser, TOKEN).await;
    until(&browser, "failed", "the failed batch", |t| {
        t.contains("Batch 2")
    })
    .await;
    click(&browser, "#failed button").await;
    until(&browser, "answer", "the retry", |t| {
        t.ends_with("is processing again.")
    })
    .await;
    until(&browser, "failed", "no failed batch", str::is_empty).await;
    let hidden = browser
        .execute(
            "return document.getElementById('failed-none').hidden;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(hidden, json!(false), "{}", relay.tail());
    until(&browser, "pending-count", "nothing pending", |t| t == "0").await;
    until(&browser, "state", "running", |t| t == "running").await;

    // A replay of what was committed shows in the list with its progress.
    let started = stack
        .http
        .post(format!("{admin}/api/v1/outbox/replays"))
        .bearer_auth(TOKEN)
        .json(&json!({"from_sequence": 1, "to_sequence": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 201);
    until(&browser, "replays", "the replay done", |t| {
        t.contains("Batches 1–1 to ") && t.contains(": done") && t.contains("of 1 batches")
    })
    .await;
    // The README's picture: the stream running again, everything
    // published, the replay listed.
    browser.set_window_size(1280, 1700).await.unwrap();
    screenshot(&browser, "dashboard.png").await;
    let problems = console_problems(&browser).await;
    assert!(problems.is_empty(), "console: {problems:?}");
    browser.close().await.unwrap();
}
