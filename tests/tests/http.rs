//! The generator's HTTP/JSON API over a real server on loopback: the gRPC methods in proto3 JSON,
//! the same validation, statuses mapped to HTTP, progress as server-sent events.

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

fn json(response: &str) -> serde_json::Value {
    serde_json::from_str(body(response)).unwrap_or_else(|e| panic!("{e}: {response}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_generates_streams_and_maps_errors() {
    let (_guide, generator) = dlm_tests::stack(&["e2e-semantic"], &[]).await;
    let request =
        r#"{"n": 2, "steps": 40, "seed": "7", "controls": [{"targets": ["food=Italian"]}]}"#;
    let (status, r) = generator.http(
        "POST",
        "/v1/generate",
        &["Content-Type: application/json"],
        request,
    );
    assert_eq!(status, 200, "{r}");
    let v = json(&r);
    assert_eq!(v["samples"].as_array().unwrap().len(), 2);
    assert_eq!(v["seed"], "7");
    // The same request over gRPC gives the same texts: one engine, one validation.
    let grpc = generator
        .client()
        .await
        .generate(dlm_tests::request("", 2, 40, 7, &["food=Italian"]))
        .await
        .unwrap()
        .into_inner();
    for (h, g) in v["samples"].as_array().unwrap().iter().zip(&grpc.samples) {
        assert_eq!(h["text"], g.text.as_str());
    }

    // Server-sent events: progress, then the result.
    let stream = r#"{"n": 1, "steps": 40, "seed": "3", "progressEvery": 10}"#;
    let (status, r) = generator.http(
        "POST",
        "/v1/generate",
        &["Accept: text/event-stream"],
        stream,
    );
    assert_eq!(status, 200, "{r}");
    assert!(r.contains("content-type: text/event-stream"), "{r}");
    let progress = r.matches("event: progress").count();
    assert_eq!(progress, 3, "{r}");
    let result = body(&r).rsplit("event: result\ndata: ").next().unwrap();
    let v: serde_json::Value = serde_json::from_str(result.lines().next().unwrap()).unwrap();
    assert_eq!(v["samples"].as_array().unwrap().len(), 1);

    // Errors: the gRPC status, as JSON, with the mapped HTTP status.
    for (req, code, status, needle) in [
        (r#"{"n": 0}"#, "INVALID_ARGUMENT", 400, "`n`"),
        (
            r#"{"n": 1, "guidance": {"stepSize": 1e30}}"#,
            "INVALID_ARGUMENT",
            400,
            "guidance.step_size",
        ),
        (
            r#"{"n": 1, "controls": [{"targets": ["food=Martian"]}]}"#,
            "INVALID_ARGUMENT",
            400,
            "Martian",
        ),
        (
            r#"{"n": "many"}"#,
            "INVALID_ARGUMENT",
            400,
            "GenerateRequest",
        ),
    ] {
        let (got, r) = generator.http("POST", "/v1/generate", &[], req);
        assert_eq!(got, status, "{req}: {r}");
        let v = json(&r);
        assert_eq!(v["code"], code, "{r}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{r}");
    }

    let (status, r) = generator.http("GET", "/v1/describe", &[], "");
    assert_eq!(status, 200);
    let v = json(&r);
    assert_eq!(v["model"]["name"], "e2e-deep");
    assert_eq!(v["guides"][0]["name"], "e2e-semantic");
    assert_eq!(generator.http("GET", "/healthz", &[], "").0, 200);
    assert_eq!(generator.http("GET", "/readyz", &[], "").0, 200);
    let (status, r) = generator.http("GET", "/openapi.json", &[], "");
    assert_eq!(status, 200);
    assert!(json(&r)["paths"]["/v1/generate"]["post"].is_object());
    let (status, r) = generator.http("GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(r.contains("dlm playground"));
}
