//! The admit stage: bounded concurrency (shed at once), then rate limits on every
//! scope of the request at once. What it grants is an [`Admitted`], which gives its
//! token charge back however the request ends.

use std::sync::Arc;

use super::{Inner, Plan, run_detached};
use crate::limiter::{Admission, wait_until_admitted};
use crate::resilience::Slot;
use crate::types::{Anonymous, RequestMeta, ScopeKind};
use crate::{Error, Result};

/// What admission granted: the concurrency slot and the token charge on the request's
/// scopes. The charge is reconciled by [`settle`](Self::settle) to what the request
/// used; an `Admitted` dropped unsettled (its request abandoned) reconciles it to what
/// the request is known to have used by then (nothing before dispatch, the prompt
/// after), so a refusal or a cancellation never keeps tokens it did not use.
///
/// It borrows the request's identity while the request is at hand (a whole answer's
/// funnel), and owns a copy once it must outlive it (a stream's settlement, see
/// [`into_owned`](Self::into_owned)); an abandoned request's copy is made as it drops.
pub(super) struct Admitted<'m> {
    inner: Arc<Inner>,
    /// Released when the request ends.
    _slot: Option<Slot>,
    charged: u64,
    /// The request's identity, kept only while there is a charge to reconcile.
    meta: Option<Identity<'m>>,
    /// What the request has used if it is abandoned now.
    on_drop: u64,
}

/// A request's identity, borrowed or owned on the heap: a pointer either way, so that
/// an admission moves cheaply.
enum Identity<'m> {
    Borrowed(&'m RequestMeta),
    Owned(Box<RequestMeta>),
}

impl Identity<'_> {
    fn get(&self) -> &RequestMeta {
        match self {
            Identity::Borrowed(m) => m,
            Identity::Owned(m) => m,
        }
    }

    fn into_owned(self) -> Box<RequestMeta> {
        match self {
            Identity::Borrowed(m) => Box::new(m.clone()),
            Identity::Owned(m) => m,
        }
    }
}

impl std::fmt::Debug for Admitted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted")
            .field("charged", &self.charged)
            .field("on_drop", &self.on_drop)
            .finish_non_exhaustive()
    }
}

impl<'m> Admitted<'m> {
    /// A charge of `charged` tokens on `meta`'s scopes already made (by the batch path,
    /// which holds charges across a batch's life), to settle like any admission.
    pub(super) fn carrying(inner: &Arc<Inner>, meta: &'m RequestMeta, charged: u64) -> Self {
        Admitted {
            inner: Arc::clone(inner),
            _slot: None,
            charged,
            meta: (charged > 0).then_some(Identity::Borrowed(meta)),
            on_drop: 0,
        }
    }

    /// The same admission, owning the request's identity (to outlive the request).
    pub(super) fn into_owned(mut self) -> Admitted<'static> {
        Admitted {
            inner: Arc::clone(&self.inner),
            _slot: self._slot.take(),
            charged: self.charged,
            meta: self.meta.take().map(|m| Identity::Owned(m.into_owned())),
            on_drop: self.on_drop,
        }
    }

    /// Takes the charge out, to be reconciled by the caller (it is no longer given
    /// back when this is dropped); the slot stays until this is dropped.
    pub(super) fn release_charge(&mut self) -> u64 {
        self.meta = None;
        std::mem::take(&mut self.charged)
    }

    /// From now on an abandoned request has used `tokens` (its prompt, once sent).
    pub(super) fn used_if_abandoned(&mut self, tokens: u64) {
        self.on_drop = tokens;
    }

    /// Reconciles the charge to `actual` tokens; the slot is released when this is
    /// dropped.
    pub(super) async fn settle(&mut self, actual: u64) {
        let Some(meta) = self.meta.take() else { return };
        let charged = std::mem::take(&mut self.charged);
        self.inner
            .reconcile_tokens(meta.get(), charged, actual)
            .await;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let Some(meta) = self.meta.take().map(Identity::into_owned) else {
            return;
        };
        let (inner, charged, used) = (Arc::clone(&self.inner), self.charged, self.on_drop);
        run_detached(Box::pin(async move {
            inner.reconcile_tokens(&meta, charged, used).await;
        }));
    }
}

impl Inner {
    pub(super) async fn admit<'m>(
        self: &Arc<Self>,
        meta: &'m RequestMeta,
        plan: &Plan,
    ) -> Result<Admitted<'m>> {
        self.check_identity(meta)?;
        let slot = match &self.concurrency {
            Some(c) => Some(c.acquire(meta).await?),
            None => None,
        };
        self.refuse_gate(meta).await?;
        let charged = match &self.limiter {
            Some(l) => {
                let admission = Admission::new(meta, plan.token_estimate);
                match (l.acquire_ready(&admission), self.wait_for_limits) {
                    (Some(Ok(())), _) => {}
                    (Some(Err(e)), None) => return Err(e),
                    // refused with time to wait for the limits (nothing was consumed):
                    // the waiting loop asks again
                    (_, Some(max_wait)) => {
                        wait_until_admitted(max_wait, || l.acquire(&admission)).await?
                    }
                    (None, None) => l.acquire(&admission).await?,
                }
                plan.token_estimate
            }
            None => 0,
        };
        Ok(Admitted {
            inner: Arc::clone(self),
            _slot: slot,
            charged,
            meta: (charged > 0).then_some(Identity::Borrowed(meta)),
            on_drop: 0,
        })
    }

    /// Under [`Anonymous::Refuse`], refuses a request that carries no identity for a
    /// scope kind the pipeline's limits or caps use.
    fn check_identity(&self, meta: &RequestMeta) -> Result<()> {
        if self.anonymous != Anonymous::Refuse {
            return Ok(());
        }
        match self
            .identity_scopes
            .iter()
            .find(|k| k.identity(meta).is_none())
        {
            Some(kind) => Err(Error::InvalidRequest(format!(
                "the request has no {kind} identity, which this pipeline's limits and caps require"
            ))),
            None => Ok(()),
        }
    }

    /// Reconciles a token charge on `meta`'s scopes to `actual`.
    pub(super) async fn reconcile_tokens(&self, meta: &RequestMeta, charged: u64, actual: u64) {
        if let (Some(l), true) = (&self.limiter, charged != actual) {
            let done = ready_or!(
                l.reconcile_ready(meta, charged, actual),
                l.reconcile(meta, charged, actual)
            );
            if let Err(e) = done {
                tracing::warn!(error = %e, "token reconciliation failed");
            }
        }
    }
}

/// The scope kinds a set of limits and caps uses, without global (always known).
pub(super) fn identity_kinds(kinds: impl IntoIterator<Item = ScopeKind>) -> Vec<ScopeKind> {
    let mut out: Vec<ScopeKind> = kinds
        .into_iter()
        .filter(|k| *k != ScopeKind::Global)
        .collect();
    out.sort();
    out.dedup();
    out
}
