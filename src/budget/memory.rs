//! The in-memory spend-cap budget.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use smallvec::SmallVec;

use super::{Budget, BudgetAlert, BudgetWindow, CapStatus, ROLLING_STEPS, Reservation, SpendCap};
use crate::clock::{Clock, Timestamp, default_clock, duration_nanos};
use crate::types::{Cost, RequestMeta, ScopeKind};
use crate::{Error, Result};

/// A callback for [`BudgetAlert`]s. Called outside the budget's lock; keep it quick.
#[derive(Clone)]
pub struct AlertHook(pub(crate) Arc<dyn Fn(&BudgetAlert) + Send + Sync>);

impl AlertHook {
    /// Wraps `f`.
    pub fn new(f: impl Fn(&BudgetAlert) + Send + Sync + 'static) -> Self {
        AlertHook(Arc::new(f))
    }
}

impl fmt::Debug for AlertHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AlertHook")
    }
}

/// Builds a [`MemoryBudget`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryBudgetBuilder {
    caps: Vec<SpendCap>,
    max_accounts: usize,
    thresholds: Vec<u8>,
    hook: Option<AlertHook>,
    clock: Option<Arc<dyn Clock>>,
}

impl MemoryBudgetBuilder {
    /// Caps spend on `scope` (each user, each org, everything, ...) at `limit` per `window`.
    pub fn cap(mut self, scope: ScopeKind, limit: Cost, window: BudgetWindow) -> Self {
        self.caps.push(SpendCap {
            scope,
            limit,
            window,
        });
        self
    }

    /// The most accounts (cap × key × window) kept (default 100,000). Accounts of past
    /// windows and idle keys with nothing spent are dropped first; when every account is
    /// live, new keys are refused with [`Error::Overloaded`].
    pub fn max_accounts(mut self, n: usize) -> Self {
        self.max_accounts = n;
        self
    }

    /// Alert thresholds in per cent of each cap (default 50, 80 and 100). Each fires
    /// once per cap, key and window, when committed spend reaches it.
    pub fn alert_thresholds(mut self, percents: impl IntoIterator<Item = u8>) -> Self {
        self.thresholds = percents.into_iter().collect();
        self
    }

    /// Calls `hook` for every alert (alerts are also logged with `tracing` at warn level).
    pub fn on_alert(mut self, hook: impl Fn(&BudgetAlert) + Send + Sync + 'static) -> Self {
        self.hook = Some(AlertHook::new(hook));
        self
    }

    /// The clock windows are read from (default: [`TscClock`](crate::TscClock), or [`TokioClock`](crate::TokioClock) when built under paused tokio time; see [`clock`](crate::clock)).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Builds the budget.
    pub fn build(mut self) -> Result<MemoryBudget> {
        if self.max_accounts == 0 {
            return Err(Error::Config(
                "budget: max_accounts must be at least 1".into(),
            ));
        }
        if self.caps.iter().any(|c| c.limit.is_zero()) {
            return Err(Error::Config("budget: a cap must be positive".into()));
        }
        if self.caps.iter().any(|c| matches!(c.window, BudgetWindow::Rolling(w) if w < std::time::Duration::from_secs(1))) {
            return Err(Error::Config("budget: a rolling window must be at least one second".into()));
        }
        self.thresholds.sort_unstable();
        self.thresholds.dedup();
        if self.thresholds.len() > 8 || self.thresholds.contains(&0) {
            return Err(Error::Config(
                "budget: up to 8 alert thresholds, each at least 1 %".into(),
            ));
        }
        Ok(MemoryBudget {
            inner: Arc::new(Inner {
                caps: self.caps,
                accounts: Mutex::new(Accounts::default()),
                max_accounts: self.max_accounts,
                thresholds: self.thresholds,
                hook: self.hook,
                next_id: AtomicU64::new(1),
                clock: self.clock.unwrap_or_else(default_clock),
            }),
        })
    }
}

/// A stored account: cap, scope key and window.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AccountKey {
    cap: usize,
    key: Box<str>,
    window: u64,
}

/// An account looked up, borrowing its scope key: hashes and compares as the stored
/// [`AccountKey`] does, so a lookup allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AccountRef<'a> {
    cap: usize,
    key: &'a str,
    window: u64,
}

impl Hash for AccountKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

impl Hash for AccountRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.cap.hash(state);
        self.key.hash(state);
        self.window.hash(state);
    }
}

