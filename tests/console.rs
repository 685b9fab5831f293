//! The approver console in a real browser (issue 13): headless Chromium
//! driven over WebDriver (chromedriver, through the `fantoccini` crate),
//! a real OpenID provider (`oidc-provider` from the npm registry, run by
//! Node), and the broker as a user runs it (`serve --dev`, the CLI in other
//! processes). `.ci/browser` installs what is missing; without it these
//! tests say SKIPPED. Screenshots of every page land in
//! `target/tmp/console-screenshots/`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const CLIENT_SECRET: &str = "console-test-secret";

/// People and workloads of the test policy: alice signs in with the
/// provider; the demo workload is an approver too, so it can sign in with
/// a one-time link and try to approve its own request; bob is known to the
/// provider but not to the policy.
const POLICY: &str = r#"
[broker]
default_audience = "portcullis-dev"
admins = ["admins"]

[groups]
approvers = ["oidc:alice@example.org", "spiffe://portcullis.dev/ns/demo/sa/app"]
admins = ["spiffe://portcullis.dev/human/root-oncall"]

[[scope]]
name = "orders.admin"
description = "change any order, delete orders and edit the orders schema"
tier = "approval"
workloads = ["spiffe://portcullis.dev/ns/demo/*"]
approvers = ["approvers"]
approvals_required = 1
pending_ttl = "30m"
max_ttl = "15m"
break_glass = { allowed = true, max_ttl = "5m" }
"#;

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

struct Tools {
    chromium: String,
    chromedriver: String,
    oidc_dir: String,
}

