//! A fixed-answer OpenAI-compatible upstream for measuring what the gateway adds: every
//! `POST /v1/chat/completions` gets the same small answer at once, whole or streamed,
//! over hyper's HTTP/1.1 server with keep-alive. Shared by `examples/fixed_upstream.rs`
//! and `examples/gateway_bench.rs`.

#![allow(dead_code)]

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The largest request body read.
const MAX_BODY: usize = 1 << 20;

const WHOLE: &str = r#"{"id":"chatcmpl-fixed","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"A fixed answer."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}}"#;

const STREAM: &str = concat!(
    "data: {\"id\":\"chatcmpl-fixed\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"A fixed answer.\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-fixed\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"chatcmpl-fixed\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":4,\"total_tokens\":16}}\n\n",
    "data: [DONE]\n\n",
);

fn reply(status: StatusCode, content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

async fn answer(req: hyper::Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() != hyper::Method::POST || !req.uri().path().ends_with("/chat/completions") {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"error":{"message":"not found","type":"invalid_request_error"}}"#,
        ));
    }
    let body: Bytes = match axum::body::to_bytes(Body::new(req.into_body()), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                "application/json",
                r#"{"error":{"message":"bad body","type":"invalid_request_error"}}"#,
            ));
        }
    };
    let streaming = body.windows(13).any(|w| w == b"\"stream\":true");
    Ok(if streaming {
        reply(StatusCode::OK, "text/event-stream", STREAM)
    } else {
        reply(StatusCode::OK, "application/json", WHOLE)
    })
}

/// Serves the fixed answer on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service_fn(answer))
                .await;
        });
    }
}
