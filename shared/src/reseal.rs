//! Secrets sealed again under `LABELSYNC_SECRET_KEY` after a key rotation.
//!
//! A pass ([`pass`]) walks every sealed value (storages' secrets, webhook
//! endpoints' secrets and their previous secrets while those still sign)
//! in id order and sorts it: the key opens it, only a
//! `LABELSYNC_SECRET_KEY_FALLBACKS` key does, or none does. The
//! scheduler counts so at start and every ten minutes ([`Mode::Count`]:
//! it writes nothing, since a process not yet given the new key could not
//! open what it would seal). `labelsync-scheduler reseal` ([`Mode::Reseal`])
//! stores each value only a fallback opens sealed again under the key, and
//! drops previous webhook secrets whose time is up (they sign nothing, and
//! would need the old key for ever: `db::webhooks::drop_expired_previous_secrets`,
//! as the scheduler's cleanup does). Each write is conditional on the
//! value read; one that lost to a save is read and tried again.
use sea_orm::ConnectionTrait;
use serde::Serialize;

use crate::{
    Result,
    db::{storages, webhooks as hooks},
    security::secrets::{Reseal, SecretBox},
    storage::secrets_context,
    webhooks::{secret_context, signs_until},
};

/// Rows read per query.
const PAGE: u64 = 500;

/// How many unopenable values a tally names.
const NAMED: usize = 20;

/// Whether a pass writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sorts the values, writes nothing.
    Count,
    /// Seals again under the key what only a fallback opens, and drops
    /// previous webhook secrets whose time is up.
    Reseal,
}

/// What one pass found.
#[derive(Debug, Default, Serialize)]
pub struct Tally {
    /// The id of the key the values were sorted (and sealed) under
    /// (`SecretBox::key_id`).
    pub key_id: String,
    /// Values the key opens after the pass (those sealed again included).
    pub current: u64,
    /// Of those, values the pass sealed again (a fallback opened them).
    pub resealed: u64,
    /// Values only a fallback opens after the pass (a count; or a value
    /// changed twice while the pass tried to seal it again).
    pub fallback: u64,
    /// Values no key opens: their storages and endpoints need them given
    /// again.
    pub unopenable: u64,
    /// The first [`NAMED`] of those: `storage 3`, `webhook 5`, `webhook 5
    /// (previous secret)`.
    pub unopenable_in: Vec<String>,
    /// Previous webhook secrets whose time was up, dropped.
    pub expired_dropped: u64,
}

impl Tally {
    /// Whether every value opens under the key alone: the fallbacks can go.
    pub fn settled(&self) -> bool {
        self.fallback == 0 && self.unopenable == 0
    }

    fn count_unopenable(&mut self, slot: Slot) {
        self.unopenable += 1;
        if self.unopenable_in.len() < NAMED {
            self.unopenable_in.push(slot.label());
        }
    }
}

/// Where one sealed value is kept.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Storage(i64),
    Webhook(i64),
    Previous(i64),
}

impl Slot {
    fn label(self) -> String {
        match self {
            Slot::Storage(id) => format!("storage {id}"),
            Slot::Webhook(id) => format!("webhook {id}"),
            Slot::Previous(id) => format!("webhook {id} (previous secret)"),
        }
    }

    /// The AEAD context the value is sealed for.
    fn context(self) -> String {
        match self {
            Slot::Storage(id) => secrets_context(id),
            Slot::Webhook(id) | Slot::Previous(id) => secret_context(id),
        }
    }

    /// The value as stored now; `None` when there is none (the row gone,
    /// the secrets or the previous secret removed).
    async fn read(self, db: &impl ConnectionTrait) -> Result<Option<String>> {
        Ok(match self {
            Slot::Storage(id) => storages::find(db, id).await?.and_then(|s| s.secrets),
            Slot::Webhook(id) => hooks::find(db, id).await?.map(|h| h.secret),
            Slot::Previous(id) => hooks::find(db, id).await?.and_then(|h| h.previous_secret),
        })
    }

    /// Stores `new` where `old` still is; false when it is not.
    async fn swap(self, db: &impl ConnectionTrait, old: &str, new: &str) -> Result<bool> {
        match self {
            Slot::Storage(id) => storages::swap_sealed(db, id, old, new).await,
            Slot::Webhook(id) => hooks::swap_secret(db, id, old, new).await,
            Slot::Previous(id) => hooks::swap_previous_secret(db, id, old, new).await,
        }
    }
}

/// One pass over every sealed value; records `labelsync_secrets_sealed`.
pub async fn pass(db: &impl ConnectionTrait, secrets: &SecretBox, mode: Mode) -> Result<Tally> {
    let mut pass = Pass {
        db,
        secrets,
        mode,
        tally: Tally {
            key_id: secrets.key_id().to_owned(),
            ..Tally::default()
        },
    };
    pass.storages().await?;
    if mode == Mode::Reseal {
        // The scheduler's cleanup does the same every minute; done here
        // too so that the tally says what is left now.
        let now = crate::clock::now();
        pass.tally.expired_dropped = hooks::drop_expired_previous_secrets(db, now).await?;
    }
    pass.webhooks().await?;
    let tally = pass.tally;
    crate::metrics::metrics().record_sealed(tally.current, tally.fallback, tally.unopenable);
    Ok(tally)
}

struct Pass<'a, C> {
    db: &'a C,
    secrets: &'a SecretBox,
    mode: Mode,
    tally: Tally,
}

impl<C: ConnectionTrait> Pass<'_, C> {
    /// Storages' sealed secrets.
    async fn storages(&mut self) -> Result<()> {
        let mut after = 0;
        loop {
            let page = storages::sealed_after(self.db, after, PAGE).await?;
            let Some(&(last, _)) = page.last() else {
                return Ok(());
            };
            for (id, sealed) in page {
                self.sort(Slot::Storage(id), sealed).await?;
            }
            after = last;
        }
    }

    /// Webhook endpoints' secrets and previous secrets.
    async fn webhooks(&mut self) -> Result<()> {
        let mut after = 0;
        loop {
            let page = hooks::sealed_after(self.db, after, PAGE).await?;
            let Some(&(last, ..)) = page.last() else {
                return Ok(());
            };
            for (id, secret, previous, until) in page {
                self.sort(Slot::Webhook(id), secret).await?;
                let Some(previous) = previous else { continue };
                // One whose time is up signs nothing: not counted (in
                // `Mode::Reseal`, dropped by `pass` before the walk).
                if signs_until(until).is_some() {
                    self.sort(Slot::Previous(id), previous).await?;
                }
            }
            after = last;
        }
    }

    /// Sorts one value into the tally; in [`Mode::Reseal`], stores it
    /// sealed again when only a fallback opens it (read again and tried
    /// once more when a save changed it meanwhile).
    async fn sort(&mut self, slot: Slot, mut sealed: String) -> Result<()> {
        for _ in 0..2 {
            let new = match self.secrets.reseal(&slot.context(), &sealed)? {
                Reseal::Current => {
                    self.tally.current += 1;
                    return Ok(());
                }
                Reseal::Unopenable => {
                    self.tally.count_unopenable(slot);
                    return Ok(());
                }
                Reseal::Sealed(_) if self.mode == Mode::Count => break,
                Reseal::Sealed(new) => new,
            };
            if slot.swap(self.db, &sealed, &new).await? {
                self.tally.current += 1;
                self.tally.resealed += 1;
                return Ok(());
            }
            match slot.read(self.db).await? {
                Some(now) => sealed = now,
                None => return Ok(()),
            }
        }
        self.tally.fallback += 1;
        Ok(())
    }
}