fn tools(test: &str) -> Option<Tools> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        get("PORTCULLIS_TEST_CHROMIUM"),
        get("PORTCULLIS_TEST_CHROMEDRIVER"),
        get("PORTCULLIS_TEST_OIDC_DIR"),
    ) {
        (Some(chromium), Some(chromedriver), Some(oidc_dir)) => Some(Tools {
            chromium,
            chromedriver,
            oidc_dir,
        }),
        _ => {
            eprintln!(
                "SKIPPED: {test} needs Chromium, chromedriver and oidc-provider: set PORTCULLIS_TEST_CHROMIUM, PORTCULLIS_TEST_CHROMEDRIVER and PORTCULLIS_TEST_OIDC_DIR (`.ci/browser` installs them and prints the values)"
            );
            None
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start `cmd` and return once a line of its `stream` contains `ready`;
/// the rest of its output is drained in the background.
fn start(mut cmd: Command, ready: &str, from_stderr: bool) -> Proc {
    if from_stderr {
        cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    }
    let mut child = cmd.spawn().unwrap();
    let out: Box<dyn Read + Send> = if from_stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let mut lines = BufReader::new(out).lines();
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(l)) => {
                let done = l.contains(ready);
                seen.push(l);
                if done {
                    break;
                }
            }
            _ => panic!("{cmd:?} exited before it was ready: {seen:#?}"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Proc(child)
}

/// The broker, the provider, chromedriver and a browser session.
struct Rig {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    http: SocketAddr,
    browser: Client,
    _procs: Vec<Proc>,
}

impl Rig {
    async fn new(t: &Tools) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
        let idp_port = free_port();
        let issuer = format!("http://127.0.0.1:{idp_port}");
        let mut serve = Command::new(BIN);
        serve
            .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .args(["--oidc-issuer", &issuer])
            .args(["--oidc-client-id", "portcullis-console"])
            .args(["--oidc-name", "Example SSO"])
            .env("PORTCULLIS_OIDC_CLIENT_SECRET", CLIENT_SECRET)
            .env("RUST_LOG", "warn");
        let broker = start(serve, "dev broker ready", true);
        let endpoints: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("endpoints.json")).unwrap()).unwrap();
        let http: SocketAddr = endpoints["http"].as_str().unwrap().parse().unwrap();

        let mut node = Command::new("node");
        node.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/provider.mjs"))
            .arg(idp_port.to_string())
            .arg(format!("http://{http}/ui/oidc/callback"))
            .arg(CLIENT_SECRET)
            .env("PORTCULLIS_TEST_OIDC_DIR", &t.oidc_dir);
        let provider = start(node, "ready", false);

        let wd_port = free_port();
        let mut wd = Command::new(&t.chromedriver);
        wd.arg(format!("--port={wd_port}"));
        let driver = start(wd, "started successfully", false);

        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": t.chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            }
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let browser = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{wd_port}"))
            .await
            .unwrap();
        Rig {
            _tmp: tmp,
            dir,
            http,
            browser,
            _procs: vec![driver, provider, broker],
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// `portcullis <args>` as the dev identity `as_`, waiting for it.
    fn cli(&self, as_: &str, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(["--as", as_])
            .args(args)
            .env("PORTCULLIS_DEV_DIR", &self.dir)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    /// `token request --wait` by the demo workload, left running.
    fn waiting_request(&self, justification: &str, extra: &[&str]) -> Child {
        Command::new(BIN)
            .args([
                "--as",
                "workload",
                "token",
                "request",
                "--scope",
                "orders.admin",
            ])
            .args(["--reason", justification, "--wait", "--timeout", "2m"])
            .args(extra)
            .env("PORTCULLIS_DEV_DIR", &self.dir)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    async fn shot(&self, name: &str) {
        let png = self.browser.screenshot().await.unwrap();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// The element `css` names, waiting up to 15 s for it; on a timeout
    /// the page is saved as `failed.png` and printed.
    async fn element(&self, css: &str) -> fantoccini::elements::Element {
        let found = self
            .browser
            .wait()
            .at_most(Duration::from_secs(15))
            .for_element(Locator::Css(css))
            .await;
        match found {
            Ok(e) => e,
            Err(_) => {
                let url = self.browser.current_url().await.unwrap();
                let source = self.browser.source().await.unwrap();
                self.shot("failed").await;
                panic!("no `{css}` at {url}: {source}");
            }
        }
    }

    async fn text(&self, css: &str) -> String {
        self.element(css).await.text().await.unwrap()
    }

    /// Open a one-time link: it asks whom to continue as; continue.
    async fn open_link(&self, link: &str, who: &str) {
        self.browser.goto(link).await.unwrap();
        assert_eq!(self.text("#as").await, who);
        self.shot("link-confirm").await;
        self.element("#continue").await.click().await.unwrap();
    }

    /// Sign in through the provider's login page as `person`.
    async fn sign_in(&self, person: &str) {
        self.browser.goto(&self.url("/ui/login")).await.unwrap();
        self.shot("login").await;
        self.browser
            .find(Locator::Css("#signin"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let login = self
            .browser
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css("input[name=login]"))
            .await
            .unwrap();
        login.send_keys(person).await.unwrap();
        self.browser
            .find(Locator::Css("input[name=password]"))
            .await
            .unwrap()
            .send_keys("any password")
            .await
            .unwrap();
        self.browser
            .find(Locator::Css("button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// The id of the first request row the pending page lists, waiting
    /// for the live update to show one.
    async fn first_pending(&self) -> String {
        let row = self.element("tr[data-request]").await;
        row.attr("data-request").await.unwrap().unwrap()
    }

    /// POST a form to `path` with this browser's session cookie, as a page
    /// of another site would (no CSRF token unless given).
    async fn forged_post(&self, path: &str, body: &str) -> (u16, String) {
        let origin = format!("http://{}", self.http);
        self.post_from(&origin, path, body).await
    }

    /// POST as `forged_post`, from a page of `origin`.
    async fn post_from(&self, origin: &str, path: &str, body: &str) -> (u16, String) {
        let cookie = self
            .browser
            .get_named_cookie("portcullis_session")
            .await
            .unwrap();
        let stream = tokio::net::TcpStream::connect(self.http).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post(path)
            .header("host", self.http.to_string())
            .header("origin", origin)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("cookie", format!("portcullis_session={}", cookie.value()))
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                body.to_owned(),
            )))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Wait for `child` to exit (at most 30 s): its code and stdout.
fn finish(mut child: Child) -> (i32, String, String) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap(), out, err);
        }
        assert!(Instant::now() < until, "the waiting client did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state_of(rig: &Rig, id: &str) -> String {
    let o = rig.cli("admin", &["--output", "json", "requests", "show", id]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stderr)));
    v["state"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_signs_in_with_the_provider_and_decides_what_waits() {
    let Some(t) = tools("an_approver_signs_in_with_the_provider_and_decides_what_waits") else {
        return;
    };
    let rig = Rig::new(&t).await;
    // A workload waits for a token; its justification holds markup.
    let marked = "<script>alert(1)</script><b>fix</b> a bad row";
    let waiting = rig.waiting_request(marked, &[]);

    rig.sign_in("alice").await;
    let id = rig.first_pending().await;
    assert_eq!(
        rig.text("span.who").await,
        "oidc:alice@example.org",
        "the claim names the person"
    );
    rig.shot("pending").await;

    rig.browser
        .goto(&rig.url(&format!("/ui/requests/{id}")))
        .await
        .unwrap();
    assert_eq!(
        rig.text("#justification").await,
        marked,
        "markup shows as text"
    );
    let source = rig.browser.source().await.unwrap();
    assert!(!source.contains("<script>alert"), "never spliced as markup");
    assert_eq!(
        rig.text("#requester").await,
        "spiffe://portcullis.dev/ns/demo/sa/app"
    );
    rig.shot("request").await;

    // A POST without the CSRF token changes nothing.
    let (status, body) = rig
        .forged_post(&format!("/ui/requests/{id}/approve"), "reason=forged")
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(state_of(&rig, &id), "pending");

    // Approve: the waiting client receives its token.
    rig.browser
        .find(Locator::Css("#approve input[name=reason]"))
        .await
        .unwrap()
        .send_keys("row 7 is wrong, fix it")
        .await
        .unwrap();
    rig.browser
        .find(Locator::Css("#approve button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(rig.text("#done").await, "You approved this request.");
    let (code, out, err) = finish(waiting);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim().split('.').count(), 3, "a JWT on stdout: {out}");
    let page = rig.browser.source().await.unwrap();
    assert!(
        !page.contains(out.trim()),
        "the console never shows a token"
    );
    assert!(!page.contains("eyJ"), "nor anything like one");

    // Deny with a reason: the waiting client exits 2.
    let waiting = rig.waiting_request("fix the duplicated line items in order 7 (OPS-12)", &[]);
    rig.browser.goto(&rig.url("/ui/pending")).await.unwrap();
    let id2 = rig.first_pending().await;
    rig.browser
        .goto(&rig.url(&format!("/ui/requests/{id2}")))
        .await
        .unwrap();
    // Issue 27, item 3: what the scope allows, and what approving does.
    assert!(
        rig.text("#scopes").await.contains("change any order"),
        "the scope's description"
    );
    let grants = rig.text("#grants").await;
    assert!(
        grants.contains("orders.admin") && grants.contains("delivered once"),
        "{grants}"
    );
    // The README's screenshot (docs/img/console-request.png).
    rig.shot("readme-request").await;
    rig.browser
        .find(Locator::Css("#deny input[name=reason]"))
        .await
        .unwrap()
        .send_keys("not during the freeze")
        .await
        .unwrap();
    rig.browser
        .find(Locator::Css("#deny button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(rig.text("#done").await, "You denied this request.");
    let (code, _, err) = finish(waiting);
    assert_eq!(code, 2, "{err}");

    // Break-glass: taken at once, then reviewed here.
    let glass = rig.waiting_request("pager: orders down", &["--break-glass"]);
    let (code, _, err) = finish(glass);
    assert_eq!(code, 0, "{err}");
    rig.browser.goto(&rig.url("/ui/reviews")).await.unwrap();
    let id3 = rig.first_pending().await;
    rig.shot("reviews").await;
    rig.browser
        .goto(&rig.url(&format!("/ui/requests/{id3}")))
        .await
        .unwrap();
    rig.browser
        .find(Locator::Css("#acknowledge input[name=reason]"))
        .await
        .unwrap()
        .send_keys("outage confirmed, done now")
        .await
        .unwrap();
    rig.browser
        .find(Locator::Css("#acknowledge input[name=revoke]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    rig.browser
        .find(Locator::Css("#acknowledge button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(
        rig.text("#done").await,
        "You reviewed this break-glass grant."
    );
    let o = rig.cli("admin", &["--output", "json", "requests", "show", &id3]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let lease = shown["lease_id"].as_str().unwrap().to_owned();
    let o = rig.cli("admin", &["--output", "json", "lease", "show", &lease]);
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["state"], "revoked", "{shown}");

    // History: who decided what, why, and that it was the console.
    rig.browser.goto(&rig.url("/ui/history")).await.unwrap();
    let history = rig.text("#history").await;
    for want in [
        "request.approved",
        "row 7 is wrong, fix it",
        "request.denied",
        "not during the freeze",
        "breakglass.revoked",
        "oidc:alice@example.org",
    ] {
        assert!(history.contains(want), "{want} in {history}");
    }
    // The page says how (console), not from which address.
    assert!(history.contains("console") && !history.contains("127.0.0.1"));
    rig.shot("history").await;

    // The trail says the same.
    let o = rig.cli("admin", &["audit", "export", "--format", "jsonl"]);
    let trail = String::from_utf8_lossy(&o.stdout);
    assert!(
        trail.lines().any(|l| l.contains("request.approved")
            && l.contains("oidc:alice@example.org")
            && l.contains("via console from")),
        "{trail}"
    );

    // Someone the provider knows but the policy does not is refused.
    rig.browser
        .find(Locator::Css("form.signout button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    rig.browser.delete_all_cookies().await.unwrap();
    rig.sign_in("bob").await;
    assert!(
        rig.text("p.error").await.contains("oidc:bob@example.org"),
        "refused by name"
    );
    rig.shot("refused").await;

    // Issue 21, finding 4: a sign-in's callback works once. Replayed with
    // its cookie, the broker refuses it without calling the provider; the
    // provider's error text is never shown.
    let start = raw(rig.http, "GET /ui/oidc/start HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let state = start
        .split("state=")
        .nth(1)
        .and_then(|r| r.split(['&', '\r']).next())
        .unwrap_or_else(|| panic!("no state in {start}"))
        .to_owned();
    let cookie = start
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .and_then(|l| l.split_once(':'))
        .and_then(|(_, c)| c.trim().split(';').next())
        .unwrap_or_else(|| panic!("no cookie in {start}"))
        .to_owned();
    let callback = format!(
        "GET /ui/oidc/callback?code=junk&state={state} HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n"
    );
    let first = raw(rig.http, &callback).await;
    assert!(first.starts_with("HTTP/1.1 401"), "{first}");
    let again = raw(rig.http, &callback).await;
    assert!(again.starts_with("HTTP/1.1 400"), "{again}");
    assert!(again.contains("used already"), "{again}");
    let told = raw(
        rig.http,
        "GET /ui/oidc/callback?error=%3Cb%3Eacme+says+call+555%3C%2Fb%3E HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(
        told.contains("(unknown)") && !told.contains("555"),
        "{told}"
    );
    // Issue 21, finding 4: one address starts (and finishes) a bounded
    // number of sign-ins: each start leaves a mark in the store and each
    // callback calls the provider with the client secret.
    let mut refused = None;
    for n in 0..40 {
        let r = raw(rig.http, "GET /ui/oidc/start HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if r.starts_with("HTTP/1.1 429") {
            refused = Some((n, r));
            break;
        }
        assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    }
    let (n, r) = refused.expect("40 sign-ins from one address in a row were all started");
    assert!(n <= 30, "{n} started before the first refusal");
    assert!(r.to_ascii_lowercase().contains("retry-after: "), "{r}");
    let callback = raw(rig.http, &callback).await;
    assert!(callback.starts_with("HTTP/1.1 429"), "{callback}");
    rig.browser.close().await.unwrap();
}

/// One HTTP/1.1 exchange on a new connection: the whole response as text.
async fn raw(http: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    let request = request.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_link_works_once_in_its_minute_and_no_one_approves_their_own() {
    let Some(t) = tools("a_one_time_link_works_once_in_its_minute_and_no_one_approves_their_own")
    else {
        return;
    };
    let rig = Rig::new(&t).await;
    // Made now, opened only after its minute.
    let late = rig.cli("workload", &["ui", "login"]);
    assert_eq!(late.status.code(), Some(0));
    let late_link = String::from_utf8_lossy(&late.stdout).trim().to_owned();
    let made = Instant::now();

    // The requester is an approver too, yet never of its own request.
    let waiting = rig.waiting_request("my own", &[]);
    let o = rig.cli("workload", &["ui", "login"]);
    let link = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert!(link.starts_with(&rig.url("/ui/login/link?t=")), "{link}");
    rig.open_link(&link, "spiffe://portcullis.dev/ns/demo/sa/app")
        .await;
    assert_eq!(
        rig.text("span.who").await,
        "spiffe://portcullis.dev/ns/demo/sa/app"
    );
    rig.shot("link-signed-in").await;
    assert!(
        rig.text("#live")
            .await
            .contains("Nothing is waiting for you"),
        "its own request is not listed"
    );
    // Its request page has no forms; a POST with a valid CSRF token is
    // still refused by the engine's rule.
    let mine = rig.cli(
        "workload",
        &["--output", "json", "requests", "list", "--mine"],
    );
    let list: serde_json::Value = serde_json::from_slice(&mine.stdout).unwrap();
    let id = list["requests"][0]["id"].as_str().unwrap().to_owned();
    rig.browser
        .goto(&rig.url(&format!("/ui/requests/{id}")))
        .await
        .unwrap();
    assert!(rig.browser.find(Locator::Css("#approve")).await.is_err());
    let csrf = rig
        .browser
        .find(Locator::Css("form.signout input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let (status, body) = rig
        .forged_post(
            &format!("/ui/requests/{id}/approve"),
            &format!("csrf={csrf}&reason=mine"),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("cannot decide it"), "{body}");
    // With the right token but from another site's page: refused first.
    let (status, body) = rig
        .post_from(
            "https://evil.example",
            &format!("/ui/requests/{id}/approve"),
            &format!("csrf={csrf}&reason=mine"),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("did not come from the console"), "{body}");
    assert_eq!(state_of(&rig, &id), "pending");
    drop(waiting);

    // The same link a second time: used up.
    rig.browser.delete_all_cookies().await.unwrap();
    rig.browser.goto(&link).await.unwrap();
    assert!(rig.text("p.error").await.contains("used up or expired"));
    rig.shot("link-used").await;

    // An unused link after its minute: refused too.
    let wait = Duration::from_secs(61).saturating_sub(made.elapsed());
    tokio::time::sleep(wait).await;
    rig.browser.goto(&late_link).await.unwrap();
    assert!(rig.text("p.error").await.contains("used up or expired"));
    assert!(rig.browser.find(Locator::Css("span.who")).await.is_err());

    // Access taken away in the policy ends a live session at the next click.
    let o = rig.cli("workload", &["ui", "login"]);
    let link = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    rig.open_link(&link, "spiffe://portcullis.dev/ns/demo/sa/app")
        .await;
    rig.element("span.who").await;
    let policy = POLICY.replace(r#", "spiffe://portcullis.dev/ns/demo/sa/app"]"#, "]");
    assert_ne!(policy, POLICY);
    std::fs::write(rig.dir.join("policy.toml"), policy).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        rig.browser.goto(&rig.url("/ui/pending")).await.unwrap();
        if rig.browser.current_url().await.unwrap().path() == "/ui/login" {
            break;
        }
        assert!(
            Instant::now() < until,
            "still signed in after the policy dropped it"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    rig.browser.close().await.unwrap();
}
