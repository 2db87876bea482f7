//! Talking to a node's local caseworker API: connection, bearer token, and turning gRPC
//! errors into one clear sentence.

use corridor_proto::v1::caseworker_client::CaseworkerClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

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
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| format!("{url} is not a valid node address (expected http://host:port)"))?;
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
    Ok(
        CaseworkerClient::with_interceptor(channel, BearerToken(value))
            .max_decoding_message_size(4 * 1024 * 1024),
    )
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
        Code::NotFound | Code::InvalidArgument | Code::FailedPrecondition => message.to_owned(),
        code => format!("{message} ({code:?})"),
    }
}
