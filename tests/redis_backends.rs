//! The Redis backends against a real Redis: several independent clients share one set
//! of limits and caps, and the failure policies hold when Redis goes away.
//!
//! Needs `TOKENWISE_REDIS_URL` (e.g. `redis://127.0.0.1:6379`) and the `redis` feature;
//! without the variable every test says it is skipped. Each test uses its own key prefix
//! and deletes its keys when done.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokenwise::budget::{Budget, BudgetWindow, RedisBudget, SpendCap};
use tokenwise::limiter::{Admission, LimitRule, Limiter, Quota, RedisLimiter, Unit};
use tokenwise::provider::SimulatedProvider;
use tokenwise::{
    ChatRequest, Cost, Error, ManualClock, OnRedisError, Pipeline, RedisConnection, RequestMeta,
    ScopeKind, Timestamp,
};

fn url() -> Option<String> {
    match std::env::var("TOKENWISE_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!(
                "skipped: set TOKENWISE_REDIS_URL (e.g. redis://127.0.0.1:6379) to run the Redis tests"
            );
            None
        }
    }
}

fn prefix(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "twtest:{test}:{}:{nanos}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes a test's keys when it ends, also when it fails.
struct Cleanup {
    url: String,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<u64> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

fn meta(user: &str) -> RequestMeta {
    let mut m = RequestMeta::default();
    m.user = Some(user.into());
    m.org = Some("acme".into());
    m
}

fn nz(n: u64) -> std::num::NonZeroU64 {
    std::num::NonZeroU64::new(n).unwrap()
}

fn rules() -> Vec<LimitRule> {
    vec![
        LimitRule {
            scope: ScopeKind::User,
            unit: Unit::Requests,
            quota: Quota::per_minute(nz(30)),
        },
        LimitRule {
            scope: ScopeKind::Global,
            unit: Unit::Requests,
            quota: Quota::per_minute(nz(1_000)),
        },
        LimitRule {
            scope: ScopeKind::User,
            unit: Unit::Tokens,
            quota: Quota::per_minute(nz(10_000)),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_clients_never_admit_more_than_one_limit() {
    let Some(url) = url() else { return };
    let p = prefix("limit");
    let _cleanup = Cleanup {
        url: url.clone(),
        prefix: p.clone(),
    };
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_800_000_000)));
    let clients: Vec<RedisLimiter> = (0..3)
        .map(|_| {
            RedisLimiter::new(RedisConnection::new(&url, &p).unwrap(), rules())
                .unwrap()
                .clock(clock.clone())
        })
        .collect();
    let mut tasks = Vec::new();
    for c in clients.clone() {
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..50 {
                match c.acquire(&Admission::new(&meta("ann"), 10)).await {
                    Ok(()) => ok += 1,
                    Err(Error::RateLimited { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            ok
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(
        admitted, 30,
        "30 a minute for ann across all three clients, not 90"
    );
    // a refusal says when, exactly
    let e = clients[0]
        .acquire(&Admission::new(&meta("ann"), 10))
        .await
        .unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
    clock.advance(Duration::from_secs(2));
    clients[1]
        .acquire(&Admission::new(&meta("ann"), 10))
        .await
        .unwrap();
    // all or nothing: bob's refusal by his token limit consumes nothing of his requests
    let e = clients[2]
        .acquire(&Admission::new(&meta("bob"), 20_000))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidRequest(_)),
        "more than the token burst: {e}"
    );
    for _ in 0..10 {
        clients[2]
            .acquire(&Admission::new(&meta("bob"), 1_000))
            .await
            .unwrap();
    }
    assert!(
        clients[0]
            .acquire(&Admission::new(&meta("bob"), 1_000))
            .await
            .is_err(),
        "token limit reached"
    );
    // a refund lets the next one in
    clients[1].reconcile(&meta("bob"), 1_000, 0).await.unwrap();
    clients[0]
        .acquire(&Admission::new(&meta("bob"), 1_000))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_clients_never_overshoot_one_spend_cap() {
    let Some(url) = url() else { return };
    let p = prefix("budget");
    let _cleanup = Cleanup {
        url: url.clone(),
        prefix: p.clone(),
    };
    let cap = Cost::from_micros(5_000);
    let caps = [SpendCap {
        scope: ScopeKind::User,
        limit: cap,
        window: BudgetWindow::Day,
    }];
    let alerts = Arc::new(AtomicU64::new(0));
    let budgets: Vec<RedisBudget> = (0..3)
        .map(|_| {
            let a = Arc::clone(&alerts);
            RedisBudget::new(RedisConnection::new(&url, &p).unwrap(), caps)
                .unwrap()
                .on_alert(move |_| {
                    a.fetch_add(1, Ordering::SeqCst);
                })
        })
        .collect();
    let mut tasks = Vec::new();
    for i in 0..300u64 {
        let b = budgets[(i % 3) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let worst = Cost::from_micros(40 + i % 50);
            match b.reserve(&meta("ann"), worst).await {
                Ok(r) => {
                    tokio::task::yield_now().await;
                    let actual = Cost::from_nanos(worst.as_nanos() * (5 + i % 6) / 10);
                    b.commit(r, actual).await.unwrap();
                    actual.as_nanos()
                }
                Err(Error::BudgetExceeded { .. }) => 0,
                Err(e) => panic!("{e}"),
            }
        }));
    }
    let mut spent = 0;
    for t in tasks {
        spent += t.await.unwrap();
    }
    let st = budgets[0].status(&meta("ann")).await.unwrap();
    assert_eq!(st[0].spent, Cost::from_nanos(spent));
    assert!(st[0].spent <= cap, "{} > {}", st[0].spent, cap);
    assert_eq!(st[0].reserved, Cost::ZERO);
    let fired = alerts.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&fired),
        "each threshold fires once across the replicas: {fired}"
    );
}

#[tokio::test]
async fn pipelines_on_three_replicas_share_limits_and_caps() {
    let Some(url) = url() else { return };
    let p = prefix("pipeline");
    let _cleanup = Cleanup {
        url: url.clone(),
        prefix: p.clone(),
    };
    let replicas: Vec<Pipeline> = (0..3)
        .map(|_| {
            let limiter = RedisLimiter::new(
                RedisConnection::new(&url, &p).unwrap(),
                [LimitRule {
                    scope: ScopeKind::User,
                    unit: Unit::Requests,
                    quota: Quota::per_minute(nz(12)),
                }],
            )
            .unwrap();
            let budget = RedisBudget::new(
                RedisConnection::new(&url, &p).unwrap(),
                [SpendCap {
                    scope: ScopeKind::Org,
                    limit: Cost::from_dollars(1),
                    window: BudgetWindow::Month,
                }],
            )
            .unwrap();
            Pipeline::builder()
                .provider(
                    SimulatedProvider::builder()
                        .time_to_first_token(Duration::ZERO)
                        .per_token(Duration::ZERO)
                        .build()
                        .unwrap(),
                )
                .default_model("gpt-4o-mini")
                .limiter(Arc::new(limiter))
                .budget(Arc::new(budget))
                .no_cache()
                .build()
                .unwrap()
        })
        .collect();
    let mut served = 0;
    let mut limited = 0;
    for i in 0..30 {
        match replicas[i % 3]
            .chat(
                ChatRequest::user_text(format!("q{i}"))
                    .user("ann")
                    .org("acme")
                    .max_tokens(50),
            )
            .await
        {
            Ok(_) => served += 1,
            Err(Error::RateLimited { .. }) => limited += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        (served, limited),
        (12, 18),
        "12 a minute across the replicas"
    );
    let st = replicas[2]
        .budget_status(&ChatRequest::new().user("ann").org("acme").meta)
        .await
        .unwrap();
    let total: Cost = replicas.iter().map(|r| r.usage().totals.cost).sum();
    assert_eq!(
        st[0].spent, total,
        "every replica's spend is in the one account"
    );
}

#[tokio::test]
async fn unreachable_redis_follows_the_configured_policy() {
    // Port 1 on loopback: nothing listens, so every command fails at once.
    let conn = RedisConnection::with_timeouts(
        "redis://127.0.0.1:1",
        "twtest",
        Duration::from_millis(100),
        Duration::from_millis(100),
    )
    .unwrap();
    let closed = RedisLimiter::new(conn.clone(), rules()).unwrap();
    let e = closed
        .acquire(&Admission::new(&meta("ann"), 1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Backend {
                component: "limiter",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_retryable());
    let open = RedisLimiter::new(conn.clone(), rules())
        .unwrap()
        .on_error(OnRedisError::FailOpen);
    open.acquire(&Admission::new(&meta("ann"), 1))
        .await
        .unwrap();
    let caps = [SpendCap {
        scope: ScopeKind::User,
        limit: Cost::from_dollars(1),
        window: BudgetWindow::Day,
    }];
    let budget = RedisBudget::new(conn.clone(), caps).unwrap();
    assert!(matches!(
        budget.reserve(&meta("ann"), Cost::from_cents(1)).await,
        Err(Error::Backend { .. })
    ));
    let lenient = RedisBudget::new(conn, caps)
        .unwrap()
        .on_error(OnRedisError::FailOpen);
    let r = lenient
        .reserve(&meta("ann"), Cost::from_cents(1))
        .await
        .unwrap();
    lenient.commit(r, Cost::from_cents(1)).await.unwrap();
    // through a pipeline: fail closed refuses with a typed, retryable error, no panic
    let p = Pipeline::builder()
        .provider(SimulatedProvider::new())
        .default_model("gpt-4o-mini")
        .limiter(Arc::new(closed))
        .build()
        .unwrap();
    let e = p
        .chat(ChatRequest::user_text("hi").user("ann").max_tokens(50))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e}");
}

/// Starts a private redis-server on a free loopback port, if the binary is installed.
fn start_redis(port: u16) -> Option<std::process::Child> {
    std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

async fn wait_until_up(conn: &RedisConnection) -> bool {
    for _ in 0..100 {
        if conn.clear().await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn redis_stopping_mid_run_then_returning() {
    if url().is_none() {
        return;
    }
    let port = free_port();
    let Some(mut server) = start_redis(port) else {
        eprintln!("skipped: no redis-server binary to start a private instance");
        return;
    };
    let u = format!("redis://127.0.0.1:{port}");
    let conn = RedisConnection::with_timeouts(
        &u,
        "twtest",
        Duration::from_millis(200),
        Duration::from_millis(200),
    )
    .unwrap();
    assert!(wait_until_up(&conn).await, "private redis did not start");
    let limiter = RedisLimiter::new(conn.clone(), rules()).unwrap();
    limiter
        .acquire(&Admission::new(&meta("ann"), 1))
        .await
        .unwrap();

    // Redis goes away mid-run: fail closed, typed error, no panic
    let _ = server.kill();
    let _ = server.wait();
    let e = limiter
        .acquire(&Admission::new(&meta("ann"), 1))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e}");

    // it comes back on the same port: service resumes without a restart
    let Some(mut again) = start_redis(port) else {
        return;
    };
    let mut resumed = false;
    for _ in 0..100 {
        if limiter
            .acquire(&Admission::new(&meta("ann"), 1))
            .await
            .is_ok()
        {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = again.kill();
    let _ = again.wait();
    assert!(resumed, "the limiter works again once Redis is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cached_by_one_replica_is_a_hit_on_the_others() {
    use tokenwise::cache::{
        Cache, CacheQuery, CacheScope, Invalidation, RedisCache, SemanticCache,
    };
    use tokenwise::{ChatResponse, FinishReason, Usage};
    let Some(url) = url() else { return };
    let p = prefix("cache");
    let _cleanup = Cleanup {
        url: url.clone(),
        prefix: p.clone(),
    };
    let replica = || {
        RedisCache::start(
            SemanticCache::builder().build().unwrap(),
            RedisConnection::new(&url, &p).unwrap(),
            RedisConnection::new(&url, &p).unwrap(),
        )
        .unwrap()
    };
    let (a, b, c) = (replica(), replica(), replica());
    let q = |text: &str| {
        CacheQuery::for_request(
            &ChatRequest::user_text(text).cache_tag("faq"),
            CacheScope::Global,
        )
        .unwrap()
    };
    let answer = ChatResponse::new(
        "Settings, then Security, then Reset.",
        "m",
        "p",
        Usage::new(12, 8),
        FinishReason::Stop,
    );
    a.put(&q("How do I reset my password?"), &answer)
        .await
        .unwrap();

    // b finds it semantically (a paraphrase, not the exact key) once a's event arrives
    let mut found = None;
    for _ in 0..100 {
        if let Some(hit) = b.get(&q("how do i reset my password")).await.unwrap() {
            found = Some(hit);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hit = found.expect("the semantic entry reached the other replica");
    assert_eq!(hit.response.content, answer.content);
    // c finds the exact entry in Redis at once, event or not
    assert!(
        c.get(&q("How do I reset my password?"))
            .await
            .unwrap()
            .is_some()
    );
    // a near miss stays a miss everywhere
    assert!(
        b.get(&q("How do I not reset my password?"))
            .await
            .unwrap()
            .is_none()
    );

    // an invalidation on one replica reaches the others
    c.invalidate(&Invalidation::Tag("faq".into()))
        .await
        .unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if b.get(&q("how do i reset my password"))
            .await
            .unwrap()
            .is_none()
            && a.get(&q("How do I reset my password?"))
                .await
                .unwrap()
                .is_none()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "invalidated on every replica and in Redis");

    // a replica started later warms its index from the stream
    a.put(&q("What are your opening hours?"), &answer)
        .await
        .unwrap();
    let late = replica();
    let mut warmed = false;
    for _ in 0..100 {
        if late.local().indexed() > 0 {
            warmed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(warmed, "the late replica replayed the stream");
}
