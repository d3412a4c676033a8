//! What an S3 endpoint can make a process hold in memory through the AWS
//! SDK, which reads every answer but an object's content whole, with no
//! limit of its own: a listing page (the first of a storage opened anew
//! goes through the SDK), an upload's or a delete's answer, an error's
//! text, an STS answer. Each is cut at [`MAX_PAGE_BYTES`] here, around the
//! SDK's HTTP connector, where every answer passes; a successful
//! `GetObject` is left whole (read as a stream by callers with limits of
//! their own).
use aws_sdk_s3::config::ConfigBag;
use aws_sdk_s3::primitives::SdkBody;
use aws_smithy_runtime_api::{
    box_error::BoxError,
    client::{
        http::{
            HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings,
            SharedHttpClient, SharedHttpConnector,
        },
        interceptors::context::InterceptorContext,
        orchestrator::HttpRequest,
        retries::classifiers::{ClassifyRetry, RetryAction},
        runtime_components::{RuntimeComponents, RuntimeComponentsBuilder},
    },
};

use crate::storage::{
    capped::{Capped, TOO_BIG, too_big_text},
    retry::{MAX_PAGE_BYTES, error_chain},
};

/// The SDK's (guarded) HTTP client with its answers bounded.
#[derive(Debug)]
pub(super) struct BoundedClient(pub(super) SharedHttpClient);

impl HttpClient for BoundedClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(BoundedConnector(
            self.0.http_connector(settings, components),
        ))
    }

    fn validate_base_client_config(
        &self,
        components: &RuntimeComponentsBuilder,
        cfg: &ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.validate_base_client_config(components, cfg)
    }

    fn validate_final_config(
        &self,
        components: &RuntimeComponents,
        cfg: &ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.validate_final_config(components, cfg)
    }
}

#[derive(Debug)]
struct BoundedConnector(SharedHttpConnector);

impl HttpConnector for BoundedConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let content = request.method() == "GET" && is_get_object(request.uri());
        let answer = self.0.call(request);
        HttpConnectorFuture::new(async move {
            let mut response = answer.await?;
            if !(content && response.status().is_success()) {
                let body = response.take_body();
                *response.body_mut() =
                    SdkBody::from_body_1_x(Capped::new(body, MAX_PAGE_BYTES, too_big));
            }
            Ok(response)
        })
    }
}

/// A `GetObject` request, which the SDK marks `x-id=GetObject` in its
/// query (a key's own `?` and `=` are percent-encoded in the path).
fn is_get_object(uri: &str) -> bool {
    uri.split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|pair| pair == "x-id=GetObject"))
}

fn too_big() -> BoxError {
    too_big_text(MAX_PAGE_BYTES).into()
}

/// Forbids the SDK's retry of an answer cut at the limit: it retries any
/// answer that failed to arrive, so an endpoint sending too much was read
/// (32 MiB each time) as many times as a request is tried.
#[derive(Debug)]
pub(super) struct NoRetryOfTooBig;

impl ClassifyRetry for NoRetryOfTooBig {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        match ctx.output_or_error() {
            Some(Err(err)) if error_chain(err).contains(TOO_BIG) => RetryAction::RetryForbidden,
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "no retry of an answer over its limit"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_object_answers_are_content() {
        assert!(is_get_object("http://h/b/k.json?x-id=GetObject"));
        assert!(is_get_object(
            "https://b.s3.amazonaws.com/k?a=1&x-id=GetObject"
        ));
        assert!(!is_get_object(
            "http://h/b?list-type=2&prefix=x-id%3DGetObject"
        ));
        assert!(!is_get_object("http://h/b/x-id=GetObject"));
        assert!(!is_get_object("http://h/b/k?x-id=PutObject"));
    }
}
