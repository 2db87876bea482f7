//! Talking to a node's local caseworker API: connection, bearer token, and turning gRPC
//! errors into one clear sentence.

use corridor_proto::v1::caseworker_client::CaseworkerClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[derive(Clone)]
pub struct BearerToken(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Client = CaseworkerClient<InterceptedService<Channel, BearerToken>>;

/// Connects to the local API at `url` with `token`.
pub async fn connect(url: &str, token: &str) -> Result<Client, String> {
    let value = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| "the token contains characters that cannot be sent".to_string())?;
    let invalid = || {
        format!(
            "{url} is not a valid node address (expected http://host:port, e.g. http://127.0.0.1:7080)"
        )
    };
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|_| invalid())?;
    // `notaurl` parses as a bare path, and the local API speaks plain HTTP/2 only.
    if endpoint.uri().host().is_none()
        || !endpoint
            .uri()
            .scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("http"))
    {
        return Err(invalid());
    }
    // The local API is plain HTTP/2: the token would cross the network in the clear.
    let host = endpoint.uri().host().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!(
            "{url} is not on this machine: the local API is not encrypted, so the CLI sends \
             tokens only over loopback (reach a remote node through an SSH tunnel)"
        ));
    }
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot reach the node at {url}: {}", source_text(&e)))?;
    check_local_api(url, channel.clone()).await?;
    Ok(
        CaseworkerClient::with_interceptor(channel, BearerToken(value))
            .max_decoding_message_size(4 * 1024 * 1024),
    )
}

/// Asks the listener for its health, which the local API answers without a token. Any
/// other listener, such as a node's federation port (TLS), fails every call with a bare
/// transport error; this says what is wrong instead, once.
async fn check_local_api(url: &str, channel: Channel) -> Result<(), String> {
    let mut health = HealthClient::new(channel);
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), health.check(request)).await {
        Ok(Ok(_)) => Ok(()),
        // A server without health checking could still be a local API: let calls tell.
        Ok(Err(status)) if status.code() == Code::Unimplemented => Ok(()),
        // A TLS listener answers plain HTTP/2 with garbage, which h2 reports as a
        // protocol error; anything else is a node that went away.
        Ok(Err(status))
            if status.message().contains("protocol error")
                || status.message().contains("http2 error") =>
        {
            Err(format!(
                "{url} does not answer as a Corridor node's local API ({}): give the [local] listen address of the node's configuration, not its federation one",
                status.message()
            ))
        }
        Ok(Err(status)) => Err(format!(
            "the node at {url} stopped answering: {}",
            status.message()
        )),
        Err(_) => Err(format!("the node at {url} did not answer within 5 s")),
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    text
}

/// One sentence for a gRPC error.
pub fn explain(status: &Status) -> String {
    let message = status.message();
    match status.code() {
        Code::Unauthenticated => format!("the node did not accept the token: {message}"),
        Code::Unavailable => format!("the node is unavailable: {message}"),
        // Their messages say what went wrong in the caller's terms.
        Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Aborted => message.to_owned(),
        // The local API itself never answers OutOfRange: it is a message size limit.
        Code::OutOfRange => format!("a message is larger than the local API allows: {message}"),
        code => format!("{message} ({code:?})"),
    }
}