impl hashbrown::Equivalent<AccountKey> for AccountRef<'_> {
    fn equivalent(&self, k: &AccountKey) -> bool {
        *self == k.as_ref()
    }
}

impl AccountKey {
    fn as_ref(&self) -> AccountRef<'_> {
        AccountRef {
            cap: self.cap,
            key: &self.key,
            window: self.window,
        }
    }
}

impl<'a> AccountRef<'a> {
    fn stored(self) -> AccountKey {
        AccountKey {
            cap: self.cap,
            key: self.key.into(),
            window: self.window,
        }
    }

    /// The account's name in a [`Reservation`]: `cap|window|key`.
    fn name(self) -> String {
        let mut s = String::with_capacity(self.key.len() + 24);
        push_u64(&mut s, self.cap as u64);
        s.push('|');
        push_u64(&mut s, self.window);
        s.push('|');
        s.push_str(self.key);
        s
    }

    /// Reads a name written by [`name`](Self::name), borrowing its key.
    fn parse(s: &'a str) -> Option<Self> {
        /// A decimal number of at least one digit, then `|`; and what follows it.
        fn number(b: &[u8]) -> Option<(u64, &[u8])> {
            let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
            let (&sep, rest) = b.get(digits..)?.split_first()?;
            if digits == 0 || sep != b'|' {
                return None;
            }
            let n = b[..digits].iter().try_fold(0u64, |n, &c| {
                n.checked_mul(10)?.checked_add(u64::from(c - b'0'))
            })?;
            Some((n, rest))
        }
        let (cap, rest) = number(s.as_bytes())?;
        let (window, rest) = number(rest)?;
        let key = s.get(s.len() - rest.len()..)?;
        Some(AccountRef {
            cap: usize::try_from(cap).ok()?,
            key,
            window,
        })
    }
}

/// Appends `n` in decimal (no formatting machinery on the request path).
fn push_u64(s: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    s.extend(buf[i..].iter().map(|b| char::from(*b)));
}

type Accounts = hashbrown::HashMap<AccountKey, Account>;

/// Spend of a rolling window in steps; `head` is the index of the newest step.
#[derive(Debug, Clone)]
struct Ring {
    step_ns: u64,
    head: u64,
    steps: [u64; ROLLING_STEPS as usize],
}

impl Ring {
    fn new(window: std::time::Duration, now: Timestamp) -> Self {
        let step_ns = (duration_nanos(window) / u64::from(ROLLING_STEPS)).max(1);
        Ring {
            step_ns,
            head: now.as_nanos() / step_ns,
            steps: [0; ROLLING_STEPS as usize],
        }
    }

    /// Moves the head to `now`, forgetting steps that left the window.
    fn advance(&mut self, now: Timestamp) {
        let step = now.as_nanos() / self.step_ns;
        if step <= self.head {
            return;
        }
        let n = u64::from(ROLLING_STEPS);
        let gap = (step - self.head).min(n);
        for i in 1..=gap {
            self.steps[((self.head + i) % n) as usize] = 0;
        }
        self.head = step;
    }

    fn total(&self) -> Cost {
        Cost::from_nanos(self.steps.iter().fold(0u64, |a, b| a.saturating_add(*b)))
    }

    fn add(&mut self, now: Timestamp, c: Cost) {
        self.advance(now);
        let slot = &mut self.steps[(self.head % u64::from(ROLLING_STEPS)) as usize];
        *slot = slot.saturating_add(c.as_nanos());
    }
}

#[derive(Debug, Default, Clone)]
struct Account {
    spent: Cost,
    reserved: Cost,
    ring: Option<Box<Ring>>,
    /// Bit i set: threshold i has fired in this window.
    alerted: u8,
    /// The account's name in a [`Reservation`], made at its first reservation (empty
    /// until then): copied into each reservation rather than written out again.
    name: String,
}

impl Account {
    fn spent(&mut self, now: Timestamp) -> Cost {
        match &mut self.ring {
            Some(r) => {
                r.advance(now);
                r.total()
            }
            None => self.spent,
        }
    }
}

#[derive(Debug)]
struct Inner {
    caps: Vec<SpendCap>,
    accounts: Mutex<Accounts>,
    max_accounts: usize,
    thresholds: Vec<u8>,
    hook: Option<AlertHook>,
    next_id: AtomicU64,
    clock: Arc<dyn Clock>,
}

