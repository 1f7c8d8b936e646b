//! A fixed-answer OpenAI-compatible upstream, for measuring a gateway in front of it:
//! every chat completion gets the same small answer at once, whole or streamed.
//!
//! ```text
//! cargo run --release --example fixed_upstream -- --port 9090
//! cargo run --release --example gateway -- --upstream http://127.0.0.1:9090/v1
//! ```
//!
//! `examples/gateway_bench.rs` runs both in one process and measures them side by side.

#[path = "support/fixed_upstream.rs"]
mod fixed_upstream;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut port = 9090u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--port", Some(p)) => match p.parse() {
                Ok(p) => port = p,
                Err(e) => {
                    eprintln!("--port: {e}");
                    std::process::exit(2);
                }
            },
            _ => {
                eprintln!("usage: fixed_upstream [--port N]");
                std::process::exit(2);
            }
        }
    }
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("fixed upstream on http://{a}/v1"),
        Err(e) => eprintln!("{e}"),
    }
    fixed_upstream::serve(listener).await;
}
