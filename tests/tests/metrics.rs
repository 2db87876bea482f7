//! Prometheus metrics: off unless configured; when on, `GET /metrics` gives what an
//! operator watches (outbox by state, envelopes answered, the audit log and its newest
//! checkpoint, the directory) and nothing that names a case, a person or a member.

use std::time::Duration;

use corridor_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A loopback port free at the time of asking.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn serve_metrics(fed: &Federation, org: &str) -> u16 {
    let port = free_port();
    let config = &fed.org(org).config;
    let mut text = std::fs::read_to_string(config).expect("config");
    text.push_str(&format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    std::fs::write(config, text).expect("config");
    port
}

/// The response to `GET path` on `port`: status line and body.
async fn get(port: u16, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics listener");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_show_the_outbox_the_envelopes_answered_and_the_log() {
    let fed = Federation::demo("metrics");
    let sender_port = serve_metrics(&fed, SHELTER_MY);
    let recipient_port = serve_metrics(&fed, SHELTER_KH);
    let _recipient = fed.start(SHELTER_KH);
    // The third witness, so that a majority of each log's witnesses cosigns.
    let _embassy = fed.start(EMBASSY);
    let sender = fed.start(SHELTER_MY);
    let mut s = sender.client().await;
    let case_id = case_with_consent(&mut s, SHELTER_KH, "reintegration").await;
    let sent = send_delivered(&mut s, &case_id, SHELTER_KH, "reintegration").await;

    let (status, at_sender) = get(sender_port, "/metrics").await;
    assert!(status.ends_with("200 OK"), "{status}");
    assert_eq!(
        value(&at_sender, "corridor_outbox_items{state=\"delivered\"}"),
        Some(1.0),
        "{at_sender}"
    );
    assert_eq!(
        value(&at_sender, "corridor_outbox_items{state=\"queued\"}"),
        Some(0.0)
    );
    assert!(value(&at_sender, "corridor_audit_log_entries").is_some_and(|n| n >= 3.0));
    assert!(value(&at_sender, "corridor_storage_commits_total").is_some_and(|n| n >= 1.0));
    assert_eq!(value(&at_sender, "corridor_directory_serial"), Some(1.0));
    assert!(
        at_sender.contains("corridor_build_info{version=\""),
        "{at_sender}"
    );
    assert!(
        at_sender.ends_with("# EOF\n"),
        "OpenMetrics text ends with its marker"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let at_recipient = loop {
        let (_, body) = get(recipient_port, "/metrics").await;
        let vouched = "corridor_audit_served_checkpoint_vouched_timestamp_seconds";
        if value(&body, "corridor_audit_checkpoint_size").is_some_and(|n| n >= 2.0)
            && value(&body, vouched).is_some_and(|t| t > 1.7e9)
        {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        value(
            &at_recipient,
            "corridor_envelopes_answered_total{outcome=\"accepted\"}"
        ),
        Some(1.0),
        "{at_recipient}"
    );
    assert!(
        value(
            &at_recipient,
            "corridor_audit_checkpoint_signed_timestamp_seconds"
        )
        .is_some_and(|t| t > 1.7e9)
    );
    assert!(
        value(&at_recipient, "corridor_audit_served_checkpoint_size").is_some_and(|n| n >= 1.0)
    );
    // Counts only: no member, case or consent is named.
    for named in [
        SHELTER_MY,
        SHELTER_KH,
        EMBASSY,
        case_id.as_str(),
        sent.referral_id.as_str(),
    ] {
        assert!(
            !at_sender.contains(named) && !at_recipient.contains(named),
            "{named}"
        );
    }

    let (status, _) = get(sender_port, "/other").await;
    assert!(status.ends_with("404 Not Found"), "{status}");
}