/// Spend caps in memory, per scope and window (UTC day, UTC month, forever, or
/// rolling), with reserve / commit and threshold alerts.
///
/// All caps of a request are checked and reserved under one lock: a refused request
/// reserves nothing anywhere. A commit lands in the window the reservation was made
/// in, so a call that straddles midnight is charged to the day it started.
///
/// ```
/// use std::time::Duration;
/// use tokenwise::budget::{BudgetWindow, MemoryBudget};
/// use tokenwise::{Cost, ScopeKind};
/// let budget = MemoryBudget::builder()
///     .cap(ScopeKind::User, Cost::from_dollars(2), BudgetWindow::Day)
///     .cap(ScopeKind::Org, Cost::from_dollars(500), BudgetWindow::Month)
///     .cap(ScopeKind::Feature, Cost::from_dollars(20), BudgetWindow::Rolling(Duration::from_secs(3600)))
///     .on_alert(|a| eprintln!("{} at {} %", a.scope, a.threshold_percent))
///     .build()
///     .unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

impl MemoryBudget {
    /// A builder with no caps and alerts at 50, 80 and 100 %.
    pub fn builder() -> MemoryBudgetBuilder {
        MemoryBudgetBuilder {
            caps: Vec::new(),
            max_accounts: 100_000,
            thresholds: vec![50, 80, 100],
            hook: None,
            clock: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Accounts> {
        // Every mutation is applied after all checks, so a poisoned map is consistent.
        self.inner
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The accounts `meta` falls under at `now`, borrowing its identities.
    fn keys_for<'m>(&self, meta: &'m RequestMeta, now: Timestamp) -> SmallVec<[AccountRef<'m>; 4]> {
        self.inner
            .caps
            .iter()
            .enumerate()
            .filter_map(|(cap, c)| {
                Some(AccountRef {
                    cap,
                    key: c.scope.key_of(meta)?,
                    window: c.window.index(now),
                })
            })
            .collect()
    }

    fn status_of(&self, k: AccountRef<'_>, acc: &mut Account, now: Timestamp) -> CapStatus {
        let cap = &self.inner.caps[k.cap];
        CapStatus {
            scope: cap.scope.with_key(k.key),
            window: cap.window,
            limit: cap.limit,
            spent: acc.spent(now),
            reserved: acc.reserved,
        }
    }

    /// Spent and reserved on account `k` at `now`, without changing it (a rolling
    /// window is aged on a copy of its steps); `None` when there is no such account.
    fn standing(accounts: &Accounts, k: AccountRef<'_>, now: Timestamp) -> Option<(Cost, Cost)> {
        let acc = accounts.get(&k)?;
        let spent = match &acc.ring {
            Some(r) => {
                let mut r = (**r).clone();
                r.advance(now);
                r.total()
            }
            None => acc.spent,
        };
        Some((spent, acc.reserved))
    }

    /// Synchronous reserve: what [`Budget::reserve`] does, without a future.
    pub fn reserve_now(&self, meta: &RequestMeta, amount: Cost) -> Result<Reservation> {
        let now = self.inner.clock.now();
        let keys = self.keys_for(meta, now);
        let mut accounts = self.lock();
        // the cap closest to its limit: its account, spent and reserved
        let mut tightest: Option<(AccountRef<'_>, Cost, Cost, u64)> = None;
        let mut new = 0;
        for &k in &keys {
            let cap = self.inner.caps[k.cap];
            let (spent, reserved) = Self::standing(&accounts, k, now).unwrap_or_else(|| {
                new += 1;
                (Cost::ZERO, Cost::ZERO)
            });
            let committed = spent.saturating_add(reserved);
            if committed.saturating_add(amount) > cap.limit {
                return Err(Error::BudgetExceeded {
                    scope: cap.scope.with_key(k.key),
                    limit: cap.limit,
                    spent: committed,
                    retry_after: cap.window.until_reset(now),
                });
            }
            let used =
                u128::from(committed.as_nanos()) * 100 / u128::from(cap.limit.as_nanos()).max(1);
            let used = u64::try_from(used).unwrap_or(u64::MAX);
            if tightest.is_none_or(|(_, _, _, t)| used > t) {
                tightest = Some((k, spent, reserved, used));
            }
        }
        if accounts.len() + new > self.inner.max_accounts {
            self.evict(&mut accounts, now);
            if accounts.len() + new > self.inner.max_accounts {
                return Err(Error::Overloaded { retry_after: None });
            }
        }
        let mut names = Vec::with_capacity(keys.len());
        for &k in &keys {
            let acc = match accounts.get_mut(&k) {
                Some(acc) => acc,
                None => {
                    let window = self.inner.caps[k.cap].window;
                    accounts.entry(k.stored()).or_insert_with(|| Account {
                        ring: match window {
                            BudgetWindow::Rolling(w) => Some(Box::new(Ring::new(w, now))),
                            _ => None,
                        },
                        ..Account::default()
                    })
                }
            };
            acc.reserved = acc.reserved.saturating_add(amount);
            if acc.name.is_empty() {
                acc.name = k.name();
            }
            names.push(acc.name.clone());
        }
        drop(accounts);
        let r = Reservation::new(
            self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            amount,
            names,
        );
        Ok(match tightest {
            Some((k, spent, reserved, _)) => {
                let cap = &self.inner.caps[k.cap];
                r.with_tightest(CapStatus {
                    scope: cap.scope.with_key(k.key),
                    window: cap.window,
                    limit: cap.limit,
                    spent,
                    reserved,
                })
            }
            None => r,
        })
    }

    /// Drops accounts of past windows and accounts with nothing spent or reserved.
    fn evict(&self, accounts: &mut Accounts, now: Timestamp) {
        let caps = &self.inner.caps;
        accounts.retain(|k, a| {
            let current = caps[k.cap].window.index(now) == k.window;
            !a.reserved.is_zero() || (current && !a.spent(now).is_zero())
        });
    }

    /// Synchronous commit: what [`Budget::commit`] does, without a future.
    pub fn commit_now(&self, reservation: &Reservation, actual: Cost) {
        let now = self.inner.clock.now();
        let mut alerts = Vec::new();
        {
            let mut accounts = self.lock();
            for name in &reservation.accounts {
                let Some(k) = AccountRef::parse(name) else {
                    continue;
                };
                let Some(cap) = self.inner.caps.get(k.cap).copied() else {
                    continue;
                };
                let acc = match accounts.get_mut(&k) {
                    Some(acc) => acc,
                    None => accounts.entry(k.stored()).or_default(),
                };
                acc.reserved = acc.reserved.saturating_sub(reservation.amount);
                match &mut acc.ring {
                    Some(r) => r.add(now, actual),
                    None => acc.spent = acc.spent.saturating_add(actual),
                }
                let spent = acc.spent(now);
                // `spent` is at least `t` per cent of the limit: the whole per cent
                // (rounded down) reaches `t` exactly when this product does, and a
                // product needs no division
                let spent100 = u128::from(spent.as_nanos()) * 100;
                let limit = u128::from(cap.limit.as_nanos()).max(1);
                for (i, t) in self.inner.thresholds.iter().enumerate() {
                    let bit = 1u8 << i;
                    if spent100 >= u128::from(*t) * limit {
                        if acc.alerted & bit == 0 {
                            acc.alerted |= bit;
                            alerts.push(BudgetAlert {
                                scope: cap.scope.with_key(k.key),
                                window: cap.window,
                                limit: cap.limit,
                                spent,
                                threshold_percent: *t,
                            });
                        }
                    } else if acc.ring.is_some() {
                        // A rolling window re-arms once spend falls back below.
                        acc.alerted &= !bit;
                    }
                }
            }
        }
        for a in &alerts {
            tracing::warn!(scope = %a.scope, window = a.window.as_str(), threshold = a.threshold_percent,
                spent = %a.spent, limit = %a.limit, "spend threshold reached");
            if let Some(h) = &self.inner.hook {
                (h.0)(a);
            }
        }
    }

    /// The standing of every cap that applies to `meta`, synchronously.
    pub fn status_now(&self, meta: &RequestMeta) -> Vec<CapStatus> {
        let now = self.inner.clock.now();
        let keys = self.keys_for(meta, now);
        let mut accounts = self.lock();
        keys.iter()
            .map(|&k| match accounts.get_mut(&k) {
                Some(acc) => self.status_of(k, acc, now),
                None => self.status_of(k, &mut Account::default(), now),
            })
            .collect()
    }

    /// Accounts currently kept.
    pub fn accounts(&self) -> usize {
        self.lock().len()
    }

    /// The caps.
    pub fn caps(&self) -> &[SpendCap] {
        &self.inner.caps
    }
}

#[async_trait]
impl Budget for MemoryBudget {
    async fn reserve(&self, meta: &RequestMeta, amount: Cost) -> Result<Reservation> {
        self.reserve_now(meta, amount)
    }

    async fn commit(&self, reservation: Reservation, actual: Cost) -> Result<()> {
        self.commit_now(&reservation, actual);
        Ok(())
    }

    async fn status(&self, meta: &RequestMeta) -> Result<Vec<CapStatus>> {
        Ok(self.status_now(meta))
    }

    fn reserve_ready(&self, meta: &RequestMeta, amount: Cost) -> Option<Result<Reservation>> {
        Some(self.reserve_now(meta, amount))
    }

    fn commit_ready(&self, reservation: &Reservation, actual: Cost) -> Option<Result<()>> {
        self.commit_now(reservation, actual);
        Some(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};
    use crate::types::Scope;
    use std::time::Duration;

    fn meta(user: &str) -> RequestMeta {
        RequestMeta {
            user: Some(user.into()),
            org: Some("acme".into()),
            ..Default::default()
        }
    }

    #[test]
    fn account_names_read_back() {
        for (cap, window, key) in [(0, 0, ""), (1, 20_425, "user:alice"), (7, u64::MAX, "a|b")] {
            let k = AccountRef { cap, key, window };
            assert_eq!(AccountRef::parse(&k.name()), Some(k));
        }
        for bad in [
            "",
            "1|1",
            "|1|k",
            "1||k",
            "a|1|k",
            "+1|1|k",
            "1 |1|k",
            "99999999999999999999|1|k",
        ] {
            assert_eq!(AccountRef::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ready_paths_reserve_refuse_and_commit_as_the_futures_do() {
        use futures_util::FutureExt;
        let b = MemoryBudget::builder()
            .cap(ScopeKind::User, Cost::from_cents(10), BudgetWindow::Day)
            .build()
            .unwrap();
        let ann = meta("ann");
        let r1 = b.reserve_ready(&ann, Cost::from_cents(4)).unwrap().unwrap();
        let r2 = b
            .reserve(&ann, Cost::from_cents(4))
            .now_or_never()
            .unwrap()
            .unwrap();
        let ready = b
            .reserve_ready(&ann, Cost::from_cents(4))
            .unwrap()
            .unwrap_err();
        let awaited = b
            .reserve(&ann, Cost::from_cents(4))
            .now_or_never()
            .unwrap()
            .unwrap_err();
        assert_eq!(ready.to_string(), awaited.to_string());
        b.commit_ready(&r1, Cost::from_cents(1)).unwrap().unwrap();
        b.commit(r2, Cost::from_cents(2))
            .now_or_never()
            .unwrap()
            .unwrap();
        let st = b.status_now(&ann);
        assert_eq!(
            (st[0].spent, st[0].reserved),
            (Cost::from_cents(3), Cost::ZERO)
        );
    }

    #[test]
    fn reserve_commit_refuse() {
        let clock = ManualClock::new(Timestamp::from_secs(1_795_521_600)); // 2026-11-24 12:00 UTC
        let b = MemoryBudget::builder()
            .cap(ScopeKind::User, Cost::from_cents(10), BudgetWindow::Day)
            .cap(ScopeKind::Org, Cost::from_cents(12), BudgetWindow::Month)
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let ann = meta("ann");
        let r = b.reserve_now(&ann, Cost::from_cents(8)).unwrap();
        // a second worst case does not fit while the first is reserved
        let e = b.reserve_now(&ann, Cost::from_cents(3)).unwrap_err();
        match e {
            Error::BudgetExceeded {
                scope,
                spent,
                retry_after,
                ..
            } => {
                assert_eq!(scope, Scope::User("ann".into()));
                assert_eq!(spent, Cost::from_cents(8));
                assert_eq!(retry_after, Some(Duration::from_secs(12 * 3600)));
            }
            other => panic!("{other:?}"),
        }
        // the actual cost was lower: the rest is released
        b.commit_now(&r, Cost::from_cents(2));
        let st = b.status_now(&ann);
        assert_eq!(st[0].spent, Cost::from_cents(2));
        assert_eq!(st[0].reserved, Cost::ZERO);
        b.reserve_now(&ann, Cost::from_cents(3))
            .map(|r| b.commit_now(&r, Cost::from_cents(3)))
            .unwrap();
        // bob is refused by the org cap (2 + 3 spent, 9 asked > 12) and reserves nothing on his own cap
        let bob = meta("bob");
        let e = b.reserve_now(&bob, Cost::from_cents(9)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::BudgetExceeded {
                    scope: Scope::Org(_),
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(b.status_now(&bob)[0].reserved, Cost::ZERO);
        // a new day resets the user cap
        clock.advance(Duration::from_secs(12 * 3600));
        b.reserve_now(&ann, Cost::from_cents(7)).unwrap();
    }

    #[test]
    fn accounts_are_bounded() {
        let clock = ManualClock::new(Timestamp::from_secs(1_795_521_600));
        let b = MemoryBudget::builder()
            .cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
            .max_accounts(2)
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        for u in ["a", "b"] {
            let r = b.reserve_now(&meta(u), Cost::from_cents(1)).unwrap();
            b.commit_now(&r, Cost::from_cents(1));
        }
        assert!(matches!(
            b.reserve_now(&meta("c"), Cost::from_cents(1)),
            Err(Error::Overloaded { .. })
        ));
        clock.advance(Duration::from_secs(86_400));
        b.reserve_now(&meta("c"), Cost::from_cents(1)).unwrap();
        assert_eq!(b.accounts(), 1);
    }

    #[test]
    fn rolling_windows_age_spend_out() {
        let clock = ManualClock::new(Timestamp::from_secs(1_795_521_600));
        let b = MemoryBudget::builder()
            .cap(
                ScopeKind::User,
                Cost::from_cents(10),
                BudgetWindow::Rolling(Duration::from_secs(600)),
            )
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let ann = meta("ann");
        let r = b.reserve_now(&ann, Cost::from_cents(6)).unwrap();
        b.commit_now(&r, Cost::from_cents(6));
        clock.advance(Duration::from_secs(300));
        let r = b.reserve_now(&ann, Cost::from_cents(4)).unwrap();
        b.commit_now(&r, Cost::from_cents(4));
        let e = b.reserve_now(&ann, Cost::from_cents(1)).unwrap_err();
        assert_eq!(
            e.retry_after(),
            Some(Duration::from_secs(10)),
            "one step of the window"
        );
        // 600 s after the first spend it has aged out; the second has not
        clock.advance(Duration::from_secs(300));
        assert_eq!(b.status_now(&ann)[0].spent, Cost::from_cents(4));
        b.reserve_now(&ann, Cost::from_cents(6)).unwrap();
    }

    #[test]
    fn alerts_fire_once_per_threshold_and_window() {
        let clock = ManualClock::new(Timestamp::from_secs(1_795_521_600));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let b = MemoryBudget::builder()
            .cap(ScopeKind::User, Cost::from_cents(100), BudgetWindow::Day)
            .on_alert(move |a| {
                sink.lock()
                    .unwrap()
                    .push((a.scope.clone(), a.threshold_percent))
            })
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let ann = meta("ann");
        let spend = |c: u64| {
            let r = b.reserve_now(&ann, Cost::from_cents(c)).unwrap();
            b.commit_now(&r, Cost::from_cents(c));
        };
        spend(30);
        assert!(seen.lock().unwrap().is_empty());
        spend(25); // 55 %
        spend(10); // 65 %: no second 50 % alert
        spend(20); // 85 %
        spend(15); // 100 %
        let got: Vec<u8> = seen.lock().unwrap().iter().map(|(_, t)| *t).collect();
        assert_eq!(got, [50, 80, 100]);
        assert_eq!(seen.lock().unwrap()[0].0, Scope::User("ann".into()));
        // a new day: the thresholds fire again
        clock.advance(Duration::from_secs(86_400));
        spend(60);
        let got: Vec<u8> = seen.lock().unwrap().iter().map(|(_, t)| *t).collect();
        assert_eq!(got, [50, 80, 100, 50]);
    }

    #[test]
    fn reservations_report_the_tightest_cap() {
        let b = MemoryBudget::builder()
            .cap(ScopeKind::User, Cost::from_cents(10), BudgetWindow::Day)
            .cap(ScopeKind::Org, Cost::from_cents(100), BudgetWindow::Day)
            .build()
            .unwrap();
        let ann = meta("ann");
        let r = b.reserve_now(&ann, Cost::from_cents(8)).unwrap();
        assert_eq!(r.used_percent(), 0);
        b.commit_now(&r, Cost::from_cents(8));
        let r = b.reserve_now(&ann, Cost::from_cents(1)).unwrap();
        assert_eq!(r.used_percent(), 80);
        assert_eq!(
            r.tightest.as_ref().unwrap().scope,
            Scope::User("ann".into())
        );
    }
}
