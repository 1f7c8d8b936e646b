//! Checks per second of the Redis limiter against a local Redis, and round trips per
//! request. Needs the `redis` feature and a Redis at `TOKENWISE_REDIS_URL`
//! (default `redis://127.0.0.1:6379`).
//!
//! ```text
//! cargo run --release --features redis --example redis_bench
//! ```

#[cfg(feature = "redis")]
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::time::Instant;

    use tokenwise::limiter::{Admission, LimitRule, Limiter, Quota, RedisLimiter, Unit};
    use tokenwise::{RedisConnection, RequestMeta, ScopeKind};

    let url =
        std::env::var("TOKENWISE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("twbench:{}", std::process::id());
    let conn = RedisConnection::new(&url, &prefix)?;
    let big = std::num::NonZeroU64::new(1_000_000_000).ok_or("zero")?;
    let rules = [
        LimitRule {
            scope: ScopeKind::User,
            unit: Unit::Requests,
            quota: Quota::per_minute(big),
        },
        LimitRule {
            scope: ScopeKind::Org,
            unit: Unit::Requests,
            quota: Quota::per_minute(big),
        },
        LimitRule {
            scope: ScopeKind::Global,
            unit: Unit::Requests,
            quota: Quota::per_minute(big),
        },
    ];
    let limiter = RedisLimiter::new(conn.clone(), rules)?;
    let client = redis::Client::open(url.as_str())?;
    let mut admin = client.get_multiplexed_async_connection().await?;
    let processed = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // warm: load the script
    let mut meta = RequestMeta::default();
    meta.user = Some("u0".into());
    meta.org = Some("acme".into());
    limiter.acquire(&Admission::new(&meta, 0)).await?;

    let evalsha = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = processed(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut admin)
            .await?,
    );
    let scripts_before = evalsha(
        redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut admin)
            .await?,
    );
    let concurrency = 32;
    let per_task = 2_000;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let limiter = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let mut meta = RequestMeta::default();
            meta.org = Some("acme".into());
            let mut ok = 0u64;
            for i in 0..per_task {
                meta.user = Some(format!("u{}", (w * per_task + i) % 500));
                if limiter.acquire(&Admission::new(&meta, 0)).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = processed(
        redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut admin)
            .await?,
    );
    let scripts_after = evalsha(
        redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut admin)
            .await?,
    );
    let checks = (concurrency * per_task) as f64;
    // each check is one EVALSHA (one round trip); Redis also counts the GETs and SETs the
    // script runs inside it (INFO itself is one command)
    let per_check = (after.saturating_sub(before).saturating_sub(2)) as f64 / checks;
    let round_trips = scripts_after.saturating_sub(scripts_before) as f64 / checks;
    conn.clear().await?;
    println!("{ok} of {checks} checks admitted in {secs:.2} s, {concurrency} concurrent callers");
    println!(
        "checks_per_s={:.0} round_trips_per_check={round_trips:.2} redis_commands_per_check={per_check:.2}",
        checks / secs
    );
    Ok(())
}

#[cfg(not(feature = "redis"))]
fn main() {
    eprintln!(
        "this example needs the redis feature: cargo run --release --features redis --example redis_bench"
    );
}
