//! The playground page in a real headless browser (Debian's Chromium, driven through ChromeDriver's
//! WebDriver protocol): it loads the guides' fields, a click runs a guided generation, drafts
//! stream in, and the final texts appear. With DLM_PLAYGROUND_SCREENSHOT=FILE it saves a screenshot
//! (the README's).

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use dlm_tests::free_port;
use serde_json::{json, Value};

/// One WebDriver call: JSON in, the `value` of the JSON answer out.
fn webdriver(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read the head, then exactly Content-Length bytes (ChromeDriver may keep the socket open).
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let v: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
    v["value"].clone()
}

struct Driver {
    port: u16,
    child: Child,
    session: Option<String>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // End the session first: the browser then quits and removes its profile and scoped
        // directories from the temp dir, which a killed driver leaves behind. Never panics here.
        if let Some(id) = &self.session {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    s,
                    "DELETE /session/{id} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                );
                let _ = s.read(&mut [0u8; 1024]);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_runs_a_guided_generation_in_a_browser() {
    let (_guide, generator) =
        dlm_tests::stack(&["e2e-semantic", "e2e-names", "e2e-pos", "e2e-spans"], &[]).await;
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver, installed by deploy/setup.sh)");
    let mut driver = Driver {
        port,
        child,
        session: None,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let session = webdriver(
        driver.port,
        "POST",
        "/session",
        Some(
            json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,760"]
            }}}}),
        ),
    );
    let id = session["sessionId"]
        .as_str()
        .expect("a WebDriver session")
        .to_string();
    driver.session = Some(id.clone());
    let call = |method: &str, path: &str, body: Option<Value>| {
        webdriver(driver.port, method, &format!("/session/{id}{path}"), body)
    };
    let script = |js: &str| {
        call(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
    };
    call(
        "POST",
        "/url",
        Some(json!({"url": format!("http://127.0.0.1:{}/", generator.http_port)})),
    );
    // The controls come from Describe: one select per guide field, with its values.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = script("return document.querySelectorAll('select.control').length");
        if n.as_u64() == Some(8) {
            break; // the 8 E2E fields, once each though two guides read name and near
        }
        assert!(
            Instant::now() < deadline,
            "the controls never appeared: {n}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The syntax guides' fields (pos.0 …, span.*) get one tag input and one span input, which the
    // request carries as `syntax`.
    let syntax = script(
        "document.getElementById('pos').value = 'DT NN VBZ';
         document.getElementById('span').value = '0,1,NP';
         const r = request();
         document.getElementById('pos').value = '';
         document.getElementById('span').value = '';
         return {shown: !document.getElementById('syntax').hidden, syntax: r.syntax,
                 guidance: r.guidance || null};",
    );
    assert_eq!(
        syntax,
        json!({"shown": true, "syntax": {"pos": ["DT", "NN", "VBZ"],
               "spans": [{"start": 0, "end": 1, "label": "NP"}]}, "guidance": null}),
        "{syntax}"
    );
    // The guidance modes: the server's default sends none; the control preset and its late
    // hand-over (estimate for the first quarter of 200 steps) send the README's settings.
    let late = script(
        "document.getElementById('guidance').value = 'late';
         const r = request();
         document.getElementById('guidance').value = 'default';
         return {guidance: r.guidance, bestOf: r.bestOf};",
    );
    assert_eq!(
        late,
        json!({"guidance": {"space": "GUIDANCE_SPACE_ESTIMATE", "satisfiedProb": 0.9,
               "estimateUntil": 150}, "bestOf": 4}),
        "{late}"
    );
    script(
        "document.querySelector('select[data-field=food]').value = 'Italian';
         document.querySelector('select[data-field=area]').value = 'riverside';
         document.getElementById('n').value = 3;
         document.getElementById('seed').value = 1;",
    );
    let go = call(
        "POST",
        "/element",
        Some(json!({"using": "css selector", "value": "#go"})),
    );
    let element = go
        .as_object()
        .and_then(|o| o.values().next())
        .and_then(Value::as_str)
        .expect("the Generate button")
        .to_string();
    call(
        "POST",
        &format!("/element/{element}/click"),
        Some(json!({})),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let state = loop {
        let state = script(
            "const s = document.getElementById('status');
             return {done: s.dataset.done || '', progress: Number(s.dataset.progress || 0),
                     status: s.textContent,
                     texts: [...document.querySelectorAll('#texts li.final')].map(l => l.textContent)};",
        );
        if state["done"] == "1" {
            break state;
        }
        assert!(Instant::now() < deadline, "no result in the page: {state}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let texts: Vec<&str> = state["texts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(texts.len(), 3, "{state}");
    assert!(texts.iter().any(|t| t.contains("italian")), "{texts:?}");
    assert!(
        state["progress"].as_u64().unwrap() >= 5,
        "drafts did not stream: {state}"
    );
    assert!(
        state["status"].as_str().unwrap().contains("guidance"),
        "{state}"
    );
    if let Some(path) = std::env::var_os("DLM_PLAYGROUND_SCREENSHOT") {
        let png = call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    call("DELETE", "", None);
}
